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

// Layered bottom-up; a module imports only from the ones above it here.
pub mod apply;
pub mod capture;
pub mod clients;
pub mod cni;
pub mod container;
pub mod context;
mod error;
pub mod family;
pub mod files;
pub mod layout;
pub mod manifests;
pub mod names;
pub mod network;
pub mod plan;
pub mod pods;
pub mod process;
pub mod propagation;
pub mod rotate;
pub mod services;
pub mod spec;
pub mod state;
pub mod target;
mod teardown;
pub mod testdata;
mod up;
pub mod upgrade;
pub mod verify;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub use apply::{Report, apply_manifests, delete_manifests};
pub use context::{Context, Progress, bin_dir, path_with_bin_dir};
pub use error::Error;
pub use family::{IpFamilies, IpFamily};
use kanava_netns::NetNs;
pub use rotate::Rotation;
pub use services::{ServiceStatus, services};
pub use spec::LabSpec;
pub use state::{Component, LabState, NodeState, PodState};
pub use target::Target;
pub use teardown::{clean, down};
pub use testdata::pattern;
pub use up::UpOptions;
pub use upgrade::{NodeUpgrade, UpgradeOptions};

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
        let (state, report) = up::build(spec, options)?;
        if let Some(progress) = &options.progress {
            for warning in &report.warnings {
                progress(&format!("warning: {warning}"));
            }
        }
        Ok(Lab {
            state,
            tear_down_on_drop: true,
        })
    }

    /// Applies Kubernetes manifests (namespaces, pods, services, policies)
    /// to the running lab, as `kubectl apply` would, and waits until every
    /// ztunnel has seen the change.
    pub fn apply(&mut self, yaml: &str) -> Result<Report, Error> {
        let report = apply_manifests(&self.state.name, yaml, None)?;
        self.refresh()?;
        Ok(report)
    }

    /// Deletes the objects named in `yaml` (namespaces take their pods,
    /// services and policies along), and waits until every ztunnel has let
    /// them go.
    pub fn delete(&mut self, yaml: &str) -> Result<Report, Error> {
        let report = delete_manifests(&self.state.name, yaml, None)?;
        self.refresh()?;
        Ok(report)
    }

    /// Starts the control plane again (after it was killed), with the same
    /// CA, credentials and manifests, and waits for it to serve.
    pub fn restart_control_plane(&mut self) -> Result<(), Error> {
        let _lock = state::lock(&self.state.layout())?;
        let mut state = LabState::load(&self.state.name)?;
        stop(&state.control_plane);
        up::start_control_plane(&mut state, &Context::discover(None)?)?;
        state.save()?;
        self.state = state;
        Ok(())
    }

    /// Stops the control plane for good (its supervisor too), until
    /// [`Lab::restart_control_plane`].
    pub fn stop_control_plane(&mut self) -> Result<(), Error> {
        let _lock = state::lock(&self.state.layout())?;
        let state = LabState::load(&self.state.name)?;
        stop(&state.control_plane);
        self.state = state;
        Ok(())
    }

    /// Replaces ztunnels as a DaemonSet's rolling update does: each new one
    /// starts beside the old, and the old one hands over once the new one
    /// is ready.
    pub fn upgrade(&mut self, options: &UpgradeOptions) -> Result<Vec<NodeUpgrade>, Error> {
        let upgraded = upgrade::upgrade(&self.state.name, options, &Context::discover(None)?)?;
        self.refresh()?;
        Ok(upgraded)
    }

    /// Rotates the mesh root while traffic flows (see [`rotate`]); each
    /// step waits up to `step_timeout` for every ztunnel.
    pub fn rotate_root(&self, step_timeout: std::time::Duration) -> Result<Rotation, Error> {
        rotate::rotate(&self.state, step_timeout)
    }

    /// The ztunnel on `node` as it runs now: its pid and how often its
    /// supervisor restarted it.
    pub fn ztunnel(&mut self, node: &str) -> Result<Component, Error> {
        self.refresh()?;
        self.state
            .node(node)
            .map(|n| n.ztunnel.clone())
            .ok_or_else(|| Error::Spec(format!("no node {node}")))
    }

    /// Reads the lab's state again (after another process changed it).
    pub fn refresh(&mut self) -> Result<(), Error> {
        self.state = LabState::load(&self.state.name)?;
        Ok(())
    }

    /// The lab's Services with their virtual IPs and ready endpoints.
    pub fn services(&self) -> Result<Vec<ServiceStatus>, Error> {
        services(&self.state)
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

    /// Runs the node's CNI chain with CHECK for a pod, as the runtime would:
    /// `kanava-cni` asks the ztunnel whether an enrolled pod is captured.
    pub fn cni_check(&self, key: &str) -> Result<(), Error> {
        pods::check(&self.state, &Context::discover(None)?, self.pod(key)?)
    }

    /// Runs the node's CNI chain with DEL for one of a pod's sandboxes, as a
    /// runtime does when it cleans one up: `None` is the pod's live sandbox;
    /// without `with_netns` the call carries no namespace (it is gone).
    pub fn cni_delete(
        &self,
        key: &str,
        sandbox: Option<&str>,
        with_netns: bool,
    ) -> Result<(), Error> {
        let pod = self.pod(key)?;
        let live = pods::container_id(&self.state, &pod.uid);
        let sandbox = sandbox.unwrap_or(&live);
        pods::delete_sandbox(
            &self.state,
            &Context::discover(None)?,
            pod,
            sandbox,
            with_netns,
        )
    }

    /// Where `kanava-cni` keeps the pod records of a node.
    pub fn pod_records_dir(&self, node: &str) -> PathBuf {
        self.state.layout().pod_records_dir(node)
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
            .env("PATH", path_with_bin_dir())
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

    /// A UDP socket bound to `bind` inside a pod's (or node's) namespace.
    pub fn udp_socket(&self, target: &str, bind: SocketAddr) -> Result<std::net::UdpSocket, Error> {
        let netns = NetNs::named(&self.netns(target)?)?;
        netns
            .run(|| std::net::UdpSocket::bind(bind))?
            .map_err(Error::io(format!("bind UDP {bind} in {target}")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.tear_down_on_drop && std::thread::panicking() {
            self.keep_logs_of_failure();
        }
        if self.tear_down_on_drop
            && let Err(error) = down(&self.state.name)
        {
            eprintln!("tearing down lab {}: {error}", self.state.name);
        }
    }
}

impl Lab {
    /// A failing test tears its lab down like any other: first the logs are
    /// copied out of it, and the warnings and errors of its ztunnels and
    /// control plane printed with its failed connections, so that the failure can be understood from
    /// the test's output alone.
    fn keep_logs_of_failure(&self) {
        let from = self.state.layout().log_dir();
        let to = std::env::temp_dir()
            .join("kanava-failed-labs")
            .join(&self.state.name);
        let copied = copy_tree(&from, &to);
        match copied {
            Ok(()) => eprintln!("lab {}: logs kept in {}", self.state.name, to.display()),
            Err(error) => eprintln!("lab {}: keeping its logs: {error}", self.state.name),
        }
        let targets = self
            .state
            .nodes
            .iter()
            .map(|node| format!("ztunnel/{}", node.name))
            .chain(["control-plane".to_string()]);
        for target in targets {
            let log = self.logs(&target).unwrap_or_default();
            let notable: Vec<&str> = log
                .lines()
                .filter(|line| {
                    line.contains("WARN")
                        || line.contains("ERROR")
                        || line.contains("outcome=failed")
                        || line.contains("\"outcome\":\"failed\"")
                })
                .collect();
            for line in &notable[notable.len().saturating_sub(40)..] {
                eprintln!("{target}: {line}");
            }
        }
    }
}

/// Copies the files under `from` to `to`, keeping the folders.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Stops a component and its supervisor.
pub(crate) fn stop(component: &state::Component) {
    let pids: Vec<u32> = component
        .supervisor
        .into_iter()
        .chain(component.pid)
        .filter(|&pid| process::alive(pid))
        .collect();
    process::terminate(&pids, std::time::Duration::from_secs(3));
}
