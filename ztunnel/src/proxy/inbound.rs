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
use std::time::SystemTime;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Uri};
use kanava_mesh::policy::Decision;
use kanava_mesh::ports;
use kanava_tls::PeerCertificate;
use tokio::net::TcpStream;

use super::access_log::{AccessLog, Ending, Transferred};
use super::hbone::{self, Refusal, server};
use super::{CapturedPod, PodInfo, Proxy, authz, limits, socket};
use crate::metrics::{Direction, ReasonLabels, Transport};
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
    while let Some(stream) = connection.accept().await {
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
    );
    async move {
        let ending = match verdict {
            Ok(target) => {
                connect_and_bridge(&proxy, &pod, &client, target, body, respond, &mut log).await
            }
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
    target: SocketAddr,
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
        let send = match server::accept_stream(respond) {
            Ok(send) => send,
            Err(error) => {
                return Ending::failed(format!("the client reset the stream: {error}"))
                    .code("client_reset");
            }
        };
        log.opened(&proxy.metrics);
        let registration = proxy.open.register(
            pod.clone(),
            Some(client.certificate.identity.clone()),
            client.address.ip(),
            target.port(),
        );
        let (read, write) = upstream.into_split();
        tokio::select! {
            (copied, result) = hbone::bridge(read, write, send, std::future::ready(Ok(body))) => {
                // The TCP side is the app, the destination.
                let bytes = Transferred { to_destination: copied.to_tcp, to_source: copied.from_tcp };
                Ending::carried(bytes, result.map_err(hbone::BridgeError::into_io))
            }
            _ = registration.closed.cancelled() => {
                // Dropping the bridge resets the HTTP/2 stream and closes the
                // connection to the app.
                Ending::denied("closed: refused by a policy change").code("policy_change")
            }
        }
    }
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
