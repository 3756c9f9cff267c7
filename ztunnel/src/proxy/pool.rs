//! Outbound HBONE connections, pooled and multiplexed.
//!
//! A connection is keyed by who speaks (the source pod and its identity), to
//! whom (the destination identity) and where (the destination address): only
//! streams that would present and expect exactly the same certificates, from
//! the same pod's namespace, share it. Each connection carries up to
//! `max_streams_per_connection` CONNECT streams; when all are busy, a new
//! connection is opened. Opening is serialised per key, so a burst of new
//! streams waits for one handshake instead of starting a hundred. Connections
//! without streams for `pool_idle_timeout` are closed.
//!
//! Each worker thread keeps its own connections (the key names the
//! worker): a connection's HTTP/2 driver then runs on the worker of the
//! streams it carries, and no DATA frame wakes another thread
//! ([`crate::workers`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use kanava_mesh::Identity;

use crate::Error;
use crate::proxy::PodInfo;
use crate::workers::Workers;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// UID of the pod whose namespace the connection is made from.
    pub source_pod: String,
    pub source: Identity,
    pub destination: Identity,
    pub address: SocketAddr,
    /// The worker whose streams ride on it ([`Workers::current`]).
    pub worker: Option<usize>,
}

impl PoolKey {
    /// The key of connections from `pod` to `destination` at `address`,
    /// for the streams of the worker this runs on.
    pub fn from_here(pod: &PodInfo, destination: Identity, address: SocketAddr) -> PoolKey {
        PoolKey {
            source_pod: pod.uid.clone(),
            source: pod.identity.clone(),
            destination,
            address,
            worker: Workers::current(),
        }
    }
}

/// One HTTP/2 connection and its bookkeeping.
pub struct Connection {
    sender: SendRequest<Bytes>,
    streams: AtomicUsize,
    closed: Arc<AtomicBool>,
    /// Takes no new streams: its peer is leaving (it moved a stream away,
    /// or sent GOAWAY). Streams on it run to their end.
    retired: AtomicBool,
    idle_since: Mutex<Instant>,
    /// When the first of the two certificates it was opened with expires: no
    /// new stream may ride on an identity proof that has lapsed.
    usable_until: SystemTime,
}

