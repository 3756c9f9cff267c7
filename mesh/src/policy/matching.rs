//! Matching a connection against policies, and deciding: DENY first, then
//! ALLOW, otherwise allowed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Action, Connection, Decision, Destination, Pattern, Policy, Rule, Source};

impl Source {
    fn names_identity(&self) -> bool {
        !(self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty())
    }

    /// Whether the entry matches. An unauthenticated peer has no identity to
    /// prove: positive identity fields never match it; negative ones match it
    /// in a DENY (it is not proven to be outside the list, so it is refused)
    /// and never in an ALLOW (it cannot be admitted on an identity claim).
    pub(super) fn matches(&self, connection: &Connection<'_>, action: Action) -> bool {
        if self.names_identity() {
            let Some(identity) = connection.identity else {
                let positive = !(self.principals.is_empty() && self.namespaces.is_empty());
                let negative = !(self.not_principals.is_empty() && self.not_namespaces.is_empty());
                if positive || !negative || action == Action::Allow {
                    return false;
                }
                return self.matches_ip(connection);
            };
            let principal = identity.principal();
            let any = |patterns: &[Pattern], value: &str| patterns.iter().any(|p| p.matches(value));
            if !self.principals.is_empty() && !any(&self.principals, principal) {
                return false;
            }
            if any(&self.not_principals, principal) {
                return false;
            }
            if !self.namespaces.is_empty() && !any(&self.namespaces, identity.namespace()) {
                return false;
            }
            if any(&self.not_namespaces, identity.namespace()) {
                return false;
            }
        }
        self.matches_ip(connection)
    }

    fn matches_ip(&self, connection: &Connection<'_>) -> bool {
        let ip = connection.source_ip.to_canonical();
        if !self.ip_blocks.is_empty() && !self.ip_blocks.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        !self.not_ip_blocks.iter().any(|net| net.contains(&ip))
    }
}

impl Destination {
    fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

impl Rule {
    pub(super) fn matches(&self, connection: &Connection<'_>, action: Action) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(connection, action)))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|d| d.matches(connection.destination_port)))
    }
}

impl Policy {
    /// Whether the policy applies to a workload with these labels in this
    /// namespace.
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.mesh_wide || self.namespace == namespace)
            && self.selector.as_ref().is_none_or(|selector| {
                selector
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            })
    }

    pub(super) fn matches(&self, connection: &Connection<'_>) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(connection, self.action))
    }
}

/// Every policy a ztunnel knows, indexed by the namespace they apply in.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    mesh_wide: Vec<Arc<Policy>>,
}

impl PolicySet {
    pub fn new(policies: impl IntoIterator<Item = Arc<Policy>>) -> Self {
        let mut set = PolicySet::default();
        for policy in policies {
            if policy.mesh_wide {
                set.mesh_wide.push(policy);
            } else {
                set.by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(policy);
            }
        }
        set
    }

    /// Whether a policy with a selector applies in `namespace` (its own
    /// namespace's or a mesh-wide one): deciding for a workload there needs
    /// its labels.
    pub fn has_selector_in_scope(&self, namespace: &str) -> bool {
        self.mesh_wide
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .any(|policy| policy.selector.is_some())
    }

    /// Every policy: mesh-wide ones first, then by namespace.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.mesh_wide
            .iter()
            .chain(self.by_namespace.values().flatten())
    }

    pub fn len(&self) -> usize {
        self.mesh_wide.len() + self.by_namespace.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides a connection to a workload in `namespace` with `labels`.
    pub fn evaluate(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        connection: &Connection<'_>,
    ) -> Decision {
        let applicable = self
            .mesh_wide
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .filter(|p| p.applies_to(namespace, labels));
        let mut allows = Vec::new();
        for policy in applicable {
            match policy.action {
                Action::Deny if policy.matches(connection) => {
                    return Decision::Deny {
                        policy: policy.key(),
                        reason: format!("denied by DENY policy {}", policy.key()),
                    };
                }
                Action::Deny => {}
                Action::Allow => allows.push(policy),
            }
        }
        if allows.is_empty() || allows.iter().any(|p| p.matches(connection)) {
            return Decision::Allow;
        }
        let names: Vec<String> = allows.iter().map(|p| p.key()).collect();
        Decision::Deny {
            policy: names.join(","),
            reason: format!("no rule of the ALLOW policies {} matched", names.join(", ")),
        }
    }
}
