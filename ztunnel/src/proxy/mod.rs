//! The data path.
//!
//! ```text
//!  pod netns                                   pod netns
//!  app ─► :15001 outbound ══ HBONE (mTLS, HTTP/2 CONNECT) ══► :15008 inbound ─► app
//!             └─ not in the mesh: plain TCP passthrough        :15006 plaintext → refused
//! ```
//!
//! Each captured pod has its three listeners, all created inside its own
//! network namespace. A connection therefore arrives already knowing which
//! pod it belongs to, and the proxy never has to trust a source address to
//! decide whose identity to use.
//!
//! Every handler first decides, then acts: [`route`] (outbound),
//! [`inbound::decide`] and [`plaintext::decide`] are pure functions of the
//! mesh state, the pod and the connection; the handlers carry the verdict
//! out and write one [`access_log`] line at one place.
//!
//! - [`outbound`], [`inbound`], [`plaintext`]: the three listeners' handlers;
//! - [`hbone`]: the protocol (client, server, reply codes, byte bridge);
//! - [`pool`]: outbound HBONE connections, shared by streams;
//! - [`authz`]: policy at the destination, and re-judging open connections;
//! - [`socket`], [`chunks`]: sockets inside pods, the plain TCP copy.

pub mod access_log;
pub mod authz;
mod chunks;
pub mod handshakes;
pub mod hbone;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod resumptions;
pub mod route;
pub mod socket;
#[cfg(test)]
pub(crate) mod test_support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::trust::Trust;
use kanava_mesh::Identity;
use kanava_netns::{NetNs, NetNsSwitch};
use kanava_tls::rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::certs::CertManager;
use crate::metrics::Metrics;
use crate::upgrade::departure::Departure;
use crate::workers::Workers;
use crate::workloads::WorkloadStore;
use crate::{Config, Error};

/// Who a captured pod is: all that routing and authorization decide on,
/// and nothing to do I/O with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
}

/// A pod whose traffic this ztunnel carries.
#[derive(Debug)]
pub struct CapturedPod {
    pub info: PodInfo,
    pub netns: Arc<NetNs>,
    /// TLS server configuration presenting this pod's identity on :15008.
    pub hbone_tls: Arc<ServerConfig>,
    /// Its connections open through this ztunnel, bounded per direction.
    pub connections: limits::PodConnections,
}

impl PodInfo {
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn owns(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.ips.contains(&ip)
    }
}

/// The listeners of one pod, created inside its namespace.
pub struct PodListeners {
    pub outbound: std::net::TcpListener,
    pub inbound_plaintext: std::net::TcpListener,
    pub hbone: std::net::TcpListener,
}

/// Everything the data path shares.
pub struct Proxy {
    pub config: Arc<Config>,
    pub workloads: Arc<WorkloadStore>,
    pub certs: Arc<CertManager>,
    pub pool: pool::Pool,
    pub netns: NetNsSwitch,
    /// What peers' certificates must chain to, and the mesh's signer.
    pub trust: Arc<Trust>,
    pub metrics: Arc<Metrics>,
    /// Inbound connections in progress, re-judged on every policy change.
    pub open: authz::OpenConnections,
    /// Resume tokens of inbound streams, and the streams parked under them.
    pub resumptions: resumptions::Resumptions,
    /// Whether this ztunnel is handing its connections to a successor.
    pub departure: Arc<Departure>,
    /// The threads connections run on ([`crate::workers`]).
    pub workers: Arc<Workers>,
    handshakes: handshakes::Handshakes,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        workloads: Arc<WorkloadStore>,
        certs: Arc<CertManager>,
        trust: Arc<Trust>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        Ok(Proxy {
            pool: pool::Pool::new(
                config.max_streams_per_connection as usize,
                config.pool_idle_timeout,
            ),
            handshakes: handshakes::Handshakes::new(handshakes::Limits {
                node: config.max_pending_handshakes,
                per_source: config.max_pending_handshakes_per_source,
                per_pod: config.max_pending_handshakes_per_pod,
            }),
            open: authz::OpenConnections::default(),
            resumptions: resumptions::Resumptions::default(),
            departure: Arc::new(Departure::default()),
            workers: Arc::new(Workers::start(
                config.worker_threads,
                &metrics.worker_connections,
            )?),
            netns: NetNsSwitch::new()?,
            config,
            workloads,
            certs,
            trust,
            metrics,
        })
    }

    /// Starts accepting on a pod's listeners until `stop` is cancelled, on
    /// one of the workers, and returns that worker's runtime: what else the
    /// pod starts (its warm-up) belongs there too. Connections already
    /// accepted run to completion.
    pub fn serve_pod(
        self: &Arc<Self>,
        pod: Arc<CapturedPod>,
        listeners: PodListeners,
        stop: CancellationToken,
    ) -> Result<Handle, Error> {
        let worker = self.workers.for_listeners().clone();
        // Registered with that worker's epoll, so that it is the one woken.
        let _on_worker = worker.enter();
        let listen = |listener: std::net::TcpListener| {
            TcpListener::from_std(listener).map_err(Error::io("register pod listener"))
        };
        let outbound = listen(listeners.outbound)?;
        let plaintext = listen(listeners.inbound_plaintext)?;
        let hbone = listen(listeners.hbone)?;

        let proxy = self.clone();
        let for_pod = pod.clone();
        // The outbound listener's callers are the pod's own applications;
        // the other two listeners' callers come over the network.
        worker.spawn(accept_loop(
            outbound,
            Peer::Local,
            self.workers.clone(),
            stop.clone(),
            move |stream, peer| outbound::handle(proxy.clone(), for_pod.clone(), stream, peer),
        ));
        let proxy = self.clone();
        let for_pod = pod.clone();
        worker.spawn(accept_loop(
            plaintext,
            Peer::Remote,
            self.workers.clone(),
            stop.clone(),
            move |stream, peer| plaintext::handle(proxy.clone(), for_pod.clone(), stream, peer),
        ));
        let proxy = self.clone();
        worker.spawn(accept_loop(
            hbone,
            Peer::Remote,
            self.workers.clone(),
            stop,
            move |stream, peer| inbound::handle(proxy.clone(), pod.clone(), stream, peer),
        ));
        Ok(worker.clone())
    }

    /// Re-judges open inbound connections after every configuration update.
    pub async fn recheck_on_changes(self: Arc<Self>, stop: CancellationToken) {
        let mut updates = self.workloads.subscribe();
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let closed = self.open.recheck(&self.workloads);
                    if closed > 0 {
                        tracing::info!(closed, "closed connections refused by the new configuration");
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Closes idle pooled connections every so often.
    pub async fn evict_idle_connections(self: Arc<Self>, stop: CancellationToken) {
        let period =
            (self.pool.idle_timeout() / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {
                    let evicted = self.pool.evict_idle();
                    if evicted > 0 {
                        tracing::debug!(evicted, "closed idle HBONE connections");
                    }
                    let expired = self.resumptions.expire();
                    if expired > 0 {
                        tracing::warn!(expired, "moved connections whose clients never came back were reset");
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

use socket::Peer;

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    peers: Peer,
    workers: Arc<Workers>,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                if peers == Peer::Remote {
                    socket::keep_alive(&stream);
                }
                let peer = socket::canonical(peer);
                workers.serve_connection(stream, |stream| handle(stream, peer));
            }
            Err(error) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
