//! Building a lab: the network, the control plane and the ztunnels, then
//! the file's objects through the same path as `lab apply`. Each step
//! records what it created in the lab's state file before the next begins;
//! if any step fails (or the caller cancels), everything is taken down.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kanava_mesh::ports;
use kanava_netns::NetNs;

use crate::apply::{self, Report};
use crate::context::{Context, Progress};
use crate::files::write_atomically;
use crate::layout::{self, Layout};
use crate::names::check_lab_name;
use crate::pods::{check_running, connects};
use crate::process::Cancel;
use crate::spec::LabSpec;
use crate::state::{Component, LabState, NodeState};
use crate::{Error, network, process, teardown};

/// How a lab is brought up.
#[derive(Clone)]
pub struct UpOptions {
    /// Lab name: lowercase letters, digits, `-`; unique among running labs.
    pub name: String,
    /// Where `ztunnel`, `kanava-control-plane` and `labapp` are; by default
    /// next to the running executable.
    pub bin_dir: Option<PathBuf>,
    /// Set to interrupt `up`; what was built is removed.
    pub cancel: Option<Cancel>,
    /// Receives a line per step, for people watching.
    pub progress: Option<Progress>,
    /// Bound on each waiting step (a component starting, a pod becoming
    /// ready).
    pub step_timeout: Duration,
    /// `RUST_LOG` for the control plane and the ztunnels.
    pub log_filter: String,
    /// Extra command-line flags for every ztunnel (e.g. lower limits in a
    /// test).
    pub ztunnel_args: Vec<String>,
    /// Extra command-line flags for the control plane (e.g. serving on
    /// demand in a small lab).
    pub control_plane_args: Vec<String>,
    /// Run this ztunnel executable instead of the one in `bin_dir`: another
    /// build's, for an A/B benchmark. Settings that older builds do not know
    /// reach it only through the environment, which they ignore.
    pub ztunnel_binary: Option<PathBuf>,
    /// Files (name, PEM) put in the CA directory before the control plane
    /// first starts: a plug-in CA (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, ...) instead of a generated root.
    pub ca_files: Vec<(String, String)>,
}

impl UpOptions {
    pub fn named(name: impl Into<String>) -> Self {
        UpOptions {
            name: name.into(),
            bin_dir: None,
            cancel: None,
            progress: None,
            step_timeout: Duration::from_secs(30),
            log_filter: "info".into(),
            ztunnel_args: Vec::new(),
            control_plane_args: Vec::new(),
            ztunnel_binary: None,
            ca_files: Vec::new(),
        }
    }
}

/// Removes a half-built lab unless disarmed.
struct Guard<'a> {
    name: &'a str,
    armed: bool,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = teardown::down(self.name);
        }
    }
}

