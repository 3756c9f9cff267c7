//! The lab file: ordinary Kubernetes manifests plus one optional `kind: Lab`
//! document.
//!
//! ```yaml
//! kind: Lab
//! nodes: 2                 # node-1, node-2; or a list: [edge, core]
//! certificateTTL: 60s      # optional: workload certificate lifetime
//! ---
//! apiVersion: v1
//! kind: Namespace
//! metadata: {name: shop, labels: {kanava.io/dataplane-mode: ambient}}
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web, namespace: shop, labels: {app: web}}
//! spec:
//!   nodeName: node-2       # optional; otherwise the node with the fewest pods
//!   serviceAccountName: web
//!   containers:
//!   - name: web
//!     command: [labapp, http, --port, "80"]
//!     readinessProbe: {tcpSocket: {port: 80}}
//! ---
//! apiVersion: v1
//! kind: Service
//! metadata: {name: web, namespace: shop}
//! spec: {selector: {app: web}, ports: [{port: 80}]}
//! ```
//!
//! Images are ignored: a pod's first container command runs on the host's
//! file system, inside the pod's network namespace. Service and
//! AuthorizationPolicy documents are served by the control plane.

use std::time::Duration;

use kanava_cluster::{Object, Other, parse_manifests};

use crate::Error;
use crate::names::check_dns_label;

/// Nodes when neither the file nor the caller says otherwise.
pub const DEFAULT_NODES: usize = 2;
/// The most nodes a lab may have (one /24 of the underlay each).
pub const MAX_NODES: usize = 200;

/// A lab file: its nodes and settings, and the objects to apply.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub nodes: Vec<String>,
    /// Lifetime of workload certificates (`certificateTTL`); the control
    /// plane's default when absent.
    pub cert_ttl: Option<Duration>,
    /// Kubernetes objects in file order.
    pub objects: Vec<Object>,
}

impl LabSpec {
    /// Parses a lab file and checks it against itself (what needs the lab's
    /// current state is checked when it is applied). `default_nodes` applies
    /// when the file has no `kind: Lab` document.
    pub fn parse(text: &str, default_nodes: usize) -> Result<Self, Error> {
        let (objects, others) = parse_objects(text, true)?;
        let mut lab = None;
        for other in others {
            if lab.is_some() {
                return Err(Error::Spec(format!(
                    "document {}: only one `kind: Lab` document is allowed",
                    other.document
                )));
            }
            lab = Some(other);
        }
        let (nodes, cert_ttl) = match lab {
            Some(lab) => (
                parse_nodes(&lab.value, lab.document)?,
                parse_ttl(&lab.value, lab.document)?,
            ),
            None => (numbered_nodes(default_nodes)?, None),
        };
        let spec = LabSpec {
            nodes,
            cert_ttl,
            objects,
        };
        Ok(spec)
    }
}

/// Reads manifests for `up`, `apply` or `delete`. `kind: Lab` documents are
/// returned separately when `allow_lab` (only `up` takes one).
pub fn parse_objects(text: &str, allow_lab: bool) -> Result<(Vec<Object>, Vec<Other>), Error> {
    let (objects, others) =
        parse_manifests(text).map_err(|e| Error::Spec(format!("invalid lab file: {e}")))?;
    for other in &others {
        if other.kind != "Lab" {
            return Err(Error::Spec(format!(
                "document {}: kind {} is not supported in a lab (use Namespace, Pod, Service, AuthorizationPolicy{})",
                other.document,
                other.kind,
                if allow_lab { ", Lab" } else { "" }
            )));
        }
        if !allow_lab {
            return Err(Error::Spec(format!(
                "document {}: `kind: Lab` only belongs in the file given to `lab up`",
                other.document
            )));
        }
    }
    Ok((objects, others))
}

fn parse_nodes(value: &serde_yaml::Value, document: usize) -> Result<Vec<String>, Error> {
    let Some(nodes) = value.get("nodes") else {
        return numbered_nodes(DEFAULT_NODES);
    };
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
    if names.is_empty() || names.len() > MAX_NODES {
        return Err(Error::Spec(format!(
            "a lab has 1 to {MAX_NODES} nodes, not {}",
            names.len()
        )));
    }
    Ok(names)
}

fn parse_ttl(value: &serde_yaml::Value, document: usize) -> Result<Option<Duration>, Error> {
    let Some(ttl) = value.get("certificateTTL") else {
        return Ok(None);
    };
    let text = ttl.as_str().ok_or_else(|| {
        Error::Spec(format!(
            "document {document} (Lab): certificateTTL must be a duration such as 60s or 24h"
        ))
    })?;
    let ttl = humantime::parse_duration(text).map_err(|e| {
        Error::Spec(format!(
            "document {document} (Lab): certificateTTL {text:?}: {e}"
        ))
    })?;
    if ttl < Duration::from_secs(10) {
        return Err(Error::Spec(format!(
            "document {document} (Lab): certificateTTL {text} is shorter than 10s"
        )));
    }
    Ok(Some(ttl))
}

fn numbered_nodes(count: usize) -> Result<Vec<String>, Error> {
    if count == 0 || count > MAX_NODES {
        return Err(Error::Spec(format!(
            "a lab has 1 to {MAX_NODES} nodes, not {count}"
        )));
    }
    Ok((1..=count).map(|i| format!("node-{i}")).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A lab file: nodes alpha and beta, namespace shop, pods shop/a,
    /// shop/b (on alpha), shop/c and default/d. The planner's tests use it
    /// too.
    pub(crate) const FILE: &str = r#"
kind: Lab
nodes: [alpha, beta]
certificateTTL: 90s
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

    #[test]
    fn reads_nodes_and_settings() {
        let spec = LabSpec::parse(FILE, 2).unwrap();
        assert_eq!(spec.nodes, ["alpha", "beta"]);
        assert_eq!(spec.cert_ttl, Some(Duration::from_secs(90)));
        assert_eq!(spec.objects.len(), 5);
    }

    #[test]
    fn nodes_default_to_the_caller_count() {
        let spec =
            LabSpec::parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", 3).unwrap();
        assert_eq!(spec.nodes, ["node-1", "node-2", "node-3"]);
        assert_eq!(spec.cert_ttl, None);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                "kind: Pod\nmetadata: {name: [\n".to_string(),
                "invalid lab file",
            ),
            (
                FILE.replace("nodes: [alpha, beta]", "nodes: 0"),
                "1 to 200 nodes",
            ),
            (
                FILE.replace("certificateTTL: 90s", "certificateTTL: soon"),
                "certificateTTL",
            ),
            (
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n".to_string(),
                "kind Deployment is not supported",
            ),
        ];
        for (text, expected) in cases {
            let err = LabSpec::parse(&text, 2).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }
}
