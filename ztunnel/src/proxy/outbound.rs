//! Outbound (:15001): a connection an enrolled pod opened, redirected here.
//!
//! The original destination decides the route:
//!
//! - a Service's virtual IP: one of its ready endpoints, chosen at random;
//!   the service port is mapped to the endpoint's port, and an endpoint that
//!   refuses the connection is skipped for the next one;
//! - a workload in the mesh: HBONE with the source pod's certificate, and the
//!   destination must prove the identity it should have;
//! - anything else: plain TCP from inside the source pod's namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use kanava_mesh::{Service, Workload, ports};
use kanava_tls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::access_log::AccessLog;
use super::pool::{Connection, PoolKey, StreamSlot};
use super::{CapturedPod, Proxy, hbone, socket};
use crate::Error;
use crate::metrics::{Direction, Outcome, Transport};

/// Most endpoints tried for one connection to a Service.
const MAX_ENDPOINT_ATTEMPTS: usize = 5;

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<CapturedPod>, client: TcpStream, peer: SocketAddr) {
    let destination = match socket::original_destination(&client) {
        Ok(destination) => destination,
        Err(error) => {
            tracing::warn!(pod = %pod.display_name(), %peer, %error, "no original destination; closing");
            return;
        }
    };
    let mut log = AccessLog::start(
        &proxy.metrics,
        Direction::Outbound,
        pod.display_name(),
        peer,
        destination,
    );
    log.source_identity(Some(pod.identity.clone()));
    if destination.port() == ports::OUTBOUND && pod.owns(destination.ip()) {
        // Someone dialled the listener itself; proxying it would loop.
        socket::reset(client);
        log.finish(
            &proxy.metrics,
            Outcome::Denied,
            (0, 0),
            Some("connection to the outbound listener itself"),
        );
        return;
    }
    if !proxy.workloads.is_ready()
        && tokio::time::timeout(proxy.config.connect_timeout, proxy.workloads.wait_ready())
            .await
            .is_err()
    {
        socket::reset(client);
        log.finish(
            &proxy.metrics,
            Outcome::Failed,
            (0, 0),
            Some("no configuration from the control plane yet"),
        );
        return;
    }

    let upstream = if let Some(service) = proxy.workloads.find_service(destination.ip()) {
        // Boxed: the set-up futures are large and over once connected; the
        // task that lives as long as the connection should not carry them.
        Box::pin(via_service(&proxy, &pod, &service, destination, &mut log)).await
    } else {
        let workload = proxy.workloads.find_by_ip(destination.ip());
        Box::pin(connect_upstream(
            &proxy,
            &pod,
            destination,
            workload,
            &mut log,
        ))
        .await
    };
    match upstream {
        Ok(upstream) => {
            let (bytes, result) = relay(client, upstream).await;
            match result {
                Ok(()) => log.finish(&proxy.metrics, Outcome::Success, bytes, None),
                Err(error) => log.finish(
                    &proxy.metrics,
                    Outcome::Failed,
                    bytes,
                    Some(&error.to_string()),
                ),
            }
        }
        Err(failure) => {
            socket::reset(client);
            log.finish(
                &proxy.metrics,
                failure.outcome,
                (0, 0),
                Some(&failure.error.to_string()),
            );
        }
    }
}

/// An established way to the destination, before any byte of the client's
/// has been sent (so a refusal can still be retried elsewhere).
enum Upstream {
    Hbone {
        _slot: StreamSlot,
        send: SendStream<Bytes>,
        recv: RecvStream,
    },
    Tcp(TcpStream),
}

struct Failure {
    outcome: Outcome,
    error: Error,
    /// The destination refused the connection: trying another endpoint is
    /// safe and may succeed.
    refused: bool,
}

impl Failure {
    fn failed(error: impl Into<Error>) -> Self {
        let error = error.into();
        let refused = matches!(&error, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused);
        Failure {
            outcome: Outcome::Failed,
            error,
            refused,
        }
    }
}

/// Picks endpoints of `service` until one accepts.
async fn via_service(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    service: &Service,
    destination: SocketAddr,
    log: &mut AccessLog,
) -> Result<Upstream, Failure> {
    log.service(service.key());
    let refuse = |reason: String| Failure {
        outcome: Outcome::Failed,
        error: Error::NoEndpoint(reason),
        refused: false,
    };
    if !service.ports.iter().any(|p| p.port == destination.port()) {
        return Err(refuse(format!(
            "service {} has no port {}",
            service.key(),
            destination.port()
        )));
    }
    let candidates: Vec<(Arc<Workload>, SocketAddr)> = service
        .endpoints
        .iter()
        .filter_map(|endpoint| {
            let port = *endpoint.ports.get(&destination.port())?;
            let workload = proxy.workloads.find_by_uid(&endpoint.workload_uid)?;
            let ip = *workload.ips.first()?;
            Some((workload, SocketAddr::new(ip, port)))
        })
        .collect();
    if candidates.is_empty() {
        return Err(refuse(format!(
            "service {} has no ready endpoint for port {}",
            service.key(),
            destination.port()
        )));
    }
    let start = rand::random_range(0..candidates.len());
    let attempts = candidates.len().min(MAX_ENDPOINT_ATTEMPTS);
    let mut last = None;
    for attempt in 0..attempts {
        let (workload, address) = &candidates[(start + attempt) % candidates.len()];
        match connect_upstream(proxy, pod, *address, Some(workload.clone()), log).await {
            Ok(upstream) => return Ok(upstream),
            Err(failure) if failure.refused => {
                tracing::info!(
                    pod = %pod.display_name(),
                    service = %service.key(),
                    endpoint = %address,
                    error = %failure.error,
                    "endpoint refused the connection; trying another"
                );
                last = Some(failure);
            }
            Err(failure) => return Err(failure),
        }
    }
    Err(last.unwrap_or_else(|| refuse("no endpoint accepted".into())))
}

