//! The lab file: ordinary Kubernetes manifests plus one optional `kind: Lab`
//! document.
//!
//! ```yaml
//! kind: Lab
//! nodes: 2                 # node-1, node-2; or a list: [edge, core]
//! ---
//! apiVersion: v1
//! kind: Namespace
//! metadata: {name: shop, labels: {kanava.io/dataplane-mode: ambient}}
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web, namespace: shop}
//! spec:
//!   nodeName: node-2       # optional; otherwise placed round-robin
//!   serviceAccountName: web
//!   containers:
//!   - name: web
//!     command: [labapp, http, --port, "80"]
//!     readinessProbe: {tcpSocket: {port: 80}}
//! ```
//!
//! Images are ignored: a pod's first container command runs on the host's
//! file system, inside the pod's network namespace.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kanava_control_plane::source::{Object, parse_manifests};

use crate::Error;

/// Nodes when neither the file nor the caller says otherwise.
pub const DEFAULT_NODES: usize = 2;
/// The most nodes a lab may have (one /24 of the underlay each).
pub const MAX_NODES: usize = 200;

/// A validated lab description.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub nodes: Vec<String>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods in file order, each with `metadata.namespace`, `metadata.uid`
    /// and `spec.nodeName` filled in.
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
}

impl LabSpec {
    /// Parses and validates a lab file. `default_nodes` applies when the file
    /// has no `kind: Lab` document.
    pub fn parse(text: &str, default_nodes: usize) -> Result<Self, Error> {
        let (objects, others) =
            parse_manifests(text).map_err(|e| Error::Spec(format!("invalid lab file: {e}")))?;

        let mut nodes = None;
        for other in others {
            if other.kind != "Lab" {
                return Err(Error::Spec(format!(
                    "document {}: kind {} is not supported in a lab file (use Namespace, Pod, Service, Lab)",
                    other.document, other.kind
                )));
            }
            if nodes.is_some() {
                return Err(Error::Spec(format!(
                    "document {}: only one `kind: Lab` document is allowed",
                    other.document
                )));
            }
            nodes = Some(parse_nodes(&other.value, other.document)?);
        }
        let nodes = match nodes {
            Some(nodes) => nodes,
            None => numbered_nodes(default_nodes)?,
        };

        let mut spec = LabSpec {
            nodes,
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            services: Vec::new(),
        };
        let mut pod_names = BTreeSet::new();
        for object in objects {
            match object {
                Object::Namespace(ns) => {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    check_dns_label("namespace", &name)?;
                    if spec.namespaces.insert(name.clone(), *ns).is_some() {
                        return Err(Error::Spec(format!("duplicate namespace {name}")));
                    }
                }
                Object::Pod(pod) => {
                    let key = format!(
                        "{}/{}",
                        pod.metadata.namespace.as_deref().unwrap_or("default"),
                        pod.metadata.name.as_deref().unwrap_or("")
                    );
                    if !pod_names.insert(key.clone()) {
                        return Err(Error::Spec(format!("duplicate pod {key}")));
                    }
                    spec.pods.push(*pod);
                }
                Object::Service(service) => spec.services.push(*service),
            }
        }
        spec.complete_pods()?;
        Ok(spec)
    }

    /// Validates pods and fills in what an API server and scheduler would.
    fn complete_pods(&mut self) -> Result<(), Error> {
        let mut next_node = 0;
        for pod in &mut self.pods {
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = pod.metadata.name.clone().unwrap_or_default();
            let key = format!("{namespace}/{name}");
            check_dns_label(&format!("pod {key}: name"), &name)?;
            if !self.namespaces.contains_key(&namespace) {
                if namespace == "default" {
                    self.namespaces
                        .insert(namespace.clone(), default_namespace());
                } else {
                    return Err(Error::Spec(format!(
                        "pod {key}: namespace {namespace} is not declared in the lab file"
                    )));
                }
            }
            let spec = pod
                .spec
                .as_mut()
                .ok_or_else(|| Error::Spec(format!("pod {key}: missing spec")))?;
            if spec.containers.is_empty() {
                return Err(Error::Spec(format!("pod {key}: spec.containers is empty")));
            }
            match &spec.node_name {
                Some(node) if !self.nodes.contains(node) => {
                    return Err(Error::Spec(format!(
                        "pod {key}: unknown node {node} (nodes: {})",
                        self.nodes.join(", ")
                    )));
                }
                Some(_) => {}
                None => {
                    spec.node_name = Some(self.nodes[next_node % self.nodes.len()].clone());
                    next_node += 1;
                }
            }
            if let Some(sa) = &spec.service_account_name {
                check_dns_label(&format!("pod {key}: serviceAccountName"), sa)?;
            }
            pod.metadata.namespace = Some(namespace);
            if pod.metadata.uid.is_none() {
                pod.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
            }
        }
        Ok(())
    }
}

