use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// Trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Constructing one validates every part, so holding an `Identity` means
/// holding a well-formed SPIFFE ID that can be put into (and compared against)
/// a certificate's URI SAN. Identities are shared, not copied: a clone (one
/// per connection, several per log line) costs a reference count.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    /// The whole URI, first so that identities order by it.
    uri: String,
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, Error> {
        let (trust_domain, namespace, service_account) = (
            trust_domain.into(),
            namespace.into(),
            service_account.into(),
        );
        let uri = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        let invalid = |reason: String| Error::InvalidIdentity {
            input: uri.clone(),
            reason,
        };
        check_trust_domain(&trust_domain).map_err(invalid)?;
        check_segment("namespace", &namespace).map_err(invalid)?;
        check_segment("service account", &service_account).map_err(invalid)?;
        Ok(Identity(Arc::new(Parts {
            uri,
            trust_domain,
            namespace,
            service_account,
        })))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The SPIFFE ID, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.0.uri
    }

    /// The identity as authorization policies name it: the SPIFFE ID
    /// without `spiffe://` (`cluster.local/ns/shop/sa/web`).
    pub fn principal(&self) -> &str {
        &self.0.uri["spiffe://".len()..]
    }

    /// Whether this is the only copy of the identity (clones share one):
    /// a cache of identities drops what only it still holds.
    pub fn is_only_copy(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&self.0.uri).finish()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidIdentity {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("must start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("missing path /ns/<namespace>/sa/<service-account>"))?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Identity::new(trust_domain, *namespace, *service_account)
            }
            _ => Err(invalid("path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// SPIFFE trust domains: lowercase letters, digits, `.`, `-`, `_`.
fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("empty trust domain".into());
    }
    if td.len() > 255 {
        return Err("trust domain longer than 255 characters".into());
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("trust domain may not contain {c:?}"));
    }
    Ok(())
}

/// Path segments: SPIFFE allows letters, digits, `.`, `-`, `_`; Kubernetes
/// names are a subset of that.
fn check_segment(what: &str, segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err(format!("empty {what}"));
    }
    if segment == "." || segment == ".." {
        return Err(format!("{what} may not be {segment:?}"));
    }
    if segment.len() > 253 {
        return Err(format!("{what} longer than 253 characters"));
    }
    if let Some(c) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("{what} may not contain {c:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let id = Identity::new("cluster.local", "shop", "checkout").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
        assert_eq!(id.to_string().parse::<Identity>().unwrap(), id);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn error_names_the_input_and_reason() {
        let err = "spiffe://cluster.local/ns/a"
            .parse::<Identity>()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("spiffe://cluster.local/ns/a"), "{text}");
        assert!(text.contains("path"), "{text}");
    }
}
