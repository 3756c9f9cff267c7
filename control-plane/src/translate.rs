//! Kubernetes objects → the mesh model.
//!
//! Shared by every source, so the lab's manifest directory and a real API
//! server produce identical workloads, services and policies.
//!
//! Objects that cannot be translated are reported. For policies, which
//! decide who may connect, a rejected change never weakens or breaks what
//! is in force: the last version of that policy that was valid stays.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kanava_mesh::policy::{self, Action, Policy, Rule, SourceBuilder};
use kanava_mesh::{
    Endpoint, Identity, MtlsMode, Service, ServicePort, TunnelProtocol, Workload, is_enrolled,
    names,
};

use crate::crd::{AuthorizationPolicy, PolicyAction};
use crate::source::{ClusterObjects, ObjectKey};

#[derive(Clone, Debug)]
pub struct TranslateConfig {
    pub trust_domain: String,
    /// Namespace whose policies apply to the whole mesh.
    pub root_namespace: String,
}

/// What the cluster means for the mesh.
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    /// Shared with the translator's cache: a pod that did not change keeps
    /// the very same workload, which lets the store skip comparing it.
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    /// Objects that could not be translated, and why.
    pub problems: Vec<String>,
}

/// Translates views of the cluster one after another, remembering the last
/// valid version of every policy, and the workload of every pod so that only
/// pods (or namespaces) that changed are translated again.
#[derive(Debug)]
pub struct Translator {
    config: TranslateConfig,
    last_good_policies: HashMap<ObjectKey, Policy>,
    reported: BTreeSet<String>,
    pods: HashMap<ObjectKey, Translated>,
    /// Counts translations; entries not seen in the latest are dropped.
    generation: u64,
}

/// A pod's translation and the objects it was made from.
#[derive(Debug)]
struct Translated {
    seen: u64,
    pod: Arc<Pod>,
    namespace: Option<Arc<Namespace>>,
    workload: Result<Option<Arc<Workload>>, String>,
}

impl Translator {
    pub fn new(config: TranslateConfig) -> Self {
        Translator {
            config,
            last_good_policies: HashMap::new(),
            reported: BTreeSet::new(),
            pods: HashMap::new(),
            generation: 0,
        }
    }

    pub fn translate(&mut self, objects: &ClusterObjects) -> MeshState {
        let mut state = MeshState::default();
        let mut pods: Vec<&Pod> = Vec::new();
        self.generation += 1;
        let generation = self.generation;
        for (key, pod) in &objects.pods {
            let namespace = objects.namespaces.get(&key.0);
            // Same objects as last time (shared, so comparing pointers is
            // enough): same result, no work.
            let fresh = |done: &Translated| {
                Arc::ptr_eq(&done.pod, pod)
                    && match (&done.namespace, namespace) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            };
            let translated = match self.pods.get_mut(key) {
                Some(done) if fresh(done) => {
                    done.seen = generation;
                    done
                }
                _ => {
                    let translated = Translated {
                        seen: generation,
                        pod: pod.clone(),
                        namespace: namespace.cloned(),
                        workload: workload_of(pod, namespace.map(|ns| &**ns), &self.config)
                            .map(|w| w.map(Arc::new)),
                    };
                    self.pods.insert(key.clone(), translated);
                    self.pods.get_mut(key).expect("just inserted")
                }
            };
            match &translated.workload {
                Ok(Some(workload)) => {
                    state.workloads.push(workload.clone());
                    pods.push(pod);
                }
                Ok(None) => {}
                Err(problem) => state
                    .problems
                    .push(format!("Pod {}/{}: {problem}", key.0, key.1)),
            }
        }
        self.pods
            .retain(|_, translated| translated.seen == generation);
        // Services select ready pods of their own namespace: index those once.
        let mut by_namespace: HashMap<&str, NamespaceWorkloads> = HashMap::new();
        for (workload, pod) in state.workloads.iter().map(|w| &**w).zip(&pods) {
            if is_ready(pod) {
                by_namespace
                    .entry(workload.namespace.as_str())
                    .or_default()
                    .add(workload, pod);
            }
        }
        let empty = NamespaceWorkloads::default();
        let mut services = Vec::new();
        for ((namespace, name), service) in &objects.services {
            let candidates = by_namespace.get(namespace.as_str()).unwrap_or(&empty);
            match service_of(service, candidates) {
                Ok(Some(service)) => services.push(service),
                Ok(None) => {}
                Err(problem) => state
                    .problems
                    .push(format!("Service {namespace}/{name}: {problem}")),
            }
        }
        state.services = services;
        for (key, object) in &objects.policies {
            match policy_of(object, &self.config.root_namespace) {
                Ok(policy) => {
                    self.last_good_policies.insert(key.clone(), policy.clone());
                    state.policies.push(policy);
                }
                Err(problem) => {
                    let kept = self.last_good_policies.get(key);
                    state.problems.push(format!(
                        "AuthorizationPolicy {}/{} rejected: {problem}; {}",
                        key.0,
                        key.1,
                        if kept.is_some() {
                            "its last valid version stays in force"
                        } else {
                            "it is not applied"
                        }
                    ));
                    state.policies.extend(kept.cloned());
                }
            }
        }
        self.last_good_policies
            .retain(|key, _| objects.policies.contains_key(key));
        state
    }

