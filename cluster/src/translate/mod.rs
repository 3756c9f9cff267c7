//! Kubernetes objects → the mesh model.
//!
//! Shared by every source, so the lab's manifest directory and a real API
//! server produce identical workloads, services and policies.
//!
//! - [`workloads`]: a Pod (and its Namespace) → a [`Workload`];
//! - [`services`]: a ClusterIP Service and the ready pods it selects → a
//!   [`Service`](kanava_mesh::Service) with its endpoints;
//! - [`policies`]: an `AuthorizationPolicy` → a validated
//!   [`Policy`];
//! - [`Translator`] (here): all of them for a whole view of the cluster,
//!   incrementally: pods that did not change keep their translation.
//!
//! Objects that cannot be translated are reported. For policies, which
//! decide who may connect, a rejected change never weakens or breaks what
//! is in force: the last version of that policy that was valid stays.

mod policies;
mod services;
mod workloads;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service as KubeService};
use kanava_mesh::policy::Policy;
use kanava_mesh::{Service, Workload};

pub use policies::{policy_of, refuse_all_of};
pub use services::{NamespaceWorkloads, service_of};
pub use workloads::workload_of;

use crate::crd::AuthorizationPolicy;
use crate::objects::{ObjectKey, SlimObjects};
use crate::slim::MeshPod;

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
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Arc<Policy>>,
    /// Objects that could not be translated, and why.
    pub problems: Vec<String>,
    /// Whether each AuthorizationPolicy was accepted, for its status.
    pub policy_verdicts: Vec<PolicyVerdict>,
}

/// Whether a policy was accepted as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub key: ObjectKey,
    /// `metadata.generation` of the version judged.
    pub generation: Option<i64>,
    /// Why it was rejected, and what is in force instead; `None` when it
    /// was accepted.
    pub rejection: Option<String>,
}

/// Translates views of the cluster one after another, remembering the last
/// valid version of every policy, and what every object became, so that
/// only what changed is translated again: a pod or namespace that changed,
/// a Service whose object or namespace's pods changed, a policy that
/// changed. With 100,000 pods a change costs a pass of pointer comparisons,
/// not a translation of the cluster.
#[derive(Debug)]
pub struct Translator {
    config: TranslateConfig,
    last_good_policies: HashMap<ObjectKey, Arc<Policy>>,
    reported: BTreeSet<String>,
    /// Keyed by the address of the shared Pod the entry holds (and so
    /// keeps its own): the pass over every pod on every change is a
    /// pointer lookup per pod, no hashing or comparing of names.
    pods: HashMap<usize, Translated, FastHash>,
    /// The Namespace objects of the last translation, to tell which changed.
    namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Keyed by the address of the shared Service object, like `pods`.
    services: HashMap<usize, Made<KubeService, ServiceOutcome>, FastHash>,
    policies: HashMap<ObjectKey, Made<AuthorizationPolicy, PolicyOutcome>, FastHash>,
    /// Counts translations; entries not seen in the latest are dropped.
    generation: u64,
    identities: workloads::Identities,
}

/// A pod's translation and the objects it was made from.
#[derive(Debug)]
struct Translated {
    seen: u64,
    pod: Arc<MeshPod>,
    workload: Result<Option<Arc<Workload>>, String>,
    /// What was ignored in a pod that still translated (an unreadable
    /// annotation), reported with every translation like a problem.
    warning: Option<String>,
}

/// What an object (the very same, shared one) became last time.
#[derive(Debug)]
struct Made<O, T> {
    seen: u64,
    object: Arc<O>,
    result: T,
}

/// The hash of the translator's maps: fast, and keyed only by its own
/// objects' addresses.
type FastHash = foldhash::fast::RandomState;

fn address<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

/// A Service object's translation: `None` for one without a virtual IP,
/// the problem for one that cannot be translated.
type ServiceOutcome = Result<Option<Arc<Service>>, String>;

/// A policy object's effect: what is enforced, its verdict, the problem.
#[derive(Debug, Clone)]
struct PolicyOutcome {
    in_force: Option<Arc<Policy>>,
    verdict: PolicyVerdict,
    problem: Option<String>,
}

