//! Deciding what a manifest changes in a lab, before anything is changed:
//! every object is checked against the lab's nodes and current objects,
//! pods get their node, uid and IP-independent fields, Services their
//! virtual IPs. [`plan`] is pure; [`apply`](crate::apply) carries a plan out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kanava_cluster::crd::AuthorizationPolicy;
use kanava_cluster::{ClusterObjects, Object};
use kanava_mesh::names;

use crate::names::check_dns_label;
use crate::spec::LabSpec;
use crate::{Error, manifests};

/// Service virtual IPs come from 10.96.0.0/16, like a default cluster.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// Annotation the lab puts on a pod it has handed to its ztunnel (what the
/// CNI agent does on a real node), so the change is visible to everyone.
pub const REDIRECTION_ANNOTATION: &str = "kanava.io/redirection";

/// What a lab holds now.
pub struct Current {
    pub nodes: Vec<String>,
    pub objects: ClusterObjects,
}

impl Current {
    pub fn empty(nodes: &[String]) -> Self {
        Current {
            nodes: nodes.to_vec(),
            objects: ClusterObjects::default(),
        }
    }
}

/// The checked changes of one file.
#[derive(Default)]
pub struct Plan {
    pub namespaces: Vec<Namespace>,
    /// New pods, with namespace, uid and node filled in.
    pub new_pods: Vec<Pod>,
    /// Existing pods whose labels or annotations change.
    pub changed_pods: Vec<Pod>,
    /// With `spec.clusterIP` set.
    pub services: Vec<Service>,
    pub policies: Vec<AuthorizationPolicy>,
}

/// Namespaces that exist in every cluster.
const BUILTIN_NAMESPACES: [&str; 2] = ["default", names::SYSTEM_NAMESPACE];

