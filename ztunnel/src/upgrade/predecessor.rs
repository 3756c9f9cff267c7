//! The leaving side: on SIGTERM, find a ready successor and hand it the
//! listeners' work and every connection that can move.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kanava_netns::seqpacket::Conn;
use tokio_util::sync::CancellationToken;

use super::SocketFile;
use super::departure::Outgoing;
use super::protocol::{Message, Summary};
use crate::pods::PodRegistry;
use crate::proxy::Proxy;

/// How long the successor may take to answer (its `Proceed` may wait for
/// pods it must capture first).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// How long nothing may move before the hand-over counts as done.
const QUIET: Duration = Duration::from_millis(300);

/// Hands over to the successor listening on `socket`. Returns `None`, having
/// changed nothing, when there is none (or it is this process itself); else
/// the summary, once every stream that could move has moved or `grace` ran
/// out. Connections that could not move are still open then (drained by the
/// caller); `stop_admin` closes the admin endpoints so that the successor
/// can bind them.
pub async fn leave(
    proxy: Arc<Proxy>,
    pods: Arc<PodRegistry>,
    socket: PathBuf,
    own_socket: Option<SocketFile>,
    grace: Duration,
    stop_admin: CancellationToken,
) -> Option<Summary> {
    let started = Instant::now();
    let own_pid = std::process::id();
    let uids = pods.uids();
    let conn = match tokio::task::spawn_blocking(move || {
        find_successor(&socket, own_socket, own_pid, uids)
    })
    .await
    {
        Ok(conn) => conn,
        Err(error) => {
            tracing::error!(%error, "looking for a successor failed; draining instead");
            return None;
        }
    };
    let (conn, listeners) = match conn {
        Ok(Some(found)) => found,
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%error, "the successor did not take over; draining instead");
            return None;
        }
    };
    // The successor serves every pod beside us: close ours. Connections in
    // their accept queues migrate to the successor's listeners.
    let closed = pods.stop_listening();
    stop_admin.cancel();
    tracing::info!(
        listeners = closed,
        successor_listeners = listeners,
        "pod listeners handed to the successor"
    );

    let (outbox, inbox) = std::sync::mpsc::channel::<Outgoing>();
    // A plain thread: the socket's calls block, one packet per connection.
    let sender = std::thread::Builder::new()
        .name("upgrade-sender".into())
        .spawn(move || {
            for outgoing in inbox {
                let fds: Vec<_> = outgoing.fd.iter().map(|fd| fd.as_fd()).collect();
                if let Err(error) = conn.send(&outgoing.message.encode(), &fds) {
                    tracing::error!(%error, "sending to the successor failed; connections still to move are lost");
                    break;
                }
            }
        });
    match sender {
        Ok(sender) => proxy.departure.sent_by(sender),
        Err(error) => {
            tracing::error!(%error, "cannot start the upgrade sender; draining instead");
            return None;
        }
    }
    proxy.departure.start_leaving(outbox);
    hand_over_parked(&proxy);
    let deadline = Instant::now() + grace.max(Duration::from_secs(5));
    proxy.departure.settled(deadline).await;
    // Until quiet: a client may still resume here on a connection accepted
    // before our listeners closed (its stream then moves at once), and a
    // peer may still move a stream to us that we then park.
    loop {
        let moved = proxy.departure.moved();
        tokio::time::sleep(QUIET).await;
        hand_over_parked(&proxy);
        let left = proxy.departure.settled(deadline).await;
        if (left == 0 && proxy.departure.moved() == moved) || Instant::now() >= deadline {
            break;
        }
    }
    let stuck = proxy.departure.settled(Instant::now()).await;
    if stuck > 0 {
        tracing::warn!(stuck, "streams still moving when the grace ran out");
    }
    // Tasks of moved connections end right after their hand-over; what
    // is still open after a moment could not move.
    let drained = proxy
        .departure
        .drained(Instant::now() + Duration::from_millis(250))
        .await;
    let summary = Summary {
        predecessor_pid: own_pid,
        listeners: closed,
        moved: proxy.departure.moved(),
        drained: drained as u64,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    if let Err(error) = proxy.departure.tell(Message::Done(summary.clone())) {
        tracing::warn!(%error, "the successor did not get the hand-over's summary");
    }

    tracing::info!(?summary, "handed over to the successor");
    Some(summary)
}

/// Connects, checks that the other end is a ready ztunnel other than this
/// one, and announces the hand-over. Returns the connection and the number
/// of listeners the successor serves.
fn find_successor(
    socket: &std::path::Path,
    own_socket: Option<SocketFile>,
    own_pid: u32,
    pods: Vec<String>,
) -> std::io::Result<Option<(Conn, u64)>> {
    // Still the file this process bound: nobody has taken its place.
    if own_socket.is_some() && SocketFile::at(socket) == own_socket {
        return Ok(None);
    }
    let Ok(conn) = Conn::connect(socket) else {
        return Ok(None);
    };
    conn.set_read_timeout(Some(ANSWER_WITHIN))?;
    conn.send(&Message::Hello { pid: own_pid }.encode(), &[])?;
    let (answer, _) = conn.recv()?;
    match Message::decode(&answer) {
        Ok(Message::Status {
            pid, ready: true, ..
        }) => {
            tracing::info!(successor = pid, "a successor is ready; handing over");
        }
        Ok(Message::Status { ready: false, .. }) => return Ok(None),
        other => {
            return Err(std::io::Error::other(format!(
                "unexpected answer from the upgrade socket: {other:?}"
            )));
        }
    }
    conn.send(&Message::HandOver { pid: own_pid, pods }.encode(), &[])?;
    let (answer, _) = conn.recv()?;
    match Message::decode(&answer) {
        Ok(Message::Proceed { listeners }) => Ok(Some((conn, listeners))),
        other => Err(std::io::Error::other(format!(
            "the successor did not agree to the hand-over: {other:?}"
        ))),
    }
}

/// Sends the streams parked here (moved by their clients' ztunnels) on to
/// the successor, where the clients will come back for them.
fn hand_over_parked(proxy: &Proxy) {
    for (token, parked) in proxy.resumptions.take_parked() {
        if let Err(error) = proxy.departure.hand_over_parked(token, parked) {
            tracing::warn!(%error, "a parked connection could not be handed over");
        }
    }
}
