//! `kanava-bench`: measures the mesh against the wire on the local lab, and
//! the control plane at scale, and writes `RESULTS.md` and `results.json`.
//!
//! ```text
//! kanava-bench                      # full run (several minutes), writes benches/
//! kanava-bench --quick --output-dir /tmp/bench   # seconds; for CI
//! kanava-bench --report-only        # RESULTS.md again from results.json + analysis.md
//! kanava-bench --baseline /work/old/target/release   # A/B against another build
//! kanava-bench --peer ./my-peer-hook   # beside another project's node proxy
//! ```
//!
//! Needs root (it builds a lab of network namespaces). Build the workspace
//! in release mode first: the binaries it starts are taken from beside it.

mod ab;
mod control_plane;
mod execs;
mod floor;
mod full_node;
mod goals;
mod mesh;
mod procfs;
mod report;
mod soak;
mod stats;
mod upgrade;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use kanava_lab::IpFamily;

use crate::stats::Collector;

#[derive(Parser, Debug)]
#[command(name = "kanava-bench", about = "Kanava's end-to-end benchmark")]
struct Args {
    /// Seconds instead of minutes: short runs, one repetition, small scale.
    /// Checks that every scenario still produces numbers.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every data-path scenario (direct and mesh alternate).
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Where RESULTS.md and results.json go; an `analysis.md` there is
    /// appended to RESULTS.md.
    #[arg(long, default_value = "benches")]
    output_dir: PathBuf,
    /// Skip the data-path scenarios (lab).
    #[arg(long)]
    no_mesh: bool,
    /// Skip the IPv6 rows (throughput and latency in an IPv6-only lab, after
    /// the IPv4 scenarios).
    #[arg(long)]
    no_ipv6: bool,
    /// Skip the full node (110 enrolled pods on one node).
    #[arg(long)]
    no_full_node: bool,
    /// Skip the control plane scenario.
    #[arg(long)]
    no_control_plane: bool,
    /// Pods of the largest cluster the control plane scenario builds (of
    /// 10,000, 30,000 and 100,000 pods, with 100, 300 and 1,000 streams).
    #[arg(long, default_value_t = 100_000)]
    largest_cluster: usize,
    /// Minutes of each soak phase (holding 10,000 connections; 1,000 new
    /// connections a second). 0 skips the soak.
    #[arg(long, default_value_t = 10)]
    soak_minutes: u64,
    /// Skip the upgrade scenario (held connections and new ones through a
    /// rolling upgrade of both nodes' ztunnels).
    #[arg(long, conflicts_with = "upgrade_only")]
    no_upgrade: bool,
    /// Only the upgrade scenario (with the lab's set-up): no data-path
    /// scenarios, no soak.
    #[arg(long)]
    upgrade_only: bool,
    /// Measure nothing: rewrite RESULTS.md from the results.json and
    /// analysis.md already in the output directory (after editing the
    /// analysis).
    #[arg(long)]
    report_only: bool,
    /// A/B run: the directory of another build's binaries (its `ztunnel`).
    /// Its mesh runs in a second lab, taking turns with this build's in
    /// every repetition, and RESULTS.md gains a table of this build over
    /// that one.
    #[arg(long, value_name = "DIR")]
    baseline: Option<PathBuf>,
    /// Beside another project's node proxy: an executable that puts it on
    /// a lab of its own (called `HOOK up STATE NAMESPACE` and
    /// `HOOK down STATE`; see the README). It takes its turn in every
    /// repetition of the IPv4 data-path scenarios, and RESULTS.md gains a
    /// table of this build over the peer.
    #[arg(long, value_name = "HOOK")]
    peer: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.report_only {
        let path = args.output_dir.join("results.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let results: report::Results =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        report::write(&results, &args.output_dir)?;
        eprintln!("wrote {}", args.output_dir.join("RESULTS.md").display());
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!("kanava-bench needs root: it builds a lab of network namespaces");
    }
    kanava_runtime::raise_fd_limit();
    kanava_tls::install_default_provider();
    let bins = kanava_lab::bin_dir(None)?;
    let mut collector = Collector::default();
    let mut peer = None;
    let repetitions = if args.quick {
        1
    } else {
        args.repetitions.max(1)
    };

    if !args.no_mesh {
        let settings = if args.quick {
            mesh::Settings::quick()
        } else {
            mesh::Settings::full(repetitions)
        };
        eprintln!("data path: {settings:?}");
        let baseline = match &args.baseline {
            Some(dir) => {
                let ztunnel = dir.join("ztunnel");
                if !ztunnel.is_file() {
                    anyhow::bail!(
                        "--baseline {}: no ztunnel there (build the baseline with `cargo build --release` and point at its target/release)",
                        dir.display()
                    );
                }
                Some(ztunnel)
            }
            None => None,
        };
        if let Some(hook) = &args.peer
            && !hook.is_file()
        {
            anyhow::bail!("--peer {}: no such executable", hook.display());
        }
        let mut bench = mesh::MeshBench::up(
            settings.clone(),
            baseline.clone(),
            args.peer.clone(),
            IpFamily::IPv4,
        )?;
        peer = bench.peer_name();
        if !args.upgrade_only {
            bench.run(&mut collector)?;
        }
        let soak = match (args.quick, args.soak_minutes) {
            _ if args.upgrade_only => None,
            (true, _) => Some(soak::SoakSettings::quick()),
            (false, 0) => None,
            (false, minutes) => Some(soak::SoakSettings::full(minutes)),
        };
        if let Some(soak) = soak {
            eprintln!("soak: {soak:?}");
            bench.soak(&soak, &mut collector)?;
        }
        if !args.no_upgrade {
            let upgrade = if args.quick {
                upgrade::UpgradeSettings::quick()
            } else {
                upgrade::UpgradeSettings::full()
            };
            eprintln!("upgrade: {upgrade:?}");
            bench.upgrade(&upgrade, &mut collector)?;
        }
        if !args.no_ipv6 && !args.upgrade_only {
            // One lab at a time: the IPv4 one is taken down first.
            drop(bench);
            eprintln!("data path in IPv6");
            // The peer is compared in IPv4 only.
            let mut bench = mesh::MeshBench::up(settings, baseline, None, IpFamily::IPv6)?;
            bench.run_family_rows(&mut collector)?;
        }
    }
    // Scenarios that failed without stopping the others.
    let mut failed: Vec<anyhow::Error> = Vec::new();
    if !args.no_full_node && !args.upgrade_only {
        let settings = if args.quick {
            full_node::Settings::quick()
        } else {
            full_node::Settings::full()
        };
        eprintln!("full node: {settings:?}");
        if let Err(error) = full_node::run(&settings, &bins, &mut collector) {
            eprintln!("{error:#}");
            failed.push(error.context("full node"));
        }
    }
    if !args.no_control_plane {
        let sizes = if args.quick {
            control_plane::Settings::quick()
        } else {
            control_plane::Settings::full(args.largest_cluster)
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        failed.extend(runtime.block_on(control_plane::run_all(&sizes, &bins, &mut collector)));
    }

    let results = report::Results {
        date: humantime_now(),
        commit: report::commit(),
        machine: report::Machine::read(),
        quick: args.quick,
        repetitions,
        comparisons: collector.comparisons(),
        measurements: collector.measurements(),
        baseline: args.baseline.as_deref().map(report::describe_build),
        peer,
    };
    report::write(&results, &args.output_dir)?;
    print!("{}", report::markdown(&results, ""));
    eprintln!("wrote {}", args.output_dir.join("RESULTS.md").display());
    if let Some(first) = failed.into_iter().next() {
        return Err(first.context("a scenario failed (the report holds the others)"));
    }
    Ok(())
}

fn humantime_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
