//! Applying and deleting objects in a lab, as `kubectl apply` / `delete`
//! would against a cluster — and doing what the cluster's components would
//! do about them: schedule pods, build their networks, hand enrolled pods to
//! their ztunnel (and take them back when they leave the mesh), start and
//! stop their processes, allocate Service IPs.
//!
//! Everything is checked first ([`plan`]); nothing changes unless the whole
//! file is acceptable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kanava_control_plane::crd::AuthorizationPolicy;
use kanava_control_plane::source::{ClusterObjects, Object};
use kanava_mesh::{is_enrolled, names};

use crate::manifests::{self, Manifests};
use crate::pods::{self, Env};
use crate::propagation::Expect;
use crate::spec::check_dns_label;
use crate::state::LabState;
use crate::{Error, propagation};

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
                described.replacen(object.kind(), &object.kind().to_lowercase(), 1)
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

/// What an apply or delete did.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per change, e.g. `pod shop/web created`.
    pub changes: Vec<String>,
    /// What did not work out but did not stop the rest, e.g. a policy the
    /// control plane did not serve (rejected as invalid).
    pub warnings: Vec<String>,
    /// The longest a change took from being stored to being held by every
    /// ztunnel.
    pub propagation: std::time::Duration,
}

/// Carries out `plan` in a running lab.
pub fn execute(state: &mut LabState, plan: Plan, env: &Env) -> Result<Report, Error> {
    let manifests = Manifests::new(state.layout().manifest_dir());
    let mut report = Report::default();
    let mut expect = Vec::new();

    for namespace in plan.namespaces {
        let name = namespace.metadata.name.clone().unwrap_or_default();
        let version = manifests.write(state, Object::Namespace(Arc::new(namespace)))?;
        // Its pods' workloads change with it (mode, enrollment).
        expect.extend(
            state
                .pods
                .iter()
                .filter(|p| p.namespace == name)
                .map(|p| Expect::workload(&p.uid, version)),
        );
        report.changes.push(format!("namespace {name} configured"));
    }
    for pod in &plan.new_pods {
        env.check_cancel()?;
        let created = pods::create_network(state, env, pod)?;
        let key = created.key();
        state.pods.push(created);
        state.save()?;
        let version = manifests.write(
            state,
            Object::Pod(Arc::new(pods::manifest(state, pod, false)?)),
        )?;
        expect.push(Expect::workload(&pod_uid(pod), version));
        report.changes.push(format!("pod {key} created"));
    }
    for pod in plan.changed_pods {
        let uid = pod_uid(&pod);
        let key = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        let version = manifests.write(state, Object::Pod(Arc::new(pod)))?;
        expect.push(Expect::workload(&uid, version));
        report.changes.push(format!("pod {key} configured"));
    }
    for service in plan.services {
        let key = format!(
            "{}/{}",
            service.metadata.namespace.as_deref().unwrap_or(""),
            service.metadata.name.as_deref().unwrap_or("")
        );
        let ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .unwrap_or_default();
        let version = manifests.write(state, Object::Service(Arc::new(service)))?;
        expect.push(Expect::service(&key, version));
        report
            .changes
            .push(format!("service {key} configured (clusterIP {ip})"));
    }
    for policy in plan.policies {
        let key = format!(
            "{}/{}",
            policy.metadata.namespace.as_deref().unwrap_or(""),
            policy.metadata.name.as_deref().unwrap_or("")
        );
        let version = manifests.write(state, Object::AuthorizationPolicy(Arc::new(policy)))?;
        expect.push(Expect::policy(&key, version));
        report
            .changes
            .push(format!("authorizationpolicy {key} configured"));
    }
    state.save()?;

    expect.extend(reconcile_capture(state, &manifests, env, &mut report)?);
    wait(state, env, expect, &mut report)?;

    // Pods start only now: captured, and known to every ztunnel.
    let mut expect = Vec::new();
    for pod in &plan.new_pods {
        env.check_cancel()?;
        let uid = pod_uid(pod);
        if let Some(version) = pods::start(state, &manifests, env, &uid)? {
            expect.push(Expect::workload(&uid, version));
        }
        state.save()?;
    }
    wait(state, env, expect, &mut report)?;
    Ok(report)
}

