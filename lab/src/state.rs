//! What a running lab is made of, persisted as `state.json` in the lab's
//! directory so that later commands (`status`, `exec`, `logs`, `down`) can
//! find it. Written after every step of `up`, so a lab that failed halfway
//! can still be taken down completely.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::family::IpFamilies;
use crate::files::write_atomically;
use crate::layout::{Layout, lab_root};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub name: String,
    pub dir: PathBuf,
    pub fabric_netns: String,
    /// The lab's IP families, the primary first.
    #[serde(default)]
    pub families: IpFamilies,
    pub control_plane: Component,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Last `metadata.resourceVersion` given to a stored object.
    #[serde(default)]
    pub resource_version: u64,
    /// Workload certificate lifetime given to the control plane, if any.
    #[serde(default)]
    pub cert_ttl: Option<String>,
    /// `RUST_LOG` of the mesh's processes.
    #[serde(default)]
    pub log_filter: String,
    /// Extra command-line flags of every ztunnel.
    #[serde(default)]
    pub ztunnel_args: Vec<String>,
    /// Extra command-line flags of the control plane.
    #[serde(default)]
    pub control_plane_args: Vec<String>,
    /// The ztunnel executable, when not the one beside the other binaries
    /// (an A/B benchmark runs another build's ztunnel in one of its labs).
    #[serde(default)]
    pub ztunnel_binary: Option<PathBuf>,
}

/// One of the mesh's own processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    /// `control-plane` or `ztunnel/<node>`.
    pub name: String,
    /// The running process (it changes when the supervisor restarts it).
    pub pid: Option<u32>,
    /// The `lab-supervisor` that restarts it when it dies.
    #[serde(default)]
    pub supervisor: Option<u32>,
    /// Where the supervisor reports the pid and the restarts.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
    /// How often it was started again after dying.
    #[serde(default)]
    pub restarts: u32,
    /// Where it serves: gRPC for the control plane, the handoff socket for a
    /// ztunnel.
    pub address: String,
    pub netns: String,
    pub log: PathBuf,
}

impl Component {
    /// Takes the current pid and restart count from the supervisor's report.
    pub fn refresh(&mut self) {
        let Some(report) = self
            .status_file
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice::<SupervisorReport>(&bytes).ok())
        else {
            return;
        };
        self.pid = report.pid.or(self.pid);
        self.restarts = report.restarts;
    }
}

/// What `lab-supervisor` writes after every start.
#[derive(Debug, Deserialize)]
pub struct SupervisorReport {
    pub pid: Option<u32>,
    pub restarts: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub name: String,
    /// Underlay addresses, one per family of the lab, the primary first.
    pub ips: Vec<IpAddr>,
    pub netns: String,
    /// Pod subnets, one per family, the primary first.
    pub pod_cidrs: Vec<String>,
    pub ztunnel: Component,
    pub handoff_socket: PathBuf,
    pub token_file: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// One per family of the lab, the primary first (`status.podIPs`);
    /// empty until its network exists.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Handed to its node's ztunnel: its traffic goes through the mesh.
    pub captured: bool,
    /// The CNI chain's result for it, kept as a runtime keeps it for CHECK
    /// and DEL.
    #[serde(default)]
    pub cni_result: Option<serde_json::Value>,
    pub service_account: String,
    pub identity: String,
    pub netns: String,
    pub pid: Option<u32>,
    pub command: Vec<String>,
    /// Environment of the command (from the container's `env`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Port of the container's readiness probe.
    #[serde(default)]
    pub readiness_port: Option<u16>,
    pub log: PathBuf,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The primary address (`status.podIP`).
    pub fn ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }
}

impl NodeState {
    /// The primary underlay address (`status.hostIP`).
    pub fn ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }
}

impl LabState {
    pub fn new(layout: &Layout, families: IpFamilies) -> Self {
        LabState {
            name: layout.name.clone(),
            dir: layout.dir.clone(),
            fabric_netns: layout.fabric_netns(),
            control_plane: Component {
                name: "control-plane".into(),
                pid: None,
                supervisor: None,
                status_file: None,
                restarts: 0,
                address: crate::layout::control_plane_address(&families).to_string(),
                netns: layout.fabric_netns(),
                log: layout.log_dir().join("control-plane.log"),
            },
            families,
            nodes: Vec::new(),
            pods: Vec::new(),
            resource_version: 0,
            cert_ttl: None,
            log_filter: "info".into(),
            ztunnel_args: Vec::new(),
            control_plane_args: Vec::new(),
            ztunnel_binary: None,
        }
    }

    pub fn layout(&self) -> Layout {
        Layout {
            name: self.name.clone(),
            dir: self.dir.clone(),
        }
    }

    /// Writes the state atomically.
    pub fn save(&self) -> Result<(), Error> {
        let path = self.layout().state_file();
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomically(&path, text.as_bytes())
    }

    pub fn load(name: &str) -> Result<Self, Error> {
        let path = Layout::new(name).state_file();
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NoSuchLab(name.to_string()),
            _ => Error::Io {
                context: format!("read {}", path.display()),
                source: e,
            },
        })?;
        let mut state: LabState = serde_json::from_str(&text).map_err(|e| Error::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        state.control_plane.refresh();
        for node in &mut state.nodes {
            node.ztunnel.refresh();
        }
        Ok(state)
    }

    /// Where the control plane serves gRPC.
    pub fn control_plane_address(&self) -> SocketAddr {
        crate::layout::control_plane_address(&self.families)
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodState> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Every mesh process: the control plane and the ztunnels.
    pub fn components(&self) -> Vec<&Component> {
        std::iter::once(&self.control_plane)
            .chain(self.nodes.iter().map(|n| &n.ztunnel))
            .collect()
    }
}

/// Holds the lab's lock (an exclusive `flock` on a file in its directory)
/// until dropped, so that two commands never change one lab at once.
pub struct Lock {
    _file: std::fs::File,
}

pub fn lock(layout: &Layout) -> Result<Lock, Error> {
    let path = layout.dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io(format!("lock {}", path.display()))(e.into()))?;
    Ok(Lock { _file: file })
}

/// Names of the labs that have a directory under the lab root.
pub fn list_labs() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(lab_root())
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The lab a command is about: the one named, or the only one running.
pub fn resolve_name(name: Option<&str>) -> Result<String, Error> {
    if let Some(name) = name {
        return Ok(name.to_string());
    }
    match list_labs().as_slice() {
        [] => Err(Error::NoSuchLab("(any)".into())),
        [only] => Ok(only.clone()),
        many => Err(Error::Ambiguous(format!(
            "{} labs are running ({}); say which with --name",
            many.len(),
            many.join(", ")
        ))),
    }
}
