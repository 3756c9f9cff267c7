//! The mesh certificate authority.
//!
//! The root key and certificate live in a directory (`root-key.pem`,
//! `root-cert.pem`). On first start they are generated; afterwards they are
//! reused, so certificates issued before a restart stay valid. An operator who
//! wants Kanava to chain to an existing PKI puts that CA's certificate and key
//! there before the first start ("plug-in CA").
//!
//! Workload certificates are short-lived, carry exactly one URI SAN (the
//! SPIFFE identity) and are usable for both TLS client and server auth. The CA
//! decides everything in them; from a CSR it takes only the public key, after
//! checking the CSR's signature and that it asks for the identity requested.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kanava_mesh::Identity;
use kanava_tls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::Error;

/// File name of the root certificate inside the CA directory.
pub const ROOT_CERT_FILE: &str = kanava_mesh::names::CA_ROOT_CERT_FILE;
/// File name of the root private key inside the CA directory.
pub const ROOT_KEY_FILE: &str = kanava_mesh::names::CA_ROOT_KEY_FILE;

/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of issued certificates, so peers with slightly slow clocks
/// accept them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    trust_domain: String,
}

/// A certificate the CA signed.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM, leaf first.
    pub chain_pem: Vec<String>,
    pub not_after: SystemTime,
}

impl CertificateAuthority {
    /// Loads the root from `dir`, or creates and stores one if `dir` holds
    /// none.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path, trust_domain),
            (false, false) => Self::create(dir, trust_domain),
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

    fn load(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<Self, Error> {
        let root_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| Error::RootUnusable {
            path: key_path.to_path_buf(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, key).map_err(|source| Error::RootUnusable {
                path: cert_path.to_path_buf(),
                source,
            })?;
        tracing::info!(root = %cert_path.display(), "loaded CA root");
        Ok(CertificateAuthority {
            issuer,
            root_pem,
            trust_domain: trust_domain.to_string(),
        })
    }

    fn create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        fs::create_dir_all(dir).map_err(|source| Error::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_error)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Kanava");
        name.push(
            DnType::CommonName,
            format!("Kanava mesh root ({trust_domain})"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(ca_error)?;
        write_private(&dir.join(ROOT_KEY_FILE), key.serialize_pem().as_bytes())?;
        write_private(&dir.join(ROOT_CERT_FILE), cert.pem().as_bytes())?;
        tracing::info!(dir = %dir.display(), "created CA root");
        Ok(CertificateAuthority {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.to_string(),
        })
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a workload certificate for `identity` over the key in `csr`
    /// (PEM or DER). The caller has already checked that the requester may
    /// have this identity.
    pub fn sign_workload(
        &self,
        csr: &[u8],
        identity: &Identity,
        ttl: Duration,
    ) -> Result<IssuedCert, Error> {
        if identity.trust_domain() != self.trust_domain {
            return Err(Error::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let request = parse_csr(csr)?;
        let expected = identity.to_string();
        let found: Vec<String> = request
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if found != [expected.clone()] {
            return Err(Error::CsrIdentityMismatch {
                expected,
                found: if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                },
            });
        }

        let now = SystemTime::now();
        let not_after = now + ttl;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            expected
                .try_into()
                .map_err(|e: rcgen::Error| Error::BadCsr(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(ca_error)?;
        Ok(IssuedCert {
            chain_pem: vec![cert.pem()],
            not_after: truncate_to_seconds(not_after),
        })
    }

    /// Issues a serving certificate (with a fresh key) for the control
    /// plane's own gRPC endpoint.
    pub fn sign_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_error)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "kanava-control-plane");
        params.distinguished_name = name;
        for dns in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.clone().try_into().map_err(
                    |source| Error::BadServerName {
                        name: dns.clone(),
                        source,
                    },
                )?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer).map_err(ca_error)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key))
    }
}

fn parse_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, Error> {
    let result = if csr.starts_with(b"-----BEGIN") {
        let text =
            std::str::from_utf8(csr).map_err(|_| Error::BadCsr("PEM is not UTF-8".into()))?;
        CertificateSigningRequestParams::from_pem(text)
    } else {
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
    };
    result.map_err(|e| Error::BadCsr(e.to_string()))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, non-zero DER integer.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn ca_error(source: rcgen::Error) -> Error {
    Error::Signing(source)
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file readable by its owner only, atomically (temp + rename), so a
/// crash never leaves half a key behind.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
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
    use kanava_tls::{CertificateRequest, MeshRoots, identity_of, parse_pem_certs};

    use super::*;

    fn identity(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    #[test]
    fn root_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let again = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
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
        CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path(), "cluster.local")
            .err()
            .unwrap();
        assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
    }

    #[test]
    fn signs_a_workload_certificate_that_chains_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let id = identity("shop", "web");
        let request = CertificateRequest::generate(&id).unwrap();
        let issued = ca
            .sign_workload(request.csr_der(), &id, Duration::from_secs(3600))
            .unwrap();
        let leaf = &parse_pem_certs(issued.chain_pem[0].as_bytes()).unwrap()[0];
        assert_eq!(identity_of(leaf).unwrap(), id);
        let lifetime = issued
            .not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((3590..=3600).contains(&lifetime), "lifetime {lifetime}");
        let cert = request.into_cert(&issued.chain_pem).unwrap();
        assert_eq!(cert.identity(), &id);
        MeshRoots::from_pem(ca.root_pem().as_bytes()).unwrap();
    }

    #[test]
    fn refuses_a_csr_for_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let request = CertificateRequest::generate(&identity("shop", "admin")).unwrap();
        let err = ca
            .sign_workload(
                request.csr_der(),
                &identity("shop", "web"),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, Error::CsrIdentityMismatch { .. }), "{err}");
        assert!(err.to_string().contains("ns/shop/sa/admin"), "{err}");
    }

    #[test]
    fn refuses_garbage_and_foreign_trust_domains() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let id = identity("shop", "web");
        let err = ca
            .sign_workload(b"not a csr", &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, Error::BadCsr(_)), "{err}");

        let foreign = Identity::new("other.example", "shop", "web").unwrap();
        let request = CertificateRequest::generate(&foreign).unwrap();
        let err = ca
            .sign_workload(request.csr_der(), &foreign, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, Error::ForeignTrustDomain { .. }), "{err}");
    }
}
