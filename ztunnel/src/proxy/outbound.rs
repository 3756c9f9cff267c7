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

use kanava_mesh::{Identity, ports};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::access_log::{AccessLog, Ending, Transferred};
use super::hbone::{self, BridgeError, Finish, client::Reply, client::Stream};
use super::pool::{PoolKey, StreamSlot};
use super::route::{Hop, Route, route};
use super::{CapturedPod, Proxy, chunks, limits, socket};
use crate::Error;
use crate::metrics::Direction;
use crate::upgrade::protocol::{Message, MovedClient};

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
        let key = PoolKey::from_here(&pod.info, destination, address);
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
        let _open = proxy.departure.open_connection();
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
        // A leaving ztunnel waits for a connection being set up: it moves
        // once its stream is accepted.
        let establishing = proxy.departure.movable();
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
        let from = Origin {
            peer,
            original_destination: destination,
        };
        // The bridge counts itself from its first poll, within this poll.
        drop(establishing);
        let ending = relay(&proxy, &pod, client, upstream, from, &mut log).await;
        log.finish(&proxy.metrics, ending);
    }
}

/// Where a proxied connection came from and where its app meant to go.
#[derive(Clone, Copy, Debug)]
struct Origin {
    peer: SocketAddr,
    original_destination: SocketAddr,
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
    // On demand, a destination not known yet is asked for first; without
    // an answer the connection is refused, not sent as if outside the mesh.
    if proxy.workloads.needs_learning(destination.ip())
        && !proxy
            .workloads
            .learn(destination.ip(), proxy.config.connect_timeout)
            .await
    {
        return Err(Ending::failed(
            "the control plane has not said what this address is (is it reachable from this node?)",
        )
        .code("not_learned"));
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
        lane: Lane,
        stream: Stream,
    },
    /// A stream whose `CONNECT` is on its way; its answer comes while the
    /// client's bytes already flow.
    HboneAnswerLater {
        lane: Lane,
        send: h2::SendStream<bytes::Bytes>,
        reply: Reply,
    },
    Tcp(TcpStream),
}

/// Where an HBONE stream runs: the pooled connection's slot, and what a
/// move needs to ask again (the destination's identity and the `CONNECT`
/// target; the pool key is rebuilt from them only then).
struct Lane {
    slot: StreamSlot,
    destination: Identity,
    target: SocketAddr,
}

