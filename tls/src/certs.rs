use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kanava_mesh::Identity;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{Error, provider};

/// The mesh's trusted root certificates.
#[derive(Clone, Debug)]
pub struct MeshRoots {
    store: Arc<RootCertStore>,
    /// [`fingerprint`] of each root, sorted: what an operator compares.
    fingerprints: Arc<[String]>,
}

impl MeshRoots {
    /// Trusts every certificate in `pem`.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let mut store = RootCertStore::empty();
        let mut fingerprints = Vec::new();
        for cert in parse_pem_certs(pem)? {
            fingerprints.push(fingerprint(&cert));
            store
                .add(cert)
                .map_err(|e| Error::BadCertificate(e.to_string()))?;
        }
        if store.is_empty() {
            return Err(Error::NoRoots);
        }
        fingerprints.sort();
        fingerprints.dedup();
        Ok(MeshRoots {
            store: Arc::new(store),
            fingerprints: fingerprints.into(),
        })
    }

    /// SHA-256 of each root (lowercase hex), sorted.
    pub fn fingerprints(&self) -> &[String] {
        &self.fingerprints
    }

    pub fn store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}

/// SHA-256 of a DER certificate, lowercase hex: how roots and signers are
/// named in discovery, metrics and `kanava status`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lifetime of a generated mesh root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A new mesh root: a self-signed CA certificate and its key, PEM. The
/// control plane makes one on its first start; `kanava ca rotate` makes the
/// next.
pub struct MeshRootKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl MeshRootKey {
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        use rcgen::{BasicConstraints, DnType, IsCa, KeyUsagePurpose, SerialNumber};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
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
        // Backdated, so peers with slightly slow clocks accept it at once.
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let mut serial: [u8; 16] = rand::random();
        // Positive, non-zero DER integer.
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.self_signed(&key)?;
        Ok(MeshRootKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh key pair and the signing request for one workload identity.
///
/// The private key stays inside this value; only [`csr_der`](Self::csr_der)
/// is meant to leave the process.
pub struct CertificateRequest {
    identity: Identity,
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl CertificateRequest {
    /// Generates an ECDSA P-256 key and a CSR whose only SAN is `identity`.
    pub fn generate(identity: &Identity) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(CertificateRequest {
            identity: identity.clone(),
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// Joins the signed chain (PEM, leaf first) with the key, after checking
    /// the leaf really is for this identity and this key.
    pub fn into_cert(self, chain_pem: &[String]) -> Result<WorkloadCert, Error> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(parse_pem_certs(pem.as_bytes())?);
        }
        let leaf = chain
            .first()
            .ok_or_else(|| Error::BadCertificate("empty certificate chain".into()))?;
        let got = identity_of(leaf)?;
        if got != self.identity {
            return Err(Error::NoIdentity(format!(
                "signed certificate is for {got}, requested {}",
                self.identity
            )));
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        WorkloadCert::new(chain, key)
    }
}

/// A workload's certificate chain and private key, ready for rustls.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    identity: Identity,
    not_after: SystemTime,
    not_before: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl WorkloadCert {
    /// `chain` starts with the leaf, whose only URI SAN is the identity.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::BadCertificate("empty certificate chain".into()))?;
        let identity = identity_of(leaf)?;
        let (not_before, not_after) = validity_of(leaf)?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| Error::BadKey(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified
            .keys_match()
            .map_err(|e| Error::BadKey(format!("key does not match certificate: {e}")))?;
        Ok(WorkloadCert {
            identity,
            not_after,
            not_before,
            certified: Arc::new(certified),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// Whether the certificate is past its end of validity at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

/// Reads every `CERTIFICATE` block of a PEM document.
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem(e.to_string()))
}

/// Reads the first private key of a PEM document.
pub fn parse_pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem(e.to_string()))
}

/// The SPIFFE identity a workload certificate proves: its one URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| Error::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| Error::BadCertificate(e.to_string()))?
        .ok_or_else(|| Error::NoIdentity("no subject alternative name".into()))?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris
        .next()
        .ok_or_else(|| Error::NoIdentity("no URI subject alternative name".into()))?;
    if uris.next().is_some() {
        return Err(Error::NoIdentity(
            "more than one URI subject alternative name".into(),
        ));
    }
    uri.parse()
        .map_err(|e: kanava_mesh::Error| Error::NoIdentity(e.to_string()))
}

/// What the leaf certificate of a TLS peer proves, read once for both ends
/// of an HBONE connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    pub identity: Identity,
    /// End of its validity: no new stream may ride on it afterwards.
    pub not_after: SystemTime,
}

/// The peer certificate of an established TLS connection. Fails when the
/// peer presented none or one without a usable identity.
pub fn peer_certificate(connection: &rustls::CommonState) -> Result<PeerCertificate, Error> {
    let leaf = connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| Error::NoIdentity("the peer presented no certificate".into()))?;
    Ok(PeerCertificate {
        identity: identity_of(leaf)?,
        not_after: not_after_of(leaf)?,
    })
}

/// End of a certificate's validity.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Result<SystemTime, Error> {
    Ok(validity_of(cert)?.1)
}

fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), Error> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| Error::BadCertificate(e.to_string()))?;
    let validity = parsed.validity();
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        u64::try_from(secs)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| Error::BadCertificate(format!("validity before 1970: {secs}")))
    };
    Ok((
        to_system(validity.not_before)?,
        to_system(validity.not_after)?,
    ))
}
