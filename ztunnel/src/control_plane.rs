//! The ztunnel's connection to the control plane: one TLS channel, shared by
//! discovery and certificate requests, authenticated with the node's
//! credential on every call.
//!
//! The credential file is read again for every call: on Kubernetes it is a
//! projected service-account token that the kubelet replaces before it
//! expires, so the token presented is always the current one. A read that
//! fails (the kubelet swaps the file by renaming a directory) keeps the last
//! good token.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kanava_proto::v1::certificates_client::CertificatesClient;
use kanava_proto::v1::discovery_client::DiscoveryClient;
use kanava_tls::TrustBundle;
use kanava_tls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::{Config, Error};

#[derive(Clone)]
pub struct ControlPlane {
    channel: Channel,
    credential: Arc<Credential>,
    max_message_bytes: usize,
}

impl ControlPlane {
    /// Prepares the channel; it connects on first use and reconnects by
    /// itself after failures.
    pub fn new(config: &Config, trust: &TrustBundle) -> Result<Self, Error> {
        let credential = Credential::read(config.node_token_file.clone())?;
        let channel = channel(
            &config.control_plane_address,
            &config.control_plane_name,
            trust,
            config.connect_timeout,
        )?;
        Ok(ControlPlane {
            channel,
            credential: Arc::new(credential),
            max_message_bytes: config.max_message_bytes,
        })
    }

    pub fn discovery(&self) -> DiscoveryClient<Channel> {
        // Snapshots compress about tenfold; a control plane of the previous
        // release ignores the offer and sends them as they are.
        DiscoveryClient::new(self.channel.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    pub fn certificates(&self) -> CertificatesClient<Channel> {
        CertificatesClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_message_bytes)
    }

    /// Wraps a message in a request that carries the node credential.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.credential.current());
        request
    }
}

/// The node credential, as an `authorization` header value, from its file.
struct Credential {
    path: PathBuf,
    last_good: Mutex<MetadataValue<Ascii>>,
}

impl Credential {
    /// Reads the file once now: a missing or unusable credential stops the
    /// ztunnel at start, with the file's name.
    fn read(path: PathBuf) -> Result<Self, Error> {
        let value = Self::load(&path)?;
        Ok(Credential {
            path,
            last_good: Mutex::new(value),
        })
    }

    fn load(path: &std::path::Path) -> Result<MetadataValue<Ascii>, Error> {
        let token = std::fs::read_to_string(path).map_err(Error::io(format!(
            "read node credential {}",
            path.display()
        )))?;
        format!("Bearer {}", token.trim())
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| Error::NodeCredential {
                path: path.to_path_buf(),
            })
    }

    /// The credential as the file holds it now, or the last good one.
    fn current(&self) -> MetadataValue<Ascii> {
        // Read outside the lock: concurrent calls never wait on the file.
        let loaded = Self::load(&self.path);
        let mut last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok(value) => *last_good = value,
            Err(error) => {
                tracing::warn!(%error, "cannot read the node credential again; using the last one read")
            }
        }
        last_good.clone()
    }
}

/// A gRPC channel to the control plane at `address` (`host:port`) over TLS,
/// verifying its certificate names `server_name` and chains to a root of
/// `trust` (as it is at each connection). It connects on first use and
/// reconnects by itself after failures.
pub fn channel(
    address: &str,
    server_name: &str,
    trust: &TrustBundle,
    connect_timeout: Duration,
) -> Result<Channel, Error> {
    let server_name =
        ServerName::try_from(server_name.to_string()).map_err(|e| Error::ControlPlaneSetting {
            what: "name",
            value: server_name.to_string(),
            reason: e.to_string(),
        })?;
    let tls = TlsConnector::from(kanava_tls::control_plane_client_config(trust)?);
    let address = address.to_string();
    // The URI only labels the channel: the connector below decides where
    // to connect and wraps the connection in TLS itself.
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| Error::ControlPlaneSetting {
            what: "address",
            value: address.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connector = tower::service_fn(move |_uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        let address = address.clone();
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_is_read_again_for_every_call_and_the_last_good_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let credential = Credential::read(path.clone()).unwrap();
        assert_eq!(credential.current(), "Bearer first-token");
        // The kubelet rotates the projected token.
        std::fs::write(&path, "second-token").unwrap();
        assert_eq!(credential.current(), "Bearer second-token");
        // Mid-swap the file is briefly missing: the last good one stays.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(credential.current(), "Bearer second-token");
        assert!(
            Credential::read(path).is_err(),
            "missing at start is an error"
        );
    }
}
