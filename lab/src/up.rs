//! Building a lab, step by step. Each step records what it created in the
//! lab's state file before the next begins; if any step fails (or the
//! caller cancels), everything is taken down again.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodIP, PodStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kanava_mesh::{DEFAULT_TRUST_DOMAIN, Identity, is_enrolled, names, ports};
use kanava_netns::NetNs;
use kanava_proto::v1 as pb;

use crate::layout::{self, Layout, check_lab_name};
use crate::process::Cancel;
use crate::state::{Component, LabState, NodeState, PodState, write_atomically};
use crate::{Error, LabSpec, cni, handoff, network, process};

/// Receives a line per step of `up`.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

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
        }
    }

    fn say(&self, message: &str) {
        if let Some(progress) = &self.progress {
            progress(message);
        }
    }

    fn check_cancel(&self) -> Result<(), Error> {
        match &self.cancel {
            Some(cancel) if cancel.load(Ordering::SeqCst) => Err(Error::Cancelled),
            _ => Ok(()),
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
            let _ = crate::down(self.name);
        }
    }
}

pub(crate) fn build(spec: &LabSpec, options: &UpOptions) -> Result<LabState, Error> {
    check_lab_name(&options.name)?;
    preflight()?;
    let bins = bin_dir(options.bin_dir.as_deref())?;
    let plugins = cni::plugin_dir()?;
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
    let mut state = LabState::new(&layout);
    state.save()?;

    options.say(&format!(
        "network: fabric bridge and {} node(s)",
        spec.nodes.len()
    ));
    network::create_fabric(&layout)?;
    for (index, node) in spec.nodes.iter().enumerate() {
        options.check_cancel()?;
        let ip = network::create_node(&layout, node, index)?;
        let (subnet, prefix) = layout::pod_subnet(index);
        let socket = layout.handoff_socket(index);
        state.nodes.push(NodeState {
            name: node.clone(),
            ip,
            netns: layout.node_netns(node),
            pod_cidr: format!("{subnet}/{prefix}"),
            ztunnel: Component {
                name: format!("ztunnel/{node}"),
                pid: None,
                address: socket.display().to_string(),
                netns: layout.node_netns(node),
                log: layout.log_dir().join(format!("ztunnel-{node}.log")),
            },
            handoff_socket: socket,
            token_file: layout.node_dir(node).join("token"),
        });
        state.save()?;
    }
    network::route_between_nodes(&layout, &spec.nodes)?;

    options.say(&format!(
        "pod networks: {} pod(s) through the CNI bridge plugin",
        spec.pods.len()
    ));
    let mut manifests = Vec::new();
    for pod in &spec.pods {
        options.check_cancel()?;
        let pod_state = create_pod_network(spec, &layout, &plugins, pod)?;
        manifests.push(pod_manifest(pod, &pod_state, &state)?);
        state.pods.push(pod_state);
        state.save()?;
    }

    write_credentials(&state)?;
    write_manifests(spec, &layout, &manifests)?;

    options.say("control plane");
    start_control_plane(&mut state, &bins, options)?;
    state.save()?;
    options.say("ztunnels");
    start_ztunnels(&mut state, &bins, options)?;
    state.save()?;

    let enrolled: Vec<_> = state.pods.iter().filter(|p| p.enrolled).cloned().collect();
    options.say(&format!("capturing {} enrolled pod(s)", enrolled.len()));
    for pod in &enrolled {
        options.check_cancel()?;
        hand_over(&state, pod, options.step_timeout)?;
    }

    options.say("starting pods");
    start_pods(spec, &mut state, &bins, options)?;
    state.save()?;

    guard.armed = false;
    Ok(state)
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

const BINARIES: [&str; 3] = ["ztunnel", "kanava-control-plane", "labapp"];

/// Where Kanava's binaries are: `KANAVA_BIN_DIR`, or beside the running
/// executable (its parent when that is a Cargo test binary in `deps/`).
pub fn bin_dir(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let candidate = match (explicit, std::env::var_os("KANAVA_BIN_DIR")) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => PathBuf::from(dir),
        (None, None) => {
            let exe =
                std::env::current_exe().map_err(Error::io("locate the running executable"))?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.parent().map(Path::to_path_buf).unwrap_or(dir)
            } else {
                dir
            }
        }
    };
    match BINARIES.iter().find(|b| !candidate.join(b).is_file()) {
        None => Ok(candidate),
        Some(missing) => Err(Error::Missing(format!(
            "{missing} not found in {}; build everything with `cargo build --workspace` (or set KANAVA_BIN_DIR)",
            candidate.display()
        ))),
    }
}

/// `PATH` for processes in the lab: Kanava's binaries first.
pub fn path_with_bin_dir() -> String {
    let system = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    match bin_dir(None) {
        Ok(dir) => format!("{}:{system}", dir.display()),
        Err(_) => system,
    }
}

