//! The soak: many connections held through one node for a long time, then a
//! steady stream of new ones. Not a speed test: it shows that the ztunnels'
//! memory stays bounded, that every descriptor comes back afterwards, and
//! that no connection fails that the load itself did not break.
//!
//! 1. *Hold*: `hold` connections from the mesh client to the mesh server's
//!    echo, kept open for `hold_for`; the ztunnels' RSS is sampled; at the
//!    end every held connection must still echo a byte.
//! 2. *Churn*: `rate` new connections a second for `churn_for` (`labapp
//!    churn --rate`), each with a 1 KiB round trip; none may fail.
//! 3. *After*: with everything closed, the ztunnels' open files must come
//!    back to where they started.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::goals;
use crate::mesh::{MeshBench, SERVER_PORT};
use crate::procfs;
use crate::stats::{Better, Collector, Mode};

#[derive(Clone, Debug)]
pub struct SoakSettings {
    pub hold: usize,
    pub hold_for: Duration,
    pub rate: u32,
    pub churn_for: Duration,
    pub sample_every: Duration,
}

impl SoakSettings {
    pub fn full(minutes: u64) -> Self {
        SoakSettings {
            hold: 10_000,
            hold_for: Duration::from_secs(minutes * 60),
            rate: 1_000,
            churn_for: Duration::from_secs(minutes * 60),
            sample_every: Duration::from_secs(15),
        }
    }

    pub fn quick() -> Self {
        SoakSettings {
            hold: 200,
            hold_for: Duration::from_secs(2),
            rate: 100,
            churn_for: Duration::from_secs(2),
            sample_every: Duration::from_millis(500),
        }
    }
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

impl MeshBench {
    /// Each ztunnel's open files, less those of the pooled HBONE
    /// connections between the nodes (kept on purpose until idle for
    /// `--pool-idle-timeout`; one descriptor at each end).
    fn files_not_pooled(&self, pids: &[u32]) -> Vec<i64> {
        let client_node = &self.lab.state().nodes[0];
        let pooled = kanava_lab::propagation::config_dump(&client_node.netns)
            .and_then(|dump| dump["pooledConnections"].as_u64())
            .unwrap_or(0) as i64;
        pids.iter()
            .map(|&pid| open_files(pid) as i64 - pooled)
            .collect()
    }
}

impl MeshBench {
    /// `count` connections from the mesh client to the mesh server's echo.
    pub(crate) fn hold(&self, count: usize) -> anyhow::Result<Vec<TcpStream>> {
        let server = self.server(Mode::Mesh, SERVER_PORT)?;
        let netns = kanava_netns::NetNs::named(&self.lab.netns(&Self::client(Mode::Mesh))?)?;
        Ok(netns.run(move || -> std::io::Result<Vec<TcpStream>> {
            (0..count)
                .map(|_| TcpStream::connect_timeout(&server, Duration::from_secs(10)))
                .collect()
        })??)
    }

    /// `labapp churn` from the mesh client to the mesh server's echo:
    /// `rate` new connections a second for `seconds`; its JSON report.
    pub(crate) fn paced_churn(
        &self,
        rate: u32,
        seconds: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let server = self.server(Mode::Mesh, SERVER_PORT)?.to_string();
        self.run_json(
            Mode::Mesh,
            &Self::client(Mode::Mesh),
            &[
                "labapp",
                "churn",
                "--to",
                &server,
                "--concurrency",
                "16",
                "--seconds",
                &seconds.as_secs_f64().to_string(),
                "--rate",
                &rate.to_string(),
            ],
        )
    }
}

/// How many of the held connections no longer echo a byte.
pub(crate) fn broken(held: &mut [TcpStream]) -> usize {
    held.iter_mut()
        .filter_map(|stream| {
            let alive = stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .and_then(|()| stream.write_all(b"?"))
                .and_then(|()| {
                    let mut byte = [0u8];
                    stream.read_exact(&mut byte)
                })
                .is_ok();
            (!alive).then_some(())
        })
        .count()
}

impl MeshBench {
    pub fn soak(&self, settings: &SoakSettings, collector: &mut Collector) -> anyhow::Result<()> {
        let pids = self.ztunnel_pids(Mode::Mesh);
        let files_before = self.files_not_pooled(&pids);
        let mut peak_rss = vec![0.0f64; pids.len()];
        let sample = |peak: &mut Vec<f64>| {
            for (peak, &pid) in peak.iter_mut().zip(&pids) {
                if let Some(rss) = procfs::rss_mib(pid) {
                    *peak = peak.max(rss);
                }
            }
        };

        // Hold.
        let count = settings.hold;
        let mut held = self.hold(count)?;
        eprintln!(
            "soak: holding {count} connections for {:?}",
            settings.hold_for
        );
        let until = Instant::now() + settings.hold_for;
        while Instant::now() < until {
            sample(&mut peak_rss);
            std::thread::sleep(settings.sample_every.min(until - Instant::now()));
        }
        let broken = broken(&mut held);
        drop(held);
        collector.measure(
            "soak",
            &format!("held connections broken after {:?}", settings.hold_for),
            "connections",
            Better::Lower,
            Some(goals::NONE_FAILED),
            broken as f64,
        );

        // Churn, sampled while it runs.
        eprintln!(
            "soak: {} new connections a second for {:?}",
            settings.rate, settings.churn_for
        );
        let churn = std::thread::scope(|scope| {
            let run = scope.spawn(|| self.paced_churn(settings.rate, settings.churn_for));
            while !run.is_finished() {
                sample(&mut peak_rss);
                std::thread::sleep(settings.sample_every);
            }
            run.join()
        })
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
        let errors = churn["errors"].as_u64().context("churn: no errors count")?;
        let made = churn["per_second"]
            .as_f64()
            .context("churn: no per_second")?;
        collector.measure(
            "soak",
            &format!(
                "failed connections at {}/s for {:?}",
                settings.rate, settings.churn_for
            ),
            "connections",
            Better::Lower,
            Some(goals::NONE_FAILED),
            errors as f64,
        );
        collector.measure(
            "soak",
            "new connections per second achieved",
            "conn/s",
            Better::Higher,
            None,
            made,
        );

        // After: every descriptor back.
        let deadline = Instant::now() + Duration::from_secs(120);
        let files_after = loop {
            let now = self.files_not_pooled(&pids);
            if now.iter().zip(&files_before).all(|(a, b)| a <= b) || Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        for (((side, before), after), peak) in ["client", "server"]
            .iter()
            .zip(&files_before)
            .zip(&files_after)
            .zip(&peak_rss)
        {
            collector.measure(
                "soak",
                &format!("{side} ztunnel peak RSS"),
                "MiB",
                Better::Lower,
                None,
                *peak,
            );
            collector.measure(
                "soak",
                &format!("{side} ztunnel open files after (less pooled HBONE), more than before"),
                "files",
                Better::Lower,
                Some(goals::NONE_FAILED),
                *after as f64 - *before as f64,
            );
        }
        if broken > 0 || errors > 0 {
            bail!("soak: {broken} held connections broke, {errors} new connections failed");
        }
        Ok(())
    }
}
