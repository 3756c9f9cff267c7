//! Policies on the wire: what the control plane sends, validated again by
//! every ztunnel that receives it.

use ipnet::IpNet;
use kanava_proto::v1 as pb;

use super::{Action, Pattern, Policy, Rule, SourceBuilder, destination};
use crate::Error;

impl Policy {
    pub fn to_proto(&self) -> pb::Policy {
        let patterns = |p: &[Pattern]| p.iter().map(ToString::to_string).collect();
        let nets = |n: &[IpNet]| n.iter().map(ToString::to_string).collect();
        let ports = |p: &[u16]| p.iter().map(|&p| u32::from(p)).collect();
        pb::Policy {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            has_selector: self.selector.is_some(),
            selector: self
                .selector
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            mesh_wide: self.mesh_wide,
            action: match self.action {
                Action::Allow => pb::PolicyAction::Allow,
                Action::Deny => pb::PolicyAction::Deny,
            } as i32,
            rules: self
                .rules
                .iter()
                .map(|rule| pb::PolicyRule {
                    from: rule
                        .from
                        .iter()
                        .map(|s| pb::PolicySource {
                            principals: patterns(&s.principals),
                            not_principals: patterns(&s.not_principals),
                            namespaces: patterns(&s.namespaces),
                            not_namespaces: patterns(&s.not_namespaces),
                            ip_blocks: nets(&s.ip_blocks),
                            not_ip_blocks: nets(&s.not_ip_blocks),
                        })
                        .collect(),
                    to: rule
                        .to
                        .iter()
                        .map(|d| pb::PolicyDestination {
                            ports: ports(&d.ports),
                            not_ports: ports(&d.not_ports),
                        })
                        .collect(),
                })
                .collect(),
            resource_version: self.resource_version.clone(),
        }
    }

    /// Validates a policy received over the wire.
    pub fn from_proto(p: &pb::Policy) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidPolicy {
            policy: format!("{}/{}", p.namespace, p.name),
            reason,
        };
        let action = match pb::PolicyAction::try_from(p.action) {
            Ok(pb::PolicyAction::Allow) => Action::Allow,
            Ok(pb::PolicyAction::Deny) => Action::Deny,
            Err(_) => return Err(invalid(format!("unknown action {}", p.action))),
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for rule in &p.rules {
            let mut from = Vec::with_capacity(rule.from.len());
            for s in &rule.from {
                from.push(
                    SourceBuilder {
                        principals: &s.principals,
                        not_principals: &s.not_principals,
                        namespaces: &s.namespaces,
                        not_namespaces: &s.not_namespaces,
                        ip_blocks: &s.ip_blocks,
                        not_ip_blocks: &s.not_ip_blocks,
                    }
                    .build()
                    .map_err(invalid)?,
                );
            }
            let mut to = Vec::with_capacity(rule.to.len());
            for d in &rule.to {
                to.push(destination(&d.ports, &d.not_ports).map_err(invalid)?);
            }
            rules.push(Rule { from, to });
        }
        Ok(Policy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            selector: p.has_selector.then(|| {
                p.selector
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
            mesh_wide: p.mesh_wide,
            action,
            rules,
            resource_version: p.resource_version.clone(),
        })
    }
}