impl Connection {
    /// Wraps a connection; `closed` becomes true when its driver task ends.
    pub fn new(
        sender: SendRequest<Bytes>,
        closed: Arc<AtomicBool>,
        usable_until: SystemTime,
    ) -> Self {
        Connection {
            sender,
            streams: AtomicUsize::new(0),
            closed,
            retired: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            usable_until,
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self.retired.load(Ordering::Acquire)
            || SystemTime::now() >= self.usable_until
    }

    /// Takes a stream slot if one is free.
    fn try_reserve(self: &Arc<Self>, max: usize) -> Option<StreamSlot> {
        let mut current = self.streams.load(Ordering::Acquire);
        loop {
            if current >= max || self.is_closed() {
                return None;
            }
            match self.streams.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(StreamSlot {
                        connection: self.clone(),
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// A reserved stream on a pooled connection; dropping it frees the slot.
pub struct StreamSlot {
    connection: Arc<Connection>,
}

impl StreamSlot {
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.connection.sender.clone()
    }

    /// No new stream goes on this slot's connection: its peer is leaving.
    pub fn retire(&self) {
        self.connection.retired.store(true, Ordering::Release);
    }

    /// Retires the connection if `error` says its peer is going away.
    pub fn retire_if(&self, error: &Error) {
        if error.is_going_away() {
            self.retire();
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.connection.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .connection
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

type Opening = Arc<tokio::sync::Mutex<()>>;

pub struct Pool {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<Connection>>>>,
    opening: Mutex<HashMap<PoolKey, Opening>>,
    max_streams: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Self {
        Pool {
            connections: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            max_streams: max_streams.max(1),
            idle_timeout,
        }
    }

    /// A stream slot on a connection for `key`, opening one with `open` if
    /// every pooled connection is full.
    pub async fn checkout<F, Fut>(&self, key: &PoolKey, open: F) -> Result<StreamSlot, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, Error>>,
    {
        if let Some(slot) = self.reuse(key) {
            return Ok(slot);
        }
        let opening = self.lock_opening().entry(key.clone()).or_default().clone();
        let _turn = opening.lock().await;
        // Whoever opened a connection while we waited may have room for us.
        if let Some(slot) = self.reuse(key) {
            return Ok(slot);
        }
        let connection = Arc::new(open().await?);
        let slot = connection
            .try_reserve(self.max_streams)
            .ok_or(Error::ClosedAtOnce { peer: key.address })?;
        self.lock_connections()
            .entry(key.clone())
            .or_default()
            .push(connection);
        Ok(slot)
    }

    /// Opens a connection for `key` ahead of its first stream, unless one is
    /// pooled or being opened already. It waits in the pool without streams
    /// and is closed after the idle timeout if no stream comes. Returns
    /// whether it opened one.
    pub async fn warm<F, Fut>(&self, key: &PoolKey, open: F) -> Result<bool, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, Error>>,
    {
        let opening = self.lock_opening().entry(key.clone()).or_default().clone();
        // Someone opening one right now makes a second pointless.
        let Ok(_turn) = opening.try_lock() else {
            return Ok(false);
        };
        if self.has_open(key) {
            return Ok(false);
        }
        let connection = Arc::new(open().await?);
        self.lock_connections()
            .entry(key.clone())
            .or_default()
            .push(connection);
        Ok(true)
    }

    /// Closes every connection made from pod `uid`'s namespace: the pod is
    /// gone, and nothing will use them again. Streams still running keep
    /// their connection until they end. Returns how many left the pool.
    pub fn remove_pod(&self, uid: &str) -> usize {
        let mut removed = 0;
        self.lock_connections().retain(|key, list| {
            if key.source_pod == uid {
                removed += list.len();
                false
            } else {
                true
            }
        });
        self.lock_opening().retain(|key, _| key.source_pod != uid);
        removed
    }

    fn has_open(&self, key: &PoolKey) -> bool {
        self.lock_connections()
            .get(key)
            .is_some_and(|list| list.iter().any(|c| !c.is_closed()))
    }

    /// Where the pooled connections of other pods with identity `source`
    /// lead (destination identity and address), at most `limit` of them:
    /// what a new replica of the same workload will most likely dial too.
    pub fn destinations_of(
        &self,
        source: &Identity,
        except_pod: &str,
        limit: usize,
    ) -> Vec<(Identity, SocketAddr)> {
        let connections = self.lock_connections();
        let mut found: Vec<(Identity, SocketAddr)> = Vec::new();
        for (key, list) in connections.iter() {
            if found.len() >= limit {
                break;
            }
            if key.source != *source
                || key.source_pod == except_pod
                || list.iter().all(|c| c.is_closed())
            {
                continue;
            }
            let destination = (key.destination.clone(), key.address);
            if !found.contains(&destination) {
                found.push(destination);
            }
        }
        found
    }

    fn reuse(&self, key: &PoolKey) -> Option<StreamSlot> {
        let mut connections = self.lock_connections();
        let list = connections.get_mut(key)?;
        list.retain(|c| !c.is_closed());
        list.iter().find_map(|c| c.try_reserve(self.max_streams))
    }

    /// Drops closed connections and connections idle for longer than the
    /// idle timeout. Dropping the last handle makes h2 close the connection
    /// gracefully.
    pub fn evict_idle(&self) -> usize {
        let now = Instant::now();
        let mut evicted = 0;
        let mut connections = self.lock_connections();
        connections.retain(|_, list| {
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
                        >= self.idle_timeout;
                let keep = !c.is_closed() && !idle;
                if !keep {
                    evicted += 1;
                }
                keep
            });
            !list.is_empty()
        });
        drop(connections);
        let connections = self.lock_connections();
        self.lock_opening()
            .retain(|key, lock| connections.contains_key(key) || Arc::strong_count(lock) > 1);
        evicted
    }

    /// Number of pooled connections (for tests and the admin API).
    pub fn len(&self) -> usize {
        self.lock_connections().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn lock_connections(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Arc<Connection>>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_opening(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Opening>> {
        self.opening.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn key(address: &str) -> PoolKey {
        let identity = |sa: &str| Identity::new("cluster.local", "shop", sa).expect("identity");
        PoolKey {
            source_pod: "client-uid".into(),
            source: identity("client"),
            destination: identity("web"),
            address: address.parse().expect("address"),
            worker: None,
        }
    }

    #[tokio::test]
    async fn a_warmed_connection_serves_the_first_stream_without_a_handshake() {
        let pool = Pool::new(2, Duration::from_secs(60));
        let key = key("10.0.0.1:15008");
        let far = SystemTime::now() + Duration::from_secs(3600);
        assert!(pool.warm(&key, || connection(far)).await.expect("warm"));
        // Once warm, neither a second warm-up nor the first stream opens one.
        assert!(!pool.warm(&key, || connection(far)).await.expect("warm"));
        let opened = AtomicUsize::new(0);
        let _slot = pool
            .checkout(&key, || {
                opened.fetch_add(1, Ordering::SeqCst);
                connection(far)
            })
            .await
            .expect("checkout");
        assert_eq!(opened.load(Ordering::SeqCst), 0);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test]
    async fn a_released_pods_connections_leave_the_pool() {
        let pool = Pool::new(2, Duration::from_secs(60));
        let far = SystemTime::now() + Duration::from_secs(3600);
        let released = key("10.0.0.1:15008");
        let mut other_pod = key("10.0.0.1:15008");
        other_pod.source_pod = "other-uid".into();
        assert!(
            pool.warm(&released, || connection(far))
                .await
                .expect("warm")
        );
        assert!(
            pool.warm(&other_pod, || connection(far))
                .await
                .expect("warm")
        );
        assert_eq!(pool.remove_pod(&released.source_pod), 1);
        assert_eq!(pool.len(), 1);
        assert!(
            pool.destinations_of(&released.source, "new-pod-uid", 8)
                .iter()
                .all(|(_, address)| *address == other_pod.address)
        );
        assert_eq!(pool.remove_pod("unknown-uid"), 0);
    }

    #[tokio::test]
    async fn a_new_pod_is_pointed_at_where_its_siblings_connect() {
        let pool = Pool::new(2, Duration::from_secs(60));
        let far = SystemTime::now() + Duration::from_secs(3600);
        let sibling = key("10.0.0.1:15008");
        let _slot = pool
            .checkout(&sibling, || connection(far))
            .await
            .expect("checkout");
        let mut other_identity = key("10.0.0.2:15008");
        other_identity.source = Identity::new("cluster.local", "shop", "admin").expect("identity");
        let _other = pool
            .checkout(&other_identity, || connection(far))
            .await
            .expect("checkout");

        let found = pool.destinations_of(&sibling.source, "new-pod-uid", 8);
        assert_eq!(found, vec![(sibling.destination.clone(), sibling.address)]);
        // Not the pod's own connections, and never more than asked for.
        assert!(
            pool.destinations_of(&sibling.source, &sibling.source_pod, 8)
                .is_empty()
        );
        assert!(
            pool.destinations_of(&sibling.source, "new-pod-uid", 0)
                .is_empty()
        );
    }

    /// A real HTTP/2 connection over an in-memory pipe, usable until
    /// `usable_until`; the flag says when its driver ended.
    async fn connection(usable_until: SystemTime) -> Result<Connection, Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut server) = h2::server::handshake(server_io).await {
                while server.accept().await.is_some() {}
            }
        });
        let (sender, driver) = h2::client::handshake(client_io)
            .await
            .expect("HTTP/2 handshake over a pipe");
        let closed = Arc::new(AtomicBool::new(false));
        let driver_closed = closed.clone();
        tokio::spawn(async move {
            let _ = driver.await;
            driver_closed.store(true, Ordering::Release);
        });
        Ok(Connection::new(sender, closed, usable_until))
    }

    fn in_an_hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn a_burst_for_one_key_opens_one_connection() {
        let pool = Arc::new(Pool::new(100, Duration::from_secs(300)));
        let opened = Arc::new(AtomicUsize::new(0));
        let mut checkouts = Vec::new();
        for _ in 0..50 {
            let (pool, opened) = (pool.clone(), opened.clone());
            checkouts.push(tokio::spawn(async move {
                pool.checkout(&key("10.244.2.3:15008"), || async {
                    opened.fetch_add(1, Ordering::SeqCst);
                    // A slow handshake: everyone else arrives meanwhile.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    connection(in_an_hour()).await
                })
                .await
            }));
        }
        let mut slots = Vec::new();
        for checkout in checkouts {
            slots.push(checkout.await.expect("task").expect("slot"));
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test]
    async fn a_full_connection_makes_room_with_a_new_one_and_keys_do_not_mix() {
        let pool = Pool::new(2, Duration::from_secs(300));
        let a = key("10.244.2.3:15008");
        let mut slots = Vec::new();
        for _ in 0..3 {
            slots.push(
                pool.checkout(&a, || connection(in_an_hour()))
                    .await
                    .expect("slot"),
            );
        }
        assert_eq!(pool.len(), 2, "two streams per connection");
        let b = key("10.244.2.4:15008");
        let _other = pool
            .checkout(&b, || connection(in_an_hour()))
            .await
            .expect("slot");
        assert_eq!(pool.len(), 3, "another destination gets its own connection");
        // A freed stream is reused instead of opening a connection.
        drop(slots.pop());
        let _again = pool
            .checkout(&a, || async { panic!("should reuse the free stream") })
            .await
            .expect("slot");
    }

    #[tokio::test]
    async fn no_stream_rides_on_a_lapsed_certificate() {
        let pool = Pool::new(100, Duration::from_secs(300));
        let k = key("10.244.2.3:15008");
        let soon = SystemTime::now() + Duration::from_millis(100);
        let first = pool.checkout(&k, || connection(soon)).await.expect("slot");
        drop(first);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let opened = AtomicUsize::new(0);
        let _second = pool
            .checkout(&k, || {
                opened.fetch_add(1, Ordering::SeqCst);
                connection(in_an_hour())
            })
            .await
            .expect("slot");
        assert_eq!(
            opened.load(Ordering::SeqCst),
            1,
            "a new connection was opened"
        );
        assert_eq!(pool.len(), 1, "the lapsed one was dropped");
    }

    #[tokio::test]
    async fn a_connection_lapsed_on_arrival_is_an_error_not_a_hang() {
        let pool = Pool::new(100, Duration::from_secs(300));
        let k = key("10.244.2.3:15008");
        let result = pool
            .checkout(&k, || connection(SystemTime::UNIX_EPOCH))
            .await;
        assert!(matches!(result, Err(Error::ClosedAtOnce { .. })));
    }

    #[tokio::test]
    async fn idle_connections_are_evicted_busy_ones_kept() {
        let pool = Pool::new(100, Duration::from_millis(50));
        let busy = pool
            .checkout(&key("10.244.2.3:15008"), || connection(in_an_hour()))
            .await
            .expect("slot");
        let idle = pool
            .checkout(&key("10.244.2.4:15008"), || connection(in_an_hour()))
            .await
            .expect("slot");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(pool.evict_idle(), 1);
        assert_eq!(pool.len(), 1);
        drop(busy);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(pool.evict_idle(), 1);
        assert!(pool.is_empty());
    }
}
