//! The data-path scenarios, on a two-node lab. The same pair of pods exists
//! twice — a client on node-1 and a server on node-2 — once in a namespace
//! outside the mesh (`direct`) and once enrolled (`mesh`), so every number
//! is taken both ways in the same run, alternating.
//!
//! In an A/B run (`--baseline`) a second lab of the same shape runs another
//! build's ztunnels; its `mesh` namespace is the third side of every
//! comparison, taking its turn within each repetition.
//!
//! With `--peer` another lab of the same shape leaves `mesh` out of
//! Kanava's mesh and hands its pods to another project's node proxy
//! instead (see [`Peer`]); it takes its turn the same way.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kanava_lab::{IpFamily, Lab, LabSpec, UpOptions};
use serde_json::Value;

use crate::goals;
use crate::procfs;
use crate::stats::{Better, Collector, Mode};

/// How long and how often.
#[derive(Clone, Debug)]
pub struct Settings {
    pub repetitions: usize,
    pub throughput_seconds: u64,
    pub pingpong_count: usize,
    pub paced_count: usize,
    pub churn_seconds: f64,
    pub idle_connections: usize,
}

impl Settings {
    pub fn full(repetitions: usize) -> Self {
        Settings {
            repetitions,
            throughput_seconds: 10,
            pingpong_count: 20_000,
            paced_count: 5_000,
            churn_seconds: 3.0,
            idle_connections: 10_000,
        }
    }

    pub fn quick() -> Self {
        Settings {
            repetitions: 1,
            throughput_seconds: 1,
            pingpong_count: 300,
            paced_count: 100,
            churn_seconds: 0.3,
            idle_connections: 100,
        }
    }
}

pub(crate) const SERVER_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;

/// The benchmark's lab: a client and a server pod in `direct` and in
/// `mesh`. `mesh` is enrolled in Kanava's mesh unless a peer takes it; a
/// peer's lab also holds `first_pods` spare client pods (`first-N`) from the
/// start, for the first-connection scenario (a peer learns its pods once).
fn lab_file(family: IpFamily, enrolled: bool, first_pods: usize) -> String {
    let labels = if enrolled {
        ", labels: {kanava.io/dataplane-mode: ambient}"
    } else {
        ""
    };
    let mut text = format!(
        "kind: Lab\nnodes: 2\nipFamilies: [{family}]\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: direct}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh{labels}}}\n",
    );
    for repetition in 0..first_pods {
        text.push_str(&first_pod(repetition, "mesh"));
    }
    for namespace in ["direct", "mesh"] {
        text.push_str(&format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {namespace}}}
spec: {{nodeName: node-1, serviceAccountName: client, containers: [{{name: c, command: [sleep, infinity]}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {namespace}}}
spec:
  nodeName: node-2
  serviceAccountName: server
  containers:
  - name: c
    command: [sh, -c, "iperf3 -s -p {IPERF_PORT} >/dev/null & exec labapp echo --port {SERVER_PORT}"]
    readinessProbe: {{tcpSocket: {{port: {SERVER_PORT}}}}}
"#
        ));
    }
    text
}

/// CPU seconds (in the proxy's code and in the kernel) and context switches
/// of a side's proxies.
#[derive(Clone, Copy, Debug, Default)]
struct ProxyCounters {
    user: f64,
    system: f64,
    switches: f64,
}

impl ProxyCounters {
    fn since(&self, before: &ProxyCounters) -> ProxyCounters {
        ProxyCounters {
            user: self.user - before.user,
            system: self.system - before.system,
            switches: self.switches - before.switches,
        }
    }

    fn add(&mut self, other: &ProxyCounters) {
        self.user += other.user;
        self.system += other.system;
        self.switches += other.switches;
    }
}

/// The nodes of the throughput scenario by their part in it, in node order:
/// the client pod (node 1) sends, the server pod (node 2) receives.
const NODE_PARTS: [&str; 2] = ["sending node", "receiving node"];

/// The client pod of the first-connection scenario's repetition.
fn first_pod(repetition: usize, namespace: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: first-{repetition}, namespace: {namespace}}}\nspec: {{nodeName: node-1, serviceAccountName: client, containers: [{{name: c, command: [sleep, infinity]}}]}}\n"
    )
}

