//! The byte bridge between a TCP connection and an HBONE stream.

use std::future::{Future, poll_fn};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::resume::{self, Token};
use crate::Error;
use crate::proxy::chunks::ChunkReader;
use crate::upgrade::departure::{Departure, MovableGuard};

/// Bytes a bridge moved, named from the TCP side. Which of them went to the
/// destination depends on where the bridge stands: on the client's node the
/// TCP side is the client, on the server's node it is the app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Read from the TCP connection and sent on the stream.
    pub from_tcp: u64,
    /// Received on the stream and written to the TCP connection.
    pub to_tcp: u64,
}

/// How a bridge ended, when it did not end well.
#[derive(Debug)]
pub enum BridgeError {
    /// The destination did not accept the stream (refused the `CONNECT`, or
    /// never answered): nothing was carried, and the TCP side was reset.
    NotAccepted(Box<Error>),
    /// A connection broke while bytes were being carried.
    Io(std::io::Error),
}

impl BridgeError {
    pub fn into_io(self) -> std::io::Error {
        match self {
            BridgeError::NotAccepted(error) => std::io::Error::other(*error),
            BridgeError::Io(error) => error,
        }
    }
}

/// A stream the destination accepted, and the hand-over token it granted
/// (none from a peer without the extension).
pub struct Accepted {
    pub recv: RecvStream,
    pub token: Option<Token>,
}

/// What lets a bridge move its stream ([`super::resume`]).
pub struct Movable {
    /// Says when this ztunnel leaves for a successor, and counts the
    /// streams still to move.
    pub departure: Arc<Departure>,
    /// How long a peer may take to answer a move before the connection is
    /// drained instead.
    pub answer_within: Duration,
    /// The TCP side had already finished sending (a resumed stream whose
    /// app half-closed before the move): END_STREAM goes out at once.
    pub from_tcp_ended: bool,
}

/// How a bridge finished.
#[derive(Debug)]
pub enum Finish {
    /// Both directions ended.
    Closed,
    /// The stream moved: both sides stopped, each wrote to its TCP side all
    /// it received, and the TCP connection goes on on another stream.
    Moved(MovedTcp),
    /// The peer never processed the stream (it went away before it took
    /// it): nothing reached the destination, and the TCP connection may go
    /// on on a stream of another HBONE connection, sending `replay` first.
    /// Only from [`bridge_replayable`].
    Unprocessed(Unprocessed),
}

/// A TCP connection whose stream the peer never processed.
#[derive(Debug)]
pub struct Unprocessed {
    pub tcp: TcpStream,
    pub replay: Replay,
    /// Why the peer did not take it.
    pub error: Box<Error>,
}

/// What a bridge read from TCP and sent on a stream before the destination
/// accepted it: the bytes a new stream sends first if the peer turns out
/// never to have processed this one.
#[derive(Debug, Default)]
pub struct Replay {
    chunks: Vec<Bytes>,
    len: usize,
    /// The TCP side had finished sending: END_STREAM follows the bytes.
    from_tcp_ended: bool,
}

impl Replay {
    fn record(&mut self, chunk: &Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk.clone());
    }
}

/// Most bytes read from TCP before the destination accepted the stream:
/// what a replay may have to hold. Beyond it, reading waits for the answer
/// (one round trip, on connections that send this much at once).
const REPLAY_LIMIT: usize = 64 * 1024;

/// A TCP connection whose stream moved, with what the next stream needs.
#[derive(Debug)]
pub struct MovedTcp {
    pub tcp: TcpStream,
    pub token: Token,
    /// The TCP side had finished sending before the move.
    pub from_tcp_ended: bool,
    /// The stream had finished sending to the TCP side before the move (FIN
    /// already passed on).
    pub to_tcp_ended: bool,
    /// Counts the connection as still to move until it is handed on.
    pub guard: Option<MovableGuard>,
}

/// How one direction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirectionEnd {
    /// END_STREAM or FIN: the sender is done.
    Ended,
    /// The moving trailers: the direction goes on on another stream.
    Moved,
}

/// Copies between a TCP connection and an HTTP/2 stream until both
/// directions have ended, or until the stream moves, and says how many bytes
/// went each way (counted from the TCP side: read from it, written to it).
///
/// `accepted` yields the stream's receiving half once the destination has
/// accepted it. Bytes from TCP flow from the start, without waiting for it:
/// on a `CONNECT` just sent, the client's first bytes ride right behind the
/// request instead of a round trip later.
///
/// End of input on either side is passed on as a half-close (END_STREAM on
/// HTTP/2, FIN on TCP) while the other direction keeps flowing. Flow control
/// gives backpressure both ways: nothing is read from TCP beyond what the
/// peer's window admits, and window is returned to the peer only once its
/// bytes are written to TCP.
///
/// With `movable` and a granted token, the stream moves when this ztunnel
/// leaves or when the peer says it moves: reading from TCP stops (what was
/// not read stays in the kernel), what was read is sent, the direction ends
/// with the moving trailer, and once the peer's direction has ended too the
/// TCP connection is handed back in [`Finish::Moved`]. A peer that does not
/// answer within `answer_within` gets a drain: its bytes are still written
/// to TCP until it ends.
///
/// A function returning an `async move` block rather than an `async fn`,
/// which would keep its arguments twice in the connection's task
/// (rust-lang/rust#62958).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
pub fn bridge<A>(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    send: SendStream<Bytes>,
    accepted: A,
    movable: Option<Movable>,
) -> impl Future<Output = (Copied, Result<Finish, BridgeError>)>
where
    A: Future<Output = Result<Accepted, Box<Error>>>,
{
    bridge_with(tcp_read, tcp_write, send, accepted, movable, None)
}

