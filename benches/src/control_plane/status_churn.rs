//! Kubelet status updates at scale: absorbed, and sent to no stream.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::mpsc;

use super::{Arrival, Settings, cluster_pod, replace};
use crate::goals;
use crate::stats::{Better, Collector};

/// Kubelet status updates (a new resourceVersion, a condition's time),
/// written as fast as the benchmark can, then one real change: when every
/// stream has that change, every update before it was absorbed. What the
/// updates cost the streams is what was sent beside that change.
pub(super) async fn pod_status_churn(
    settings: &Settings,
    manifests: &Path,
    metrics: SocketAddr,
    arrived: &mut mpsc::UnboundedReceiver<(usize, Arrival, Instant)>,
    scenario: &str,
    collector: &mut Collector,
) -> anyhow::Result<()> {
    let updates = settings.status_updates;
    // Pods that neither changed nor were rolled out.
    let first = settings.changes + 1;
    if first + updates > settings.pods - settings.rollout {
        bail!("the cluster is too small for {updates} status updates");
    }
    let sent_before = sent_bytes(metrics, "update").await?;
    let started = Instant::now();
    for i in first..first + updates {
        let text = cluster_pod(i, settings, "")
            .replace("resourceVersion: \"1\"", "resourceVersion: \"2\"")
            .replace(
                "status: \"True\"}",
                "status: \"True\", lastProbeTime: \"2026-12-06T00:00:00Z\"}",
            );
        replace(manifests, &manifests.join(format!("pod_{i}.yaml")), &text)?;
    }
    let sentinel = settings.changes;
    replace(
        manifests,
        &manifests.join(format!("pod_{sentinel}.yaml")),
        &cluster_pod(sentinel, settings, ", changed: last"),
    )?;
    let (mut seen, mut sentinel_bytes, mut others) = (0, 0.0, 0);
    while seen < settings.streams {
        match tokio::time::timeout(Duration::from_secs(120), arrived.recv()).await {
            Ok(Some((
                _,
                Arrival::Change {
                    n,
                    bytes,
                    resources,
                },
                _,
            ))) if n == sentinel => {
                seen += 1;
                // A response with the change alone is the change's cost;
                // one that carries status updates too counts whole.
                if resources == 1 {
                    sentinel_bytes += bytes as f64;
                }
            }
            Ok(Some((_, Arrival::Change { .. }, _))) => others += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!(
                "the change after the status updates reached {seen} of {} streams",
                settings.streams
            ),
        }
    }
    let absorbed = started.elapsed();
    if others > 0 {
        bail!("{others} earlier changes arrived again during the status updates");
    }
    collector.measure(
        scenario,
        "pod status updates absorbed per second",
        "updates/s",
        Better::Higher,
        goals::at_largest(settings.pods, goals::SCALE_STATUS_UPDATES_PER_SECOND),
        updates as f64 / absorbed.as_secs_f64(),
    );
    collector.measure(
        scenario,
        &format!("bytes sent to every stream for {updates} pod status updates"),
        "bytes",
        Better::Lower,
        goals::at_largest(settings.pods, goals::SCALE_STATUS_UPDATE_BYTES),
        (sent_bytes(metrics, "update").await? - sent_before - sentinel_bytes).max(0.0),
    );
    Ok(())
}

/// `kanava_control_plane_discovery_sent_bytes_total` of `kind`, from the
/// control plane's `/metrics`.
pub(super) async fn sent_bytes(metrics: SocketAddr, kind: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: control-plane\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await??;
    let series = format!("kanava_control_plane_discovery_sent_bytes_total{{kind=\"{kind}\"}} ");
    Ok(answer
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(str::parse)
        .transpose()?
        .unwrap_or(0.0))
}