/// Another project's node proxy, on a lab of its own whose `mesh` pods
/// Kanava leaves alone.
///
/// Kanava carries nothing of the peer: a hook, an executable the person
/// running the benchmark provides, puts the peer's proxies on the lab.
/// It is called as `HOOK up STATE NAMESPACE` once the lab is up (`STATE` is
/// the lab's `state.json`: nodes, pods, their network namespaces and
/// addresses), and returns once every pod of `NAMESPACE` sends and receives
/// through the peer, printing as its last line
/// `{"name": "…", "pids": [node-1's proxy, node-2's proxy]}`. When the
/// benchmark is done it is called as `HOOK down STATE`.
pub struct Peer {
    lab: Lab,
    hook: PathBuf,
    /// The peer's proxy processes, in node order.
    pids: Vec<u32>,
    /// Its name and version, as the hook told them.
    pub name: String,
}

/// How long the peer's hook may take to put the peer on the lab, and to
/// take it down: a hook that hangs must not hang the benchmark.
const HOOK_UP_WITHIN: Duration = Duration::from_secs(600);
const HOOK_DOWN_WITHIN: Duration = Duration::from_secs(60);

/// Runs the peer's hook with `args`, stderr passed through, and returns its
/// standard output once it succeeded; one that fails or outlives `within`
/// (then killed) is an error saying so.
fn run_hook(hook: &Path, args: &[&OsStr], within: Duration) -> anyhow::Result<String> {
    let mut child = std::process::Command::new(hook)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("run the peer's hook {}", hook.display()))?;
    // Read on a thread: a hook that prints much would otherwise block on a
    // full pipe while this waits for it to exit.
    let mut stdout = child.stdout.take().context("the hook's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the peer's hook {} took over {within:?}: killed",
                hook.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("the peer's hook failed ({status}): {stdout}");
    }
    Ok(stdout)
}

impl Peer {
    fn up(hook: PathBuf, spec: &LabSpec) -> anyhow::Result<Peer> {
        let options = UpOptions::named(format!("benchp{}", std::process::id()));
        let lab = Lab::up(spec, &options).context("bring up the peer's lab")?;
        let state = lab.state().dir.join("state.json");
        // Taken down (the hook's `down`, then the lab) on every error below.
        let mut peer = Peer {
            lab,
            hook,
            pids: Vec::new(),
            name: String::new(),
        };
        let stdout = run_hook(
            &peer.hook,
            &["up".as_ref(), state.as_os_str(), "mesh".as_ref()],
            HOOK_UP_WITHIN,
        )?;
        let told: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .with_context(|| format!("the peer's hook printed no JSON last: {stdout}"))?;
        peer.name = told["name"].as_str().unwrap_or("the peer").to_string();
        peer.pids = told["pids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pid| pid.as_u64().and_then(|pid| u32::try_from(pid).ok()))
            .collect();
        if peer.pids.len() != peer.lab.state().nodes.len() {
            bail!("the peer's hook named no proxy process per node: {told}");
        }
        Ok(peer)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let state = self.lab.state().dir.join("state.json");
        if let Err(error) = run_hook(
            &self.hook,
            &["down".as_ref(), state.as_os_str()],
            HOOK_DOWN_WITHIN,
        ) {
            eprintln!("the peer was not taken down cleanly: {error:#}");
        }
    }
}

pub struct MeshBench {
    pub(crate) lab: Lab,
    /// The lab whose ztunnels are the baseline build's, in an A/B run.
    baseline: Option<Lab>,
    /// Another project's proxies, in a run with `--peer`.
    peer: Option<Peer>,
    settings: Settings,
    /// The family every address of the labs is of.
    family: IpFamily,
}

impl MeshBench {
    /// Brings the lab up, with `baseline_ztunnel` a second one whose
    /// ztunnels run that executable, and with `peer_hook` one whose `mesh`
    /// pods that hook hands to another node proxy.
    pub fn up(
        settings: Settings,
        baseline_ztunnel: Option<PathBuf>,
        peer_hook: Option<PathBuf>,
        family: IpFamily,
    ) -> anyhow::Result<Self> {
        let spec = LabSpec::parse(&lab_file(family, true, 0), 2)?;
        let name = format!("bench{}", std::process::id());
        let lab = Lab::up(&spec, &UpOptions::named(name)).context("bring up the benchmark lab")?;
        let baseline = match baseline_ztunnel {
            Some(ztunnel) => {
                let mut options = UpOptions::named(format!("benchb{}", std::process::id()));
                options.ztunnel_binary = Some(ztunnel);
                Some(Lab::up(&spec, &options).context("bring up the baseline's lab")?)
            }
            None => None,
        };
        let peer = match peer_hook {
            Some(hook) => {
                let spec = LabSpec::parse(&lab_file(family, false, settings.repetitions), 2)?;
                Some(Peer::up(hook, &spec)?)
            }
            None => None,
        };
        let bench = MeshBench {
            lab,
            baseline,
            peer,
            settings,
            family,
        };
        bench.widen_port_range()?;
        Ok(bench)
    }

