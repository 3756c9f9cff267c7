//! One node full of pods (the kubelet's default of 110): what the node's
//! ztunnel costs when it has them all, and what one more pod waits.
//!
//! node-1 runs the enrolled pods, STRICT and PERMISSIVE, every tenth with
//! a UDP port opened; node-2 runs an echo server. Measured: the ztunnel's
//! CPU and the processes started on the machine while nothing happens;
//! its memory; what a discovery change costs it; `kanava status` at that
//! size; and for each of a few more pods, from the lab creating it to its
//! first byte through the mesh (a client that connects as soon as it runs).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use kanava_lab::{Lab, LabSpec, UpOptions};

use crate::control_plane::quantile;
use crate::goals;
use crate::procfs;
use crate::stats::{Better, Collector};

#[derive(Clone, Debug)]
pub struct Settings {
    /// Enrolled pods on node-1.
    pub pods: usize,
    /// Pods added one at a time at that density, each timed to its first
    /// byte.
    pub new_pods: usize,
    /// How long the idle node is watched.
    pub idle: Duration,
    /// Discovery changes timed one after another.
    pub changes: usize,
}

impl Settings {
    pub fn full() -> Self {
        Settings {
            pods: 110,
            new_pods: 20,
            idle: Duration::from_secs(20),
            changes: 10,
        }
    }

    pub fn quick() -> Self {
        Settings {
            pods: 12,
            new_pods: 3,
            idle: Duration::from_secs(2),
            changes: 2,
        }
    }
}

const SERVER_PORT: u16 = 7000;

fn lab_file(pods: usize) -> String {
    let mut text = String::from(
        "kind: Lab\nnodes: 2\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: strict, labels: {kanava.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: permissive, labels: {kanava.io/dataplane-mode: ambient, kanava.io/mtls-mode: permissive}}\n",
    );
    text.push_str(&format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: strict, labels: {{app: server}}}}\nspec:\n  nodeName: node-2\n  containers:\n  - {{name: c, command: [labapp, echo, --port, \"{SERVER_PORT}\"], readinessProbe: {{tcpSocket: {{port: {SERVER_PORT}}}}}}}\n"
    ));
    for i in 0..pods {
        // About two thirds STRICT.
        let namespace = if i % 3 == 2 { "permissive" } else { "strict" };
        let opened = if i % 10 == 0 {
            ", annotations: {kanava.io/plaintext-inbound-ports: \"udp/5353\"}"
        } else {
            ""
        };
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: {namespace}{opened}}}\nspec:\n  nodeName: node-1\n  serviceAccountName: sa-{}\n  containers: [{{name: c, command: [sleep, infinity]}}]\n",
            i % 20
        ));
    }
    text
}