/// [`bridge`] on a stream whose `CONNECT` is still unanswered, sending
/// `replay` first (empty on the first stream). If the peer never processed
/// the stream (it went away first; [`Error::is_unprocessed`]), nothing is
/// reset: the bridge returns the TCP connection and everything it read
/// from it in [`Finish::Unprocessed`], for another stream to carry. HTTP/2
/// says such a stream had no effect, so nothing arrives twice.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
pub fn bridge_replayable<A>(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    send: SendStream<Bytes>,
    accepted: A,
    movable: Option<Movable>,
    replay: Replay,
) -> impl Future<Output = (Copied, Result<Finish, BridgeError>)>
where
    A: Future<Output = Result<Accepted, Box<Error>>>,
{
    bridge_with(tcp_read, tcp_write, send, accepted, movable, Some(replay))
}

#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
fn bridge_with<A>(
    mut tcp_read: OwnedReadHalf,
    mut tcp_write: OwnedWriteHalf,
    mut send: SendStream<Bytes>,
    accepted: A,
    movable: Option<Movable>,
    replay: Option<Replay>,
) -> impl Future<Output = (Copied, Result<Finish, BridgeError>)>
where
    A: Future<Output = Result<Accepted, Box<Error>>>,
{
    async move {
        // Until the destination accepts: what was read from TCP, to be sent
        // again if the stream turns out unprocessed. Shared by the two
        // directions like `guard`; dropped once accepted.
        // Only a replayable bridge records, and only until the answer: the
        // other bridges pay nothing for it.
        let replayable = replay.is_some();
        let (replayed, replay_ended) = replay
            .as_ref()
            .map(|r| (r.chunks.clone(), r.from_tcp_ended))
            .unwrap_or_default();
        let replay = Mutex::new(replay);
        let mut sent = 0u64;
        let mut received = 0u64;
        // Set once the peer granted a token: only then may a move start.
        let token: OnceLock<Token> = OnceLock::new();
        // What each direction tells the other. Both run in this one task
        // (try_join polls both on every wake), so a flag and a wake of the
        // task do what a Notify would, without one per connection: the
        // side that sets a flag yields once, and the other sees it on its
        // next poll.
        let flags = AtomicU8::new(0);
        let from_tcp_ended = movable.as_ref().is_some_and(|m| m.from_tcp_ended);
        // Held while the stream can move: a leaving ztunnel waits for it.
        // Taken at once (the answer, and with it the token, may still be on
        // its way), given up when no token comes.
        let guard: Mutex<Option<MovableGuard>> = Mutex::new(
            movable
                .as_ref()
                .filter(|m| !m.from_tcp_ended)
                .map(|m| m.departure.movable()),
        );
        let unguard = || {
            guard.lock().unwrap_or_else(|e| e.into_inner()).take();
        };
        let full = || {
            replay
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|r| r.len >= REPLAY_LIMIT)
        };
        // A send that fails before the destination answered fails because
        // it refused the stream (or never processed it): the answer, which
        // the other direction waits for, says which, and the bytes are in
        // the replay. This direction then just ends, so that the answer is
        // what the bridge reports, whichever direction learns first.
        // Either way this direction can no longer move: its guard goes.
        let send_failed = |error: BridgeError| {
            unguard();
            if flags.load(Ordering::Acquire) & ACCEPTED == 0 {
                Ok(DirectionEnd::Ended)
            } else {
                Err(error)
            }
        };
        let to_h2 = async {
            // Boxed: only a resumed stream replays, and the task of every
            // connection would otherwise carry the loop's state.
            if !replayed.is_empty()
                && let Err(error) = Box::pin(send_all(&mut send, replayed, &mut sent)).await
            {
                return send_failed(error);
            }
            if from_tcp_ended || replay_ended {
                if let Err(error) = send.send_data(Bytes::new(), true) {
                    return send_failed(h2_io(error));
                }
                unguard();
                return Ok::<_, BridgeError>(DirectionEnd::Ended);
            }
            let mut reader = ChunkReader::with_headroom(super::DATA_FRAME_HEADER);
            loop {
                let seen = flags.load(Ordering::Acquire);
                if seen & PEER_MOVED != 0 {
                    break;
                }
                let may_move = seen & GRANTED != 0;
                let recording = replayable && seen & ACCEPTED == 0;
                let may_read = !recording || !full();
                let chunk = tokio::select! {
                    biased;
                    () = leaving(movable.as_ref()), if may_move => break,
                    () = changed(&flags, seen) => continue,
                    chunk = reader.next(&mut tcp_read), if may_read => chunk.map_err(BridgeError::Io)?,
                };
                // Taken (None) once accepted, even if `seen` is older.
                if recording
                    && let Some(replay) = replay.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
                {
                    replay.record(&chunk);
                    replay.from_tcp_ended = chunk.is_empty();
                }
                if chunk.is_empty() {
                    if let Err(error) = send.send_data(Bytes::new(), true) {
                        return send_failed(h2_io(error));
                    }
                    // With our direction ended we can no longer start a
                    // move: a leaving ztunnel drains this one.
                    unguard();
                    return Ok(DirectionEnd::Ended);
                }
                sent += chunk.len() as u64;
                // No yield after the send: a read that took less than it
                // asked for has tokio forget the socket's readiness, so the
                // next read sleeps without a system call, and the HTTP/2
                // driver the send woke (on this worker) writes the bytes
                // first. A yield cost each request an `epoll_wait` more.
                if let Err(error) = send_chunk(&mut send, chunk).await {
                    return send_failed(error);
                }
            }
            // Moving: everything read from TCP is sent; the rest stays in
            // the kernel for whoever holds the socket next.
            send.send_trailers(resume::moving_trailers(sent))
                .map_err(h2_io)?;
            signal(&flags, WE_MOVED).await;
            Ok(DirectionEnd::Moved)
        };
        let from_h2 = async {
            let Accepted {
                recv: mut stream,
                token: granted_token,
            } = accepted.await.map_err(BridgeError::NotAccepted)?;
            if replayable {
                // Processed: nothing will be sent again.
                replay.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            signal(&flags, ACCEPTED).await;
            match (&movable, granted_token) {
                (Some(_), Some(granted)) => {
                    let _ = token.set(granted);
                    signal(&flags, GRANTED).await;
                }
                // A peer without the extension: drained, never moved.
                _ => unguard(),
            }
            let answer_within = movable.as_ref().map_or(Duration::ZERO, |m| m.answer_within);
            // Boxed, and only once we moved: most connections never do, and
            // a timer in every connection's task would cost each its size.
            let mut unanswered: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
            let mut draining = false;
            loop {
                let data = tokio::select! {
                    data = stream.data() => data,
                    () = changed(&flags, flags.load(Ordering::Acquire)),
                        if unanswered.is_none() && flags.load(Ordering::Acquire) & WE_MOVED == 0 => {
                        continue;
                    }
                    () = std::future::ready(()),
                        if unanswered.is_none() && flags.load(Ordering::Acquire) & WE_MOVED != 0 => {
                        // Only a movable stream moves: `answer_within` is set.
                        unanswered = Some(Box::pin(tokio::time::sleep(answer_within)));
                        continue;
                    }
                    () = async {
                        if let Some(deadline) = unanswered.as_mut() {
                            deadline.await;
                        }
                    }, if unanswered.is_some() && !draining => {
                        // The peer did not answer the move: its bytes still
                        // reach TCP until it ends, but ours can go no more.
                        tracing::warn!("HBONE peer did not answer the move; draining the connection");
                        draining = true;
                        unguard();
                        continue;
                    }
                };
                let Some(data) = data else { break };
                let data = data.map_err(h2_io)?;
                let len = write_frames(&mut tcp_write, &mut stream, data)
                    .await
                    .map_err(BridgeError::Io)?;
                received += len as u64;
                // Err only when the stream is already gone; the next data() says so.
                let _ = stream.flow_control().release_capacity(len);
            }
            let trailers = stream.trailers().await.map_err(h2_io)?;
            match resume::read_moving(trailers.as_ref()) {
                None => {
                    tcp_write.shutdown().await.map_err(BridgeError::Io)?;
                    Ok(DirectionEnd::Ended)
                }
                Some(Ok(count)) if count == received && token.get().is_some() => {
                    signal(&flags, PEER_MOVED).await;
                    Ok(DirectionEnd::Moved)
                }
                Some(Ok(count)) => Err(BridgeError::Io(std::io::Error::other(format!(
                    "the HBONE peer moved the stream after sending {count} bytes, but {received} \
                     arrived (or no token was granted): not resumable"
                )))),
                Some(Err(error)) => Err(BridgeError::Io(std::io::Error::other(format!(
                    "the HBONE peer ended the stream with a malformed trailer: {error}"
                )))),
            }
        };
        let result = tokio::try_join!(to_h2, from_h2);
        let finish = match result {
            Ok((DirectionEnd::Ended, DirectionEnd::Ended)) => Ok(Finish::Closed),
            Ok((ours, theirs)) => match token.get().copied() {
                Some(token) => match tcp_read.reunite(tcp_write) {
                    Ok(tcp) => {
                        return (
                            Copied {
                                from_tcp: sent,
                                to_tcp: received,
                            },
                            Ok(Finish::Moved(MovedTcp {
                                tcp,
                                token,
                                from_tcp_ended: ours == DirectionEnd::Ended,
                                to_tcp_ended: theirs == DirectionEnd::Ended,
                                guard: guard.lock().unwrap_or_else(|e| e.into_inner()).take(),
                            })),
                        );
                    }
                    Err(_) => {
                        return (
                            Copied {
                                from_tcp: sent,
                                to_tcp: received,
                            },
                            Err(BridgeError::Io(std::io::Error::other(
                                "the halves of the moved connection did not match",
                            ))),
                        );
                    }
                },
                None => Err(BridgeError::Io(std::io::Error::other(
                    "a stream without a token moved",
                ))),
            },
            Err(error) => Err(error),
        };
        let finish = match finish {
            Err(BridgeError::NotAccepted(error)) if error.is_unprocessed() => {
                match replay.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    Some(replay) => {
                        // The halves of one connection: reuniting them cannot fail.
                        let back = match tcp_read.reunite(tcp_write) {
                            Ok(tcp) => Ok(Finish::Unprocessed(Unprocessed { tcp, replay, error })),
                            Err(_) => Err(BridgeError::Io(std::io::Error::other(
                                "the halves of the unprocessed connection did not match",
                            ))),
                        };
                        return (Copied::default(), back);
                    }
                    None => Err(BridgeError::NotAccepted(error)),
                }
            }
            other => other,
        };
        match &finish {
            Ok(_) => {}
            Err(BridgeError::NotAccepted(_)) => {
                send.send_reset(h2::Reason::CANCEL);
                // A reset, not a clean close the client could take for an
                // empty answer; its bytes went nowhere. (A write half that is
                // dropped sends a FIN first; forgotten, it leaves the close to
                // the read half, which resets.)
                let _ = socket2::SockRef::from(tcp_read.as_ref()).set_linger(Some(Duration::ZERO));
                tcp_write.forget();
                sent = 0;
            }
            Err(BridgeError::Io(_)) => send.send_reset(h2::Reason::CANCEL),
        }
        (
            Copied {
                from_tcp: sent,
                to_tcp: received,
            },
            finish,
        )
    }
}

