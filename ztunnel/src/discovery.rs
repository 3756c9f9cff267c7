//! The discovery client: subscribes as this node, applies every response to
//! the [`WorkloadStore`] (and its trust bundle to [`Trust`]), and ACKs or
//! NACKs it.
//!
//! While the control plane is unreachable the store keeps its last good
//! state, so existing and new connections are served as before; the client
//! reconnects with capped, jittered backoff and resyncs from the full
//! snapshot the server sends on every new stream.

use std::sync::Arc;
use std::time::Duration;

use kanava_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::backoff::Backoff;
use crate::control_plane::ControlPlane;
use crate::learning::MAX_PER_REQUEST;
use crate::metrics::{Metrics, ResultLabels};
use crate::trust::Trust;
use crate::workloads::WorkloadStore;

/// Longest wait between two attempts to subscribe.
pub const RECONNECT_CAP: Duration = Duration::from_millis(1500);

pub async fn run(
    control_plane: ControlPlane,
    store: Arc<WorkloadStore>,
    trust: Arc<Trust>,
    metrics: Arc<Metrics>,
    node: String,
    shutdown: CancellationToken,
) {
    // Capped low: a control plane that comes back (a restart, a replica of
    // a rolling update becoming ready) has every ztunnel subscribed again
    // within about a second and a half; a refused connection costs the
    // control plane next to nothing meanwhile.
    let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_CAP);
    // Taken once: a second client of the same store would ask nothing.
    let Some(mut questions) = store.learning().take_requests() else {
        tracing::error!("a second discovery client for one store");
        return;
    };
    loop {
        let result = tokio::select! {
            result = session(&control_plane, &store, &trust, &metrics, &node, &mut backoff, &mut questions) => result,
            _ = shutdown.cancelled() => return,
        };
        let delay = backoff.next_delay();
        match result {
            Ok(()) => {
                tracing::warn!(retry_in = ?delay, "control plane closed the discovery stream")
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?delay, "discovery stream failed; serving the last good state")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    control_plane: &ControlPlane,
    store: &WorkloadStore,
    trust: &Trust,
    metrics: &Metrics,
    node: &str,
    backoff: &mut Backoff,
    questions: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), Error> {
    let (requests, rx) = mpsc::channel(8);
    let subscribe = pb::DiscoveryRequest {
        node_name: node.to_string(),
        version_info: store.version(),
        on_demand: true,
        ..Default::default()
    };
    // The channel has room; the receiver is alive until the call ends.
    let _ = requests.send(subscribe).await;
    let mut responses = control_plane
        .discovery()
        .stream(control_plane.request(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    // Questions the last stream left unanswered are asked on this one
    // (once it is open: the channel holds only a few requests).
    for learn in store.learning().pending().chunks(MAX_PER_REQUEST) {
        let question = pb::DiscoveryRequest {
            learn: learn.to_vec(),
            ..Default::default()
        };
        if requests.send(question).await.is_err() {
            break;
        }
    }
    // Parts of a full snapshot received so far.
    let mut parts: Option<pb::DiscoveryResponse> = None;
    loop {
        let response = tokio::select! {
            response = responses.message() => match response? {
                Some(response) => response,
                None => break,
            },
            Some(first) = questions.recv() => {
                let mut learn = vec![first];
                while learn.len() < MAX_PER_REQUEST && let Ok(more) = questions.try_recv() {
                    learn.push(more);
                }
                if requests.send(pb::DiscoveryRequest { learn, ..Default::default() }).await.is_err() {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        if !response.learned.is_empty() {
            learned(store, metrics, &response);
            let ack = pb::DiscoveryRequest {
                response_nonce: response.nonce,
                version_info: store.version(),
                ..Default::default()
            };
            if requests.send(ack).await.is_err() {
                break;
            }
            continue;
        }
        let response = if response.full_snapshot {
            let more = response.more;
            let assembled = match parts.take() {
                Some(mut so_far) if so_far.version_info == response.version_info => {
                    so_far.resources.extend(response.resources);
                    so_far.nonce = response.nonce;
                    so_far.trust_bundle = so_far.trust_bundle.or(response.trust_bundle);
                    so_far.on_demand &= response.on_demand;
                    so_far
                }
                // A new snapshot starts; an unfinished one is dropped.
                _ => response,
            };
            if more {
                // Received; nothing is applied until the last part.
                let ack = pb::DiscoveryRequest {
                    response_nonce: assembled.nonce.clone(),
                    version_info: store.version(),
                    ..Default::default()
                };
                parts = Some(assembled);
                if requests.send(ack).await.is_err() {
                    break;
                }
                continue;
            }
            assembled
        } else {
            response
        };
        // The bundle is checked before anything is applied, so a response
        // is taken or refused whole.
        let bundle = response
            .trust_bundle
            .as_ref()
            .map(|bundle| Trust::check(bundle).map(|roots| (roots, &bundle.signer)))
            .transpose();
        let applied = bundle.and_then(|bundle| {
            store.apply(&response)?;
            if let Some((roots, signer)) = bundle {
                trust.apply(roots, signer, metrics);
            }
            Ok(())
        });
        let reply = match applied {
            Ok(()) => {
                metrics
                    .discovery_responses
                    .get_or_create(&ResultLabels { result: "ack" })
                    .inc();
                metrics
                    .discovery_version
                    .set(response.version_info.parse().unwrap_or_default());
                metrics
                    .discovery_last_update
                    .set(Metrics::unix_seconds(std::time::SystemTime::now()));
                tracing::info!(
                    version = %response.version_info,
                    full = response.full_snapshot,
                    resources = response.resources.len(),
                    removed = response.removed.len(),
                    "applied discovery update"
                );
                pb::DiscoveryRequest {
                    response_nonce: response.nonce,
                    version_info: response.version_info,
                    ..Default::default()
                }
            }
            Err(reason) => {
                metrics
                    .discovery_responses
                    .get_or_create(&ResultLabels { result: "nack" })
                    .inc();
                tracing::warn!(version = %response.version_info, %reason, "rejected discovery update; keeping the last good state");
                pb::DiscoveryRequest {
                    response_nonce: response.nonce,
                    version_info: store.version(),
                    error_detail: Some(pb::ErrorDetail { message: reason }),
                    ..Default::default()
                }
            }
        };
        if requests.send(reply).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Applies the answer to questions; an answer that does not apply is
/// logged and its questions count as unanswered (asked again on the next
/// stream; the connections that wait for them are refused at their bound).
fn learned(store: &WorkloadStore, metrics: &Metrics, response: &pb::DiscoveryResponse) {
    match store.apply(response) {
        Ok(()) => {
            metrics.learned.inc_by(response.learned.len() as u64);
            tracing::debug!(asked = ?response.learned, resources = response.resources.len(), "learned");
        }
        Err(reason) => {
            tracing::warn!(asked = ?response.learned, %reason, "an answer from the control plane did not apply")
        }
    }
}