pub(crate) fn build(spec: &LabSpec, options: &UpOptions) -> Result<(LabState, Report), Error> {
    check_lab_name(&options.name)?;
    preflight()?;
    let mut env = Context::discover(options.bin_dir.as_deref())?;
    env.cancel = options.cancel.clone();
    env.progress = options.progress.clone();
    env.step_timeout = options.step_timeout;
    // Everything is checked before anything is built.
    let plan = spec.plan()?;
    let layout = Layout::new(&options.name);

    let prefix = layout.netns_prefix();
    if network::list_netns()?
        .iter()
        .any(|ns| ns.starts_with(&prefix))
    {
        return Err(Error::AlreadyRunning(options.name.clone()));
    }
    std::fs::create_dir_all(layout::lab_root()).map_err(Error::io("create the lab root"))?;
    // create_dir (not _all) fails if another `up` got here first.
    std::fs::create_dir(&layout.dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::AlreadyRunning(options.name.clone()),
        _ => Error::Io {
            context: format!("create {}", layout.dir.display()),
            source: e,
        },
    })?;
    let mut guard = Guard {
        name: &options.name,
        armed: true,
    };
    let _lock = crate::state::lock(&layout)?;
    let mut state = LabState::new(&layout, spec.families.clone());
    state.cert_ttl = spec
        .cert_ttl
        .map(|t| humantime::format_duration(t).to_string());
    state.log_filter = options.log_filter.clone();
    state.ztunnel_args = options.ztunnel_args.clone();
    state.control_plane_args = options.control_plane_args.clone();
    state.ztunnel_binary = options.ztunnel_binary.clone();
    state.save()?;

    env.say(&format!(
        "network: fabric bridge and {} node(s), {}",
        spec.nodes.len(),
        spec.families
    ));
    network::create_fabric(&layout, &spec.families)?;
    for (index, node) in spec.nodes.iter().enumerate() {
        env.check_cancel()?;
        let ips = network::create_node(&layout, &spec.families, node, index)?;
        let socket = layout.handoff_socket(index);
        state.nodes.push(NodeState {
            name: node.clone(),
            ips,
            netns: layout.node_netns(node),
            pod_cidrs: spec
                .families
                .iter()
                .map(|family| layout::cidr(layout::pod_subnet(family, index)))
                .collect(),
            ztunnel: Component {
                name: format!("ztunnel/{node}"),
                pid: None,
                supervisor: None,
                status_file: None,
                restarts: 0,
                address: socket.display().to_string(),
                netns: layout.node_netns(node),
                log: layout.log_dir().join(format!("ztunnel-{node}.log")),
            },
            handoff_socket: socket,
            // As the kubelet projects the chart's `kanava-token` volume.
            token_file: layout.node_dir(node).join("kanava-token").join("token"),
        });
        state.save()?;
    }
    network::route_between_nodes(&layout, &spec.families, &spec.nodes)?;
    std::fs::create_dir_all(layout.manifest_dir())
        .map_err(Error::io("create the manifest directory"))?;
    write_credentials(&state)?;
    write_ca_files(&layout, &options.ca_files)?;

    env.say("control plane");
    start_control_plane(&mut state, &env)?;
    state.save()?;
    env.say("ztunnels");
    start_ztunnels(&mut state, &env)?;
    state.save()?;

    env.say(&format!(
        "objects: {} namespace(s), {} pod(s), {} service(s), {} policy(ies)",
        plan.namespaces.len(),
        plan.new_pods.len(),
        plan.services.len(),
        plan.policies.len()
    ));
    let report = apply::execute(&mut state, plan, &env)?;
    guard.armed = false;
    Ok((state, report))
}

/// Fails early, in one line, when the machine cannot run a lab.
fn preflight() -> Result<(), Error> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::Missing(
            "the lab needs root (it creates network namespaces and iptables rules in them)".into(),
        ));
    }
    for tool in ["ip", "iptables-restore", "curl"] {
        if which(tool).is_none() {
            return Err(Error::Missing(format!(
                "{tool} is not installed (run scripts/setup.sh)"
            )));
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}

/// One random credential per node: a file for the node's ztunnel, and the
/// list the control plane checks them against.
fn write_ca_files(layout: &Layout, files: &[(String, String)]) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if files.is_empty() {
        return Ok(());
    }
    let dir = layout.ca_dir();
    std::fs::create_dir_all(&dir).map_err(Error::io("create the CA directory"))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("make the CA directory private"))?;
    for (name, contents) in files {
        // Only plain names: these land inside the CA directory.
        if name.contains('/') || name.starts_with('.') {
            return Err(Error::Io {
                context: format!("CA file name {name:?}"),
                source: std::io::Error::other("not a plain file name"),
            });
        }
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))
            .and_then(|mut file| file.write_all(contents.as_bytes()))
            .map_err(Error::io(format!("write {name} in the CA directory")))?;
    }
    Ok(())
}

fn write_credentials(state: &LabState) -> Result<(), Error> {
    let mut tokens = String::from("# node credentials of this lab: <node> <token>\n");
    for node in &state.nodes {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let volume = node.token_file.parent().unwrap_or(Path::new("."));
        crate::files::write_projected_volume(volume, &[("token", token.as_bytes())])?;
        tokens.push_str(&format!("{} {token}\n", node.name));
    }
    write_private(&state.layout().node_tokens_file(), tokens.as_bytes())
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    write_atomically(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))
}