impl Lane {
    /// The pool key of this lane's connections from `pod`.
    fn key(&self, pod: &CapturedPod) -> PoolKey {
        PoolKey::from_here(
            &pod.info,
            self.destination.clone(),
            SocketAddr::new(self.target.ip(), ports::HBONE),
        )
    }
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
            let key = PoolKey::from_here(
                &pod.info,
                workload.identity.clone(),
                SocketAddr::new(address.ip(), ports::HBONE),
            );
            let mut attempt = 0;
            loop {
                attempt += 1;
                let slot = checkout(proxy, pod, &key, &cert).await?;
                let lane = Lane {
                    slot,
                    destination: key.destination.clone(),
                    target: *address,
                };
                let opened = if answer == Answer::Later {
                    match hbone::client::send_connect(&lane.slot, key.address, *address, None).await
                    {
                        Ok((send, reply)) => Ok(Upstream::HboneAnswerLater { send, reply, lane }),
                        Err(error) => {
                            // Else the next attempt finds the same one.
                            lane.slot.retire_if(&error);
                            Err(error)
                        }
                    }
                } else {
                    match hbone::client::open_stream(
                        &lane.slot,
                        key.address,
                        *address,
                        None,
                        timeout,
                    )
                    .await
                    {
                        Ok(stream) => Ok(Upstream::Hbone { lane, stream }),
                        Err(error) => {
                            lane.slot.retire_if(&error);
                            Err(error)
                        }
                    }
                };
                match opened {
                    // The pooled connection's peer is leaving (GOAWAY):
                    // nothing was sent, so another connection may carry it.
                    Err(error) if error.is_going_away() && attempt < MAX_GOAWAY_RETRIES => {
                        continue;
                    }
                    result => return result,
                }
            }
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

/// Tries on another connection this often when pooled ones turn out to be
/// going away.
const MAX_GOAWAY_RETRIES: usize = 4;

/// A stream slot on a pooled connection for `key`, opening one if needed.
async fn checkout(
    proxy: &Proxy,
    pod: &CapturedPod,
    key: &PoolKey,
    cert: &kanava_tls::WorkloadCert,
) -> Result<StreamSlot, Error> {
    let timeout = proxy.config.connect_timeout;
    tokio::time::timeout(
        timeout,
        proxy.pool.checkout(key, || {
            Box::pin(hbone::client::connect(proxy, pod, key, cert.clone()))
        }),
    )
    .await
    .map_err(|_| Error::ConnectTimeout {
        destination: key.address,
        after: timeout,
    })?
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
    proxy: &'a Arc<Proxy>,
    pod: &'a Arc<CapturedPod>,
    client: TcpStream,
    upstream: Upstream,
    from: Origin,
    log: &'a mut AccessLog,
) -> impl Future<Output = Ending> + Send + 'a {
    // An `async move` block, not an `async fn`, for the reason `handle` gives.
    async move {
        let (lane, copied, result) = match upstream {
            Upstream::Hbone { lane, stream } => {
                log.opened(&proxy.metrics);
                let (read, write) = client.into_split();
                let accepted = std::future::ready(Ok(hbone::Accepted {
                    recv: stream.recv,
                    token: stream.token,
                }));
                let movable = movable(proxy, false);
                let (copied, result) =
                    hbone::bridge(read, write, stream.send, accepted, Some(movable)).await;
                (lane, copied, result)
            }
            Upstream::HboneAnswerLater {
                mut lane,
                mut send,
                mut reply,
            } => {
                let mut client = client;
                let mut replay = hbone::Replay::default();
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let (read, write) = client.into_split();
                    let timeout = proxy.config.connect_timeout;
                    // Boxed: the wait for the answer (its timer included) is
                    // over after the first round trip; the task that lives as
                    // long as the connection should not carry it.
                    let accepted = Box::pin(async {
                        let accepted = reply.accepted(timeout).await.map_err(Box::new)?;
                        log.opened(&proxy.metrics);
                        Ok(accepted)
                    });
                    let movable = movable(proxy, false);
                    let (copied, result) = hbone::bridge_replayable(
                        read,
                        write,
                        send,
                        accepted,
                        Some(movable),
                        replay,
                    )
                    .await;
                    match result {
                        // The peer went away before it took the stream
                        // (its GOAWAY crossed our CONNECT): the same bytes
                        // go on another connection.
                        Ok(Finish::Unprocessed(unprocessed)) if attempt < MAX_GOAWAY_RETRIES => {
                            lane.slot.retire();
                            client = unprocessed.tcp;
                            replay = unprocessed.replay;
                            match Box::pin(reconnect(proxy, pod, &lane)).await {
                                Ok((again, stream, answer)) => {
                                    (lane, send, reply) = (again, stream, answer);
                                }
                                Err(error) => {
                                    socket::reset(client);
                                    return failure(error);
                                }
                            }
                        }
                        result => break (lane, copied, result),
                    }
                }
            }
            Upstream::Tcp(mut tcp) => {
                log.opened(&proxy.metrics);
                let mut client = client;
                let (bytes, result) = chunks::copy_tcp(&mut client, &mut tcp).await;
                return Ending::carried(bytes, result);
            }
        };
        let carried = transferred(copied);
        match result {
            Ok(Finish::Moved(moved)) => {
                // Boxed: only a connection that moves needs this state.
                Box::pin(moved_on(proxy, pod, lane, moved, from, carried)).await
            }
            result => hbone_ending(carried, result),
        }
    }
}

/// Sends the `CONNECT` of `lane` again, on a connection that is not going
/// away, without waiting for the answer.
async fn reconnect(
    proxy: &Proxy,
    pod: &CapturedPod,
    lane: &Lane,
) -> Result<(Lane, h2::SendStream<bytes::Bytes>, Reply), Error> {
    let key = lane.key(pod);
    let cert = proxy
        .certs
        .get(&pod.info.identity, proxy.config.connect_timeout)
        .await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let slot = checkout(proxy, pod, &key, &cert).await?;
        match hbone::client::send_connect(&slot, key.address, lane.target, None).await {
            Ok((send, reply)) => {
                let lane = Lane {
                    slot,
                    destination: key.destination.clone(),
                    target: lane.target,
                };
                return Ok((lane, send, reply));
            }
            Err(error) => {
                slot.retire_if(&error);
                if !(error.is_going_away() && attempt < MAX_GOAWAY_RETRIES) {
                    return Err(error);
                }
            }
        }
    }
}

