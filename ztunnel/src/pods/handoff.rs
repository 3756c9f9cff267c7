//! The handoff socket: where the CNI plugin (or the lab) gives the ztunnel
//! a pod and its network namespace. Protocol: `kanava/v1/handoff.proto`.
//!
//! Served by plain threads: handoffs are rare, and each waits for capture to
//! be installed before it is answered.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use kanava_netns::NetNs;
use kanava_netns::seqpacket::{Conn, Listener};
use kanava_proto::v1 as pb;
use prost::Message;
use tokio::runtime::Handle;

use super::PodRegistry;
use crate::Error;

/// Binds the socket and serves it on a background thread.
pub fn serve(path: &Path, registry: Arc<PodRegistry>, runtime: Handle) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    let listener = Listener::bind(path).map_err(Error::io(format!("bind {}", path.display())))?;
    // Only root on the node may hand over pods.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))?;
    tracing::info!(socket = %path.display(), "accepting pod handoffs");
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            loop {
                match listener.accept() {
                    Ok(conn) => {
                        let registry = registry.clone();
                        let runtime = runtime.clone();
                        let spawned = std::thread::Builder::new()
                            .name("handoff-conn".into())
                            .spawn(move || serve_conn(conn, &registry, &runtime));
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

fn handle(
    message: &[u8],
    fds: Vec<std::os::fd::OwnedFd>,
    registry: &PodRegistry,
    runtime: &Handle,
) -> Result<(), Error> {
    let request = pb::HandoffRequest::decode(message)?;
    match request.request {
        Some(pb::handoff_request::Request::Add(add)) => {
            let pod = add
                .pod
                .ok_or(Error::HandoffIncomplete("a pod in its add"))?;
            let mut fds = fds.into_iter();
            let (Some(fd), None) = (fds.next(), fds.next()) else {
                return Err(Error::HandoffIncomplete(
                    "exactly one descriptor, the pod's network namespace, in its add",
                ));
            };
            let netns = NetNs::from_fd(fd, format!("pod {}/{}", pod.namespace, pod.name))?;
            runtime.block_on(registry.add(pod, netns))
        }
        Some(pb::handoff_request::Request::Delete(delete)) => {
            runtime.block_on(registry.remove(&delete.uid))
        }
        None => Err(Error::HandoffIncomplete("a request")),
    }
}