/// [`bridge`]'s flags: the token was granted, the peer moved its
/// direction, we moved ours, the stream was accepted.
const GRANTED: u8 = 1;
const PEER_MOVED: u8 = 2;
const WE_MOVED: u8 = 4;
/// The destination accepted the stream.
const ACCEPTED: u8 = 8;

/// Most DATA frames written to TCP in one system call.
const MAX_GATHERED: usize = 16;

/// A DATA frame the stream already holds, if any, taken without waiting.
fn ready_data(stream: &mut RecvStream) -> Option<Bytes> {
    let mut now = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_data(&mut now) {
        std::task::Poll::Ready(Some(Ok(data))) => Some(data),
        _ => None,
    }
}

/// Sends each of `chunks` in turn, counting them in `sent` as they go.
async fn send_all(
    send: &mut SendStream<Bytes>,
    chunks: Vec<Bytes>,
    sent: &mut u64,
) -> Result<(), BridgeError> {
    for chunk in chunks {
        *sent += chunk.len() as u64;
        send_chunk(send, chunk).await?;
    }
    Ok(())
}

/// Writes the DATA frame `first` to TCP, together with the frames the
/// stream already holds behind it, in the same system call (each polled
/// once, without waiting for more; what ends the gathering, the stream's
/// end, an error or nothing more yet, the next `data()` says again).
/// Returns how many bytes went.
///
/// One future for both cases, and the list of frames exists only while a
/// batch is written: the bridge of a quiet connection keeps none of it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
fn write_frames<'a>(
    tcp: &'a mut OwnedWriteHalf,
    stream: &'a mut RecvStream,
    first: Bytes,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    async move {
        let Some(next) = ready_data(stream) else {
            tcp.write_all(&first).await?;
            return Ok(first.len());
        };
        let mut gathered = Vec::with_capacity(MAX_GATHERED);
        gathered.extend([first, next]);
        while gathered.len() < MAX_GATHERED {
            match ready_data(stream) {
                Some(more) => gathered.push(more),
                None => break,
            }
        }
        // Boxed: only a batch pays for its state.
        Box::pin(write_gathered(tcp, gathered)).await
    }
}

