//! A pod's life in the lab: its network (made by the CNI chain, as a
//! container runtime would; its last plugin, `kanava-cni`, hands enrolled
//! pods to the node's ztunnel), its process, and its end.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HostIP, Pod, PodCondition, PodIP, PodStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kanava_cluster::Object;
use kanava_mesh::{DEFAULT_TRUST_DOMAIN, Identity, names};
use kanava_netns::NetNs;

use crate::context::Context;
use crate::manifests::Manifests;
use crate::state::{LabState, NodeState, PodState};
use crate::{Error, cni, network, process};
use kanava_handoff::client;

/// Creates the pod's namespace and runs the CNI plugins for it.
pub fn create_network(state: &LabState, env: &Context, pod: &Pod) -> Result<PodState, Error> {
    let layout = state.layout();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let node = spec.node_name.clone().unwrap_or_default();
    let index = state
        .nodes
        .iter()
        .position(|n| n.name == node)
        .ok_or_else(|| Error::Spec(format!("pod {namespace}/{name}: unknown node {node}")))?;
    let netns = layout.pod_netns(&namespace, &name);
    network::add_netns(&netns)?;
    let node_view = layout.node_netns_dir(&node);
    std::fs::create_dir_all(&node_view)
        .and_then(|()| {
            std::os::unix::fs::symlink(Path::new("/run/netns").join(&netns), node_view.join(&netns))
        })
        .map_err(Error::io(format!(
            "link {netns} in {}",
            node_view.display()
        )))?;
    let plugin_path = cni::plugin_path(&env.plugins, &env.bins);
    let call = cni::Call {
        plugin_path: &plugin_path,
        node_netns: &layout.node_netns(&node),
        pod_netns: &netns,
        container_id: &container_id(state, &uid),
        pod: (&namespace, &name, &uid),
    };
    let (cni_result, ips) = cni::add(
        &call,
        &cni::conflist(&layout, &state.families, &node, index),
        &state.families,
    )?;
    // Whether the chain put it in the mesh, as its ztunnel says.
    let captured = is_captured(&state.nodes[index].handoff_socket, &uid, env.step_timeout)
        .map_err(|reason| Error::Handoff {
            pod: format!("{namespace}/{name}"),
            node: node.clone(),
            reason,
        })?;

    let service_account = spec
        .service_account_name
        .clone()
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| names::DEFAULT_SERVICE_ACCOUNT.into());
    let identity = Identity::new(DEFAULT_TRUST_DOMAIN, &namespace, &service_account)
        .map_err(|e| Error::Spec(format!("pod {namespace}/{name}: {e}")))?;
    let container = spec.containers.first();
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
    let env_vars = container
        .and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .map(|var| (var.name.clone(), var.value.clone().unwrap_or_default()))
        .collect();
    Ok(PodState {
        log: layout.pod_log(&namespace, &name),
        namespace,
        name,
        uid,
        node,
        ips,
        captured,
        cni_result: Some(cni_result),
        service_account,
        identity: identity.to_string(),
        netns,
        pid: None,
        command,
        env: env_vars,
        readiness_port: readiness_port(container),
    })
}

/// The runtime's id of a pod's sandbox.
pub fn container_id(state: &LabState, uid: &str) -> String {
    format!("{}-{uid}", state.name)
}

/// The pod as an API server would report it: running with its IP, and
/// ready or not.
pub fn manifest(state: &LabState, pod: &Pod, ready: bool) -> Result<Pod, Error> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let pod_state = state
        .pods
        .iter()
        .find(|p| p.uid == uid)
        .ok_or_else(|| Error::Spec(format!("no pod with uid {uid}")))?;
    let ip = pod_state
        .ip()
        .ok_or_else(|| Error::Spec(format!("pod {} has no IP", pod_state.key())))?
        .to_string();
    let node = state.node(&pod_state.node);
    let mut pod = pod.clone();
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip),
        pod_ips: Some(
            pod_state
                .ips
                .iter()
                .map(|ip| PodIP { ip: ip.to_string() })
                .collect(),
        ),
        host_ip: node.and_then(NodeState::ip).map(|ip| ip.to_string()),
        host_ips: node.map(|n| {
            n.ips
                .iter()
                .map(|ip| HostIP { ip: ip.to_string() })
                .collect()
        }),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    Ok(pod)
}