/// How long a peer may take to answer a move before the connection is
/// drained instead.
const MOVE_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

fn movable(proxy: &Proxy, from_tcp_ended: bool) -> hbone::Movable {
    hbone::Movable {
        departure: proxy.departure.clone(),
        answer_within: MOVE_ANSWER_WITHIN,
        from_tcp_ended,
    }
}

/// The client's bytes, counted from the TCP side (the client's).
fn transferred(copied: hbone::Copied) -> Transferred {
    Transferred {
        to_destination: copied.from_tcp,
        to_source: copied.to_tcp,
    }
}

/// Goes on with a connection whose stream moved: hands it to the successor
/// when this ztunnel is leaving, else asks the destination again for the
/// parked stream, as often as it moves.
async fn moved_on(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    lane: Lane,
    mut moved: hbone::MovedTcp,
    from: Origin,
    mut carried: Transferred,
) -> Ending {
    let key = lane.key(pod);
    let Lane { slot, target, .. } = lane;
    // Whichever side is leaving, this connection's peer takes no new
    // streams from us any more.
    slot.retire();
    drop(slot);
    loop {
        if proxy.departure.is_leaving() {
            let message = Message::Client(MovedClient {
                pod_uid: pod.info.uid.clone(),
                token: moved.token.to_string(),
                original_destination: from.original_destination,
                target,
                destination_identity: key.destination.to_string(),
                peer: from.peer,
                from_app_ended: moved.from_tcp_ended,
                to_app_ended: moved.to_tcp_ended,
            });
            return match proxy.departure.hand_over(message, moved.tcp) {
                Ok(()) => moved_ending(carried),
                Err(reason) => Ending::carried(carried, Err(std::io::Error::other(reason))),
            };
        }
        let (slot, stream) = match resume_stream(proxy, pod, &key, target, moved.token).await {
            Ok(resumed) => resumed,
            Err(error) => {
                tracing::warn!(pod = %pod.info.display_name(), %target, %error, "moved connection could not be resumed; resetting it");
                socket::reset(moved.tcp);
                return Ending::carried(carried, Err(std::io::Error::other(error)));
            }
        };
        proxy.metrics.resumed_streams.inc();
        let (read, write) = moved.tcp.into_split();
        let accepted = std::future::ready(Ok(hbone::Accepted {
            recv: stream.recv,
            token: stream.token,
        }));
        let movable = movable(proxy, moved.from_tcp_ended);
        let (copied, result) =
            hbone::bridge(read, write, stream.send, accepted, Some(movable)).await;
        let more = transferred(copied);
        carried.to_destination += more.to_destination;
        carried.to_source += more.to_source;
        match result {
            Ok(Finish::Moved(again)) => {
                slot.retire();
                moved = again;
            }
            result => return hbone_ending(carried, result),
        }
    }
}

/// The access-log ending of a connection handed to the successor.
fn moved_ending(carried: Transferred) -> Ending {
    Ending::carried(carried, Ok(())).code("handed_over")
}

