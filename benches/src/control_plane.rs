//! The control plane at scale: a real `kanava-control-plane` process on
//! loopback, fed a manifest directory of a cluster (apps of five pods over
//! namespaces and nodes, a Service per app, so at a fifth of the pods, and
//! policies at a fiftieth), with N
//! discovery streams opened by a load generator that acts as N ztunnels,
//! each acknowledging every response. The same scenario runs at several
//! sizes, so that the report shows how each figure grows with the cluster.
//!
//! Measured at each size: the time until every stream holds the full
//! snapshot; the delay from a pod change (its manifest rewritten) until
//! every stream has it, and the bytes that change costs one stream; a
//! Deployment's rollout (new pods created, as many old ones removed) until
//! every stream has every new pod; the control plane's memory and CPU.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;

use crate::goals;
use crate::procfs;
use crate::stats::{Better, Collector};

mod one_ztunnel;
mod status_churn;
mod streams;

use one_ztunnel::ztunnel_holding_the_cluster;
use status_churn::{pod_status_churn, sent_bytes};
use streams::{Follower, follow, learn_round_trips};

/// One size of cluster and of its fleet of ztunnels.
#[derive(Clone, Debug)]
pub struct Settings {
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
    /// Nodes the pods are spread over; the first `streams` of them
    /// subscribe.
    pub nodes: usize,
    pub streams: usize,
    /// Pod changes, one after another, each timed to every stream.
    pub changes: usize,
    /// Pods of the rollout (as many created as removed).
    pub rollout: usize,
    /// Kubelet status updates that change nothing the mesh uses.
    pub status_updates: usize,
}

impl Settings {
    /// A cluster of `pods` pods on 1,000 nodes, `streams` of them
    /// subscribed: Services at a fifth of the pods, policies at a fiftieth.
    fn cluster(pods: usize, streams: usize) -> Self {
        Settings {
            pods,
            services: pods / 5,
            policies: pods / 50,
            nodes: 1000.max(streams),
            streams,
            changes: 20,
            rollout: 100,
            status_updates: 5000.min(pods / 2),
        }
    }

    /// The sizes of a full run: 10k, 30k and 100k pods with 100, 300 and
    /// 1,000 streams. `largest` stops the ladder early (a smaller machine).
    pub fn full(largest: usize) -> Vec<Self> {
        [(10_000, 100), (30_000, 300), (100_000, 1000)]
            .into_iter()
            .filter(|&(pods, _)| pods <= largest)
            .map(|(pods, streams)| Settings::cluster(pods, streams))
            .collect()
    }

    /// Two small sizes: the scenario and the growth table, quickly.
    pub fn quick() -> Vec<Self> {
        [(500, 10), (1000, 20)]
            .into_iter()
            .map(|(pods, streams)| Settings {
                nodes: 50,
                changes: 3,
                rollout: 10,
                status_updates: 100,
                ..Settings::cluster(pods, streams)
            })
            .collect()
    }

    /// How the report names this size.
    pub fn scenario(&self) -> String {
        format!(
            "control plane, {} pods, {} streams",
            thousands(self.pods),
            thousands(self.streams)
        )
    }

    /// The targets hold at the largest size; the earlier ones at
    /// 10,000 pods.
    fn goals(&self) -> Goals {
        if self.pods >= 100_000 {
            Goals {
                snapshot: Some(goals::SCALE_SNAPSHOT_TO_EVERY_STREAM),
                snapshot_bytes: Some(goals::SCALE_SNAPSHOT_BYTES),
                change_p99: Some(goals::SCALE_POD_CHANGE_TO_EVERY_STREAM_P99),
                rss: Some(goals::SCALE_CONTROL_PLANE_RSS),
            }
        } else if self.pods == 10_000 {
            Goals {
                snapshot: Some(goals::SNAPSHOT_TO_EVERY_STREAM),
                snapshot_bytes: None,
                change_p99: Some(goals::POD_CHANGE_TO_EVERY_STREAM_P99),
                rss: Some(goals::CONTROL_PLANE_RSS),
            }
        } else {
            Goals::default()
        }
    }
}

