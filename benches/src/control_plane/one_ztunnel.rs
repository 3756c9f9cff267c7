//! A real ztunnel beside the load generator's streams: how long until it is
//! ready, and its memory then.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Running, Settings};
use crate::goals;
use crate::procfs;
use crate::stats::{Better, Collector};

/// A real ztunnel process on a node without pods (loopback only: its
/// admin ports, and no pod to capture), subscribed to the control plane
/// while the cluster's streams are connected: how long until it holds the
/// whole cluster (ready), and its memory then.
pub(super) async fn ztunnel_holding_the_cluster(
    settings: &Settings,
    bins: &Path,
    dir: &Path,
    control_plane: SocketAddr,
    node: &str,
    token: &str,
    collector: &mut Collector,
) -> anyhow::Result<()> {
    let scenario = &settings.scenario();
    let state = dir.join("ztunnel");
    std::fs::create_dir_all(state.join("pods"))?;
    std::fs::create_dir_all(state.join("netns"))?;
    std::fs::write(state.join("token"), token)?;
    let free_port = || -> anyhow::Result<String> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .to_string())
    };
    let readiness = free_port()?;
    let started = Instant::now();
    let child = Command::new(bins.join("ztunnel"))
        .env("KANAVA_NODE_NAME", node)
        .env("KANAVA_CONTROL_PLANE_ADDRESS", control_plane.to_string())
        .env("KANAVA_CA_ROOT_FILE", dir.join("ca").join("root-cert.pem"))
        .env("KANAVA_NODE_TOKEN_FILE", state.join("token"))
        .env("KANAVA_HANDOFF_SOCKET", state.join("ztunnel.sock"))
        .env("KANAVA_UPGRADE_SOCKET", state.join("upgrade.sock"))
        .env("KANAVA_POD_RECORDS_DIR", state.join("pods"))
        .env("KANAVA_NETNS_DIR", state.join("netns"))
        .env("KANAVA_ADMIN_ADDRESS", free_port()?)
        .env("KANAVA_METRICS_ADDRESS", free_port()?)
        .env("KANAVA_READINESS_ADDRESS", &readiness)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start ztunnel")?;
    let mut ztunnel = Running(child);
    let pid = ztunnel.0.id();
    loop {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the ztunnel was not ready within 300 s");
        }
        if let Some(status) = ztunnel.0.try_wait()? {
            bail!("the ztunnel exited ({status}) before it was ready; its log is above");
        }
        if let Ok(Some(_)) = ztunnel_ready(&readiness).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    collector.measure(
        scenario,
        "a ztunnel's start until ready",
        "ms",
        Better::Lower,
        None,
        started.elapsed().as_secs_f64() * 1000.0,
    );
    // Let the snapshot's buffers go before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Some(rss) = procfs::rss_mib(pid) {
        collector.measure(
            scenario,
            "a ztunnel's RSS once ready",
            "MiB",
            Better::Lower,
            goals::at_largest(settings.pods, goals::SCALE_ZTUNNEL_RSS),
            rss,
        );
    }
    Ok(())
}

/// `Some` once the ztunnel's readiness endpoint answers 200 (a one-line
/// HTTP/1.0 GET, as the lab's clients ask it).
async fn ztunnel_ready(address: &str) -> std::io::Result<Option<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /healthz/ready HTTP/1.0\r\nHost: ztunnel\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(2), ask).await {
        Ok(answer) => Ok(answer?
            .split(|&b| b == b' ')
            .nth(1)
            .filter(|code| *code == b"200")
            .map(|_| ())),
        Err(_) => Ok(None),
    }
}