/// Whether the ztunnel at `socket` holds the pod; `Err` when it cannot be
/// asked.
pub fn is_captured(socket: &Path, uid: &str, timeout: Duration) -> Result<bool, String> {
    match client::check_pod(socket, uid, timeout) {
        Ok(()) => Ok(true),
        Err(kanava_handoff::Error::Refused(_)) => Ok(false),
        Err(error) => Err(error.to_string()),
    }
}

/// Waits until the pod's ztunnel has followed a change of its enrollment
/// (it captures and releases running pods itself, from discovery).
pub fn wait_captured(
    state: &LabState,
    index: usize,
    env: &Context,
    wanted: bool,
) -> Result<(), Error> {
    let pod = &state.pods[index];
    let node = state
        .node(&pod.node)
        .ok_or_else(|| Error::Spec(format!("no node {}", pod.node)))?;
    let what = format!(
        "the ztunnel on {} to {} pod {}",
        pod.node,
        if wanted { "capture" } else { "release" },
        pod.key()
    );
    if wanted && state.ztunnel_binary.is_some() && pod.cni_result.is_some() {
        // Another build's ztunnel (an A/B benchmark's baseline) may predate
        // the capture check; the CNI ADD it acknowledged already said it
        // holds the pod.
        return Ok(());
    }
    env.wait_until(&what, || {
        is_captured(&node.handoff_socket, &pod.uid, env.step_timeout)
            .map(|captured| captured == wanted)
            .map_err(|reason| Error::Handoff {
                pod: pod.key(),
                node: pod.node.clone(),
                reason,
            })
    })
}

