//! Inbound HBONE (:15008): mutual TLS with the destination pod's identity,
//! then one HTTP/2 `CONNECT` stream per proxied connection.
//!
//! Each stream is first judged by [`decide`] (is the target this pod? is
//! the client's certificate still valid? does policy allow it?); the
//! verdict becomes the reply ([`hbone::Refusal`] maps to the status code) and
//! the access-log line. The connection to the app is made from inside the
//! pod's namespace with the client pod's IP as source address, so the app
//! sees its real peer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Uri};
use kanava_mesh::policy::Decision;
use kanava_mesh::ports;
use kanava_tls::PeerCertificate;
use tokio::net::TcpStream;

use super::access_log::{AccessLog, Ending, Transferred};
use super::hbone::resume::{self, Token};
use super::hbone::{self, Refusal, server};
use super::resumptions::{Binding, Parked};
use super::{CapturedPod, PodInfo, Proxy, authz, limits, socket};
use crate::metrics::{Direction, ReasonLabels, ResultLabels, Transport};
use crate::upgrade::departure::MovableGuard;
use crate::workloads::WorkloadStore;

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<CapturedPod>, tcp: TcpStream, peer: SocketAddr) {
    let max = proxy.config.max_connections_per_pod;
    let Some(_opened) = pod.connections.inbound.try_open(max) else {
        let reason = limits::over_limit(&pod, "inbound", max);
        tracing::warn!(pod = %pod.info.display_name(), %peer, %reason, "HBONE connection refused");
        socket::reset(tcp);
        return;
    };
    let permit = match proxy.handshakes.try_acquire(peer.ip(), &pod.info.uid) {
        Ok(permit) => permit,
        Err(exhausted) => {
            proxy
                .metrics
                .hbone_handshake_failures
                .get_or_create(&ReasonLabels {
                    reason: "handshake_budget",
                })
                .inc();
            tracing::warn!(pod = %pod.info.display_name(), %peer, reason = %exhausted, "HBONE connection refused: handshakes");
            socket::reset(tcp);
            return;
        }
    };
    let timeout = proxy.config.handshake_timeout;
    // Our own certificate must exist before we can present it.
    if let Err(error) = proxy.certs.get(&pod.info.identity, timeout).await {
        proxy
            .metrics
            .hbone_handshake_failures
            .get_or_create(&ReasonLabels {
                reason: "no_certificate",
            })
            .inc();
        tracing::warn!(pod = %pod.info.display_name(), %peer, %error, "cannot accept HBONE");
        socket::reset(tcp);
        return;
    }
    // Boxed: the handshake's state is large and over once it is done; the
    // task that serves the connection's streams should not carry it.
    let accepted = Box::pin(server::accept(
        &proxy.config,
        pod.hbone_tls.clone(),
        tcp,
        peer,
        timeout,
    ))
    .await;
    drop(permit);
    let server::Accepted {
        mut connection,
        client,
    } = match accepted {
        Ok(accepted) => accepted,
        Err(error) => {
            proxy
                .metrics
                .hbone_handshake_failures
                .get_or_create(&ReasonLabels { reason: "tls" })
                .inc();
            tracing::info!(pod = %pod.info.display_name(), %peer, %error, "HBONE connection refused");
            return;
        }
    };
    proxy.metrics.hbone_connections_accepted.inc();
    let client = Arc::new(Client {
        address: peer,
        certificate: client,
    });
    // Set once this ztunnel leaves: the process does not exit before the
    // connection closed (see `CLOSE_LINGER`).
    let mut going_away = None;
    loop {
        let stream = tokio::select! {
            stream = connection.accept() => stream,
            () = proxy.departure.leaving().cancelled(), if going_away.is_none() => {
                // Leaving for a successor: the client opens new streams
                // elsewhere; those already on their way are still served
                // (and moved).
                connection.graceful_shutdown();
                going_away = Some(proxy.departure.closing_connection());
                continue;
            }
        };
        let Some(stream) = stream else {
            if going_away.is_some() {
                tokio::time::sleep(CLOSE_LINGER).await;
            }
            break;
        };
        match stream {
            Ok((request, respond)) => {
                tokio::spawn(serve_stream(
                    proxy.clone(),
                    pod.clone(),
                    client.clone(),
                    request,
                    respond,
                ));
            }
            Err(error) => {
                tracing::debug!(pod = %pod.info.display_name(), %peer, %error, "HBONE connection ended");
                break;
            }
        }
    }
}

