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
//!
//! A ztunnel that says it accepts zstd (`grpc-accept-encoding`) is sent
//! the compressed form of each snapshot part and of large changes, made
//! once and shared like the rest; one that does not (an earlier release)
//! is sent every message as it was, so both work against this server.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use kanava_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Codec;
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::metrics::{Metrics, PushLabels};
use crate::store::{Outgoing, Store};

pub struct DiscoveryService {
    store: Arc<Store>,
    on_demand_above: usize,
}

impl DiscoveryService {
    /// `on_demand_above`: from how many resources on a ztunnel that can
    /// learn on demand is served that way (see [`crate::store::on_demand`]).
    pub fn new(store: Arc<Store>, on_demand_above: usize) -> Self {
        DiscoveryService {
            store,
            on_demand_above,
        }
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = auth::node_of(&request)?;
        let compressed = accepts_zstd(&request);
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
        let stream = StreamMode {
            compressed,
            on_demand: first.on_demand,
            on_demand_above: self.on_demand_above,
        };
        tracing::info!(%node, resumed_from = %first.version_info, compressed, can_learn = first.on_demand, "ztunnel subscribed");
        let (responses, rx) = mpsc::channel(4);
        tokio::spawn(serve_stream(
            self.store.clone(),
            node,
            stream,
            requests,
            responses,
        ));
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as ResponseStream);
        if compressed {
            response
                .metadata_mut()
                .insert(ENCODING_HEADER, MetadataValue::from_static(ZSTD));
        }
        Ok(response)
    }
}

const ACCEPT_ENCODING_HEADER: &str = "grpc-accept-encoding";
const ENCODING_HEADER: &str = "grpc-encoding";
const ZSTD: &str = "zstd";

/// Whether the caller accepts zstd-compressed responses.
fn accepts_zstd<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get(ACCEPT_ENCODING_HEADER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|encoding| encoding.trim() == ZSTD))
}

/// Encoded `DiscoveryResponse` messages.
type ResponseStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

type Responses = mpsc::Sender<Result<Outgoing, Status>>;

/// How one stream is served.
#[derive(Clone, Copy, Debug)]
struct StreamMode {
    /// The ztunnel accepts zstd.
    compressed: bool,
    /// The ztunnel can learn workloads on demand.
    on_demand: bool,
    on_demand_above: usize,
}

