//! `RESULTS.md` and `results.json`: every number with the machine, commit
//! and date it was taken on.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ab::Other;
use crate::stats::{Comparison, Measurement};

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            memory_gib: (memory_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub commit: String,
    pub machine: Machine,
    pub quick: bool,
    pub repetitions: usize,
    pub comparisons: Vec<Comparison>,
    pub measurements: Vec<Measurement>,
    /// The build `--baseline` pointed at (its commit, when known), in an A/B
    /// run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// The node proxy `--peer` brought (its name and version, as its hook
    /// told them), in a run with a peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// The commit being measured (with `-dirty` when the tree has changes).
pub fn commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = run(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

fn number(value: f64) -> String {
    if !value.is_finite() {
        "-".into()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn target(t: &Option<crate::stats::Target>) -> String {
    match t {
        Some(t) if t.met => format!("{} ✅", t.text),
        Some(t) => format!("{} ❌", t.text),
        None => String::new(),
    }
}

/// The metric [`crate::floor`] records.
pub const AEAD_METRIC: &str = "AES-256-GCM seal + open per GiB";

/// The least a proxy can spend per GiB on this machine (the lowest kernel
/// share any side's proxies had, plus sealing and opening every byte once),
/// and how far above it each side is: `None` when the run measured neither.
fn floor_section(results: &Results) -> Option<String> {
    let find = |metric: &str| {
        results
            .measurements
            .iter()
            .find(|m| m.scenario == "proxy cost" && m.metric == metric)
    };
    let aead = find(AEAD_METRIC)?.stats.median;
    type Side = (&'static str, fn(&Measurement) -> Option<f64>);
    let sides: Vec<Side> = vec![
        ("this build", |m| Some(m.stats.median)),
        ("peer", |m| m.peer.as_ref().map(|s| s.median)),
        ("baseline", |m| m.baseline.as_ref().map(|s| s.median)),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## The physical floor\n\nWhat no proxy in user space avoids on this machine, per GiB carried between two nodes: the kernel's share (TCP, netfilter, veth, the copies between kernel and user space on both nodes: the lowest kernel CPU per GiB of any side's proxies in this run) plus sealing every byte once and opening it once (AES-256-GCM in full 16 KiB records, measured here: {} CPU s/GiB). Each side's CPU per GiB, and its ratio to the floor:\n",
        number(aead)
    );
    let _ = writeln!(
        out,
        "| streams | kernel share (lowest) | floor (CPU s/GiB) | {} |",
        sides
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "| --- | --- | --- |{}", " --- |".repeat(sides.len()));
    let mut rows = 0;
    for streams in ["1 stream", "8 streams"] {
        let (Some(kernel), Some(total)) = (
            find(&format!("ztunnel kernel CPU per GiB ({streams})")),
            find(&format!("ztunnel CPU per GiB ({streams})")),
        ) else {
            continue;
        };
        let lowest = sides
            .iter()
            .filter_map(|(_, of)| of(kernel))
            .fold(f64::INFINITY, f64::min);
        if !lowest.is_finite() {
            continue;
        }
        let floor = lowest + aead;
        let cells: Vec<String> = sides
            .iter()
            .map(|(_, of)| match (of(total), of(kernel)) {
                (Some(total), Some(kernel)) => format!(
                    "{} (kernel {}), {}x",
                    number(total),
                    number(kernel),
                    number(total / floor)
                ),
                _ => "–".to_string(),
            })
            .collect();
        let _ = writeln!(
            out,
            "| {streams} | {} | {} | {} |",
            number(lowest),
            number(floor),
            cells.join(" | ")
        );
        rows += 1;
    }
    (rows > 0).then_some(out)
}

/// What the A/B tables' column of per-repetition ratios is.
const EACH_REPETITION: &str = "\"Each repetition\" is the same ratio taken within every repetition, this build's sample over the other side's (its median and range): how far the ratio of the medians can move between runs. The targets hold the ratio of the medians.";

/// The Markdown report; `analysis` (hand-written) is appended as it is.
pub fn markdown(results: &Results, analysis: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Kanava benchmark results\n");
    let _ = writeln!(
        out,
        "Generated by `kanava-bench` ({}) on {} at commit `{}`.\n",
        if results.quick {
            "quick mode"
        } else {
            "full run"
        },
        results.date,
        results.commit
    );
    let m = &results.machine;
    let _ = writeln!(
        out,
        "Machine: {} — {} cores, {} GiB, Linux {}. Every data-path number is the median of {} repetition(s), direct and mesh alternating in the same run; min–max in brackets.\n",
        m.cpu, m.cores, m.memory_gib, m.kernel, results.repetitions
    );
    let peer_intro = format!(
        "## Kanava against {peer}\n\nPeer: {peer}. It runs in a lab of its own of the same shape, on the same pods; direct, the peer and this build take turns within every repetition. Latency targets compare what each proxy adds to the direct path. {EACH_REPETITION}\n",
        peer = results.peer.as_deref().unwrap_or("the peer"),
    );
    let baseline_intro = format!(
        "## This build against the baseline\n\nBaseline: {}. Its mesh runs in a second lab of the same shape; direct, baseline and this build take turns within every repetition. {EACH_REPETITION}\n",
        results.baseline.as_deref().unwrap_or("another build")
    );
    for (other, intro, column) in [
        (Other::Peer, peer_intro, "peer"),
        (Other::Baseline, baseline_intro, "baseline"),
    ] {
        let rows = crate::ab::rows(other, &results.comparisons, &results.measurements);
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{intro}");
        let _ = writeln!(
            out,
            "| scenario | metric | {column} | this build | this/{column} | each repetition [min–max] | target |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
        for row in &rows {
            let paired = row.per_repetition.as_ref().map_or(String::new(), |p| {
                format!("{} [{}–{}]", number(p.median), number(p.min), number(p.max))
            });
            let _ = writeln!(
                out,
                "| {} | {} ({}) | {} | {} | {} | {} | {} |",
                row.scenario,
                row.metric,
                row.unit,
                number(row.other),
                number(row.current),
                number(row.ratio),
                paired,
                target(&row.target)
            );
        }
        let _ = writeln!(out);
    }
    if let Some(floor) = floor_section(results) {
        let _ = writeln!(out, "{floor}");
    }
    let _ = writeln!(out, "## Mesh against direct\n");
    let _ = writeln!(
        out,
        "| scenario | metric | direct | mesh | mesh/direct | mesh − direct | target |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for c in &results.comparisons {
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} [{}–{}] | {} [{}–{}] | {} | {} | {} |",
            c.scenario,
            c.metric,
            c.unit,
            number(c.direct.median),
            number(c.direct.min),
            number(c.direct.max),
            number(c.mesh.median),
            number(c.mesh.min),
            number(c.mesh.max),
            number(c.ratio),
            number(c.added),
            target(&c.target)
        );
    }
    scale_table(&mut out, &results.measurements);
    let _ = writeln!(out, "\n## Proxy and control plane\n");
    let _ = writeln!(out, "| scenario | metric | median [min–max] | target |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for m in results
        .measurements
        .iter()
        .filter(|m| !m.scenario.starts_with(SCALE_PREFIX))
    {
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} [{}–{}] | {} |",
            m.scenario,
            m.metric,
            m.unit,
            number(m.stats.median),
            number(m.stats.min),
            number(m.stats.max),
            target(&m.target)
        );
    }
    let _ = writeln!(out, "\nRaw samples: `results.json` beside this file.\n");
    out.push_str(analysis);
    out
}

/// How the control plane's scenarios at each cluster size are named.
const SCALE_PREFIX: &str = "control plane, ";

/// The control plane at every size it ran at: one row per metric, one
/// column per size, so that the growth of each figure reads across.
fn scale_table(out: &mut String, measurements: &[crate::stats::Measurement]) {
    let scaled: Vec<_> = measurements
        .iter()
        .filter(|m| m.scenario.starts_with(SCALE_PREFIX))
        .collect();
    let mut sizes: Vec<&str> = Vec::new();
    let mut metrics: Vec<(&str, &str)> = Vec::new();
    for m in &scaled {
        if !sizes.contains(&m.scenario.as_str()) {
            sizes.push(&m.scenario);
        }
        if !metrics.contains(&(m.metric.as_str(), m.unit.as_str())) {
            metrics.push((&m.metric, &m.unit));
        }
    }
    if sizes.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n## Control plane at scale\n");
    let header: Vec<&str> = sizes
        .iter()
        .map(|size| size.trim_start_matches(SCALE_PREFIX))
        .collect();
    let _ = writeln!(out, "| metric | {} |", header.join(" | "));
    let _ = writeln!(out, "| --- |{}", " --- |".repeat(sizes.len()));
    for (metric, unit) in metrics {
        let cells: Vec<String> = sizes
            .iter()
            .map(|size| {
                let found = scaled
                    .iter()
                    .find(|m| m.scenario == *size && m.metric == metric);
                match found {
                    Some(m) if m.target.is_some() => {
                        format!("{} ({})", number(m.stats.median), target(&m.target))
                    }
                    Some(m) => number(m.stats.median),
                    None => "-".into(),
                }
            })
            .collect();
        let _ = writeln!(out, "| {metric} ({unit}) | {} |", cells.join(" | "));
    }
}

pub fn write(results: &Results, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let analysis = std::fs::read_to_string(dir.join("analysis.md")).unwrap_or_default();
    std::fs::write(dir.join("RESULTS.md"), markdown(results, &analysis))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    Ok(())
}

/// A build directory as the report names it: the commit of the checkout it
/// sits in (`<checkout>/target/release`), else the path.
pub fn describe_build(dir: &Path) -> String {
    let commit = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match commit {
        Some(commit) => format!("commit `{commit}` (`{}`)", dir.display()),
        None => format!("`{}`", dir.display()),
    }
}
