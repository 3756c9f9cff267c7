//! Names and addresses of a lab.
//!
//! Every network namespace of lab `<lab>` is called `kanava-<lab>_<role>`;
//! `_` cannot occur in lab, node, namespace or pod names, so one lab's
//! namespaces can never be mistaken for another's. Addresses exist only
//! inside the lab's own namespaces, so two labs may use the same ones.
//!
//! | what | address |
//! | --- | --- |
//! | underlay (bridge `br0` in the fabric namespace) | 10.200.0.0/24 |
//! | control plane (on the fabric bridge) | 10.200.0.1:15012 |
//! | node *i* (1-based) | 10.200.0.(10 + *i*) |
//! | pods of node *i* | 10.244.*i*.0/24, gateway 10.244.*i*.1 (bridge `cni0`) |

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use kanava_mesh::ports;

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

/// The underlay address of the fabric bridge, where the control plane listens.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const UNDERLAY_PREFIX: u8 = 24;

pub fn control_plane_address() -> SocketAddr {
    SocketAddr::from((FABRIC_IP, ports::CONTROL_PLANE))
}

/// Underlay address of node `index` (0-based).
pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 11 + index as u8)
}

/// Pod subnet of node `index` (0-based): `10.244.<index+1>.0/24`.
pub fn pod_subnet(index: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, 244, index as u8 + 1, 0), 24)
}

/// Gateway (the node's `cni0` bridge) of node `index`'s pods.
pub fn pod_gateway(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index as u8 + 1, 1)
}

/// Whether `path` lies inside the lab root (a guard before deleting).
pub fn is_inside_root(path: &Path) -> bool {
    path.starts_with(lab_root()) && path != lab_root()
}
