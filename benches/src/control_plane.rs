//! The control plane at scale: a real `kanava-control-plane` process on
//! loopback, fed a manifest directory of M pods and S services, with N
//! discovery streams opened by a load generator that acts as N ztunnels.
//!
//! Measured: the time until every stream holds the full snapshot, the delay
//! from a pod change (its manifest rewritten) until every stream has it, and
//! the control plane's memory and CPU.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kanava_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::goals;
use crate::procfs;
use crate::stats::{Better, Collector};

#[derive(Clone, Debug)]
pub struct Settings {
    pub pods: usize,
    pub services: usize,
    pub streams: usize,
    pub changes: usize,
}

impl Settings {
    pub fn full() -> Self {
        Settings {
            pods: 10_000,
            services: 1_000,
            streams: 100,
            changes: 20,
        }
    }

    pub fn quick() -> Self {
        Settings {
            pods: 500,
            services: 50,
            streams: 10,
            changes: 3,
        }
    }
}

const NAMESPACES: usize = 20;

fn pod_manifest(i: usize, nodes: usize, extra_label: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: ns-{ns}\n  uid: uid-{i}\n  resourceVersion: \"1\"\n  labels: {{app: app-{app}{extra_label}}}\nspec:\n  nodeName: node-{node}\n  serviceAccountName: sa-{app}\n  containers: [{{name: c, image: app}}]\nstatus:\n  phase: Running\n  podIP: 10.{a}.{b}.{c}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
        ns = i % NAMESPACES,
        app = i % 200,
        node = i % nodes,
        a = 10 + i / 65536,
        b = (i / 256) % 256,
        c = i % 256,
    )
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
            pod_manifest(i, settings.streams, ""),
        )?;
    }
    for i in 0..settings.services {
        std::fs::write(
            dir.join(format!("service_{i}.yaml")),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\nspec:\n  clusterIP: 10.96.{b}.{c}\n  selector: {{app: app-{app}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n",
                ns = i % NAMESPACES,
                app = i % 200,
                b = i / 256,
                c = i % 256,
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

pub async fn run(
    settings: &Settings,
    bins: &Path,
    collector: &mut Collector,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    let ca = dir.path().join("ca");
    std::fs::create_dir_all(&manifests)?;
    write_cluster(&manifests, settings)?;
    let tokens: Vec<String> = (0..settings.streams)
        .map(|i| format!("token-for-node-{i}-0123456789"))
        .collect();
    let tokens_file = dir.path().join("tokens");
    std::fs::write(
        &tokens_file,
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!("node-{i} {t}\n"))
            .collect::<String>(),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
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
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the control plane did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let roots = kanava_tls::TrustBundle::new(kanava_tls::MeshRoots::from_pem(&std::fs::read(
        ca.join("root-cert.pem"),
    )?)?)?;
    let cpu_start = procfs::cpu_seconds(pid).unwrap_or(0.0);

    // Open every stream at once, as ztunnels reconnecting after a restart.
    let expected = settings.pods + settings.services;
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(usize, Option<usize>, Instant)>();
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for (node, token) in tokens.iter().enumerate() {
        let channel = kanava_ztunnel::control_plane::channel(
            &address.to_string(),
            kanava_mesh::names::CONTROL_PLANE_SERVER_NAME,
            &roots,
            Duration::from_secs(10),
        )?;
        let token = token.clone();
        let arrivals = arrivals.clone();
        let changes = settings.changes;
        tasks.push(tokio::spawn(async move {
            follow(channel, node, token, expected, changes, arrivals).await
        }));
    }
    drop(arrivals);
    let mut snapshot_times = Vec::new();
    while snapshot_times.len() < settings.streams {
        match tokio::time::timeout(Duration::from_secs(120), arrived.recv()).await {
            Ok(Some((_, None, at))) => snapshot_times.push(at.duration_since(opened)),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!(
                "only {} of {} streams got the snapshot",
                snapshot_times.len(),
                settings.streams
            ),
        }
    }
    let all = snapshot_times.iter().max().copied().unwrap_or_default();
    collector.measure(
        "control plane",
        "full snapshot to every stream",
        "ms",
        Better::Lower,
        Some(goals::SNAPSHOT_TO_EVERY_STREAM),
        all.as_secs_f64() * 1000.0,
    );

    // One pod at a time changes; every stream must see each change.
    let mut delays = Vec::new();
    for change in 0..settings.changes {
        let path = manifests.join(format!("pod_{change}.yaml"));
        let text = pod_manifest(change, settings.streams, &format!(", changed: c{change}"));
        let tmp = manifests.join(format!(".pod_{change}.tmp"));
        std::fs::write(&tmp, text)?;
        let written = Instant::now();
        std::fs::rename(&tmp, &path)?;
        let mut seen = 0;
        while seen < settings.streams {
            match tokio::time::timeout(Duration::from_secs(30), arrived.recv()).await {
                Ok(Some((_, Some(c), at))) if c == change => {
                    delays.push(at.duration_since(written).as_secs_f64() * 1000.0);
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
    delays.sort_by(f64::total_cmp);
    let at =
        |q: f64| delays[((delays.len() as f64 * q).ceil() as usize).clamp(1, delays.len()) - 1];
    collector.measure(
        "control plane",
        "one pod change to every stream p50",
        "ms",
        Better::Lower,
        None,
        at(0.5),
    );
    collector.measure(
        "control plane",
        "one pod change to every stream p99",
        "ms",
        Better::Lower,
        Some(goals::POD_CHANGE_TO_EVERY_STREAM_P99),
        at(0.99),
    );
    if let Some(rss) = procfs::rss_mib(pid) {
        collector.measure(
            "control plane",
            "RSS",
            "MiB",
            Better::Lower,
            Some(goals::CONTROL_PLANE_RSS),
            rss,
        );
    }
    if let Some(cpu) = procfs::cpu_seconds(pid) {
        collector.measure(
            "control plane",
            "CPU during the run",
            "s",
            Better::Lower,
            None,
            cpu - cpu_start,
        );
    }
    for task in tasks {
        task.abort();
    }
    drop(control_plane);
    Ok(())
}

/// A `DiscoveryResponse` read without decoding its resources: the load
/// generator acts as a hundred ztunnels on the same machine as the control
/// plane, and decoding every resource a hundred times over would measure the
/// generator instead. Field numbers and wire types match the real message.
#[derive(Clone, PartialEq, prost::Message)]
struct ShallowResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(string, tag = "2")]
    nonce: String,
    #[prost(bool, tag = "3")]
    full_snapshot: bool,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    resources: Vec<bytes::Bytes>,
    #[prost(bool, tag = "6")]
    more: bool,
}

/// The name of a `Resource`, skipping its content.
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceName {
    #[prost(string, tag = "1")]
    name: String,
}

/// Acts as one ztunnel: subscribes, ACKs, and reports when the snapshot
/// (change `None`) and each changed pod (change `Some(i)`) arrive.
async fn follow(
    channel: tonic::transport::Channel,
    node: usize,
    token: String,
    expected: usize,
    changes: usize,
    arrivals: mpsc::UnboundedSender<(usize, Option<usize>, Instant)>,
) -> anyhow::Result<()> {
    use prost::Message;
    let (requests, rx) = mpsc::channel(16);
    requests
        .send(pb::DiscoveryRequest {
            node_name: format!("node-{node}"),
            ..Default::default()
        })
        .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<pb::DiscoveryRequest, ShallowResponse>::default();
    let mut responses = grpc
        .streaming(
            request,
            http::uri::PathAndQuery::from_static("/kanava.v1.Discovery/Stream"),
            codec,
        )
        .await?
        .into_inner();
    let mut holding = 0;
    while let Some(response) = responses.message().await? {
        let at = Instant::now();
        if response.full_snapshot {
            holding += response.resources.len();
            if !response.more && holding >= expected {
                let _ = arrivals.send((node, None, at));
            }
        } else {
            for resource in &response.resources {
                let name = ResourceName::decode(resource.clone())?.name;
                if let Some(change) = name
                    .strip_prefix("workload/uid-")
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|&i| i < changes)
                {
                    let _ = arrivals.send((node, Some(change), at));
                }
            }
        }
        let _ = requests
            .send(pb::DiscoveryRequest {
                response_nonce: response.nonce,
                version_info: response.version_info,
                ..Default::default()
            })
            .await;
    }
    Ok(())
}
