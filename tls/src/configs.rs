use std::sync::Arc;

use kanava_mesh::Identity;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::{ALPN_H2, Error, MeshRoots, SpiffeServerVerifier, TrustBundle, WorkloadCert, provider};

/// Client side of an HBONE connection: presents `cert` (the source
/// workload's identity) and accepts only a server proving `expected`.
pub fn hbone_client_config(
    cert: &WorkloadCert,
    roots: &MeshRoots,
    expected: &Identity,
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(SpiffeServerVerifier::new(roots, expected.clone()));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCert(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server side of an HBONE connection: presents what `certs` resolves (the
/// destination workload's identity) and demands a client certificate that
/// chains to a root of `trust` at the time of the handshake.
pub fn hbone_server_config(
    certs: Arc<dyn ResolvesServerCert>,
    trust: &TrustBundle,
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(trust.client_verifier())
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    no_resumption(&mut config);
    Ok(Arc::new(config))
}

/// The control plane's gRPC server. Callers authenticate with a bearer
/// credential, not a client certificate.
pub fn control_plane_server_config(
    certs: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    no_resumption(&mut config);
    Ok(Arc::new(config))
}

/// A ztunnel's connection to the control plane: ordinary WebPKI server
/// verification (DNS or IP name) against the roots of `trust` at the time
/// of the handshake.
pub fn control_plane_client_config(trust: &TrustBundle) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(trust.server_verifier())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

fn no_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// Always presents the same certificate.
#[derive(Debug)]
pub struct SingleCert(pub Arc<CertifiedKey>);

impl ResolvesClientCert for SingleCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