/// Starts the control plane (again, after a crash or a kill) and waits for
/// it to serve.
pub fn start_control_plane(state: &mut LabState, env: &Context) -> Result<(), Error> {
    let layout = state.layout();
    let address = state.control_plane_address();
    let fabric_ip = address.ip();
    let mut argv: Vec<String> = vec![
        env.bins.join("kanava-control-plane").display().to_string(),
        "--manifest-dir".into(),
        layout.manifest_dir().display().to_string(),
        "--listen".into(),
        address.to_string(),
        "--ca-dir".into(),
        layout.ca_dir().display().to_string(),
        // A rotation's steps (`kanava ca rotate`) are picked up at once.
        "--ca-reload-interval".into(),
        "1s".into(),
        "--node-tokens-file".into(),
        layout.node_tokens_file().display().to_string(),
        "--server-ips".into(),
        fabric_ip.to_string(),
        // /ready and /metrics, as in a cluster.
        "--readiness-listen".into(),
        std::net::SocketAddr::new(fabric_ip, ports::CONTROL_PLANE_READINESS).to_string(),
    ];
    if let Some(ttl) = &state.cert_ttl {
        argv.extend(["--cert-ttl".into(), ttl.clone()]);
    }
    argv.extend(state.control_plane_args.iter().cloned());
    let vars = [("RUST_LOG".to_string(), state.log_filter.clone())];
    let status = layout.log_dir().join("control-plane.status.json");
    spawn_supervised(
        env,
        &mut state.control_plane,
        &state.fabric_netns.clone(),
        &argv,
        &vars,
        status,
        None,
    )?;
    let pid = state.control_plane.pid.unwrap_or_default();
    let fabric = NetNs::named(&state.fabric_netns)?;
    let root = layout.root_cert();
    let log = state.control_plane.log.clone();
    env.wait_until("the control plane to listen", || {
        check_running(pid, "the control plane", &log)?;
        Ok(root.exists() && connects(&fabric, address))
    })
}

/// The glibc tunables the ztunnel image sets (deploy/docker/Dockerfile):
/// large copies by vector loop instead of `rep movsb`, which is slow for the
/// copies into TLS records on AMD EPYC. Set for every ztunnel a lab runs,
/// another build's included, so that an A/B benchmark compares code alone.
pub const ZTUNNEL_GLIBC_TUNABLES: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295";

fn start_ztunnels(state: &mut LabState, env: &Context) -> Result<(), Error> {
    let binary = state
        .ztunnel_binary
        .clone()
        .unwrap_or_else(|| env.bins.join("ztunnel"));
    for index in 0..state.nodes.len() {
        let (argv, vars) = ztunnel_command(state, index, &binary);
        let log_dir = state.layout().log_dir();
        let node = &mut state.nodes[index];
        let status = log_dir.join(format!("ztunnel-{}.status.json", node.name));
        let netns = node.netns.clone();
        spawn_supervised(
            env,
            &mut node.ztunnel,
            &netns,
            &argv,
            &vars,
            status,
            Some(&crate::container::ZTUNNEL),
        )?;
    }
    for node in &state.nodes {
        let pid = node.ztunnel.pid.unwrap_or_default();
        env.wait_until(&format!("the ztunnel on {} to be ready", node.name), || {
            check_running(
                pid,
                &format!("the ztunnel on {}", node.name),
                &node.ztunnel.log,
            )?;
            Ok(node.handoff_socket.exists() && ztunnel_ready(&node.netns))
        })?;
    }
    Ok(())
}

