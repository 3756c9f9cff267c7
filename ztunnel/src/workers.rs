//! The data path's threads: one single-threaded runtime per worker.
//!
//! A proxied connection is two tasks that hand each other every chunk: the
//! bridge (TCP ⇄ HTTP/2 stream) and the HTTP/2 connection's driver (stream
//! ⇄ TLS socket). On a work-stealing runtime each hand-over may wake the
//! other worker, parked in `epoll_wait`, to run the woken task: a context
//! switch and an `eventfd` write per DATA frame, for no gain, since the two
//! tasks never run at once anyway. Here every connection lives on one
//! worker from its accept to its end, with everything it spawns (its
//! HTTP/2 driver, an inbound connection's streams), and each worker waits
//! on its own `epoll`: a worker sleeps until one of its own sockets is
//! ready, and no worker wakes another.
//!
//! What a worker does not get is stolen work: a busy worker keeps its
//! connections. New connections go to the worker with the fewest open ones,
//! so long-lived busy connections spread as they arrive.
//!
//! The control plane, discovery, certificates and the admin server stay on
//! the main runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::Error;
use crate::metrics::WorkerLabels;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The data path's worker threads, each running a single-threaded runtime.
/// Dropping it stops them; tasks still on them are dropped.
pub struct Workers {
    workers: Vec<Worker>,
    /// Where the next pod's listeners go.
    next_listener: AtomicUsize,
}

struct Worker {
    handle: Handle,
    /// Connections running on this worker (the metric
    /// `kanava_worker_connections`).
    connections: Gauge,
    /// Dropped to stop the worker.
    _stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts `count` workers (at least one), counting each one's
    /// connections in `connections`.
    pub fn start(
        count: usize,
        connections: &Family<WorkerLabels, Gauge>,
    ) -> Result<Workers, Error> {
        let workers = (0..count.max(1))
            .map(|index| {
                let gauge = connections
                    .get_or_create(&WorkerLabels {
                        worker: index.to_string(),
                    })
                    .clone();
                Worker::start(index, gauge)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Workers {
            workers,
            next_listener: AtomicUsize::new(0),
        })
    }

    /// The worker this thread is, if it is one of them: keys what a worker
    /// keeps for itself, such as its pooled HBONE connections.
    pub fn current() -> Option<usize> {
        CURRENT.with(Cell::get)
    }

    /// The runtime a new pod's listeners accept on: the workers in turn.
    pub fn for_listeners(&self) -> &Handle {
        let index = self.next_listener.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        &self.workers[index].handle
    }

    /// Runs a connection accepted on this thread: `serve(tcp)` on the
    /// worker with the fewest connections, this one if it is among them
    /// (then the socket stays registered where it is).
    pub fn serve_connection<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let here = Self::current();
        let least = self.least_loaded();
        let chosen = match here {
            Some(here) if self.load(here) == self.load(least) => here,
            _ => least,
        };
        if here == Some(chosen) {
            // Registered with this thread's epoll already.
            self.spawn_counted(chosen, serve(tcp));
            return;
        }
        // Taken out of this thread's epoll, to be registered with the
        // chosen worker's, so that it is the one woken.
        let moved = tcp
            .into_std()
            .and_then(|tcp| self.serve_on(chosen, tcp, serve));
        if let Err(error) = moved {
            tracing::warn!(%error, "cannot move an accepted connection to a worker");
        }
    }

    /// Runs `serve(tcp)` for a connection handed over by a predecessor, on
    /// the worker with the fewest connections.
    pub fn serve_handed_over<F, Fut>(&self, tcp: std::net::TcpStream, serve: F) -> io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // A predecessor's sockets are non-blocking already; made sure of,
        // since tokio cannot drive a blocking one.
        tcp.set_nonblocking(true)?;
        self.serve_on(self.least_loaded(), tcp, serve)
    }

    /// Registers `tcp` with worker `index`'s epoll and runs `serve(tcp)`
    /// there. Registered here rather than in the task, which would then
    /// hold the socket and `serve` beside the connection's future for as
    /// long as the connection lives.
    fn serve_on<F, Fut>(&self, index: usize, tcp: std::net::TcpStream, serve: F) -> io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tcp = {
            let _on_worker = self.workers[index].handle.enter();
            TcpStream::from_std(tcp)?
        };
        self.spawn_counted(index, serve(tcp));
        Ok(())
    }

    /// Runs `task` on worker `index`, counted as one of its connections.
    fn spawn_counted<Fut>(&self, index: usize, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let worker = &self.workers[index];
        worker
            .handle
            .spawn(counted(task, Counted::new(worker.connections.clone())));
    }

    /// The worker with the fewest connections (the first of them on a tie).
    fn least_loaded(&self) -> usize {
        (0..self.workers.len())
            .min_by_key(|&index| self.load(index))
            .unwrap_or(0)
    }

    /// Connections running on worker `index`; the most possible for an
    /// index that is no worker here, so that it is never chosen.
    fn load(&self, index: usize) -> i64 {
        self.workers
            .get(index)
            .map_or(i64::MAX, |worker| worker.connections.get())
    }

    /// Connections open on each worker.
    pub fn connections(&self) -> Vec<i64> {
        self.workers
            .iter()
            .map(|worker| worker.connections.get())
            .collect()
    }
}