/// How long a leaving ztunnel keeps an HBONE connection's socket open
/// after HTTP/2 closed it (as long as Go's HTTP/2 server waits after its
/// final GOAWAY). HTTP/2 closes once its final GOAWAY is out and no stream
/// is left, but the client may not have read everything yet, and may still
/// send a frame or two (a window update, a reset). Closing a socket with
/// bytes unread makes the kernel reset the connection, and a client that
/// then writes fails every stream whose answer it had not yet read with a
/// broken connection: one it cannot retry, since it cannot tell whether the
/// stream was served. (The process exiting while a client has not yet
/// answered the GOAWAY would do the same, hence `Departure::closed`.)
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// How long a leaving ztunnel waits, once everything moved, for its HBONE
/// connections to close: its clients' acknowledgement of the GOAWAY, the
/// answers to the last requests, the linger.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The authenticated client of an HBONE connection.
pub struct Client {
    pub address: SocketAddr,
    pub certificate: PeerCertificate,
}

/// Why everything is refused until the first discovery snapshot arrived:
/// without policies known, admitting would mean admitting everyone.
pub const NOT_CONFIGURED: &str =
    "no configuration from the control plane yet; refusing until the first snapshot arrives";

/// Judges one `CONNECT` request to `pod`: the app address to connect to,
/// or the refusal that answers it. Checked in this order: a well-formed
/// `CONNECT` (400), a configuration from the control plane (503 until the
/// first snapshot), aimed at this pod and not at the ztunnel's own listeners
/// in it (400), a client certificate still valid (401), authorization
/// policy (401).
pub fn decide(
    store: &WorkloadStore,
    pod: &PodInfo,
    client: &Client,
    method: &Method,
    uri: &Uri,
    now: SystemTime,
) -> Result<SocketAddr, Refusal> {
    let target = server::connect_target(method, uri)?;
    if !store.is_ready() {
        return Err(Refusal::NoUpstream(NOT_CONFIGURED.into()));
    }
    if ports::is_pod_listener(target.port()) {
        return Err(Refusal::BadRequest(format!(
            "target port {} is the ztunnel's own listener; proxying to it would loop",
            target.port()
        )));
    }
    if !pod.owns(target.ip()) {
        return Err(Refusal::BadRequest(format!(
            "target {} is not an address of pod {}",
            target.ip(),
            pod.display_name()
        )));
    }
    if now >= client.certificate.not_after {
        return Err(Refusal::Unauthorized("client certificate expired".into()));
    }
    match authz::authorize(
        store,
        pod,
        Some(&client.certificate.identity),
        client.address.ip(),
        target.port(),
    ) {
        Decision::Allow => Ok(target),
        Decision::Deny { policy, reason } => Err(Refusal::Policy { policy, reason }),
    }
}

