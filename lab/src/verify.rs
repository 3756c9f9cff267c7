//! `kanava verify`: the isolation a mesh promises, checked against a live
//! lab the way an attacker inside a pod would try it.
//!
//! Each check acts from a pod's (or a node's) network namespace with real
//! sockets, TLS and gRPC, and reports what it expected and what it observed.
//! Checks that need a kind of pod the lab does not have (say, two enrolled
//! pods on different nodes) are reported as skipped, with the reason. A
//! check that changes the lab (a temporary listener, a temporary DENY
//! policy) undoes the change before it returns.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kanava_mesh::{Identity, names, ports};
use kanava_proto::v1 as pb;
use kanava_tls::pki_types::ServerName;

use crate::Lab;
use crate::family::IpFamily;
use crate::state::PodState;

/// One row of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub expected: String,
    pub observed: String,
    /// `None`: skipped (the lab lacks what the check needs).
    pub passed: Option<bool>,
    /// The IP family it was made in, for checks made once per family of
    /// the lab.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<IpFamily>,
}

impl Check {
    fn new(name: &str, expected: &str) -> Self {
        Check {
            name: name.into(),
            expected: expected.into(),
            observed: String::new(),
            passed: None,
            family: None,
        }
    }

    fn in_family(mut self, family: IpFamily) -> Self {
        self.family = Some(family);
        self
    }

    fn pass(mut self, observed: impl Into<String>) -> Self {
        self.observed = observed.into();
        self.passed = Some(true);
        self
    }

    fn fail(mut self, observed: impl Into<String>) -> Self {
        self.observed = observed.into();
        self.passed = Some(false);
        self
    }

    fn skip(mut self, why: impl Into<String>) -> Self {
        self.observed = format!("skipped: {}", why.into());
        self
    }

    fn judge(self, passed: bool, observed: impl Into<String>) -> Self {
        if passed {
            self.pass(observed)
        } else {
            self.fail(observed)
        }
    }
}

/// Port of the temporary listener some checks start in a destination pod.
const PROBE_PORT: u16 = 39_999;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check against `lab`: the checks of addresses once per IP
/// family of the lab, the others once.
pub fn run(lab: &mut Lab) -> Vec<Check> {
    let families: Vec<IpFamily> = lab.state().families.iter().collect();
    let Some(primary) = Pods::pick(lab, families[0]) else {
        return vec![
            Check::new("enrolled pods", "at least one captured pod")
                .fail("none: enroll a namespace (label kanava.io/dataplane-mode=ambient)"),
        ];
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return vec![Check::new("runtime", "a Tokio runtime").fail(error.to_string())];
        }
    };
    let mut checks = vec![
        control_plane(lab, &primary, &runtime),
        csr_for_another_node(lab, &primary, &runtime),
        self_loop(lab, &primary),
    ];
    for &family in &families {
        let Some(pods) = Pods::pick(lab, family) else {
            checks.push(
                Check::new(
                    "enrolled pods",
                    "a captured pod with an address of this family",
                )
                .in_family(family)
                .fail("none"),
            );
            continue;
        };
        let mut these = vec![
            admin_port(lab, &pods),
            metrics_ports(lab, &pods),
            plaintext_to_strict(lab, &pods),
            udp_to_strict(lab, &pods),
            foreign_certificate(lab, &pods, &runtime),
        ];
        match pods.remote.as_ref() {
            Some(remote) => match Probe::start(lab, remote) {
                Ok(probe) => {
                    these.push(spoofed_source(lab, &pods, &probe));
                    these.push(fabric_only_tls(lab, &pods, &probe));
                    if family == families[0] {
                        checks.push(deny_closes(lab, &pods, &probe));
                    }
                }
                Err(error) => these.push(
                    Check::new("probe listener", "a temporary listener in a remote pod")
                        .fail(error),
                ),
            },
            None => {
                for name in [
                    "spoofed source",
                    "fabric carries only TLS on 15008",
                    "DENY closes open connections",
                ] {
                    these.push(
                        Check::new(name, "-").skip("needs enrolled pods on two different nodes"),
                    );
                }
            }
        }
        checks.extend(these.into_iter().map(|check| check.in_family(family)));
    }
    checks
}