/// How the ztunnel of `state.nodes[index]` is started: its command line
/// and environment.
pub(crate) fn ztunnel_command(
    state: &LabState,
    index: usize,
    binary: &std::path::Path,
) -> (Vec<String>, Vec<(String, String)>) {
    let layout = state.layout();
    let node = &state.nodes[index];
    let argv: Vec<String> = vec![
        binary.display().to_string(),
        "--node-name".into(),
        node.name.clone(),
        "--control-plane-address".into(),
        state.control_plane_address().to_string(),
        "--ca-root-file".into(),
        layout.root_cert().display().to_string(),
        "--node-token-file".into(),
        node.token_file.display().to_string(),
        "--handoff-socket".into(),
        node.handoff_socket.display().to_string(),
    ]
    .into_iter()
    .chain(state.ztunnel_args.iter().cloned())
    .collect();
    // Through the environment: a ztunnel built before these settings
    // existed (an A/B benchmark's baseline) ignores them instead of
    // refusing to start.
    let vars = vec![
        ("RUST_LOG".to_string(), state.log_filter.clone()),
        (
            "GLIBC_TUNABLES".to_string(),
            ZTUNNEL_GLIBC_TUNABLES.to_string(),
        ),
        (
            "KANAVA_POD_RECORDS_DIR".to_string(),
            layout.pod_records_dir(&node.name).display().to_string(),
        ),
        (
            "KANAVA_NETNS_DIR".to_string(),
            layout.node_netns_dir(&node.name).display().to_string(),
        ),
        (
            "KANAVA_UPGRADE_SOCKET".to_string(),
            upgrade_socket(node).display().to_string(),
        ),
    ];
    (argv, vars)
}

/// Where a node's ztunnel takes over from the one before it: beside its
/// handoff socket.
pub fn upgrade_socket(node: &NodeState) -> PathBuf {
    let stem = node
        .handoff_socket
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| node.name.clone());
    node.handoff_socket
        .with_file_name(format!("{stem}-upgrade.sock"))
}

/// Starts `argv` under `lab-supervisor` in `netns`, which starts it again
/// whenever it dies, and records both pids in `component`.
pub(crate) fn spawn_supervised(
    env: &Context,
    component: &mut Component,
    netns: &str,
    argv: &[String],
    vars: &[(String, String)],
    status: PathBuf,
    container: Option<&crate::container::ContainerSpec>,
) -> Result<(), Error> {
    let _ = std::fs::remove_file(&status);
    let mut supervised = vec![
        env.bins.join("lab-supervisor").display().to_string(),
        "--status".into(),
        status.display().to_string(),
    ];
    if let Some(container) = container {
        supervised.push(crate::container::FLAG.into());
        supervised.push(container.capabilities.join(","));
    }
    supervised.push("--".into());
    supervised.extend(argv.iter().cloned());
    let supervisor = process::spawn_in(netns, &supervised, vars, &component.log)?;
    component.supervisor = Some(supervisor);
    component.status_file = Some(status.clone());
    component.restarts = 0;
    component.pid = None;
    let log = component.log.clone();
    env.wait_until(&format!("{} to start", component.name), || {
        check_running(supervisor, &component.name, &log)?;
        Ok(status.exists())
    })?;
    component.refresh();
    Ok(())
}

pub(crate) fn ztunnel_ready(netns: &str) -> bool {
    let url = format!("http://127.0.0.1:{}/healthz/ready", ports::READINESS);
    Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-sf",
            "-m",
            "1",
            "-o",
            "/dev/null",
            &url,
        ])
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    /// The lab runs ztunnels as the image does: a change to the image's
    /// glibc tunables that the lab did not follow would make every
    /// benchmark measure something that ships differently.
    #[test]
    fn ztunnels_get_the_glibc_tunables_of_the_image() {
        let dockerfile =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker/Dockerfile");
        let text = std::fs::read_to_string(&dockerfile).expect("the Dockerfile");
        let line = format!("ENV GLIBC_TUNABLES={}", super::ZTUNNEL_GLIBC_TUNABLES);
        assert!(
            text.lines().any(|l| l.trim() == line),
            "{} does not set `{line}`",
            dockerfile.display()
        );
    }
}
