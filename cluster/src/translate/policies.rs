//! An `AuthorizationPolicy` → a validated policy of the mesh model.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kanava_mesh::policy::{self, Action, Policy, Rule, SourceBuilder};

use crate::crd::{AuthorizationPolicy, PolicyAction};

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

/// What a policy that was never valid means while it stays invalid: it
/// refuses everything for the workloads it selects. An ALLOW becomes an
/// ALLOW of nothing (Istio's reading of an invalid ALLOW), a DENY a DENY of
/// everything. `None` only without a name to key it by.
pub fn refuse_all_of(object: &AuthorizationPolicy, root_namespace: &str) -> Option<Policy> {
    let namespace = object
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = object.metadata.name.clone()?;
    let (action, rules) = match object.spec.action {
        PolicyAction::Allow => (Action::Allow, Vec::new()),
        PolicyAction::Deny => (Action::Deny, vec![Rule::default()]),
    };
    Some(Policy {
        mesh_wide: namespace == root_namespace,
        namespace,
        name,
        selector: object
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone()),
        action,
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