fn create_pod_network(
    spec: &LabSpec,
    layout: &Layout,
    plugins: &Path,
    pod: &Pod,
) -> Result<PodState, Error> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod_spec = pod.spec.clone().unwrap_or_default();
    let node = pod_spec.node_name.clone().unwrap_or_default();
    let index = spec
        .nodes
        .iter()
        .position(|n| *n == node)
        .ok_or_else(|| Error::Spec(format!("pod {namespace}/{name}: unknown node {node}")))?;
    let netns = layout.pod_netns(&namespace, &name);
    network::add_netns(&netns)?;
    let config = cni::network_config(index, &layout.ipam_dir(&node));
    let ip = cni::add(
        plugins,
        &layout.node_netns(&node),
        &netns,
        &format!("{}-{uid}", layout.name),
        &config,
    )?;

    let service_account = pod_spec
        .service_account_name
        .clone()
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| names::DEFAULT_SERVICE_ACCOUNT.into());
    let identity = Identity::new(DEFAULT_TRUST_DOMAIN, &namespace, &service_account)
        .map_err(|e| Error::Spec(format!("pod {namespace}/{name}: {e}")))?;
    let enrolled = pod_spec.host_network != Some(true)
        && is_enrolled(
            spec.namespaces
                .get(&namespace)
                .and_then(|ns| ns.metadata.labels.as_ref()),
            pod.metadata.labels.as_ref(),
        );
    let container = pod_spec.containers.first();
    let command: Vec<String> = container
        .map(|c| {
            c.command
                .iter()
                .flatten()
                .chain(c.args.iter().flatten())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok(PodState {
        log: layout.pod_log(&namespace, &name),
        namespace,
        name,
        uid,
        node,
        ip: Some(ip),
        enrolled,
        service_account,
        identity: identity.to_string(),
        netns,
        pid: None,
        command,
    })
}

/// The pod as an API server would report it once running.
fn pod_manifest(pod: &Pod, state: &PodState, lab: &LabState) -> Result<Pod, Error> {
    let ip = state
        .ip
        .ok_or_else(|| Error::Spec(format!("pod {} has no IP", state.key())))?
        .to_string();
    let mut pod = pod.clone();
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip }]),
        host_ip: lab.node(&state.node).map(|n| n.ip.to_string()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    Ok(pod)
}

/// One random credential per node: a file for the node's ztunnel, and the
/// list the control plane checks them against.
fn write_credentials(state: &LabState) -> Result<(), Error> {
    let mut tokens = String::from("# node credentials of this lab: <node> <token>\n");
    for node in &state.nodes {
        let token = hex::encode(rand::random::<[u8; 32]>());
        write_private(&node.token_file, token.as_bytes())?;
        tokens.push_str(&format!("{} {token}\n", node.name));
    }
    write_private(&state.layout().node_tokens_file(), tokens.as_bytes())
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    write_atomically(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))
}

fn write_manifests(spec: &LabSpec, layout: &Layout, pods: &[Pod]) -> Result<(), Error> {
    let dir = layout.manifest_dir();
    for (name, namespace) in &spec.namespaces {
        write_manifest(&dir.join(format!("namespace_{name}.yaml")), namespace)?;
    }
    for pod in pods {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or("");
        write_manifest(&dir.join(format!("pod_{namespace}_{name}.yaml")), pod)?;
    }
    for service in &spec.services {
        let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        let name = service.metadata.name.as_deref().unwrap_or("");
        write_manifest(
            &dir.join(format!("service_{namespace}_{name}.yaml")),
            service,
        )?;
    }
    Ok(())
}

fn write_manifest(path: &Path, object: &impl serde::Serialize) -> Result<(), Error> {
    let yaml = serde_yaml::to_string(object)
        .map_err(|e| Error::Spec(format!("cannot write manifest {}: {e}", path.display())))?;
    write_atomically(path, yaml.as_bytes())
}

fn start_control_plane(
    state: &mut LabState,
    bins: &Path,
    options: &UpOptions,
) -> Result<(), Error> {
    let layout = state.layout();
    let address = layout::control_plane_address();
    let argv: Vec<String> = vec![
        bins.join("kanava-control-plane").display().to_string(),
        "--manifest-dir".into(),
        layout.manifest_dir().display().to_string(),
        "--listen".into(),
        address.to_string(),
        "--ca-dir".into(),
        layout.ca_dir().display().to_string(),
        "--node-tokens-file".into(),
        layout.node_tokens_file().display().to_string(),
        "--server-ips".into(),
        layout::FABRIC_IP.to_string(),
    ];
    let env = [("RUST_LOG".to_string(), options.log_filter.clone())];
    let pid = process::spawn_in(&state.fabric_netns, &argv, &env, &state.control_plane.log)?;
    state.control_plane.pid = Some(pid);
    let fabric = NetNs::named(&state.fabric_netns)?;
    let root = layout.root_cert();
    wait_until("the control plane to listen", options, || {
        check_running(pid, "the control plane", &state.control_plane.log)?;
        Ok(root.exists() && connects(&fabric, address))
    })
}

