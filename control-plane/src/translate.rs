//! Kubernetes objects → the mesh model.
//!
//! Shared by every source, so the lab's manifest directory and a real API
//! server produce identical workloads.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kanava_mesh::{Identity, TunnelProtocol, Workload, is_enrolled, names};

use crate::source::ClusterObjects;

#[derive(Clone, Debug)]
pub struct TranslateConfig {
    pub trust_domain: String,
}

/// What the cluster means for the mesh.
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    pub workloads: Vec<Workload>,
    /// Objects that could not be translated, and why.
    pub problems: Vec<String>,
}

pub fn translate(objects: &ClusterObjects, config: &TranslateConfig) -> MeshState {
    let mut state = MeshState::default();
    for ((namespace, name), pod) in &objects.pods {
        match workload_of(pod, objects.namespaces.get(namespace), config) {
            Ok(Some(workload)) => state.workloads.push(workload),
            Ok(None) => {}
            Err(problem) => state
                .problems
                .push(format!("Pod {namespace}/{name}: {problem}")),
        }
    }
    state
}

/// The workload a pod stands for, or `None` when the pod is not (yet) part
/// of the data plane: not scheduled, no IP, finished, or on the host network.
pub fn workload_of(
    pod: &Pod,
    namespace: Option<&Namespace>,
    config: &TranslateConfig,
) -> Result<Option<Workload>, String> {
    let meta = &pod.metadata;
    let Some(spec) = pod.spec.as_ref() else {
        return Err("missing spec".into());
    };
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let Some(node) = spec.node_name.clone() else {
        return Ok(None);
    };
    let mut ip_texts: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect())
        .unwrap_or_default();
    if let (true, Some(ip)) = (
        ip_texts.is_empty(),
        status.and_then(|s| s.pod_ip.as_deref()),
    ) {
        ip_texts.push(ip);
    }
    if ip_texts.is_empty() {
        return Ok(None);
    }
    let ips = ip_texts
        .iter()
        .map(|text| {
            text.parse::<IpAddr>()
                .map_err(|_| format!("status.podIP {text:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let uid = meta.uid.clone().ok_or("missing metadata.uid")?;
    let name = meta.name.clone().ok_or("missing metadata.name")?;
    let namespace_name = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| names::DEFAULT_SERVICE_ACCOUNT.into());
    let identity = Identity::new(&config.trust_domain, &namespace_name, &service_account)
        .map_err(|e| e.to_string())?;
    let enrolled = is_enrolled(
        namespace.and_then(|ns| ns.metadata.labels.as_ref()),
        meta.labels.as_ref(),
    );
    Ok(Some(Workload {
        uid,
        name,
        namespace: namespace_name,
        service_account,
        node,
        ips,
        identity,
        protocol: if enrolled {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        labels: meta.labels.clone().unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_manifests;

    fn translate_text(text: &str) -> MeshState {
        let mut objects = ClusterObjects::default();
        for object in parse_manifests(text).unwrap().0 {
            objects.insert(object);
        }
        translate(
            &objects,
            &TranslateConfig {
                trust_domain: "cluster.local".into(),
            },
        )
    }

    // Manifests as `kubectl get -o yaml` prints them, trimmed.
    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    kanava.io/dataplane-mode: ambient
    kubernetes.io/metadata.name: shop
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f
  namespace: shop
  uid: 6b1c7a52-6f0e-4d36-9c7e-1f0c1b3f9a10
  labels:
    app: web
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - name: web
    image: nginx:1.27
    ports:
    - containerPort: 80
status:
  phase: Running
  podIP: 10.244.2.5
  podIPs:
  - ip: 10.244.2.5
---
apiVersion: v1
kind: Pod
metadata:
  name: batch
  namespace: shop
  uid: 11111111-2222-3333-4444-555555555555
  labels:
    kanava.io/dataplane-mode: none
spec:
  nodeName: node-1
  containers:
  - name: job
    image: busybox
status:
  phase: Running
  podIP: 10.244.1.9
---
apiVersion: v1
kind: Pod
metadata:
  name: old
  namespace: legacy
  uid: 99999999-2222-3333-4444-555555555555
spec:
  nodeName: node-1
  containers:
  - name: app
    image: busybox
status:
  phase: Running
  podIP: 10.244.1.7
---
apiVersion: v1
kind: Pod
metadata:
  name: pending
  namespace: shop
  uid: 00000000-2222-3333-4444-555555555555
spec:
  containers:
  - name: app
    image: busybox
status:
  phase: Pending
---
apiVersion: v1
kind: Pod
metadata:
  name: done
  namespace: shop
  uid: 00000000-0000-3333-4444-555555555555
spec:
  nodeName: node-1
  containers:
  - name: app
    image: busybox
status:
  phase: Succeeded
  podIP: 10.244.1.10
"#;

    #[test]
    fn pods_become_workloads() {
        let state = translate_text(CLUSTER);
        assert!(state.problems.is_empty(), "{:?}", state.problems);
        let names: Vec<_> = state.workloads.iter().map(|w| w.display_name()).collect();
        assert_eq!(names, ["legacy/old", "shop/batch", "shop/web-7d9f"]);

        let web = &state.workloads[2];
        assert_eq!(web.uid, "6b1c7a52-6f0e-4d36-9c7e-1f0c1b3f9a10");
        assert_eq!(web.node, "node-2");
        assert_eq!(web.ips, vec!["10.244.2.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            web.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(web.protocol, TunnelProtocol::Hbone);
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

        let batch = &state.workloads[1];
        assert_eq!(batch.protocol, TunnelProtocol::None, "pod opted out");
        assert_eq!(batch.service_account, "default");

        assert_eq!(
            state.workloads[0].protocol,
            TunnelProtocol::None,
            "namespace not enrolled"
        );
    }

    #[test]
    fn bad_pods_are_reported_not_served() {
        let state = translate_text(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec: {nodeName: n, containers: []}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, uid: u}
spec: {nodeName: n, containers: []}
status: {podIP: ten}
"#,
        );
        assert!(state.workloads.is_empty());
        assert_eq!(state.problems.len(), 2, "{:?}", state.problems);
        assert!(state.problems[0].contains("x/a") && state.problems[0].contains("uid"));
        assert!(state.problems[1].contains("\"ten\""));
    }
}
