//! The mesh certificate authority.
//!
//! The CA signs with a certificate and key ([`SigningMaterial`]): a root it
//! generated on first start, or an operator's own intermediate (a "plug-in
//! CA"). Where they are kept depends on the source: a directory
//! ([`files`], the lab) or Secrets in the control plane's namespace
//! ([`secret`], Kubernetes). The roots that ztunnels trust may be more than
//! the one the CA signs under, so a root can be rotated without a failed
//! connection (see the README). The control plane reads its material again
//! every few seconds ([`follow`]) and signs with what it finds from then on.
//!
//! Workload certificates are short-lived, carry exactly one URI SAN (the
//! SPIFFE identity) and are usable for both TLS client and server auth. The CA
//! decides everything in them; from a CSR it takes only the public key, after
//! checking the CSR's signature and that it asks for the identity requested.

pub mod files;
mod follow;
mod material;
pub mod secret;

pub use follow::{Authority, MaterialSource, follow};
pub use material::SigningMaterial;

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use kanava_mesh::Identity;
use kanava_tls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::Error;

/// Backdating of issued certificates, so peers with slightly slow clocks
/// accept them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// Fingerprint of the signing certificate (see `TrustBundle.signer`).
    signer: String,
    /// Certificates served after each leaf: the signing certificate and its
    /// intermediates, up to (not including) a trusted root.
    chain_pem: Vec<String>,
    /// The trusted roots, one PEM certificate each.
    roots_pem: Vec<String>,
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
    /// A CA signing with `material`, which has been checked (see
    /// [`SigningMaterial::check`]). `origin` names where it came from, for
    /// errors.
    pub fn from_material(
        material: &SigningMaterial,
        trust_domain: &str,
        origin: &str,
    ) -> Result<Self, Error> {
        let checked = material.check(origin)?;
        tracing::info!(
            %origin,
            roots = checked.roots_pem.len(),
            chain = checked.chain_pem.len(),
            signer = %checked.signer,
            "certificate authority ready"
        );
        Ok(CertificateAuthority {
            issuer: checked.issuer,
            signer: checked.signer,
            chain_pem: checked.chain_pem,
            roots_pem: checked.roots_pem,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// The trusted roots, PEM, one after the other (what ztunnels trust).
    pub fn root_pem(&self) -> String {
        self.roots_pem.concat()
    }

    /// The trusted roots, one PEM certificate each.
    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Fingerprint of the certificate that signs workload certificates.
    pub fn signer(&self) -> &str {
        &self.signer
    }

    /// What ztunnels are told to trust, and who signs now.
    pub fn trust_bundle(&self) -> kanava_proto::v1::TrustBundle {
        kanava_proto::v1::TrustBundle {
            roots: self.roots_pem.clone(),
            signer: self.signer.clone(),
        }
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
            chain_pem: std::iter::once(cert.pem())
                .chain(self.chain_pem.iter().cloned())
                .collect(),
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

/// A new self-signed root for `trust_domain`: signing certificate and
/// only trusted root at once.
pub fn generate_root(trust_domain: &str) -> Result<SigningMaterial, Error> {
    let root = kanava_tls::MeshRootKey::generate(trust_domain)?;
    Ok(SigningMaterial {
        ca_cert_pem: root.cert_pem.clone(),
        ca_key_pem: root.key_pem,
        roots_pem: root.cert_pem,
        chain_pem: None,
    })
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

#[cfg(test)]
mod tests {
    use kanava_tls::{CertificateRequest, MeshRoots, identity_of, parse_pem_certs};

    use super::*;

    fn test_ca() -> CertificateAuthority {
        CertificateAuthority::from_material(
            &generate_root("cluster.local").unwrap(),
            "cluster.local",
            "test",
        )
        .unwrap()
    }

    fn identity(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    #[test]
    fn signs_a_workload_certificate_that_chains_to_the_root() {
        let ca = test_ca();
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
        let ca = test_ca();
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
        let ca = test_ca();
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