/// Judges one stream and, if it is admitted, carries it in its own task.
///
/// The request is judged here, before the task is spawned, and only what
/// the stream needs from then on goes into the task: the task lives as
/// long as the connection, and the request's method, target and headers
/// (240 bytes inline) would stay in its state all that time.
fn serve_stream(
    proxy: Arc<Proxy>,
    pod: Arc<CapturedPod>,
    client: Arc<Client>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> impl Future<Output = ()> + Send {
    let (parts, body) = request.into_parts();
    let mut log = AccessLog::start(
        &proxy.metrics,
        Direction::Inbound,
        &pod,
        client.address,
        server::target_of(&parts.uri).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
    );
    log.transport(Transport::Hbone)
        .source_identity(Some(client.certificate.identity.clone()))
        .destination_identity(Some(pod.info.identity.clone()))
        .workloads(
            proxy.workloads.find_by_ip(client.address.ip()),
            proxy.workloads.find_by_uid(&pod.info.uid),
        );
    let verdict = decide(
        &proxy.workloads,
        &pod.info,
        &client,
        &parts.method,
        &parts.uri,
        SystemTime::now(),
    )
    .and_then(|target| match resume::read_request(&parts.headers) {
        Ok(extension) => Ok((target, extension)),
        Err(error) => Err(Refusal::BadRequest(error.to_string())),
    });
    async move {
        let _open = proxy.departure.open_connection();
        // A leaving ztunnel waits for a stream being set up (connecting to
        // the app, or claiming a parked one): it moves once bridged.
        let establishing = proxy.departure.movable();
        let ending = match verdict {
            Ok((target, extension)) => match extension.resume {
                Some(token) => {
                    Box::pin(resume_and_bridge(
                        &proxy,
                        &pod,
                        &client,
                        target,
                        (token, extension.offered),
                        (body, respond, establishing),
                        &mut log,
                    ))
                    .await
                }
                None => {
                    connect_and_bridge(
                        &proxy,
                        &pod,
                        &client,
                        (target, extension.offered, establishing),
                        body,
                        respond,
                        &mut log,
                    )
                    .await
                }
            },
            Err(refusal) => {
                server::refuse(respond, &refusal);
                refused(refusal)
            }
        };
        log.finish(&proxy.metrics, ending);
    }
}

/// Connects to the app and carries the stream's bytes to it, until both
/// sides are done or a policy change refuses the connection. (An `async
/// move` block rather than an `async fn`, which would keep its arguments
/// twice in the stream's task: rust-lang/rust#62958.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
fn connect_and_bridge<'a>(
    proxy: &'a Proxy,
    pod: &'a Arc<CapturedPod>,
    client: &'a Client,
    (target, offered, establishing): (SocketAddr, bool, MovableGuard),
    body: RecvStream,
    respond: SendResponse<Bytes>,
    log: &'a mut AccessLog,
) -> impl Future<Output = Ending> + Send + 'a {
    async move {
        let upstream = socket::connect_in(
            &proxy.netns,
            &pod.netns,
            target,
            Some(client.address.ip()),
            proxy.config.connect_timeout,
        )
        .await;
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(error) => {
                let refusal = Refusal::NoUpstream(error.to_string());
                server::refuse(respond, &refusal);
                return refused(refusal);
            }
        };
        let token = offered.then(|| proxy.resumptions.issue(binding(pod, client, target)));
        let send = match server::accept_stream(respond, token) {
            Ok(send) => send,
            Err(error) => {
                if let Some(token) = token {
                    proxy.resumptions.forget(token);
                }
                return Ending::failed(format!("the client reset the stream: {error}"))
                    .code("client_reset");
            }
        };
        log.opened(&proxy.metrics);
        let stream = Bridged {
            tcp: upstream,
            send,
            recv: body,
            token,
            from_app_ended: false,
            establishing,
        };
        carry(proxy, pod, client, target, stream).await
    }
}

/// An accepted stream and its app connection, ready to be bridged.
struct Bridged {
    tcp: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: RecvStream,
    /// The hand-over token granted, if the client offered the extension.
    token: Option<Token>,
    /// The app had finished sending before (a resumed stream).
    from_app_ended: bool,
    /// Counts the stream as still to move until its bridge counts it.
    establishing: MovableGuard,
}

/// Who may resume a stream of `client` to `target` in `pod`.
fn binding(pod: &CapturedPod, client: &Client, target: SocketAddr) -> Binding {
    Binding {
        pod_uid: pod.info.uid.clone(),
        client: client.certificate.identity.clone(),
        target,
    }
}

