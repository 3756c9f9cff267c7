use std::path::PathBuf;

/// Everything that can go wrong in the control plane: start-up failures and
/// refusals of callers' requests (which map to gRPC statuses).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA directory: {} exists but {} does not; supply both the root certificate and its key (a plug-in CA), or neither to have a root created",
        present.display(),
        missing.display()
    )]
    HalfARoot { present: PathBuf, missing: PathBuf },
    #[error("CA from {origin} is unusable: {reason}")]
    CaUnusable { origin: String, reason: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("Kubernetes API: cannot {action}: {source}")]
    Kubernetes { action: String, source: kube::Error },
    #[error("Kubernetes client configuration: {0}")]
    KubeConfig(String),
    #[error("certificate authority could not sign: {0}")]
    Signing(rcgen::Error),
    #[error("serving certificate: {name:?} is not a usable DNS name (--server-names): {source}")]
    BadServerName { name: String, source: rcgen::Error },
    #[error("node credentials file {path}: {reason}")]
    NodeTokens { path: PathBuf, reason: String },
    #[error("watching {path}: {reason}")]
    Watch { path: PathBuf, reason: String },
    #[error("listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] kanava_tls::Error),

    // Refusals of a signing request.
    #[error("malformed certificate signing request: {0}")]
    BadCsr(String),
    #[error("invalid identity: {0}")]
    BadIdentity(#[from] kanava_mesh::Error),
    #[error("the CSR must name exactly one URI SAN, {expected}; it names {found}")]
    CsrIdentityMismatch { expected: String, found: String },
    #[error("identity {identity} is outside this mesh's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("no pod with identity {identity} is scheduled on node {node}")]
    NotOnNode { identity: String, node: String },
}

impl Error {
    /// A signing refusal as a metric label: one of a few fixed words.
    pub fn refusal_reason(&self) -> &'static str {
        match self {
            Error::BadCsr(_) => "bad_csr",
            Error::BadIdentity(_) => "bad_identity",
            Error::CsrIdentityMismatch { .. } => "identity_mismatch",
            Error::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Error::NotOnNode { .. } => "not_on_node",
            _ => "internal",
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::BadCsr(_)
            | Error::BadIdentity(_)
            | Error::CsrIdentityMismatch { .. }
            | Error::ForeignTrustDomain { .. } => tonic::Status::invalid_argument(message),
            Error::NotOnNode { .. } => tonic::Status::permission_denied(message),
            _ => tonic::Status::internal(message),
        }
    }
}
