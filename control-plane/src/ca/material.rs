//! What a CA signs with, and the checks that keep a wrong Secret or file
//! from becoming an outage: the key belongs to the certificate, the
//! certificate is a CA, and there is at least one root to trust.

use kanava_tls::parse_pem_certs;
use rcgen::{Issuer, KeyPair, PublicKeyData};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

/// The signing certificate and key, the roots to trust, and the chain from
/// the signing certificate up to a root, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningMaterial {
    /// The certificate the CA signs with: a root, or an intermediate.
    pub ca_cert_pem: String,
    /// Its private key.
    pub ca_key_pem: String,
    /// The roots ztunnels trust: one or more certificates. During a root
    /// rotation, both the old and the new root.
    pub roots_pem: String,
    /// The signing certificate and any intermediates up to a root. Absent:
    /// the signing certificate alone (or nothing, when it is a root).
    pub chain_pem: Option<String>,
}

/// Checked material, ready to sign with.
pub(super) struct Checked {
    pub issuer: Issuer<'static, KeyPair>,
    /// Fingerprint of the signing certificate.
    pub signer: String,
    pub chain_pem: Vec<String>,
    pub roots_pem: Vec<String>,
}

impl SigningMaterial {
    pub(super) fn check(&self, origin: &str) -> Result<Checked, Error> {
        let bad = |reason: String| Error::CaUnusable {
            origin: origin.to_string(),
            reason,
        };
        let roots =
            parse_pem_certs(self.roots_pem.as_bytes()).map_err(|e| bad(format!("roots: {e}")))?;
        if roots.is_empty() {
            return Err(bad("no root certificate to trust".into()));
        }
        let key = KeyPair::from_pem(&self.ca_key_pem)
            .map_err(|e| bad(format!("CA key: {e} (expected a PKCS#8 PEM key)")))?;
        let ca_certs = parse_pem_certs(self.ca_cert_pem.as_bytes())
            .map_err(|e| bad(format!("CA certificate: {e}")))?;
        let [ca_cert] = ca_certs.as_slice() else {
            return Err(bad(format!(
                "the CA certificate must be exactly one certificate, found {}",
                ca_certs.len()
            )));
        };
        let (_, parsed) =
            X509Certificate::from_der(ca_cert).map_err(|e| bad(format!("CA certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad(
                "the CA certificate is not a CA (basicConstraints)".into()
            ));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad(
                "the CA key does not belong to the CA certificate".into()
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, key)
            .map_err(|e| bad(format!("CA certificate: {e}")))?;

        let is_root = |der: &[u8]| roots.iter().any(|root| root.as_ref() == der);
        let chain = match &self.chain_pem {
            Some(pem) => parse_pem_certs(pem.as_bytes())
                .map_err(|e| bad(format!("certificate chain: {e}")))?,
            None => vec![ca_cert.clone()],
        };
        // Roots are trusted already; sending them would only cost bytes.
        let chain_pem = chain
            .iter()
            .filter(|cert| !is_root(cert.as_ref()))
            .map(|cert| to_pem(cert.as_ref()))
            .collect();
        Ok(Checked {
            issuer,
            signer: kanava_tls::fingerprint(ca_cert.as_ref()),
            chain_pem,
            roots_pem: roots.iter().map(|root| to_pem(root.as_ref())).collect(),
        })
    }
}

fn to_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
