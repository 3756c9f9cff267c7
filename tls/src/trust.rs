//! The roots a ztunnel trusts, replaceable while it runs.
//!
//! A root is rotated by trusting the new root beside the old one, moving
//! every workload to certificates under the new one, then dropping the old
//! root (see the README). Each step reaches a ztunnel as a new bundle; every
//! configuration built from a [`TrustBundle`] verifies the next handshake
//! against it, without being rebuilt. Connections already established are
//! not re-verified.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Error, MeshRoots, provider};

/// The current roots, shared by every configuration built from them.
/// Cloning shares the bundle: a replacement is seen by every clone.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    current: Arc<ArcSwap<Verifiers>>,
}

/// Verifiers for one set of roots, built once per replacement rather than
/// once per handshake.
#[derive(Debug)]
struct Verifiers {
    roots: MeshRoots,
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
}

impl Verifiers {
    fn new(roots: MeshRoots) -> Result<Self, Error> {
        let invalid = |e: rustls::server::VerifierBuilderError| {
            Error::Config(rustls::Error::General(e.to_string()))
        };
        // No root hints: mesh clients present their one certificate
        // whatever the server hints, and the live verifier below could not
        // lend out the hints of a bundle that may be replaced meanwhile.
        let clients = WebPkiClientVerifier::builder_with_provider(roots.store(), provider())
            .clear_root_hint_subjects()
            .build()
            .map_err(invalid)?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots.store(), provider())
            .build()
            .map_err(invalid)?;
        Ok(Verifiers {
            roots,
            clients,
            servers,
        })
    }
}

impl TrustBundle {
    pub fn new(roots: MeshRoots) -> Result<Self, Error> {
        Ok(TrustBundle {
            current: Arc::new(ArcSwap::from_pointee(Verifiers::new(roots)?)),
        })
    }

    /// Trusts `roots` from the next handshake on. Returns whether they
    /// differ from the roots trusted until now.
    pub fn replace(&self, roots: MeshRoots) -> Result<bool, Error> {
        if roots.fingerprints() == self.current.load().roots.fingerprints() {
            return Ok(false);
        }
        self.current.store(Arc::new(Verifiers::new(roots)?));
        Ok(true)
    }

    /// The roots trusted now.
    pub fn roots(&self) -> MeshRoots {
        self.current.load().roots.clone()
    }

    /// Verifies client certificates against the roots of the moment.
    pub(crate) fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(LiveClientVerifier(self.clone()))
    }

    /// Verifies server certificates (WebPKI, by name) against the roots of
    /// the moment.
    pub(crate) fn server_verifier(&self) -> Arc<dyn ServerCertVerifier> {
        Arc::new(LiveServerVerifier(self.clone()))
    }
}

#[derive(Debug)]
struct LiveClientVerifier(TrustBundle);

impl ClientCertVerifier for LiveClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current
            .load()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current
            .load()
            .clients
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current
            .load()
            .clients
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current.load().clients.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct LiveServerVerifier(TrustBundle);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current.load().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current
            .load()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current
            .load()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current.load().servers.supported_verify_schemes()
    }
}