impl Worker {
    fn start(index: usize, connections: Gauge) -> Result<Worker, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::io("build a worker's runtime"))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("ztunnel-worker-{index}"))
            .spawn(move || {
                CURRENT.with(|current| current.set(Some(index)));
                // Returns when the sender is dropped; the runtime's tasks
                // are dropped with it.
                let _ = runtime.block_on(stopped);
            })
            .map_err(Error::io("start a worker thread"))?;
        Ok(Worker {
            handle,
            connections,
            _stop: stop,
        })
    }
}

/// `task`, holding `count` until it ends (or is dropped).
///
/// Not an `async move { let _count = count; task.await }`: a future that an
/// async block captures and then awaits is stored twice in the block's
/// state (once as the captured value, once as the awaited one), and the
/// connection's future is most of the memory an idle connection costs.
fn counted<Fut>(task: Fut, count: Counted) -> impl Future<Output = ()>
where
    Fut: Future<Output = ()>,
{
    task.map(move |()| drop(count))
}

/// Counts a connection on its worker while it runs.
struct Counted(Gauge);

impl Counted {
    fn new(count: Gauge) -> Counted {
        count.inc();
        Counted(count)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connection runs on a worker thread, everything it spawns runs on
    /// that same worker, and the next connection goes to the other (idle)
    /// worker.
    #[tokio::test]
    async fn a_connection_and_its_tasks_stay_on_one_worker_and_connections_spread() {
        let workers = Workers::start(2, &Family::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        let mut served_on = Vec::new();
        for _ in 0..2 {
            let client = TcpStream::connect(address).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            workers.serve_connection(tcp, move |mut tcp| async move {
                let worker = Workers::current();
                let spawned = tokio::spawn(async { Workers::current() }).await.unwrap();
                seen.send((worker, spawned)).unwrap();
                // Open until the client goes.
                let mut byte = [0u8; 1];
                let _ = tcp.read(&mut byte).await;
            });
            let (worker, spawned) = seen_rx.recv().await.unwrap();
            assert!(worker.is_some(), "served on a worker thread");
            assert_eq!(worker, spawned, "its tasks run on its worker");
            clients.push(client);
            served_on.push(worker);
        }
        assert_ne!(
            served_on[0], served_on[1],
            "the second connection went to the idle worker"
        );
        assert_eq!(workers.connections(), vec![1, 1]);
        drop(clients);
    }

    #[tokio::test]
    async fn a_finished_connection_is_no_longer_counted() {
        let workers = Workers::start(2, &Family::default()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (handed_over, _) = listener.accept().unwrap();
        let (done, done_rx) = oneshot::channel();
        workers
            .serve_handed_over(handed_over, move |_tcp| async move {
                let _ = done.send(());
            })
            .unwrap();
        done_rx.await.unwrap();
        // The count drops once the task (and its guard) is gone.
        for _ in 0..100 {
            if workers.connections().iter().sum::<i64>() == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("still counted: {:?}", workers.connections());
    }

    /// Counting a connection costs its task the count alone: the
    /// connection's future is not stored a second time.
    #[test]
    fn counting_does_not_store_the_connection_twice() {
        let connection = async {
            let state = [7u8; 4096];
            tokio::task::yield_now().await;
            std::hint::black_box(&state);
        };
        let alone = std::mem::size_of_val(&connection);
        let count = Counted::new(Gauge::default());
        let wrapped = counted(connection, count);
        let overhead = std::mem::size_of_val(&wrapped) - alone;
        assert!(
            overhead <= 2 * std::mem::size_of::<Counted>(),
            "a {alone}-byte connection costs {overhead} bytes more when counted"
        );
    }
}