    /// The sides every comparison is taken of, in this repetition's order
    /// (turns rotate so that none always runs first).
    fn order(&self, repetition: usize) -> Vec<Mode> {
        let mut modes = vec![Mode::Direct, Mode::Mesh];
        modes.extend(self.others());
        let turn = repetition % modes.len();
        modes.rotate_left(turn);
        modes
    }

    /// The sides besides this build's mesh and the direct path.
    fn others(&self) -> Vec<Mode> {
        let mut modes = Vec::new();
        if self.baseline.is_some() {
            modes.push(Mode::Baseline);
        }
        if self.peer.is_some() {
            modes.push(Mode::Peer);
        }
        modes
    }

    /// The name of the peer's proxy, in a run with `--peer`.
    pub fn peer_name(&self) -> Option<String> {
        self.peer.as_ref().map(|peer| peer.name.clone())
    }

    /// The lab that `mode`'s pods live in.
    pub(crate) fn lab_of(&self, mode: Mode) -> &Lab {
        match (mode, &self.baseline, &self.peer) {
            (Mode::Baseline, Some(baseline), _) => baseline,
            (Mode::Peer, _, Some(peer)) => &peer.lab,
            _ => &self.lab,
        }
    }

    fn lab_of_mut(&mut self, mode: Mode) -> &mut Lab {
        match (mode, &mut self.baseline, &mut self.peer) {
            (Mode::Baseline, Some(baseline), _) => baseline,
            (Mode::Peer, _, Some(peer)) => &mut peer.lab,
            _ => &mut self.lab,
        }
    }

    /// The sides whose proxies are measured on their own (memory at rest).
    fn meshes(&self) -> Vec<Mode> {
        let mut modes = vec![Mode::Mesh];
        modes.extend(self.others());
        modes
    }

