//! Outbound (:15001): a connection an enrolled pod opened, redirected here.
//!
//! First [`route`](super::route::route) decides where it goes (a Service's
//! endpoints, HBONE to a workload, passthrough, or a refusal); then this
//! module carries the decision out: connect (trying the next endpoint of a
//! Service when one refuses), copy the bytes, and write one access-log line.
//!
//! To a pod's own address the client's first bytes follow the `CONNECT`
//! at once, without waiting a round trip for its answer: there is no other
//! endpoint to try if it is refused. Through a Service the answer is
//! awaited first, so that a refusal can still be retried at another
//! endpoint with nothing of the client's lost.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use kanava_mesh::ports;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::access_log::{AccessLog, Ending, Transferred};
use super::hbone::{self, BridgeError, client::Reply, client::Stream};
use super::pool::{PoolKey, StreamSlot};
use super::route::{Hop, Route, route};
use super::{CapturedPod, Proxy, chunks, limits, socket};
use crate::Error;
use crate::metrics::Direction;

/// Most endpoints tried for one connection to a Service.
const MAX_ENDPOINT_ATTEMPTS: usize = 5;

/// Most HBONE connections opened ahead for a newly captured pod.
const WARM_DESTINATIONS: usize = 8;

/// Opens HBONE connections for a newly captured pod ahead of its first
/// connection, to where other pods of the same identity on this node are
/// connected: a new replica of a workload most likely talks to the same
/// peers, and its first request then finds the TLS handshake done. Each
/// connection is closed after the pool's idle timeout if nothing uses it,
/// and at once when the pod is released (`released`): a pod that comes and
/// goes quickly (a Job, a crash loop) must not leave connections behind.
pub async fn warm_up(proxy: Arc<Proxy>, pod: Arc<CapturedPod>, released: CancellationToken) {
    tokio::select! {
        () = warm_up_until_done(&proxy, &pod) => {}
        () = released.cancelled() => {}
    }
    if released.is_cancelled() {
        // Whatever was opened before the release noticed it.
        proxy.pool.remove_pod(&pod.info.uid);
    }
}

async fn warm_up_until_done(proxy: &Arc<Proxy>, pod: &Arc<CapturedPod>) {
    let destinations =
        proxy
            .pool
            .destinations_of(&pod.info.identity, &pod.info.uid, WARM_DESTINATIONS);
    if destinations.is_empty() {
        return;
    }
    let timeout = proxy.config.connect_timeout;
    let cert = match proxy.certs.get(&pod.info.identity, timeout).await {
        Ok(cert) => cert,
        Err(error) => {
            tracing::debug!(pod = %pod.info.display_name(), %error, "no warm-up: no certificate yet");
            return;
        }
    };
    let warmed = destinations.into_iter().map(|(destination, address)| {
        let key = PoolKey {
            source_pod: pod.info.uid.clone(),
            source: pod.info.identity.clone(),
            destination,
            address,
        };
        let cert = cert.clone();
        async move {
            let opened = tokio::time::timeout(
                timeout,
                proxy.pool.warm(&key, || {
                    Box::pin(hbone::client::connect(proxy, pod, &key, cert))
                }),
            )
            .await;
            match opened {
                Ok(Ok(true)) => {
                    tracing::debug!(pod = %pod.info.display_name(), address = %key.address, "HBONE connection opened ahead");
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::debug!(pod = %pod.info.display_name(), address = %key.address, %error, "HBONE warm-up failed");
                }
                Err(_) => {
                    tracing::debug!(pod = %pod.info.display_name(), address = %key.address, "HBONE warm-up timed out");
                }
            }
        }
    });
    futures::future::join_all(warmed).await;
}

