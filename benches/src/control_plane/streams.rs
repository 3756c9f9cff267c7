//! The load generator's streams: each acts as a ztunnel, reading responses
//! without decoding their resources, and one asks for addresses on demand.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kanava_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Arrival, Settings, Watched, pod_ip};

/// Addresses asked, one after another, on a stream of its own.
const LEARNED_ADDRESSES: usize = 300;

/// What a first connection to an address a ztunnel does not hold waits
/// for: a question on its discovery stream (node 0's second stream, on
/// demand, while every other stream is connected) and the answer, timed
/// for pods all over the cluster.
pub(super) async fn learn_round_trips(
    channel: tonic::transport::Channel,
    token: &str,
    settings: &Settings,
) -> anyhow::Result<Vec<f64>> {
    let (requests, rx) = mpsc::channel(16);
    requests
        .send(pb::DiscoveryRequest {
            node_name: "node-0".into(),
            on_demand: true,
            ..Default::default()
        })
        .await?;
    let mut responses = open(channel, token, rx, true).await?;
    // The snapshot first.
    while let Some(response) = responses.message().await? {
        if response.full_snapshot && !response.more {
            break;
        }
    }
    let mut round_trips = Vec::with_capacity(LEARNED_ADDRESSES);
    for i in 0..LEARNED_ADDRESSES {
        // Pods spread over the cluster, none on node 0.
        let pod = (i * 7919 + 1) % settings.pods;
        let pod = if pod.is_multiple_of(settings.nodes) {
            pod + 1
        } else {
            pod
        };
        let asked = Instant::now();
        requests
            .send(pb::DiscoveryRequest {
                learn: vec![pod_ip(pod)],
                ..Default::default()
            })
            .await?;
        loop {
            let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .context("no answer within 10 s")??
                .context("the stream ended")?;
            if !response.learned.is_empty() {
                if response.resources.len() != 1 {
                    bail!(
                        "{} answered with {} resources",
                        pod_ip(pod),
                        response.resources.len()
                    );
                }
                round_trips.push(asked.elapsed().as_secs_f64() * 1e6);
                break;
            }
        }
    }
    Ok(round_trips)
}

/// A `DiscoveryResponse` read without decoding its resources: the load
/// generator acts as a hundred ztunnels on the same machine as the control
/// plane, and decoding every resource a hundred times over would measure the
/// generator instead. Field numbers and wire types match the real message.
#[derive(Clone, PartialEq, prost::Message)]
struct ShallowResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(string, tag = "2")]
    nonce: String,
    #[prost(bool, tag = "3")]
    full_snapshot: bool,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    resources: Vec<bytes::Bytes>,
    #[prost(string, repeated, tag = "5")]
    removed: Vec<String>,
    #[prost(bool, tag = "6")]
    more: bool,
    /// Kept as bytes: it counts in the size of a response.
    #[prost(bytes = "bytes", optional, tag = "7")]
    trust_bundle: Option<bytes::Bytes>,
    #[prost(bool, tag = "8")]
    on_demand: bool,
    #[prost(string, repeated, tag = "9")]
    learned: Vec<String>,
}

/// The name of a `Resource`, skipping its content.
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceName {
    #[prost(string, tag = "1")]
    name: String,
}

/// One subscriber's part in the run.
pub(super) struct Follower {
    pub(super) node: usize,
    pub(super) token: String,
    pub(super) watched: Arc<HashMap<String, Watched>>,
    /// Whether it acts as a ztunnel of this release (it accepts compressed
    /// responses and can learn on demand) or of the previous one (neither).
    pub(super) this_release: bool,
    pub(super) arrivals: mpsc::UnboundedSender<(usize, Arrival, Instant)>,
}

/// Acts as one ztunnel: subscribes, ACKs, and reports when the snapshot,
/// each changed pod (with the size of the response that carried it) and
/// each pod of the rollout arrive.
pub(super) async fn follow(
    channel: tonic::transport::Channel,
    follower: Follower,
) -> anyhow::Result<()> {
    let Follower {
        node,
        token,
        watched,
        this_release,
        arrivals,
    } = follower;
    use prost::Message;
    let (requests, rx) = mpsc::channel(16);
    requests
        .send(pb::DiscoveryRequest {
            node_name: format!("node-{node}"),
            on_demand: this_release,
            ..Default::default()
        })
        .await?;
    let mut responses = open(channel, &token, rx, this_release).await?;
    let mut snapshot_bytes = 0;
    while let Some(response) = responses.message().await? {
        let at = Instant::now();
        if response.full_snapshot {
            snapshot_bytes += response.encoded_len();
            if !response.more {
                let bytes = std::mem::take(&mut snapshot_bytes);
                let _ = arrivals.send((node, Arrival::Snapshot { bytes }, at));
            }
        } else {
            let bytes = response.encoded_len();
            for resource in &response.resources {
                let name = ResourceName::decode(resource.clone())?.name;
                let arrival = match name
                    .strip_prefix("workload/")
                    .and_then(|uid| watched.get(uid))
                {
                    Some(Watched::Change(n)) => Arrival::Change {
                        n: *n,
                        bytes,
                        resources: response.resources.len() + response.removed.len(),
                    },
                    Some(Watched::Rollout(n)) => Arrival::Rollout { n: *n },
                    None => continue,
                };
                let _ = arrivals.send((node, arrival, at));
            }
        }
        let _ = requests
            .send(pb::DiscoveryRequest {
                response_nonce: response.nonce,
                version_info: response.version_info,
                ..Default::default()
            })
            .await;
    }
    Ok(())
}

/// A discovery stream as node `token` holds, sending what `requests`
/// gives; `compressed`: it accepts zstd, as a ztunnel of this release does.
async fn open(
    channel: tonic::transport::Channel,
    token: &str,
    requests: mpsc::Receiver<pb::DiscoveryRequest>,
    compressed: bool,
) -> anyhow::Result<tonic::Streaming<ShallowResponse>> {
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    if compressed {
        grpc = grpc.accept_compressed(tonic::codec::CompressionEncoding::Zstd);
    }
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<pb::DiscoveryRequest, ShallowResponse>::default();
    Ok(grpc
        .streaming(
            request,
            http::uri::PathAndQuery::from_static("/kanava.v1.Discovery/Stream"),
            codec,
        )
        .await?
        .into_inner())
}
