//! `kanava status --kubeconfig`: the mesh on a cluster, read through its
//! API server: the control plane's and the ztunnels' pods (one per node?),
//! their readiness and restarts, and what their metrics say (through the
//! API server's proxy to the metrics port).
//!
//! Every network call shares one deadline (`--timeout`). An operator runs
//! `status` exactly when something is wrong, so it never waits on the
//! client library's retries (a 503 from the API server's proxy is an
//! answer: "nothing behind this"), asks pods that cannot answer, or hangs
//! on one slow pod: what did not answer in time is reported as such.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use tokio::time::Instant;

use crate::health::{Health, ZtunnelStatus, all_values, metric};

/// Label of the control plane's pods (the chart's).
const CONTROL_PLANE_PODS: &str = "app.kubernetes.io/name=kanava-control-plane";
/// Label of the ztunnels' pods.
const ZTUNNEL_PODS: &str = "app.kubernetes.io/name=ztunnel";
/// Metrics read through the API server at once: enough to read a large
/// cluster within the deadline, few enough not to burden the API server.
const CONCURRENT_READS: usize = 16;

/// One deadline for every network call of a command.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    pub fn after(budget: Duration) -> Self {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// `call`'s result, or an error naming `what` once the deadline passes.
    pub async fn bound<T, E>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, E>>,
    ) -> anyhow::Result<T>
    where
        E: Into<anyhow::Error>,
    {
        match tokio::time::timeout_at(self.at, call).await {
            Ok(result) => result.map_err(Into::into).with_context(|| what.to_string()),
            Err(_) => Err(anyhow::anyhow!(
                "{what}: no answer within {} (--timeout)",
                humantime::format_duration(self.budget)
            )),
        }
    }
}

/// Reads the state of the mesh installed in `namespace`, within `timeout`.
pub fn status(kubeconfig: &Path, namespace: &str, timeout: Duration) -> anyhow::Result<Health> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(read(kubeconfig, namespace, Deadline::after(timeout)))
}

