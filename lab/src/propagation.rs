//! Waiting for a change to reach every ztunnel. Each ztunnel reports the
//! resource version of everything it holds (admin `/config_dump`); a change
//! has arrived when every ztunnel holds the written version or a later one,
//! or no longer holds a deleted object.
//!
//! A pod written in a way the mesh does not see (marked ready, annotated)
//! is sent to no ztunnel: the control plane serves the version of its last
//! change that mattered. Such a write has arrived once the control plane
//! has read it (its `source_resource_version` metric) and the ztunnel holds
//! the discovery version the control plane served then.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kanava_mesh::ports;

use crate::Error;
use crate::process::Cancel;
use crate::state::LabState;

/// One thing every ztunnel must see.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Discovery resource name, e.g. `workload/<uid>`.
    pub name: String,
    /// The version it must hold at least; `None`: it must be gone.
    pub version: Option<u64>,
}

impl Expect {
    pub fn workload(uid: &str, version: u64) -> Self {
        Expect {
            name: format!("workload/{uid}"),
            version: Some(version),
        }
    }

    pub fn service(key: &str, version: u64) -> Self {
        Expect {
            name: format!("service/{key}"),
            version: Some(version),
        }
    }

    pub fn policy(key: &str, version: u64) -> Self {
        Expect {
            name: format!("policy/{key}"),
            version: Some(version),
        }
    }

    pub fn gone(name: &str) -> Self {
        Expect {
            name: name.to_string(),
            version: None,
        }
    }

    fn met_by(&self, held: &Held, served: Option<&Served>) -> bool {
        match (self.version, held.versions.get(&self.name)) {
            (None, version) => version.is_none(),
            (Some(wanted), Some(version)) => {
                version
                    .split('/')
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|version| version >= wanted)
                    || (self.name.starts_with("workload/") && held.has_read(wanted, served))
            }
            // An on-demand ztunnel holds other nodes' workloads only once
            // it needed them.
            (Some(wanted), None) => {
                held.on_demand
                    && self.name.starts_with("workload/")
                    && held.has_read(wanted, served)
            }
        }
    }
}

/// Waits up to `timeout` for every ztunnel to meet `expect`. Returns the
/// `(node, resource)` pairs still unmet when time ran out.
pub fn wait(
    state: &LabState,
    expect: &[Expect],
    timeout: Duration,
    cancel: Option<&Cancel>,
) -> Result<Vec<(String, String)>, Error> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<(String, String)> = state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.netns.clone()))
        .collect();
    let mut unmet = Vec::new();
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Err(Error::Cancelled);
        }
        unmet.clear();
        // Only a workload may be met by what the control plane served.
        let served = expect
            .iter()
            .any(|e| e.version.is_some() && e.name.starts_with("workload/"))
            .then(|| served(state))
            .flatten();
        pending.retain(|(node, netns)| {
            let held = held(netns).unwrap_or_default();
            let missing: Vec<_> = expect
                .iter()
                .filter(|e| !e.met_by(&held, served.as_ref()))
                .collect();
            unmet.extend(missing.iter().map(|e| (node.clone(), e.name.clone())));
            !missing.is_empty()
        });
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        if Instant::now() >= deadline {
            return Ok(unmet);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `timeout` for every ztunnel to hold a certificate for every
/// identity it serves. Returns the `(node, identity)` pairs still without
/// one when time ran out.
pub fn wait_for_certificates(
    state: &LabState,
    timeout: Duration,
    cancel: Option<&Cancel>,
) -> Result<Vec<(String, String)>, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Err(Error::Cancelled);
        }
        let mut waiting = Vec::new();
        for node in &state.nodes {
            let Some(dump) = config_dump(&node.netns) else {
                waiting.push((node.name.clone(), "(the ztunnel does not answer)".into()));
                continue;
            };
            waiting.extend(
                dump["certificates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|cert| cert["notAfter"].is_null())
                    .map(|cert| {
                        let identity = cert["identity"].as_str().unwrap_or_default();
                        (node.name.clone(), identity.to_string())
                    }),
            );
        }
        if waiting.is_empty() || Instant::now() >= deadline {
            return Ok(waiting);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a ztunnel holds.
#[derive(Debug, Default)]
struct Held {
    /// Resource name → version.
    versions: BTreeMap<String, String>,
    /// The discovery version it serves from.
    discovery_version: u64,
    /// It holds this node's share of the mesh, and learns the rest.
    on_demand: bool,
}

impl Held {
    /// Whether this ztunnel holds what the control plane served once it
    /// had read the manifests up to `version`.
    fn has_read(&self, version: u64, served: Option<&Served>) -> bool {
        served.is_some_and(|served| {
            served.source_version >= version && self.discovery_version >= served.discovery_version
        })
    }
}

fn held(node_netns: &str) -> Option<Held> {
    let dump = config_dump(node_netns)?;
    Some(Held {
        versions: versions_of(&dump)?,
        discovery_version: dump["version"].as_str()?.parse().unwrap_or_default(),
        on_demand: dump["onDemand"].as_bool().unwrap_or(false),
    })
}

/// What the control plane has read and served.
#[derive(Debug)]
struct Served {
    /// The newest resource version it has read from the manifests.
    source_version: u64,
    /// The discovery version it served after reading it.
    discovery_version: u64,
}

/// The control plane's `Served`, from its metrics (the source's version
/// is set after the discovery version it leads to, so one reading is
/// consistent).
fn served(state: &LabState) -> Option<Served> {
    let address = std::net::SocketAddr::new(
        state.control_plane_address().ip(),
        ports::CONTROL_PLANE_READINESS,
    );
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            &state.fabric_netns,
            "curl",
            "-sf",
            "-m",
            "2",
        ])
        .arg(format!("http://{address}/metrics"))
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let gauge = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    };
    Some(Served {
        source_version: gauge("kanava_control_plane_source_resource_version")?,
        discovery_version: gauge("kanava_control_plane_configuration_version")?,
    })
}

/// What a node's ztunnel holds: resource name → version.
pub fn resource_versions(node_netns: &str) -> Option<BTreeMap<String, String>> {
    versions_of(&config_dump(node_netns)?)
}

fn versions_of(dump: &serde_json::Value) -> Option<BTreeMap<String, String>> {
    let versions = dump.get("resourceVersions")?.as_object()?;
    Some(
        versions
            .iter()
            .map(|(name, version)| {
                (
                    name.clone(),
                    version.as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// A node's ztunnel's `/config_dump`.
pub fn config_dump(node_netns: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:{}/config_dump", ports::ADMIN);
    let output = Command::new("ip")
        .args(["netns", "exec", node_netns, "curl", "-sf", "-m", "2", &url])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}