#[derive(Default)]
struct Goals {
    snapshot: Option<goals::MeasurementGoal>,
    snapshot_bytes: Option<goals::MeasurementGoal>,
    change_p99: Option<goals::MeasurementGoal>,
    rss: Option<goals::MeasurementGoal>,
}

/// 100000 as "100k", 1000 as "1,000", 500 as "500".
fn thousands(n: usize) -> String {
    if n >= 10_000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else if n >= 1000 {
        format!("{},{:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}

const NAMESPACES: usize = 50;

/// An IPv4 address for the `i`-th pod (up to 16 million of them).
fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 10 + i / 65536, (i / 256) % 256, i % 256)
}

/// Pods of one app (a Deployment's replicas): a Service selects one app.
const REPLICAS: usize = 5;

/// The namespace of an app's pods and its Service.
fn namespace_of(app: usize) -> usize {
    app % NAMESPACES
}

/// 64 well-mixed bits from `seed` (splitmix64): the names and uids of
/// the pods look random, as a cluster's do, and are the same every run.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uid of the pod at the `ip_index`-th address: a random (version 4)
/// UUID, as the API server gives, so that compression is judged on the
/// entropy a real cluster's snapshot carries.
fn pod_uid(ip_index: usize) -> String {
    let (a, b) = (mix(ip_index as u64), mix(!(ip_index as u64)));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        8 + (b >> 62),
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

/// `n` characters of the alphabet Kubernetes names generated parts with.
fn generated(seed: u64, n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut bits = mix(seed);
    (0..n)
        .map(|_| {
            let c = ALPHABET[(bits % ALPHABET.len() as u64) as usize];
            bits /= ALPHABET.len() as u64;
            c as char
        })
        .collect()
}

/// A pod of `app` (a Deployment's replica: `app-<n>-<template hash>-<5>`,
/// labelled with its app and template hash) at the `ip_index`-th address,
/// with the uid [`pod_uid`] gives that address.
fn pod_manifest(ip_index: usize, app: usize, node: usize, extra_label: &str) -> String {
    let template = generated(app as u64, 10);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app-{app}-{template}-{suffix}\n  namespace: ns-{ns}\n  uid: {uid}\n  resourceVersion: \"1\"\n  labels: {{app: app-{app}, pod-template-hash: {template}{extra_label}}}\nspec:\n  nodeName: node-{node}\n  serviceAccountName: sa-{app}\n  containers: [{{name: c, image: app}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
        suffix = generated(!(ip_index as u64), 5),
        ns = namespace_of(app),
        uid = pod_uid(ip_index),
        ip = pod_ip(ip_index),
    )
}

/// The `i`-th of the cluster's pods: app `i / 5`.
fn cluster_pod(i: usize, settings: &Settings, extra_label: &str) -> String {
    pod_manifest(i, i / REPLICAS, i % settings.nodes, extra_label)
}

/// The `i`-th pod of the rollout: it replaces the `i`-th cluster pod from
/// the end (same app, so the same Service), at an address after the
/// cluster's.
fn rollout_pod(i: usize, settings: &Settings) -> String {
    let replaced = settings.pods - 1 - i;
    pod_manifest(
        settings.pods + i,
        replaced / REPLICAS,
        (settings.pods + i) % settings.nodes,
        "",
    )
}

/// What the followers look for: the uids of the changed pods and of the
/// rollout's.
fn watched_uids(settings: &Settings) -> HashMap<String, Watched> {
    (0..=settings.changes)
        .map(|n| (pod_uid(n), Watched::Change(n)))
        .chain((0..settings.rollout).map(|n| (pod_uid(settings.pods + n), Watched::Rollout(n))))
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Watched {
    Change(usize),
    Rollout(usize),
}

fn write_cluster(dir: &Path, settings: &Settings) -> anyhow::Result<()> {
    for ns in 0..NAMESPACES {
        std::fs::write(
            dir.join(format!("namespace_{ns}.yaml")),
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{ns}\n  labels: {{kanava.io/dataplane-mode: ambient}}\n"
            ),
        )?;
    }
    for i in 0..settings.pods {
        std::fs::write(
            dir.join(format!("pod_{i}.yaml")),
            cluster_pod(i, settings, ""),
        )?;
    }
    for i in 0..settings.services {
        std::fs::write(
            dir.join(format!("service_{i}.yaml")),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\nspec:\n  clusterIP: 10.{a}.{b}.{c}\n  selector: {{app: app-{i}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n",
                ns = namespace_of(i),
                a = 96 + i / 65536,
                b = (i / 256) % 256,
                c = i % 256,
            ),
        )?;
    }
    for i in 0..settings.policies {
        // Every tenth app has a policy.
        let app = i * 10;
        std::fs::write(
            dir.join(format!("policy_{i}.yaml")),
            format!(
                "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{i}, namespace: ns-{ns}}}\nspec:\n  selector:\n    matchLabels: {{app: app-{app}}}\n  action: ALLOW\n  rules:\n  - from:\n    - principals: [\"cluster.local/ns/ns-{ns}/*\"]\n    to:\n    - ports: [8080]\n",
                ns = namespace_of(app),
            ),
        )?;
    }
    Ok(())
}

/// Kills the control plane when the benchmark is done with it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a subscriber saw, and when.
#[derive(Clone, Copy, Debug)]
enum Arrival {
    /// The whole snapshot, of this many bytes.
    Snapshot { bytes: usize },
    /// The `n`-th changed pod, in a response of this many bytes and
    /// resources.
    Change {
        n: usize,
        bytes: usize,
        resources: usize,
    },
    /// The `n`-th pod of the rollout.
    Rollout { n: usize },
}

/// Runs the scenario at every size, one control plane after another. A
/// size that fails does not stop the larger ones: its error is returned
/// with the others, and what was measured is kept.
pub async fn run_all(
    sizes: &[Settings],
    bins: &Path,
    collector: &mut Collector,
) -> Vec<anyhow::Error> {
    let mut failed = Vec::new();
    for settings in sizes {
        eprintln!("control plane: {settings:?}");
        if let Err(error) = run(settings, bins, collector).await {
            let error = error.context(settings.scenario());
            eprintln!("{error:#}");
            failed.push(error);
        }
    }
    failed
}

async fn run(settings: &Settings, bins: &Path, collector: &mut Collector) -> anyhow::Result<()> {
    let scenario = settings.scenario();
    let goals = settings.goals();
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    let ca = dir.path().join("ca");
    std::fs::create_dir_all(&manifests)?;
    write_cluster(&manifests, settings)?;
    let tokens: Vec<String> = (0..settings.streams)
        .map(|i| format!("token-for-node-{i}-0123456789"))
        .collect();
    let tokens_file = dir.path().join("tokens");
    // One more node, with no pods, for a real ztunnel at the end.
    let ztunnel_node = format!("node-{}", settings.nodes);
    let ztunnel_token = format!("token-for-{ztunnel_node}-0123456789");
    std::fs::write(
        &tokens_file,
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!("node-{i} {t}\n"))
            .chain(std::iter::once(format!("{ztunnel_node} {ztunnel_token}\n")))
            .collect::<String>(),
    )?;
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let child = Command::new(bins.join("kanava-control-plane"))
        .args(["--manifest-dir"])
        .arg(&manifests)
        .args(["--ca-dir"])
        .arg(&ca)
        .args(["--node-tokens-file"])
        .arg(&tokens_file)
        .args([
            "--listen",
            &address.to_string(),
            "--server-ips",
            "127.0.0.1",
            "--readiness-listen",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start kanava-control-plane")?;
    let control_plane = Running(child);
    let pid = control_plane.0.id();
    let started = Instant::now();
    while !(ca.join("root-cert.pem").exists() && std::net::TcpStream::connect(address).is_ok()) {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the control plane did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let roots = kanava_tls::TrustBundle::new(kanava_tls::MeshRoots::from_pem(&std::fs::read(
        ca.join("root-cert.pem"),
    )?)?)?;
    let cpu_start = procfs::cpu_seconds(pid).unwrap_or(0.0);

    // Open every stream at once, as ztunnels reconnecting after a restart.
    let watched = Arc::new(watched_uids(settings));
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(usize, Arrival, Instant)>();
    let channel = || {
        kanava_ztunnel::control_plane::channel(
            &address.to_string(),
            kanava_mesh::names::CONTROL_PLANE_SERVER_NAME,
            &roots,
            Duration::from_secs(30),
        )
    };
    let subscribe = |node: usize, this_release: bool| -> anyhow::Result<_> {
        let channel = channel()?;
        let follower = Follower {
            node,
            token: tokens[node].clone(),
            watched: watched.clone(),
            this_release,
            arrivals: arrivals.clone(),
        };
        Ok(tokio::spawn(follow(channel, follower)))
    };
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for node in 0..settings.streams {
        tasks.push(subscribe(node, true)?);
    }
    let mut snapshot_times = Vec::new();
    let mut snapshot_bytes = 0;
    while snapshot_times.len() < settings.streams {
        match tokio::time::timeout(Duration::from_secs(300), arrived.recv()).await {
            Ok(Some((_, Arrival::Snapshot { bytes }, at))) => {
                snapshot_times.push(at.duration_since(opened));
                snapshot_bytes = snapshot_bytes.max(bytes);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let why = first_error(tasks).await;
                bail!(
                    "only {} of {} streams got the snapshot; {why}",
                    snapshot_times.len(),
                    settings.streams
                )
            }
        }
    }
    let all = snapshot_times.iter().max().copied().unwrap_or_default();
    collector.measure(
        &scenario,
        "full snapshot to every stream",
        "ms",
        Better::Lower,
        goals.snapshot,
        all.as_secs_f64() * 1000.0,
    );
    // The control plane's own share of the snapshot phase: the receivers
    // run on the same cores here, on their own nodes in a cluster.
    if let Some(cpu) = procfs::cpu_seconds(pid) {
        collector.measure(
            &scenario,
            "control plane CPU, full snapshot to every stream",
            "s",
            Better::Lower,
            None,
            cpu - cpu_start,
        );
    }
    let snapshot_sent = sent_bytes(metrics, "snapshot").await?;
    collector.measure(
        &scenario,
        "full snapshot, bytes to one stream",
        "MB",
        Better::Lower,
        goals.snapshot_bytes,
        snapshot_sent / settings.streams as f64 / 1e6,
    );
    collector.measure(
        &scenario,
        "full snapshot, bytes decoded by one stream",
        "MB",
        Better::Lower,
        None,
        snapshot_bytes as f64 / 1e6,
    );
    // A ztunnel of the previous release (it accepts no compression) beside
    // them: it is served the snapshot as it was.
    let earlier = subscribe(0, false)?;
    let asked = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(120), arrived.recv()).await {
            Ok(Some((_, Arrival::Snapshot { .. }, at))) => {
                collector.measure(
                    &scenario,
                    "full snapshot to a stream of the previous release (uncompressed), alone",
                    "ms",
                    Better::Lower,
                    None,
                    at.duration_since(asked).as_secs_f64() * 1000.0,
                );
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!("the stream of the previous release got no snapshot"),
        }
    }
    earlier.abort();
    collector.measure(
        &scenario,
        "full snapshot, bytes to a stream of the previous release (uncompressed)",
        "MB",
        Better::Lower,
        None,
        (sent_bytes(metrics, "snapshot").await? - snapshot_sent) / 1e6,
    );
    let mut round_trips = learn_round_trips(channel()?, &tokens[0], settings).await?;
    for (name, q, goal) in [
        ("p50", 0.5, None),
        (
            "p99",
            0.99,
            goals::at_largest(settings.pods, goals::SCALE_LEARN_P99),
        ),
    ] {
        collector.measure(
            &scenario,
            &format!("learning an address on demand (added to a first connection) {name}"),
            "us",
            Better::Lower,
            goal,
            quantile(&mut round_trips, q),
        );
    }
    drop(arrivals);

    // One pod at a time changes; every stream must see each change.
    let mut delays = Vec::new();
    let mut change_bytes = Vec::new();
    for change in 0..settings.changes {
        let path = manifests.join(format!("pod_{change}.yaml"));
        let text = cluster_pod(change, settings, &format!(", changed: c{change}"));
        let written = replace(&manifests, &path, &text)?;
        let mut seen = 0;
        while seen < settings.streams {
            match tokio::time::timeout(Duration::from_secs(60), arrived.recv()).await {
                Ok(Some((_, Arrival::Change { n, bytes, .. }, at))) if n == change => {
                    delays.push(at.duration_since(written).as_secs_f64() * 1000.0);
                    change_bytes.push(bytes as f64);
                    seen += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!(
                    "change {change} reached {seen} of {} streams",
                    settings.streams
                ),
            }
        }
    }
    collector.measure(
        &scenario,
        "one pod change to every stream p50",
        "ms",
        Better::Lower,
        None,
        quantile(&mut delays, 0.5),
    );
    collector.measure(
        &scenario,
        "one pod change to every stream p99",
        "ms",
        Better::Lower,
        goals.change_p99,
        quantile(&mut delays, 0.99),
    );
    collector.measure(
        &scenario,
        "bytes sent to one stream for one pod change (median)",
        "bytes",
        Better::Lower,
        None,
        quantile(&mut change_bytes, 0.5),
    );

    // A Deployment's rollout: its new pods appear as fast as they are
    // written, and as many old ones go; done when every stream has every
    // new pod.
    let rollout_started = Instant::now();
    for i in 0..settings.rollout {
        let path = manifests.join(format!("rollout_{i}.yaml"));
        replace(&manifests, &path, &rollout_pod(i, settings))?;
        let old = settings.pods - 1 - i;
        std::fs::remove_file(manifests.join(format!("pod_{old}.yaml")))?;
    }
    let mut missing: Vec<HashSet<usize>> = (0..settings.streams)
        .map(|_| (0..settings.rollout).collect())
        .collect();
    let mut streams_left = settings.streams;
    let mut rollout_done = Duration::ZERO;
    while streams_left > 0 {
        match tokio::time::timeout(Duration::from_secs(120), arrived.recv()).await {
            Ok(Some((node, Arrival::Rollout { n }, at))) => {
                if let Some(waiting) = missing.get_mut(node)
                    && waiting.remove(&n)
                    && waiting.is_empty()
                {
                    streams_left -= 1;
                    rollout_done = rollout_done.max(at.duration_since(rollout_started));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!(
                "the rollout reached every pod on {} of {} streams",
                settings.streams - streams_left,
                settings.streams
            ),
        }
    }
    collector.measure(
        &scenario,
        &format!("rollout of {} pods to every stream", settings.rollout),
        "ms",
        Better::Lower,
        None,
        rollout_done.as_secs_f64() * 1000.0,
    );
    pod_status_churn(
        settings,
        &manifests,
        metrics,
        &mut arrived,
        &scenario,
        collector,
    )
    .await?;
    if let Some(rss) = procfs::rss_mib(pid) {
        collector.measure(&scenario, "RSS", "MiB", Better::Lower, goals.rss, rss);
    }
    if let Some(cpu) = procfs::cpu_seconds(pid) {
        collector.measure(
            &scenario,
            "CPU during the run",
            "s",
            Better::Lower,
            None,
            cpu - cpu_start,
        );
    }
    ztunnel_holding_the_cluster(
        settings,
        bins,
        dir.path(),
        address,
        &ztunnel_node,
        &ztunnel_token,
        collector,
    )
    .await?;
    for task in tasks {
        task.abort();
    }
    drop(control_plane);
    Ok(())
}

/// Why the subscribers that ended did: the first error among them.
async fn first_error(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>) -> String {
    for task in tasks {
        if task.is_finished() {
            match task.await {
                Ok(Err(error)) => return format!("a stream failed: {error:#}"),
                Err(error) => return format!("a stream's task failed: {error}"),
                Ok(Ok(())) => {}
            }
        } else {
            task.abort();
        }
    }
    "no stream reported an error".into()
}

/// Writes a manifest whole (a rename, so the control plane never reads
/// half of it) and says when it was in place.
fn replace(dir: &Path, path: &Path, text: &str) -> anyhow::Result<Instant> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a manifest's file name")?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    let written = Instant::now();
    std::fs::rename(&tmp, path)?;
    Ok(written)
}

/// The `q` quantile of `samples` (sorted in place); 0 when there are none.
pub(crate) fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return 0.0;
    }
    let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}
