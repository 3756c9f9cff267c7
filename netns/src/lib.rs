//! Linux network namespaces, the walls Kanava's data path is built from.
//!
//! A socket belongs to the network namespace of the thread that created it,
//! for its whole life. So the ztunnel, which runs in the node's namespace,
//! can own a listener inside a pod's namespace: it enters the pod's namespace
//! on a thread of its own, creates the socket, and leaves. Nothing is ever
//! shared with the pod beyond that socket.
//!
//! - [`NetNs`]: a handle (an open file descriptor) to one namespace, with
//!   [`NetNs::run`] to create things inside it and [`NetNs::enter_in_child`]
//!   to start a command inside it.
//! - [`NetNsSwitch`]: the same from any thread, for a short synchronous
//!   closure, returning to the process's namespace at once (what the proxy
//!   uses per connection).
//! - [`seqpacket`]: a Unix `SOCK_SEQPACKET` socket that carries file
//!   descriptors, used to hand a pod's namespace to the ztunnel.

pub mod mount;
mod namespace;
pub mod seqpacket;
mod switch;

pub use namespace::NetNs;
pub use switch::NetNsSwitch;

/// What went wrong with a namespace operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open network namespace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("enter network namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
    #[error("thread inside network namespace {name} panicked")]
    Panicked { name: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