/// The pods the checks act from and towards, with their addresses of one
/// family.
struct Pods {
    /// An enrolled pod in strict mode, the attacker's seat.
    local: PodState,
    local_ip: IpAddr,
    /// An enrolled pod on another node.
    remote: Option<(PodState, IpAddr)>,
    family: IpFamily,
}

impl Pods {
    fn pick(lab: &Lab, family: IpFamily) -> Option<Pods> {
        let strict = strict_namespaces(lab);
        let ip_of = |pod: &PodState| {
            pod.ips
                .iter()
                .copied()
                .find(|ip| IpFamily::of(*ip) == family)
        };
        let enrolled: Vec<&PodState> = lab
            .state()
            .pods
            .iter()
            .filter(|p| p.captured && ip_of(p).is_some() && p.pid.is_some())
            .collect();
        let local = enrolled
            .iter()
            .find(|p| strict.contains(&p.namespace))
            .or_else(|| enrolled.first())?;
        let remote = enrolled
            .iter()
            .find(|p| p.node != local.node)
            .and_then(|p| Some(((*p).clone(), ip_of(p)?)));
        Some(Pods {
            local: (*local).clone(),
            local_ip: ip_of(local)?,
            remote,
            family,
        })
    }

    fn local_node_ip(&self, lab: &Lab) -> Option<IpAddr> {
        lab.state()
            .node(&self.local.node)?
            .ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(*ip) == self.family)
    }

    /// A node other than the local pod's, or the local one in a one-node
    /// lab: somewhere outside the local pod to act from.
    fn other_node(&self, lab: &Lab) -> String {
        lab.state()
            .nodes
            .iter()
            .find(|n| n.name != self.local.node)
            .unwrap_or(&lab.state().nodes[0])
            .name
            .clone()
    }
}

/// Namespaces whose enrolled pods refuse plaintext.
fn strict_namespaces(lab: &Lab) -> Vec<String> {
    let objects = crate::manifests::Manifests::new(lab.state().layout().manifest_dir())
        .read()
        .unwrap_or_default();
    objects
        .namespaces
        .iter()
        .filter(|(_, ns)| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::MTLS_MODE_LABEL))
                .is_none_or(|mode| mode != "permissive")
        })
        .map(|(name, _)| name.clone())
        .collect()
}

fn admin_port(lab: &Lab, pods: &Pods) -> Check {
    let check = Check::new(
        "ztunnel admin port from a pod",
        "no answer (bound to the node's localhost)",
    );
    let Some(node) = pods.local_node_ip(lab) else {
        return check.skip("no node address");
    };
    let to = SocketAddr::from((node, ports::ADMIN));
    let answer = http(lab, &pods.local.key(), to, "/config_dump");
    check.judge(
        answer.is_empty(),
        if answer.is_empty() {
            format!("{to}/config_dump: no answer")
        } else {
            format!("{to}/config_dump answered: {}", short(&answer))
        },
    )
}

fn metrics_ports(lab: &Lab, pods: &Pods) -> Check {
    let check = Check::new(
        "ztunnel metrics and readiness from a pod",
        "no configuration dump, no key material",
    );
    let Some(node) = pods.local_node_ip(lab) else {
        return check.skip("no node address");
    };
    let mut seen = Vec::new();
    for (port, path) in [
        (ports::METRICS, "/config_dump"),
        (ports::READINESS, "/config_dump"),
        (ports::METRICS, "/metrics"),
    ] {
        let answer = http(lab, &pods.local.key(), SocketAddr::from((node, port)), path);
        let leaked = answer.contains("PRIVATE KEY") || answer.contains("\"workloads\"");
        let status = answer.lines().next().unwrap_or("no answer").to_string();
        if leaked || (path == "/config_dump" && status.contains(" 200")) {
            return check.fail(format!("{port}{path}: {status}"));
        }
        seen.push(format!("{port}{path}: {}", short(&status)));
    }
    check.pass(seen.join("; "))
}

