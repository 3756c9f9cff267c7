//! The upgrade: many connections held, and a steady stream of new ones,
//! through a rolling upgrade of both nodes' ztunnels (`kanava lab
//! upgrade`, node by node). Shows that an upgrade breaks nothing, how long
//! each node's hand-over takes, and what the old and the new ztunnel hold
//! in memory while both run.
//!
//! 1. `hold` connections from the mesh client to the mesh server's echo;
//! 2. `labapp churn --rate` in the background for the whole upgrade;
//! 3. node-1, then node-2 upgraded to the same build (a new process each);
//! 4. every held connection must still echo a byte; no new one may fail.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::goals;
use crate::mesh::MeshBench;
use crate::procfs;
use crate::stats::{Better, Collector};

#[derive(Clone, Debug)]
pub struct UpgradeSettings {
    pub hold: usize,
    pub rate: u32,
    /// How long new connections are opened: long enough for both nodes'
    /// upgrades.
    pub churn_for: Duration,
}

impl UpgradeSettings {
    pub fn full() -> Self {
        UpgradeSettings {
            hold: 10_000,
            rate: 500,
            churn_for: Duration::from_secs(30),
        }
    }

    pub fn quick() -> Self {
        UpgradeSettings {
            hold: 200,
            rate: 100,
            churn_for: Duration::from_secs(8),
        }
    }
}

impl MeshBench {
    pub fn upgrade(
        &mut self,
        settings: &UpgradeSettings,
        collector: &mut Collector,
    ) -> anyhow::Result<()> {
        let count = settings.hold;
        let mut held = self.hold(count)?;
        eprintln!("upgrade: holding {count} connections");
        let name = self.lab.name().to_string();
        let mut peak_rss = 0.0f64;
        let sampling = std::sync::atomic::AtomicBool::new(true);
        let (churn, upgraded) = std::thread::scope(|scope| {
            let run = scope.spawn(|| self.paced_churn(settings.rate, settings.churn_for));
            let started = Instant::now();
            std::thread::sleep(Duration::from_secs(2));
            // The ztunnels' memory, old and new side by side, while the
            // upgrade runs: every ztunnel process of the lab.
            let sampler = scope.spawn(|| {
                let mut peak = 0.0f64;
                while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                    let total: f64 = ztunnel_processes(&name)
                        .into_iter()
                        .filter_map(procfs::rss_mib)
                        .sum();
                    peak = peak.max(total);
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            });
            let upgrades = || -> anyhow::Result<Vec<kanava_lab::NodeUpgrade>> {
                let mut lab = kanava_lab::Lab::attach(Some(&name))?;
                let mut upgraded = Vec::new();
                for node in ["node-1", "node-2"] {
                    let mut result = lab.upgrade(&kanava_lab::UpgradeOptions {
                        nodes: vec![node.to_string()],
                        ..Default::default()
                    })?;
                    upgraded.append(&mut result);
                }
                Ok(upgraded)
            };
            let upgraded = upgrades();
            // Also when an upgrade failed: the sampler must end.
            sampling.store(false, std::sync::atomic::Ordering::SeqCst);
            peak_rss = sampler.join().unwrap_or(0.0);
            let upgraded = upgraded?;
            eprintln!("upgrade: both nodes done after {:?}", started.elapsed());
            let churn = run
                .join()
                .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
            anyhow::Ok((churn, upgraded))
        })?;
        self.lab.refresh()?;
        let broken = crate::soak::broken(&mut held);
        drop(held);
        let errors = churn["errors"].as_u64().context("churn: no errors count")?;
        collector.measure(
            "upgrade",
            &format!("held connections broken ({count} held through both nodes' upgrades)"),
            "connections",
            Better::Lower,
            Some(goals::NONE_FAILED),
            broken as f64,
        );
        collector.measure(
            "upgrade",
            &format!(
                "failed new connections ({}/s during the upgrades)",
                settings.rate
            ),
            "connections",
            Better::Lower,
            Some(goals::NONE_FAILED),
            errors as f64,
        );
        for node in &upgraded {
            collector.measure(
                "upgrade",
                &format!("{} hand-over time", node.node),
                "ms",
                Better::Lower,
                Some(goals::HAND_OVER_TIME),
                node.hand_over_ms as f64,
            );
            collector.measure(
                "upgrade",
                &format!("{} connections moved", node.node),
                "connections",
                Better::Higher,
                None,
                node.moved as f64,
            );
            collector.measure(
                "upgrade",
                &format!("{} connections drained", node.node),
                "connections",
                Better::Lower,
                None,
                node.drained as f64,
            );
        }
        collector.measure(
            "upgrade",
            "peak RSS of all ztunnels (old and new together)",
            "MiB",
            Better::Lower,
            None,
            peak_rss,
        );
        if broken > 0 || errors > 0 {
            bail!("upgrade: {broken} held connections broke, {errors} new connections failed");
        }
        Ok(())
    }
}

/// Every ztunnel process of the lab `name` (old and new during an upgrade).
fn ztunnel_processes(name: &str) -> Vec<u32> {
    let needle = format!("/labs/{name}/");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.first()
                .is_some_and(|program| program.ends_with(b"/ztunnel"))
                && args
                    .iter()
                    .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
        })
        .collect()
}
