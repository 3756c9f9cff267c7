//! `kanava check`: what an operator would otherwise learn from a pod that
//! does not start. Before an install (`--pre`): the API server's version
//! against the chart's floor, the permissions to install, and each node's
//! kernel, mounts and CNI configuration (read by a short-lived probe pod on
//! the node's own network, [`crate::node_facts`]). After it: the same node
//! facts judged against the mesh that runs (a chain that names kanava-cni
//! on a node without a ztunnel is the uninstall trap), and the pods of
//! enrolled namespaces each node should capture.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kanava_mesh::names;
use kube::api::{ListParams, LogParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::time::Instant;

use crate::node_facts::{Finding, NodeFacts};

/// The oldest Kubernetes the chart installs on (`kubeVersion` in
/// Chart.yaml; a test keeps the two equal).
pub const KUBERNETES_FLOOR: (u32, u32) = (1, 28);

/// Label on the namespace of a check's node probes; its value is the run.
pub const RUN_LABEL: &str = "kanava.io/check-run";

/// What the chart creates, as (verb, API group, resource): the
/// permissions `helm install` needs.
const INSTALL_NEEDS: &[(&str, &str, &str)] = &[
    ("create", "", "namespaces"),
    ("create", "", "serviceaccounts"),
    ("create", "", "configmaps"),
    ("create", "", "secrets"),
    ("create", "", "services"),
    ("create", "apps", "deployments"),
    ("create", "apps", "daemonsets"),
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("create", "rbac.authorization.k8s.io", "roles"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    (
        "create",
        "apiextensions.k8s.io",
        "customresourcedefinitions",
    ),
];

/// Where the node probes look, and what they run.
#[derive(Clone, Debug)]
pub struct Options {
    pub mesh_namespace: String,
    pub image: String,
    pub pull_policy: String,
    pub cni_conf_dir: String,
    pub cni_bin_dir: String,
    pub netns_dir: String,
    pub ready_within: Duration,
}

/// The API server's version against [`KUBERNETES_FLOOR`].
pub async fn api_server_version(client: &Client) -> Finding {
    let what = "Kubernetes version";
    match client.apiserver_version().await {
        Ok(info) => {
            let major = info.major.trim_end_matches('+').parse::<u32>().unwrap_or(0);
            let minor = info.minor.trim_end_matches('+').parse::<u32>().unwrap_or(0);
            let (floor_major, floor_minor) = KUBERNETES_FLOOR;
            if (major, minor) >= KUBERNETES_FLOOR {
                Finding::ok(
                    what,
                    format!("{} (≥ {floor_major}.{floor_minor})", info.git_version),
                )
            } else {
                Finding::error(
                    what,
                    format!("{} (< {floor_major}.{floor_minor})", info.git_version),
                    format!(
                        "upgrade the cluster to Kubernetes {floor_major}.{floor_minor} or later"
                    ),
                )
            }
        }
        Err(error) => Finding::error(
            what,
            format!("the API server did not answer: {error}"),
            "check the kubeconfig and that the API server is reachable",
        ),
    }
}

/// Whether the caller may create what the chart creates.
pub async fn install_permissions(client: &Client) -> Finding {
    let what = "permissions to install";
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for (verb, group, resource) in INSTALL_NEEDS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some((*verb).into()),
                    group: Some((*group).into()),
                    resource: Some((*resource).into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(format!("{verb} {resource}")),
            Err(error) => {
                return Finding::error(
                    what,
                    format!("could not ask: {error}"),
                    "the API server refused a SelfSubjectAccessReview",
                );
            }
        }
    }
    if missing.is_empty() {
        Finding::ok(what, format!("all {} allowed", INSTALL_NEEDS.len()))
    } else {
        Finding::error(
            what,
            format!("not allowed: {}", missing.join(", ")),
            "install as a cluster administrator (the chart creates cluster-wide RBAC and CRDs)",
        )
    }
}

/// Reads the facts of every Ready node with a probe pod per node, in a
/// temporary namespace removed before returning. Each node's facts, or why
/// they could not be read.
pub async fn node_facts(
    client: &Client,
    options: &Options,
    id: &str,
) -> Result<BTreeMap<String, Result<NodeFacts, String>>, String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list nodes: {e}"))?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let namespace = format!("kanava-check-{id}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object: Namespace = serde_json::from_value(json!({"metadata": {
        "name": namespace,
        "labels": {RUN_LABEL: id, "pod-security.kubernetes.io/enforce": "privileged"},
    }}))
    .map_err(|e| e.to_string())?;
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| format!("create namespace {namespace}: {e}"))?;
    let result = read_facts(client, options, &namespace, &names).await;
    let _ = remove(client, id, Duration::from_secs(60)).await;
    result
}