/// How long a moved connection may take to find its stream again.
const RESUME_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the destination for the parked stream of `token`, on a connection
/// that is not going away.
async fn resume_stream(
    proxy: &Proxy,
    pod: &CapturedPod,
    key: &PoolKey,
    target: SocketAddr,
    token: hbone::resume::Token,
) -> Result<(StreamSlot, Stream), Error> {
    let timeout = proxy.config.connect_timeout;
    let deadline = tokio::time::Instant::now() + RESUME_WITHIN;
    let cert = proxy.certs.get(&pod.info.identity, timeout).await?;
    loop {
        let attempt = async {
            let slot = checkout(proxy, pod, key, &cert).await?;
            match hbone::client::open_stream(&slot, key.address, target, Some(token), timeout).await
            {
                Ok(stream) => Ok((slot, stream)),
                Err(error) => {
                    // The next try goes on a fresh connection: this one may
                    // lead to a ztunnel that is leaving.
                    slot.retire();
                    Err(error)
                }
            }
        };
        match attempt.await {
            Ok(resumed) => return Ok(resumed),
            // Refused on purpose: a token is used once, so no retry.
            Err(error) if error.is_denial() => return Err(error),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%target, %error, "resuming a moved connection; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Resumes a connection a predecessor handed over: the client's socket and
/// the token of its parked stream at the destination.
pub async fn resume_handed_over(
    proxy: Arc<Proxy>,
    pod: Arc<CapturedPod>,
    moved: MovedClient,
    tcp: TcpStream,
) {
    let _open = proxy.departure.open_connection();
    let token = match crate::upgrade::protocol::token(&moved.token) {
        Ok(token) => token,
        Err(error) => {
            tracing::warn!(pod = %pod.info.display_name(), %error, "handed-over connection refused");
            socket::reset(tcp);
            return;
        }
    };
    let destination: kanava_mesh::Identity = match moved.destination_identity.parse() {
        Ok(identity) => identity,
        Err(error) => {
            tracing::warn!(pod = %pod.info.display_name(), %error, "handed-over connection refused");
            socket::reset(tcp);
            return;
        }
    };
    let mut log = AccessLog::start(
        &proxy.metrics,
        Direction::Outbound,
        &pod,
        moved.peer,
        moved.original_destination,
    );
    log.source_identity(Some(pod.info.identity.clone()))
        .destination_identity(Some(destination.clone()))
        .transport(crate::metrics::Transport::Hbone)
        .workloads(
            proxy.workloads.find_by_uid(&pod.info.uid),
            proxy.workloads.find_by_ip(moved.target.ip()),
        );
    let key = PoolKey::from_here(
        &pod.info,
        destination,
        SocketAddr::new(moved.target.ip(), ports::HBONE),
    );
    let (slot, stream) = match resume_stream(&proxy, &pod, &key, moved.target, token).await {
        Ok(resumed) => resumed,
        Err(error) => {
            tracing::warn!(pod = %pod.info.display_name(), target = %moved.target, %error, "handed-over connection could not be resumed; resetting it");
            socket::reset(tcp);
            log.finish(
                &proxy.metrics,
                Ending::failed(format!("not resumed after the hand-over: {error}"))
                    .code("resume_failed"),
            );
            return;
        }
    };
    proxy.metrics.resumed_streams.inc();
    log.opened(&proxy.metrics);
    let (read, write) = tcp.into_split();
    let accepted = std::future::ready(Ok(hbone::Accepted {
        recv: stream.recv,
        token: stream.token,
    }));
    let (copied, result) = hbone::bridge(
        read,
        write,
        stream.send,
        accepted,
        Some(movable(&proxy, moved.from_app_ended)),
    )
    .await;
    let carried = transferred(copied);
    let lane = Lane {
        slot,
        destination: key.destination,
        target: moved.target,
    };
    let from = Origin {
        peer: moved.peer,
        original_destination: moved.original_destination,
    };
    let ending = match result {
        Ok(Finish::Moved(again)) => {
            Box::pin(moved_on(&proxy, &pod, lane, again, from, carried)).await
        }
        result => hbone_ending(carried, result),
    };
    log.finish(&proxy.metrics, ending);
}

fn hbone_ending(bytes: Transferred, result: Result<Finish, BridgeError>) -> Ending {
    match result {
        Err(BridgeError::NotAccepted(error)) => failure(*error),
        Ok(Finish::Moved(moved)) => {
            // Callers hand moved connections on; one that reaches here had
            // nowhere to go.
            socket::reset(moved.tcp);
            Ending::carried(
                bytes,
                Err(std::io::Error::other("moved with nowhere to go")),
            )
        }
        Ok(Finish::Unprocessed(unprocessed)) => {
            // Tried on other connections as often as allowed.
            socket::reset(unprocessed.tcp);
            Ending::failed(format!(
                "every HBONE connection tried went away before taking the stream; the last: {}",
                unprocessed.error
            ))
            .code("connect_failed")
        }
        Ok(Finish::Closed) => Ending::carried(bytes, Ok(())),
        Err(BridgeError::Io(error)) => Ending::carried(bytes, Err(error)),
    }
}