/// Writes all of `chunks` with as few `writev` calls as the socket allows
/// and returns how many bytes went.
async fn write_gathered(
    tcp: &mut OwnedWriteHalf,
    mut chunks: Vec<Bytes>,
) -> std::io::Result<usize> {
    let total = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    loop {
        // An empty frame (one that only ended the stream) writes nothing.
        while chunks.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(total);
        }
        // The slices are made in each poll, so that the connection's task
        // does not keep them while it waits for the socket.
        let pending = &chunks[first..];
        let mut written = poll_fn(|cx| {
            let mut slices = [std::io::IoSlice::new(&[]); MAX_GATHERED];
            let count = pending.len().min(MAX_GATHERED);
            for (slice, chunk) in slices.iter_mut().zip(pending) {
                *slice = std::io::IoSlice::new(chunk);
            }
            std::pin::Pin::new(&mut *tcp).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut chunks[first];
            if written >= chunk.len() {
                written -= chunk.len();
                first += 1;
            } else {
                bytes::Buf::advance(chunk, written);
                written = 0;
            }
        }
    }
}

/// Sends `chunk` on the stream as the peer's window admits it.
async fn send_chunk(send: &mut SendStream<Bytes>, mut chunk: Bytes) -> Result<(), BridgeError> {
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(granted)) => granted,
            Some(Err(e)) => return Err(h2_io(e)),
            None => {
                return Err(BridgeError::Io(std::io::Error::other(
                    "the peer closed the HBONE stream while data was waiting to be sent",
                )));
            }
        };
        if granted == 0 {
            continue;
        }
        let part = chunk.split_to(granted.min(chunk.len()));
        send.send_data(part, false).map_err(h2_io)?;
    }
    Ok(())
}

