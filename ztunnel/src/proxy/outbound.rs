//! Outbound (:15001): a connection an enrolled pod opened, redirected here.
//!
//! The original destination decides the route: a workload in the mesh is
//! reached over HBONE with the source pod's certificate, verifying the
//! destination proves its own identity; anything else is passed through as
//! plain TCP from inside the source pod's namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use kanava_mesh::{Workload, ports};
use kanava_tls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::access_log::AccessLog;
use super::pool::{Connection, PoolKey};
use super::{CapturedPod, Proxy, hbone, socket};
use crate::Error;
use crate::metrics::{Direction, Outcome, Transport};

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

    match proxy.workloads.find_by_ip(destination.ip()) {
        Some(workload) if workload.in_mesh() => {
            log.transport(Transport::Hbone).destination(
                Some(workload.display_name()),
                Some(workload.identity.clone()),
            );
            match via_hbone(&proxy, &pod, &workload, destination, client).await {
                Ok(bytes) => log.finish(&proxy.metrics, Outcome::Success, bytes, None),
                Err((outcome, bytes, error)) => {
                    log.finish(&proxy.metrics, outcome, bytes, Some(&error.to_string()))
                }
            }
        }
        workload => {
            log.destination(workload.map(|w| w.display_name()), None);
            match passthrough(&proxy, &pod, destination, client).await {
                Ok(bytes) => log.finish(&proxy.metrics, Outcome::Success, bytes, None),
                Err((bytes, error)) => log.finish(
                    &proxy.metrics,
                    Outcome::Failed,
                    bytes,
                    Some(&error.to_string()),
                ),
            }
        }
    }
}

type Failure = (Outcome, (u64, u64), Error);

async fn via_hbone(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    workload: &Workload,
    destination: SocketAddr,
    client: TcpStream,
) -> Result<(u64, u64), Failure> {
    let timeout = proxy.config.connect_timeout;
    let failed = |error: Error| (Outcome::Failed, (0, 0), error);
    let cert = proxy
        .certs
        .get(&pod.identity, timeout)
        .await
        .map_err(failed)?;
    let key = PoolKey {
        source_pod: pod.uid.clone(),
        source: pod.identity.clone(),
        destination: workload.identity.clone(),
        address: SocketAddr::new(destination.ip(), ports::HBONE),
    };
    let slot = tokio::time::timeout(
        timeout,
        proxy
            .pool
            .checkout(&key, || open_connection(proxy, pod, &key, cert)),
    )
    .await
    .map_err(|_| {
        failed(Error::Timeout(format!(
            "HBONE connection to {}",
            key.address
        )))
    })?
    .map_err(failed)?;

    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(destination.to_string())
        .body(())
        .map_err(|e| failed(Error::Config(e.to_string())))?;
    let mut sender = slot.sender().ready().await.map_err(|e| failed(e.into()))?;
    let (response, send) = sender
        .send_request(request, false)
        .map_err(|e| failed(e.into()))?;
    let response = tokio::time::timeout(timeout, response)
        .await
        .map_err(|_| failed(Error::Timeout(format!("CONNECT {destination}"))))?
        .map_err(|e| failed(e.into()))?;
    if response.status() != StatusCode::OK {
        socket::reset(client);
        let outcome = match response.status() {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST => {
                Outcome::Denied
            }
            _ => Outcome::Failed,
        };
        return Err((
            outcome,
            (0, 0),
            Error::ConnectRefused {
                peer: key.address,
                status: response.status(),
            },
        ));
    }
    let (read, write) = client.into_split();
    let (bytes, result) = hbone::bridge(read, write, send, response.into_body()).await;
    drop(slot);
    result
        .map(|()| bytes)
        .map_err(|e| (Outcome::Failed, bytes, Error::io("HBONE stream")(e)))
}

/// Opens an HBONE connection from inside the source pod's namespace.
async fn open_connection(
    proxy: &Arc<Proxy>,
    pod: &Arc<CapturedPod>,
    key: &PoolKey,
    cert: kanava_tls::WorkloadCert,
) -> Result<Connection, Error> {
    let timeout = proxy.config.connect_timeout;
    let tcp = socket::connect_in(&proxy.netns, &pod.netns, key.address, None, timeout).await?;
    let tls = kanava_tls::hbone_client_config(&cert, &proxy.roots, &key.destination)?;
    let server_name = ServerName::IpAddress(key.address.ip().into());
    let stream = tokio::time::timeout(timeout, TlsConnector::from(tls).connect(server_name, tcp))
        .await
        .map_err(|_| Error::Timeout(format!("TLS handshake with {}", key.address)))?
        .map_err(|source| Error::Handshake {
            peer: key.address,
            source,
        })?;
    let (sender, connection) = hbone::client_builder(&proxy.config)
        .handshake::<_, Bytes>(stream)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let metrics = proxy.metrics.clone();
    metrics.hbone_connections_opened.inc();
    metrics.hbone_connections_open.inc();
    tracing::debug!(source = %key.source, destination = %key.destination, address = %key.address, "opened HBONE connection");
    let driver_closed = closed.clone();
    let address = key.address;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%address, %error, "HBONE connection ended with an error");
        }
        driver_closed.store(true, std::sync::atomic::Ordering::Release);
        metrics.hbone_connections_open.dec();
    });
    Ok(Connection::new(sender, closed))
}

/// Plain TCP to a destination outside the mesh.
async fn passthrough(
    proxy: &Proxy,
    pod: &CapturedPod,
    destination: SocketAddr,
    mut client: TcpStream,
) -> Result<(u64, u64), ((u64, u64), Error)> {
    let netns = pod.netns.clone();
    let mut upstream = match socket::connect_in(
        &proxy.netns,
        &netns,
        destination,
        None,
        proxy.config.connect_timeout,
    )
    .await
    {
        Ok(upstream) => upstream,
        Err(error) => {
            socket::reset(client);
            return Err(((0, 0), error));
        }
    };
    copy_tcp(&mut client, &mut upstream)
        .await
        .map_err(|(bytes, e)| (bytes, Error::io("passthrough")(e)))
}

/// Copies both ways between two TCP connections, passing half-closes on.
pub async fn copy_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
) -> Result<(u64, u64), ((u64, u64), std::io::Error)> {
    const BUFFER: usize = 64 * 1024;
    tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER)
        .await
        .map_err(|e| ((0, 0), e))
}
