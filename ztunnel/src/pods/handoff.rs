//! The handoff socket: where the CNI plugin (or the lab) gives the ztunnel
//! a pod and its network namespace. Protocol: `kanava/v1/handoff.proto`.
//!
//! Served by plain threads: handoffs are rare, and each waits for capture to
//! be installed before it is answered. Only root (or the one configured
//! uid) may hand pods over: the socket file is private from the moment it
//! is bound, and every connection's peer is checked with `SO_PEERCRED`.
//! At most [`MAX_CONNECTIONS`] connections are served at once, and one that
//! stays silent for [`IDLE_TIMEOUT`] is closed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kanava_netns::NetNs;
use kanava_netns::seqpacket::{Conn, Listener};
use kanava_proto::v1 as pb;
use prost::Message;
use tokio::runtime::Handle;

use super::{HandedPod, PodRegistry};
use crate::Error;

/// Connections served at once; more are refused with a reply saying so.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may stay silent before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection is given to send the request it came with.
const REFUSAL_GRACE: Duration = Duration::from_millis(200);

/// Binds the socket and serves it on a background thread. `allowed_uid`
/// may hand pods over besides root.
pub fn serve(
    path: &Path,
    allowed_uid: Option<u32>,
    registry: Arc<PodRegistry>,
    runtime: Handle,
) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    let listener =
        Listener::bind(path, 0o600).map_err(Error::io(format!("bind {}", path.display())))?;
    tracing::info!(socket = %path.display(), ?allowed_uid, "accepting pod handoffs");
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            loop {
                match listener.accept() {
                    Ok(conn) => {
                        if let Err(reason) = admit(&conn, allowed_uid, &active) {
                            tracing::warn!(%reason, "handoff connection refused");
                            refuse(&conn, &reason);
                            continue;
                        }
                        let registry = registry.clone();
                        let runtime = runtime.clone();
                        let slot = Slot(active.clone());
                        let spawned = std::thread::Builder::new()
                            .name("handoff-conn".into())
                            .spawn(move || {
                                let _slot = slot;
                                serve_conn(conn, &registry, &runtime)
                            });
                        if let Err(error) = spawned {
                            tracing::error!(%error, "cannot start handoff thread");
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "handoff accept failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(Error::io("start handoff thread"))?;
    Ok(())
}

/// Checks who connected and whether there is room; takes a slot if so.
fn admit(conn: &Conn, allowed_uid: Option<u32>, active: &AtomicUsize) -> Result<(), String> {
    let uid = conn
        .peer_uid()
        .map_err(|e| format!("cannot tell who connected: {e}"))?;
    if uid != 0 && Some(uid) != allowed_uid {
        return Err(format!(
            "uid {uid} may not hand pods over (root only{})",
            allowed_uid
                .map(|u| format!(", and uid {u}"))
                .unwrap_or_default()
        ));
    }
    let taken = active.fetch_add(1, Ordering::AcqRel);
    if taken >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::AcqRel);
        return Err(format!(
            "{MAX_CONNECTIONS} handoff connections are already being served; retry"
        ));
    }
    conn.set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(|e| format!("cannot bound the connection's idle time: {e}"))
}

/// Frees a connection's slot when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells a refused client why, then closes. Its request is read first (and
/// dropped unseen): closing a socket with unread data resets it, and the
/// client would lose the reply with the reason. A client that sends nothing
/// holds the accept loop for [`REFUSAL_GRACE`] at most.
fn refuse(conn: &Conn, reason: &str) {
    if conn.set_read_timeout(Some(REFUSAL_GRACE)).is_ok() {
        let _ = conn.recv();
    }
    let reply = pb::HandoffReply {
        ok: false,
        error: reason.to_string(),
    };
    let _ = conn.send(&reply.encode_to_vec(), &[]);
}

fn serve_conn(conn: Conn, registry: &PodRegistry, runtime: &Handle) {
    loop {
        let (message, fds) = match conn.recv() {
            Ok((message, _)) if message.is_empty() => return,
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(%error, "handoff receive failed");
                return;
            }
        };
        let result = handle(&message, fds, registry, runtime);
        if let Err(error) = &result {
            tracing::warn!(%error, "handoff refused");
        }
        let reply = pb::HandoffReply {
            ok: result.is_ok(),
            error: result.err().map(|e| e.to_string()).unwrap_or_default(),
        };
        if let Err(error) = conn.send(&reply.encode_to_vec(), &[]) {
            tracing::warn!(%error, "handoff reply failed");
            return;
        }
    }
}

/// A handoff request, decoded and checked: everything that comes from the
/// message itself (a pod's namespace travels beside it, as a descriptor).
#[derive(Debug)]
pub enum Request {
    Add(HandedPod),
    Delete {
        uid: String,
        /// Only this sandbox's capture, when given.
        sandbox: Option<String>,
    },
    Check {
        uid: String,
    },
}

/// Decodes and checks a handoff message; pure, so every byte a client can
/// send is covered by the fuzz target `handoff`.
pub fn parse(message: &[u8], trust_domain: &str) -> Result<Request, Error> {
    let request = pb::HandoffRequest::decode(message)?;
    match request.request {
        Some(pb::handoff_request::Request::Add(add)) => {
            let pod = add
                .pod
                .ok_or(Error::HandoffIncomplete("a pod in its add"))?;
            Ok(Request::Add(super::validate(pod, trust_domain)?))
        }
        Some(pb::handoff_request::Request::Delete(delete)) => Ok(Request::Delete {
            uid: delete.uid,
            sandbox: Some(delete.container_id).filter(|c| !c.is_empty()),
        }),
        Some(pb::handoff_request::Request::Check(check)) => Ok(Request::Check { uid: check.uid }),
        None => Err(Error::HandoffIncomplete("a request")),
    }
}

fn handle(
    message: &[u8],
    fds: Vec<std::os::fd::OwnedFd>,
    registry: &PodRegistry,
    runtime: &Handle,
) -> Result<(), Error> {
    match parse(message, registry.trust_domain())? {
        Request::Add(pod) => {
            let mut fds = fds.into_iter();
            let (Some(fd), None) = (fds.next(), fds.next()) else {
                return Err(Error::HandoffIncomplete(
                    "exactly one descriptor, the pod's network namespace, in its add",
                ));
            };
            let netns =
                NetNs::from_fd(fd, format!("pod {}/{}", pod.info.namespace, pod.info.name))?;
            runtime.block_on(registry.add(pod, netns))
        }
        Request::Delete { uid, sandbox } => {
            runtime.block_on(registry.remove(&uid, sandbox.as_deref()))
        }
        Request::Check { uid } => runtime.block_on(registry.check(&uid)),
    }
}
