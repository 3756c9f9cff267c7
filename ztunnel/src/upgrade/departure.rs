//! What the data path knows of an upgrade: whether this ztunnel is leaving,
//! where moved connections go, and how many are still on their way.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::protocol::{Message, MovedServer};
use crate::proxy::hbone::resume::Token;
use crate::proxy::resumptions::Parked;

/// A message for the successor, with the socket it is about.
pub struct Outgoing {
    pub message: Message,
    pub fd: Option<OwnedFd>,
}

#[derive(Default)]
pub struct Departure {
    leaving: CancellationToken,
    outbox: Mutex<Option<std::sync::mpsc::Sender<Outgoing>>>,
    /// The thread that empties `outbox` into the upgrade socket.
    sender: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What is still on its way out, by kind ([`MOVABLE`], [`OPEN`],
    /// [`CLOSING`]), each held by a [`Counted`] guard.
    counts: [AtomicUsize; 3],
    moved: AtomicU64,
    changed: Notify,
}

/// Connections whose stream can move and has not moved yet.
const MOVABLE: usize = 0;
/// Proxied connections whose task runs.
const OPEN: usize = 1;
/// Inbound HBONE connections told to go away that have not closed yet
/// (their lingering included, [`crate::proxy::inbound::CLOSE_LINGER`]).
const CLOSING: usize = 2;

/// One of [`Departure`]'s counts (`KIND`), held until dropped. The kind is
/// part of the type, so a guard costs a pointer and one kind cannot be
/// dropped for another.
pub struct Counted<const KIND: usize>(Arc<Departure>);

/// One connection whose stream can move; dropped once it moved, can no
/// longer move, or ended.
pub type MovableGuard = Counted<MOVABLE>;

/// One proxied connection's task.
pub type OpenGuard = Counted<OPEN>;

/// One inbound HBONE connection told to go away, until its socket closes.
pub type ClosingGuard = Counted<CLOSING>;

impl<const KIND: usize> std::fmt::Debug for Counted<KIND> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(["MovableGuard", "OpenGuard", "ClosingGuard"][KIND])
    }
}

impl Departure {
    /// Cancelled when this ztunnel starts handing its connections over.
    pub fn leaving(&self) -> &CancellationToken {
        &self.leaving
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.is_cancelled()
    }

    /// Moved connections go to `outbox` from now on; every movable stream
    /// starts moving.
    pub fn start_leaving(&self, outbox: std::sync::mpsc::Sender<Outgoing>) {
        *self.outbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(outbox);
        self.leaving.cancel();
    }

    /// The thread that sends what goes into the outbox; [`Self::close_outbox`]
    /// waits for it.
    pub fn sent_by(&self, thread: std::thread::JoinHandle<()>) {
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
    }

    /// Stops sending to the successor, once everything queued went out or
    /// `within` passed; false if messages may have been lost. For right
    /// before the process exits: queued messages carry sockets, and late
    /// moves of drained connections may still come until then.
    pub async fn close_outbox(&self, within: Duration) -> bool {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(sender) = self.sender.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return true;
        };
        let joined =
            tokio::time::timeout(within, tokio::task::spawn_blocking(move || sender.join()));
        matches!(joined.await, Ok(Ok(Ok(()))))
    }

    pub fn movable(self: &Arc<Self>) -> MovableGuard {
        self.count()
    }

    pub fn open_connection(self: &Arc<Self>) -> OpenGuard {
        self.count()
    }

    pub fn closing_connection(self: &Arc<Self>) -> ClosingGuard {
        self.count()
    }

    fn count<const KIND: usize>(self: &Arc<Self>) -> Counted<KIND> {
        self.counts[KIND].fetch_add(1, Ordering::AcqRel);
        Counted(self.clone())
    }

    /// Connections whose task still runs here.
    pub fn open(&self) -> usize {
        self.counts[OPEN].load(Ordering::Acquire)
    }

    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Acquire)
    }

    /// Sends a moved connection's socket and what the successor needs to
    /// take it on. Fails when there is no successor to send to.
    pub fn hand_over(&self, message: Message, tcp: TcpStream) -> Result<(), String> {
        let tcp = tcp
            .into_std()
            .map_err(|error| format!("cannot take the socket out of the runtime: {error}"))?;
        self.hand_over_std(message, tcp)
    }

    /// [`Self::hand_over`] for a socket outside the runtime.
    pub fn hand_over_std(&self, message: Message, tcp: std::net::TcpStream) -> Result<(), String> {
        let outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let Some(outbox) = outbox.as_ref() else {
            return Err("no successor to hand the connection to".into());
        };
        outbox
            .send(Outgoing {
                message,
                fd: Some(OwnedFd::from(tcp)),
            })
            .map_err(|_| "the connection to the successor is gone".to_string())?;
        self.moved.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Hands a parked inbound stream (its app socket) to the successor.
    pub fn hand_over_parked(&self, token: Token, parked: Parked) -> Result<(), String> {
        let message = Message::Server(MovedServer::of(token, &parked));
        self.hand_over_std(message, parked.tcp)
    }

    /// Sends a message without a socket.
    pub fn tell(&self, message: Message) -> Result<(), String> {
        let outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let Some(outbox) = outbox.as_ref() else {
            return Err("no successor".into());
        };
        outbox
            .send(Outgoing { message, fd: None })
            .map_err(|_| "the connection to the successor is gone".to_string())
    }

    /// Waits until no stream is left to move, or until `deadline`. Returns
    /// how many were still to move. (Woken promptly only once leaving.)
    pub async fn settled(&self, deadline: Instant) -> usize {
        self.wait_for(&self.counts[MOVABLE], deadline).await
    }

    /// Waits until no proxied connection is left, or until `deadline`.
    /// Returns how many were still open.
    pub async fn drained(&self, deadline: Instant) -> usize {
        self.wait_for(&self.counts[OPEN], deadline).await
    }

    /// Waits until every HBONE connection told to go away has closed, or
    /// until `deadline`. Returns how many had not.
    pub async fn closed(&self, deadline: Instant) -> usize {
        self.wait_for(&self.counts[CLOSING], deadline).await
    }

    async fn wait_for(&self, count: &AtomicUsize, deadline: Instant) -> usize {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let left = count.load(Ordering::Acquire);
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            // Woken by every change; the timeout is only a safety net.
            let wait = (deadline - now).min(Duration::from_millis(500));
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }
}

