//! The monitoring port (15014). `GET /healthz`: 200 while the process
//! serves (the liveness probe; not a TLS handshake on the gRPC port, which
//! would log as a failed one). `GET /ready`: 200 once the source has been
//! read in full, 503 before. A control plane that is not ready answers no
//! discovery either (see [`Store::subscribe`](crate::store::Store::subscribe)),
//! so the kubelet and the ztunnels agree on when it is usable. `GET
//! /metrics`: the [metrics](crate::metrics) in Prometheus text format.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::store::Store;

/// Longest a probe may take to send its request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more wait in the kernel's backlog. The
/// kubelet needs one; anyone else who can reach the port gets no more.
const MAX_CONNECTIONS: usize = 64;

/// Serves readiness on `address` until `shutdown`; dropping the handle
/// stops it too.
pub async fn serve(
    address: SocketAddr,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> Result<Server, Error> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| Error::Listen { address, source })?;
    tracing::info!(%address, "serving /ready and /metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "readiness accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let response = if request.uri().path() == "/metrics" {
                        metrics_response(store.metrics().encode())
                    } else {
                        answer(&request, store.is_loaded())
                    };
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(slot);
            });
        }
    });
    Ok(Server { task })
}

/// The readiness endpoint; dropping it stops it.
pub struct Server {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn metrics_response(text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    if let Ok(value) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn answer<B>(request: &Request<B>, ready: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (request.uri().path(), ready) {
        // Liveness: the process serves at all. An API server that is
        // away makes it unready, never restarted.
        ("/healthz", _) => (StatusCode::OK, "alive\n"),
        ("/ready", true) => (StatusCode::OK, "ready\n"),
        ("/ready", false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the initial lists of the cluster\n",
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