/// Bridges a stream to its app until both sides are done, a policy change
/// refuses the connection, or the stream moves (then the app socket is
/// parked for the client's return, or handed to the successor).
async fn carry(
    proxy: &Proxy,
    pod: &Arc<CapturedPod>,
    client: &Client,
    target: SocketAddr,
    stream: Bridged,
) -> Ending {
    let registration = proxy.open.register(
        pod.clone(),
        Some(client.certificate.identity.clone()),
        client.address.ip(),
        target.port(),
    );
    let Bridged {
        tcp,
        send,
        recv,
        token,
        from_app_ended,
        establishing,
    } = stream;
    let (read, write) = tcp.into_split();
    let movable = token.map(|_| hbone::Movable {
        departure: proxy.departure.clone(),
        answer_within: MOVE_ANSWER_WITHIN,
        from_tcp_ended: from_app_ended,
    });
    let accepted = std::future::ready(Ok(hbone::Accepted { recv, token }));
    // The bridge counts itself from its first poll, within this poll.
    drop(establishing);
    let (copied, result) = tokio::select! {
        finished = hbone::bridge(read, write, send, accepted, movable) => finished,
        _ = registration.closed.cancelled() => {
            if let Some(token) = token {
                proxy.resumptions.forget(token);
            }
            // Dropping the bridge resets the HTTP/2 stream and closes the
            // connection to the app.
            return Ending::denied("closed: refused by a policy change").code("policy_change");
        }
    };
    // The TCP side is the app, the destination.
    let bytes = Transferred {
        to_destination: copied.to_tcp,
        to_source: copied.from_tcp,
    };
    match result {
        Ok(hbone::Finish::Moved(moved)) => {
            let ended = (moved.from_tcp_ended, moved.to_tcp_ended);
            let outcome = set_aside(proxy, pod, client, target, moved);
            match outcome {
                Ok(()) => {
                    tracing::debug!(pod = %pod.info.display_name(), %target, ?ended, "stream moved");
                    Ending::carried(bytes, Ok(())).code("moved")
                }
                Err(reason) => Ending::carried(bytes, Err(std::io::Error::other(reason))),
            }
        }
        Ok(hbone::Finish::Closed) => {
            if let Some(token) = token {
                proxy.resumptions.forget(token);
            }
            Ending::carried(bytes, Ok(()))
        }
        // Only a client's bridge replays; this one never returns it.
        Ok(hbone::Finish::Unprocessed(unprocessed)) => {
            socket::reset(unprocessed.tcp);
            Ending::carried(bytes, Err(std::io::Error::other("stream not processed")))
        }
        Err(error) => {
            if let Some(token) = token {
                proxy.resumptions.forget(token);
            }
            Ending::carried(bytes, Err(error.into_io()))
        }
    }
}

/// How long a client may take to answer a move before the connection is
/// drained instead.
const MOVE_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How long a resume waits for a stream that is still moving or still
/// being handed over by a predecessor.
const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// Parks a moved stream's app socket for its client, or hands it to the
/// successor when this ztunnel is leaving.
fn set_aside(
    proxy: &Proxy,
    pod: &CapturedPod,
    client: &Client,
    target: SocketAddr,
    moved: hbone::MovedTcp,
) -> Result<(), String> {
    let tcp = moved
        .tcp
        .into_std()
        .map_err(|error| format!("cannot set the app connection aside: {error}"))?;
    let parked = Parked {
        binding: binding(pod, client, target),
        tcp,
        client_address: client.address,
        from_app_ended: moved.from_tcp_ended,
        to_app_ended: moved.to_tcp_ended,
        since: Instant::now(),
    };
    if proxy.departure.is_leaving() {
        proxy.resumptions.forget(moved.token);
        return proxy.departure.hand_over_parked(moved.token, parked);
    }
    proxy.resumptions.park(moved.token, parked);
    Ok(())
}

