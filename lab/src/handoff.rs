//! The lab's side of the handoff protocol (`kanava/v1/handoff.proto`): what
//! the chained CNI plugin does on a Kubernetes node.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use kanava_netns::seqpacket::Conn;
use kanava_proto::v1 as pb;
use prost::Message;

/// Hands a pod and its network namespace to the ztunnel listening on
/// `socket`, and waits for the acknowledgement (capture installed).
pub fn add_pod(
    socket: &Path,
    pod: pb::PodInfo,
    netns_path: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let netns = std::fs::File::open(netns_path)
        .map_err(|e| format!("open {}: {e}", netns_path.display()))?;
    let request = pb::HandoffRequest {
        request: Some(pb::handoff_request::Request::Add(pb::AddPod {
            pod: Some(pod),
        })),
    };
    call(socket, &request, &[netns.as_fd()], timeout)
}

/// Asks the ztunnel to release a pod.
pub fn delete_pod(socket: &Path, uid: &str, timeout: Duration) -> Result<(), String> {
    let request = pb::HandoffRequest {
        request: Some(pb::handoff_request::Request::Delete(pb::DeletePod {
            uid: uid.to_string(),
        })),
    };
    call(socket, &request, &[], timeout)
}

fn call(
    socket: &Path,
    request: &pb::HandoffRequest,
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Duration,
) -> Result<(), String> {
    let conn = Conn::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // A ztunnel that refuses the connection itself (who we are, too many
    // at once) answers before reading and closes: the send then fails, but
    // its reply, with the reason, is still there to read.
    let sent = conn.send(&request.encode_to_vec(), fds);
    let (reply, _) = match (sent, conn.recv()) {
        (_, Ok(received)) if !received.0.is_empty() => received,
        (Err(error), _) => return Err(format!("send: {error}")),
        (Ok(()), Ok(received)) => received,
        (Ok(()), Err(error)) => return Err(format!("no reply within {timeout:?}: {error}")),
    };
    if reply.is_empty() {
        return Err("the ztunnel closed the connection without replying".into());
    }
    let reply = pb::HandoffReply::decode(reply.as_slice())
        .map_err(|e| format!("undecodable reply: {e}"))?;
    if reply.ok { Ok(()) } else { Err(reply.error) }
}