/// Connects to `address`: over HBONE when `workload` is in the mesh, in
/// plain TCP otherwise.
async fn connect_upstream(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    address: SocketAddr,
    workload: Option<Arc<Workload>>,
    log: &mut AccessLog,
) -> Result<Upstream, Failure> {
    log.destination_addr(address);
    match workload {
        Some(workload) if workload.in_mesh() => {
            log.transport(Transport::Hbone).destination(
                Some(workload.display_name()),
                Some(workload.identity.clone()),
            );
            hbone_stream(proxy, pod, &workload, address).await
        }
        workload => {
            log.transport(Transport::Passthrough)
                .destination(workload.map(|w| w.display_name()), None);
            socket::connect_in(
                &proxy.netns,
                &pod.netns,
                address,
                None,
                proxy.config.connect_timeout,
            )
            .await
            .map(Upstream::Tcp)
            .map_err(Failure::failed)
        }
    }
}

/// A CONNECT stream to `address` over a pooled HBONE connection.
async fn hbone_stream(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    workload: &Workload,
    address: SocketAddr,
) -> Result<Upstream, Failure> {
    let timeout = proxy.config.connect_timeout;
    let cert = proxy
        .certs
        .get(&pod.identity, timeout)
        .await
        .map_err(Failure::failed)?;
    let key = PoolKey {
        source_pod: pod.uid.clone(),
        source: pod.identity.clone(),
        destination: workload.identity.clone(),
        address: SocketAddr::new(address.ip(), ports::HBONE),
    };
    let slot = tokio::time::timeout(
        timeout,
        proxy
            .pool
            .checkout(&key, || Box::pin(open_connection(proxy, pod, &key, cert))),
    )
    .await
    .map_err(|_| {
        Failure::failed(Error::Timeout(format!(
            "HBONE connection to {}",
            key.address
        )))
    })?
    .map_err(Failure::failed)?;

    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(address.to_string())
        .body(())
        .map_err(|e| Failure::failed(Error::Config(e.to_string())))?;
    let mut sender = slot.sender().ready().await.map_err(Failure::failed)?;
    let (response, send) = sender
        .send_request(request, false)
        .map_err(Failure::failed)?;
    let response = tokio::time::timeout(timeout, response)
        .await
        .map_err(|_| Failure::failed(Error::Timeout(format!("CONNECT {address}"))))?
        .map_err(Failure::failed)?;
    match response.status() {
        StatusCode::OK => Ok(Upstream::Hbone {
            _slot: slot,
            send,
            recv: response.into_body(),
        }),
        status => Err(Failure {
            outcome: match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST => {
                    Outcome::Denied
                }
                _ => Outcome::Failed,
            },
            // 503: the destination's app refused; another endpoint may not.
            refused: status == StatusCode::SERVICE_UNAVAILABLE,
            error: Error::ConnectRefused {
                peer: key.address,
                status,
            },
        }),
    }
}

/// Copies between the client and the upstream until both directions end.
async fn relay(client: TcpStream, upstream: Upstream) -> ((u64, u64), std::io::Result<()>) {
    match upstream {
        Upstream::Hbone { _slot, send, recv } => {
            let (read, write) = client.into_split();
            hbone::bridge(read, write, send, recv).await
        }
        Upstream::Tcp(mut tcp) => {
            let mut client = client;
            super::chunks::copy_tcp(&mut client, &mut tcp).await
        }
    }
}

/// Opens an HBONE connection from inside the source pod's namespace.
async fn open_connection(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    key: &PoolKey,
    cert: kanava_tls::WorkloadCert,
) -> Result<Connection, Error> {
    let timeout = proxy.config.connect_timeout;
    let started = std::time::Instant::now();
    let tcp = socket::connect_in(&proxy.netns, &pod.netns, key.address, None, timeout).await?;
    let connected = started.elapsed();
    let tls = kanava_tls::hbone_client_config(&cert, &proxy.roots, &key.destination)?;
    let server_name = ServerName::IpAddress(key.address.ip().into());
    let stream = tokio::time::timeout(timeout, TlsConnector::from(tls).connect(server_name, tcp))
        .await
        .map_err(|_| Error::Timeout(format!("TLS handshake with {}", key.address)))?
        .map_err(|source| Error::Handshake {
            peer: key.address,
            source,
        })?;
    // Streams may be added only while both certificates are valid.
    let peer_not_after = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| kanava_tls::not_after_of(leaf).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let usable_until = peer_not_after.min(cert.not_after());
    let secured = started.elapsed();
    let (sender, connection) = hbone::client_builder(&proxy.config)
        .handshake::<_, Bytes>(stream)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let metrics = proxy.metrics.clone();
    metrics.hbone_connections_opened.inc();
    metrics.hbone_connections_open.inc();
    tracing::debug!(
        source = %key.source,
        destination = %key.destination,
        address = %key.address,
        ?connected,
        ?secured,
        total = ?started.elapsed(),
        "opened HBONE connection"
    );
    let driver_closed = closed.clone();
    let address = key.address;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%address, %error, "HBONE connection ended with an error");
        }
        driver_closed.store(true, std::sync::atomic::Ordering::Release);
        metrics.hbone_connections_open.dec();
    });
    Ok(Connection::new(sender, closed, usable_until))
}
