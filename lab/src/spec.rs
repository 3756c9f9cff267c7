//! The lab file: ordinary Kubernetes manifests plus one optional `kind: Lab`
//! document.
//!
//! ```yaml
//! kind: Lab
//! nodes: 2                 # node-1, node-2; or a list: [edge, core]
//! certificateTTL: 60s      # optional: workload certificate lifetime
//! ipFamilies: [IPv4]       # optional: [IPv6], or dual-stack [IPv4, IPv6] / [IPv6, IPv4]
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
use crate::family::{IpFamilies, IpFamily};
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
    /// The lab's IP families (`ipFamilies`), IPv4 when absent.
    pub families: IpFamilies,
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
        let (nodes, cert_ttl, families) = match lab {
            Some(lab) => (
                parse_nodes(&lab.value, lab.document)?,
                parse_ttl(&lab.value, lab.document)?,
                parse_families(&lab.value, lab.document)?,
            ),
            None => (numbered_nodes(default_nodes)?, None, IpFamilies::default()),
        };
        let spec = LabSpec {
            nodes,
            cert_ttl,
            families,
            objects,
        };
        Ok(spec)
    }
}

/// The keys a `kind: Lab` document may have.
const LAB_KEYS: [&str; 6] = [
    "apiVersion",
    "kind",
    "metadata",
    "nodes",
    "certificateTTL",
    "ipFamilies",
];

/// Reads manifests for `up`, `apply` or `delete`. `kind: Lab` documents are
/// returned separately when `allow_lab` (only `up` takes one). A key the
/// lab does not know is refused by name, in every kind: a setting that
/// would otherwise be dropped without a word (`ipFamilies`, a misspelt
/// `serviceAcountName`) is a lab that is not what its file says.
pub fn parse_objects(text: &str, allow_lab: bool) -> Result<(Vec<Object>, Vec<Other>), Error> {
    let (objects, others) =
        parse_manifests(text).map_err(|e| Error::Spec(format!("invalid lab file: {e}")))?;
    refuse_unknown_keys(text, &objects, &others)?;
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

/// Compares every document with what was understood of it: each key of the
/// document (at any depth) must be in the parsed object, serialized back.
/// Keys set to `null` are taken as absent.
fn refuse_unknown_keys(text: &str, objects: &[Object], others: &[Other]) -> Result<(), Error> {
    use serde::Deserialize;
    let mut understood = objects.iter();
    let mut number = 0;
    for document in serde_yaml::Deserializer::from_str(text) {
        number += 1;
        // parse_manifests read the same text without error.
        let Ok(value) = serde_yaml::Value::deserialize(document) else {
            continue;
        };
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let as_json = |value: &serde_yaml::Value| serde_json::to_value(value).unwrap_or_default();
        let unknown = if others.iter().any(|o| o.document == number) {
            match value.as_mapping() {
                Some(map) if kind == "Lab" => map
                    .keys()
                    .filter_map(|k| k.as_str())
                    .filter(|k| !LAB_KEYS.contains(k))
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            }
        } else {
            let Some(object) = understood.next() else {
                continue;
            };
            let back = match object {
                Object::Namespace(o) => serde_json::to_value(&**o),
                Object::Pod(o) => serde_json::to_value(&**o),
                Object::Service(o) => serde_json::to_value(&**o),
                Object::AuthorizationPolicy(o) => serde_json::to_value(&**o),
            }
            .unwrap_or_default();
            let mut unknown = Vec::new();
            missing_keys(&as_json(&value), &back, "", &mut unknown);
            unknown
        };
        if let Some(first) = unknown.first() {
            return Err(Error::Spec(format!(
                "document {number} ({kind}): unknown key {first}{}",
                if kind == "Lab" {
                    format!(" (a Lab document has {})", LAB_KEYS.join(", "))
                } else {
                    String::new()
                }
            )));
        }
    }
    Ok(())
}

/// The paths (`spec.containers[0].foo`) of keys in `given` that `parsed`
/// does not have.
fn missing_keys(
    given: &serde_json::Value,
    parsed: &serde_json::Value,
    path: &str,
    found: &mut Vec<String>,
) {
    use serde_json::Value;
    match (given, parsed) {
        (Value::Object(given), Value::Object(parsed)) => {
            for (key, value) in given {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match parsed.get(key) {
                    None if !value.is_null() => found.push(here),
                    None => {}
                    Some(parsed) => missing_keys(value, parsed, &here, found),
                }
            }
        }
        (Value::Array(given), Value::Array(parsed)) => {
            for (index, (given, parsed)) in given.iter().zip(parsed).enumerate() {
                missing_keys(given, parsed, &format!("{path}[{index}]"), found);
            }
        }
        _ => {}
    }
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

fn parse_families(value: &serde_yaml::Value, document: usize) -> Result<IpFamilies, Error> {
    let Some(families) = value.get("ipFamilies") else {
        return Ok(IpFamilies::default());
    };
    let wrong = |why: String| Error::Spec(format!("document {document} (Lab): {why}"));
    let list = families.as_sequence().ok_or_else(|| {
        wrong("ipFamilies must be a list: [IPv4], [IPv6], [IPv4, IPv6] or [IPv6, IPv4]".into())
    })?;
    let families = list
        .iter()
        .map(|family| {
            IpFamily::parse(family.as_str().unwrap_or_default())
                .map_err(|e| wrong(format!("ipFamilies: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    IpFamilies::new(families).map_err(|e| wrong(e.to_string()))
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
        assert_eq!(spec.families, IpFamilies::default());
        assert_eq!(spec.objects.len(), 5);
        let dual = FILE.replace("certificateTTL: 90s", "ipFamilies: [IPv6, IPv4]");
        let spec = LabSpec::parse(&dual, 2).unwrap();
        assert_eq!(spec.families.primary(), IpFamily::IPv6);
        assert!(spec.families.is_dual_stack());
    }

    #[test]
    fn every_lab_file_in_the_repository_has_only_known_keys() {
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        for entry in std::fs::read_dir(examples).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            parse_objects(&text, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        // Keys set to null, and keys k8s-openapi keeps, are fine.
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {a: b}, annotations: null}\nspec: {containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}], restartPolicy: Always}\n";
        parse_objects(text, false).unwrap();
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
            (
                FILE.replace("certificateTTL: 90s", "ipFamily: [IPv6]"),
                "document 1 (Lab): unknown key ipFamily (a Lab document has",
            ),
            (
                FILE.replace("certificateTTL: 90s", "ipFamilies: [IPv6, IPv6]"),
                "names IPv6 twice",
            ),
            (
                FILE.replace("certificateTTL: 90s", "ipFamilies: [ipv6]"),
                "unknown IP family \"ipv6\"",
            ),
            (
                FILE.replace("certificateTTL: 90s", "ipFamilies: IPv6"),
                "ipFamilies must be a list",
            ),
            (
                FILE.replace("spec: {nodeName: alpha,", "spec: {nodeNmae: alpha,"),
                "document 4 (Pod): unknown key spec.nodeNmae",
            ),
            (
                FILE.replace("command: [sleep, \"1000\"]", "command: [sleep], comand: [x]"),
                "document 3 (Pod): unknown key spec.containers[0].comand",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ipFamilies: [IPv6], ports: [{port: 80, targetprot: 8080}]}\n".to_string(),
                "document 1 (Service): unknown key spec.ports[0].targetprot",
            ),
        ];
        for (text, expected) in cases {
            let err = LabSpec::parse(&text, 2).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }
}