/// Sets `flag` and yields once, so that the other direction, polled in the
/// same task, sees it.
async fn signal(flags: &AtomicU8, flag: u8) {
    flags.fetch_or(flag, Ordering::AcqRel);
    tokio::task::yield_now().await;
}

/// Resolves once the flags differ from `seen`. Registers no waker of its
/// own: [`signal`] wakes the task that polls it.
fn changed(flags: &AtomicU8, seen: u8) -> impl Future<Output = ()> + '_ {
    poll_fn(move |_| {
        if flags.load(Ordering::Acquire) != seen {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
}

/// Resolves once this ztunnel leaves; never for a stream that cannot move.
async fn leaving(movable: Option<&Movable>) {
    match movable {
        Some(movable) => movable.departure.leaving().cancelled().await,
        None => std::future::pending().await,
    }
}

/// An HTTP/2 error as an I/O error, keeping the socket's own error where
/// there is one and saying which layer failed where there is not.
fn h2_io(error: h2::Error) -> BridgeError {
    BridgeError::Io(h2_io_error(error))
}

fn h2_io_error(error: h2::Error) -> std::io::Error {
    if error.is_io() {
        match error.into_io() {
            Some(io) => io,
            None => std::io::Error::other("HBONE connection failed at the socket"),
        }
    } else if let Some(reason) = error.reason() {
        std::io::Error::other(format!("HBONE stream reset by the peer ({reason})"))
    } else {
        std::io::Error::other(format!("HBONE stream: {error}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use bytes::Bytes;
    use http::{Method, Request, Response, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{BridgeError, Finish, Replay, bridge};
    use crate::Error;
    use crate::proxy::hbone::Refusal;

    /// Both ends of a loopback TCP connection.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// Gathered frames arrive whole and in order, even when the socket
    /// takes them a part at a time (a small send buffer and a slow reader
    /// force partial writes across frame boundaries), and an empty frame
    /// among them writes nothing.
    #[tokio::test]
    async fn gathered_frames_arrive_whole_and_in_order_through_partial_writes() {
        let (writer, mut reader) = tcp_pair().await;
        socket2::SockRef::from(&writer)
            .set_send_buffer_size(4096)
            .unwrap();
        let frames: Vec<Bytes> = (0..5u8)
            .map(|i| match i {
                2 => Bytes::new(),
                _ => Bytes::from(vec![i; 300_000 + usize::from(i) * 7]),
            })
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let (_read, mut write) = writer.into_split();
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                // Slowly: the writer meets a full buffer again and again.
                tokio::task::yield_now().await;
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
            }
        });
        let written = super::write_gathered(&mut write, frames).await.unwrap();
        assert_eq!(written, expected.len());
        drop(write);
        let got = read.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes arrived out of order");
    }

    /// The server side of an HTTP/2 connection: its first stream's body and
    /// responder (the connection is driven on).
    async fn first_stream(
        io: tokio::io::DuplexStream,
    ) -> (h2::RecvStream, h2::server::SendResponse<Bytes>) {
        let mut connection = h2::server::handshake(io).await.unwrap();
        let (request, respond) = connection.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while connection.accept().await.is_some() {} });
        (request.into_body(), respond)
    }

    /// An HTTP/2 server that reads a stream's first bytes before it answers
    /// the CONNECT with `status`, then echoes what it read.
    fn answer_after_first_bytes(io: tokio::io::DuplexStream, status: StatusCode) {
        tokio::spawn(async move {
            let (mut body, mut respond) = first_stream(io).await;
            let first = body.data().await.unwrap().unwrap();
            let mut send = respond
                .send_response(Response::builder().status(status).body(()).unwrap(), false)
                .unwrap();
            if status == StatusCode::OK {
                send.send_data(first, false).unwrap();
                // The rest of the request, to its end, then the end of the answer.
                while let Some(more) = body.data().await {
                    send.send_data(more.unwrap(), false).unwrap();
                }
                send.send_data(Bytes::new(), true).unwrap();
            }
        });
    }

    /// An HTTP/2 server that reads a stream's first bytes and then refuses
    /// the stream unprocessed (`REFUSED_STREAM`), as a peer that is going
    /// away may.
    fn refuse_unprocessed_after_first_bytes(io: tokio::io::DuplexStream) {
        tokio::spawn(async move {
            let (mut body, mut respond) = first_stream(io).await;
            let _first = body.data().await.unwrap().unwrap();
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        });
    }

    /// Sends a CONNECT to a server `serve` runs, without waiting for the
    /// answer: the stream's sending half, and its answer to come.
    async fn connect_on(
        serve: impl FnOnce(tokio::io::DuplexStream),
    ) -> (
        h2::SendStream<Bytes>,
        impl Future<Output = Result<super::Accepted, Box<Error>>>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        serve(server_io);
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let peer: std::net::SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let accepted = async move {
            let response = response.await.map_err(|source| {
                Box::new(Error::Http2 {
                    stage: "CONNECT reply",
                    peer,
                    source,
                })
            })?;
            match Refusal::from_status(response.status()) {
                None => Ok(super::Accepted {
                    recv: response.into_body(),
                    token: None,
                }),
                Some(refusal) => Err(Box::new(Error::ConnectRefused {
                    peer,
                    target: "10.0.0.1:80".parse().unwrap(),
                    refusal,
                })),
            }
        };
        (send, accepted)
    }

    /// Sends a CONNECT and bridges a client's TCP connection to its stream
    /// without waiting for the answer.
    async fn bridged(
        status: StatusCode,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<(super::Copied, Result<super::Finish, BridgeError>)>,
    ) {
        let serve = match status {
            StatusCode::OK => |io| answer_after_first_bytes(io, StatusCode::OK),
            _ => |io| answer_after_first_bytes(io, StatusCode::UNAUTHORIZED),
        };
        let (send, accepted) = connect_on(serve).await;
        let (client, proxy_side) = tcp_pair().await;
        let (read, write) = proxy_side.into_split();
        let task = tokio::spawn(bridge(read, write, send, accepted, None));
        (client, task)
    }

    #[tokio::test]
    async fn an_unprocessed_stream_gives_the_connection_back_and_its_bytes_go_once_on_the_next() {
        for app_ends_first in [false, true] {
            let (mut client, proxy_side) = tcp_pair().await;
            client.write_all(b"hello").await.unwrap();
            if app_ends_first {
                client.shutdown().await.unwrap();
            }
            // The first peer takes the bytes off the wire, then refuses
            // the stream unprocessed.
            let (send, accepted) = connect_on(refuse_unprocessed_after_first_bytes).await;
            let (read, write) = proxy_side.into_split();
            let bridged =
                super::bridge_replayable(read, write, send, accepted, None, Replay::default());
            let (copied, result) = tokio::time::timeout(Duration::from_secs(10), bridged)
                .await
                .expect("the bridge ended");
            let unprocessed = match result {
                Ok(Finish::Unprocessed(unprocessed)) => unprocessed,
                other => panic!("expected the connection back, got {other:?}"),
            };
            assert_eq!(copied, super::Copied::default(), "nothing was carried");
            assert_eq!(unprocessed.replay.len, 5, "{:?}", unprocessed.replay);

            // The next peer accepts: it gets the bytes, once, and the rest.
            let serve = |io| answer_after_first_bytes(io, StatusCode::OK);
            let (send, accepted) = connect_on(serve).await;
            let (read, write) = unprocessed.tcp.into_split();
            let task = tokio::spawn(super::bridge_replayable(
                read,
                write,
                send,
                accepted,
                None,
                unprocessed.replay,
            ));
            let expected: &[u8] = if app_ends_first {
                b"hello"
            } else {
                client.write_all(b", again").await.unwrap();
                client.shutdown().await.unwrap();
                b"hello, again"
            };
            let mut echoed = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut echoed))
                .await
                .expect("echoed")
                .unwrap();
            assert_eq!(echoed, expected);
            let (copied, result) = task.await.unwrap();
            assert!(matches!(result, Ok(Finish::Closed)), "{result:?}");
            let len = expected.len() as u64;
            assert_eq!((copied.from_tcp, copied.to_tcp), (len, len));
        }
    }

    #[tokio::test]
    async fn a_replay_holds_a_bounded_amount_until_the_answer() {
        // A destination that answers only once the client's bytes stop
        // coming: what it got by then is what the bridge read before the
        // answer, and would have to send again.
        let (before_answer, got_before) = tokio::sync::oneshot::channel();
        let (total, got_total) = tokio::sync::oneshot::channel();
        let serve = move |io| {
            tokio::spawn(async move {
                let (mut body, mut respond) = first_stream(io).await;
                let mut received = 0;
                while let Ok(Some(data)) =
                    tokio::time::timeout(Duration::from_millis(300), body.data()).await
                {
                    let data = data.unwrap();
                    received += data.len();
                    let _ = body.flow_control().release_capacity(data.len());
                }
                let _ = before_answer.send(received);
                let mut send = respond
                    .send_response(Response::builder().status(200).body(()).unwrap(), false)
                    .unwrap();
                while let Some(data) = body.data().await {
                    let data = data.unwrap();
                    received += data.len();
                    let _ = body.flow_control().release_capacity(data.len());
                }
                send.send_data(Bytes::new(), true).unwrap();
                let _ = total.send(received);
            });
        };
        let (send, accepted) = connect_on(serve).await;
        let (mut client, proxy_side) = tcp_pair().await;
        let (read, write) = proxy_side.into_split();
        let task = tokio::spawn(super::bridge_replayable(
            read,
            write,
            send,
            accepted,
            None,
            Replay::default(),
        ));
        let sent = vec![7u8; 8 * super::REPLAY_LIMIT];
        let (mut client_read, mut client_write) = client.split();
        let write = async {
            client_write.write_all(&sent).await.unwrap();
            client_write.shutdown().await.unwrap();
        };
        let mut answer = Vec::new();
        let read = client_read.read_to_end(&mut answer);
        let ((), read) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
                .await
                .expect("the whole request went through");
        read.unwrap();
        let before = got_before.await.unwrap();
        // At most one read past the limit (a read is at most 256 KiB).
        assert!(
            before > 0 && before < super::REPLAY_LIMIT + 256 * 1024,
            "{before} bytes before the answer"
        );
        assert_eq!(got_total.await.unwrap(), sent.len());
        let (copied, result) = task.await.unwrap();
        assert!(matches!(result, Ok(Finish::Closed)), "{result:?}");
        assert_eq!(copied.from_tcp, sent.len() as u64);
    }

    #[tokio::test]
    async fn the_first_bytes_go_out_before_the_answer() {
        // The destination answers only once it has the client's bytes:
        // a bridge that waited for the answer first would never finish.
        let (mut client, task) = bridged(StatusCode::OK).await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut echoed))
            .await
            .expect("the bridge waited for the answer before sending")
            .unwrap();
        assert_eq!(echoed, b"hello");
        let (copied, result) = task.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert_eq!((copied.from_tcp, copied.to_tcp), (5, 5));
    }

    #[tokio::test]
    async fn a_refused_stream_resets_the_client_and_carries_nothing() {
        let (mut client, task) = bridged(StatusCode::UNAUTHORIZED).await;
        client.write_all(b"hello").await.unwrap();
        let (copied, result) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the bridge ended")
            .unwrap();
        match result {
            Err(BridgeError::NotAccepted(error)) => match *error {
                Error::ConnectRefused { refusal, .. } => {
                    assert!(refusal.is_denial(), "{refusal:?}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            },
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!((copied.from_tcp, copied.to_tcp), (0, 0));
        let mut rest = Vec::new();
        let read = client.read_to_end(&mut rest).await;
        assert_eq!(
            read.expect_err("a reset, not a clean close").kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }

    use std::sync::Arc;

    use super::{Accepted, Movable};
    use crate::proxy::hbone::resume::{self, Token};
    use crate::upgrade::departure::Departure;

    /// An app connected to a ztunnel-side socket.
    struct AppLeg {
        app: TcpStream,
        proxy: TcpStream,
    }

    async fn leg() -> AppLeg {
        let (app, proxy) = tcp_pair().await;
        AppLeg { app, proxy }
    }

    type Bridged = tokio::task::JoinHandle<(super::Copied, Result<Finish, BridgeError>)>;

    /// Two bridges joined by one HTTP/2 stream, as a client's and a
    /// server's ztunnel would be: the client offers the extension, the
    /// server grants `grant`.
    async fn joined(
        client_leg: TcpStream,
        server_leg: TcpStream,
        grant: Option<Token>,
        client_departure: &Arc<Departure>,
        server_departure: &Arc<Departure>,
    ) -> (Bridged, Bridged) {
        let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
        let server_departure = server_departure.clone();
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let offered = resume::read_request(request.headers()).unwrap().offered;
            let mut response = Response::new(());
            if let (true, Some(token)) = (offered, grant) {
                resume::grant(response.headers_mut(), token);
            }
            let send = respond.send_response(response, false).unwrap();
            let (read, write) = server_leg.into_split();
            let accepted = std::future::ready(Ok(Accepted {
                recv: request.into_body(),
                token: grant,
            }));
            let movable = Movable {
                departure: server_departure,
                answer_within: Duration::from_secs(5),
                from_tcp_ended: false,
            };
            bridge(read, write, send, accepted, Some(movable)).await
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        resume::offer(request.headers_mut(), None);
        let (response, send) = sender.send_request(request, false).unwrap();
        let accepted = async move {
            let response = response.await.expect("an answer");
            let token = resume::read_grant(response.headers());
            Ok(Accepted {
                recv: response.into_body(),
                token,
            })
        };
        let (read, write) = client_leg.into_split();
        let movable = Movable {
            departure: client_departure.clone(),
            answer_within: Duration::from_secs(5),
            from_tcp_ended: false,
        };
        let client = tokio::spawn(bridge(read, write, send, accepted, Some(movable)));
        (client, server)
    }

    async fn exchange(a: &mut TcpStream, b: &mut TcpStream, message: &[u8]) {
        a.write_all(message).await.unwrap();
        let mut got = vec![0; message.len()];
        tokio::time::timeout(Duration::from_secs(10), b.read_exact(&mut got))
            .await
            .expect("carried")
            .unwrap();
        assert_eq!(got, message);
    }

    fn moved(finished: (super::Copied, Result<Finish, BridgeError>)) -> super::MovedTcp {
        match finished.1 {
            Ok(Finish::Moved(moved)) => moved,
            other => panic!("expected a move, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_leaving_side_moves_the_stream_and_the_kernel_keeps_what_was_not_read() {
        for client_leaves in [true, false] {
            let (mut client_app, mut server_app) = (leg().await, leg().await);
            let (client_departure, server_departure) = (
                Arc::new(Departure::default()),
                Arc::new(Departure::default()),
            );
            let token = Token::random();
            let (client, server) = joined(
                client_app.proxy,
                server_app.proxy,
                Some(token),
                &client_departure,
                &server_departure,
            )
            .await;
            exchange(&mut client_app.app, &mut server_app.app, b"hello").await;
            exchange(&mut server_app.app, &mut client_app.app, b"world!").await;
            let leaving = if client_leaves {
                &client_departure
            } else {
                &server_departure
            };
            let (outbox, _inbox) = std::sync::mpsc::channel();
            leaving.start_leaving(outbox);
            let (client, server) = (client.await.unwrap(), server.await.unwrap());
            assert_eq!((client.0.from_tcp, client.0.to_tcp), (5, 6));
            assert_eq!((server.0.from_tcp, server.0.to_tcp), (6, 5));
            let (mut client_moved, mut server_moved) = (moved(client), moved(server));
            assert_eq!(client_moved.token, token);
            assert_eq!(server_moved.token, token);
            assert!(!client_moved.from_tcp_ended && !client_moved.to_tcp_ended);
            // Written after the move: nobody read it, the kernel kept it for
            // whoever holds the socket next.
            exchange(&mut client_app.app, &mut client_moved.tcp, b"later").await;
            exchange(&mut server_app.app, &mut server_moved.tcp, b"meanwhile").await;
            assert_eq!(client_departure.settled(std::time::Instant::now()).await, 1);
            drop((client_moved.guard.take(), server_moved.guard.take()));
            assert_eq!(client_departure.settled(std::time::Instant::now()).await, 0);
        }
    }

    #[tokio::test]
    async fn a_half_closed_direction_stays_closed_across_the_move() {
        let (mut client_app, mut server_app) = (leg().await, leg().await);
        let (client_departure, server_departure) = (
            Arc::new(Departure::default()),
            Arc::new(Departure::default()),
        );
        let (client, server) = joined(
            client_app.proxy,
            server_app.proxy,
            Some(Token::random()),
            &client_departure,
            &server_departure,
        )
        .await;
        exchange(&mut client_app.app, &mut server_app.app, b"request").await;
        // The server app is done sending; the client still may send.
        server_app.app.shutdown().await.unwrap();
        let mut end = Vec::new();
        client_app.app.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
        // The server side can no longer start a move, but the client can.
        let (outbox, _inbox) = std::sync::mpsc::channel();
        client_departure.start_leaving(outbox);
        let (client, server) = (moved(client.await.unwrap()), moved(server.await.unwrap()));
        assert!(!client.from_tcp_ended && client.to_tcp_ended);
        assert!(server.from_tcp_ended && !server.to_tcp_ended);
    }

    #[tokio::test]
    async fn without_a_granted_token_nothing_moves() {
        let (mut client_app, mut server_app) = (leg().await, leg().await);
        let (client_departure, server_departure) = (
            Arc::new(Departure::default()),
            Arc::new(Departure::default()),
        );
        let (client, server) = joined(
            client_app.proxy,
            server_app.proxy,
            None,
            &client_departure,
            &server_departure,
        )
        .await;
        let (outbox, _inbox) = std::sync::mpsc::channel();
        client_departure.start_leaving(outbox);
        // A peer without the extension: the connection is drained, it goes
        // on carrying bytes after the leave.
        exchange(&mut client_app.app, &mut server_app.app, b"still here").await;
        exchange(&mut server_app.app, &mut client_app.app, b"yes").await;
        client_app.app.shutdown().await.unwrap();
        server_app.app.shutdown().await.unwrap();
        let (client, server) = (client.await.unwrap(), server.await.unwrap());
        assert!(matches!(client.1, Ok(Finish::Closed)), "{:?}", client.1);
        assert!(matches!(server.1, Ok(Finish::Closed)), "{:?}", server.1);
    }
}