pub fn run(settings: &Settings, bins: &Path, collector: &mut Collector) -> anyhow::Result<()> {
    let scenario = format!("a node with {} enrolled pods", settings.pods);
    let spec = LabSpec::parse(&lab_file(settings.pods), 2)?;
    let mut options = UpOptions::named(format!("benchn{}", std::process::id()));
    options.step_timeout = Duration::from_secs(120);
    let started = Instant::now();
    let mut lab = Lab::up(&spec, &options).context("bring up the full node's lab")?;
    eprintln!(
        "full node: {} pods up in {:.1?}",
        settings.pods + 1,
        started.elapsed()
    );
    let ztunnel = lab.state().nodes[0]
        .ztunnel
        .pid
        .context("node-1's ztunnel has no pid")?;

    // Idle: nothing applied, no traffic.
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_of(ztunnel)?;
    let watched = Instant::now();
    let execs = crate::execs::count_for(settings.idle)?;
    let seconds = watched.elapsed().as_secs_f64();
    collector.measure(
        &scenario,
        "ztunnel CPU while idle",
        "% of a core",
        Better::Lower,
        Some(goals::FULL_NODE_IDLE_CPU),
        (cpu_of(ztunnel)? - cpu) / seconds * 100.0,
    );
    collector.measure(
        &scenario,
        "programs started (exec) per second on the machine while idle, the mesh's among them",
        "per s",
        Better::Lower,
        Some(goals::FULL_NODE_IDLE_PROCESSES),
        execs as f64 / seconds,
    );
    if let Some(rss) = procfs::rss_mib(ztunnel) {
        collector.measure(&scenario, "ztunnel RSS", "MiB", Better::Lower, None, rss);
    }

    // `kanava status` at that size.
    let mut status_ms = Vec::new();
    for _ in 0..3 {
        let asked = Instant::now();
        let output = Command::new(bins.join("kanava"))
            .args(["status", "--name", &lab.state().name])
            .output()
            .context("run kanava status")?;
        if !output.status.success() {
            bail!(
                "kanava status failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        status_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
    }
    collector.measure(
        &scenario,
        "kanava status",
        "ms",
        Better::Lower,
        None,
        quantile(&mut status_ms, 0.5),
    );

    // Discovery changes elsewhere (the server relabelled): what each costs
    // node-1's ztunnel.
    let before = cpu_of(ztunnel)?;
    for change in 0..settings.changes {
        lab.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: strict, labels: {{app: server, change: c{change}}}}}\nspec:\n  nodeName: node-2\n  containers:\n  - {{name: c, command: [labapp, echo, --port, \"{SERVER_PORT}\"], readinessProbe: {{tcpSocket: {{port: {SERVER_PORT}}}}}}}\n"
        ))
        .context("relabel the server")?;
    }
    collector.measure(
        &scenario,
        "ztunnel CPU per discovery change",
        "ms",
        Better::Lower,
        None,
        (cpu_of(ztunnel)? - before) / settings.changes as f64 * 1000.0,
    );

    // One more pod at a time: created, captured, started, first byte.
    let server = lab
        .pod("strict/server")?
        .ip()
        .context("the server's address")?;
    let (mut created_to_byte, mut captured_to_byte) = (Vec::new(), Vec::new());
    for n in 0..settings.new_pods {
        let name = format!("new-{n}");
        let created = SystemTime::now();
        lab.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: strict}}\nspec:\n  nodeName: node-1\n  serviceAccountName: sa-new\n  containers: [{{name: c, command: [labapp, first-byte, --to, \"{server}:{SERVER_PORT}\"]}}]\n"
        ))
        .with_context(|| format!("create {name}"))?;
        let first_byte = wait_for_first_byte(&lab, &name)?;
        let captured = captured_at(&lab, &name)?;
        created_to_byte.push(since(created, first_byte));
        captured_to_byte.push(since(captured, first_byte));
    }
    collector.measure(
        &scenario,
        "one more pod: created (lab) to its first meshed byte, p99",
        "ms",
        Better::Lower,
        None,
        quantile(&mut created_to_byte, 0.99),
    );
    collector.measure(
        &scenario,
        "one more pod: captured (CNI ADD done) to its first meshed byte, p99",
        "ms",
        Better::Lower,
        Some(goals::FULL_NODE_CAPTURE_TO_FIRST_BYTE_P99),
        quantile(&mut captured_to_byte, 0.99),
    );
    collector.measure(
        &scenario,
        "one more pod: captured (CNI ADD done) to its first meshed byte, p50",
        "ms",
        Better::Lower,
        None,
        quantile(&mut captured_to_byte, 0.5),
    );
    drop(lab);
    Ok(())
}

fn cpu_of(pid: u32) -> anyhow::Result<f64> {
    procfs::cpu_seconds(pid).context("the ztunnel's CPU time")
}

/// When the pod's client got its first byte back (it prints it).
fn wait_for_first_byte(lab: &Lab, pod: &str) -> anyhow::Result<SystemTime> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = lab.logs(&format!("strict/{pod}")).unwrap_or_default();
        if let Some(ns) = log.lines().find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            value["unix_ns"].as_str()?.parse::<u64>().ok()
        }) {
            return Ok(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns));
        }
        if Instant::now() > deadline {
            bail!("{pod} printed no first byte within 15 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When node-1's ztunnel logged the pod as captured (the end of its CNI
/// ADD's handoff).
fn captured_at(lab: &Lab, pod: &str) -> anyhow::Result<SystemTime> {
    let log = lab.logs("ztunnel/node-1")?;
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("pod captured") && line.contains(&format!("strict/{pod} ")))
        .with_context(|| format!("no capture of {pod} in node-1's ztunnel log"))?;
    let stamp = line.split_whitespace().next().unwrap_or_default();
    humantime::parse_rfc3339(stamp).with_context(|| format!("the time of {line:?}"))
}

fn since(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