/// Starts the pod's process, waits for its readiness probe, and marks it
/// ready. Returns the resource version of the ready pod, if it has a
/// process.
pub fn start(
    state: &mut LabState,
    manifests: &Manifests,
    env: &Context,
    uid: &str,
) -> Result<Option<u64>, Error> {
    let Some(index) = state.pods.iter().position(|p| p.uid == uid) else {
        return Ok(None);
    };
    let pod = state.pods[index].clone();
    if pod.command.is_empty() {
        return Ok(None);
    }
    let path = format!(
        "{}:{}",
        env.bins.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let mut vars = vec![
        ("PATH".to_string(), path),
        ("POD_NAME".to_string(), pod.name.clone()),
        ("POD_NAMESPACE".to_string(), pod.namespace.clone()),
        (
            "POD_IP".to_string(),
            pod.ip().map(|ip| ip.to_string()).unwrap_or_default(),
        ),
        (
            "POD_IPS".to_string(),
            pod.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("NODE_NAME".to_string(), pod.node.clone()),
    ];
    vars.extend(pod.env.iter().cloned());
    let pid = process::spawn_in(&pod.netns, &pod.command, &vars, &pod.log)?;
    state.pods[index].pid = Some(pid);
    state.save()?;

    let what = format!("pod {}", pod.key());
    match (pod.readiness_port, pod.ip()) {
        (Some(port), Some(ip)) => {
            let netns = NetNs::named(&pod.netns)?;
            let address = SocketAddr::from((ip, port));
            env.wait_until(
                &format!("{what} to accept connections on port {port}"),
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
    let objects = manifests.read()?;
    let stored = objects
        .pods
        .get(&(pod.namespace.clone(), pod.name.clone()))
        .ok_or_else(|| Error::Spec(format!("{what} has no manifest")))?;
    let ready = manifest(state, stored, true)?;
    Ok(Some(manifests.write(state, Object::Pod(Arc::new(ready)))?))
}

/// Ends a pod: its process, its capture, its network.
pub fn destroy(state: &LabState, env: &Context, uid: &str) -> Result<(), Error> {
    let Some(index) = state.pods.iter().position(|p| p.uid == uid) else {
        return Ok(());
    };
    let pod = &state.pods[index];
    if let Some(pid) = pod.pid {
        process::terminate(&[pid], Duration::from_secs(3));
    }
    let mut pids: Vec<u32> = network::netns_pids(&pod.netns)
        .into_iter()
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect();
    pids.retain(|&pid| pid != std::process::id());
    process::terminate(&pids, Duration::from_secs(3));
    let on_node = state.node(&pod.node).is_some();
    if on_node {
        // Releases the pod from its ztunnel, then returns its address.
        on_chain(state, env, pod, |call, conflist| {
            cni::delete(call, conflist, pod.cni_result.as_ref())
        })?;
    }
    let _ = std::fs::remove_file(state.layout().node_netns_dir(&pod.node).join(&pod.netns));
    network::delete_netns(&pod.netns)?;
    if on_node {
        // A runtime sends DEL again once the sandbox is gone (its garbage
        // collection, a restart of the kubelet): no namespace, no result.
        let sandbox = container_id(state, &pod.uid);
        delete_sandbox(state, env, pod, &sandbox, false)?;
    }
    Ok(())
}

/// Runs DEL through the pod's node's chain for `sandbox`, as a runtime does
/// for a sandbox it is cleaning up: the pod's live one, an earlier one whose
/// ADD failed, or one long gone; with the pod's namespace or without
/// (`with_netns`), never with a cached result.
pub fn delete_sandbox(
    state: &LabState,
    env: &Context,
    pod: &PodState,
    sandbox: &str,
    with_netns: bool,
) -> Result<(), Error> {
    on_chain(state, env, pod, |call, conflist| {
        let call = cni::Call {
            container_id: sandbox,
            pod_netns: if with_netns { call.pod_netns } else { "" },
            ..call.clone()
        };
        cni::delete(&call, conflist, None)
    })
}

/// Runs CHECK through the pod's node's CNI chain with its cached result,
/// as the runtime would: `kanava-cni` asks the ztunnel whether an enrolled
/// pod is captured.
pub fn check(state: &LabState, env: &Context, pod: &PodState) -> Result<(), Error> {
    let result = pod
        .cni_result
        .as_ref()
        .ok_or_else(|| Error::Spec(format!("pod {} has no CNI result", pod.key())))?;
    on_chain(state, env, pod, |call, conflist| {
        cni::check(call, conflist, result)
    })
}

/// Runs `run` with the CNI call and the conflist of an existing pod.
fn on_chain<T>(
    state: &LabState,
    env: &Context,
    pod: &PodState,
    run: impl FnOnce(&cni::Call<'_>, &serde_json::Value) -> Result<T, Error>,
) -> Result<T, Error> {
    let index = state
        .nodes
        .iter()
        .position(|n| n.name == pod.node)
        .ok_or_else(|| Error::Spec(format!("no node {}", pod.node)))?;
    let layout = state.layout();
    let plugin_path = cni::plugin_path(&env.plugins, &env.bins);
    let call = cni::Call {
        plugin_path: &plugin_path,
        node_netns: &layout.node_netns(&pod.node),
        pod_netns: &pod.netns,
        container_id: &container_id(state, &pod.uid),
        pod: (&pod.namespace, &pod.name, &pod.uid),
    };
    run(
        &call,
        &cni::conflist(&layout, &state.families, &pod.node, index),
    )
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

/// Fails when the process `pid` has exited, with the end of its log.
pub fn check_running(pid: u32, what: &str, log: &Path) -> Result<(), Error> {
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

/// Whether a TCP connection to `address` from inside `netns` succeeds.
pub fn connects(netns: &NetNs, address: SocketAddr) -> bool {
    netns
        .run(|| std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok())
        .unwrap_or(false)
}
