//! Inbound HBONE (:15008): mutual TLS with the destination pod's identity,
//! then one HTTP/2 `CONNECT` stream per proxied connection.
//!
//! | reply | when |
//! | --- | --- |
//! | 200 | connected to the app; bytes follow |
//! | 400 | not a CONNECT, or the target is not this listener's pod |
//! | 401 | refused by authorization policy, or the client certificate expired |
//! | 503 | the app did not accept the connection |
//!
//! The connection to the app is made from inside the pod's namespace with
//! the client pod's IP as source address, so the app sees its real peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use kanava_mesh::Identity;
use kanava_mesh::policy::Decision;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::access_log::AccessLog;
use super::{CapturedPod, HANDSHAKE_TIMEOUT, Proxy, authz, hbone, socket};
use crate::metrics::{Direction, Outcome, Transport};

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<CapturedPod>, tcp: TcpStream, peer: SocketAddr) {
    let Ok(permit) = proxy.handshakes.clone().try_acquire_owned() else {
        tracing::warn!(pod = %pod.display_name(), %peer, "too many TLS handshakes in progress; refusing");
        socket::reset(tcp);
        return;
    };
    // Our own certificate must exist before we can present it.
    if let Err(error) = proxy.certs.get(&pod.identity, HANDSHAKE_TIMEOUT).await {
        tracing::warn!(pod = %pod.display_name(), %peer, %error, "cannot accept HBONE");
        socket::reset(tcp);
        return;
    }
    let acceptor = TlsAcceptor::from(pod.hbone_tls.clone());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            proxy.metrics.hbone_handshake_failures.inc();
            tracing::info!(pod = %pod.display_name(), %peer, %error, "HBONE TLS handshake refused");
            return;
        }
        Err(_) => {
            proxy.metrics.hbone_handshake_failures.inc();
            tracing::info!(pod = %pod.display_name(), %peer, "HBONE TLS handshake timed out");
            return;
        }
    };
    drop(permit);
    let peer_leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first());
    let peer_not_after = peer_leaf
        .and_then(|leaf| kanava_tls::not_after_of(leaf).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let peer_identity = match peer_leaf.map(kanava_tls::identity_of) {
        Some(Ok(identity)) => identity,
        Some(Err(error)) => {
            tracing::info!(pod = %pod.display_name(), %peer, %error, "client certificate names no identity");
            return;
        }
        None => {
            tracing::info!(pod = %pod.display_name(), %peer, "no client certificate");
            return;
        }
    };
    proxy.metrics.hbone_connections_accepted.inc();

    let mut connection = match hbone::server_builder(&proxy.config)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(connection) => connection,
        Err(error) => {
            tracing::info!(pod = %pod.display_name(), %peer, %error, "HTTP/2 handshake failed");
            return;
        }
    };
    while let Some(stream) = connection.accept().await {
        match stream {
            Ok((request, respond)) => {
                tokio::spawn(serve_stream(
                    proxy.clone(),
                    pod.clone(),
                    Peer {
                        address: peer,
                        identity: peer_identity.clone(),
                        not_after: peer_not_after,
                    },
                    request,
                    respond,
                ));
            }
            Err(error) => {
                tracing::debug!(pod = %pod.display_name(), %peer, %error, "HBONE connection ended");
                break;
            }
        }
    }
}

/// The authenticated client of an HBONE connection.
struct Peer {
    address: SocketAddr,
    identity: Identity,
    /// End of validity of its certificate.
    not_after: SystemTime,
}

async fn serve_stream(
    proxy: Arc<Proxy>,
    pod: Arc<CapturedPod>,
    peer: Peer,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    // Only the method, target and body are needed; the headers need not live
    // as long as the connection.
    let (parts, body) = request.into_parts();
    let target: Option<SocketAddr> = parts
        .uri
        .authority()
        .and_then(|authority| authority.as_str().parse().ok())
        .map(socket::canonical);
    let mut log = AccessLog::start(
        &proxy.metrics,
        Direction::Inbound,
        pod.display_name(),
        peer.address,
        target.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
    );
    log.transport(Transport::Hbone)
        .source_identity(Some(peer.identity.clone()))
        .destination(Some(pod.display_name()), Some(pod.identity.clone()));

    let refusal = if parts.method != Method::CONNECT {
        Some(format!("method {} is not CONNECT", parts.method))
    } else {
        match target {
            None => Some(format!(
                "authority {:?} is not IP:port",
                parts.uri.to_string()
            )),
            Some(target) if !pod.owns(target.ip()) => Some(format!(
                "target {} is not an address of pod {}",
                target.ip(),
                pod.display_name()
            )),
            Some(_) => None,
        }
    };
    drop(parts);
    let target = match (refusal, target) {
        (None, Some(target)) => target,
        (refusal, _) => {
            let reason = refusal.unwrap_or_default();
            reply(&mut respond, StatusCode::BAD_REQUEST);
            log.finish(&proxy.metrics, Outcome::Denied, (0, 0), Some(&reason));
            return;
        }
    };

    if SystemTime::now() >= peer.not_after {
        reply(&mut respond, StatusCode::UNAUTHORIZED);
        log.finish(
            &proxy.metrics,
            Outcome::Denied,
            (0, 0),
            Some("client certificate expired"),
        );
        return;
    }
    if let Decision::Deny { reason, .. } = authz::authorize(
        &proxy.workloads,
        &pod,
        Some(&peer.identity),
        peer.address.ip(),
        target.port(),
    ) {
        reply(&mut respond, StatusCode::UNAUTHORIZED);
        log.finish(&proxy.metrics, Outcome::Denied, (0, 0), Some(&reason));
        return;
    }

    let upstream = Box::pin(socket::connect_in(
        &proxy.netns,
        &pod.netns,
        target,
        Some(peer.address.ip()),
        proxy.config.connect_timeout,
    ))
    .await;
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.finish(
                &proxy.metrics,
                Outcome::Failed,
                (0, 0),
                Some(&error.to_string()),
            );
            return;
        }
    };
    let send = match respond.send_response(ok_response(), false) {
        Ok(send) => send,
        Err(error) => {
            log.finish(
                &proxy.metrics,
                Outcome::Failed,
                (0, 0),
                Some(&error.to_string()),
            );
            return;
        }
    };
    let registration = proxy.open.register(
        pod.clone(),
        Some(peer.identity.clone()),
        peer.address.ip(),
        target.port(),
    );
    let (read, write) = upstream.into_split();
    // Bytes are counted from the app's side here; the originator sent what
    // the app received.
    tokio::select! {
        ((from_app, to_app), result) = hbone::bridge(read, write, send, body) => match result {
            Ok(()) => log.finish(&proxy.metrics, Outcome::Success, (to_app, from_app), None),
            Err(error) => log.finish(&proxy.metrics, Outcome::Failed, (to_app, from_app), Some(&error.to_string())),
        },
        _ = registration.closed.cancelled() => {
            // Dropping the bridge resets the HTTP/2 stream and closes the
            // connection to the app.
            log.finish(&proxy.metrics, Outcome::Denied, (0, 0), Some("closed: refused by a policy change"));
        }
    }
}

fn ok_response() -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::OK;
    response
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // Err only if the client already reset the stream.
    let _ = respond.send_response(response, true);
}