fn control_plane(lab: &Lab, pods: &Pods, runtime: &tokio::runtime::Runtime) -> Check {
    let check = Check::new(
        "control plane from a pod",
        "discovery and signing refused without a node credential",
    );
    let result = runtime.block_on(async {
        let channel = crate::clients::control_plane_channel(lab, &pods.local.key()).await?;
        let identity = pods
            .local
            .identity
            .parse::<Identity>()
            .map_err(|e| e.to_string())?;
        let request =
            kanava_tls::CertificateRequest::generate(&identity).map_err(|e| e.to_string())?;
        let sign = pb::certificates_client::CertificatesClient::new(channel.clone())
            .sign(pb::SignRequest {
                csr: request.csr_der().to_vec(),
                identity: identity.to_string(),
                ttl_seconds: 0,
            })
            .await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(pb::DiscoveryRequest {
                node_name: pods.local.node.clone(),
                ..Default::default()
            })
            .await;
        let discovery = pb::discovery_client::DiscoveryClient::new(channel)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        Ok::<_, String>((sign.err(), discovery.err()))
    });
    match result {
        Ok((Some(sign), Some(discovery)))
            if sign.code() == tonic::Code::Unauthenticated
                && discovery.code() == tonic::Code::Unauthenticated =>
        {
            check.pass("both answered UNAUTHENTICATED")
        }
        Ok((sign, discovery)) => check.fail(format!(
            "sign: {}, discovery: {}",
            sign.map(|s| format!("{:?}", s.code()))
                .unwrap_or_else(|| "signed!".into()),
            discovery
                .map(|s| format!("{:?}", s.code()))
                .unwrap_or_else(|| "subscribed!".into())
        )),
        // Not even reachable is as good as refused.
        Err(error) => check.pass(format!("unreachable: {}", short(&error))),
    }
}

fn plaintext_to_strict(lab: &Lab, pods: &Pods) -> Check {
    let check = Check::new(
        "plaintext to a STRICT pod",
        "refused (reset, nothing answered)",
    );
    if !strict_namespaces(lab).contains(&pods.local.namespace) {
        return check.skip("no enrolled pod in a strict namespace");
    }
    let from = format!("node/{}", pods.other_node(lab));
    let to = SocketAddr::from((pods.local_ip, pods.local.readiness_port.unwrap_or(80)));
    let answer = http(lab, &from, to, "/");
    check.judge(
        answer.is_empty(),
        if answer.is_empty() {
            format!("{to} from {from}: no answer")
        } else {
            format!("{to} answered: {}", short(&answer))
        },
    )
}

/// UDP from outside the pod to a port it has not opted in: dropped before
/// the app (see `kanava_mesh::names::INBOUND_UDP_PORTS_ANNOTATION`).
fn udp_to_strict(lab: &Lab, pods: &Pods) -> Check {
    let check = Check::new(
        "UDP to a STRICT pod",
        "dropped before the app (not opted in)",
    );
    if !strict_namespaces(lab).contains(&pods.local.namespace) {
        return check.skip("no enrolled pod in a strict namespace");
    }
    let listen = SocketAddr::new(pods.local_ip, PROBE_PORT);
    let receiver = match lab.udp_socket(&pods.local.key(), listen) {
        Ok(socket) => socket,
        Err(error) => return check.fail(format!("a listener in the pod: {error}")),
    };
    let from = format!("node/{}", pods.other_node(lab));
    let sender = match lab.udp_socket(&from, SocketAddr::new(pods.family.unspecified(), 0)) {
        Ok(socket) => socket,
        Err(error) => return check.fail(format!("a sender on {from}: {error}")),
    };
    let marker = b"KANAVA-VERIFY-UDP";
    for _ in 0..3 {
        if let Err(error) = sender.send_to(marker, listen) {
            return check.fail(format!("send from {from}: {error}"));
        }
    }
    let _ = receiver.set_read_timeout(Some(Duration::from_millis(700)));
    let mut buffer = [0u8; 64];
    match receiver.recv_from(&mut buffer) {
        Ok((n, peer)) => check.fail(format!("{n} bytes from {peer} reached {listen}")),
        Err(_) => check.pass(format!("3 datagrams from {from} to {listen}: none arrived")),
    }
}

