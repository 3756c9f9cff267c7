//! A local cluster made of Linux network namespaces, running Kanava for real.
//!
//! ```text
//!   fabric netns: bridge br0 10.200.0.1/24 (the underlay) + control plane :15012
//!      │                                   │
//!   node-1 netns 10.200.0.11            node-2 netns 10.200.0.12
//!   ztunnel, cni0 10.244.1.1/24         ztunnel, cni0 10.244.2.1/24
//!      │        │                          │
//!   pod netns  pod netns                pod netns        (veth pairs made by the
//!   10.244.1.2 10.244.1.3               10.244.2.2        CNI bridge plugin)
//! ```
//!
//! [`Lab::up`] builds all of it from a [`LabSpec`], starts the control plane
//! and one ztunnel per node as processes of our own binaries, hands every
//! enrolled pod to its node's ztunnel, then starts the pods' commands. A
//! [`Lab`] tears everything down when dropped (also while unwinding from a
//! panic) unless it was [`detach`](Lab::detach)ed; [`down`] and [`clean`]
//! remove a lab from another process. Nothing is changed in the host's own
//! network namespace.

pub mod cni;
mod error;
pub mod handoff;
pub mod layout;
pub mod network;
pub mod process;
pub mod spec;
pub mod state;
mod teardown;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

pub use error::Error;
use kanava_netns::NetNs;
pub use spec::LabSpec;
pub use state::{Component, LabState, NodeState, PodState};
pub use teardown::{clean, down};
pub use up::{UpOptions, bin_dir, path_with_bin_dir};

/// A running lab.
pub struct Lab {
    state: LabState,
    tear_down_on_drop: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.state.name)
            .finish()
    }
}

impl Lab {
    /// Builds and starts a lab; see [`UpOptions`]. On failure everything
    /// created so far is removed again.
    pub fn up(spec: &LabSpec, options: &UpOptions) -> Result<Lab, Error> {
        let state = up::build(spec, options)?;
        Ok(Lab {
            state,
            tear_down_on_drop: true,
        })
    }

    /// A lab started earlier (by this or another process). Dropping it leaves
    /// it running.
    pub fn attach(name: Option<&str>) -> Result<Lab, Error> {
        let name = state::resolve_name(name)?;
        Ok(Lab {
            state: LabState::load(&name)?,
            tear_down_on_drop: false,
        })
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn detach(mut self) -> LabState {
        self.tear_down_on_drop = false;
        self.state.clone()
    }

    /// Stops every process and removes every namespace of the lab.
    pub fn down(mut self) -> Result<(), Error> {
        self.tear_down_on_drop = false;
        down(&self.state.name)
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, key: &str) -> Result<&PodState, Error> {
        match Target::parse(key, &self.state)? {
            Target::Pod { namespace, name } => self
                .state
                .pod(&namespace, &name)
                .ok_or_else(|| Error::Spec(format!("no pod {key}"))),
            _ => Err(Error::Spec(format!("{key} is not a pod"))),
        }
    }

    /// Directory of the lab's CA (root certificate and key).
    pub fn ca_dir(&self) -> PathBuf {
        self.state.layout().ca_dir()
    }

    /// The credential of a node's ztunnel.
    pub fn node_token(&self, node: &str) -> Result<String, Error> {
        let node = self
            .state
            .node(node)
            .ok_or_else(|| Error::Spec(format!("no node {node}")))?;
        std::fs::read_to_string(&node.token_file)
            .map(|t| t.trim().to_string())
            .map_err(Error::io(format!("read {}", node.token_file.display())))
    }

    /// The network namespace a target lives in.
    pub fn netns(&self, target: &str) -> Result<String, Error> {
        Ok(Target::parse(target, &self.state)?.netns(&self.state))
    }

    /// Runs a command inside a target's namespace and collects its output.
    pub fn exec(&self, target: &str, argv: &[&str]) -> Result<Output, Error> {
        let netns = self.netns(target)?;
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::Spec("empty command".into()))?;
        Command::new("ip")
            .args(["netns", "exec", &netns, program])
            .args(args)
            .env("PATH", up::path_with_bin_dir())
            .output()
            .map_err(Error::io(format!("run {program} in {netns}")))
    }

