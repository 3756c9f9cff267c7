//! The IP families of a lab: `IPv4` (the default), `IPv6`, or both
//! (dual-stack), named as Kubernetes names them (`spec.ipFamilies`).
//!
//! The first family is the lab's primary one, as in a cluster: the
//! underlay address the control plane listens on, a pod's `status.podIP`,
//! and a Service's `spec.clusterIP` unless it asks for another.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// One IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }

    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "IPv4" => Ok(IpFamily::IPv4),
            "IPv6" => Ok(IpFamily::IPv6),
            other => Err(Error::Spec(format!(
                "unknown IP family {other:?} (IPv4 or IPv6)"
            ))),
        }
    }

    /// The address that stands for any local address (`0.0.0.0`, `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            IpFamily::IPv4 => std::net::Ipv4Addr::UNSPECIFIED.into(),
            IpFamily::IPv6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// The flag `ip` takes for this family.
    pub fn ip_flag(self) -> &'static str {
        match self {
            IpFamily::IPv4 => "-4",
            IpFamily::IPv6 => "-6",
        }
    }

    /// The address that stands for every address (a default route).
    pub fn any(self) -> &'static str {
        match self {
            IpFamily::IPv4 => "0.0.0.0/0",
            IpFamily::IPv6 => "::/0",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        })
    }
}

/// One or two distinct families, the primary first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<IpFamily>", into = "Vec<IpFamily>")]
pub struct IpFamilies(Vec<IpFamily>);

impl IpFamilies {
    pub fn new(families: Vec<IpFamily>) -> Result<Self, Error> {
        match families.as_slice() {
            [_] => Ok(IpFamilies(families)),
            [a, b] if a != b => Ok(IpFamilies(families)),
            [a, _] => Err(Error::Spec(format!(
                "ipFamilies names {a} twice (dual-stack is [IPv4, IPv6] or [IPv6, IPv4])"
            ))),
            _ => Err(Error::Spec(format!(
                "ipFamilies has {} entries; give one family, or two for dual-stack",
                families.len()
            ))),
        }
    }

    pub fn primary(&self) -> IpFamily {
        self.0[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = IpFamily> + '_ {
        self.0.iter().copied()
    }

    pub fn contains(&self, family: IpFamily) -> bool {
        self.0.contains(&family)
    }

    pub fn is_dual_stack(&self) -> bool {
        self.0.len() == 2
    }

    /// Orders addresses by family, the primary first (the order of a pod's
    /// `status.podIPs`); addresses of other families are left out.
    pub fn order(&self, ips: &[IpAddr]) -> Vec<IpAddr> {
        self.iter()
            .filter_map(|family| ips.iter().copied().find(|ip| IpFamily::of(*ip) == family))
            .collect()
    }
}

impl Default for IpFamilies {
    fn default() -> Self {
        IpFamilies(vec![IpFamily::IPv4])
    }
}

impl TryFrom<Vec<IpFamily>> for IpFamilies {
    type Error = Error;
    fn try_from(families: Vec<IpFamily>) -> Result<Self, Error> {
        IpFamilies::new(families)
    }
}

impl From<IpFamilies> for Vec<IpFamily> {
    fn from(families: IpFamilies) -> Self {
        families.0
    }
}

impl fmt::Display for IpFamilies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.iter().map(|f| f.to_string()).collect();
        write!(f, "[{}]", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_one_or_two_distinct() {
        use IpFamily::*;
        assert_eq!(IpFamilies::new(vec![IPv6]).unwrap().primary(), IPv6);
        let dual = IpFamilies::new(vec![IPv6, IPv4]).unwrap();
        assert!(dual.is_dual_stack());
        assert_eq!(dual.primary(), IPv6);
        let err = IpFamilies::new(vec![IPv4, IPv4]).unwrap_err().to_string();
        assert!(err.contains("names IPv4 twice"), "{err}");
        assert!(IpFamilies::new(vec![]).is_err());
        assert!(IpFamilies::new(vec![IPv4, IPv6, IPv4]).is_err());
        assert!(
            IpFamily::parse("ipv6").is_err(),
            "named as Kubernetes names it"
        );
    }

    #[test]
    fn addresses_are_ordered_primary_first() {
        let dual = IpFamilies::new(vec![IpFamily::IPv6, IpFamily::IPv4]).unwrap();
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(dual.order(&ips), vec![ips[1], ips[0]]);
        assert_eq!(IpFamilies::default().order(&ips), vec![ips[0]]);
    }
}