/// Carries one connection from start to end, in its own task.
///
/// A function returning an `async move` block rather than an `async fn`:
/// an `async fn` keeps its arguments twice in the task's state
/// (rust-lang/rust#62958), and this task lives, at its largest size, as
/// long as the connection does.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
pub fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<CapturedPod>,
    client: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    async move {
        let destination = match socket::original_destination(&client) {
            Ok(destination) => destination,
            Err(error) => {
                tracing::warn!(pod = %pod.info.display_name(), %peer, %error, "no original destination; closing");
                return;
            }
        };
        let mut log =
            AccessLog::start(&proxy.metrics, Direction::Outbound, &pod, peer, destination);
        log.source_identity(Some(pod.info.identity.clone()))
            .workloads(proxy.workloads.find_by_uid(&pod.info.uid), None);
        let max = proxy.config.max_connections_per_pod;
        let Some(_opened) = pod.connections.outbound.try_open(max) else {
            socket::reset(client);
            log.finish(
                &proxy.metrics,
                Ending::denied(limits::over_limit(&pod, "outbound", max)).code("connection_limit"),
            );
            return;
        };
        // Boxed: the set-up futures are large and over once connected; the
        // task that lives as long as the connection should not carry them.
        let upstream = match Box::pin(establish(&proxy, &pod, destination, &mut log)).await {
            Ok(upstream) => upstream,
            Err(ending) => {
                socket::reset(client);
                log.finish(&proxy.metrics, ending);
                return;
            }
        };
        let ending = relay(&proxy, client, upstream, &mut log).await;
        log.finish(&proxy.metrics, ending);
    }
}

/// Decides the route and connects along it.
async fn establish(
    proxy: &Proxy,
    pod: &CapturedPod,
    destination: SocketAddr,
    log: &mut AccessLog,
) -> Result<Upstream, Ending> {
    if !proxy.workloads.is_ready()
        && tokio::time::timeout(proxy.config.connect_timeout, proxy.workloads.wait_ready())
            .await
            .is_err()
    {
        return Err(Ending::failed(
            "no configuration from the control plane yet (is it reachable from this node?)",
        )
        .code("not_configured"));
    }
    let route = route(&proxy.workloads, &pod.info, destination);
    log.route(&route);
    match route {
        Route::Refused(refusal) => {
            let code = refusal.code();
            Err(Ending::refused(refusal.outcome(), refusal).code(code))
        }
        Route::Direct(hop) => connect(proxy, pod, &hop, Answer::Later)
            .await
            .map_err(failure),
        Route::Service { service, endpoints } => {
            via_service(proxy, pod, &service, &endpoints, log).await
        }
    }
}

/// Tries a Service's endpoints from a random one on, until one accepts.
async fn via_service(
    proxy: &Proxy,
    pod: &CapturedPod,
    service: &str,
    endpoints: &[Hop],
    log: &mut AccessLog,
) -> Result<Upstream, Ending> {
    let start = rand::random_range(0..endpoints.len());
    let attempts = endpoints.len().min(MAX_ENDPOINT_ATTEMPTS);
    let mut last = None;
    for attempt in 0..attempts {
        let hop = &endpoints[(start + attempt) % endpoints.len()];
        log.hop(hop);
        match connect(proxy, pod, hop, Answer::First).await {
            Ok(upstream) => return Ok(upstream),
            Err(error) if error.is_refused_by_destination() => {
                tracing::info!(
                    pod = %pod.info.display_name(),
                    service,
                    endpoint = %hop.address(),
                    %error,
                    "endpoint refused the connection; trying another"
                );
                last = Some(error);
            }
            Err(error) => return Err(failure(error)),
        }
    }
    Err(match last {
        Some(error) => failure(error),
        None => {
            Ending::failed(format!("no endpoint of service {service} accepted")).code("no_endpoint")
        }
    })
}

/// Whether an HBONE stream's answer is awaited before the client's bytes
/// are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Wait for it: a refusal can still be retried elsewhere.
    First,
    /// Send at once and read the answer beside the bytes.
    Later,
}

/// A connection to the destination, before any byte of the client's has
/// been sent.
enum Upstream {
    /// A stream the destination accepted.
    Hbone {
        _slot: StreamSlot,
        stream: Stream,
    },
    /// A stream whose `CONNECT` is on its way; its answer comes while the
    /// client's bytes already flow.
    HboneAnswerLater {
        _slot: StreamSlot,
        send: h2::SendStream<bytes::Bytes>,
        reply: Reply,
    },
    Tcp(TcpStream),
}