/// Continues a parked stream on this new `CONNECT`, if its token is the
/// client's to use.
async fn resume_and_bridge(
    proxy: &Proxy,
    pod: &Arc<CapturedPod>,
    client: &Client,
    target: SocketAddr,
    (token, offered): (Token, bool),
    (body, respond, establishing): (RecvStream, SendResponse<Bytes>, MovableGuard),
    log: &mut AccessLog,
) -> Ending {
    let claimant = binding(pod, client, target);
    let parked = match proxy.resumptions.claim(token, &claimant, CLAIM_WAIT).await {
        Ok(parked) => parked,
        Err(refusal) if proxy.departure.is_leaving() => {
            // A client that reached us just before our listeners closed:
            // the stream it asks for went (or goes) to our successor. 503
            // has it ask again, on a new connection, which reaches it.
            tracing::debug!(pod = %pod.info.display_name(), ?token, reason = %refusal, "resume sent on to the successor");
            let refusal = Refusal::NoUpstream("this ztunnel is leaving; ask again".into());
            server::refuse(respond, &refusal);
            // Not a failure of the connection: it goes on at the successor.
            return Ending::not_carried(false, refusal.reason()).code("resume_elsewhere");
        }
        Err(refusal) => {
            proxy
                .metrics
                .resumes
                .get_or_create(&ResultLabels {
                    result: refusal.code(),
                })
                .inc();
            tracing::warn!(
                pod = %pod.info.display_name(),
                client = %client.certificate.identity,
                peer = %client.address,
                %target,
                ?token,
                reason = %refusal,
                "resume refused"
            );
            let refusal = Refusal::Unauthorized(format!("resume refused: {refusal}"));
            server::refuse(respond, &refusal);
            return Ending::denied(refusal.reason()).code("resume_refused");
        }
    };
    proxy
        .metrics
        .resumes
        .get_or_create(&ResultLabels { result: "resumed" })
        .inc();
    let tcp = match TcpStream::from_std(parked.tcp) {
        Ok(tcp) => tcp,
        Err(error) => {
            let refusal =
                Refusal::NoUpstream(format!("the parked connection is unusable: {error}"));
            server::refuse(respond, &refusal);
            return refused(refusal);
        }
    };
    let new_token = offered.then(|| proxy.resumptions.issue(claimant));
    let send = match server::accept_stream(respond, new_token) {
        Ok(send) => send,
        Err(error) => {
            socket::reset(tcp);
            return Ending::failed(format!("the client reset the resumed stream: {error}"))
                .code("client_reset");
        }
    };
    log.opened(&proxy.metrics);
    let stream = Bridged {
        tcp,
        send,
        recv: body,
        token: new_token,
        from_app_ended: parked.from_app_ended,
        establishing,
    };
    carry(proxy, pod, client, target, stream).await
}

