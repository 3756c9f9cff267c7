//! The control plane's gRPC endpoint: TLS (with a certificate from its own
//! CA, rotated at half-life) in front of the discovery and certificate
//! services.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use kanava_tls::rustls::server::{ClientHello, ResolvesServerCert};
use kanava_tls::rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticated, Authenticator};
use crate::ca::{Authority, CertificateAuthority};
use crate::certificates::{self, CertificateService};
use crate::discovery::{DiscoveryServer, DiscoveryService};
use crate::store::Store;
use crate::{Config, Error};

/// Lifetime of the control plane's own serving certificate.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    config: Config,
    ca: Arc<Authority>,
    auth: Arc<Authenticator>,
    store: Arc<Store>,
}

impl Server {
    pub fn new(
        config: &Config,
        ca: Arc<Authority>,
        auth: Arc<Authenticator>,
        store: Arc<Store>,
    ) -> Result<Self, Error> {
        Ok(Server {
            config: config.clone(),
            ca,
            auth,
            store,
        })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let serving = Arc::new(ServingCert::issue(
            &self.ca.current(),
            &self.config.server_names,
            &self.config.server_ips,
        )?);
        let rotation = tokio::spawn(serving.clone().rotate(
            self.ca.clone(),
            self.config.server_names.clone(),
            self.config.server_ips.clone(),
        ));
        let tls = kanava_tls::control_plane_server_config(serving)?;
        let listener = TcpListener::bind(self.config.listen)
            .await
            .map_err(|source| Error::Listen {
                address: self.config.listen,
                source,
            })?;
        tracing::info!(address = %self.config.listen, "serving discovery, certificates and reflection");

        let incoming = accept_tls(listener, TlsAcceptor::from(tls), shutdown.clone());
        let max = self.config.max_message_bytes;
        let discovery = Authenticated::new(
            DiscoveryServer::new(
                DiscoveryService::new(self.store.clone(), self.config.on_demand_above),
                max,
            ),
            self.auth.clone(),
        );
        let certificates = certificates::server(
            CertificateService::new(
                self.ca.clone(),
                self.store.clone(),
                self.config.cert_ttl,
                self.config.max_cert_ttl,
            ),
            self.auth.clone(),
        );
        // Server reflection, so generic clients (grpcurl, Postman,
        // grpcio-reflection) can list and describe the API; both versions
        // of the protocol (older clients speak v1alpha); behind the same
        // authentication as the rest.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(kanava_proto::FILE_DESCRIPTOR_SET)
        };
        let reflection_error = |e: tonic_reflection::server::Error| {
            Error::Config(format!("gRPC server reflection: {e}"))
        };
        let reflection_v1 = Authenticated::new(
            reflection().build_v1().map_err(reflection_error)?,
            self.auth.clone(),
        );
        let reflection_v1alpha = Authenticated::new(
            reflection().build_v1alpha().map_err(reflection_error)?,
            self.auth.clone(),
        );
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(discovery)
            .add_service(certificates)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await;
        rotation.abort();
        Ok(result?)
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop,
/// so a slow client never delays the next one.
fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A server-side TLS connection, in the shape tonic's server wants.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<std::net::SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The control plane's serving certificate, replaced at half-life.
#[derive(Debug)]
struct ServingCert {
    current: ArcSwap<ServingKey>,
}

/// A serving certificate and when to renew it.
#[derive(Debug)]
struct ServingKey {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

impl ServingCert {
    fn issue(ca: &CertificateAuthority, names: &[String], ips: &[IpAddr]) -> Result<Self, Error> {
        Ok(ServingCert {
            current: ArcSwap::from_pointee(issue_serving(ca, names, ips)?),
        })
    }

    /// Renews the certificate at half-life, and at once when another
    /// certificate starts signing (a root rotation: the old root will be
    /// dropped, and with it every certificate under it).
    async fn rotate(self: Arc<Self>, ca: Arc<Authority>, names: Vec<String>, ips: Vec<IpAddr>) {
        let mut signer = ca.signer_changes();
        loop {
            let renew_at = self.current.load().renew_at;
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = signer.changed() => if changed.is_err() {
                    return;
                },
            }
            match issue_serving(&ca.current(), &names, &ips) {
                Ok(fresh) => {
                    self.current.store(Arc::new(fresh));
                    tracing::info!("rotated the control plane's serving certificate");
                }
                Err(error) => {
                    tracing::error!(%error, "cannot renew the serving certificate; retrying in 1 minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }
}

fn issue_serving(
    ca: &CertificateAuthority,
    names: &[String],
    ips: &[IpAddr],
) -> Result<ServingKey, Error> {
    let (leaf, key) = ca.sign_server(names, ips, SERVING_CERT_TTL)?;
    let not_after = kanava_tls::not_after_of(&leaf)?;
    let signing_key = kanava_tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(kanava_tls::Error::from)?;
    let lifetime = not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Ok(ServingKey {
        key: Arc::new(CertifiedKey::new(vec![leaf], signing_key)),
        renew_at: SystemTime::now() + lifetime / 2,
    })
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}
