use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kanava_mesh::ports;

use crate::proxy::hbone::Refusal;

/// Everything that can go wrong in the ztunnel. Each variant says what was
/// being done, to what, and where a cause is likely, what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("network namespace: {0}")]
    Netns(#[from] kanava_netns::Error),
    #[error("capture rules: `{command}` in {netns} failed: {reason}")]
    Capture {
        command: String,
        netns: String,
        reason: String,
    },
    #[error("TLS: {0}")]
    Tls(#[from] kanava_tls::Error),

    // --- the data path ---
    #[error("connecting to {destination} timed out after {after:?}{}", reachability_hint(*destination))]
    ConnectTimeout {
        destination: SocketAddr,
        after: Duration,
    },
    #[error(
        "TLS handshake with {peer} not finished after {after:?}; is port {} reachable between \
         nodes, and does a ztunnel serve that pod?",
        ports::HBONE
    )]
    HandshakeTimeout { peer: SocketAddr, after: Duration },
    #[error("client {peer} did not finish its TLS and HTTP/2 handshake within {after:?}")]
    ClientHandshakeTimeout { peer: SocketAddr, after: Duration },
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE peer {peer} presented a certificate this ztunnel cannot use: {source}")]
    PeerCertificate {
        peer: SocketAddr,
        source: kanava_tls::Error,
    },
    #[error(
        "HBONE connection to {peer}: its certificate or ours had expired by the end of the \
         handshake; are the clocks of the two nodes in step?"
    )]
    CertificateLapsed { peer: SocketAddr },
    #[error(
        "HBONE connection to {peer} was unusable as soon as it opened (it closed, or a certificate it was opened with expired); the peer's ztunnel log may say why"
    )]
    ClosedAtOnce { peer: SocketAddr },
    #[error("HTTP/2 {stage} with {peer}: {source}")]
    Http2 {
        stage: &'static str,
        peer: SocketAddr,
        source: h2::Error,
    },
    #[error("{peer} sent no reply to CONNECT {target} within {after:?}")]
    ConnectReplyTimeout {
        peer: SocketAddr,
        target: SocketAddr,
        after: Duration,
    },
    #[error("{peer} refused CONNECT {target}: {refusal}")]
    ConnectRefused {
        peer: SocketAddr,
        target: SocketAddr,
        refusal: Refusal,
    },
    #[error("no certificate for {identity}: {reason}")]
    NoCertificate { identity: String, reason: String },

    // --- the control plane ---
    #[error("control plane: {0}")]
    ControlPlane(#[from] tonic::Status),
    #[error("control plane connection: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("control plane {what} {value:?} is not usable: {reason}")]
    ControlPlaneSetting {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("node credential in {path} is not printable ASCII; is it the right file?")]
    NodeCredential { path: PathBuf },

    // --- handing pods over ---
    #[error("handoff request is not a valid message (is the sender speaking kanava.v1?): {0}")]
    HandoffDecode(#[from] prost::DecodeError),
    #[error("handoff request without {0}")]
    HandoffIncomplete(&'static str),
    #[error("pod {pod} cannot be captured: {reason}")]
    InvalidPod { pod: String, reason: String },
    #[error("pod uid {uid:?} is not captured: {reason}")]
    NotCaptured { uid: String, reason: String },
    #[error("pod records: {0}")]
    PodRecord(#[from] kanava_handoff::Error),
    #[error("{task} did not finish: {source}")]
    TaskFailed {
        task: &'static str,
        source: tokio::task::JoinError,
    },
}

impl Error {
    /// The HTTP/2 connection's peer is going away (GOAWAY, or it refused
    /// the stream unprocessed): another connection may carry the request.
    pub fn is_going_away(&self) -> bool {
        matches!(self, Error::Http2 { source, .. }
            if source.is_go_away() || source.reason() == Some(h2::Reason::REFUSED_STREAM))
    }

    /// The peer never processed the stream, so whatever was sent on it may
    /// be sent again on another connection: it refused the stream
    /// (`REFUSED_STREAM`), or its graceful GOAWAY came back with a last
    /// stream below this one. (h2 fails only the streams above that last
    /// one with the GOAWAY's own error; a stream cut off later, when the
    /// connection closes, fails with an I/O error instead.)
    pub fn is_unprocessed(&self) -> bool {
        matches!(self, Error::Http2 { source, .. }
            if source.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (source.is_go_away()
                    && source.is_remote()
                    && source.reason() == Some(h2::Reason::NO_ERROR)))
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// The destination refused the connection itself (nothing listens, or
    /// its ztunnel answered 503): another endpoint may accept.
    pub fn is_refused_by_destination(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::ConnectionRefused,
            Error::ConnectRefused { refusal, .. } => refusal.is_retryable(),
            _ => false,
        }
    }

    /// The destination refused on purpose (policy, bad request), as opposed
    /// to: the connection could not be carried.
    pub fn is_denial(&self) -> bool {
        matches!(self, Error::ConnectRefused { refusal, .. } if refusal.is_denial())
    }
}

fn reachability_hint(destination: SocketAddr) -> String {
    if destination.port() == ports::HBONE {
        format!(
            "; is port {} reachable between nodes, and does a ztunnel serve that pod?",
            ports::HBONE
        )
    } else {
        String::new()
    }
}