/// The access-log ending of a refused stream.
fn refused(refusal: Refusal) -> Ending {
    let ending = Ending::not_carried(refusal.is_denial(), refusal.reason()).code(refusal.code());
    match refusal.policy() {
        Some(policy) => ending.policy(policy),
        None => ending,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kanava_mesh::policy::{Action, Rule};

    use super::*;
    use crate::proxy::test_support::{identity, pod_info, policy, store, workload};

    fn client(sa: &str, valid_for: Duration) -> Client {
        Client {
            address: "10.244.1.2:40000".parse().expect("address"),
            certificate: PeerCertificate {
                identity: identity("shop", sa),
                not_after: SystemTime::now() + valid_for,
            },
        }
    }

    fn connect(target: &str) -> (Method, Uri) {
        (Method::CONNECT, target.parse().expect("uri"))
    }

    /// How pod shop/web (10.244.2.3) answers `CONNECT target` at `at` from
    /// the service account `sa`, whose certificate is valid for a minute.
    fn verdict(
        store: &WorkloadStore,
        sa: &str,
        target: &str,
        at: SystemTime,
    ) -> Result<SocketAddr, Refusal> {
        let (method, uri) = connect(target);
        let client = client(sa, Duration::from_secs(60));
        decide(
            store,
            &pod_info("web", "10.244.2.3"),
            &client,
            &method,
            &uri,
            at,
        )
    }

    #[test]
    fn a_connect_to_this_pod_without_policies_is_admitted() {
        let store = store(&[workload("web", "10.244.2.3")], &[], &[]);
        assert_eq!(
            verdict(&store, "client", "10.244.2.3:8080", SystemTime::now()),
            Ok("10.244.2.3:8080".parse().expect("address"))
        );
    }

    #[test]
    fn nothing_is_admitted_before_the_first_snapshot() {
        let unconfigured = WorkloadStore::new();
        assert_eq!(
            verdict(
                &unconfigured,
                "client",
                "10.244.2.3:8080",
                SystemTime::now()
            ),
            Err(Refusal::NoUpstream(NOT_CONFIGURED.into())),
            "503 until the first snapshot, whatever the policies will say"
        );
    }

    #[test]
    fn a_pod_discovery_does_not_know_is_refused_under_selective_policies() {
        let mut only_frontend = (*policy(
            "shop",
            "web-from-frontend",
            Action::Allow,
            vec![Rule::default()],
        ))
        .clone();
        only_frontend.selector = Some([("app".to_string(), "web".to_string())].into());
        // web is captured, but discovery has not described it yet.
        let store = store(&[], &[], &[std::sync::Arc::new(only_frontend)]);
        let verdict = verdict(&store, "frontend", "10.244.2.3:8080", SystemTime::now());
        assert!(
            matches!(&verdict, Err(Refusal::Policy { reason, .. }) if reason.contains("not yet described")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_target_of_another_pod_is_a_bad_request() {
        let store = store(&[], &[], &[]);
        let verdict = verdict(&store, "client", "10.244.2.4:8080", SystemTime::now());
        assert!(
            matches!(&verdict, Err(Refusal::BadRequest(reason)) if reason.contains("10.244.2.4")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_target_on_the_ztunnels_own_listeners_is_a_bad_request() {
        let store = store(&[workload("web", "10.244.2.3")], &[], &[]);
        for target in ["10.244.2.3:15001", "10.244.2.3:15006", "10.244.2.3:15008"] {
            let verdict = verdict(&store, "client", target, SystemTime::now());
            assert!(
                matches!(&verdict, Err(Refusal::BadRequest(reason)) if reason.contains("loop")),
                "{target}: {verdict:?}"
            );
        }
    }

    #[test]
    fn an_expired_client_certificate_is_unauthorized_even_without_policies() {
        let store = store(&[], &[], &[]);
        let at = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(
            verdict(&store, "client", "10.244.2.3:8080", at),
            Err(Refusal::Unauthorized("client certificate expired".into()))
        );
    }

    #[test]
    fn policy_decides_with_the_certificate_identity() {
        let allow_frontend = policy(
            "shop",
            "only-frontend",
            Action::Allow,
            vec![Rule {
                from: vec![crate::proxy::test_support::from_principals(&[
                    "cluster.local/ns/shop/sa/frontend",
                ])],
                to: vec![],
            }],
        );
        let store = store(&[workload("web", "10.244.2.3")], &[], &[allow_frontend]);
        let pod = pod_info("web", "10.244.2.3");
        let (method, uri) = connect("10.244.2.3:8080");
        let now = SystemTime::now();
        let minute = Duration::from_secs(60);
        assert!(
            decide(
                &store,
                &pod,
                &client("frontend", minute),
                &method,
                &uri,
                now
            )
            .is_ok()
        );
        let verdict = decide(&store, &pod, &client("batch", minute), &method, &uri, now);
        assert!(
            matches!(&verdict, Err(Refusal::Policy { policy, reason }) if reason.contains("only-frontend") && policy.contains("only-frontend")),
            "{verdict:?}"
        );
        assert_eq!(
            verdict.map_err(|r| r.status().as_u16()),
            Err(401),
            "a policy refusal is answered 401"
        );
    }
}