fn foreign_certificate(lab: &Lab, pods: &Pods, runtime: &tokio::runtime::Runtime) -> Check {
    let check = Check::new(
        "certificate from a foreign CA on :15008",
        "TLS refused by the ztunnel",
    );
    let result = runtime.block_on(async {
        let identity: Identity = pods
            .local
            .identity
            .parse()
            .map_err(|e: kanava_mesh::Error| e.to_string())?;
        let foreign = foreign_cert(&identity)?;
        let roots = crate::clients::mesh_roots(lab)?;
        let tls = kanava_tls::hbone_client_config(&foreign, &roots, &identity)
            .map_err(|e| e.to_string())?;
        let from = format!("node/{}", pods.other_node(lab));
        let tcp = crate::clients::tokio_stream_from(lab.connect(
            &from,
            SocketAddr::from((pods.local_ip, ports::HBONE)),
            TIMEOUT,
        ))?;
        let server_name = ServerName::IpAddress(pods.local_ip.into());
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // A TLS 1.3 client learns that its certificate was refused only
        // when it reads: ask for a stream and wait for the answer.
        let exchange = async {
            let (sender, connection) = h2::client::handshake(stream)
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
            tokio::spawn(connection);
            let mut sender = sender.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
            let mut request = http::Request::new(());
            *request.method_mut() = http::Method::CONNECT;
            *request.uri_mut() = SocketAddr::new(pods.local_ip, PROBE_PORT)
                .to_string()
                .parse()
                .map_err(|_| "uri".to_string())?;
            let (response, _send) = sender
                .send_request(request, false)
                .map_err(|e| format!("HTTP/2: {e}"))?;
            let response = response.await.map_err(|e| format!("refused: {e}"))?;
            Ok::<_, String>(response.status())
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(refusal)) => Err(refusal),
            Err(_) => Err("no answer".into()),
        }
    });
    match result {
        Err(refusal) => check.pass(short(&refusal)),
        Ok(status) => check.fail(format!("a CONNECT was answered {status}")),
    }
}

fn csr_for_another_node(lab: &Lab, pods: &Pods, runtime: &tokio::runtime::Runtime) -> Check {
    let check = Check::new("CSR for an identity of another node", "PERMISSION_DENIED");
    let state = lab.state();
    // An identity that runs somewhere, but not on this node.
    let Some(foreign) = state
        .pods
        .iter()
        .filter(|p| p.captured && p.node != pods.local.node)
        .map(|p| p.identity.clone())
        .find(|identity| {
            !state
                .pods
                .iter()
                .any(|p| p.node == pods.local.node && &p.identity == identity)
        })
    else {
        return check.skip("no identity runs only on other nodes");
    };
    let result = runtime.block_on(async {
        let token = lab
            .node_token(&pods.local.node)
            .map_err(|e| e.to_string())?;
        let channel =
            crate::clients::control_plane_channel(lab, &format!("node/{}", pods.local.node))
                .await?;
        let identity: Identity = foreign
            .parse()
            .map_err(|e: kanava_mesh::Error| e.to_string())?;
        let request =
            kanava_tls::CertificateRequest::generate(&identity).map_err(|e| e.to_string())?;
        let mut call = tonic::Request::new(pb::SignRequest {
            csr: request.csr_der().to_vec(),
            identity: identity.to_string(),
            ttl_seconds: 0,
        });
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| "token".to_string())?;
        call.metadata_mut().insert("authorization", header);
        Ok::<_, String>(
            pb::certificates_client::CertificatesClient::new(channel)
                .sign(call)
                .await,
        )
    });
    match result {
        Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => check.pass(format!(
            "{} with {}'s credential: PERMISSION_DENIED",
            foreign, pods.local.node
        )),
        Ok(Err(status)) => check.fail(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(_)) => check.fail(format!("signed {foreign} for {}", pods.local.node)),
        Err(error) => check.fail(error),
    }
}

fn self_loop(lab: &Lab, pods: &Pods) -> Check {
    let check = Check::new(
        "a pod dialling its ztunnel's own listeners",
        "closed at once, no loop (open files stable)",
    );
    let Some(pid) = lab
        .state()
        .node(&pods.local.node)
        .and_then(|n| n.ztunnel.pid)
    else {
        return check.skip("no ztunnel process");
    };
    let open_files = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(Iterator::count)
            .unwrap_or(0)
    };
    let before = open_files();
    let mut held_longest = Duration::ZERO;
    for to in [
        SocketAddr::from(([127, 0, 0, 1], ports::OUTBOUND)),
        SocketAddr::from((pods.local_ip, ports::INBOUND_PLAINTEXT)),
    ] {
        let started = Instant::now();
        if let Ok(mut stream) = lab.connect(&pods.local.key(), to, TIMEOUT) {
            let _ = stream.write_all(b"loop?");
            let _ = stream.set_read_timeout(Some(TIMEOUT * 2));
            let mut sink = [0u8; 64];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        }
        held_longest = held_longest.max(started.elapsed());
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = open_files();
    check.judge(
        held_longest < TIMEOUT && after <= before + 10,
        format!("closed after {held_longest:.1?}; ztunnel open files {before} → {after}"),
    )
}

