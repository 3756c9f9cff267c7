//! Deciding what a manifest changes in a lab, before anything is changed:
//! every object is checked against the lab's nodes and current objects,
//! pods get their node, uid and IP-independent fields, Services their
//! virtual IPs. [`plan`] is pure; [`apply`](crate::apply) carries a plan out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kanava_cluster::crd::AuthorizationPolicy;
use kanava_cluster::{ClusterObjects, Object};
use kanava_mesh::names;

use crate::family::{IpFamilies, IpFamily};
use crate::names::check_dns_label;
use crate::spec::LabSpec;
use crate::{Error, manifests};

/// IPv4 Service virtual IPs come from 10.96.0.0/16, like a default cluster.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// IPv6 Service virtual IPs come from fd00:96::/112.
pub const SERVICE_CIDR_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0), 112);
/// Annotation the lab puts on a pod it has handed to its ztunnel (what the
/// CNI agent does on a real node), so the change is visible to everyone.
pub const REDIRECTION_ANNOTATION: &str = "kanava.io/redirection";

/// What a lab holds now.
pub struct Current {
    pub nodes: Vec<String>,
    pub families: IpFamilies,
    pub objects: ClusterObjects,
}

impl Current {
    pub fn empty(nodes: &[String], families: &IpFamilies) -> Self {
        Current {
            nodes: nodes.to_vec(),
            families: families.clone(),
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
                let existing_ips = current
                    .objects
                    .services
                    .get(&(namespace, name))
                    .and_then(|s| s.spec.as_ref()?.cluster_ips.clone());
                let spec = service.spec.get_or_insert_with(Default::default);
                if matches!(spec.type_.as_deref(), Some("ExternalName")) {
                    return Err(Error::Spec(format!(
                        "service {key}: type ExternalName is not supported"
                    )));
                }
                if spec.ports.as_ref().is_none_or(Vec::is_empty) {
                    return Err(Error::Spec(format!("service {key}: spec.ports is empty")));
                }
                let (families, policy) = service_families(spec, &current.families)
                    .map_err(|why| Error::Spec(format!("service {key}: {why}")))?;
                let asked: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
                    (Some(ips), _) if !ips.is_empty() => ips.clone(),
                    (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
                    _ => Vec::new(),
                };
                let ips = match existing_ips {
                    Some(existing)
                        if !asked.is_empty()
                            && asked != existing[..asked.len().min(existing.len())] =>
                    {
                        return Err(Error::Spec(format!(
                            "service {key}: spec.clusterIP is immutable (it is {})",
                            existing.join(", ")
                        )));
                    }
                    Some(existing) => existing,
                    None => {
                        let mut ips = Vec::new();
                        for (position, family) in families.iter().enumerate() {
                            let ip = match asked.get(position) {
                                Some(text) => {
                                    let ip: IpAddr = text.parse().map_err(|_| {
                                        Error::Spec(format!(
                                            "service {key}: clusterIP {text:?} is not an IP address"
                                        ))
                                    })?;
                                    if IpFamily::of(ip) != *family {
                                        return Err(Error::Spec(format!(
                                            "service {key}: clusterIP {ip} is not {family} (the service's families are {})",
                                            family_names(&families)
                                        )));
                                    }
                                    if !in_service_cidr(ip) {
                                        let (base, prefix) = service_cidr(*family);
                                        return Err(Error::Spec(format!(
                                            "service {key}: clusterIP {ip} is outside the service range {base}/{prefix}"
                                        )));
                                    }
                                    if !taken_ips.insert(ip) {
                                        return Err(Error::Spec(format!(
                                            "service {key}: clusterIP {ip} is already allocated"
                                        )));
                                    }
                                    ip
                                }
                                None => {
                                    let ip = allocate(*family, &taken_ips).ok_or_else(|| {
                                        Error::Spec(format!(
                                            "service {key}: the {family} service range is full"
                                        ))
                                    })?;
                                    taken_ips.insert(ip);
                                    ip
                                }
                            };
                            ips.push(ip.to_string());
                        }
                        if asked.len() > ips.len() {
                            return Err(Error::Spec(format!(
                                "service {key}: {} clusterIPs for the families {}",
                                asked.len(),
                                family_names(&families)
                            )));
                        }
                        ips
                    }
                };
                spec.cluster_ip = ips.first().cloned();
                spec.cluster_ips = Some(ips.clone());
                // What the addresses are, also for a Service applied again
                // (its addresses do not change).
                spec.ip_families = Some(
                    ips.iter()
                        .filter_map(|ip| ip.parse().ok())
                        .map(|ip| IpFamily::of(ip).to_string())
                        .collect(),
                );
                spec.ip_family_policy = Some(policy.into());
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

/// The range Service virtual IPs of `family` come from.
pub fn service_cidr(family: IpFamily) -> (IpAddr, u8) {
    match family {
        IpFamily::IPv4 => (SERVICE_CIDR.0.into(), SERVICE_CIDR.1),
        IpFamily::IPv6 => (SERVICE_CIDR_V6.0.into(), SERVICE_CIDR_V6.1),
    }
}

fn in_service_cidr(ip: IpAddr) -> bool {
    let (base, prefix) = service_cidr(IpFamily::of(ip));
    let bits = |ip: IpAddr| match ip {
        IpAddr::V4(ip) => u128::from(u32::from(ip)) << 96,
        IpAddr::V6(ip) => u128::from(ip),
    };
    // IPv4 sits in the top 32 bits, so one mask of `prefix` bits fits both.
    let mask = u128::MAX << (128 - u32::from(prefix));
    bits(ip) & mask == bits(base) & mask
}

fn allocate(family: IpFamily, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let (base, prefix) = service_cidr(family);
    let (base, bits): (u128, u32) = match base {
        IpAddr::V4(ip) => (u128::from(u32::from(ip)), 32),
        IpAddr::V6(ip) => (u128::from(ip), 128),
    };
    let size = 1u128 << (bits - u32::from(prefix));
    let address = |offset: u128| -> IpAddr {
        match family {
            IpFamily::IPv4 => Ipv4Addr::from(u32::try_from(base + offset).unwrap_or(0)).into(),
            IpFamily::IPv6 => Ipv6Addr::from(base + offset).into(),
        }
    };
    // The first addresses are the network and, by convention, the API
    // server's.
    (10..size - 1).map(address).find(|ip| !taken.contains(ip))
}

/// The families a Service gets, as the API server decides them from
/// `spec.ipFamilyPolicy` and `spec.ipFamilies`, and the policy it records.
fn service_families(
    spec: &ServiceSpec,
    lab: &IpFamilies,
) -> Result<(Vec<IpFamily>, &'static str), String> {
    let policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => "SingleStack",
        Some("PreferDualStack") => "PreferDualStack",
        Some("RequireDualStack") => "RequireDualStack",
        Some(other) => {
            return Err(format!(
                "spec.ipFamilyPolicy {other:?} is not SingleStack, PreferDualStack or RequireDualStack"
            ));
        }
    };
    let asked = spec
        .ip_families
        .iter()
        .flatten()
        .map(|name| IpFamily::parse(name).map_err(|e| format!("spec.ipFamilies: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if asked.len() > 2 || (asked.len() == 2 && asked[0] == asked[1]) {
        return Err("spec.ipFamilies must name one family, or two different ones".into());
    }
    if let Some(missing) = asked.iter().find(|f| !lab.contains(**f)) {
        return Err(format!(
            "spec.ipFamilies asks for {missing}, which the lab does not have (its ipFamilies are {lab})"
        ));
    }
    if policy == "RequireDualStack" && !lab.is_dual_stack() {
        return Err(format!(
            "ipFamilyPolicy RequireDualStack in a lab of {lab} (set ipFamilies: [IPv4, IPv6] in the Lab document)"
        ));
    }
    if policy == "SingleStack" && asked.len() == 2 {
        return Err(
            "two spec.ipFamilies need ipFamilyPolicy PreferDualStack or RequireDualStack".into(),
        );
    }
    let mut families = match asked.first() {
        Some(first) => vec![*first],
        None => vec![lab.primary()],
    };
    if policy != "SingleStack" {
        let first = families[0];
        families.extend(lab.iter().filter(|f| *f != first));
    }
    Ok((families, policy))
}

fn family_names(families: &[IpFamily]) -> String {
    let names: Vec<String> = families.iter().map(ToString::to_string).collect();
    format!("[{}]", names.join(", "))
}

impl LabSpec {
    /// Plans the lab file's objects into an empty lab: what `up` will do,
    /// checked before anything is built.
    pub fn plan(&self) -> Result<Plan, Error> {
        plan(&self.objects, &Current::empty(&self.nodes, &self.families))
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
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let taken = BTreeSet::from([ip("10.96.0.10"), ip("fd00:96::a")]);
        assert_eq!(allocate(IpFamily::IPv4, &taken), Some(ip("10.96.0.11")));
        assert_eq!(allocate(IpFamily::IPv6, &taken), Some(ip("fd00:96::b")));
        assert!(in_service_cidr(ip("10.96.255.1")));
        assert!(!in_service_cidr(ip("10.97.0.1")));
        assert!(in_service_cidr(ip("fd00:96::ffff")));
        assert!(!in_service_cidr(ip("fd00:96::1:0")));
    }

    #[test]
    fn services_get_the_families_they_ask_for() {
        use IpFamily::*;
        let dual = IpFamilies::new(vec![IPv6, IPv4]).unwrap();
        let spec = |policy: Option<&str>, families: &[&str]| ServiceSpec {
            ip_family_policy: policy.map(str::to_string),
            ip_families: (!families.is_empty())
                .then(|| families.iter().map(|f| f.to_string()).collect()),
            ..Default::default()
        };
        let families = |s: ServiceSpec, lab: &IpFamilies| service_families(&s, lab).map(|f| f.0);
        assert_eq!(families(spec(None, &[]), &dual), Ok(vec![IPv6]));
        assert_eq!(families(spec(None, &["IPv4"]), &dual), Ok(vec![IPv4]));
        assert_eq!(
            families(spec(Some("PreferDualStack"), &[]), &dual),
            Ok(vec![IPv6, IPv4])
        );
        assert_eq!(
            families(spec(Some("PreferDualStack"), &["IPv4"]), &dual),
            Ok(vec![IPv4, IPv6])
        );
        let v4 = IpFamilies::default();
        assert_eq!(
            families(spec(Some("PreferDualStack"), &[]), &v4),
            Ok(vec![IPv4])
        );
        for (asked, lab, expected) in [
            (
                spec(Some("RequireDualStack"), &[]),
                &v4,
                "RequireDualStack in a lab of [IPv4]",
            ),
            (
                spec(None, &["IPv6"]),
                &v4,
                "asks for IPv6, which the lab does not have",
            ),
            (spec(None, &["IPv4", "IPv6"]), &dual, "need ipFamilyPolicy"),
            (spec(Some("Dual"), &[]), &dual, "is not SingleStack"),
        ] {
            let err = families(asked, lab).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
