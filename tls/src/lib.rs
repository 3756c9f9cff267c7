//! TLS for the mesh.
//!
//! Every TLS connection Kanava makes or accepts is configured here, so the
//! rules hold everywhere at once:
//!
//! - one crypto provider ([`provider`]): rustls on aws-lc-rs, TLS 1.3 only,
//!   AES-GCM suites, post-quantum hybrid key exchange first;
//! - workload certificates carry exactly one URI SAN, the SPIFFE
//!   [`Identity`](kanava_mesh::Identity) ([`identity_of`]);
//! - an HBONE client accepts a server only if its chain ends at the mesh root
//!   *and* it proves the identity the destination should have
//!   ([`hbone_client_config`]); an HBONE server demands a client certificate
//!   from the mesh root ([`hbone_server_config`]);
//! - the roots can be replaced while connections are made ([`TrustBundle`]);
//! - no session resumption anywhere: every connection proves its identity.

mod certs;
mod configs;
mod error;
mod provider;
mod trust;
mod verify;

pub use certs::{
    CertificateRequest, MeshRootKey, MeshRoots, PeerCertificate, WorkloadCert, fingerprint,
    identity_of, not_after_of, parse_pem_certs, parse_pem_key, peer_certificate,
};
pub use configs::{
    SingleCert, control_plane_client_config, control_plane_server_config, hbone_client_config,
    hbone_server_config,
};
pub use error::Error;
pub use provider::{install_default_provider, provider};
pub use trust::TrustBundle;
pub use verify::SpiffeServerVerifier;

/// ALPN protocol spoken on HBONE and control plane connections.
pub const ALPN_H2: &[u8] = b"h2";

/// Re-exported so users name the same rustls version as this crate.
pub use rustls;
pub use rustls_pki_types as pki_types;