    /// Connection churn opens tens of thousands of connections in seconds,
    /// and each leaves its client port in TIME_WAIT for a minute: with the
    /// default 28,000 ephemeral ports the later runs measure port
    /// exhaustion, not the mesh. In every benchmark pod (namespaces this lab
    /// made; the server's ztunnel connects from inside the server pod with
    /// the client's address) use all ports above 1023 and let a new
    /// connection take over a port in TIME_WAIT, as busy clients do.
    fn widen_port_range(&self) -> anyhow::Result<()> {
        for mode in self.order(0) {
            for pod in ["client", "server"] {
                let pod = format!("{}/{pod}", mode.namespace());
                let output = self.lab_of(mode).exec(
                    &pod,
                    &[
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv4.ip_local_port_range=1024 65535",
                        "net.ipv4.tcp_tw_reuse=1",
                    ],
                )?;
                if !output.status.success() {
                    bail!(
                        "sysctl in {pod}: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            }
        }
        Ok(())
    }

    pub(crate) fn server(&self, mode: Mode, port: u16) -> anyhow::Result<SocketAddr> {
        let ip = self
            .lab_of(mode)
            .pod(&format!("{}/server", mode.namespace()))?
            .ip()
            .context("server without IP")?;
        Ok(SocketAddr::from((ip, port)))
    }

    pub(crate) fn client(mode: Mode) -> String {
        format!("{}/client", mode.namespace())
    }

    /// The ztunnels of `mode`'s lab (the peer's proxies for the peer).
    pub(crate) fn ztunnel_pids(&self, mode: Mode) -> Vec<u32> {
        if let (Mode::Peer, Some(peer)) = (mode, &self.peer) {
            return peer.pids.clone();
        }
        self.lab_of(mode)
            .state()
            .nodes
            .iter()
            .filter_map(|n| n.ztunnel.pid)
            .collect()
    }

    /// Runs a command in a pod of `mode`'s lab and parses the JSON it
    /// prints last.
    pub(crate) fn run_json(&self, mode: Mode, pod: &str, argv: &[&str]) -> anyhow::Result<Value> {
        let output = self.lab_of(mode).exec(pod, argv)?;
        if !output.status.success() {
            bail!(
                "{} in {pod} failed: {}{}",
                argv.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        // iperf3 prints one JSON document; labapp prints one line.
        serde_json::from_str(stdout.trim())
            .or_else(|_| serde_json::from_str(stdout.lines().last().unwrap_or_default()))
            .with_context(|| format!("{} printed no JSON: {stdout}", argv.join(" ")))
    }

    /// Every data-path scenario, both ways, `repetitions` times.
    pub fn run(&mut self, collector: &mut Collector) -> anyhow::Result<()> {
        // Idle: the ztunnels hold their captured pods, nothing flows yet.
        std::thread::sleep(Duration::from_secs(1));
        for mode in self.meshes() {
            for pid in self.ztunnel_pids(mode) {
                if let Some(rss) = procfs::rss_mib(pid) {
                    collector.measure_for(
                        mode,
                        "proxy cost",
                        "ztunnel RSS idle",
                        "MiB",
                        Better::Lower,
                        Some(goals::ZTUNNEL_IDLE_RSS),
                        rss,
                    );
                }
            }
        }
        // Before any churn: thousands of connections in TIME_WAIT would use
        // up the ephemeral ports these need.
        for mode in self.meshes() {
            self.idle_connections(mode, collector)?;
        }
        for repetition in 0..self.settings.repetitions {
            let order = self.order(repetition);
            eprintln!(
                "repetition {} of {}",
                repetition + 1,
                self.settings.repetitions
            );
            for mode in order {
                self.throughput(mode, collector)?;
                self.latency(mode, collector)?;
                self.churn(mode, collector)?;
                self.first_connection(mode, repetition, collector)?;
            }
            // The floor's crypto part, once a repetition, in the same
            // minutes as the proxies' numbers.
            collector.measure(
                "proxy cost",
                crate::report::AEAD_METRIC,
                "CPU s/GiB",
                Better::Lower,
                None,
                crate::floor::aead_seconds_per_gib()?,
            );
        }
        Ok(())
    }

    /// A scenario's name: as it is in IPv4, with the family after it in
    /// IPv6 (the rows of an IPv6 run sit beside the IPv4 ones).
    fn named(&self, scenario: &str) -> String {
        match self.family {
            IpFamily::IPv4 => scenario.to_string(),
            IpFamily::IPv6 => format!("{scenario} (IPv6)"),
        }
    }

    /// Throughput and back-to-back latency only: the rows of a second
    /// family.
    pub fn run_family_rows(&mut self, collector: &mut Collector) -> anyhow::Result<()> {
        for repetition in 0..self.settings.repetitions {
            eprintln!(
                "{} repetition {} of {}",
                self.family,
                repetition + 1,
                self.settings.repetitions
            );
            for mode in self.order(repetition) {
                self.throughput(mode, collector)?;
                self.latency(mode, collector)?;
            }
        }
        Ok(())
    }

    fn throughput(&self, mode: Mode, collector: &mut Collector) -> anyhow::Result<()> {
        let server = self.server(mode, IPERF_PORT)?;
        let host = server.ip().to_string();
        let seconds = self.settings.throughput_seconds.to_string();
        for (metric, streams, goal) in [
            ("1 stream", "1", goals::SINGLE_STREAM_THROUGHPUT),
            ("8 streams", "8", goals::EIGHT_STREAM_THROUGHPUT),
        ] {
            let before = self.proxy_counters_by_node(mode);
            let mut argv = vec![
                "iperf3", "-c", &host, "-p", "5201", "-t", &seconds, "-P", streams, "-J",
            ];
            if self.settings.throughput_seconds >= 5 {
                // Leave TCP's slow start out of the numbers.
                argv.extend(["-O", "1"]);
            }
            let result = self.run_json(mode, &Self::client(mode), &argv)?;
            let after = self.proxy_counters_by_node(mode);
            let received = &result["end"]["sum_received"];
            let bits = received["bits_per_second"]
                .as_f64()
                .context("iperf3: no bits_per_second")?;
            collector.compare(
                &self.named("throughput"),
                metric,
                "Gbit/s",
                Better::Higher,
                Some(goal),
                mode,
                bits / 1e9,
            );
            if mode != Mode::Direct {
                let gib = received["bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
                if gib > 0.0 {
                    let by_node: Vec<ProxyCounters> =
                        after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
                    let mut spent = ProxyCounters::default();
                    for node in &by_node {
                        spent.add(node);
                    }
                    for (name, unit, value) in [
                        (
                            "ztunnel CPU per GiB",
                            "CPU s/GiB",
                            spent.user + spent.system,
                        ),
                        ("ztunnel kernel CPU per GiB", "CPU s/GiB", spent.system),
                        (
                            "ztunnel context switches per GiB",
                            "switches/GiB",
                            spent.switches,
                        ),
                    ] {
                        collector.measure_for(
                            mode,
                            &self.named("proxy cost"),
                            &format!("{name} ({metric})"),
                            unit,
                            Better::Lower,
                            None,
                            value / gib,
                        );
                    }
                    // Each node's share: a total can hide one node's
                    // excess behind the other's thrift.
                    for (node, part) in by_node.iter().zip(NODE_PARTS) {
                        for (name, unit, value) in [
                            ("ztunnel CPU per GiB", "CPU s/GiB", node.user + node.system),
                            (
                                "ztunnel context switches per GiB",
                                "switches/GiB",
                                node.switches,
                            ),
                        ] {
                            collector.measure_for(
                                mode,
                                &self.named("proxy cost"),
                                &format!("{name}, {part} ({metric})"),
                                unit,
                                Better::Lower,
                                None,
                                value / gib,
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What each of `mode`'s proxies has spent so far, in node order.
    fn proxy_counters_by_node(&self, mode: Mode) -> Vec<ProxyCounters> {
        self.ztunnel_pids(mode)
            .into_iter()
            .map(|pid| {
                let times = procfs::cpu_times(pid);
                ProxyCounters {
                    user: times.as_ref().map_or(0.0, |t| t.user),
                    system: times.as_ref().map_or(0.0, |t| t.system),
                    switches: procfs::context_switches(pid).unwrap_or(0) as f64,
                }
            })
            .collect()
    }

    fn latency(&self, mode: Mode, collector: &mut Collector) -> anyhow::Result<()> {
        let server = self.server(mode, SERVER_PORT)?.to_string();
        let count = self.settings.pingpong_count.to_string();
        let paced = self.settings.paced_count.to_string();
        for (scenario, argv) in [
            (
                "latency back-to-back",
                vec!["labapp", "pingpong", "--to", &server, "--count", &count],
            ),
            (
                "latency at 1000/s",
                vec![
                    "labapp", "pingpong", "--to", &server, "--count", &paced, "--rate", "1000",
                ],
            ),
        ] {
            let result = self.run_json(mode, &Self::client(mode), &argv)?;
            for (metric, field) in [
                ("p50", "p50_us"),
                ("p90", "p90_us"),
                ("p99", "p99_us"),
                ("p99.9", "p999_us"),
            ] {
                let value = result[field]
                    .as_f64()
                    .with_context(|| format!("pingpong: no {field}"))?;
                let goal = match (scenario, metric) {
                    ("latency back-to-back", "p50") => Some(goals::ADDED_LATENCY_P50),
                    ("latency back-to-back", "p99") => Some(goals::ADDED_LATENCY_P99),
                    _ => None,
                };
                collector.compare(
                    &self.named(scenario),
                    metric,
                    "us",
                    Better::Lower,
                    goal,
                    mode,
                    value,
                );
            }
        }
        if mode == Mode::Mesh && self.family == IpFamily::IPv4 {
            self.one_plaintext_hop(collector)?;
        }
        Ok(())
    }

    /// A reference for the latency the mesh adds: the enrolled client to the
    /// server outside the mesh, which its ztunnel passes through in plain
    /// TCP — one userspace proxy hop, no TLS, no HTTP/2. The mesh has two
    /// such hops; what it adds beyond twice this is the cost of HBONE.
    fn one_plaintext_hop(&self, collector: &mut Collector) -> anyhow::Result<()> {
        let server = self.server(Mode::Direct, SERVER_PORT)?.to_string();
        let count = self.settings.pingpong_count.to_string();
        let result = self.run_json(
            Mode::Mesh,
            &Self::client(Mode::Mesh),
            &["labapp", "pingpong", "--to", &server, "--count", &count],
        )?;
        for (metric, field) in [("p50", "p50_us"), ("p99", "p99_us")] {
            let value = result[field]
                .as_f64()
                .with_context(|| format!("pingpong: no {field}"))?;
            collector.measure(
                "latency reference",
                &format!("one plaintext proxy hop, back-to-back {metric}"),
                "us",
                Better::Lower,
                None,
                value,
            );
        }
        Ok(())
    }

    fn churn(&self, mode: Mode, collector: &mut Collector) -> anyhow::Result<()> {
        let server = self.server(mode, SERVER_PORT)?.to_string();
        let seconds = self.settings.churn_seconds.to_string();
        for (metric, clients) in [("1 client", "1"), ("16 clients", "16")] {
            let result = self.run_json(
                mode,
                &Self::client(mode),
                &[
                    "labapp",
                    "churn",
                    "--to",
                    &server,
                    "--concurrency",
                    clients,
                    "--seconds",
                    &seconds,
                ],
            )?;
            let rate = result["per_second"]
                .as_f64()
                .context("churn: no per_second")?;
            collector.compare(
                "connection churn",
                metric,
                "conn/s",
                Better::Higher,
                Some(goals::CONNECTION_CHURN),
                mode,
                rate,
            );
            if result["errors"].as_u64().unwrap_or(0) > 0 {
                bail!("connection churn ({mode:?}, {metric}) had failed connections: {result}");
            }
        }
        Ok(())
    }

    /// The very first connection between two pods: a fresh client pod, so
    /// the mesh has no pooled connection and must do the whole TLS
    /// handshake (post-quantum key exchange included).
    fn first_connection(
        &mut self,
        mode: Mode,
        repetition: usize,
        collector: &mut Collector,
    ) -> anyhow::Result<()> {
        let namespace = mode.namespace();
        let pod = first_pod(repetition, namespace);
        // The peer's lab made its spare pods at the start: it has never
        // connected from them.
        let fresh = mode != Mode::Peer;
        if fresh {
            self.lab_of_mut(mode).apply(&pod)?;
        }
        let server = self.server(mode, SERVER_PORT)?.to_string();
        let result = self.run_json(
            mode,
            &format!("{namespace}/first-{repetition}"),
            &["labapp", "churn", "--to", &server, "--once"],
        );
        if fresh {
            self.lab_of_mut(mode).delete(&pod)?;
        }
        let micros = result?["first_connection_us"]
            .as_f64()
            .context("no first_connection_us")?;
        collector.compare(
            "first connection",
            "connect + 1 KiB round trip",
            "us",
            Better::Lower,
            Some(goals::FIRST_CONNECTION),
            mode,
            micros,
        );
        Ok(())
    }

    /// Memory of `mode`'s ztunnels with many idle proxied connections open.
    fn idle_connections(&self, mode: Mode, collector: &mut Collector) -> anyhow::Result<()> {
        let count = self.settings.idle_connections;
        let server = self.server(mode, SERVER_PORT)?;
        let pids = self.ztunnel_pids(mode);
        let before: Vec<f64> = pids.iter().filter_map(|&p| procfs::rss_mib(p)).collect();
        let lab = self.lab_of(mode);
        let netns = kanava_netns::NetNs::named(&lab.netns(&Self::client(mode))?)?;
        let connections = netns.run(|| -> std::io::Result<Vec<std::net::TcpStream>> {
            (0..count)
                .map(|_| std::net::TcpStream::connect_timeout(&server, Duration::from_secs(10)))
                .collect()
        })??;
        // Every connection is proxied once the server has accepted it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let open = self.accepted_by_server(mode).unwrap_or(0);
            if open >= count {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {open} of {count} idle connections reached the server's ztunnel");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        let after: Vec<f64> = pids.iter().filter_map(|&p| procfs::rss_mib(p)).collect();
        for ((b, a), side) in before.iter().zip(&after).zip(["client", "server"]) {
            collector.measure_for(
                mode,
                "proxy cost",
                &format!("{side} ztunnel RSS with {count} idle connections"),
                "MiB",
                Better::Lower,
                None,
                *a,
            );
            collector.measure_for(
                mode,
                "proxy cost",
                &format!("memory per idle connection, {side} ztunnel"),
                "KiB",
                Better::Lower,
                Some(goals::MEMORY_PER_IDLE_CONNECTION),
                (a - b) * 1024.0 / count as f64,
            );
        }
        drop(connections);
        // Let the proxies take them all down before measuring anything else.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.accepted_by_server(mode).is_some_and(|open| open > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Connections the server pod of `mode` holds open on its echo port:
    /// counted in the pod, so it means the same whichever proxy delivered
    /// them.
    fn accepted_by_server(&self, mode: Mode) -> Option<usize> {
        let lab = self.lab_of(mode);
        let pod = format!("{}/server", mode.namespace());
        let filter = format!("sport = :{SERVER_PORT}");
        let output = lab
            .exec(&pod, &["ss", "-Htn", "state", "established", &filter])
            .ok()
            .filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&output.stdout).lines().count())
    }
}
