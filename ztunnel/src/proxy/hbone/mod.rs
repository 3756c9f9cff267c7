//! HBONE, the whole protocol in one place: HTTP/2 over mutual TLS, one
//! `CONNECT` stream per proxied TCP connection, bytes carried in DATA frames.
//!
//! - [`client`]: open a connection from a pod's namespace (TCP, TLS with the
//!   source pod's certificate, HTTP/2) and send `CONNECT` on it;
//! - [`server`]: accept a connection on a pod's :15008 (TLS with the pod's
//!   certificate, HTTP/2) and read each `CONNECT` request;
//! - [`Refusal`]: the reply-code contract, written and read in one place;
//! - [`bridge`]: the bytes between a TCP connection and a stream;
//! - [`resume`]: the negotiated extension that moves a stream to another
//!   `CONNECT` during an upgrade;
//! - [`frame_wait`]: the transport below HTTP/2 that sleeps until the frame
//!   being received can complete, and hands HTTP/2 one new stream at a
//!   time.
//!
//! Settings and status codes follow Istio's ztunnel so the two interoperate:
//! 4 MiB stream window, 16 MiB connection window, 1 MiB frames.

mod bridge;
pub mod client;
mod frame_wait;
pub mod resume;
pub mod server;

use std::fmt;

pub use bridge::{
    Accepted, BridgeError, Copied, Finish, Movable, MovedTcp, Replay, Unprocessed, bridge,
    bridge_replayable,
};
pub use frame_wait::FrameWait;
use http::StatusCode;

use crate::Config;

const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;

/// Plaintext TLS takes from HTTP/2 before it writes the records out: at
/// rustls's default of 64 KiB a bulk sender's 1 MiB of frames costs 16
/// `writev` calls; at 256 KiB it costs 4, each of 16 full records.
/// Allocated only while records wait for the socket, so an idle connection
/// pays nothing for it.
pub const TLS_WRITE_BATCH: usize = 256 * 1024;

/// An HTTP/2 frame header (RFC 9113, 4.1): what a DATA frame adds to the
/// chunk it carries. The bridge's largest reads from the app leave room for
/// it, so that a bulk DATA frame with its header is [`TLS_WRITE_BATCH`]
/// exactly: sixteen full TLS records, taken by TLS in one piece. A 256 KiB
/// chunk behind its header left 9 bytes over, which became a TLS record, a
/// `writev` and a packet of their own for every frame.
const DATA_FRAME_HEADER: u32 = 9;

const _: () = assert!(
    crate::proxy::chunks::LARGEST_READ as usize == TLS_WRITE_BATCH,
    "a bulk DATA frame fills one TLS write batch"
);

/// HTTP/2 client settings of an HBONE connection.
pub fn client_builder(config: &Config) -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(config.max_header_list_bytes)
        .max_concurrent_streams(config.max_streams_per_connection)
        .enable_push(false);
    builder
}

/// HTTP/2 server settings of an HBONE connection.
pub fn server_builder(config: &Config) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(config.max_header_list_bytes)
        .max_concurrent_streams(config.max_streams_per_connection);
    builder
}

/// Why a `CONNECT` was not answered with 200. The server turns it into a
/// status code ([`Refusal::status`]); the client reads it back from one
/// ([`Refusal::from_status`]). The server's reason stays in its own access
/// log: the wire carries only the code, as in Istio's HBONE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400: not a `CONNECT`, an authority that is not `IP:port`, or a target
    /// that is not an address of the listener's pod.
    BadRequest(String),
    /// 401: the peer's certificate has expired (or, read by a client, the
    /// destination refused for its own reasons).
    Unauthorized(String),
    /// 401: the destination's authorization policy `policy`
    /// (`namespace/name`) refused the peer.
    Policy { policy: String, reason: String },
    /// 503: the destination app did not accept the connection.
    NoUpstream(String),
    /// Any other status (another implementation may send one).
    Other(StatusCode),
}

impl Refusal {
    /// The status code the server replies with.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Unauthorized(_) | Refusal::Policy { .. } => StatusCode::UNAUTHORIZED,
            Refusal::NoUpstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Other(status) => *status,
        }
    }

    /// How a client reads a reply: `None` for 200, else what the code means,
    /// worded for the operator of the client's node.
    pub fn from_status(status: StatusCode) -> Option<Refusal> {
        Some(match status {
            StatusCode::OK => return None,
            StatusCode::BAD_REQUEST => Refusal::BadRequest(
                "the destination's ztunnel found the CONNECT request malformed or aimed at a \
                 pod it does not serve"
                    .into(),
            ),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Refusal::Unauthorized(
                "the destination's authorization policy refused this connection (its ztunnel's \
                 access log names the policy)"
                    .into(),
            ),
            StatusCode::SERVICE_UNAVAILABLE => Refusal::NoUpstream(
                "the destination app did not accept the connection (is it listening on that \
                 port?)"
                    .into(),
            ),
            other => Refusal::Other(other),
        })
    }

    /// What the refusal says, without its status code.
    pub fn reason(&self) -> String {
        match self {
            Refusal::BadRequest(reason)
            | Refusal::Unauthorized(reason)
            | Refusal::Policy { reason, .. }
            | Refusal::NoUpstream(reason) => reason.clone(),
            Refusal::Other(status) => status.to_string(),
        }
    }

    /// The refusal as a metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::Policy { .. } => "policy",
            Refusal::NoUpstream(_) => "no_upstream",
            Refusal::Other(_) => "other",
        }
    }

    /// The policy that refused, if one did.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Refusal::Policy { policy, .. } => Some(policy),
            _ => None,
        }
    }

    /// Refused on purpose (as opposed to: could not be carried).
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            Refusal::BadRequest(_) | Refusal::Unauthorized(_) | Refusal::Policy { .. }
        )
    }

    /// Another endpoint of the same Service may well accept.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Refusal::NoUpstream(_))
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadRequest(reason)
            | Refusal::Unauthorized(reason)
            | Refusal::Policy { reason, .. }
            | Refusal::NoUpstream(reason) => write!(f, "{} ({reason})", self.status()),
            Refusal::Other(status) => write!(f, "{status}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_reads_back_as_itself() {
        for refusal in [
            Refusal::BadRequest("target 10.0.0.9 is not an address of pod shop/web".into()),
            Refusal::Unauthorized("policy shop/deny-all".into()),
            Refusal::NoUpstream("connection refused".into()),
            Refusal::Other(StatusCode::BAD_GATEWAY),
        ] {
            let back = Refusal::from_status(refusal.status()).expect("a refusal");
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&refusal)
            );
            assert_eq!(back.is_denial(), refusal.is_denial());
            assert_eq!(back.is_retryable(), refusal.is_retryable());
        }
        assert_eq!(Refusal::from_status(StatusCode::OK), None);
    }

    #[test]
    fn status_codes_follow_istio() {
        assert_eq!(Refusal::BadRequest(String::new()).status().as_u16(), 400);
        assert_eq!(Refusal::Unauthorized(String::new()).status().as_u16(), 401);
        assert_eq!(Refusal::NoUpstream(String::new()).status().as_u16(), 503);
        // Only a dead app is worth another endpoint; a policy is not.
        assert!(Refusal::NoUpstream(String::new()).is_retryable());
        assert!(!Refusal::Unauthorized(String::new()).is_retryable());
        let unauthorized = Refusal::from_status(StatusCode::UNAUTHORIZED)
            .expect("refusal")
            .to_string();
        assert!(
            unauthorized.contains("authorization policy"),
            "{unauthorized}"
        );
        assert!(unauthorized.contains("access log"), "{unauthorized}");
    }
}