/// Checks `objects` against `current` and decides what changes.
pub fn plan(objects: &[Object], current: &Current) -> Result<Plan, Error> {
    let mut plan = Plan::default();
    let mut seen = BTreeSet::new();
    for object in objects {
        let described = object.describe();
        if !seen.insert(format!("{} {}", object.kind(), manifests::key(object))) {
            return Err(Error::Spec(format!(
                "duplicate {}",
                described.replacen(
                    object.kind().as_str(),
                    &object.kind().as_str().to_lowercase(),
                    1
                )
            )));
        }
    }
    let mut namespaces: BTreeSet<String> = current.objects.namespaces.keys().cloned().collect();
    namespaces.extend(BUILTIN_NAMESPACES.iter().map(|n| n.to_string()));
    for object in objects {
        if let Object::Namespace(ns) = object {
            let name = ns.metadata.name.clone().unwrap_or_default();
            check_dns_label("namespace", &name)?;
            namespaces.insert(name);
            plan.namespaces.push((**ns).clone());
        }
    }
    let namespace_of = |meta: &ObjectMeta, what: &str| -> Result<String, Error> {
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let name = meta.name.clone().unwrap_or_default();
        check_dns_label(&format!("{what} {namespace}/{name}: name"), &name)?;
        if namespaces.contains(&namespace) {
            Ok(namespace)
        } else {
            Err(Error::Spec(format!(
                "{what} {namespace}/{name}: namespace {namespace} does not exist (declare it in the file)"
            )))
        }
    };

    let mut pods_per_node: BTreeMap<&str, usize> =
        current.nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for pod in current.objects.pods.values() {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            *pods_per_node.entry(node).or_default() += 1;
        }
    }
    let mut taken_ips: BTreeSet<IpAddr> = current
        .objects
        .services
        .values()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok())
        .collect();

    for object in objects {
        match object {
            Object::Namespace(_) => {}
            Object::Pod(pod) => {
                let namespace = namespace_of(&pod.metadata, "pod")?;
                let name = pod.metadata.name.clone().unwrap_or_default();
                let key = format!("{namespace}/{name}");
                let mut pod = (**pod).clone();
                pod.metadata.namespace = Some(namespace.clone());
                let spec = pod
                    .spec
                    .as_mut()
                    .ok_or_else(|| Error::Spec(format!("pod {key}: missing spec")))?;
                if spec.containers.is_empty() {
                    return Err(Error::Spec(format!("pod {key}: spec.containers is empty")));
                }
                if let Some(sa) = &spec.service_account_name {
                    check_dns_label(&format!("pod {key}: serviceAccountName"), sa)?;
                }
                if let Some(existing) = current.objects.pods.get(&(namespace.clone(), name.clone()))
                {
                    plan.changed_pods.push(changed_pod(existing, pod, &key)?);
                    continue;
                }
                let node = match &spec.node_name {
                    Some(node) if !current.nodes.contains(node) => {
                        return Err(Error::Spec(format!(
                            "pod {key}: unknown node {node} (nodes: {})",
                            current.nodes.join(", ")
                        )));
                    }
                    Some(node) => node.clone(),
                    // The node with the fewest pods, in node order on ties.
                    None => current
                        .nodes
                        .iter()
                        .min_by_key(|n| pods_per_node.get(n.as_str()).copied().unwrap_or(0))
                        .cloned()
                        .ok_or_else(|| Error::Spec("the lab has no nodes".into()))?,
                };
                if let Some(count) = current
                    .nodes
                    .iter()
                    .find(|n| **n == node)
                    .and_then(|n| pods_per_node.get_mut(n.as_str()))
                {
                    *count += 1;
                }
                spec.node_name = Some(node);
                pod.metadata
                    .uid
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
                pod.status = None;
                plan.new_pods.push(pod);
            }
            Object::Service(service) => {
                let namespace = namespace_of(&service.metadata, "service")?;
                let name = service.metadata.name.clone().unwrap_or_default();
                let key = format!("{namespace}/{name}");
                let mut service = (**service).clone();
                service.metadata.namespace = Some(namespace.clone());
                let existing_ip = current
                    .objects
                    .services
                    .get(&(namespace, name))
                    .and_then(|s| s.spec.as_ref()?.cluster_ip.clone());
                let spec = service.spec.get_or_insert_with(Default::default);
                if matches!(spec.type_.as_deref(), Some("ExternalName")) {
                    return Err(Error::Spec(format!(
                        "service {key}: type ExternalName is not supported"
                    )));
                }
                if spec.ports.as_ref().is_none_or(Vec::is_empty) {
                    return Err(Error::Spec(format!("service {key}: spec.ports is empty")));
                }
                let ip = match (spec.cluster_ip.as_deref(), existing_ip) {
                    (Some(asked), Some(existing)) if asked != existing => {
                        return Err(Error::Spec(format!(
                            "service {key}: spec.clusterIP is immutable (it is {existing})"
                        )));
                    }
                    (_, Some(existing)) => existing,
                    (Some(asked), None) => {
                        let ip: Ipv4Addr = asked.parse().map_err(|_| {
                            Error::Spec(format!(
                                "service {key}: clusterIP {asked:?} is not an IPv4 address"
                            ))
                        })?;
                        if !in_service_cidr(ip) {
                            return Err(Error::Spec(format!(
                                "service {key}: clusterIP {ip} is outside the service range {}/{}",
                                SERVICE_CIDR.0, SERVICE_CIDR.1
                            )));
                        }
                        if !taken_ips.insert(IpAddr::V4(ip)) {
                            return Err(Error::Spec(format!(
                                "service {key}: clusterIP {ip} is already allocated"
                            )));
                        }
                        ip.to_string()
                    }
                    (None, None) => {
                        let ip = allocate(&taken_ips).ok_or_else(|| {
                            Error::Spec(format!("service {key}: the service range is full"))
                        })?;
                        taken_ips.insert(IpAddr::V4(ip));
                        ip.to_string()
                    }
                };
                spec.cluster_ip = Some(ip.clone());
                spec.cluster_ips = Some(vec![ip]);
                spec.type_.get_or_insert_with(|| "ClusterIP".into());
                plan.services.push(service);
            }
            Object::AuthorizationPolicy(policy) => {
                let namespace = namespace_of(&policy.metadata, "AuthorizationPolicy")?;
                let mut policy = (**policy).clone();
                policy.metadata.namespace = Some(namespace);
                plan.policies.push(policy);
            }
        }
    }
    Ok(plan)
}

