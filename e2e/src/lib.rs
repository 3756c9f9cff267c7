//! Support for the end-to-end tests in `tests/`: labs with unique names,
//! connections from inside pods, packet captures on the fabric, metrics,
//! and mesh credentials for hand-made clients.
//!
//! Every test builds its own lab (named `e<pid>-<n>`) and the lab is torn
//! down when the test's `Lab` is dropped, also when the test panics.
//! The tests need root. They are not skipped without it: they fail, saying
//! so, because a skipped security test reads like a passing one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kanava_lab::{Lab, LabSpec, UpOptions};

/// A two-node lab used by most tests.
///
/// - `shop` (enrolled): `client` and `local-web` on node-1; `web`, `echo`,
///   `sink` on node-2.
/// - `legacy` (not enrolled): `plain-client` on node-1, `plain-web` and
///   `plain-sink` on node-2.
pub const MESH_LAB: &str = r#"
kind: Lab
nodes: 2
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {kanava.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{name: c, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: local-web, namespace: shop}
spec:
  nodeName: node-1
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: echo
  containers:
  - {name: c, command: [labapp, echo, --port, "7000"], readinessProbe: {tcpSocket: {port: 7000}}}
---
apiVersion: v1
kind: Pod
metadata: {name: sink, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: sink
  containers:
  - {name: c, command: [labapp, sink, --port, "9000"], readinessProbe: {tcpSocket: {port: 9000}}}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-client, namespace: legacy}
spec:
  nodeName: node-1
  containers: [{name: c, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain-web, namespace: legacy}
spec:
  nodeName: node-2
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-sink, namespace: legacy}
spec:
  nodeName: node-2
  containers:
  - {name: c, command: [labapp, sink, --port, "9000"], readinessProbe: {tcpSocket: {port: 9000}}}
"#;

/// Kills the lab's control plane, its supervisor first (or it would start
/// it again at once); returns the control plane's pid. It stays down until
/// `Lab::restart_control_plane`.
pub fn kill_control_plane(lab: &Lab) -> u32 {
    let control_plane = lab.state().control_plane.clone();
    let pid = control_plane.pid.unwrap();
    for victim in [control_plane.supervisor.unwrap(), pid] {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(victim as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
    }
    pid
}

/// Fails the test unless it runs as root.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "THE END-TO-END TESTS NEED ROOT: they build network namespaces, veth \
         links and iptables rules. Run them as root (CI does); they are not skipped."
    );
}

/// A lab name no other test or run uses.
pub fn unique_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "e{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Brings up a lab from `yaml` (defaults: 2 nodes).
pub fn up(yaml: &str) -> Lab {
    up_with_ztunnel_args(yaml, &[])
}

