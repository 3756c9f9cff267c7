//! `kanava lab ...`

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kanava_lab::{Lab, LabSpec, LabState, UpOptions, process, spec::DEFAULT_NODES};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Build a lab from a file of Kubernetes manifests and start the mesh in
    /// it. Returns once every pod runs and every enrolled pod is captured.
    Up {
        /// Lab file: Namespace, Pod and Service manifests, and optionally a
        /// `kind: Lab` document with `nodes`.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Name of the lab (lowercase letters, digits, '-').
        #[arg(long, default_value = "lab")]
        name: String,
        /// Number of nodes when the file has no `kind: Lab` document.
        #[arg(long, default_value_t = DEFAULT_NODES)]
        nodes: usize,
        /// Log filter (RUST_LOG syntax) of the control plane and ztunnels,
        /// e.g. `info,kanava_ztunnel::proxy=debug`.
        #[arg(long, default_value = "info")]
        log_filter: String,
        /// Run this ztunnel executable on every node instead of the one
        /// beside `kanava` (e.g. another build's, to compare the two).
        #[arg(long, value_name = "PATH")]
        ztunnel_binary: Option<PathBuf>,
    },
    /// Create or change objects (namespaces, pods, services, policies) in a
    /// running lab, as `kubectl apply` would. Returns once every ztunnel has
    /// seen the change.
    Apply {
        #[command(flatten)]
        lab: LabName,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Delete the objects named in a file from a running lab (a namespace
    /// takes its pods, services and policies along).
    Delete {
        #[command(flatten)]
        lab: LabName,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Replace the ztunnels as a DaemonSet's rolling update does: per node,
    /// start the new one beside the old, wait until it is ready, then stop
    /// the old one, which hands its listeners and open connections over.
    /// Prints per node what changed hands and how long it took.
    Upgrade {
        #[command(flatten)]
        lab: LabName,
        /// The new ztunnel executable (default: the one beside `kanava`).
        #[arg(long, value_name = "PATH")]
        ztunnel_binary: Option<PathBuf>,
        /// Upgrade only this node (repeatable); every node by default, one
        /// after another.
        #[arg(long = "node", value_name = "NODE")]
        nodes: Vec<String>,
        /// Start every new ztunnel first, then stop every old one at once.
        #[arg(long)]
        all_at_once: bool,
        /// Stop the old ztunnel first and start the new one this long after
        /// (e.g. `1s`), as when a ztunnel pod is deleted or evicted and its
        /// DaemonSet replaces it; the old one waits and hands over.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        stop_first: Option<std::time::Duration>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the nodes, pods, services and mesh components of a lab.
    Status {
        #[command(flatten)]
        lab: LabName,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Run a command inside a target's network namespace and return its exit
    /// code. TARGET is NAMESPACE/POD, node/NODE or fabric.
    Exec {
        #[command(flatten)]
        lab: LabName,
        target: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a pod's IP address (its primary one, or the one of
    /// `--family` in a dual-stack lab).
    Ip {
        #[command(flatten)]
        lab: LabName,
        /// NAMESPACE/POD
        pod: String,
        /// IPv4 or IPv6.
        #[arg(long)]
        family: Option<String>,
    },
    /// Print the output of a pod's process (NAMESPACE/POD), of a ztunnel
    /// (ztunnel/NODE) or of the control plane (control-plane).
    Logs {
        #[command(flatten)]
        lab: LabName,
        target: String,
    },
    /// Stop every process and remove every namespace of a lab.
    Down {
        #[command(flatten)]
        lab: LabName,
        /// Take down every lab.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Remove what any lab left behind (namespaces, processes, files).
    Clean,
}

#[derive(Args)]
pub struct LabName {
    /// Which lab; may be left out when exactly one runs.
    #[arg(long)]
    pub(crate) name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn run(command: LabCommand) -> anyhow::Result<i32> {
    match command {
        LabCommand::Up {
            file,
            name,
            nodes,
            log_filter,
            ztunnel_binary,
        } => up(&file, &name, nodes, &log_filter, ztunnel_binary),
        LabCommand::Apply { lab, file } => change(lab, &file, kanava_lab::apply_manifests),
        LabCommand::Delete { lab, file } => change(lab, &file, kanava_lab::delete_manifests),
        LabCommand::Upgrade {
            lab,
            ztunnel_binary,
            nodes,
            all_at_once,
            stop_first,
            output,
        } => {
            let mut lab = Lab::attach(lab.name.as_deref())?;
            let options = kanava_lab::UpgradeOptions {
                ztunnel_binary: ztunnel_binary
                    .map(|path| std::path::absolute(&path).unwrap_or(path)),
                nodes,
                all_at_once,
                stop_first,
            };
            let upgraded = lab.upgrade(&options)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&upgraded)?),
                Output::Table => {
                    let mut rows = vec![
                        [
                            "NODE",
                            "OLD PID",
                            "NEW PID",
                            "LISTENERS",
                            "MOVED",
                            "DRAINED",
                            "HAND-OVER",
                            "TOTAL",
                        ]
                        .map(String::from)
                        .to_vec(),
                    ];
                    for node in &upgraded {
                        rows.push(vec![
                            node.node.clone(),
                            describe_pid(node.old_pid),
                            describe_pid(node.new_pid),
                            node.listeners.to_string(),
                            node.moved.to_string(),
                            node.drained.to_string(),
                            format!("{} ms", node.hand_over_ms),
                            format!("{} ms", node.total_ms),
                        ]);
                    }
                    print!("{}", table(&rows));
                }
            }
            Ok(0)
        }
        LabCommand::Status { lab, output } => {
            let lab = Lab::attach(lab.name.as_deref())?;
            let services = lab.services()?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&status_json(lab.state(), &services))?
                ),
                Output::Table => print!("{}", status_table(lab.state(), &services)),
            }
            Ok(0)
        }
        LabCommand::Exec {
            lab,
            target,
            command,
        } => {
            let lab = Lab::attach(lab.name.as_deref())?;
            let netns = lab.netns(&target)?;
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(&command)
                .env("PATH", kanava_lab::path_with_bin_dir())
                .status()
                .with_context(|| format!("run {}", command.join(" ")))?;
            Ok(status.code().unwrap_or(1))
        }
        LabCommand::Ip { lab, pod, family } => {
            let lab = Lab::attach(lab.name.as_deref())?;
            let pod = lab.pod(&pod)?;
            let ip = match family {
                None => pod
                    .ip()
                    .with_context(|| format!("pod {} has no IP", pod.key()))?,
                Some(family) => {
                    let family = kanava_lab::IpFamily::parse(&family)?;
                    pod.ips
                        .iter()
                        .copied()
                        .find(|ip| kanava_lab::IpFamily::of(*ip) == family)
                        .with_context(|| format!("pod {} has no {family} address", pod.key()))?
                }
            };
            println!("{ip}");
            Ok(0)
        }
        LabCommand::Logs { lab, target } => {
            let lab = Lab::attach(lab.name.as_deref())?;
            print!("{}", lab.logs(&target)?);
            Ok(0)
        }
        LabCommand::Down { lab, all } => {
            if all {
                for name in kanava_lab::state::list_labs() {
                    kanava_lab::down(&name)?;
                    eprintln!("lab {name} removed");
                }
            } else {
                let name = kanava_lab::state::resolve_name(lab.name.as_deref())?;
                kanava_lab::down(&name)?;
                eprintln!("lab {name} removed");
            }
            Ok(0)
        }
        LabCommand::Clean => {
            let removed = kanava_lab::clean()?;
            if removed.is_empty() {
                eprintln!("nothing to clean");
            } else {
                eprintln!("removed: {}", removed.join(", "));
            }
            Ok(0)
        }
    }
}

fn up(
    file: &PathBuf,
    name: &str,
    nodes: usize,
    log_filter: &str,
    ztunnel_binary: Option<PathBuf>,
) -> anyhow::Result<i32> {
    if let Some(binary) = &ztunnel_binary
        && !binary.is_file()
    {
        anyhow::bail!("--ztunnel-binary {}: no such file", binary.display());
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let spec = LabSpec::parse(&text, nodes).with_context(|| format!("{}", file.display()))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let mut options = UpOptions::named(name);
    options.cancel = Some(cancel.clone());
    options.log_filter = log_filter.to_string();
    options.ztunnel_binary = ztunnel_binary;
    options.progress = Some(Arc::new(|step: &str| eprintln!("  {step}")));

    eprintln!(
        "bringing up lab {name} ({} nodes, {} objects)",
        spec.nodes.len(),
        spec.objects.len()
    );
    // Build on a worker thread so Ctrl-C (or SIGTERM) can interrupt it; the
    // builder notices the flag between steps and removes what it built.
    let builder = std::thread::spawn(move || Lab::up(&spec, &options).map(Lab::detach));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let state = runtime.block_on(async {
        let interrupted = async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok::<_, std::io::Error>(())
        };
        let finished = tokio::task::spawn_blocking(move || builder.join());
        tokio::pin!(finished);
        tokio::select! {
            joined = &mut finished => joined,
            _ = interrupted => {
                eprintln!("interrupted; removing what was built");
                cancel.store(true, Ordering::SeqCst);
                finished.await
            }
        }
    })?;
    let state = state.map_err(|_| anyhow::anyhow!("lab builder panicked"))??;
    let services = kanava_lab::services(&state)?;
    print!("{}", status_table(&state, &services));
    eprintln!(
        "\nlab {name} is up. Try:\n  kanava lab exec --name {name} NAMESPACE/POD -- curl -s http://POD_IP/\n  kanava lab logs --name {name} ztunnel/{}\n  kanava lab down --name {name}",
        state
            .nodes
            .first()
            .map(|n| n.name.as_str())
            .unwrap_or("node-1")
    );
    Ok(0)
}

type Change =
    fn(&str, &str, Option<kanava_lab::Progress>) -> Result<kanava_lab::Report, kanava_lab::Error>;

fn change(lab: LabName, file: &PathBuf, operation: Change) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let name = kanava_lab::state::resolve_name(lab.name.as_deref())?;
    let report = operation(
        &name,
        &text,
        Some(Arc::new(|step: &str| eprintln!("  {step}"))),
    )
    .with_context(|| format!("{}", file.display()))?;
    for line in &report.changes {
        println!("{line}");
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(0)
}

fn status_json(state: &LabState, services: &[kanava_lab::ServiceStatus]) -> serde_json::Value {
    serde_json::json!({
        "name": state.name,
        "ipFamilies": state.families,
        "nodes": state.nodes.iter().map(|n| serde_json::json!({
            "name": n.name,
            "ip": n.ip(),
            "ips": n.ips,
            "podCIDR": n.pod_cidrs.first(),
            "podCIDRs": n.pod_cidrs,
        })).collect::<Vec<_>>(),
        "pods": state.pods.iter().map(|p| serde_json::json!({
            "namespace": p.namespace,
            "name": p.name,
            "node": p.node,
            "ip": p.ip(),
            "ips": p.ips,
            "enrolled": p.captured,
            "identity": p.identity,
            "pid": p.pid,
            "running": p.pid.is_some_and(process::alive),
        })).collect::<Vec<_>>(),
        "components": state.components().iter().map(|c| serde_json::json!({
            "name": c.name,
            "pid": c.pid,
            "restarts": c.restarts,
            "address": c.address,
            "running": c.pid.is_some_and(process::alive),
        })).collect::<Vec<_>>(),
        "services": services,
    })
}

/// Addresses as `kubectl` shows several: comma-separated.
fn join(ips: &[std::net::IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn status_table(state: &LabState, services: &[kanava_lab::ServiceStatus]) -> String {
    let mut out = format!("lab {} ({})\n\n", state.name, state.families);
    let mut rows = vec![vec!["NODE".to_string(), "IP".into(), "POD CIDR".into()]];
    for node in &state.nodes {
        rows.push(vec![
            node.name.clone(),
            join(&node.ips),
            node.pod_cidrs.join(","),
        ]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![vec![
        "POD".to_string(),
        "NODE".into(),
        "IP".into(),
        "MESH".into(),
        "IDENTITY".into(),
        "PID".into(),
    ]];
    for pod in &state.pods {
        rows.push(vec![
            pod.key(),
            pod.node.clone(),
            if pod.ips.is_empty() {
                "-".into()
            } else {
                join(&pod.ips)
            },
            if pod.captured { "captured" } else { "-" }.into(),
            if pod.captured {
                pod.identity.clone()
            } else {
                "-".into()
            },
            describe_pid(pod.pid),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    if !services.is_empty() {
        let mut rows = vec![vec![
            "SERVICE".to_string(),
            "CLUSTER-IP".into(),
            "PORTS".into(),
            "ENDPOINTS".into(),
        ]];
        for service in services {
            rows.push(vec![
                format!("{}/{}", service.namespace, service.name),
                service.cluster_ips.join(","),
                service.ports.join(","),
                if service.endpoints.is_empty() {
                    "-".into()
                } else {
                    service.endpoints.join(",")
                },
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let mut rows = vec![vec![
        "COMPONENT".to_string(),
        "PID".into(),
        "RESTARTS".into(),
        "ADDRESS".into(),
    ]];
    for component in state.components() {
        rows.push(vec![
            component.name.clone(),
            describe_pid(component.pid),
            component.restarts.to_string(),
            component.address.clone(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out
}

fn describe_pid(pid: Option<u32>) -> String {
    match pid {
        Some(pid) if process::alive(pid) => pid.to_string(),
        Some(pid) => format!("{pid} (exited)"),
        None => "-".into(),
    }
}

pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
                .collect();
            format!("{}\n", line.join("  ").trim_end())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_line_ends() {
        let rows = vec![
            vec!["POD".to_string(), "IP".into(), "MESH".into()],
            vec!["shop/frontend".to_string(), "10.244.1.2".into(), "-".into()],
            vec!["shop/web".to_string(), "-".into(), "captured".into()],
        ];
        assert_eq!(
            table(&rows),
            "POD            IP          MESH\n\
             shop/frontend  10.244.1.2  -\n\
             shop/web       -           captured\n"
        );
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(subcommand)]
            lab: LabCommand,
        }
        Wrapper::command().debug_assert();
    }
}
