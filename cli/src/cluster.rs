//! `kanava status --kubeconfig`: the mesh on a cluster, read through its
//! API server: the ztunnel pods (one per node?), their readiness and
//! restarts, and what their metrics say (through the API server's proxy to
//! the metrics port), against the control plane's.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;

use crate::health::{Health, ZtunnelStatus, all_values, metric};

/// Reads the state of the mesh installed in `namespace`.
pub fn status(kubeconfig: &Path, namespace: &str) -> anyhow::Result<Health> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(read(kubeconfig, namespace))
}

async fn read(kubeconfig: &Path, namespace: &str) -> anyhow::Result<Health> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .with_context(|| format!("use {}", kubeconfig.display()))?;
    config.read_timeout = Some(Duration::from_secs(10));
    let client = kube::Client::try_from(config)?;

    let mut problems = Vec::new();
    let control_plane =
        format!("/api/v1/namespaces/{namespace}/services/kanava-control-plane:15014/proxy/metrics");
    let control_plane = proxied(&client, &control_plane).await;
    let (control_plane_ready, control_plane_version) = match &control_plane {
        Ok(text) => (
            metric(text, "kanava_control_plane_source_synced") == Some(1.0),
            metric(text, "kanava_control_plane_configuration_version"),
        ),
        Err(error) => {
            problems.push(format!(
                "the control plane's metrics are unreachable ({error}): kubectl -n {namespace} get pods -l app.kubernetes.io/name=kanava-control-plane"
            ));
            (false, None)
        }
    };
    if control_plane.is_ok() && !control_plane_ready {
        problems.push(format!(
            "the control plane has not read the cluster in full: kubectl -n {namespace} logs deployment/kanava-control-plane"
        ));
    }

    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let nodes: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .context("list nodes")?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=ztunnel"))
        .await
        .context("list ztunnel pods")?
        .items;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let mut ztunnels = Vec::new();
    for node in &nodes {
        let Some(pod) = pods
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
            continue;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let mut ztunnel = ZtunnelStatus {
            node: node.clone(),
            process: name.clone(),
            ready: status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            restarts: status
                .container_statuses
                .iter()
                .flatten()
                .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
                .sum(),
            ..ZtunnelStatus::default()
        };
        let logs = format!("kubectl -n {namespace} logs {name} -c ztunnel");
        let metrics = format!("/api/v1/namespaces/{namespace}/pods/{name}:15020/proxy/metrics");
        match proxied(&client, &metrics).await {
            Err(error) => ztunnel
                .problems
                .push(format!("its metrics are unreachable ({error}); {logs}")),
            Ok(text) => {
                ztunnel.version = metric(&text, "kanava_discovery_version").map(|v| v.to_string());
                ztunnel.captured = metric(&text, "kanava_pods_captured").unwrap_or(0.0) as usize;
                let expiries = all_values(&text, "kanava_certificate_expiry_timestamp_seconds");
                ztunnel.certificates = expiries.len();
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
        }
        if !ztunnel.ready {
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
        ztunnels.push(ztunnel);
    }
    Ok(Health {
        name: format!("cluster (namespace {namespace})"),
        control_plane_ready,
        control_plane_version,
        ztunnels,
        problems,
    })
}

/// A GET through the API server (its proxy to pods and services).
async fn proxied(client: &kube::Client, path: &str) -> anyhow::Result<String> {
    let request = http::Request::get(path).body(Vec::new())?;
    Ok(client.request_text(request).await?)
}
