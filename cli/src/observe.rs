//! `kanava status` and `kanava config-dump`: what the mesh's processes
//! believe right now, read from their admin, readiness and metrics ports
//! (inside the lab's namespaces; on a cluster, `kanava status --kubeconfig`
//! reads them through the API server, see [`crate::cluster`]).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use kanava_lab::Lab;
use kanava_lab::clients::http_get;
use serde_json::Value;

use crate::health::{Health, ZtunnelStatus, metric};
use crate::lab::{LabName, Output, table};

/// The ztunnel's ports, on the node's loopback and addresses.
const ADMIN: u16 = 15000;
const READINESS: u16 = 15021;
/// The control plane's monitoring port in a lab.
const CONTROL_PLANE_MONITORING: u16 = 15014;
/// A certificate expiring sooner than this is flagged (they are renewed at
/// half-life, so one this close means renewals fail).
const EXPIRY_WARNING: Duration = Duration::from_secs(10 * 60);

#[derive(Args)]
pub struct ConfigDumpArgs {
    #[command(flatten)]
    lab: LabName,
    /// The node whose ztunnel to ask.
    node: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    lab: LabName,
    /// A cluster instead of a lab: the kubeconfig to reach its API server.
    #[arg(long, conflicts_with = "name")]
    kubeconfig: Option<std::path::PathBuf>,
    /// On a cluster: the namespace Kanava is installed in.
    #[arg(long, default_value = "kanava-system")]
    namespace: String,
    /// On a cluster: how long every request together may take; what has not
    /// answered by then is reported as such.
    #[arg(long, env = "KANAVA_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The ztunnel's `/config_dump` on `node`.
fn config_dump(lab: &Lab, node: &str) -> anyhow::Result<Value> {
    let (status, body) = http_get(
        lab,
        &format!("node/{node}"),
        loopback(ADMIN),
        "/config_dump",
    )
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("ask the ztunnel on {node} (is it running? kanava lab status)"))?;
    anyhow::ensure!(
        status == 200,
        "the ztunnel on {node} answered {status}: {body}"
    );
    serde_json::from_str(&body).context("the ztunnel's config dump is not JSON")
}

pub fn config_dump_command(args: &ConfigDumpArgs) -> anyhow::Result<i32> {
    let lab = Lab::attach(args.lab.name.as_deref())?;
    anyhow::ensure!(
        lab.state().node(&args.node).is_some(),
        "no node {:?} in lab {} (nodes: {})",
        args.node,
        lab.state().name,
        lab.state()
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let dump = config_dump(&lab, &args.node)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&dump)?),
        Output::Table => print!("{}", dump_tables(&dump, SystemTime::now())),
    }
    Ok(0)
}

fn strings(value: &Value) -> String {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_string)
}

/// How long until an RFC 3339 time, for people (`23h59m`, `expired`).
fn expires_in(not_after: &Value, now: SystemTime) -> String {
    let Some(time) = not_after
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
    else {
        return "pending".into();
    };
    match time.duration_since(now) {
        Ok(left) => {
            let minutes = left.as_secs() / 60;
            format!("{}h{:02}m", minutes / 60, minutes % 60)
        }
        Err(_) => "expired".into(),
    }
}