impl Departure {
    /// Wakes whoever waits for the counts; only a leaving ztunnel waits, so
    /// the connections of one that stays pay no lock for it.
    fn counted(&self) {
        if self.is_leaving() {
            self.changed.notify_waiters();
        }
    }
}

impl<const KIND: usize> Drop for Counted<KIND> {
    fn drop(&mut self) {
        self.0.counts[KIND].fetch_sub(1, Ordering::AcqRel);
        self.0.counted();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A departure that has started leaving, and the successor's end of its
    /// outbox (kept, so the outbox stays open).
    fn leaving() -> (Arc<Departure>, std::sync::mpsc::Receiver<Outgoing>) {
        let departure = Arc::new(Departure::default());
        let (outbox, inbox) = std::sync::mpsc::channel();
        departure.start_leaving(outbox);
        (departure, inbox)
    }

    #[tokio::test]
    async fn waits_until_every_movable_connection_moved() {
        let (departure, _inbox) = leaving();
        let first = departure.movable();
        let second = departure.movable();
        let deadline = Instant::now() + Duration::from_secs(5);
        drop(first);
        let waiter = tokio::spawn({
            let departure = departure.clone();
            async move { departure.settled(deadline).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one is still to move");
        drop(second);
        assert_eq!(waiter.await.expect("joined"), 0);
        let _stuck = departure.movable();
        assert_eq!(
            departure
                .settled(Instant::now() + Duration::from_millis(50))
                .await,
            1,
            "the deadline ends the wait"
        );
    }

    #[tokio::test]
    async fn each_kind_is_counted_apart_and_closing_connections_are_awaited() {
        let (departure, _inbox) = leaving();
        let closing = departure.closing_connection();
        let soon = || Instant::now() + Duration::from_millis(50);
        assert_eq!(departure.settled(soon()).await, 0, "nothing to move");
        assert_eq!(departure.drained(soon()).await, 0, "nothing open");
        assert_eq!(departure.open(), 0);
        assert_eq!(departure.closed(soon()).await, 1, "one still closing");
        let waiter = tokio::spawn({
            let departure = departure.clone();
            async move {
                departure
                    .closed(Instant::now() + Duration::from_secs(5))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the connection has not closed");
        drop(closing);
        assert_eq!(waiter.await.expect("joined"), 0);
    }

    #[tokio::test]
    async fn nothing_is_handed_over_without_a_successor() {
        let departure = Departure::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tcp = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        assert!(departure.hand_over(Message::Hello { pid: 1 }, tcp).is_err());
        let (outbox, inbox) = std::sync::mpsc::channel();
        departure.start_leaving(outbox);
        assert!(departure.is_leaving());
        let tcp = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        departure
            .hand_over(Message::Hello { pid: 1 }, tcp)
            .expect("handed over");
        assert_eq!(departure.moved(), 1);
        assert!(inbox.try_recv().expect("sent").fd.is_some());
    }
}