fn default_namespace() -> Namespace {
    Namespace {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn parse_nodes(value: &serde_yaml::Value, document: usize) -> Result<Vec<String>, Error> {
    let nodes = value.get("nodes").ok_or_else(|| {
        Error::Spec(format!(
            "document {document} (Lab): missing `nodes` (a count or a list of names)"
        ))
    })?;
    if let Some(count) = nodes.as_u64() {
        return numbered_nodes(usize::try_from(count).unwrap_or(usize::MAX));
    }
    let list = nodes.as_sequence().ok_or_else(|| {
        Error::Spec(format!(
            "document {document} (Lab): `nodes` must be a count or a list of names"
        ))
    })?;
    let mut names = Vec::new();
    for node in list {
        let name = node.as_str().ok_or_else(|| {
            Error::Spec(format!(
                "document {document} (Lab): node names must be strings"
            ))
        })?;
        check_dns_label("node name", name)?;
        if names.iter().any(|n| n == name) {
            return Err(Error::Spec(format!("duplicate node {name}")));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(Error::Spec("a lab needs at least one node".into()));
    }
    if names.len() > MAX_NODES {
        return Err(Error::Spec(format!("a lab has at most {MAX_NODES} nodes")));
    }
    Ok(names)
}

fn numbered_nodes(count: usize) -> Result<Vec<String>, Error> {
    if count == 0 || count > MAX_NODES {
        return Err(Error::Spec(format!(
            "a lab has 1 to {MAX_NODES} nodes, not {count}"
        )));
    }
    Ok((1..=count).map(|i| format!("node-{i}")).collect())
}

/// Kubernetes names (RFC 1123 labels): lowercase letters, digits and `-`,
/// starting and ending with a letter or digit, at most 63 characters.
pub fn check_dns_label(what: &str, name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(Error::Spec(format!(
            "{what} {name:?} is not a valid name (lowercase letters, digits and '-', at most 63)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
kind: Lab
nodes: [alpha, beta]
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kanava.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop}
spec: {containers: [{name: c, command: [sleep, "1000"]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop}
spec: {nodeName: alpha, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: shop}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: d}
spec: {containers: [{name: c}]}
"#;

    fn node_of(pod: &Pod) -> &str {
        pod.spec.as_ref().unwrap().node_name.as_deref().unwrap()
    }

    #[test]
    fn places_pods_and_fills_defaults() {
        let spec = LabSpec::parse(FILE, 2).unwrap();
        assert_eq!(spec.nodes, ["alpha", "beta"]);
        let nodes: Vec<_> = spec.pods.iter().map(node_of).collect();
        assert_eq!(
            nodes,
            ["alpha", "alpha", "beta", "alpha"],
            "round-robin over unplaced pods"
        );
        assert!(spec.pods.iter().all(|p| p.metadata.uid.is_some()));
        assert!(
            spec.namespaces.contains_key("default"),
            "default namespace implied"
        );
    }

    #[test]
    fn nodes_default_to_the_caller_count() {
        let spec =
            LabSpec::parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", 3).unwrap();
        assert_eq!(spec.nodes, ["node-1", "node-2", "node-3"]);
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
                "kind: Pod\nmetadata: {name: [\n".to_string(),
                "invalid lab file",
            ),
            (
                FILE.replace(
                    "namespace: shop}\nspec: {nodeName",
                    "namespace: nowhere}\nspec: {nodeName",
                ),
                "namespace nowhere is not declared",
            ),
            (
                FILE.replace("nodes: [alpha, beta]", "nodes: 0"),
                "1 to 200 nodes",
            ),
            (
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n".to_string(),
                "kind Deployment is not supported",
            ),
            (FILE.replace("name: a,", "name: A_1,"), "not a valid name"),
        ];
        for (text, expected) in cases {
            let err = LabSpec::parse(&text, 2).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }
}