fn dump_tables(dump: &Value, now: SystemTime) -> String {
    let list = |key: &str| dump[key].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "ztunnel on {}: {}, discovery version {}\n\n",
        text(&dump["node"]),
        if dump["ready"] == true {
            "ready"
        } else {
            "NOT READY"
        },
        text(&dump["version"])
    );
    let mut rows = vec![vec![
        "CAPTURED POD".to_string(),
        "IPS".into(),
        "IDENTITY".into(),
    ]];
    for pod in list("capturedPods") {
        rows.push(vec![
            format!("{}/{}", text(&pod["namespace"]), text(&pod["name"])),
            strings(&pod["ips"]),
            text(&pod["identity"]),
        ]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![vec![
        "WORKLOAD".to_string(),
        "NODE".into(),
        "IPS".into(),
        "MESH".into(),
        "IDENTITY".into(),
    ]];
    for workload in list("workloads") {
        rows.push(vec![
            format!(
                "{}/{}",
                text(&workload["namespace"]),
                text(&workload["name"])
            ),
            text(&workload["node"]),
            strings(&workload["ips"]),
            if workload["inMesh"] == true {
                text(&workload["mtlsMode"])
            } else {
                "-".into()
            },
            text(&workload["identity"]),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    let mut rows = vec![vec![
        "SERVICE".to_string(),
        "ADDRESSES".into(),
        "ENDPOINTS".into(),
    ]];
    for service in list("services") {
        rows.push(vec![
            format!("{}/{}", text(&service["namespace"]), text(&service["name"])),
            strings(&service["addresses"]),
            service["endpoints"]
                .as_array()
                .map_or(0, Vec::len)
                .to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    let mut rows = vec![vec![
        "POLICY".to_string(),
        "ACTION".into(),
        "SCOPE".into(),
        "RULES".into(),
    ]];
    for policy in list("policies") {
        rows.push(vec![
            format!("{}/{}", text(&policy["namespace"]), text(&policy["name"])),
            text(&policy["action"]),
            if policy["meshWide"] == true {
                "mesh"
            } else {
                "namespace"
            }
            .into(),
            text(&policy["rules"]),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    // Fingerprints are shown by their first 16 hex digits, as `kanava ca
    // rotate` prints them.
    let short = |value: &Value| -> String {
        value
            .as_str()
            .map_or_else(|| "-".into(), |v| v.chars().take(16).collect())
    };
    let signer = &dump["trust"]["signer"];
    let mut rows = vec![vec![
        "CERTIFICATE".to_string(),
        "NOT AFTER".into(),
        "EXPIRES IN".into(),
        "SIGNER".into(),
    ]];
    for cert in list("certificates") {
        let mut by = short(&cert["signer"]);
        if signer.is_string() && cert["signer"].is_string() && cert["signer"] != *signer {
            by.push_str(" (previous)");
        }
        rows.push(vec![
            text(&cert["identity"]),
            text(&cert["notAfter"]),
            expires_in(&cert["notAfter"], now),
            by,
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    let roots: Vec<String> = dump["trust"]["roots"]
        .as_array()
        .into_iter()
        .flatten()
        .map(short)
        .collect();
    out.push_str(&format!(
        "\ntrusted roots: {}; the mesh signs with {}\n",
        if roots.is_empty() {
            "-".into()
        } else {
            roots.join(", ")
        },
        short(signer)
    ));
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

pub fn status_command(args: &StatusArgs) -> anyhow::Result<i32> {
    let health = match &args.kubeconfig {
        Some(kubeconfig) => crate::cluster::status(kubeconfig, &args.namespace, args.timeout)?,
        None => lab_health(&Lab::attach(args.lab.name.as_deref())?),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&health.json())?),
        Output::Table => print!("{}", health.table()),
    }
    Ok(if health.healthy() { 0 } else { 1 })
}

fn lab_health(lab: &Lab) -> Health {
    let state = lab.state();
    let now = SystemTime::now();
    let mut problems = Vec::new();
    let monitoring = SocketAddr::new(state.control_plane_address().ip(), CONTROL_PLANE_MONITORING);
    let control_plane_ready = matches!(http_get(lab, "fabric", monitoring, "/ready"), Ok((200, _)));
    let control_plane_version = http_get(lab, "fabric", monitoring, "/metrics")
        .ok()
        .and_then(|(_, body)| metric(&body, "kanava_control_plane_configuration_version"));
    if !control_plane_ready {
        problems.push(format!(
            "the control plane is not ready: see `kanava lab logs --name {} control-plane`",
            state.name
        ));
    }
    let mut ztunnels = Vec::new();
    for node in &state.nodes {
        let pid = node
            .ztunnel
            .pid
            .filter(|&pid| kanava_lab::process::alive(pid));
        let mut status = ZtunnelStatus {
            node: node.name.clone(),
            process: pid.map_or_else(|| "down".into(), |pid| format!("pid {pid}")),
            restarts: node.ztunnel.restarts,
            ready: matches!(
                http_get(
                    lab,
                    &format!("node/{}", node.name),
                    loopback(READINESS),
                    "/healthz/ready"
                ),
                Ok((200, _))
            ),
            expected: Some(
                state
                    .pods
                    .iter()
                    .filter(|p| p.node == node.name && p.captured)
                    .count(),
            ),
            ..ZtunnelStatus::default()
        };
        let logs = format!(
            "kanava lab logs --name {} ztunnel/{}",
            state.name, node.name
        );
        match config_dump(lab, &node.name) {
            Err(error) => status.problems.push(format!("{error:#}; see `{logs}`")),
            Ok(dump) => {
                status.version = dump["version"].as_str().map(str::to_string);
                status.captured = dump["capturedPods"].as_array().map_or(0, Vec::len);
                let certificates = dump["certificates"].as_array().cloned().unwrap_or_default();
                status.certificates = certificates.len();
                status.roots = dump["trust"]["roots"].as_array().map(Vec::len);
                let signer = &dump["trust"]["signer"];
                status.superseded = certificates
                    .iter()
                    .filter(|cert| {
                        signer.is_string()
                            && cert["signer"].is_string()
                            && cert["signer"] != *signer
                    })
                    .count();
                let mut soonest: Option<SystemTime> = None;
                for cert in &certificates {
                    match cert["notAfter"]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339(t).ok())
                    {
                        Some(time) => soonest = Some(soonest.map_or(time, |s| s.min(time))),
                        None => status.problems.push(format!(
                            "no certificate yet for {}: is the control plane signing? see `{logs}`",
                            text(&cert["identity"])
                        )),
                    }
                }
                if let Some(soonest) = soonest {
                    status.next_expiry =
                        Some(humantime::format_rfc3339_seconds(soonest).to_string());
                    if soonest.duration_since(now).unwrap_or_default() < EXPIRY_WARNING {
                        status.problems.push(format!(
                            "a certificate expires at {}: renewals are failing; see `{logs}`",
                            humantime::format_rfc3339_seconds(soonest)
                        ));
                    }
                }
            }
        }
        if pid.is_none() {
            status
                .problems
                .push(format!("the ztunnel is not running; see `{logs}`"));
        } else if !status.ready {
            status.problems.push(format!(
                "the ztunnel is not ready (no configuration yet?); see `{logs}`"
            ));
        }
        if let (Some(held), Some(served)) = (&status.version, control_plane_version)
            && held.parse::<f64>().ok() != Some(served)
        {
            status.problems.push(format!(
                "the ztunnel holds discovery version {held}, the control plane serves {served}: a change may be in flight (run again), else see `{logs}`"
            ));
        }
        if Some(status.captured) != status.expected {
            status.problems.push(format!(
                "the ztunnel captures {} pod(s), the lab expects {}; see `{logs}`",
                status.captured,
                status.expected.unwrap_or_default()
            ));
        }
        ztunnels.push(status);
    }
    Health {
        name: state.name.clone(),
        control_plane_ready,
        control_plane_version,
        ztunnels,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::metric;

    #[test]
    fn dumps_read_as_tables() {
        let dump = serde_json::json!({
            "node": "node-1",
            "ready": true,
            "version": "7",
            "capturedPods": [{"namespace": "shop", "name": "web", "ips": ["10.244.1.2"], "identity": "spiffe://cluster.local/ns/shop/sa/web"}],
            "workloads": [{"namespace": "shop", "name": "web", "node": "node-1", "ips": ["10.244.1.2"], "inMesh": true, "mtlsMode": "strict", "identity": "spiffe://cluster.local/ns/shop/sa/web"}],
            "services": [],
            "policies": [{"namespace": "shop", "name": "deny-all", "action": "DENY", "meshWide": false, "rules": 1}],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "notAfter": "2026-01-02T00:00:00Z"}],
        });
        let now =
            humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH);
        let out = dump_tables(&dump, now);
        assert!(
            out.starts_with("ztunnel on node-1: ready, discovery version 7"),
            "{out}"
        );
        assert!(out.contains("shop/deny-all  DENY"), "{out}");
        assert!(out.contains("24h00m"), "{out}");
        assert!(!out.to_lowercase().contains("key"), "never a key");
    }

    #[test]
    fn metrics_are_read_by_name() {
        let text =
            "# TYPE x gauge\nkanava_control_plane_configuration_version 12\nother{a=\"b\"} 3\n";
        assert_eq!(
            metric(text, "kanava_control_plane_configuration_version"),
            Some(12.0)
        );
        assert_eq!(metric(text, "other"), Some(3.0));
        assert_eq!(metric(text, "missing"), None);
    }
}