/// A `labapp sink` in a remote enrolled pod, stopped when dropped.
struct Probe {
    pod: PodState,
    address: SocketAddr,
    pid: u32,
}

impl Probe {
    fn start(lab: &Lab, (pod, ip): &(PodState, IpAddr)) -> Result<Probe, String> {
        let argv: Vec<String> = [
            crate::bin_dir(None)
                .map_err(|e| e.to_string())?
                .join("labapp")
                .display()
                .to_string(),
            "sink".into(),
            "--port".into(),
            PROBE_PORT.to_string(),
        ]
        .into();
        let log = lab.state().layout().dir.join("verify-probe.log");
        let pid =
            crate::process::spawn_in(&pod.netns, &argv, &[], &log).map_err(|e| e.to_string())?;
        let probe = Probe {
            pod: pod.clone(),
            address: SocketAddr::from((*ip, PROBE_PORT)),
            pid,
        };
        let deadline = Instant::now() + TIMEOUT;
        while lab
            .connect(&format!("node/{}", pod.node), probe.address, TIMEOUT)
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(format!("the probe listener in {} did not start", pod.key()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(probe)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        crate::process::terminate(&[self.pid], Duration::from_secs(2));
    }
}

fn spoofed_source(lab: &Lab, pods: &Pods, probe: &Probe) -> Check {
    let check = Check::new(
        "a spoofed source address",
        "no connection, or one carrying the sender's own identity",
    );
    let Some(impostor) = lab
        .state()
        .pods
        .iter()
        .find(|p| p.key() != pods.local.key() && p.identity != pods.local.identity)
        .cloned()
    else {
        return check.skip("no other pod to impersonate");
    };
    let Some(impostor_ip) = impostor
        .ips
        .iter()
        .copied()
        .find(|ip| IpFamily::of(*ip) == pods.family)
    else {
        return check.skip("no other pod to impersonate");
    };
    let netns = match kanava_netns::NetNs::named(&pods.local.netns) {
        Ok(netns) => netns,
        Err(error) => return check.fail(error.to_string()),
    };
    let target = probe.address;
    let connected = netns.run(move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            None,
        )?;
        match impostor_ip {
            IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
        socket.bind(&SocketAddr::from((impostor_ip, 0)).into())?;
        socket.connect_timeout(&target.into(), Duration::from_secs(2))?;
        let mut stream: TcpStream = socket.into();
        stream.write_all(b"spoofed")?;
        std::io::Result::Ok(())
    });
    match connected {
        Ok(Ok(())) => {
            std::thread::sleep(Duration::from_millis(500));
            let log = lab
                .logs(&format!("ztunnel/{}", probe.pod.node))
                .unwrap_or_default();
            let line = log.lines().rev().find(|l| {
                l.contains("direction=inbound") && l.contains(&format!("dst.addr={target}"))
            });
            match line {
                Some(line) if line.contains(&pods.local.identity) => {
                    check.pass(format!("arrived as {}", pods.local.identity))
                }
                Some(line) => check.fail(format!("arrived as: {}", short(line))),
                None => check.pass("the destination saw no connection"),
            }
        }
        Ok(Err(error)) => check.pass(format!(
            "as {impostor_ip}: not made ({})",
            short(&error.to_string())
        )),
        Err(error) => check.fail(error.to_string()),
    }
}

fn fabric_only_tls(lab: &Lab, pods: &Pods, probe: &Probe) -> Check {
    let check = Check::new(
        "a pod's traffic on the node-to-node fabric",
        "only TLS on port 15008, no plaintext",
    );
    let capture = match crate::capture::Capture::start(lab) {
        Ok(capture) => capture,
        Err(error) => return check.fail(format!("tcpdump: {error}")),
    };
    let marker = format!("KANAVA-VERIFY-{}", std::process::id());
    let sent = lab
        .connect(&pods.local.key(), probe.address, TIMEOUT)
        .and_then(|mut stream| {
            stream
                .write_all(marker.repeat(64).as_bytes())
                .map_err(crate::Error::io("write"))?;
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            let _ = stream.set_read_timeout(Some(TIMEOUT));
            let _ = stream.read_to_end(&mut answer);
            Ok(answer.len())
        });
    let packets = match capture.stop() {
        Ok(packets) => packets,
        Err(error) => return check.fail(error.to_string()),
    };
    if let Err(error) = sent {
        return check.fail(format!("could not send through the mesh: {error}"));
    }
    let between: Vec<_> = packets
        .iter()
        .filter(|p| {
            let ends = [p.source.ip(), p.destination.ip()];
            ends.contains(&pods.local_ip) && ends.contains(&probe.address.ip())
        })
        .collect();
    let outside_15008 = between
        .iter()
        .filter(|p| p.source.port() != ports::HBONE && p.destination.port() != ports::HBONE)
        .count();
    let in_clear = between
        .iter()
        .any(|p| crate::capture::contains(&p.payload, marker.as_bytes()));
    check.judge(
        !in_clear && outside_15008 == 0 && !between.is_empty(),
        format!(
            "{} packets, {outside_15008} outside 15008, payload in clear: {}",
            between.len(),
            if in_clear { "yes" } else { "no" }
        ),
    )
}

fn deny_closes(lab: &mut Lab, pods: &Pods, probe: &Probe) -> Check {
    let check = Check::new(
        "a DENY added while connections are open",
        "the open connection closes within a second",
    );
    let policy = format!(
        "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: kanava-verify-deny, namespace: {}}}\n\
         spec: {{action: DENY, rules: [{{from: [{{principals: [\"{}\"]}}], to: [{{ports: [{PROBE_PORT}]}}]}}]}}\n",
        probe.pod.namespace,
        pods.local.identity.trim_start_matches("spiffe://"),
    );
    let mut stream = match lab.connect(&pods.local.key(), probe.address, TIMEOUT) {
        Ok(stream) => stream,
        Err(error) => return check.fail(format!("could not connect: {error}")),
    };
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    if stream.write_all(b"before").is_err() {
        return check.fail("the connection failed before the policy");
    }
    let applied = Instant::now();
    if let Err(error) = lab.apply(&policy) {
        return check.fail(format!("could not apply the policy: {error}"));
    }
    let chunk = vec![b'x'; 16 * 1024];
    let mut ended = None;
    while applied.elapsed() < TIMEOUT {
        if stream.write_all(&chunk).is_err() {
            ended = Some(applied.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = lab.delete(&policy);
    match ended {
        Some(after) if after < Duration::from_secs(1) => {
            check.pass(format!("closed {after:.1?} after the policy was applied"))
        }
        Some(after) => check.fail(format!("closed only after {after:.1?}")),
        None => check.fail(format!("still open {TIMEOUT:?} after the policy")),
    }
}

/// A GET from `from` to `to`: the whole answer, or empty when refused.
fn http(lab: &Lab, from: &str, to: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = lab.connect(from, to, TIMEOUT) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let request = format!("GET {path} HTTP/1.0\r\nHost: verify\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// A certificate for `identity` signed by a CA the mesh has never seen.
fn foreign_cert(identity: &Identity) -> Result<kanava_tls::WorkloadCert, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    };
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issuer = Issuer::new(params, key);
    let request = kanava_tls::CertificateRequest::generate(identity).map_err(|e| e.to_string())?;
    let csr = CertificateSigningRequestParams::from_der(&request.csr_der().to_vec().into())
        .map_err(|e| e.to_string())?;
    let leaf = csr
        .params
        .signed_by(&csr.public_key, &issuer)
        .map_err(|e| e.to_string())?;
    request.into_cert(&[leaf.pem()]).map_err(|e| e.to_string())
}

/// The first line of `text`, at most 90 characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(90) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}

/// Whether every check that ran passed.
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.passed != Some(false))
}