    /// Problems of `state` not reported before (each is logged once while it
    /// lasts, not on every change anywhere).
    pub fn new_problems(&mut self, state: &MeshState) -> Vec<String> {
        let current: BTreeSet<String> = state.problems.iter().cloned().collect();
        let new = current.difference(&self.reported).cloned().collect();
        self.reported = current;
        new
    }
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
    let namespace_labels = namespace.and_then(|ns| ns.metadata.labels.as_ref());
    let enrolled = is_enrolled(namespace_labels, meta.labels.as_ref());
    let mtls_mode = match namespace_labels
        .and_then(|l| l.get(names::MTLS_MODE_LABEL))
        .map(String::as_str)
    {
        Some("permissive") => MtlsMode::Permissive,
        // Anything but an explicit `permissive` is strict: a typo must not
        // open the door to plaintext.
        _ => MtlsMode::Strict,
    };
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
        mtls_mode,
        resource_version: newest_version(
            meta.resource_version.as_deref(),
            namespace.and_then(|ns| ns.metadata.resource_version.as_deref()),
        ),
    }))
}

/// A workload derives from its pod and its namespace (labels decide its
/// mode), so its version is the newer of the two. Resource versions are
/// opaque to clients but numeric in practice (etcd revisions, the lab's
/// counter); a non-numeric one is passed through as it is.
fn newest_version(pod: Option<&str>, namespace: Option<&str>) -> String {
    match (pod.map(str::parse::<u64>), namespace.map(str::parse::<u64>)) {
        (Some(Ok(pod)), Some(Ok(namespace))) => pod.max(namespace).to_string(),
        _ => pod.unwrap_or_default().to_string(),
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The ready workloads of one namespace, indexed by label so that a
/// selector looks at the pods carrying its rarest label, not at all pods.
#[derive(Default)]
pub struct NamespaceWorkloads<'a> {
    workloads: Vec<(&'a Workload, &'a Pod)>,
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> NamespaceWorkloads<'a> {
    pub fn add(&mut self, workload: &'a Workload, pod: &'a Pod) {
        let index = self.workloads.len();
        self.workloads.push((workload, pod));
        for (key, value) in &workload.labels {
            self.by_label
                .entry((key.as_str(), value.as_str()))
                .or_default()
                .push(index);
        }
    }

    /// The workloads carrying every label of `selector` (not empty).
    pub fn select<'s>(
        &'s self,
        selector: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = (&'a Workload, &'a Pod)> + 's {
        let rarest = selector
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(k.as_str(), v.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default()
            })
            .min_by_key(|indexes| indexes.len())
            .unwrap_or_default();
        rarest
            .iter()
            .map(|&i| self.workloads[i])
            .filter(move |(workload, _)| {
                selector
                    .iter()
                    .all(|(k, v)| workload.labels.get(k).is_some_and(|l| l == v))
            })
    }
}