async fn read(kubeconfig: &Path, namespace: &str, deadline: Deadline) -> anyhow::Result<Health> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    // Reading a kubeconfig may run an exec credential plugin: bounded too.
    let mut config = deadline
        .bound(
            &format!("use {}", kubeconfig.display()),
            kube::Config::from_custom_kubeconfig(file, &Default::default()),
        )
        .await?;
    config.connect_timeout = Some(deadline.budget);
    config.read_timeout = Some(deadline.budget);
    // A 503 is the answer ("no endpoints available"), not a reason to wait.
    config.default_retry = false;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)?;
    let unreachable = |what: &str| format!("{what} (API server {server})");

    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let (all, ztunnel_label, control_plane_label) = (
        ListParams::default(),
        ListParams::default().labels(ZTUNNEL_PODS),
        ListParams::default().labels(CONTROL_PLANE_PODS),
    );
    let (list_nodes, list_ztunnels, list_control_plane) = (
        unreachable("list nodes"),
        unreachable("list the ztunnel pods"),
        unreachable("list the control plane's pods"),
    );
    let (nodes, ztunnel_pods, control_plane_pods) = tokio::try_join!(
        deadline.bound(&list_nodes, nodes.list(&all)),
        deadline.bound(&list_ztunnels, pods.list(&ztunnel_label)),
        deadline.bound(&list_control_plane, pods.list(&control_plane_label)),
    )?;
    let nodes: Vec<String> = nodes
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();

    // Metrics of the control plane and of every ztunnel that can answer,
    // read at once.
    let reads = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_READS));
    let read_metrics = |path: String, what: String| {
        let (client, reads) = (client.clone(), reads.clone());
        tokio::spawn(async move {
            let _turn = reads.acquire_owned().await;
            deadline.bound(&what, proxied(&client, &path)).await
        })
    };
    let mut problems = Vec::new();
    let ready_control_plane = control_plane_pods.items.iter().find(|p| pod_ready(p));
    let control_plane = match ready_control_plane {
        Some(_) => Some(read_metrics(
            format!(
                "/api/v1/namespaces/{namespace}/services/kanava-control-plane:15014/proxy/metrics"
            ),
            "read the control plane's metrics".into(),
        )),
        None => {
            problems.push(no_ready_control_plane(namespace, &control_plane_pods.items));
            None
        }
    };
    let mut ztunnels = Vec::new();
    let mut ztunnel_metrics = Vec::new();
    for node in &nodes {
        let Some(pod) = ztunnel_pods
            .items
            .iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        else {
            ztunnels.push(ZtunnelStatus {
                node: node.clone(),
                process: "none".into(),
                problems: vec![format!(
                    "no ztunnel pod: enrolled pods cannot start here; kubectl -n {namespace} describe daemonset ztunnel"
                )],
                ..ZtunnelStatus::default()
            });
            ztunnel_metrics.push(None);
            continue;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let mut ztunnel = ZtunnelStatus {
            node: node.clone(),
            process: name.clone(),
            ready: pod_ready(pod),
            restarts: status
                .container_statuses
                .iter()
                .flatten()
                .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
                .sum(),
            ..ZtunnelStatus::default()
        };
        let running = status.phase.as_deref() == Some("Running");
        if running {
            ztunnel_metrics.push(Some(read_metrics(
                format!("/api/v1/namespaces/{namespace}/pods/{name}:15020/proxy/metrics"),
                format!("read the metrics of {name}"),
            )));
        } else {
            ztunnel.problems.push(format!(
                "the ztunnel pod is {}: kubectl -n {namespace} describe pod {name}",
                phase_and_reason(pod)
            ));
            ztunnel_metrics.push(None);
        }
        ztunnels.push(ztunnel);
    }

    let mut control_plane_ready = false;
    let mut control_plane_version = None;
    if let Some(read) = control_plane {
        match joined(read).await {
            Ok(text) => {
                control_plane_ready = metric(&text, "kanava_control_plane_source_synced") == Some(1.0);
                control_plane_version = metric(&text, "kanava_control_plane_configuration_version");
                if !control_plane_ready {
                    problems.push(format!(
                        "the control plane has not read the cluster in full: kubectl -n {namespace} logs deployment/kanava-control-plane"
                    ));
                }
            }
            Err(error) => problems.push(format!(
                "the control plane's metrics are unreachable ({error:#}): kubectl -n {namespace} logs deployment/kanava-control-plane"
            )),
        }
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    for (ztunnel, read) in ztunnels.iter_mut().zip(ztunnel_metrics) {
        let logs = format!("kubectl -n {namespace} logs {} -c ztunnel", ztunnel.process);
        if let Some(read) = read {
            match joined(read).await {
                Err(error) => ztunnel
                    .problems
                    .push(format!("its metrics are unreachable ({error:#}); {logs}")),
                Ok(text) => read_ztunnel_metrics(ztunnel, &text, now, &logs),
            }
        }
        if ztunnel.process != "none" && !ztunnel.ready {
            ztunnel
                .problems
                .push(format!("the ztunnel is not ready; {logs}"));
        }
        if let (Some(held), Some(served)) = (&ztunnel.version, control_plane_version)
            && held.parse::<f64>().ok() != Some(served)
        {
            ztunnel.problems.push(format!(
                "the ztunnel holds discovery version {held}, the control plane serves {served}: a change may be in flight (run again), else {logs}"
            ));
        }
    }
    Ok(Health {
        name: format!("cluster (namespace {namespace})"),
        control_plane_ready,
        control_plane_version,
        ztunnels,
        problems,
    })
}

fn read_ztunnel_metrics(ztunnel: &mut ZtunnelStatus, text: &str, now: f64, logs: &str) {
    ztunnel.version = metric(text, "kanava_discovery_version").map(|v| v.to_string());
    ztunnel.captured = metric(text, "kanava_pods_captured").unwrap_or(0.0) as usize;
    let expiries = all_values(text, "kanava_certificate_expiry_timestamp_seconds");
    ztunnel.certificates = expiries.len();
    ztunnel.roots = metric(text, "kanava_trust_roots").map(|roots| roots as usize);
    ztunnel.superseded = metric(text, "kanava_certificates_superseded").unwrap_or(0.0) as usize;
    if let Some(soonest) = expiries.into_iter().reduce(f64::min) {
        let when = UNIX_EPOCH + Duration::from_secs_f64(soonest.max(0.0));
        ztunnel.next_expiry = Some(humantime::format_rfc3339_seconds(when).to_string());
        if soonest - now < 600.0 {
            ztunnel.problems.push(format!(
                "a certificate expires within 10 minutes: renewals are failing; {logs}"
            ));
        }
    }
}

/// A spawned read's result (a read that panicked is reported, not raised).
async fn joined(read: tokio::task::JoinHandle<anyhow::Result<String>>) -> anyhow::Result<String> {
    read.await.context("the read failed")?
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `Pending (Unschedulable: 0/3 nodes are available...)`, `Running, not
/// ready (CrashLoopBackOff)`: what `kubectl get pod` would hint at.
fn phase_and_reason(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Unknown".into());
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
        .next();
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("not scheduled"),
                c.message.as_deref().unwrap_or_default()
            )
        });
    match (unscheduled.or(waiting), phase.as_str()) {
        (Some(reason), _) => format!("{phase} ({reason})"),
        (None, "Running") => "Running, not ready".into(),
        (None, _) => phase,
    }
}

fn no_ready_control_plane(namespace: &str, pods: &[Pod]) -> String {
    match pods.first() {
        None => format!(
            "no control plane pod: kubectl -n {namespace} describe deployment kanava-control-plane"
        ),
        Some(pod) => {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            format!(
                "no ready control plane pod ({name} is {}): kubectl -n {namespace} describe pod {name}",
                phase_and_reason(pod)
            )
        }
    }
}

/// A GET through the API server (its proxy to pods and services).
async fn proxied(client: &kube::Client, path: &str) -> anyhow::Result<String> {
    let request = http::Request::get(path).body(Vec::new())?;
    Ok(client.request_text(request).await?)
}
