//! What `lab exec`, `lab logs` and friends can be aimed at.

use std::path::PathBuf;

use crate::Error;
use crate::state::{LabState, PodState};

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

    pub fn netns(&self, state: &LabState) -> String {
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

    pub fn log(&self, state: &LabState) -> Result<PathBuf, Error> {
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