/// Brings up a lab whose ztunnels run with extra flags.
pub fn up_with_ztunnel_args(yaml: &str, args: &[&str]) -> Lab {
    require_root();
    let spec = LabSpec::parse(yaml, 2).expect("lab file");
    let mut options = UpOptions::named(unique_name());
    options.ztunnel_args = args.iter().map(ToString::to_string).collect();
    Lab::up(&spec, &options).unwrap_or_else(|e| panic!("lab up failed: {e}"))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The pod's primary address (`status.podIP`).
pub fn pod_ip(lab: &Lab, pod: &str) -> IpAddr {
    lab.pod(pod).unwrap().ip().unwrap()
}

/// `http://<ip>:<port><path>`, with IPv6 addresses in brackets.
pub fn url(ip: IpAddr, port: u16, path: &str) -> String {
    format!("http://{}{path}", SocketAddr::new(ip, port))
}

/// A TCP connection made from inside a pod's (or node's) namespace.
pub async fn connect(lab: &Lab, from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let stream = lab
        .connect(from, to, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect from {from} to {to}: {e}"));
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Polls `done` until it holds; fails the test after 20 s, naming `what`.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The TCP ports listening in a pod's namespace.
pub fn listening_ports(lab: &Lab, pod: &str) -> Vec<u16> {
    exec_ok(lab, pod, &["ss", "-Hltn"])
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next())
        .filter_map(|port| port.parse().ok())
        .collect()
}

/// Runs a command in a target's namespace; panics unless it succeeds.
pub fn exec_ok(lab: &Lab, target: &str, argv: &[&str]) -> String {
    let output = lab.exec(target, argv).unwrap();
    assert!(
        output.status.success(),
        "{argv:?} in {target} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The value of a metric (summed over its label sets) of a node's ztunnel.
pub fn metric(lab: &Lab, node: &str, name: &str) -> f64 {
    let text = exec_ok(
        lab,
        &format!("node/{node}"),
        &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
    );
    sum_of(&text, name, "")
}

/// The value of a control plane metric: the sum over the label sets that
/// contain `labels` (e.g. `result="signed"`; empty for all).
pub fn control_plane_metric(lab: &Lab, name: &str, labels: &str) -> f64 {
    let url = url(
        lab.state().control_plane_address().ip(),
        kanava_mesh::ports::CONTROL_PLANE_READINESS,
        "/metrics",
    );
    let text = exec_ok(lab, "fabric", &["curl", "-sf", &url]);
    sum_of(&text, name, labels)
}

fn sum_of(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split(['{', ' '])
                .next()
                .is_some_and(|metric| metric == name)
        })
        .filter(|line| line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next())
        .filter_map(|value| value.parse::<f64>().ok())
        .sum()
}

/// The path of the `kanava` binary beside the other binaries.
pub fn kanava_binary() -> PathBuf {
    let dir = kanava_lab::bin_dir(None).expect("binaries built");
    let path = dir.join("kanava");
    assert!(
        path.is_file(),
        "{} missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// `kanava` with a lab root shared with this process.
pub fn kanava() -> Command {
    Command::new(kanava_binary())
}

pub use kanava_lab::capture::{Packet, contains};

/// tcpdump on the fabric bridge (see [`kanava_lab::capture`]), failing the
/// test on any problem.
pub struct Capture(kanava_lab::capture::Capture);

impl Capture {
    /// Starts capturing every TCP packet crossing the lab's underlay.
    pub fn start(lab: &Lab) -> Capture {
        Capture(kanava_lab::capture::Capture::start(lab).expect("tcpdump captures"))
    }

    /// Stops tcpdump and returns the TCP packets it saw (all of them).
    pub fn stop(self) -> Vec<Packet> {
        self.0.stop().expect("a complete capture")
    }
}

/// A workload certificate for `identity`, signed by the lab's CA, as a
/// hand-made mesh client would hold.
pub fn mesh_cert(lab: &Lab, identity: &kanava_mesh::Identity) -> kanava_tls::WorkloadCert {
    let ca =
        kanava_control_plane::ca::files::load_or_create(&lab.ca_dir(), "cluster.local").unwrap();
    let request = kanava_tls::CertificateRequest::generate(identity).unwrap();
    let issued = ca
        .sign_workload(request.csr_der(), identity, Duration::from_secs(600))
        .unwrap();
    request.into_cert(&issued.chain_pem).unwrap()
}

/// The lab's mesh root.
pub fn mesh_roots(lab: &Lab) -> kanava_tls::MeshRoots {
    kanava_lab::clients::mesh_roots(lab).unwrap()
}

/// An HTTP GET from inside `from` to `to` over a fresh connection: the
/// response body, or why there was none (refused, reset, timed out).
pub async fn http_get(lab: &Lab, from: &str, to: SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = lab
        .connect(from, to, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
    let exchange = async {
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&response).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") => Ok(body.to_string()),
            _ => Err(format!("no HTTP response ({} bytes)", response.len())),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A gRPC channel to the lab's control plane, from the fabric namespace,
/// over TLS verified against the mesh root, as a ztunnel would open it.
pub async fn control_plane_channel(lab: &Lab) -> tonic::transport::Channel {
    kanava_lab::clients::control_plane_channel(lab, "fabric")
        .await
        .unwrap()
}

/// Wraps `message` in a request carrying `node`'s credential.
pub fn as_node<T>(lab: &Lab, node: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let token = lab.node_token(node).unwrap();
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Runs `kanava verify --output json` on the lab: every check, each of
/// which must have passed (skipped ones have `passed: null`), and whether the
/// command succeeded.
pub fn verify_report(lab: &Lab) -> (Vec<serde_json::Value>, bool) {
    let output = kanava()
        .args(["verify", "--name", lab.name(), "--output", "json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let checks = report.as_array().expect("a list of checks").clone();
    (checks, output.status.success())
}

/// `labapp udp-send` from `from` to a UDP echo server: whether any of
/// `count` datagrams was answered (waiting 300 ms for each).
pub fn udp_answered(lab: &Lab, from: &str, to: SocketAddr, count: u32) -> bool {
    let (to, count) = (to.to_string(), count.to_string());
    lab.exec(
        from,
        &[
            "labapp", "udp-send", "--to", &to, "--count", &count, "--wait", "300ms",
        ],
    )
    .unwrap()
    .status
    .success()
}

/// Applies manifests to a lab; panics on refusal.
pub fn apply(lab: &mut Lab, yaml: &str) -> kanava_lab::Report {
    lab.apply(yaml)
        .unwrap_or_else(|e| panic!("apply failed: {e}\n{yaml}"))
}

/// Deletes manifests from a lab; panics on refusal.
pub fn delete(lab: &mut Lab, yaml: &str) -> kanava_lab::Report {
    lab.delete(yaml)
        .unwrap_or_else(|e| panic!("delete failed: {e}\n{yaml}"))
}

/// The first line of `target`'s log that satisfies `matches`, waiting up to
/// 5 s for it: a connection's access-log line is written when the proxy is
/// done with it, which can be just after the client saw the end.
pub fn log_line(lab: &Lab, target: &str, matches: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = lab.logs(target).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| matches(l)) {
            return line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no matching line in the log of {target}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends pseudo-random chunks to an echo server until `stop`, reading each
/// back; returns the SHA-256 of what was sent and of what came back, and
/// the bytes sent. A connection held through an upgrade or a rotation.
pub async fn hold(
    mut tcp: tokio::net::TcpStream,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> ([u8; 32], [u8; 32], u64) {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut sent, mut received) = (Sha256::new(), Sha256::new());
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut total = 0u64;
    while !stop.load(Ordering::SeqCst) {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 1 + (state >> 33) as usize % 2048;
        let chunk: Vec<u8> = (0..len)
            .map(|i| (state >> (i % 56)) as u8 ^ i as u8)
            .collect();
        tcp.write_all(&chunk)
            .await
            .expect("write on a held connection");
        sent.update(&chunk);
        let mut back = vec![0; len];
        tokio::time::timeout(Duration::from_secs(20), tcp.read_exact(&mut back))
            .await
            .expect("echo within 20 s")
            .expect("read on a held connection");
        received.update(&back);
        total += len as u64;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tcp.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.expect("clean end");
    assert!(rest.is_empty(), "no byte after the last echo");
    (sent.finalize().into(), received.finalize().into(), total)
}

/// Opens `rate` new connections a second from `from` to the echo server at
/// `to` for `seconds` (`labapp churn`, in a thread); joins to its JSON
/// summary (`connections`, `errors`).
pub fn churn(
    lab: &Lab,
    from: &str,
    to: SocketAddr,
    seconds: u32,
    rate: u32,
    concurrency: u32,
) -> std::thread::JoinHandle<serde_json::Value> {
    let (name, from, to) = (lab.name().to_string(), from.to_string(), to.to_string());
    std::thread::spawn(move || {
        let lab = Lab::attach(Some(&name)).unwrap();
        let (seconds, rate, concurrency) = (
            seconds.to_string(),
            rate.to_string(),
            concurrency.to_string(),
        );
        let output = lab
            .exec(
                &from,
                &[
                    "labapp",
                    "churn",
                    "--to",
                    &to,
                    "--concurrency",
                    &concurrency,
                    "--seconds",
                    &seconds,
                    "--rate",
                    &rate,
                ],
            )
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    })
}

/// A TLS connection to the echo pod's HBONE port (15008) from a pod outside
/// the mesh (whose sockets reach it directly), proving `cert` and trusting
/// `roots`: what a hand-made HBONE client holds before its HTTP/2
/// handshake.
pub async fn tls_to_echo_hbone(
    lab: &Lab,
    cert: &kanava_tls::WorkloadCert,
    roots: &kanava_tls::MeshRoots,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let echo_identity: kanava_mesh::Identity = "spiffe://cluster.local/ns/shop/sa/echo"
        .parse()
        .map_err(std::io::Error::other)?;
    let tls = kanava_tls::hbone_client_config(cert, roots, &echo_identity)
        .map_err(std::io::Error::other)?;
    let echo_ip = pod_ip(lab, "shop/echo");
    let tcp = connect(
        lab,
        "legacy/plain-client",
        SocketAddr::from((echo_ip, 15008)),
    )
    .await;
    let server_name = kanava_tls::pki_types::ServerName::IpAddress(echo_ip.into());
    tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
}
