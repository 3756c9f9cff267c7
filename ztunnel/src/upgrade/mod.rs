//! Upgrades that lose nothing: a new ztunnel (the *successor*) starts
//! beside the running one (the *predecessor*) and takes its pods, its
//! listeners and its open connections over.
//!
//! 1. The successor starts, serves every recorded pod (its listeners open
//!    beside the predecessor's, `SO_REUSEPORT`), gets its configuration and
//!    certificates, and then binds the upgrade socket: it is ready.
//! 2. The predecessor gets SIGTERM and finds a ready successor on the
//!    upgrade socket ([`predecessor::leave`]); until its grace runs out it
//!    serves on and looks again (a deleted or evicted pod's replacement
//!    comes after the SIGTERM); with none it drains as before.
//! 3. It says which pods it serves; the successor makes sure it serves them
//!    too and says so.
//! 4. The predecessor closes its pod listeners. Connections waiting in
//!    their accept queues are not reset: `net.ipv4.tcp_migrate_req` (set in
//!    every captured pod's namespace) has the kernel move them to the
//!    successor's listeners of the same port.
//! 5. It sends GOAWAY on its inbound HBONE connections and moves every
//!    stream that negotiated the hand-over ([`crate::proxy::hbone::resume`]):
//!    each side stops reading its app, sends what it read, and the app
//!    sockets go to the successor with SCM_RIGHTS ([`protocol`]), which
//!    resumes outbound streams with their tokens and parks inbound ones
//!    until their clients resume them.
//! 6. What cannot move (a peer without the extension, plain TCP, a
//!    connection whose app already half-closed) is drained: served until it
//!    ends or the termination grace runs out.
//!
//! A crash (SIGKILL) hands nothing over: the pods' rules stay, so their
//! traffic fails closed until the next ztunnel serves them again from the
//! pod records, and their open connections are lost.

pub mod departure;
pub mod predecessor;
pub mod protocol;
pub mod successor;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The file a Unix socket's path names (device and inode). A ztunnel tells
/// its own upgrade socket from a successor's by the file it bound, not by
/// its pid: in a container every ztunnel may be pid 1 of its own namespace.
/// A successor binds a new file in its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketFile {
    device: u64,
    inode: u64,
}

impl SocketFile {
    /// The file at `path` now, if any.
    pub fn at(path: &Path) -> Option<SocketFile> {
        let metadata = std::fs::symlink_metadata(path).ok()?;
        Some(SocketFile {
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}