/// A pod applied again: its spec cannot change, its labels and annotations
/// can. The stored status and identity are kept.
fn changed_pod(existing: &Pod, applied: Pod, key: &str) -> Result<Pod, Error> {
    let mut applied_spec = applied.spec.clone().unwrap_or_default();
    let existing_spec = existing.spec.clone().unwrap_or_default();
    if applied_spec.node_name.is_none() {
        applied_spec.node_name = existing_spec.node_name.clone();
    }
    if applied_spec != existing_spec {
        return Err(Error::Spec(format!(
            "pod {key} exists and its spec cannot change; delete it first"
        )));
    }
    let mut pod = existing.clone();
    pod.metadata.labels = applied.metadata.labels;
    let mut annotations = applied.metadata.annotations.unwrap_or_default();
    if let Some(redirection) = existing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
    {
        annotations.insert(REDIRECTION_ANNOTATION.into(), redirection.clone());
    }
    pod.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    Ok(pod)
}

fn in_service_cidr(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - SERVICE_CIDR.1);
    u32::from(ip) & mask == u32::from(SERVICE_CIDR.0) & mask
}

fn allocate(taken: &BTreeSet<IpAddr>) -> Option<Ipv4Addr> {
    let base = u32::from(SERVICE_CIDR.0);
    let size = 1u32 << (32 - SERVICE_CIDR.1);
    // .0.0 is the network, .0.1 by convention the API server.
    (10..size - 1)
        .map(|offset| Ipv4Addr::from(base + offset))
        .find(|ip| !taken.contains(&IpAddr::V4(*ip)))
}

impl LabSpec {
    /// Plans the lab file's objects into an empty lab: what `up` will do,
    /// checked before anything is built.
    pub fn plan(&self) -> Result<Plan, Error> {
        plan(&self.objects, &Current::empty(&self.nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::spec::tests::FILE;

    #[test]
    fn a_valid_file_plans_pods_onto_nodes() {
        let plan = LabSpec::parse(FILE, 2).unwrap().plan().unwrap();
        assert_eq!(plan.namespaces.len(), 1);
        assert_eq!(plan.new_pods.len(), 4);
        for pod in &plan.new_pods {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            assert!(matches!(node, Some("alpha" | "beta")), "{node:?}");
            assert!(pod.metadata.uid.is_some(), "pods get a uid");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                FILE.replace("nodeName: alpha", "nodeName: gamma"),
                "unknown node gamma",
            ),
            (
                format!(
                    "{FILE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: shop}}\nspec: {{containers: [{{name: c}}]}}\n"
                ),
                "duplicate pod shop/a",
            ),
            (
                FILE.replace(
                    "namespace: shop}\nspec: {nodeName",
                    "namespace: nowhere}\nspec: {nodeName",
                ),
                "namespace nowhere does not exist",
            ),
            (FILE.replace("name: a,", "name: A_1,"), "not a valid name"),
        ];
        for (text, expected) in cases {
            let spec = LabSpec::parse(&text, 2).expect("the file itself parses");
            let err = spec.plan().err().expect("refused").to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn service_ips_are_allocated_inside_the_range() {
        let taken = BTreeSet::from([IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))]);
        assert_eq!(allocate(&taken), Some(Ipv4Addr::new(10, 96, 0, 11)));
        assert!(in_service_cidr(Ipv4Addr::new(10, 96, 255, 1)));
        assert!(!in_service_cidr(Ipv4Addr::new(10, 97, 0, 1)));
    }
}