async fn serve_stream(
    store: Arc<Store>,
    node: String,
    mode: StreamMode,
    mut requests: Streaming<pb::DiscoveryRequest>,
    responses: Responses,
) {
    let (snapshot, mut changes) = store.subscribe().await;
    let metrics = store.metrics();
    let _connected = Connected::count(metrics);
    let compressed = mode.compressed;
    // Decided once per stream: a ztunnel that can learn on demand, in a
    // mesh large enough for it to matter.
    let on_demand = mode.on_demand && snapshot.resources.len() >= mode.on_demand_above;
    if on_demand {
        tracing::info!(%node, "serving on demand");
    }
    // Takes the snapshot: a stream lives for days, and keeping the one it
    // started from would pin that version's copy of every resource.
    let send_snapshot = async |snapshot: Arc<crate::store::Snapshot>| {
        let parts = if on_demand {
            snapshot.on_demand(&node, compressed).into()
        } else {
            snapshot.encoded(compressed)
        };
        send_parts(metrics, &responses, &parts).await
    };
    let mut sent_version = snapshot.version;
    if !send_snapshot(snapshot).await {
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
                        let update = PushLabels { kind: "update" };
                        metrics.pushes.get_or_create(&update).inc();
                        let outgoing = delta.outgoing(compressed);
                        metrics.sent_bytes.get_or_create(&update).inc_by(outgoing.bytes.len() as u64);
                        responses.send(Ok(outgoing)).await.is_ok()
                    }
                    // A gap (missed changes), a lagging receiver, or a
                    // ztunnel whose state we no longer know: start over from
                    // the whole state.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        resync_on_next_change = false;
                        let snapshot = store.snapshot();
                        sent_version = snapshot.version;
                        tracing::info!(%node, version = sent_version, "sending a full snapshot");
                        send_snapshot(snapshot).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !sent {
                    return;
                }
            }
            request = requests.message() => match request {
                Ok(Some(request)) if !request.learn.is_empty() => {
                    // Only an on-demand stream asks; anyone may, and is
                    // answered from the current state.
                    let found = store.learn(&request.learn);
                    metrics.learned.inc_by(request.learn.len() as u64);
                    let answer = crate::store::on_demand::encode_answer(sent_version, request.learn, &found, compressed);
                    metrics.sent_bytes.get_or_create(&PushLabels { kind: "learned" }).inc_by(answer.bytes.len() as u64);
                    if responses.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
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
                        if !send_snapshot(snapshot).await {
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
async fn send_all(responses: &Responses, parts: &[Outgoing]) -> bool {
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

async fn send_parts(metrics: &Metrics, responses: &Responses, parts: &[Outgoing]) -> bool {
    let labels = PushLabels { kind: "snapshot" };
    metrics.pushes.get_or_create(&labels).inc();
    let bytes: usize = parts.iter().map(|part| part.bytes.len()).sum();
    metrics
        .sent_bytes
        .get_or_create(&labels)
        .inc_by(bytes as u64);
    send_all(responses, parts).await
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
// server encodes a `DiscoveryResponse` per stream, and tonic's encoder
// copies every message into a buffer of its stream. This one sends the
// bytes encoded once, by reference: with 1,000 streams taking a 20 MB
// snapshot at once, that is 20 GB not copied and no per-stream buffers.
// Requests are decoded by tonic, as the generated route does.

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
    B: http_body::Body<Data = Bytes> + Send + 'static,
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
        // Compressed requests are not accepted (tonic answers the same);
        // responses are, when the caller says so.
        if let Some(encoding) = request
            .headers()
            .get("grpc-encoding")
            .filter(|e| e.as_bytes() != b"identity")
        {
            let status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(encoding.as_bytes())
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let service = self.service.clone();
        let max_encoded = self.max_encoding_message_size;
        let request = request.map(|body| {
            Streaming::new_request(
                tonic_prost::ProstCodec::<(), pb::DiscoveryRequest>::default().decoder(),
                body,
                None,
                Some(self.max_decoding_message_size),
            )
        });
        Box::pin(async move {
            let response = match service.subscribe(Request::from_http(request)).await {
                Ok(response) => response,
                Err(status) => return Ok(status.into_http()),
            };
            let (metadata, responses, extensions) = response.into_parts();
            let mut http_response = http::Response::new(());
            *http_response.headers_mut() = metadata.into_headers();
            *http_response.extensions_mut() = extensions;
            http_response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            let (parts, ()) = http_response.into_parts();
            let body = PreEncodedBody {
                responses,
                max_encoded,
                next: None,
                done: false,
            };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// Messages below this size go out with their gRPC prefix in one piece
/// (a copy of a few hundred bytes); larger ones as the prefix and the
/// shared message.
const COPY_BELOW: usize = 4096;

/// The response body: each message framed as gRPC (a 5-byte prefix:
/// whether it is compressed, its length), then `grpc-status` trailers.
struct PreEncodedBody {
    responses: ResponseStream,
    max_encoded: usize,
    /// A message whose prefix was just sent.
    next: Option<Bytes>,
    done: bool,
}

impl http_body::Body for PreEncodedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(message) = self.next.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(message))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let ended = match std::task::ready!(self.responses.as_mut().poll_next(cx)) {
            Some(Ok(Outgoing {
                bytes: message,
                compressed,
            })) => match u32::try_from(message.len()) {
                Ok(length) if message.len() <= self.max_encoded => {
                    let mut prefix = [u8::from(compressed), 0, 0, 0, 0];
                    prefix[1..].copy_from_slice(&length.to_be_bytes());
                    if message.len() < COPY_BELOW {
                        let mut framed = Vec::with_capacity(5 + message.len());
                        framed.extend_from_slice(&prefix);
                        framed.extend_from_slice(&message);
                        return Poll::Ready(Some(Ok(http_body::Frame::data(framed.into()))));
                    }
                    self.next = Some(message);
                    return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::copy_from_slice(
                        &prefix,
                    )))));
                }
                _ => Status::out_of_range(format!(
                    "a response of {} bytes is over the limit of {} (--max-message-bytes)",
                    message.len(),
                    self.max_encoded
                )),
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        // tonic writes a status as headers; as trailers only its own fields.
        let mut trailers = http::HeaderMap::new();
        for (name, value) in ended.into_http::<()>().headers() {
            if name.as_str().starts_with("grpc-") {
                trailers.insert(name.clone(), value.clone());
            }
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.next.is_none()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn body(messages: Vec<Result<Bytes, Status>>, max_encoded: usize) -> PreEncodedBody {
        let messages = messages.into_iter().map(|m| m.map(Outgoing::plain));
        PreEncodedBody {
            responses: Box::pin(futures::stream::iter(messages)),
            max_encoded,
            next: None,
            done: false,
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    #[tokio::test]
    async fn messages_are_framed_as_grpc_and_end_with_a_status() {
        let small = Bytes::from_static(b"delta");
        let large = Bytes::from(vec![7u8; COPY_BELOW * 3]);
        let collected = body(vec![Ok(small.clone()), Ok(large.clone())], 1 << 20)
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        let mut expected = framed(&small);
        expected.extend(framed(&large));
        assert_eq!(collected.to_bytes().to_vec(), expected);
    }

    #[tokio::test]
    async fn a_compressed_message_carries_the_compressed_flag() {
        let message = Bytes::from(vec![3u8; COPY_BELOW * 2]);
        let body = PreEncodedBody {
            responses: Box::pin(futures::stream::iter([Ok(Outgoing {
                bytes: message.clone(),
                compressed: true,
            })])),
            max_encoded: 1 << 20,
            next: None,
            done: false,
        };
        let sent = body.collect().await.unwrap().to_bytes();
        let mut expected = framed(&message);
        expected[0] = 1;
        assert_eq!(sent.to_vec(), expected);
    }

    #[test]
    fn zstd_is_sent_only_to_a_caller_that_accepts_it() {
        let with = |value: Option<&'static str>| {
            let mut request = Request::new(());
            if let Some(value) = value {
                request
                    .metadata_mut()
                    .insert(ACCEPT_ENCODING_HEADER, MetadataValue::from_static(value));
            }
            accepts_zstd(&request)
        };
        assert!(with(Some("zstd")));
        assert!(with(Some("gzip, zstd,identity")));
        assert!(!with(Some("gzip,identity")));
        assert!(!with(Some("zstdx")));
        assert!(!with(None), "an earlier ztunnel says nothing");
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_stream_with_out_of_range() {
        let collected = body(
            vec![
                Ok(Bytes::from_static(b"fits")),
                Ok(Bytes::from(vec![0u8; 100])),
                Ok(Bytes::from_static(b"never sent")),
            ],
            10,
        )
        .collect()
        .await
        .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "11", "{trailers:?}");
        assert_eq!(collected.to_bytes().to_vec(), framed(b"fits"));
    }
}