/// Connects along one hop: over HBONE, or in plain TCP from inside the
/// source pod's namespace.
async fn connect(
    proxy: &Proxy,
    pod: &CapturedPod,
    hop: &Hop,
    answer: Answer,
) -> Result<Upstream, Error> {
    match hop {
        Hop::Hbone { address, workload } => {
            let timeout = proxy.config.connect_timeout;
            let cert = proxy.certs.get(&pod.info.identity, timeout).await?;
            let key = PoolKey {
                source_pod: pod.info.uid.clone(),
                source: pod.info.identity.clone(),
                destination: workload.identity.clone(),
                address: SocketAddr::new(address.ip(), ports::HBONE),
            };
            let slot = tokio::time::timeout(
                timeout,
                proxy.pool.checkout(&key, || {
                    Box::pin(hbone::client::connect(proxy, pod, &key, cert))
                }),
            )
            .await
            .map_err(|_| Error::ConnectTimeout {
                destination: key.address,
                after: timeout,
            })??;
            if answer == Answer::Later {
                let (send, reply) =
                    hbone::client::send_connect(&slot, key.address, *address).await?;
                return Ok(Upstream::HboneAnswerLater {
                    _slot: slot,
                    send,
                    reply,
                });
            }
            let stream = hbone::client::open_stream(&slot, key.address, *address, timeout).await?;
            Ok(Upstream::Hbone {
                _slot: slot,
                stream,
            })
        }
        Hop::Passthrough { address, .. } => socket::connect_in(
            &proxy.netns,
            &pod.netns,
            *address,
            None,
            proxy.config.connect_timeout,
        )
        .await
        .map(Upstream::Tcp),
    }
}

/// What the access log says of a connection that could not be set up.
fn failure(error: Error) -> Ending {
    let code = if error.is_denial() {
        "refused_by_destination"
    } else {
        "connect_failed"
    };
    Ending::not_carried(error.is_denial(), error).code(code)
}

/// Copies between the client and the upstream until both directions end;
/// the connection counts as opened once the destination has accepted it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
fn relay<'a>(
    proxy: &'a Proxy,
    client: TcpStream,
    upstream: Upstream,
    log: &'a mut AccessLog,
) -> impl Future<Output = Ending> + Send + 'a {
    // An `async move` block, not an `async fn`, for the reason `handle` gives.
    async move {
        match upstream {
            Upstream::Hbone { _slot, stream } => {
                log.opened(&proxy.metrics);
                let (read, write) = client.into_split();
                let accepted = std::future::ready(Ok(stream.recv));
                let (copied, result) = hbone::bridge(read, write, stream.send, accepted).await;
                hbone_ending(copied, result)
            }
            Upstream::HboneAnswerLater { _slot, send, reply } => {
                let (read, write) = client.into_split();
                let timeout = proxy.config.connect_timeout;
                // Boxed: the wait for the answer (its timer included) is
                // over after the first round trip; the task that lives as
                // long as the connection should not carry it.
                let accepted = Box::pin(async {
                    let recv = reply.accepted(timeout).await.map_err(Box::new)?;
                    log.opened(&proxy.metrics);
                    Ok(recv)
                });
                let (copied, result) = hbone::bridge(read, write, send, accepted).await;
                hbone_ending(copied, result)
            }
            Upstream::Tcp(mut tcp) => {
                log.opened(&proxy.metrics);
                let mut client = client;
                let (bytes, result) = chunks::copy_tcp(&mut client, &mut tcp).await;
                Ending::carried(bytes, result)
            }
        }
    }
}

fn hbone_ending(copied: hbone::Copied, result: Result<(), BridgeError>) -> Ending {
    match result {
        Err(BridgeError::NotAccepted(error)) => failure(*error),
        result => {
            // The TCP side is the client, the originator.
            let bytes = Transferred {
                to_destination: copied.from_tcp,
                to_source: copied.to_tcp,
            };
            Ending::carried(bytes, result.map_err(BridgeError::into_io))
        }
    }
}