impl Translator {
    pub fn new(config: TranslateConfig) -> Self {
        Translator {
            config,
            last_good_policies: HashMap::new(),
            reported: BTreeSet::new(),
            pods: HashMap::default(),
            namespaces: BTreeMap::new(),
            services: HashMap::default(),
            policies: HashMap::default(),
            generation: 0,
            identities: workloads::Identities::default(),
        }
    }

    pub fn translate(&mut self, objects: &SlimObjects) -> MeshState {
        let mut state = MeshState {
            workloads: Vec::with_capacity(self.pods.len()),
            ..MeshState::default()
        };
        self.generation += 1;
        let generation = self.generation;
        // Namespaces whose object changed: all their pods are translated
        // again. Usually none, and then no pod's namespace is looked at.
        let mut renamespaced: HashSet<&str> = HashSet::new();
        for (name, namespace) in &objects.namespaces {
            if !self
                .namespaces
                .get(name)
                .is_some_and(|done| Arc::ptr_eq(done, namespace))
            {
                renamespaced.insert(name);
            }
        }
        for name in self.namespaces.keys() {
            if !objects.namespaces.contains_key(name) {
                renamespaced.insert(name);
            }
        }
        // Namespaces where a pod appeared, changed or left: their Services'
        // endpoints must be looked at again. Few, and asked about for every
        // Service: a short ordered set, no hashing of each Service's name.
        let mut changed_namespaces: BTreeSet<String> = BTreeSet::new();
        for (key, pod) in &objects.pods {
            let renamespaced = !renamespaced.is_empty() && renamespaced.contains(key.0.as_str());
            let translated = match self.pods.get_mut(&address(pod)) {
                // The same object as last time, in the same namespace
                // object: the same result, no work.
                Some(done) if !renamespaced => {
                    done.seen = generation;
                    done
                }
                _ => {
                    changed_namespaces.insert(key.0.clone());
                    let namespace = objects.namespaces.get(&key.0);
                    let translated = Translated {
                        seen: generation,
                        pod: pod.clone(),
                        workload: workload_of(
                            pod,
                            namespace.map(|ns| &**ns),
                            &self.config,
                            &mut self.identities,
                        )
                        .map(|w| w.map(Arc::new)),
                        warning: workloads::plaintext_inbound_ports_problem(
                            pod,
                            namespace.map(|ns| &**ns),
                        ),
                    };
                    self.pods.insert(address(pod), translated);
                    self.pods.get_mut(&address(pod)).expect("just inserted")
                }
            };
            match &translated.workload {
                Ok(Some(workload)) => {
                    if let Some(problem) = &translated.warning {
                        state
                            .problems
                            .push(format!("Pod {}/{}: {problem}", key.0, key.1));
                    }
                    state.workloads.push(workload.clone());
                }
                Ok(None) => {}
                Err(problem) => state
                    .problems
                    .push(format!("Pod {}/{}: {problem}", key.0, key.1)),
            }
        }
        let pods_before = self.pods.len();
        self.pods.retain(|_, translated| {
            let seen = translated.seen == generation;
            if !seen {
                changed_namespaces.insert(translated.pod.namespace.clone());
            }
            seen
        });
        if self.pods.len() < pods_before {
            self.identities.forget_unused();
        }
        self.namespaces = objects.namespaces.clone();
        state.services = self.services(objects, &changed_namespaces, &mut state.problems);
        for (key, object) in &objects.policies {
            let outcome = match self.policies.get_mut(key) {
                Some(made) if Arc::ptr_eq(&made.object, object) => {
                    made.seen = generation;
                    made.result.clone()
                }
                _ => {
                    let outcome = self.judge_policy(key, object);
                    self.policies.insert(
                        key.clone(),
                        Made {
                            seen: generation,
                            object: object.clone(),
                            result: outcome.clone(),
                        },
                    );
                    outcome
                }
            };
            state.problems.extend(outcome.problem);
            state.policy_verdicts.push(outcome.verdict);
            state.policies.extend(outcome.in_force);
        }
        self.policies.retain(|_, made| made.seen == generation);
        self.last_good_policies
            .retain(|key, _| objects.policies.contains_key(key));
        state
    }

