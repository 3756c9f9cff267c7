//! The server half: accept an HBONE connection on a pod's :15008, then read
//! each `CONNECT` request and answer it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::SendStream;
use h2::server::{Connection, SendResponse};
use http::{Method, Response, Uri};
use kanava_tls::PeerCertificate;
use kanava_tls::rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{FrameWait, Refusal};
use crate::{Config, Error};

/// An accepted HBONE connection, with the client it authenticated.
pub struct Accepted {
    pub connection: Connection<FrameWait<TlsStream<TcpStream>>, Bytes>,
    pub client: PeerCertificate,
}

/// Completes TLS (presenting the pod's certificate, demanding the client's)
/// and the HTTP/2 preface on a connection accepted on :15008, both within
/// `handshake_timeout`: a peer that stalls either holds a slot for no more.
pub async fn accept(
    config: &Config,
    tls: Arc<ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake_timeout: Duration,
) -> Result<Accepted, Error> {
    tokio::time::timeout(handshake_timeout, handshake(config, tls, tcp, peer))
        .await
        .map_err(|_| Error::ClientHandshakeTimeout {
            peer,
            after: handshake_timeout,
        })?
}

async fn handshake(
    config: &Config,
    tls: Arc<ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<Accepted, Error> {
    let mut tls = TlsAcceptor::from(tls)
        .accept(tcp)
        .await
        .map_err(|source| Error::Handshake { peer, source })?;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(super::TLS_WRITE_BATCH));
    let client = kanava_tls::peer_certificate(tls.get_ref().1)
        .map_err(|source| Error::PeerCertificate { peer, source })?;
    let connection = super::server_builder(config)
        .handshake::<_, Bytes>(FrameWait::server(tls))
        .await
        .map_err(|source| Error::Http2 {
            stage: "handshake",
            peer,
            source,
        })?;
    Ok(Accepted { connection, client })
}

/// Reads what a request asks for: the `IP:port` it wants to reach, or the
/// [`Refusal::BadRequest`] that answers it.
pub fn connect_target(method: &Method, uri: &Uri) -> Result<SocketAddr, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::BadRequest(format!(
            "method {method} is not CONNECT"
        )));
    }
    target_of(uri).ok_or_else(|| {
        Refusal::BadRequest(format!("authority {:?} is not IP:port", uri.to_string()))
    })
}

/// The `IP:port` in a request's authority (IPv4-mapped IPv6 made IPv4).
pub fn target_of(uri: &Uri) -> Option<SocketAddr> {
    uri.authority()
        .and_then(|authority| authority.as_str().parse().ok())
        .map(crate::proxy::socket::canonical)
}

/// Answers 200: bytes may flow. With a token, the stream may move
/// ([`super::resume`]).
pub fn accept_stream(
    mut respond: SendResponse<Bytes>,
    token: Option<super::resume::Token>,
) -> Result<SendStream<Bytes>, h2::Error> {
    let mut response = Response::new(());
    if let Some(token) = token {
        super::resume::grant(response.headers_mut(), token);
    }
    respond.send_response(response, false)
}

/// Answers with the refusal's status code and ends the stream.
pub fn refuse(mut respond: SendResponse<Bytes>, refusal: &Refusal) {
    let mut response = Response::new(());
    *response.status_mut() = refusal.status();
    // Err only if the client already reset the stream.
    let _ = respond.send_response(response, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connect_to_an_address_is_understood() {
        let uri = |text: &str| text.parse::<Uri>().expect("uri");
        assert_eq!(
            connect_target(&Method::CONNECT, &uri("10.0.0.1:80")),
            Ok("10.0.0.1:80".parse().expect("address"))
        );
        assert_eq!(
            connect_target(&Method::CONNECT, &uri("[::ffff:10.0.0.1]:80")),
            Ok("10.0.0.1:80".parse().expect("address")),
            "IPv4-mapped targets are the IPv4 address"
        );
        assert!(matches!(
            connect_target(&Method::GET, &uri("10.0.0.1:80")),
            Err(Refusal::BadRequest(reason)) if reason.contains("GET")
        ));
        assert!(matches!(
            connect_target(&Method::CONNECT, &uri("web.shop:80")),
            Err(Refusal::BadRequest(reason)) if reason.contains("web.shop")
        ));
    }
}
