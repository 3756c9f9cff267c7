//! Authorization: who may open connections to whom.
//!
//! A [`Policy`] applies to the workloads of its namespace that its selector
//! matches (all of them without a selector); a policy in the mesh's root
//! namespace applies to every workload. For a connection to a workload:
//!
//! 1. every applicable `DENY` policy is checked first; any match refuses;
//! 2. then, if any `ALLOW` policy applies, the connection must match at least
//!    one of their rules;
//! 3. otherwise it is allowed.
//!
//! A policy matches when any of its rules matches. A rule matches when both
//! its `from` and its `to` match (an empty list matches everything); a list
//! matches when any of its entries does; an entry matches when all the
//! fields it sets do.
//!
//! A peer without a verified identity (plaintext, in permissive mode) never
//! matches an entry that names principals or namespaces, in either the
//! positive or the negative form.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use kanava_proto::v1 as pb;

use crate::{Error, Identity};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// A principal or namespace pattern: exact, `prefix*`, `*suffix`, or `*`
/// (present).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        if text == "*" {
            return Ok(Pattern::Any);
        }
        let pattern = if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_string())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_string())
        } else {
            Pattern::Exact(text.to_string())
        };
        match &pattern {
            Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) if s.contains('*') => Err(
                format!("pattern {text:?}: `*` may only stand alone, at the start or at the end"),
            ),
            _ => Ok(pattern),
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(exact) => value == exact,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Pattern::Any => !value.is_empty(),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(s) => write!(f, "{s}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
            Pattern::Any => f.write_str("*"),
        }
    }
}

/// Who a connection comes from. Fields left empty do not constrain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// Matched against the peer's SPIFFE ID without `spiffe://`
    /// (`cluster.local/ns/shop/sa/web`).
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    /// Matched against the namespace of the peer's identity.
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

/// Where a connection goes. Fields left empty do not constrain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Empty: from anywhere.
    pub from: Vec<Source>,
    /// Empty: to any port.
    pub to: Vec<Destination>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// Labels a workload must carry; `None` selects every workload in scope.
    pub selector: Option<BTreeMap<String, String>>,
    /// True for a policy in the root namespace: it applies to every workload.
    pub mesh_wide: bool,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// Version of the object it came from.
    pub resource_version: String,
}

/// A connection, as authorization sees it.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` for plaintext.
    pub identity: Option<&'a Identity>,
    pub source_ip: IpAddr,
    /// Port on the destination workload.
    pub destination_port: u16,
}

/// What authorization decided, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is `namespace/name` of the policy that refused, or of the
    /// ALLOW policies none of which matched.
    Deny {
        policy: String,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

impl Source {
    fn names_identity(&self) -> bool {
        !(self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty())
    }

    fn matches(&self, connection: &Connection<'_>) -> bool {
        if self.names_identity() {
            let Some(identity) = connection.identity else {
                return false;
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
    fn matches(&self, connection: &Connection<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(connection)))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|d| d.matches(connection.destination_port)))
    }
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn resource_name(&self) -> String {
        format!("policy/{}/{}", self.namespace, self.name)
    }

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

    fn matches(&self, connection: &Connection<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(connection))
    }

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

/// The textual fields of a source entry, as written by users or sent over
/// the wire; [`build`](Self::build) validates them.
pub struct SourceBuilder<'a, S: AsRef<str>> {
    pub principals: &'a [S],
    pub not_principals: &'a [S],
    pub namespaces: &'a [S],
    pub not_namespaces: &'a [S],
    pub ip_blocks: &'a [S],
    pub not_ip_blocks: &'a [S],
}

impl<S: AsRef<str>> SourceBuilder<'_, S> {
    pub fn build(&self) -> Result<Source, String> {
        let source = Source {
            principals: principals(self.principals)?,
            not_principals: principals(self.not_principals)?,
            namespaces: patterns(self.namespaces)?,
            not_namespaces: patterns(self.not_namespaces)?,
            ip_blocks: ip_blocks(self.ip_blocks)?,
            not_ip_blocks: ip_blocks(self.not_ip_blocks)?,
        };
        if source == Source::default() {
            return Err("a `from` entry sets no field and would match every source; omit `from` to mean that".into());
        }
        Ok(source)
    }
}

/// A validated `to` entry.
pub fn destination(ports: &[u32], not_ports: &[u32]) -> Result<Destination, String> {
    let check = |ports: &[u32]| {
        ports
            .iter()
            .map(|&p| {
                u16::try_from(p)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("port {p} is not in 1-65535"))
            })
            .collect::<Result<Vec<u16>, String>>()
    };
    let destination = Destination {
        ports: check(ports)?,
        not_ports: check(not_ports)?,
    };
    if destination == Destination::default() {
        return Err(
            "a `to` entry sets no field and would match every port; omit `to` to mean that".into(),
        );
    }
    Ok(destination)
}

fn patterns<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Pattern>, String> {
    texts.iter().map(|t| Pattern::parse(t.as_ref())).collect()
}

/// Principals may be written with or without `spiffe://`.
fn principals<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Pattern>, String> {
    texts
        .iter()
        .map(|t| {
            let t = t.as_ref();
            Pattern::parse(t.strip_prefix("spiffe://").unwrap_or(t))
        })
        .collect()
}