    /// The mesh Services, in the order of `objects.services`; a Service is
    /// translated again only when it changed or its namespace's pods did.
    fn services(
        &mut self,
        objects: &SlimObjects,
        changed_namespaces: &BTreeSet<String>,
        problems: &mut Vec<String>,
    ) -> Vec<Arc<Service>> {
        let generation = self.generation;
        // The Services of the namespaces whose pods changed: each namespace
        // is one range of the map, so no Service's namespace is compared.
        let reselect: HashSet<usize, FastHash> = changed_namespaces
            .iter()
            .flat_map(|namespace| {
                objects
                    .services
                    .range((namespace.clone(), String::new())..)
                    .take_while(move |((ns, _), _)| ns == namespace)
                    .map(|(_, service)| address(service))
            })
            .collect();
        let mut stale = Vec::new();
        for (key, service) in &objects.services {
            match self.services.get_mut(&address(service)) {
                Some(made) if reselect.is_empty() || !reselect.contains(&address(service)) => {
                    made.seen = generation;
                }
                _ => stale.push((key, service)),
            }
        }
        if !stale.is_empty() {
            // Services select ready pods of their own namespace: index those
            // of the namespaces needed, once (pods are kept in namespace
            // order, so each namespace is one range).
            let needed: BTreeSet<&str> = stale.iter().map(|(key, _)| key.0.as_str()).collect();
            let mut by_namespace: HashMap<&str, NamespaceWorkloads> = HashMap::new();
            for namespace in needed {
                let first = (namespace.to_string(), String::new());
                let candidates = by_namespace.entry(namespace).or_default();
                for (_, pod) in objects
                    .pods
                    .range(first..)
                    .take_while(|((ns, _), _)| ns == namespace)
                {
                    if let Some(Translated {
                        workload: Ok(Some(workload)),
                        ..
                    }) = self.pods.get(&address(pod))
                        && pod.ready
                    {
                        candidates.add(workload, pod);
                    }
                }
            }
            let empty = NamespaceWorkloads::default();
            for (key, service) in stale {
                let candidates = by_namespace.get(key.0.as_str()).unwrap_or(&empty);
                let result = service_of(service, candidates).map(|s| s.map(Arc::new));
                self.services.insert(
                    address(service),
                    Made {
                        seen: generation,
                        object: service.clone(),
                        result,
                    },
                );
            }
        }
        self.services.retain(|_, made| made.seen == generation);
        let mut services = Vec::with_capacity(objects.services.len());
        for (key, service) in &objects.services {
            match self
                .services
                .get(&address(service))
                .map(|made| &made.result)
            {
                Some(Ok(Some(service))) => services.push(service.clone()),
                Some(Err(problem)) => {
                    problems.push(format!("Service {}/{}: {problem}", key.0, key.1));
                }
                Some(Ok(None)) | None => {}
            }
        }
        services
    }

