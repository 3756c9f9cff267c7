/// Everything that can go wrong in the ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("network namespace: {0}")]
    Netns(#[from] kanava_netns::Error),
    #[error("capture rules: {0}")]
    Capture(String),
    #[error("TLS: {0}")]
    Tls(#[from] kanava_tls::Error),
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        peer: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("control plane: {0}")]
    ControlPlane(#[from] tonic::Status),
    #[error("control plane connection: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("no certificate for {identity}: {reason}")]
    NoCertificate { identity: String, reason: String },
    #[error("{peer} answered CONNECT with {status}")]
    ConnectRefused {
        peer: std::net::SocketAddr,
        status: http::StatusCode,
    },
    #[error("{0}")]
    NoEndpoint(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("handoff: {0}")]
    Handoff(String),
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
