//! The client side of the handoff socket.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use kanava_netns::seqpacket::Conn;
use kanava_proto::v1 as pb;
use prost::Message;

use crate::Error;

/// Hands a pod and its network namespace (`netns`, an open namespace file)
/// to the ztunnel listening on `socket`, and returns once the ztunnel has
/// captured it: rules installed, listeners open.
pub fn add_pod(
    socket: &Path,
    pod: pb::PodInfo,
    netns: &std::fs::File,
    timeout: Duration,
) -> Result<(), Error> {
    let request = pb::handoff_request::Request::Add(pb::AddPod { pod: Some(pod) });
    call(socket, request, &[netns.as_fd()], timeout)
}

/// Asks the ztunnel to release a pod. Unknown pods succeed. With a
/// `container_id`, only the pod's capture for that sandbox is released: a
/// pod the ztunnel holds for another sandbox is kept.
pub fn delete_pod(
    socket: &Path,
    uid: &str,
    container_id: Option<&str>,
    timeout: Duration,
) -> Result<(), Error> {
    let request = pb::handoff_request::Request::Delete(pb::DeletePod {
        uid: uid.to_string(),
        container_id: container_id.unwrap_or_default().to_string(),
    });
    call(socket, request, &[], timeout)
}

/// Whether a ztunnel accepts connections on `socket` (says nothing of what
/// it would answer).
pub fn is_listening(socket: &Path) -> bool {
    Conn::connect(socket).is_ok()
}

/// Asks the ztunnel whether a pod is captured; refused with the reason when
/// it is not.
pub fn check_pod(socket: &Path, uid: &str, timeout: Duration) -> Result<(), Error> {
    let request = pb::handoff_request::Request::Check(pb::CheckPod {
        uid: uid.to_string(),
    });
    call(socket, request, &[], timeout)
}

fn call(
    socket: &Path,
    request: pb::handoff_request::Request,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> Result<(), Error> {
    let unreachable = |reason: String| Error::Unreachable {
        socket: socket.display().to_string(),
        reason,
    };
    let request = pb::HandoffRequest {
        request: Some(request),
    };
    let conn = Conn::connect(socket).map_err(|e| unreachable(e.to_string()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| unreachable(e.to_string()))?;
    // A ztunnel that refuses the connection itself (who we are, too many
    // at once) answers before reading and closes: the send then fails, but
    // its reply, with the reason, is still there to read.
    let sent = conn.send(&request.encode_to_vec(), fds);
    let (reply, _) = match (sent, conn.recv()) {
        (_, Ok(received)) if !received.0.is_empty() => received,
        (Err(error), _) => return Err(unreachable(format!("send: {error}"))),
        (Ok(()), Ok(received)) => received,
        (Ok(()), Err(error)) => {
            return Err(unreachable(format!("no reply within {timeout:?}: {error}")));
        }
    };
    if reply.is_empty() {
        return Err(unreachable(
            "it closed the connection without replying".into(),
        ));
    }
    let reply = pb::HandoffReply::decode(reply.as_slice())
        .map_err(|e| unreachable(format!("undecodable reply: {e}")))?;
    if reply.ok {
        Ok(())
    } else {
        Err(Error::Refused(reply.error))
    }
}
