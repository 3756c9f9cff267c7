//! The discovery service: one stream per ztunnel.
//!
//! The stream starts with a full snapshot, then forwards each change from the
//! [`Store`] as an incremental response. Responses are encoded once per
//! version and shared by every stream (a snapshot of 10,000 pods is
//! megabytes; encoding it per stream would cost a hundred times as much
//! work and memory with a hundred ztunnels). So the nonce is derived from the
//! version — `<version>-full` or `<version>-delta` — which keeps it unique
//! within a stream. The client's ACKs and NACKs are logged, a NACK with its
//! reason at warn level, so a ztunnel refusing configuration is visible.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use kanava_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::metrics::{Metrics, PushLabels};
use crate::store::Store;

pub struct DiscoveryService {
    store: Arc<Store>,
}

impl DiscoveryService {
    pub fn new(store: Arc<Store>) -> Self {
        DiscoveryService { store }
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = auth::node_of(&request)?;
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
        let (responses, rx) = mpsc::channel(4);
        tokio::spawn(serve_stream(self.store.clone(), node, requests, responses));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Encoded `DiscoveryResponse` messages.
type ResponseStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

async fn serve_stream(
    store: Arc<Store>,
    node: String,
    mut requests: Streaming<pb::DiscoveryRequest>,
    responses: mpsc::Sender<Result<Bytes, Status>>,
) {
    let (snapshot, mut changes) = store.subscribe().await;
    let metrics = store.metrics();
    let _connected = Connected::count(metrics);
    let mut sent_version = snapshot.version;
    if !send_snapshot(metrics, &responses, &snapshot).await {
        return;
    }
    // Set when the ztunnel refused a full snapshot: resending it would be
    // refused again, so the next change goes out as a full snapshot.
    let mut resync_on_next_change = false;
    loop {
        tokio::select! {
            change = changes.recv() => {
                let sent = match change {
                    Ok(delta) if delta.version <= sent_version => continue,
                    Ok(delta) if delta.version == sent_version + 1 && !resync_on_next_change => {
                        sent_version = delta.version;
                        metrics.push_delay.observe(delta.created.elapsed().as_secs_f64());
                        metrics.pushes.get_or_create(&PushLabels { kind: "update" }).inc();
                        responses.send(Ok(delta.encoded.clone())).await.is_ok()
                    }
                    // A gap (missed changes), a lagging receiver, or a
                    // ztunnel whose state we no longer know: start over from
                    // the whole state.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        resync_on_next_change = false;
                        let snapshot = store.snapshot();
                        sent_version = snapshot.version;
                        tracing::info!(%node, version = sent_version, "sending a full snapshot");
                        send_snapshot(metrics, &responses, &snapshot).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !sent {
                    return;
                }
            }
            request = requests.message() => match request {
                Ok(Some(request)) => {
                    log_reply(&node, &request);
                    if request.error_detail.is_none() {
                        continue;
                    }
                    metrics.nacks.inc();
                    if crate::store::is_delta_nonce(&request.response_nonce) {
                        // The ztunnel kept its state from before this delta,
                        // and any later delta was applied on a base this side
                        // does not know: converge by sending everything.
                        let snapshot = store.snapshot();
                        sent_version = snapshot.version;
                        tracing::info!(%node, version = sent_version, "update rejected; resending the full state");
                        if !send_snapshot(metrics, &responses, &snapshot).await {
                            return;
                        }
                    } else {
                        resync_on_next_change = true;
                    }
                }
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

/// Sends the parts of a snapshot in order; false when the stream is gone.
async fn send_all(responses: &mpsc::Sender<Result<Bytes, Status>>, parts: &[Bytes]) -> bool {
    for part in parts {
        if responses.send(Ok(part.clone())).await.is_err() {
            return false;
        }
    }
    true
}

/// Counts a discovery stream as connected while it lives.
struct Connected<'a>(&'a Metrics);

impl<'a> Connected<'a> {
    fn count(metrics: &'a Metrics) -> Self {
        metrics.ztunnels_connected.inc();
        Connected(metrics)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.ztunnels_connected.dec();
    }
}

async fn send_snapshot(
    metrics: &Metrics,
    responses: &mpsc::Sender<Result<Bytes, Status>>,
    snapshot: &crate::store::Snapshot,
) -> bool {
    metrics
        .pushes
        .get_or_create(&PushLabels { kind: "snapshot" })
        .inc();
    send_all(responses, &snapshot.encoded()).await
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

// The gRPC route is written out here instead of generated: the generated
// server encodes a `DiscoveryResponse` per stream, and this one sends bytes
// encoded once. It mirrors what tonic generates for `Discovery.Stream`.

/// The `kanava.v1.Discovery` gRPC service.
#[derive(Clone)]
pub struct DiscoveryServer {
    service: Arc<DiscoveryService>,
    max_decoding_message_size: usize,
    max_encoding_message_size: usize,
}

/// Largest message a ztunnel sends on its discovery stream: an ACK, or a
/// NACK with its reason.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

impl DiscoveryServer {
    /// `max_message_bytes` bounds what is sent; what is received is bounded
    /// by [`MAX_REQUEST_BYTES`], and nothing is read from a stream before its
    /// caller is authenticated.
    pub fn new(service: DiscoveryService, max_message_bytes: usize) -> Self {
        DiscoveryServer {
            service: Arc::new(service),
            max_decoding_message_size: MAX_REQUEST_BYTES.min(max_message_bytes),
            max_encoding_message_size: max_message_bytes,
        }
    }
}

impl NamedService for DiscoveryServer {
    const NAME: &'static str = "kanava.v1.Discovery";
}

const STREAM_PATH: &str = "/kanava.v1.Discovery/Stream";

impl<B> tower::Service<http::Request<B>> for DiscoveryServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STREAM_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let service = StreamMethod(self.service.clone());
        let mut grpc = Grpc::new(PreEncodedCodec).apply_max_message_size_config(
            Some(self.max_decoding_message_size),
            Some(self.max_encoding_message_size),
        );
        Box::pin(async move { Ok(grpc.streaming(service, request).await) })
    }
}

struct StreamMethod(Arc<DiscoveryService>);

impl StreamingService<pb::DiscoveryRequest> for StreamMethod {
    type Response = Bytes;
    type ResponseStream = ResponseStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<pb::DiscoveryRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.subscribe(request).await })
    }
}

/// Decodes requests with prost; sends responses that are already encoded.
#[derive(Clone, Copy, Default)]
struct PreEncodedCodec;

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = pb::DiscoveryRequest;
    type Encoder = PassThrough;
    type Decoder = <tonic_prost::ProstCodec<(), pb::DiscoveryRequest> as Codec>::Decoder;

    fn encoder(&mut self) -> PassThrough {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<(), pb::DiscoveryRequest>::default().decoder()
    }
}

struct PassThrough;

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}
