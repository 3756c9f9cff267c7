//! What the components on one node agree on, besides the protocol itself
//! (`kanava/v1/handoff.proto`).
//!
//! - [`client`]: hands a pod and its network namespace to the node's
//!   ztunnel and waits for the acknowledgement; releases and checks pods.
//!   The CNI plugin speaks it on a Kubernetes node, the lab nowhere else.
//! - [`records`]: one small file per pod on the node, written by the CNI
//!   plugin when it sets a pod up and removed when it tears it down. They
//!   are how a ztunnel finds pods it was not handed: the enrolled pods that
//!   already ran when it (re)started, and running pods whose namespace is
//!   enrolled later. A record names the pod's network namespace by path and
//!   inode, so a recycled path is never mistaken for the pod.

pub mod client;
pub mod records;

pub use kanava_proto::v1::PodInfo;

/// What went wrong on the node side of a handoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ztunnel could not be reached, or did not answer.
    #[error("the ztunnel at {socket} is unreachable: {reason}")]
    Unreachable { socket: String, reason: String },
    /// The ztunnel answered and refused.
    #[error("the ztunnel refused: {0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("pod record {path}: {reason}")]
    BadRecord { path: String, reason: String },
    #[error("{0} is not a valid pod uid (letters, digits and '-', at most 128)")]
    BadUid(String),
}

impl Error {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
