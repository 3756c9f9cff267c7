//! `kanava ca rotate`: replaces the lab's mesh root while traffic flows,
//! the three steps the README's "Rotating the mesh root" describes, each
//! one an edit of the CA directory that the control plane follows, and
//! each finished only once every ztunnel reports it:
//!
//! 1. **trust**: the new root is trusted beside the old; the old still
//!    signs. Done when every ztunnel trusts both.
//! 2. **sign**: the new root signs. Done when every ztunnel has replaced
//!    every workload certificate with one under it.
//! 3. **retire**: only the new root is trusted; the old root's key is
//!    deleted. Done when every ztunnel trusts the new root alone: from then
//!    on a certificate under the old root is refused.
//!
//! Nothing restarts and no connection is cut: a peer under either root is
//! trusted by everyone until nobody presents the old one any more.

use std::path::Path;
use std::time::{Duration, Instant};

use kanava_mesh::names;
use serde::Serialize;

use crate::files::write_atomically;
use crate::state::LabState;
use crate::{Error, propagation};

/// How each step of a rotation went.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// SHA-256 fingerprints of the roots before and after.
    pub old_roots: Vec<String>,
    pub new_root: String,
    pub steps: Vec<RotationStep>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStep {
    pub step: &'static str,
    /// From the edit to the last ztunnel reporting it.
    pub elapsed_ms: u64,
    /// Workload certificates replaced across the nodes (the sign step).
    pub certificates: usize,
}

/// The CA directory's material, in either layout (see the control plane's
/// `ca::files`).
struct Material {
    cert_pem: String,
    key_pem: String,
    roots_pem: String,
}

fn read(dir: &Path, name: &str) -> Result<String, Error> {
    std::fs::read_to_string(dir.join(name))
        .map_err(Error::io(format!("read {}", dir.join(name).display())))
}

fn current_material(dir: &Path) -> Result<Material, Error> {
    if dir.join(names::CERT_CHAIN_KEY).exists() {
        return Err(Error::Spec(format!(
            "the lab's CA in {} signs with an intermediate ({} exists): rotate an operator's CA by editing its files as the README says",
            dir.display(),
            names::CERT_CHAIN_KEY
        )));
    }
    if dir.join(names::CA_CERT_KEY).exists() {
        return Ok(Material {
            cert_pem: read(dir, names::CA_CERT_KEY)?,
            key_pem: read(dir, names::CA_KEY_KEY)?,
            roots_pem: read(dir, names::ROOT_CERT_KEY)?,
        });
    }
    let cert_pem = read(dir, names::CA_ROOT_CERT_FILE)?;
    Ok(Material {
        key_pem: read(dir, names::CA_ROOT_KEY_FILE)?,
        roots_pem: cert_pem.clone(),
        cert_pem,
    })
}

fn write_private(dir: &Path, name: &str, text: &str) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    write_atomically(&path, text.as_bytes())?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))
}

fn fingerprints(pem: &str) -> Result<Vec<String>, Error> {
    let certs = kanava_tls::parse_pem_certs(pem.as_bytes())
        .map_err(|e| Error::Spec(format!("the lab's CA: {e}")))?;
    Ok(certs
        .iter()
        .map(|cert| kanava_tls::fingerprint(cert.as_ref()))
        .collect())
}

/// What one ztunnel reports: the roots it trusts, the mesh's signer it
/// knows, and the signer of each certificate.
struct Reported {
    roots: Vec<String>,
    signer: Option<String>,
    certificate_signers: Vec<Option<String>>,
}

fn reported(netns: &str) -> Option<Reported> {
    let dump = propagation::config_dump(netns)?;
    let strings = |value: &serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    Some(Reported {
        roots: strings(&dump["trust"]["roots"]),
        signer: dump["trust"]["signer"].as_str().map(str::to_string),
        certificate_signers: dump["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|cert| cert["signer"].as_str().map(str::to_string))
            .collect(),
    })
}

/// Waits until every node's ztunnel reports what `done` wants.
fn wait_for_every_ztunnel(
    state: &LabState,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Reported) -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let behind: Vec<&str> = state
            .nodes
            .iter()
            .filter(|node| !reported(&node.netns).is_some_and(|r| done(&r)))
            .map(|node| node.name.as_str())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!(
                    "{what} on {} (see kanava lab logs --name {} ztunnel/{})",
                    behind.join(", "),
                    state.name,
                    behind[0]
                ),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rotates the lab's mesh root; each step waits up to `step_timeout`.
pub fn rotate(state: &LabState, step_timeout: Duration) -> Result<Rotation, Error> {
    let dir = state.layout().ca_dir();
    let old = current_material(&dir)?;
    let old_roots = fingerprints(&old.roots_pem)?;
    let new = kanava_tls::MeshRootKey::generate(kanava_mesh::DEFAULT_TRUST_DOMAIN)
        .map_err(|e| Error::Spec(format!("generate the new root: {e}")))?;
    let new_root = fingerprints(&new.cert_pem)?.remove(0);
    let mut steps = Vec::new();

    // 1. trust. The directory moves to the plug-in layout first, with the
    // old material unchanged: key, then certificate (the layout switches
    // with the certificate), then the roots.
    let started = Instant::now();
    write_private(&dir, names::CA_KEY_KEY, &old.key_pem)?;
    write_private(&dir, names::CA_CERT_KEY, &old.cert_pem)?;
    write_private(
        &dir,
        names::ROOT_CERT_KEY,
        &format!("{}{}", old.roots_pem, new.cert_pem),
    )?;
    wait_for_every_ztunnel(state, "trust in the new root", step_timeout, |r| {
        r.roots.contains(&new_root) && old_roots.iter().all(|root| r.roots.contains(root))
    })?;
    steps.push(RotationStep {
        step: "trust",
        elapsed_ms: started.elapsed().as_millis() as u64,
        certificates: 0,
    });

    // 2. sign. The key and certificate change one after the other; the
    // control plane refuses the moment between (a key that does not match
    // its certificate) and keeps signing with the old one until both are
    // there.
    let started = Instant::now();
    write_private(&dir, names::CA_KEY_KEY, &new.key_pem)?;
    write_private(&dir, names::CA_CERT_KEY, &new.cert_pem)?;
    wait_for_every_ztunnel(
        state,
        "every workload certificate under the new root",
        step_timeout,
        |r| {
            r.signer.as_deref() == Some(new_root.as_str())
                && r.certificate_signers
                    .iter()
                    .all(|signer| signer.as_deref() == Some(new_root.as_str()))
        },
    )?;
    let certificates = state
        .nodes
        .iter()
        .filter_map(|node| reported(&node.netns))
        .map(|r| r.certificate_signers.len())
        .sum();
    steps.push(RotationStep {
        step: "sign",
        elapsed_ms: started.elapsed().as_millis() as u64,
        certificates,
    });

    // 3. retire.
    let started = Instant::now();
    write_private(&dir, names::ROOT_CERT_KEY, &new.cert_pem)?;
    let old_key = dir.join(names::CA_ROOT_KEY_FILE);
    if old_key.exists() {
        std::fs::remove_file(&old_key).map_err(Error::io(format!(
            "delete the old key {}",
            old_key.display()
        )))?;
    }
    wait_for_every_ztunnel(state, "trust in the new root alone", step_timeout, |r| {
        r.roots == [new_root.clone()]
    })?;
    steps.push(RotationStep {
        step: "retire",
        elapsed_ms: started.elapsed().as_millis() as u64,
        certificates: 0,
    });
    Ok(Rotation {
        old_roots,
        new_root,
        steps,
    })
}