    /// Output of a pod's process, a ztunnel or the control plane.
    pub fn logs(&self, target: &str) -> Result<String, Error> {
        let path = Target::parse(target, &self.state)?.log(&self.state)?;
        std::fs::read_to_string(&path).map_err(Error::io(format!("read {}", path.display())))
    }

    /// Opens a TCP connection from inside a target's namespace. Traffic from
    /// an enrolled pod is captured like its own processes' traffic.
    pub fn connect(
        &self,
        target: &str,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<std::net::TcpStream, Error> {
        let netns = NetNs::named(&self.netns(target)?)?;
        netns
            .run(|| std::net::TcpStream::connect_timeout(&to, timeout))?
            .map_err(Error::io(format!("connect from {target} to {to}")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.tear_down_on_drop
            && let Err(error) = down(&self.state.name)
        {
            eprintln!("tearing down lab {}: {error}", self.state.name);
        }
    }
}

/// Fills `buffer` with deterministic pseudo-random bytes (xorshift): cheap
/// to produce, reproducible from `seed`, and nothing like text, so a stray
/// match in a packet capture means real leakage.
pub fn pattern(seed: u64, buffer: &mut [u8]) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buffer.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Something inside a lab that commands can be aimed at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `NAMESPACE/POD`
    Pod { namespace: String, name: String },
    /// `node/NODE`: the node's namespace (where its ztunnel runs).
    Node(String),
    /// `fabric`: the underlay's namespace.
    Fabric,
    /// `control-plane`
    ControlPlane,
    /// `ztunnel/NODE`
    Ztunnel(String),
}

impl Target {
    pub fn parse(text: &str, state: &LabState) -> Result<Target, Error> {
        match text {
            "fabric" => return Ok(Target::Fabric),
            "control-plane" => return Ok(Target::ControlPlane),
            _ => {}
        }
        let Some((first, second)) = text.split_once('/') else {
            return Err(Error::Spec(format!(
                "target {text:?} must be NAMESPACE/POD, node/NODE, ztunnel/NODE, fabric or control-plane"
            )));
        };
        if state.pod(first, second).is_some() {
            return Ok(Target::Pod {
                namespace: first.into(),
                name: second.into(),
            });
        }
        match first {
            "node" | "ztunnel" if state.node(second).is_some() => Ok(if first == "node" {
                Target::Node(second.into())
            } else {
                Target::Ztunnel(second.into())
            }),
            "node" | "ztunnel" => Err(Error::Spec(format!(
                "no node {second} in lab {} (nodes: {})",
                state.name,
                state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            _ => Err(Error::Spec(format!(
                "no pod {text} in lab {} (pods: {})",
                state.name,
                state
                    .pods
                    .iter()
                    .map(PodState::key)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn netns(&self, state: &LabState) -> String {
        match self {
            Target::Pod { namespace, name } => state
                .pod(namespace, name)
                .map(|p| p.netns.clone())
                .unwrap_or_default(),
            Target::Node(node) | Target::Ztunnel(node) => state
                .node(node)
                .map(|n| n.netns.clone())
                .unwrap_or_default(),
            Target::Fabric | Target::ControlPlane => state.fabric_netns.clone(),
        }
    }

    fn log(&self, state: &LabState) -> Result<PathBuf, Error> {
        match self {
            Target::Pod { namespace, name } => state
                .pod(namespace, name)
                .map(|p| p.log.clone())
                .ok_or_else(|| Error::Spec(format!("no pod {namespace}/{name}"))),
            Target::Ztunnel(node) => state
                .node(node)
                .map(|n| n.ztunnel.log.clone())
                .ok_or_else(|| Error::Spec(format!("no node {node}"))),
            Target::ControlPlane => Ok(state.control_plane.log.clone()),
            Target::Node(_) | Target::Fabric => Err(Error::Spec(
                "logs exist for NAMESPACE/POD, ztunnel/NODE and control-plane".into(),
            )),
        }
    }
}