fn ip_blocks<S: AsRef<str>>(texts: &[S]) -> Result<Vec<IpNet>, String> {
    texts
        .iter()
        .map(|t| {
            let t = t.as_ref();
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("{t:?} is not an IP address or CIDR block"))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    fn policy(namespace: &str, name: &str, action: Action, rules: Vec<Rule>) -> Arc<Policy> {
        Arc::new(Policy {
            namespace: namespace.into(),
            name: name.into(),
            selector: None,
            mesh_wide: namespace == "kanava-system",
            action,
            rules,
            resource_version: "1".into(),
        })
    }

    fn from(source: Source) -> Rule {
        Rule {
            from: vec![source],
            to: vec![],
        }
    }

    fn principals(list: &[&str]) -> Source {
        SourceBuilder::<&str> {
            principals: list,
            not_principals: &[],
            namespaces: &[],
            not_namespaces: &[],
            ip_blocks: &[],
            not_ip_blocks: &[],
        }
        .build()
        .unwrap()
    }

    #[test]
    fn patterns_match_exact_prefix_suffix_presence() {
        let p = |t: &str| Pattern::parse(t).unwrap();
        assert!(p("a/b").matches("a/b") && !p("a/b").matches("a/bc"));
        assert!(p("cluster.local/ns/shop/*").matches("cluster.local/ns/shop/sa/x"));
        assert!(p("*/sa/admin").matches("cluster.local/ns/ops/sa/admin"));
        assert!(!p("*/sa/admin").matches("cluster.local/ns/ops/sa/admins"));
        assert!(p("*").matches("anything") && !p("*").matches(""));
        assert!(Pattern::parse("a*b").is_err() && Pattern::parse("").is_err());
    }

    #[test]
    fn deny_wins_then_allow_must_match_then_default_allow() {
        let labels = BTreeMap::new();
        let web = id("shop", "web");
        let admin = id("ops", "admin");
        let conn = |identity| Connection {
            identity: Some(identity),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_port: 80,
        };
        assert!(
            PolicySet::default()
                .evaluate("shop", &labels, &conn(&web))
                .is_allowed()
        );

        let allow_web = policy(
            "shop",
            "allow-web",
            Action::Allow,
            vec![from(principals(&["cluster.local/ns/shop/sa/web"]))],
        );
        let set = PolicySet::new([allow_web.clone()]);
        assert!(set.evaluate("shop", &labels, &conn(&web)).is_allowed());
        let denied = set.evaluate("shop", &labels, &conn(&admin));
        assert!(
            matches!(&denied, Decision::Deny { policy, .. } if policy == "shop/allow-web"),
            "{denied:?}"
        );
        assert!(
            set.evaluate("other", &labels, &conn(&admin)).is_allowed(),
            "policies stay in their namespace"
        );

        let deny_all_mesh = policy(
            "kanava-system",
            "deny-web",
            Action::Deny,
            vec![from(principals(&["*/sa/web"]))],
        );
        let set = PolicySet::new([allow_web, deny_all_mesh]);
        let denied = set.evaluate("shop", &labels, &conn(&web));
        assert!(
            matches!(&denied, Decision::Deny { policy, .. } if policy == "kanava-system/deny-web"),
            "{denied:?}"
        );
    }

    #[test]
    fn plaintext_peers_never_match_identity_fields() {
        let labels = BTreeMap::new();
        let plaintext = Connection {
            identity: None,
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_port: 80,
        };
        let not_admin = SourceBuilder::<&str> {
            principals: &[],
            not_principals: &["*/sa/admin"],
            namespaces: &[],
            not_namespaces: &[],
            ip_blocks: &[],
            not_ip_blocks: &[],
        }
        .build()
        .unwrap();
        let set = PolicySet::new([policy("shop", "p", Action::Allow, vec![from(not_admin)])]);
        assert!(!set.evaluate("shop", &labels, &plaintext).is_allowed());
    }

    #[test]
    fn empty_entries_are_refused() {
        let empty: [&str; 0] = [];
        let err = SourceBuilder {
            principals: &empty,
            not_principals: &empty,
            namespaces: &empty,
            not_namespaces: &empty,
            ip_blocks: &empty,
            not_ip_blocks: &empty,
        }
        .build()
        .unwrap_err();
        assert!(err.contains("omit `from`"), "{err}");
        assert!(destination(&[], &[]).is_err());
        assert!(destination(&[70000], &[]).unwrap_err().contains("70000"));
        let bad_cidr = SourceBuilder {
            principals: &empty,
            not_principals: &empty,
            namespaces: &empty,
            not_namespaces: &empty,
            ip_blocks: &["10.0.0.0/33"],
            not_ip_blocks: &empty,
        }
        .build()
        .unwrap_err();
        assert!(bad_cidr.contains("10.0.0.0/33"), "{bad_cidr}");
    }

    #[test]
    fn proto_round_trip() {
        let source = SourceBuilder::<&str> {
            principals: &["spiffe://cluster.local/ns/a/sa/b", "x*"],
            not_principals: &[],
            namespaces: &["a"],
            not_namespaces: &["*-test"],
            ip_blocks: &["10.1.0.0/16", "10.2.3.4"],
            not_ip_blocks: &["10.1.2.0/24"],
        }
        .build()
        .unwrap();
        let original = Policy {
            namespace: "shop".into(),
            name: "p".into(),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            mesh_wide: false,
            action: Action::Deny,
            rules: vec![Rule {
                from: vec![source],
                to: vec![destination(&[80, 443], &[]).unwrap()],
            }],
            resource_version: "7".into(),
        };
        assert_eq!(Policy::from_proto(&original.to_proto()).unwrap(), original);
        let mut bad = original.to_proto();
        bad.action = 9;
        assert!(Policy::from_proto(&bad).is_err());
    }
}
