//! The discovery service: one stream per ztunnel.
//!
//! The stream starts with a full snapshot, then forwards each change from the
//! [`Store`] as an incremental response. Every response gets a fresh nonce;
//! the client's ACKs and NACKs are logged (a NACK with its reason, at warn
//! level) so a ztunnel refusing configuration is visible.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::Stream;
use kanava_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::NodeAuthenticator;
use crate::store::{Delta, Snapshot, Store};

pub struct DiscoveryService {
    store: Arc<Store>,
    auth: Arc<NodeAuthenticator>,
}

impl DiscoveryService {
    pub fn new(store: Arc<Store>, auth: Arc<NodeAuthenticator>) -> Self {
        DiscoveryService { store, auth }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = self.auth.authenticate(request.metadata())?;
        let mut requests = request.into_inner();
        let first = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before subscribing"))?;
        if first.node_name != node {
            tracing::warn!(credential_node = %node, subscribed_as = %first.node_name, "discovery subscription refused");
            return Err(Status::permission_denied(format!(
                "the credential belongs to node {node:?}, not {:?}",
                first.node_name
            )));
        }
        tracing::info!(%node, resumed_from = %first.version_info, "ztunnel subscribed");
        let (responses, rx) = mpsc::channel(16);
        tokio::spawn(serve_stream(self.store.clone(), node, requests, responses));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Nonces are unique within this process.
fn next_nonce() -> String {
    static NONCE: AtomicU64 = AtomicU64::new(1);
    NONCE.fetch_add(1, Ordering::Relaxed).to_string()
}

fn full_response(snapshot: &Snapshot) -> pb::DiscoveryResponse {
    pb::DiscoveryResponse {
        version_info: snapshot.version.to_string(),
        nonce: next_nonce(),
        full_snapshot: true,
        resources: snapshot.resources.values().map(|r| (**r).clone()).collect(),
        removed: Vec::new(),
    }
}

fn delta_response(delta: &Delta) -> pb::DiscoveryResponse {
    pb::DiscoveryResponse {
        version_info: delta.version.to_string(),
        nonce: next_nonce(),
        full_snapshot: false,
        resources: delta.upserts.iter().map(|r| (**r).clone()).collect(),
        removed: delta.removed.clone(),
    }
}

async fn serve_stream(
    store: Arc<Store>,
    node: String,
    mut requests: Streaming<pb::DiscoveryRequest>,
    responses: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
) {
    let (snapshot, mut changes) = store.subscribe().await;
    let mut sent_version = snapshot.version;
    if responses.send(Ok(full_response(&snapshot))).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            change = changes.recv() => {
                let response = match change {
                    Ok(delta) if delta.version <= sent_version => continue,
                    Ok(delta) if delta.version == sent_version + 1 => {
                        sent_version = delta.version;
                        delta_response(&delta)
                    }
                    // A gap (missed changes) or a lagging receiver: start over
                    // from the whole state.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let snapshot = store.snapshot();
                        sent_version = snapshot.version;
                        tracing::info!(%node, version = sent_version, "stream fell behind; sending a full snapshot");
                        full_response(&snapshot)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if responses.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            request = requests.message() => match request {
                Ok(Some(request)) => log_reply(&node, &request),
                Ok(None) => {
                    tracing::info!(%node, "ztunnel closed its discovery stream");
                    return;
                }
                Err(status) => {
                    tracing::info!(%node, %status, "discovery stream ended");
                    return;
                }
            },
        }
    }
}

fn log_reply(node: &str, request: &pb::DiscoveryRequest) {
    match &request.error_detail {
        Some(error) => tracing::warn!(
            %node,
            nonce = %request.response_nonce,
            still_at = %request.version_info,
            reason = %error.message,
            "ztunnel rejected configuration (NACK)"
        ),
        None => {
            tracing::debug!(%node, nonce = %request.response_nonce, version = %request.version_info, "ACK")
        }
    }
}
