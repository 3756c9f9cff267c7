//! `AuthorizationPolicy` (`security.kanava.io/v1alpha1`): the Kubernetes
//! resource operators write. Defined once here; the CRD manifest in
//! `deploy/crds/` is generated from it (a test fails when it is stale;
//! `KANAVA_UPDATE_CRDS=1 cargo test -p kanava-cluster crd` rewrites it).
//!
//! ```yaml
//! apiVersion: security.kanava.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: {name: web-from-frontend, namespace: shop}
//! spec:
//!   selector: {matchLabels: {app: web}}
//!   action: ALLOW
//!   rules:
//!   - from: [{principals: ["cluster.local/ns/shop/sa/frontend"]}]
//!     to: [{ports: [8080]}]
//! ```

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API version of [`AuthorizationPolicy`] objects.
pub const API_VERSION: &str = "security.kanava.io/v1alpha1";

/// Who may connect to which workloads. DENY policies are checked first and
/// any match refuses; then, if any ALLOW policy applies to the destination,
/// the connection must match one of its rules; otherwise it is allowed.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.kanava.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    status = "AuthorizationPolicyStatus",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to. Absent: every workload of the
    /// namespace (of the whole mesh for a policy in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW (the default) or DENY.
    #[serde(default)]
    pub action: PolicyAction,
    /// The policy matches a connection when any rule does. An ALLOW policy
    /// without rules allows nothing; `rules: [{}]` matches everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<PolicyRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must carry, all of them.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyAction {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches when both `from` and `to` match; an absent list matches all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Sources; any entry matching is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<PolicySource>>,
    /// Destination ports; any entry matching is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<PolicyOperation>>,
}

/// Matches when every field it sets matches. Principals and namespaces
/// match exactly, by prefix (`foo*`), by suffix (`*foo`) or by presence
/// (`*`); a plaintext peer never matches an entry naming them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    /// Peer identities, e.g. `cluster.local/ns/shop/sa/web` (a leading
    /// `spiffe://` is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_principals: Option<Vec<String>>,
    /// Namespaces of peer identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_namespaces: Option<Vec<String>>,
    /// Peer addresses: IPs or CIDR blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ip_blocks: Option<Vec<String>>,
}

/// Matches when every field it sets matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOperation {
    /// Ports on the destination workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<IntOrString>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<IntOrString>>,
}

/// What the control plane found of a policy, shown by `kubectl get` and
/// `kubectl describe`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicyStatus {
    /// `Accepted`: `True` when the policy is in force as written, `False`
    /// (with the reason) when it was rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
}

/// A status condition, as Kubernetes conditions are written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` the condition is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The CRD manifest, as written to `deploy/crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&AuthorizationPolicy::crd()).unwrap_or_default();
    format!(
        "# Generated from cluster/src/crd.rs; do not edit.\n# Regenerate: KANAVA_UPDATE_CRDS=1 cargo test -p kanava-cluster crd\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRD for `kubectl apply`, and the copy the chart installs.
    const CRD_FILES: [&str; 2] = [
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/crds/authorizationpolicies.security.kanava.io.yaml"
        ),
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/charts/kanava/crds/authorizationpolicies.security.kanava.io.yaml"
        ),
    ];

    #[test]
    fn crd_manifest_is_current() {
        let generated = crd_yaml();
        for file in CRD_FILES {
            if std::env::var_os("KANAVA_UPDATE_CRDS").is_some() {
                std::fs::write(file, &generated).unwrap();
            }
            let committed = std::fs::read_to_string(file).unwrap_or_default();
            assert!(
                committed == generated,
                "{file} is stale; regenerate it with KANAVA_UPDATE_CRDS=1 cargo test -p kanava-cluster crd"
            );
        }
    }

    #[test]
    fn crd_describes_the_api() {
        let yaml = crd_yaml();
        for expected in [
            "group: security.kanava.io",
            "kind: AuthorizationPolicy",
            "name: v1alpha1",
            "scope: Namespaced",
            "notIpBlocks",
            "x-kubernetes-int-or-string: true",
            "- ALLOW",
            "- DENY",
        ] {
            assert!(yaml.contains(expected), "CRD lacks {expected:?}");
        }
    }
}
