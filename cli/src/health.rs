//! What `kanava status` reports, from a lab or a cluster, and how it
//! prints it.

use serde_json::Value;

use crate::lab::table;

/// One node's ztunnel, as `kanava status` sees it.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelStatus {
    pub node: String,
    /// `pid N` in a lab, the pod's name on a cluster, `down` or `none`.
    pub process: String,
    pub restarts: u32,
    pub ready: bool,
    pub version: Option<String>,
    pub captured: usize,
    /// How many pods should be captured, when that is known (a lab).
    pub expected: Option<usize>,
    pub certificates: usize,
    /// Certificates issued under a signer the mesh no longer signs with
    /// (being replaced during a root rotation).
    pub superseded: usize,
    /// Roots the ztunnel trusts (two during a root rotation).
    pub roots: Option<usize>,
    pub next_expiry: Option<String>,
    pub problems: Vec<String>,
}

/// The mesh's health, from a lab or a cluster.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub name: String,
    pub control_plane_ready: bool,
    pub control_plane_version: Option<f64>,
    pub ztunnels: Vec<ZtunnelStatus>,
    pub problems: Vec<String>,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty() && self.ztunnels.iter().all(|z| z.problems.is_empty())
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "healthy": self.healthy(),
            "controlPlane": {
                "ready": self.control_plane_ready,
                "version": self.control_plane_version,
            },
            "nodes": self.ztunnels,
            "problems": self.problems,
        })
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "control plane: {}, version {}\n\n",
            if self.control_plane_ready {
                "ready"
            } else {
                "NOT READY"
            },
            self.control_plane_version
                .map_or_else(|| "?".into(), |v| v.to_string())
        );
        let mut rows = vec![vec![
            "NODE".to_string(),
            "ZTUNNEL".into(),
            "READY".into(),
            "VERSION".into(),
            "PODS".into(),
            "CERTS".into(),
            "ROOTS".into(),
            "NEXT EXPIRY".into(),
            "RESTARTS".into(),
        ]];
        for ztunnel in &self.ztunnels {
            rows.push(vec![
                ztunnel.node.clone(),
                ztunnel.process.clone(),
                if ztunnel.ready { "yes" } else { "NO" }.into(),
                ztunnel.version.clone().unwrap_or_else(|| "?".into()),
                match ztunnel.expected {
                    Some(expected) => format!("{}/{expected}", ztunnel.captured),
                    None => ztunnel.captured.to_string(),
                },
                match ztunnel.superseded {
                    0 => ztunnel.certificates.to_string(),
                    old => format!("{} ({old} old)", ztunnel.certificates),
                },
                ztunnel
                    .roots
                    .map_or_else(|| "?".into(), |roots| roots.to_string()),
                ztunnel.next_expiry.clone().unwrap_or_else(|| "-".into()),
                ztunnel.restarts.to_string(),
            ]);
        }
        out.push_str(&table(&rows));
        let all: Vec<String> = self
            .problems
            .iter()
            .cloned()
            .chain(
                self.ztunnels
                    .iter()
                    .flat_map(|z| z.problems.iter().map(move |p| format!("{}: {p}", z.node))),
            )
            .collect();
        if all.is_empty() {
            out.push_str("\nall healthy\n");
        } else {
            out.push('\n');
            for problem in all {
                out.push_str(&format!("PROBLEM {problem}\n"));
            }
        }
        out
    }
}

/// Every value of a metric's series in a Prometheus text exposition.
pub fn all_values(text: &str, name: &str) -> Vec<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// A metric's value (the first series) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.split(['{', ' ']).next() == Some(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}