/// A ClusterIP Service with the ready pods it selects. `None` for Services
/// without a virtual IP (headless, ExternalName, not yet allocated).
pub fn service_of(
    service: &KubeService,
    candidates: &NamespaceWorkloads<'_>,
) -> Result<Option<Service>, String> {
    let meta = &service.metadata;
    let Some(spec) = service.spec.as_ref() else {
        return Err("missing spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut vips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let (true, Some(ip)) = (vips.is_empty(), spec.cluster_ip.as_deref()) {
        vips.push(ip);
    }
    if vips.is_empty() || vips.contains(&"None") {
        return Ok(None);
    }
    let addresses = vips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("clusterIP {ip:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().ok_or("missing metadata.name")?;

    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let number = u16::try_from(port.port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {} is not in 1-65535", port.port))?;
        let (target_port, target_port_name) = match &port.target_port {
            None => (number, String::new()),
            Some(IntOrString::Int(n)) => (
                u16::try_from(*n)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("targetPort {n} is not in 1-65535"))?,
                String::new(),
            ),
            Some(IntOrString::String(text)) => match text.parse::<u16>() {
                Ok(n) if n != 0 => (n, String::new()),
                _ => (0, text.clone()),
            },
        };
        ports.push(ServicePort {
            port: number,
            target_port,
            target_port_name,
        });
    }

    let mut endpoints = Vec::new();
    if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for (workload, pod) in candidates.select(selector) {
            let endpoint_ports = ports
                .iter()
                .filter_map(|p| {
                    let target = if p.target_port != 0 {
                        Some(p.target_port)
                    } else {
                        named_port(pod, &p.target_port_name)
                    };
                    target.map(|t| (p.port, t))
                })
                .collect::<BTreeMap<_, _>>();
            if !endpoint_ports.is_empty() {
                endpoints.push(Endpoint {
                    workload_uid: workload.uid.clone(),
                    ports: endpoint_ports,
                });
            }
        }
    }
    Ok(Some(Service {
        namespace,
        name,
        addresses,
        ports,
        endpoints,
        resource_version: meta.resource_version.clone().unwrap_or_default(),
    }))
}

/// The number of a pod's container port called `name`.
fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Validates an AuthorizationPolicy and turns it into the mesh model.
pub fn policy_of(object: &AuthorizationPolicy, root_namespace: &str) -> Result<Policy, String> {
    let namespace = object
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = object
        .metadata
        .name
        .clone()
        .ok_or("missing metadata.name")?;
    let spec = &object.spec;
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        let mut translated = Rule::default();
        if let Some(from) = &rule.from {
            if from.is_empty() {
                return Err(format!(
                    "rules[{r}].from is empty; omit it to match every source"
                ));
            }
            for (f, source) in from.iter().enumerate() {
                let list = |l: &Option<Vec<String>>| l.clone().unwrap_or_default();
                let (principals, not_principals) =
                    (list(&source.principals), list(&source.not_principals));
                let (namespaces, not_namespaces) =
                    (list(&source.namespaces), list(&source.not_namespaces));
                let (ip_blocks, not_ip_blocks) =
                    (list(&source.ip_blocks), list(&source.not_ip_blocks));
                let built = SourceBuilder {
                    principals: &principals,
                    not_principals: &not_principals,
                    namespaces: &namespaces,
                    not_namespaces: &not_namespaces,
                    ip_blocks: &ip_blocks,
                    not_ip_blocks: &not_ip_blocks,
                }
                .build()
                .map_err(|e| format!("rules[{r}].from[{f}]: {e}"))?;
                translated.from.push(built);
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                return Err(format!(
                    "rules[{r}].to is empty; omit it to match every port"
                ));
            }
            for (t, operation) in to.iter().enumerate() {
                let ports = port_numbers(operation.ports.as_deref())
                    .map_err(|e| format!("rules[{r}].to[{t}].ports: {e}"))?;
                let not_ports = port_numbers(operation.not_ports.as_deref())
                    .map_err(|e| format!("rules[{r}].to[{t}].notPorts: {e}"))?;
                translated.to.push(
                    policy::destination(&ports, &not_ports)
                        .map_err(|e| format!("rules[{r}].to[{t}]: {e}"))?,
                );
            }
        }
        rules.push(translated);
    }
    Ok(Policy {
        mesh_wide: namespace == root_namespace,
        namespace,
        name,
        selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
        action: match spec.action {
            PolicyAction::Allow => Action::Allow,
            PolicyAction::Deny => Action::Deny,
        },
        rules,
        resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
    })
}

