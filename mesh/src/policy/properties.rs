//! Properties of policy evaluation, checked on generated policies and
//! connections (proptest): the rules of the README hold for every
//! combination, not only for the examples the other tests pick.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;

use super::{
    Action, Connection, Decision, Destination, Policy, PolicySet, Rule, Source, SourceBuilder,
};
use crate::Identity;

const NAMESPACES: [&str; 3] = ["shop", "ops", "kanava-system"];
const ACCOUNTS: [&str; 3] = ["web", "batch", "admin"];
const IPS: [&str; 3] = ["10.244.1.2", "10.244.2.3", "192.0.2.7"];
const PORTS: [u16; 3] = [80, 443, 8080];

fn identity() -> impl Strategy<Value = Option<Identity>> {
    prop::option::of((0..3usize, 0..3usize).prop_map(|(ns, sa)| {
        Identity::new("cluster.local", NAMESPACES[ns], ACCOUNTS[sa]).expect("identity")
    }))
}

fn subset(all: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    prop::sample::subsequence(all, 0..=all.len())
}

fn source() -> impl Strategy<Value = Option<Source>> {
    let principals: Vec<&'static str> = vec![
        "cluster.local/ns/shop/sa/web",
        "*/sa/batch",
        "cluster.local/ns/ops/*",
        "*",
    ];
    let principals: &'static [&'static str] = principals.leak();
    let blocks: &'static [&'static str] = &["10.244.1.0/24", "192.0.2.7"];
    (
        subset(principals),
        subset(principals),
        subset(&NAMESPACES),
        subset(&NAMESPACES),
        subset(blocks),
        subset(blocks),
    )
        .prop_map(|(p, np, n, nn, b, nb)| {
            SourceBuilder {
                principals: &p,
                not_principals: &np,
                namespaces: &n,
                not_namespaces: &nn,
                ip_blocks: &b,
                not_ip_blocks: &nb,
            }
            .build()
            .ok()
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source(), 0..3),
        prop::collection::vec(
            (subset(&["80", "443"]), subset(&["8080"])).prop_map(|(p, np)| {
                let number = |list: Vec<&str>| list.iter().filter_map(|p| p.parse().ok()).collect();
                let destination = Destination {
                    ports: number(p),
                    not_ports: number(np),
                };
                (destination != Destination::default()).then_some(destination)
            }),
            0..2,
        ),
    )
        .prop_map(|(from, to)| Rule {
            from: from.into_iter().flatten().collect(),
            to: to.into_iter().flatten().collect(),
        })
}

fn policy() -> impl Strategy<Value = Arc<Policy>> {
    (
        0..3usize,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(rule(), 0..3),
    )
        .prop_map(|(ns, selective, deny, rules)| {
            Arc::new(Policy {
                namespace: NAMESPACES[ns].into(),
                name: format!("p{ns}{selective}{deny}{}", rules.len()),
                selector: selective.then(|| [("app".to_string(), "web".to_string())].into()),
                mesh_wide: NAMESPACES[ns] == "kanava-system",
                action: if deny { Action::Deny } else { Action::Allow },
                rules,
                resource_version: "1".into(),
            })
        })
}

/// A connection to a workload of `shop` labelled `app=web`.
fn case() -> impl Strategy<Value = (Option<Identity>, IpAddr, u16)> {
    (identity(), 0..3usize, 0..3usize)
        .prop_map(|(id, ip, port)| (id, IPS[ip].parse().expect("IP"), PORTS[port]))
}

fn web_labels() -> BTreeMap<String, String> {
    [("app".to_string(), "web".to_string())].into()
}

fn decide(policies: &[Arc<Policy>], connection: &Connection<'_>) -> Decision {
    PolicySet::new(policies.iter().cloned()).evaluate("shop", &web_labels(), connection)
}

proptest! {
    #[test]
    fn a_matching_deny_always_wins(
        policies in prop::collection::vec(policy(), 0..6),
        (id, ip, port) in case(),
    ) {
        let connection = Connection { identity: id.as_ref(), source_ip: ip, destination_port: port };
        let denied_by_a_deny = policies.iter().any(|p| {
            p.action == Action::Deny
                && p.applies_to("shop", &web_labels())
                && p.matches(&connection)
        });
        if denied_by_a_deny {
            prop_assert!(!decide(&policies, &connection).is_allowed());
        }
    }

    #[test]
    fn an_added_allow_opens_only_what_its_rules_match(
        policies in prop::collection::vec(policy(), 0..6),
        added in policy(),
        (id, ip, port) in case(),
    ) {
        let connection = Connection { identity: id.as_ref(), source_ip: ip, destination_port: port };
        let mut added = (*added).clone();
        added.action = Action::Allow;
        let added = Arc::new(added);
        let before = decide(&policies, &connection).is_allowed();
        let mut with = policies.clone();
        with.push(added.clone());
        let after = decide(&with, &connection).is_allowed();
        if after && !before {
            prop_assert!(added.applies_to("shop", &web_labels()) && added.matches(&connection));
        }
        let no_allow_before = !policies
            .iter()
            .any(|p| p.action == Action::Allow && p.applies_to("shop", &web_labels()));
        if no_allow_before && after {
            prop_assert!(before, "from no ALLOW, adding one can only narrow");
        }
    }

    #[test]
    fn a_plaintext_peer_never_matches_a_positive_identity_field(
        source in source(),
        deny in any::<bool>(),
        ip in 0..3usize,
        port in 0..3usize,
    ) {
        let Some(source) = source else { return Ok(()); };
        let plaintext = Connection {
            identity: None,
            source_ip: IPS[ip].parse().expect("IP"),
            destination_port: PORTS[port],
        };
        let action = if deny { Action::Deny } else { Action::Allow };
        let positive = !(source.principals.is_empty() && source.namespaces.is_empty());
        let negative = !(source.not_principals.is_empty() && source.not_namespaces.is_empty());
        if positive || (negative && action == Action::Allow) {
            prop_assert!(!source.matches(&plaintext, action));
        }
    }
}
