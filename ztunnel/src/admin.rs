//! The ztunnel's HTTP endpoints:
//!
//! | address | path | what |
//! | --- | --- | --- |
//! | admin (127.0.0.1:15000) | `/config_dump` | JSON: captured pods, known workloads, services, policies, certificates (identity, expiry and signer, never keys), trust (root fingerprints and the mesh's signer), resource versions |
//! | metrics (:15020) | `/metrics` | Prometheus text format |
//! | readiness (:15021) | `/healthz/ready` | 200 once the first configuration arrived, else 503 |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::pods::PodRegistry;
use crate::proxy::Proxy;
use crate::proxy::handshakes::{Handshakes, Limits};

/// What the endpoints read from.
pub struct State {
    pub node: String,
    pub proxy: Arc<Proxy>,
    pub pods: Arc<PodRegistry>,
}

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

/// Connections served at once per endpoint; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Of those, from one source address: a pod that reaches the readiness port
/// through the node's address must not fill it and fail the kubelet's probe.
const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Longest a client may take to send its request head. Pods can reach the
/// metrics and readiness ports through the node's address; a slow client
/// must not hold a connection for longer.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `address` and serves `endpoint` until `stop`: one request per
/// connection, at most [`MAX_CONNECTIONS`] at once and
/// [`MAX_CONNECTIONS_PER_SOURCE`] from one address, each head within
/// [`HEADER_TIMEOUT`].
pub async fn serve(
    address: SocketAddr,
    endpoint: Endpoint,
    state: Arc<State>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(Error::io(format!("bind {endpoint:?} endpoint {address}")))?;
    tracing::info!(%address, ?endpoint, "serving");
    // The same budgets as inbound handshakes, with the endpoint as the one
    // "pod": the whole endpoint, and each source address's share of it.
    let slots = Handshakes::new(Limits {
        node: MAX_CONNECTIONS,
        per_source: MAX_CONNECTIONS_PER_SOURCE,
        per_pod: MAX_CONNECTIONS,
    });
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: back off instead
                        // of spinning on the same error.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let slot = match slots.try_acquire(peer.ip(), "") {
                Ok(slot) => slot,
                Err(exhausted) => {
                    tracing::debug!(?endpoint, %peer, %exhausted, "closing a new connection");
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(endpoint, &state, &request)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                // The head has a deadline; a response body could still be
                // read slowly, so the whole exchange has one too.
                let _ = tokio::time::timeout(HEADER_TIMEOUT * 2, connection).await;
            });
        }
    });
    Ok(())
}

fn respond(
    endpoint: Endpoint,
    state: &State,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (endpoint, request.uri().path()) {
        (Endpoint::Metrics, "/metrics") => {
            // Counted when asked: it depends on both the certificates and
            // the mesh's signer, which change apart.
            state.proxy.certs.count_superseded();
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.proxy.metrics.encode(),
            )
        }
        (Endpoint::Readiness, "/healthz/ready") => {
            if state.proxy.workloads.is_ready() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "waiting for configuration from the control plane\n".into(),
                )
            }
        }
        (Endpoint::Admin, "/config_dump") => text(
            StatusCode::OK,
            "application/json",
            config_dump(state).to_string(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn config_dump(state: &State) -> serde_json::Value {
    let pods: Vec<_> = state
        .pods
        .list()
        .iter()
        .map(|pod| {
            serde_json::json!({
                "uid": pod.info.uid,
                "namespace": pod.info.namespace,
                "name": pod.info.name,
                "identity": pod.info.identity.to_string(),
                "ips": pod.info.ips,
            })
        })
        .collect();
    let workloads: Vec<_> = state
        .proxy
        .workloads
        .workloads()
        .iter()
        .map(|w| {
            serde_json::json!({
                "uid": w.uid,
                "namespace": w.namespace,
                "name": w.name,
                "node": w.node,
                "ips": w.ips,
                "identity": w.identity.to_string(),
                "inMesh": w.in_mesh(),
                "mtlsMode": format!("{:?}", w.mtls_mode).to_lowercase(),
            })
        })
        .collect();
    let services: Vec<_> = state
        .proxy
        .workloads
        .services()
        .iter()
        .map(|s| {
            serde_json::json!({
                "namespace": s.namespace,
                "name": s.name,
                "addresses": s.addresses,
                "endpoints": s.endpoints.iter().map(|e| &e.workload_uid).collect::<Vec<_>>(),
            })
        })
        .collect();
    let certificates: Vec<_> = state
        .proxy
        .certs
        .list()
        .into_iter()
        .map(|cert| {
            serde_json::json!({
                "identity": cert.identity.to_string(),
                "notAfter": cert.not_after.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "signer": cert.signer,
            })
        })
        .collect();
    let roots = state.proxy.trust.bundle.roots();
    let mut policies: Vec<_> = state
        .proxy
        .workloads
        .policies()
        .iter()
        .map(|p| {
            serde_json::json!({
                "namespace": p.namespace,
                "name": p.name,
                "action": format!("{:?}", p.action).to_uppercase(),
                "meshWide": p.mesh_wide,
                "rules": p.rules.len(),
            })
        })
        .collect();
    policies.sort_by_key(|p| format!("{}/{}", p["namespace"], p["name"]));
    serde_json::json!({
        "node": state.node,
        "ready": state.proxy.workloads.is_ready(),
        "version": state.proxy.workloads.version(),
        "onDemand": state.proxy.workloads.is_on_demand(),
        "capturedPods": pods,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "resourceVersions": state.proxy.workloads.resource_versions(),
        "openInboundConnections": state.proxy.open.len(),
        "certificates": certificates,
        "trust": {
            "roots": roots.fingerprints(),
            "signer": Some(state.proxy.trust.signer()).filter(|s| !s.is_empty()),
        },
        "pooledConnections": state.proxy.pool.len(),
    })
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}