    /// Validates a new or changed policy object.
    fn judge_policy(&mut self, key: &ObjectKey, object: &AuthorizationPolicy) -> PolicyOutcome {
        match policy_of(object, &self.config.root_namespace) {
            Ok(policy) => {
                let policy = Arc::new(policy);
                self.last_good_policies.insert(key.clone(), policy.clone());
                PolicyOutcome {
                    in_force: Some(policy),
                    verdict: PolicyVerdict {
                        key: key.clone(),
                        generation: object.metadata.generation,
                        rejection: None,
                    },
                    problem: None,
                }
            }
            Err(problem) => {
                // Never weaker than what the operator meant: the last valid
                // version stays, and a policy that never was valid refuses
                // everything for the workloads it selects.
                let (in_force, meaning) = match self.last_good_policies.get(key) {
                    Some(kept) => (Some(kept.clone()), "its last valid version stays in force"),
                    None => (
                        refuse_all_of(object, &self.config.root_namespace).map(Arc::new),
                        "until it is fixed it refuses every connection to the workloads it \
                         selects",
                    ),
                };
                PolicyOutcome {
                    in_force,
                    problem: Some(format!(
                        "AuthorizationPolicy {}/{} rejected: {problem}; {meaning}",
                        key.0, key.1,
                    )),
                    verdict: PolicyVerdict {
                        key: key.clone(),
                        generation: object.metadata.generation,
                        rejection: Some(format!("{problem}; {meaning}")),
                    },
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use kanava_mesh::policy::Action;
    use kanava_mesh::{MtlsMode, TunnelProtocol};

    use super::*;
    use crate::manifests::parse_manifests;

    /// The objects of `text`, as the translation reads them.
    fn objects(text: &str) -> SlimObjects {
        full_objects(text).with_mesh_pods()
    }

    /// The objects of `text` as they were written.
    fn full_objects(text: &str) -> crate::ClusterObjects {
        let mut objects = crate::ClusterObjects::default();
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
    fn opened_non_tcp_ports_join_pod_and_namespace_and_a_bad_value_opens_nothing() {
        let file = |pod_ports: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: dns, labels: {{kanava.io/dataplane-mode: ambient}}, annotations: {{kanava.io/plaintext-inbound-ports: \"udp/53\"}}}}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: dns, uid: u1, annotations: {{kanava.io/plaintext-inbound-ports: \"{pod_ports}\"}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIPs: [{{ip: 10.0.0.1}}, {{ip: \"fd00::1\"}}]}}\n"
            )
        };
        let state = translate_text(&file("sctp/3868, udp/53"));
        assert!(state.problems.is_empty(), "{:?}", state.problems);
        let shown: Vec<String> = state.workloads[0]
            .plaintext_inbound_ports
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["udp/53", "sctp/3868"]);
        assert_eq!(state.workloads[0].ips.len(), 2, "both families");

        let state = translate_text(&file("tcp/80"));
        assert!(
            state.workloads[0].plaintext_inbound_ports.is_empty(),
            "a bad value opens nothing, not even the namespace's"
        );
        assert!(
            state
                .problems
                .iter()
                .any(|p| p.contains("dns/p") && p.contains("TCP goes through the mesh")),
            "{:?}",
            state.problems
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

    /// A pod as an API server serves it: much the mesh does not read.
    const RICH_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: rich
  namespace: shop
  uid: 12121212-2222-3333-4444-555555555555
  resourceVersion: "5000"
  generation: 3
  labels: {app: web, tier: front}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
    kanava.io/plaintext-inbound-ports: "udp/5353"
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-1, uid: r1}]
  managedFields: [{manager: kubelet, operation: Update}]
spec:
  nodeName: node-3
  serviceAccountName: web
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: web
    image: nginx:1.27
    env: [{name: A, value: b}]
    ports: [{containerPort: 8080, name: http}, {containerPort: 9001, name: admin}]
    readinessProbe: {httpGet: {port: 8080, path: /}}
  - name: log
    image: fluent-bit
  - name: metrics
    image: exporter
    ports: [{containerPort: 9100, name: metrics}, {containerPort: 9101}]
status:
  phase: Running
  hostIP: 10.200.0.3
  startTime: "2026-12-01T00:00:00Z"
  conditions:
  - {type: Ready, status: "True", lastTransitionTime: "2026-12-01T00:00:05Z"}
  - {type: PodScheduled, status: "True"}
  podIP: 10.244.3.5
  podIPs: [{ip: 10.244.3.5}, {ip: "fd00:244:3::5"}]
  containerStatuses: [{name: web, ready: true, restartCount: 2, image: nginx, imageID: x}]
"#;

    #[test]
    fn slimmed_objects_translate_to_the_same_mesh() {
        let rich = format!("{CLUSTER}---{RICH_POD}");
        // Namespaces, Services and policies as they were written; pods as
        // the mesh reads them in both.
        let full = objects(&rich);
        let mut slim = SlimObjects::default();
        for object in parse_manifests(&rich).unwrap().0 {
            slim.insert(object.slimmed());
        }
        let (from_full, from_slim) = (translator().translate(&full), translator().translate(&slim));
        assert!(
            from_full.workloads.iter().any(|w| w.name == "rich"),
            "{:?}",
            from_full.problems
        );
        assert_eq!(format!("{from_full:?}"), format!("{from_slim:?}"));
        let pod = &slim.pods[&("shop".to_string(), "rich".to_string())];
        let kept: Vec<&String> = pod.annotations.iter().flat_map(|a| a.keys()).collect();
        assert_eq!(kept, ["kanava.io/plaintext-inbound-ports"]);
        assert!(pod.ready);
        assert_eq!(pod.ips, ["10.244.3.5", "fd00:244:3::5"]);
        assert_eq!(
            pod.named_ports,
            [
                ("http".to_string(), 8080),
                ("admin".to_string(), 9001),
                ("metrics".to_string(), 9100)
            ]
        );
    }

    #[test]
    fn a_workload_shares_its_pods_labels() {
        let objects = objects(CLUSTER);
        let state = translator().translate(&objects);
        let workload = state
            .workloads
            .iter()
            .find(|w| w.name == "web-7d9f")
            .unwrap();
        let pod = &objects.pods[&("shop".to_string(), "web-7d9f".to_string())];
        assert!(Arc::ptr_eq(&workload.labels, &pod.labels));
    }

    #[test]
    fn only_what_changed_is_translated_again() {
        let mut translator = translator();
        let mut objects = objects(&format!(
            "{CLUSTER}---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: legacy}}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{{port: 5432}}]\n"
        ));
        let first = translator.translate(&objects);
        let service = |state: &MeshState, name: &str| {
            state
                .services
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .unwrap()
        };
        assert_eq!(service(&first, "web").endpoints.len(), 1);

        let same = translator.translate(&objects);
        let shared = |a: &MeshState, b: &MeshState| {
            a.workloads
                .iter()
                .zip(&b.workloads)
                .all(|(a, b)| Arc::ptr_eq(a, b))
                && a.services
                    .iter()
                    .zip(&b.services)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
                && a.policies
                    .iter()
                    .zip(&b.policies)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        };
        assert!(shared(&first, &same), "nothing changed, nothing made again");

        // A pod of `shop` becomes ready: the Service of `shop` gains it; the
        // other namespace's Service and every policy stay as they were.
        let key = ("shop".to_string(), "web-unready".to_string());
        let mut ready = (*objects.pods[&key]).clone();
        ready.ready = true;
        objects.pods.insert(key.clone(), Arc::new(ready));
        let changed = translator.translate(&objects);
        assert_eq!(service(&changed, "web").endpoints.len(), 2);
        assert!(Arc::ptr_eq(
            &service(&first, "db"),
            &service(&changed, "db")
        ));
        assert!(
            first
                .policies
                .iter()
                .zip(&changed.policies)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        );

        // It leaves: the endpoint goes with it.
        objects.pods.remove(&key);
        let left = translator.translate(&objects);
        assert_eq!(service(&left, "web").endpoints.len(), 1);
        assert_eq!(left.workloads.len(), first.workloads.len() - 1);

        // A namespace joins the mesh: its pods (and only they) are
        // translated again.
        let protocol = |state: &MeshState, name: &str| {
            state
                .workloads
                .iter()
                .find(|w| w.name == name)
                .map(|w| w.protocol)
                .unwrap()
        };
        assert_eq!(protocol(&left, "old"), TunnelProtocol::None);
        let mut legacy = (*objects.namespaces["legacy"]).clone();
        legacy.metadata.labels = Some(
            [(
                "kanava.io/dataplane-mode".to_string(),
                "ambient".to_string(),
            )]
            .into(),
        );
        objects.namespaces.insert("legacy".into(), Arc::new(legacy));
        let joined = translator.translate(&objects);
        assert_eq!(protocol(&joined, "old"), TunnelProtocol::Hbone);
        let web = |state: &MeshState| {
            state
                .workloads
                .iter()
                .find(|w| w.name == "web-7d9f")
                .cloned()
                .unwrap()
        };
        assert!(Arc::ptr_eq(&web(&left), &web(&joined)));
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
        assert_eq!(third.policies.len(), 3);
        let bad = third
            .policies
            .iter()
            .find(|p| p.name == "bad")
            .expect("the invalid policy is in force, as refuse-all");
        assert_eq!(
            (bad.action, bad.rules.len()),
            (Action::Allow, 0),
            "an invalid ALLOW allows nothing"
        );
        assert!(third.problems.iter().any(|p| p.contains("shop/bad")
            && p.contains("omit `from`")
            && p.contains("refuses every connection")));
    }

    #[test]
    fn a_new_invalid_deny_refuses_everything_for_its_selector() {
        let state = translate_text(
            "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: oops, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{from: [{ipBlocks: [nonsense]}]}]}\n",
        );
        let [oops] = state.policies.as_slice() else {
            panic!("{:?}", state.policies);
        };
        assert_eq!(oops.action, Action::Deny);
        assert_eq!(
            oops.rules,
            vec![kanava_mesh::policy::Rule::default()],
            "matches everything"
        );
        assert_eq!(
            oops.selector,
            Some([("app".to_string(), "web".to_string())].into())
        );
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
        assert!(state.workloads.is_empty());
        assert_eq!(state.policies.len(), 1, "the invalid policy allows nothing");
        assert!(state.policies[0].rules.is_empty());
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