fn port_numbers(ports: Option<&[IntOrString]>) -> Result<Vec<u32>, String> {
    ports
        .unwrap_or_default()
        .iter()
        .map(|port| match port {
            IntOrString::Int(n) => u32::try_from(*n).map_err(|_| format!("{n} is not a port")),
            IntOrString::String(text) => text
                .parse::<u32>()
                .map_err(|_| format!("{text:?} is not a port number")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_manifests;

    fn objects(text: &str) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for object in parse_manifests(text).unwrap().0 {
            objects.insert(object);
        }
        objects
    }

    fn translator() -> Translator {
        Translator::new(TranslateConfig {
            trust_domain: "cluster.local".into(),
            root_namespace: "kanava-system".into(),
        })
    }

    fn translate_text(text: &str) -> MeshState {
        translator().translate(&objects(text))
    }

    // Manifests as `kubectl get -o yaml` prints them, trimmed.
    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    kanava.io/dataplane-mode: ambient
    kanava.io/mtls-mode: permissive
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
  resourceVersion: "4711"
  labels:
    app: web
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - name: web
    image: nginx:1.27
    ports:
    - containerPort: 8080
      name: http
status:
  phase: Running
  conditions:
  - type: Ready
    status: "True"
  podIP: 10.244.2.5
  podIPs:
  - ip: 10.244.2.5
---
apiVersion: v1
kind: Pod
metadata:
  name: web-unready
  namespace: shop
  uid: 7b1c7a52-6f0e-4d36-9c7e-1f0c1b3f9a10
  labels:
    app: web
spec:
  nodeName: node-1
  containers:
  - name: web
    image: nginx:1.27
status:
  phase: Running
  conditions:
  - type: Ready
    status: "False"
  podIP: 10.244.1.5
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
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  resourceVersion: "90"
spec:
  type: ClusterIP
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  selector:
    app: web
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
  - name: admin
    port: 9000
    targetPort: 9001
---
apiVersion: v1
kind: Service
metadata:
  name: headless
  namespace: shop
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: security.kanava.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: web-from-client
  namespace: shop
  resourceVersion: "91"
spec:
  selector:
    matchLabels: {app: web}
  action: ALLOW
  rules:
  - from:
    - principals: ["cluster.local/ns/shop/sa/client"]
    to:
    - ports: ["8080", 9001]
---
apiVersion: security.kanava.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: no-legacy
  namespace: kanava-system
spec:
  action: DENY
  rules:
  - from:
    - namespaces: [legacy]
"#;

    #[test]
    fn pods_become_workloads() {
        let state = translate_text(CLUSTER);
        assert!(state.problems.is_empty(), "{:?}", state.problems);
        let names: Vec<_> = state.workloads.iter().map(|w| w.display_name()).collect();
        assert_eq!(
            names,
            [
                "legacy/old",
                "shop/batch",
                "shop/web-7d9f",
                "shop/web-unready"
            ]
        );

        let web = &state.workloads[2];
        assert_eq!(web.uid, "6b1c7a52-6f0e-4d36-9c7e-1f0c1b3f9a10");
        assert_eq!(web.node, "node-2");
        assert_eq!(web.ips, vec!["10.244.2.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            web.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(web.protocol, TunnelProtocol::Hbone);
        assert_eq!(web.mtls_mode, MtlsMode::Permissive);
        assert_eq!(web.resource_version, "4711");
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

        let batch = &state.workloads[1];
        assert_eq!(batch.protocol, TunnelProtocol::None, "pod opted out");
        assert_eq!(batch.service_account, "default");

        assert_eq!(
            state.workloads[0].protocol,
            TunnelProtocol::None,
            "namespace not enrolled"
        );
        assert_eq!(
            state.workloads[0].mtls_mode,
            MtlsMode::Strict,
            "strict by default"
        );
    }

    #[test]
    fn services_get_their_ready_endpoints_with_resolved_ports() {
        let state = translate_text(CLUSTER);
        assert_eq!(
            state.services.len(),
            1,
            "headless services have no VIP to serve"
        );
        let web = &state.services[0];
        assert_eq!(web.key(), "shop/web");
        assert_eq!(web.addresses, vec!["10.96.0.20".parse::<IpAddr>().unwrap()]);
        assert_eq!(web.endpoints.len(), 1, "the unready pod is not an endpoint");
        assert_eq!(
            web.endpoints[0].workload_uid,
            "6b1c7a52-6f0e-4d36-9c7e-1f0c1b3f9a10"
        );
        assert_eq!(
            web.endpoints[0].ports,
            [(80, 8080), (9000, 9001)].into(),
            "named port resolved on the pod"
        );
    }

    #[test]
    fn policies_are_validated_and_scoped() {
        let state = translate_text(CLUSTER);
        assert_eq!(state.policies.len(), 2);
        let mesh_wide = state
            .policies
            .iter()
            .find(|p| p.name == "no-legacy")
            .unwrap();
        assert!(mesh_wide.mesh_wide);
        assert_eq!(mesh_wide.action, Action::Deny);
        let allow = state
            .policies
            .iter()
            .find(|p| p.name == "web-from-client")
            .unwrap();
        assert!(!allow.mesh_wide);
        assert_eq!(allow.rules[0].to[0].ports, vec![8080, 9001]);
        assert_eq!(allow.resource_version, "91");
    }

    #[test]
    fn an_invalid_policy_change_keeps_the_last_valid_version() {
        let mut translator = translator();
        let first = translator.translate(&objects(CLUSTER));
        assert_eq!(first.policies.len(), 2);

        let broken = CLUSTER.replace("namespaces: [legacy]", "ipBlocks: [10.0.0.0/40]");
        let second = translator.translate(&objects(&broken));
        assert_eq!(second.policies, first.policies, "enforcement unchanged");
        let problem = second
            .problems
            .iter()
            .find(|p| p.contains("no-legacy"))
            .unwrap();
        assert!(
            problem.contains("10.0.0.0/40") && problem.contains("last valid version stays"),
            "{problem}"
        );
        assert_eq!(translator.new_problems(&second).len(), 1);
        assert!(translator.new_problems(&second).is_empty(), "reported once");

        let new_and_broken = format!(
            "{CLUSTER}---\napiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  rules:\n  - from: [{{}}]\n"
        );
        let third = translator.translate(&objects(&new_and_broken));
        assert_eq!(
            third.policies.len(),
            2,
            "a new invalid policy is not applied"
        );
        assert!(third.problems.iter().any(|p| p.contains("shop/bad")
            && p.contains("omit `from`")
            && p.contains("not applied")));
    }

    #[test]
    fn bad_objects_are_reported_not_served() {
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
---
apiVersion: security.kanava.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: x}
spec:
  rules:
  - to: []
"#,
        );
        assert!(state.workloads.is_empty() && state.policies.is_empty());
        assert_eq!(state.problems.len(), 3, "{:?}", state.problems);
        assert!(state.problems[0].contains("x/a") && state.problems[0].contains("uid"));
        assert!(state.problems[1].contains("\"ten\""));
        assert!(state.problems[2].contains("rules[0].to is empty"));
    }

    #[test]
    fn unknown_actions_are_refused_when_read() {
        let err = parse_manifests(
            "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: BLOCK}\n",
        )
        .unwrap_err();
        assert!(err.reason.contains("BLOCK"), "{err}");
        let err = parse_manifests(
            "apiVersion: v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(err.reason.contains("security.kanava.io/v1alpha1"), "{err}");
    }
}
