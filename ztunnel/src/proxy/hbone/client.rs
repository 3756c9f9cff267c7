//! The client half: open an HBONE connection from a pod's namespace, then
//! ask for one `CONNECT` stream per proxied connection on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::{RecvStream, SendStream};
use http::uri::{Authority, Uri};
use http::{Method, Request};
use kanava_tls::WorkloadCert;
use kanava_tls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::Refusal;
use super::bridge::Accepted;
use super::resume::{self, Token};
use crate::Error;
use crate::proxy::pool::{Connection, PoolKey, StreamSlot};
use crate::proxy::{CapturedPod, Proxy, socket};

/// An accepted `CONNECT` stream: bytes to the destination go into `send`,
/// its answers come out of `recv`.
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// The hand-over token the destination granted, if it speaks the
    /// extension.
    pub token: Option<Token>,
}

/// Opens an HBONE connection to `key.address` from inside `pod`'s network
/// namespace, presenting `cert` and accepting only a server that proves
/// `key.destination`.
pub async fn connect(
    proxy: &Proxy,
    pod: &CapturedPod,
    key: &PoolKey,
    cert: WorkloadCert,
) -> Result<Connection, Error> {
    let timeout = proxy.config.connect_timeout;
    let peer = key.address;
    let started = Instant::now();
    let tcp = socket::connect_in(&proxy.netns, &pod.netns, peer, None, timeout).await?;
    let connected = started.elapsed();

    let tls =
        kanava_tls::hbone_client_config(&cert, &proxy.trust.bundle.roots(), &key.destination)?;
    let server_name = ServerName::IpAddress(peer.ip().into());
    let mut stream =
        tokio::time::timeout(timeout, TlsConnector::from(tls).connect(server_name, tcp))
            .await
            .map_err(|_| Error::HandshakeTimeout {
                peer,
                after: timeout,
            })?
            .map_err(|source| Error::Handshake { peer, source })?;
    // The verifier already checked the server's identity; its certificate
    // also bounds how long new streams may ride on this connection.
    let server_cert = kanava_tls::peer_certificate(stream.get_ref().1)
        .map_err(|source| Error::PeerCertificate { peer, source })?;
    let usable_until = server_cert.not_after.min(cert.not_after());
    if usable_until <= SystemTime::now() {
        return Err(Error::CertificateLapsed { peer });
    }
    let secured = started.elapsed();
    stream
        .get_mut()
        .1
        .set_buffer_limit(Some(super::TLS_WRITE_BATCH));

    let (sender, connection) = super::client_builder(&proxy.config)
        .handshake::<_, Bytes>(super::FrameWait::client(stream))
        .await
        .map_err(|source| Error::Http2 {
            stage: "handshake",
            peer,
            source,
        })?;
    let metrics = proxy.metrics.clone();
    metrics.hbone_connections_opened.inc();
    metrics.hbone_connections_open.inc();
    tracing::debug!(
        source = %key.source,
        destination = %key.destination,
        address = %peer,
        ?connected,
        ?secured,
        total = ?started.elapsed(),
        "opened HBONE connection"
    );
    let closed = Arc::new(AtomicBool::new(false));
    let driver_closed = closed.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(address = %peer, %error, "HBONE connection ended with an error");
        }
        driver_closed.store(true, Ordering::Release);
        metrics.hbone_connections_open.dec();
    });
    Ok(Connection::new(sender, closed, usable_until))
}

/// Sends `CONNECT target` on a reserved stream of a pooled connection to
/// `peer` and waits up to `timeout` for the reply.
pub async fn open_stream(
    slot: &StreamSlot,
    peer: SocketAddr,
    target: SocketAddr,
    resume: Option<Token>,
    timeout: Duration,
) -> Result<Stream, Error> {
    let (send, reply) = send_connect(slot, peer, target, resume).await?;
    let Accepted { recv, token } = reply.accepted(timeout).await?;
    Ok(Stream { send, recv, token })
}

/// Sends `CONNECT target` on a reserved stream of a pooled connection to
/// `peer` without waiting for the reply: the client's first bytes may follow
/// on `send` at once (HTTP/2 frames them per stream, and the destination
/// holds them in the stream's window until it has decided; a refused
/// stream's bytes are discarded with it). [`Reply::accepted`] then says
/// whether the destination took the stream.
///
/// Every request offers the hand-over extension; `resume` asks to continue
/// the parked stream of that token.
pub async fn send_connect(
    slot: &StreamSlot,
    peer: SocketAddr,
    target: SocketAddr,
    resume: Option<Token>,
) -> Result<(SendStream<Bytes>, Reply), Error> {
    let http2 = |stage| {
        move |source| Error::Http2 {
            stage,
            peer,
            source,
        }
    };
    let mut sender = slot
        .sender()
        .ready()
        .await
        .map_err(http2("stream reservation"))?;
    let (response, send) = sender
        .send_request(connect_request(target, resume), false)
        .map_err(http2("CONNECT request"))?;
    Ok((
        send,
        Reply {
            response,
            peer,
            target,
        },
    ))
}

/// The destination's answer to a `CONNECT`, still on its way.
pub struct Reply {
    response: ResponseFuture,
    peer: SocketAddr,
    target: SocketAddr,
}

impl Reply {
    /// Waits up to `timeout` for the answer: the stream's bytes from the
    /// destination (and the hand-over token it granted) if it accepted,
    /// else why not.
    pub async fn accepted(self, timeout: Duration) -> Result<Accepted, Error> {
        let Reply {
            response,
            peer,
            target,
        } = self;
        let response = tokio::time::timeout(timeout, response)
            .await
            .map_err(|_| Error::ConnectReplyTimeout {
                peer,
                target,
                after: timeout,
            })?
            .map_err(|source| Error::Http2 {
                stage: "CONNECT reply",
                peer,
                source,
            })?;
        match Refusal::from_status(response.status()) {
            None => {
                let token = resume::read_grant(response.headers());
                Ok(Accepted {
                    recv: response.into_body(),
                    token,
                })
            }
            Some(refusal) => Err(Error::ConnectRefused {
                peer,
                target,
                refusal,
            }),
        }
    }
}

/// `CONNECT` with `:authority` = the destination's `IP:port`, and the
/// hand-over extension's headers.
fn connect_request(target: SocketAddr, resume: Option<Token>) -> Request<()> {
    let mut request = Request::new(());
    resume::offer(request.headers_mut(), resume);
    *request.method_mut() = Method::CONNECT;
    // A socket address always makes a valid authority (IPv6 in brackets).
    let authority = Authority::try_from(target.to_string()).ok();
    let mut parts = http::uri::Parts::default();
    parts.authority = authority;
    *request.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_name_the_target_as_authority() {
        for target in ["10.244.2.3:8080", "[fd00::5]:443"] {
            let target: SocketAddr = target.parse().expect("address");
            let request = connect_request(target, None);
            assert_eq!(request.method(), Method::CONNECT);
            assert_eq!(
                request.uri().authority().map(|a| a.as_str()),
                Some(target.to_string().as_str())
            );
            // The server's parser reads back the same address.
            assert_eq!(super::super::server::target_of(request.uri()), Some(target));
        }
    }
}