/// Deletes the objects named in a file (cascading from namespaces to what
/// they hold).
pub fn delete(state: &mut LabState, objects: &[Object], env: &Env) -> Result<Report, Error> {
    let manifests = Manifests::new(state.layout().manifest_dir());
    let current = manifests.read()?;
    let mut targets: Vec<Object> = Vec::new();
    for object in objects {
        let key = manifests::key(object);
        let split = |key: &str| {
            let (ns, name) = key.split_once('/').unwrap_or(("default", key));
            (ns.to_string(), name.to_string())
        };
        let found = match object {
            Object::Namespace(_) => {
                let Some(ns) = current.namespaces.get(&key) else {
                    return Err(Error::Spec(format!("namespace {key} not found")));
                };
                let in_namespace = |k: &(String, String)| k.0 == key;
                targets.extend(
                    current
                        .pods
                        .iter()
                        .filter(|(k, _)| in_namespace(k))
                        .map(|(_, p)| Object::Pod(p.clone())),
                );
                targets.extend(
                    current
                        .services
                        .iter()
                        .filter(|(k, _)| in_namespace(k))
                        .map(|(_, s)| Object::Service(s.clone())),
                );
                targets.extend(
                    current
                        .policies
                        .iter()
                        .filter(|(k, _)| in_namespace(k))
                        .map(|(_, p)| Object::AuthorizationPolicy(p.clone())),
                );
                Object::Namespace(ns.clone())
            }
            Object::Pod(_) => current
                .pods
                .get(&split(&key))
                .map(|p| Object::Pod(p.clone()))
                .ok_or_else(|| Error::Spec(format!("pod {key} not found")))?,
            Object::Service(_) => current
                .services
                .get(&split(&key))
                .map(|s| Object::Service(s.clone()))
                .ok_or_else(|| Error::Spec(format!("service {key} not found")))?,
            Object::AuthorizationPolicy(_) => current
                .policies
                .get(&split(&key))
                .map(|p| Object::AuthorizationPolicy(p.clone()))
                .ok_or_else(|| Error::Spec(format!("authorizationpolicy {key} not found")))?,
        };
        targets.push(found);
    }

    let mut report = Report::default();
    let mut expect = Vec::new();
    for object in &targets {
        let key = manifests::key(object);
        match object {
            Object::Pod(pod) => {
                let uid = pod_uid(pod);
                pods::destroy(state, env, &uid)?;
                manifests.remove(object)?;
                state.pods.retain(|p| p.uid != uid);
                state.save()?;
                expect.push(Expect::gone(&format!("workload/{uid}")));
            }
            Object::Service(_) => {
                manifests.remove(object)?;
                expect.push(Expect::gone(&format!("service/{key}")));
            }
            Object::AuthorizationPolicy(_) => {
                manifests.remove(object)?;
                expect.push(Expect::gone(&format!("policy/{key}")));
            }
            Object::Namespace(_) => manifests.remove(object)?,
        }
        report
            .changes
            .push(format!("{} {key} deleted", object.kind().to_lowercase()));
    }
    wait(state, env, expect, &mut report)?;
    Ok(report)
}

/// Hands every pod that should be in the mesh, and is not yet, to its
/// ztunnel; takes back every pod that should not be and is. Returns what the
/// ztunnels must see before the change is complete.
fn reconcile_capture(
    state: &mut LabState,
    manifests: &Manifests,
    env: &Env,
    report: &mut Report,
) -> Result<Vec<Expect>, Error> {
    let objects = manifests.read()?;
    let mut expect = Vec::new();
    let keys: Vec<(String, String)> = state
        .pods
        .iter()
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    for key in keys {
        env.check_cancel()?;
        let Some(pod) = objects.pods.get(&key) else {
            continue;
        };
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let wanted = !host_network
            && is_enrolled(
                objects
                    .namespaces
                    .get(&key.0)
                    .and_then(|ns| ns.metadata.labels.as_ref()),
                pod.metadata.labels.as_ref(),
            );
        let Some(index) = state
            .pods
            .iter()
            .position(|p| p.namespace == key.0 && p.name == key.1)
        else {
            continue;
        };
        if wanted == state.pods[index].captured {
            continue;
        }
        if wanted {
            pods::capture(state, index, env)?;
            report
                .changes
                .push(format!("pod {}/{} captured", key.0, key.1));
        } else {
            pods::release(state, index, env)?;
            report
                .changes
                .push(format!("pod {}/{} released", key.0, key.1));
        }
        state.pods[index].captured = wanted;
        state.save()?;
        let mut pod = (**pod).clone();
        let annotations = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        if wanted {
            annotations.insert(REDIRECTION_ANNOTATION.into(), "enabled".into());
        } else {
            annotations.remove(REDIRECTION_ANNOTATION);
        }
        let uid = pod_uid(&pod);
        let version = manifests.write(state, Object::Pod(Arc::new(pod)))?;
        expect.push(Expect::workload(&uid, version));
    }
    state.save()?;
    Ok(expect)
}

fn wait(
    state: &LabState,
    env: &Env,
    expect: Vec<Expect>,
    report: &mut Report,
) -> Result<(), Error> {
    if expect.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let missing = propagation::wait(state, &expect, env.propagation_timeout, env.cancel.as_ref())?;
    report.propagation = report.propagation.max(started.elapsed());
    for (node, name) in missing {
        report.warnings.push(if name.starts_with("policy/") {
            format!("{name} has not reached the ztunnel on {node}: the control plane rejected it? (see `kanava lab logs control-plane`)")
        } else {
            format!("{name} has not reached the ztunnel on {node} yet")
        });
    }
    Ok(())
}

fn pod_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ips_are_allocated_inside_the_range() {
        let taken = BTreeSet::from([IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))]);
        assert_eq!(allocate(&taken), Some(Ipv4Addr::new(10, 96, 0, 11)));
        assert!(in_service_cidr(Ipv4Addr::new(10, 96, 255, 1)));
        assert!(!in_service_cidr(Ipv4Addr::new(10, 97, 0, 1)));
    }
}
