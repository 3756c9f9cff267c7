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
//! A peer without a verified identity (plaintext, in permissive mode) has no
//! identity to match: an entry with `principals` or `namespaces` never
//! matches it; an entry with only `notPrincipals`/`notNamespaces` (and IP
//! fields) matches it in a DENY policy (it is not proven to be outside the
//! list, so it is refused, as in Istio) but never in an ALLOW policy (it
//! cannot be admitted on an identity it did not prove, which is stricter than
//! Istio).

mod build;
mod matching;
#[cfg(test)]
mod properties;
mod proto;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use build::{SourceBuilder, destination};
use ipnet::IpNet;
pub use matching::PolicySet;

use crate::Identity;

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

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn resource_name(&self) -> String {
        format!("policy/{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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

    fn namespaces(list: &[&str]) -> Source {
        SourceBuilder::<&str> {
            principals: &[],
            not_principals: &[],
            namespaces: list,
            not_namespaces: &[],
            ip_blocks: &[],
            not_ip_blocks: &[],
        }
        .build()
        .unwrap()
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
        let allow = PolicySet::new([policy(
            "shop",
            "p",
            Action::Allow,
            vec![from(not_admin.clone())],
        )]);
        assert!(
            !allow.evaluate("shop", &labels, &plaintext).is_allowed(),
            "an ALLOW never admits a plaintext peer on a negative identity field"
        );
        let deny = PolicySet::new([policy("shop", "p", Action::Deny, vec![from(not_admin)])]);
        assert!(
            !deny.evaluate("shop", &labels, &plaintext).is_allowed(),
            "a DENY of everyone but admins refuses a plaintext peer"
        );
        let admin = id("ops", "admin");
        let as_admin = Connection {
            identity: Some(&admin),
            ..plaintext
        };
        assert!(deny.evaluate("shop", &labels, &as_admin).is_allowed());
        // A positive identity field in a DENY still cannot match a peer
        // without identity.
        let deny_ops = PolicySet::new([policy(
            "shop",
            "p",
            Action::Deny,
            vec![from(namespaces(&["ops"]))],
        )]);
        assert!(deny_ops.evaluate("shop", &labels, &plaintext).is_allowed());
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