fn start_ztunnels(state: &mut LabState, bins: &Path, options: &UpOptions) -> Result<(), Error> {
    let layout = state.layout();
    for node in &mut state.nodes {
        let argv: Vec<String> = vec![
            bins.join("ztunnel").display().to_string(),
            "--node-name".into(),
            node.name.clone(),
            "--control-plane-address".into(),
            layout::control_plane_address().to_string(),
            "--ca-root-file".into(),
            layout.root_cert().display().to_string(),
            "--node-token-file".into(),
            node.token_file.display().to_string(),
            "--handoff-socket".into(),
            node.handoff_socket.display().to_string(),
        ];
        let env = [("RUST_LOG".to_string(), options.log_filter.clone())];
        node.ztunnel.pid = Some(process::spawn_in(
            &node.netns,
            &argv,
            &env,
            &node.ztunnel.log,
        )?);
    }
    for node in &state.nodes {
        let pid = node.ztunnel.pid.unwrap_or_default();
        wait_until(
            &format!("the ztunnel on {} to be ready", node.name),
            options,
            || {
                check_running(
                    pid,
                    &format!("the ztunnel on {}", node.name),
                    &node.ztunnel.log,
                )?;
                Ok(node.handoff_socket.exists() && ztunnel_ready(&node.netns))
            },
        )?;
    }
    Ok(())
}

fn ztunnel_ready(netns: &str) -> bool {
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

fn hand_over(state: &LabState, pod: &PodState, timeout: Duration) -> Result<(), Error> {
    let node = state
        .node(&pod.node)
        .ok_or_else(|| Error::Spec(format!("no node {}", pod.node)))?;
    let info = pb::PodInfo {
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        ips: pod.ip.iter().map(ToString::to_string).collect(),
    };
    let netns_path = PathBuf::from("/run/netns").join(&pod.netns);
    handoff::add_pod(&node.handoff_socket, info, &netns_path, timeout).map_err(|reason| {
        Error::Handoff {
            pod: pod.key(),
            node: pod.node.clone(),
            reason,
        }
    })
}

fn start_pods(
    spec: &LabSpec,
    state: &mut LabState,
    bins: &Path,
    options: &UpOptions,
) -> Result<(), Error> {
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    for (pod, manifest) in state.pods.iter_mut().zip(&spec.pods) {
        options.check_cancel()?;
        if pod.command.is_empty() {
            continue;
        }
        let container = manifest.spec.as_ref().and_then(|s| s.containers.first());
        let mut env = vec![
            ("PATH".to_string(), path.clone()),
            ("POD_NAME".to_string(), pod.name.clone()),
            ("POD_NAMESPACE".to_string(), pod.namespace.clone()),
            (
                "POD_IP".to_string(),
                pod.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            ),
            ("NODE_NAME".to_string(), pod.node.clone()),
        ];
        for var in container.and_then(|c| c.env.as_ref()).into_iter().flatten() {
            env.push((var.name.clone(), var.value.clone().unwrap_or_default()));
        }
        pod.pid = Some(process::spawn_in(&pod.netns, &pod.command, &env, &pod.log)?);
    }
    for (pod, manifest) in state.pods.iter().zip(&spec.pods) {
        let Some(pid) = pod.pid else { continue };
        let container = manifest.spec.as_ref().and_then(|s| s.containers.first());
        let what = format!("pod {}", pod.key());
        match (readiness_port(container), pod.ip) {
            (Some(port), Some(ip)) => {
                let netns = NetNs::named(&pod.netns)?;
                let address = SocketAddr::from((ip, port));
                wait_until(
                    &format!("{what} to accept connections on port {port}"),
                    options,
                    || {
                        check_running(pid, &what, &pod.log)?;
                        Ok(connects(&netns, address))
                    },
                )?;
            }
            _ => {
                // No probe: give it a moment, and accept a clean exit (a
                // one-shot client) but not a failed one.
                std::thread::sleep(Duration::from_millis(50));
                if let Some(status) = process::exit_status(pid).filter(|s| !s.success()) {
                    return Err(Error::Exited {
                        what,
                        status: status.to_string(),
                        log_tail: process::log_tail(&pod.log, 20),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The port of a container's `readinessProbe` (TCP or HTTP), by number or
/// by the name of one of its ports.
fn readiness_port(container: Option<&Container>) -> Option<u16> {
    let container = container?;
    let probe = container.readiness_probe.as_ref()?;
    let port = probe
        .tcp_socket
        .as_ref()
        .map(|t| &t.port)
        .or(probe.http_get.as_ref().map(|h| &h.port))?;
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn check_running(pid: u32, what: &str, log: &Path) -> Result<(), Error> {
    if process::alive(pid) {
        return Ok(());
    }
    Err(Error::Exited {
        what: what.to_string(),
        status: process::exit_status(pid)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "gone".into()),
        log_tail: process::log_tail(log, 20),
    })
}

fn connects(netns: &NetNs, address: SocketAddr) -> bool {
    netns
        .run(|| std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok())
        .unwrap_or(false)
}

fn wait_until(
    what: &str,
    options: &UpOptions,
    mut check: impl FnMut() -> Result<bool, Error>,
) -> Result<(), Error> {
    let deadline = Instant::now() + options.step_timeout;
    loop {
        options.check_cancel()?;
        if check()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                after: options.step_timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
