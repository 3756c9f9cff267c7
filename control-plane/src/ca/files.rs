//! The CA kept in a directory (`--ca-dir`, the lab's and `--source
//! manifests`'s way).
//!
//! Two layouts:
//! - `root-cert.pem` + `root-key.pem`: a root the control plane generated
//!   on its first start (or one the operator put there), which it signs
//!   with and which is the one trusted root;
//! - a plug-in CA, as in the Kubernetes Secret: `ca-cert.pem` + `ca-key.pem`
//!   to sign with, `root-cert.pem` the trusted roots (several during a
//!   rotation), `cert-chain.pem` optional. It wins when `ca-cert.pem` exists.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kanava_mesh::names;

use super::{CertificateAuthority, SigningMaterial, generate_root};
use crate::Error;

/// File name of the root certificate (and of the trusted roots).
pub const ROOT_CERT_FILE: &str = names::CA_ROOT_CERT_FILE;
/// File name of a generated root's private key.
pub const ROOT_KEY_FILE: &str = names::CA_ROOT_KEY_FILE;

/// Loads the CA from `dir`, or creates a root there if `dir` holds none.
pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority, Error> {
    let origin = dir.display().to_string();
    let material = match load(dir)? {
        Some(material) => material,
        None => {
            let material = generate_root(trust_domain)?;
            fs::create_dir_all(dir).map_err(|source| Error::File {
                path: dir.to_path_buf(),
                source,
            })?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            write_private(&dir.join(ROOT_KEY_FILE), material.ca_key_pem.as_bytes())?;
            write_private(&dir.join(ROOT_CERT_FILE), material.ca_cert_pem.as_bytes())?;
            tracing::info!(dir = %dir.display(), "created CA root");
            material
        }
    };
    CertificateAuthority::from_material(&material, trust_domain, &origin)
}

/// The material in `dir` now, and where it came from (the CA follows it).
pub(super) fn read_material(dir: &Path) -> Result<(SigningMaterial, String), Error> {
    let origin = dir.display().to_string();
    match load(dir)? {
        Some(material) => Ok((material, origin)),
        None => Err(Error::CaUnusable {
            origin,
            reason: format!(
                "no CA material ({} and {}, or {}, {} and {})",
                ROOT_CERT_FILE,
                ROOT_KEY_FILE,
                names::CA_CERT_KEY,
                names::CA_KEY_KEY,
                names::ROOT_CERT_KEY
            ),
        }),
    }
}

/// The material in `dir`, `None` when it holds none.
fn load(dir: &Path) -> Result<Option<SigningMaterial>, Error> {
    let plug_in_cert = dir.join(names::CA_CERT_KEY);
    if plug_in_cert.exists() {
        let chain = dir.join(names::CERT_CHAIN_KEY);
        return Ok(Some(SigningMaterial {
            ca_cert_pem: read(&plug_in_cert)?,
            ca_key_pem: read(&dir.join(names::CA_KEY_KEY))?,
            roots_pem: read(&dir.join(names::ROOT_CERT_KEY))?,
            chain_pem: if chain.exists() {
                Some(read(&chain)?)
            } else {
                None
            },
        }));
    }
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert = read(&cert_path)?;
            Ok(Some(SigningMaterial {
                ca_key_pem: read(&key_path)?,
                roots_pem: cert.clone(),
                ca_cert_pem: cert,
                chain_pem: None,
            }))
        }
        (false, false) => Ok(None),
        (true, false) => Err(Error::HalfARoot {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(Error::HalfARoot {
            present: key_path,
            missing: cert_path,
        }),
    }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file readable by its owner only, atomically (temp + rename), so a
/// crash never leaves half a key behind.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let tmp: PathBuf = path.with_extension("tmp");
    let file_error = |source| Error::File {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(file_error)?;
    file.write_all(contents).map_err(file_error)?;
    file.sync_all().map_err(file_error)?;
    fs::rename(&tmp, path).map_err(file_error)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn root_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), "cluster.local").unwrap();
        let again = load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        let mode = fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "root key must be private");
    }

    #[test]
    fn half_a_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), "cluster.local").unwrap();
        fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = load_or_create(dir.path(), "cluster.local").err().unwrap();
        assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
    }

    #[test]
    fn a_plug_in_ca_in_the_directory_wins_and_trusts_every_root_listed() {
        let dir = tempfile::tempdir().unwrap();
        let old = generate_root("cluster.local").unwrap();
        let new = generate_root("cluster.local").unwrap();
        fs::write(dir.path().join(names::CA_CERT_KEY), &new.ca_cert_pem).unwrap();
        fs::write(dir.path().join(names::CA_KEY_KEY), &new.ca_key_pem).unwrap();
        fs::write(
            dir.path().join(names::ROOT_CERT_KEY),
            format!("{}{}", old.roots_pem, new.roots_pem),
        )
        .unwrap();
        let ca = load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.roots_pem().len(), 2);
        assert!(
            !dir.path().join(ROOT_KEY_FILE).exists(),
            "no root generated"
        );
    }
}