async fn read_facts(
    client: &Client,
    options: &Options,
    namespace: &str,
    nodes: &[String],
) -> Result<BTreeMap<String, Result<NodeFacts, String>>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for (index, node) in nodes.iter().enumerate() {
        pods.create(&PostParams::default(), &probe_pod(options, index, node)?)
            .await
            .map_err(|e| format!("create the probe pod for {node}: {e}"))?;
    }
    let deadline = Instant::now() + options.ready_within;
    let mut facts = BTreeMap::new();
    while facts.len() < nodes.len() {
        for (index, node) in nodes.iter().enumerate() {
            if facts.contains_key(node) {
                continue;
            }
            let name = format!("node-facts-{index}");
            let pod = pods
                .get(&name)
                .await
                .map_err(|e| format!("read pod {namespace}/{name}: {e}"))?;
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            match phase.as_deref() {
                Some("Succeeded") => {
                    let log = pods
                        .logs(&name, &LogParams::default())
                        .await
                        .map_err(|e| format!("log of {namespace}/{name}: {e}"))?;
                    facts.insert(
                        node.clone(),
                        serde_json::from_str(log.trim())
                            .map_err(|e| format!("unreadable facts ({e}): {}", crate::short(&log))),
                    );
                }
                Some("Failed") => {
                    facts.insert(node.clone(), Err(format!("the probe pod {name} failed")));
                }
                _ if Instant::now() > deadline => {
                    let waiting = pod
                        .status
                        .and_then(|s| s.container_statuses)
                        .and_then(|all| all.into_iter().next())
                        .and_then(|c| c.state?.waiting)
                        .map(|w| {
                            format!(
                                "{} {}",
                                w.reason.unwrap_or_default(),
                                w.message.unwrap_or_default()
                            )
                        })
                        .unwrap_or_else(|| phase.clone().unwrap_or_else(|| "Pending".into()));
                    facts.insert(
                        node.clone(),
                        Err(format!("the probe pod did not run: {}", waiting.trim())),
                    );
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(facts)
}

fn probe_pod(options: &Options, index: usize, node: &str) -> Result<Pod, String> {
    let host = |name: &str, path: &str, mount: &str| {
        // The runtime makes the netns directory with its first pod anyway.
        let kind = if name == "netns" {
            "DirectoryOrCreate"
        } else {
            ""
        };
        (
            json!({"name": name, "hostPath": {"path": path, "type": kind}}),
            json!({"name": name, "mountPath": mount, "readOnly": true,
                   "mountPropagation": "HostToContainer"}),
        )
    };
    let (volumes, mounts): (Vec<_>, Vec<_>) = [
        host("cni-conf", &options.cni_conf_dir, "/host/etc/cni/net.d"),
        host("cni-bin", &options.cni_bin_dir, "/host/opt/cni/bin"),
        host("netns", &options.netns_dir, "/host/var/run/netns"),
    ]
    .into_iter()
    .unzip();
    serde_json::from_value(json!({
        "metadata": {"name": format!("node-facts-{index}")},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "volumes": volumes,
            "containers": [{
                "name": "facts",
                "image": options.image,
                "imagePullPolicy": options.pull_policy,
                "args": ["node-facts"],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
                "volumeMounts": mounts,
            }],
        }
    }))
    .map_err(|e| e.to_string())
}

/// Removes the namespaces of check run `id`, waiting up to `within`.
pub async fn remove(client: &Client, id: &str, within: Duration) -> Result<(), String> {
    let selector = format!("{RUN_LABEL}={id}");
    match crate::cluster::probes::remove_namespaces(client, &selector, within).await? {
        (_, left) if left.is_empty() => Ok(()),
        (_, left) => Err(format!("still terminating: {}", left.join(", "))),
    }
}

/// Per node, the pods a ztunnel there should capture: running pods of
/// enrolled namespaces, not on the host's network, not opted out.
pub async fn enrolled_pods_by_node(client: &Client) -> Result<BTreeMap<String, usize>, String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let enrolled: Vec<String> = namespaces
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            names::DATAPLANE_MODE_LABEL,
            names::AMBIENT
        )))
        .await
        .map_err(|e| format!("list namespaces: {e}"))?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let mut by_node = BTreeMap::new();
    for namespace in enrolled {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        for pod in pods
            .list(&ListParams::default().fields("status.phase=Running"))
            .await
            .map_err(|e| format!("list pods in {namespace}: {e}"))?
            .items
        {
            let opted_out = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::DATAPLANE_MODE_LABEL))
                .is_some_and(|mode| mode == names::NONE);
            let spec = pod.spec.as_ref();
            if opted_out || spec.and_then(|s| s.host_network).unwrap_or(false) {
                continue;
            }
            if let Some(node) = spec.and_then(|s| s.node_name.clone()) {
                *by_node.entry(node).or_insert(0) += 1;
            }
        }
    }
    Ok(by_node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_charts() {
        let chart = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/charts/kanava/Chart.yaml"),
        )
        .expect("the chart");
        let (major, minor) = KUBERNETES_FLOOR;
        assert!(
            chart.contains(&format!("kubeVersion: \">={major}.{minor}.0-0\"")),
            "Chart.yaml's kubeVersion differs from KUBERNETES_FLOOR:\n{chart}"
        );
    }
}
