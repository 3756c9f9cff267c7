//! Names and addresses of a lab.
//!
//! Every network namespace of lab `<lab>` is called `kanava-<lab>_<role>`;
//! `_` cannot occur in lab, node, namespace or pod names, so one lab's
//! namespaces can never be mistaken for another's. Addresses exist only
//! inside the lab's own namespaces, so two labs may use the same ones.
//!
//! | what | IPv4 | IPv6 |
//! | --- | --- | --- |
//! | underlay (bridge `br0` in the fabric namespace) | 10.200.0.0/24 | fd00:200::/64 |
//! | control plane (on the fabric bridge, primary family) | 10.200.0.1:15012 | [fd00:200::1]:15012 |
//! | node *i* (1-based) | 10.200.0.(10 + *i*) | fd00:200::(10 + *i*, hex) |
//! | pods of node *i* (bridge `cni0`) | 10.244.*i*.0/24, gateway .1 | fd00:244:*i*::/64, gateway ::1 |
//! | Service virtual IPs | 10.96.0.0/16 | fd00:96::/112 |
//!
//! A lab has the families of its file's `ipFamilies` ([`IpFamily`]); each
//! address above exists only in a lab of its family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use kanava_mesh::ports;

use crate::family::{IpFamilies, IpFamily};

/// Prefix of every network namespace a lab creates.
pub const NETNS_PREFIX: &str = "kanava-";

/// Directory holding one subdirectory per lab (`KANAVA_LAB_ROOT` overrides).
pub fn lab_root() -> PathBuf {
    std::env::var_os("KANAVA_LAB_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kanava/labs"))
}

/// Where a lab keeps its files and what it calls things.
#[derive(Clone, Debug)]
pub struct Layout {
    pub name: String,
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(name: &str) -> Self {
        Layout {
            name: name.to_string(),
            dir: lab_root().join(name),
        }
    }

    pub fn netns_prefix(&self) -> String {
        format!("{NETNS_PREFIX}{}_", self.name)
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}fabric", self.netns_prefix())
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("{}node_{node}", self.netns_prefix())
    }

    pub fn pod_netns(&self, namespace: &str, pod: &str) -> String {
        format!("{}pod_{namespace}_{pod}", self.netns_prefix())
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    pub fn root_cert(&self) -> PathBuf {
        self.ca_dir().join(kanava_mesh::names::CA_ROOT_CERT_FILE)
    }

    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn node_tokens_file(&self) -> PathBuf {
        self.dir.join("node-tokens")
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// Kept short: Unix socket paths are limited to 107 bytes.
    pub fn handoff_socket(&self, node_index: usize) -> PathBuf {
        self.dir.join("sock").join(format!("{node_index}.sock"))
    }

    /// Where the CNI plugin keeps the node's pod records for its ztunnel.
    pub fn pod_records_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("pods")
    }

    /// The node's view of its pods' network namespaces (links to
    /// `/run/netns/...`), as `/var/run/netns` is on a node: only its own.
    pub fn node_netns_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("netns")
    }

    pub fn ipam_dir(&self, node: &str) -> PathBuf {
        self.dir.join("ipam").join(node)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn pod_log(&self, namespace: &str, pod: &str) -> PathBuf {
        self.log_dir()
            .join("pods")
            .join(format!("{namespace}_{pod}.log"))
    }
}

/// The underlay address of the fabric bridge, where the control plane
/// listens when `family` is the lab's primary family.
pub fn fabric_ip(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::IPv4 => Ipv4Addr::new(10, 200, 0, 1).into(),
        IpFamily::IPv6 => Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1).into(),
    }
}

/// Prefix length of the underlay.
pub fn underlay_prefix(family: IpFamily) -> u8 {
    match family {
        IpFamily::IPv4 => 24,
        IpFamily::IPv6 => 64,
    }
}

/// Where the control plane serves gRPC in a lab of `families`.
pub fn control_plane_address(families: &IpFamilies) -> SocketAddr {
    SocketAddr::new(fabric_ip(families.primary()), ports::CONTROL_PLANE)
}

/// Underlay address of node `index` (0-based).
pub fn node_ip(family: IpFamily, index: usize) -> IpAddr {
    match family {
        IpFamily::IPv4 => Ipv4Addr::new(10, 200, 0, 11 + index as u8).into(),
        IpFamily::IPv6 => Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 11 + index as u16).into(),
    }
}

/// Pod subnet of node `index` (0-based): `10.244.<index+1>.0/24` or
/// `fd00:244:<index+1>::/64`.
pub fn pod_subnet(family: IpFamily, index: usize) -> (IpAddr, u8) {
    match family {
        IpFamily::IPv4 => (Ipv4Addr::new(10, 244, index as u8 + 1, 0).into(), 24),
        IpFamily::IPv6 => (
            Ipv6Addr::new(0xfd00, 0x244, index as u16 + 1, 0, 0, 0, 0, 0).into(),
            64,
        ),
    }
}

/// Gateway (the node's `cni0` bridge) of node `index`'s pods.
pub fn pod_gateway(family: IpFamily, index: usize) -> IpAddr {
    match family {
        IpFamily::IPv4 => Ipv4Addr::new(10, 244, index as u8 + 1, 1).into(),
        IpFamily::IPv6 => Ipv6Addr::new(0xfd00, 0x244, index as u16 + 1, 0, 0, 0, 0, 1).into(),
    }
}

/// `address/prefix`, the way `ip` and CNI write a subnet.
pub fn cidr((address, prefix): (IpAddr, u8)) -> String {
    format!("{address}/{prefix}")
}

/// Whether `path` lies inside the lab root (a guard before deleting).
pub fn is_inside_root(path: &Path) -> bool {
    path.starts_with(lab_root()) && path != lab_root()
}
