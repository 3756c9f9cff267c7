//! The core scenarios, once per kind of cluster: IPv4, IPv6-only and
//! dual-stack. Each scenario is written once and runs against every
//! address family the lab has; in a dual-stack lab a pod is reached on each
//! of its addresses and proves the same identity on both.
//!
//! Also here: what STRICT means for UDP (dropped and counted, delivered to
//! an opened port, the pod's own DNS lookups answered), in every family.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kanava_e2e::{
    Capture, MESH_LAB, apply, delete, exec_ok, http_get, kanava, log_line, runtime, udp_answered,
    up, verify_report, wait_for,
};
use kanava_lab::{IpFamily, Lab};
use rustix::process::{Pid, Signal, kill_process};

/// Beside [`MESH_LAB`]'s pods: a Service in every family of the lab, a
/// STRICT pod with UDP echo servers on an opened port (5353) and a closed
/// one (5000), and a DNS server outside the mesh.
const EXTRA: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  nodeName: node-2
  serviceAccountName: api
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ipFamilyPolicy: PreferDualStack
  ports: [{port: 8080, targetPort: 80}]
---
apiVersion: v1
kind: Pod
metadata:
  name: udp
  namespace: shop
  annotations: {kanava.io/plaintext-inbound-ports: udp/5353}
spec:
  nodeName: node-2
  containers:
  - {name: c, command: [sh, -c, "labapp udp-echo --port 5353 & exec labapp udp-echo --port 5000"]}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: legacy}
spec:
  nodeName: node-2
  containers:
  - {name: c, command: [labapp, dns, --port, "53"]}
"#;

fn lab_in(families: &str) -> Lab {
    let file = format!(
        "{}---{EXTRA}",
        MESH_LAB.replacen(
            "nodes: 2\n",
            &format!("nodes: 2\nipFamilies: {families}\n"),
            1
        )
    );
    up(&file)
}

/// A pod's address of `family`.
fn ip(lab: &Lab, pod: &str, family: IpFamily) -> IpAddr {
    lab.pod(pod)
        .unwrap()
        .ips
        .iter()
        .copied()
        .find(|ip| IpFamily::of(*ip) == family)
        .unwrap_or_else(|| panic!("{pod} has no {family} address"))
}

/// Runs every core scenario on a lab of `families` (`[IPv4]`, `[IPv6]`,
/// `[IPv4, IPv6]`).
fn core_scenarios(families: &str) {
    let mut lab = lab_in(families);
    let all: Vec<IpFamily> = lab.state().families.iter().collect();
    for pod in ["shop/client", "shop/web", "legacy/plain-web"] {
        assert_eq!(
            lab.pod(pod).unwrap().ips.len(),
            all.len(),
            "{pod} has an address of every family"
        );
    }
    for &family in &all {
        identities_in_both_access_logs_and_only_tls_on_the_fabric(&lab, family);
        plaintext_is_refused(&lab, family);
        services_answer_on_their_virtual_ip(&lab, family);
        strict_drops_udp_except_opened_ports_and_dns_answers(&lab, family);
        icmp_errors_reach_a_strict_pod(&lab, family);
        config_dump_shows_the_address(&lab, family);
    }
    permissive_leaves_udp_alone(&mut lab, &all);
    policy_by_principal_and_by_ip_blocks(&mut lab, &all);
    live_relabel(&mut lab, &all);
    restart_recovery(&mut lab, &all);
    verify_passes_in_every_family(&lab, &all);
}

#[test]
fn core_scenarios_on_ipv4() {
    core_scenarios("[IPv4]");
}

#[test]
fn core_scenarios_on_ipv6() {
    core_scenarios("[IPv6]");
}

#[test]
fn core_scenarios_on_dual_stack() {
    core_scenarios("[IPv6, IPv4]");
}

fn identities_in_both_access_logs_and_only_tls_on_the_fabric(lab: &Lab, family: IpFamily) {
    let rt = runtime();
    let client = ip(lab, "shop/client", family);
    let web = SocketAddr::new(ip(lab, "shop/web", family), 80);
    let capture = Capture::start(lab);
    let body = rt
        .block_on(http_get(lab, "shop/client", web))
        .unwrap_or_else(|e| panic!("{family}: client → {web}: {e}"));
    let packets = capture.stop();
    assert!(body.starts_with("hello from shop/web\n"), "{body}");
    let peer = match client {
        IpAddr::V4(_) => format!("peer {client}:"),
        IpAddr::V6(_) => format!("peer [{client}]:"),
    };
    assert!(
        body.contains(&peer),
        "{family}: the app sees the client's own address: {body}"
    );
    let dst = format!("dst.addr={web}");
    let inbound = log_line(lab, "ztunnel/node-2", |l| {
        l.contains("direction=inbound") && l.contains(&dst) && l.contains("outcome=success")
    });
    assert!(
        inbound.contains("src.identity=\"spiffe://cluster.local/ns/shop/sa/client\"")
            && inbound.contains("transport=hbone"),
        "{family}: {inbound}"
    );
    let outbound = log_line(lab, "ztunnel/node-1", |l| {
        l.contains("direction=outbound") && l.contains(&dst) && l.contains("outcome=success")
    });
    assert!(
        outbound.contains("dst.identity=\"spiffe://cluster.local/ns/shop/sa/web\""),
        "{family}: the same identity on every address: {outbound}"
    );

    // The fabric carried the request only inside TLS on port 15008.
    let between: Vec<_> = packets
        .iter()
        .filter(|p| {
            let ends = [p.source.ip(), p.destination.ip()];
            ends.contains(&client) && ends.contains(&web.ip())
        })
        .collect();
    assert!(!between.is_empty(), "{family}: nothing captured");
    assert!(
        between
            .iter()
            .all(|p| p.source.port() == 15008 || p.destination.port() == 15008),
        "{family}: a packet outside 15008"
    );
    assert!(
        !between
            .iter()
            .any(|p| kanava_lab::capture::contains(&p.payload, b"hello from")),
        "{family}: plaintext on the fabric"
    );
}

fn plaintext_is_refused(lab: &Lab, family: IpFamily) {
    let rt = runtime();
    let web = SocketAddr::new(ip(lab, "shop/web", family), 80);
    let result = rt.block_on(http_get(lab, "legacy/plain-client", web));
    assert!(
        result.is_err(),
        "{family}: plaintext reached {web}: {result:?}"
    );
    // While a pod outside the mesh still reaches one outside.
    let plain = SocketAddr::new(ip(lab, "legacy/plain-web", family), 80);
    rt.block_on(http_get(lab, "legacy/plain-client", plain))
        .unwrap_or_else(|e| panic!("{family}: {plain}: {e}"));
}

fn services_answer_on_their_virtual_ip(lab: &Lab, family: IpFamily) {
    let rt = runtime();
    let services = lab.services().unwrap();
    let api = services.iter().find(|s| s.name == "api").expect("service");
    let vip: IpAddr = api
        .cluster_ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .find(|ip: &IpAddr| IpFamily::of(*ip) == family)
        .unwrap_or_else(|| panic!("{family}: no virtual IP in {:?}", api.cluster_ips));
    let to = SocketAddr::new(vip, 8080);
    let body = rt
        .block_on(http_get(lab, "shop/client", to))
        .unwrap_or_else(|e| panic!("{family}: {to}: {e}"));
    assert!(body.starts_with("hello from shop/api\n"), "{body}");
    let service = "dst.service=\"shop/api\"";
    log_line(lab, "ztunnel/node-1", |l| {
        l.contains("direction=outbound")
            && l.contains(service)
            && l.contains("sa/api")
            && l.contains("outcome=success")
    });
}

fn strict_drops_udp_except_opened_ports_and_dns_answers(lab: &Lab, family: IpFamily) {
    let udp = ip(lab, "shop/udp", family);
    let send = |port: u16| {
        let to = SocketAddr::new(udp, port).to_string();
        lab.exec(
            "legacy/plain-client",
            &[
                "labapp", "udp-send", "--to", &to, "--count", "3", "--wait", "300ms",
            ],
        )
        .unwrap()
    };
    let dropped_before = dropped(lab, "shop/udp");
    let closed = send(5000);
    assert!(
        !closed.status.success(),
        "{family}: UDP reached a STRICT pod's closed port: {}",
        String::from_utf8_lossy(&closed.stdout)
    );
    let opened = send(5353);
    assert!(
        opened.status.success(),
        "{family}: the opened port did not answer: {}{}",
        String::from_utf8_lossy(&opened.stdout),
        String::from_utf8_lossy(&opened.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&opened.stdout).trim(),
        "3 of 3 answered"
    );
    // Counted, per pod (the counters are read every 5 s).
    wait_for(&format!("{family}: the drops of shop/udp counted"), || {
        dropped(lab, "shop/udp") >= dropped_before + 3.0
    });

    // The enrolled pod's own DNS lookups are answered.
    let server = SocketAddr::new(ip(lab, "legacy/dns", family), 53).to_string();
    let mut argv = vec!["labapp", "resolve", "--server", &server, "api.shop.example"];
    if family == IpFamily::IPv6 {
        argv.push("--ipv6");
    }
    let answer = exec_ok(lab, "shop/client", &argv);
    let expected = match family {
        IpFamily::IPv4 => "192.0.2.1",
        IpFamily::IPv6 => "2001:db8::1",
    };
    assert!(answer.contains(expected), "{family}: {answer}");
}

/// A STRICT pod sends UDP to a closed port outside the mesh: the ICMP
/// "port unreachable" that comes back reaches it (ICMP is not filtered).
fn icmp_errors_reach_a_strict_pod(lab: &Lab, family: IpFamily) {
    let socket = lab
        .udp_socket("shop/client", SocketAddr::new(family.unspecified(), 0))
        .unwrap();
    let closed = SocketAddr::new(ip(lab, "legacy/plain-web", family), 9);
    socket.connect(closed).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send(b"anyone?").unwrap();
    let mut buffer = [0u8; 16];
    let error = socket.recv(&mut buffer).expect_err("nothing listens there");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{family}: the ICMP error did not reach the STRICT pod: {error}"
    );
}

/// The pod's address of this family is in its node's configuration dump.
fn config_dump_shows_the_address(lab: &Lab, family: IpFamily) {
    let output = kanava()
        .args(["config-dump", "--name", lab.name(), "node-2", "-o", "json"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let dump = String::from_utf8_lossy(&output.stdout);
    let web = ip(lab, "shop/web", family).to_string();
    assert!(
        dump.contains(&format!("\"{web}\"")),
        "{family}: {web} not in {dump}"
    );
}

/// PERMISSIVE leaves non-TCP alone, and the guard follows the namespace's
/// mode while its pods run.
fn permissive_leaves_udp_alone(lab: &mut Lab, all: &[IpFamily]) {
    let namespace = |mode: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{kanava.io/dataplane-mode: ambient, kanava.io/mtls-mode: {mode}}}}}\n"
        )
    };
    let answered = |lab: &Lab, family: IpFamily| {
        let to = SocketAddr::new(ip(lab, "shop/udp", family), 5000);
        udp_answered(lab, "legacy/plain-client", to, 1)
    };
    apply(lab, &namespace("permissive"));
    for &family in all {
        wait_for(&format!("{family}: UDP delivered in PERMISSIVE"), || {
            answered(lab, family)
        });
    }
    apply(lab, &namespace("strict"));
    for &family in all {
        wait_for(&format!("{family}: UDP dropped again in STRICT"), || {
            !answered(lab, family)
        });
    }
}

/// `kanava_non_tcp_dropped_packets_total` of one pod, on node-2.
fn dropped(lab: &Lab, pod: &str) -> f64 {
    let text = exec_ok(
        lab,
        "node/node-2",
        &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
    );
    let labels = format!("pod=\"{pod}\",protocol=\"udp\"");
    text.lines()
        .filter(|l| l.starts_with("kanava_non_tcp_dropped_packets_total{") && l.contains(&labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn policy_by_principal_and_by_ip_blocks(lab: &mut Lab, all: &[IpFamily]) {
    let rt = runtime();
    let policy = |name: &str, from: &str| {
        format!(
            "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  action: ALLOW\n  rules:\n  - from: [{from}]\n    to: [{{ports: [80]}}]\n"
        )
    };
    let node_1_pods: Vec<String> = lab.state().nodes[0]
        .pod_cidrs
        .iter()
        .map(|cidr| format!("\"{cidr}\""))
        .collect();
    let cases = [
        policy(
            "client-only",
            "{principals: [cluster.local/ns/shop/sa/client]}",
        ),
        policy(
            "node-1-only",
            &format!("{{ipBlocks: [{}]}}", node_1_pods.join(", ")),
        ),
    ];
    for policy in cases {
        apply(lab, &policy);
        for &family in all {
            let web = SocketAddr::new(ip(lab, "shop/web", family), 80);
            // shop/client is on node-1 with the allowed identity; shop/sink
            // is on node-2 with another one.
            wait_for(&format!("{family}: the policy refuses shop/sink"), || {
                rt.block_on(http_get(lab, "shop/sink", web)).is_err()
            });
            rt.block_on(http_get(lab, "shop/client", web))
                .unwrap_or_else(|e| panic!("{family}: allowed client refused: {e}\n{policy}"));
        }
        delete(lab, &policy);
    }
    for &family in all {
        let web = SocketAddr::new(ip(lab, "shop/web", family), 80);
        wait_for(&format!("{family}: shop/sink allowed again"), || {
            rt.block_on(http_get(lab, "shop/sink", web)).is_ok()
        });
    }
}

fn live_relabel(lab: &mut Lab, all: &[IpFamily]) {
    let rt = runtime();
    let enrolled = "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {kanava.io/dataplane-mode: ambient}}\n";
    let plain = "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n";
    apply(lab, enrolled);
    for &family in all {
        let to = SocketAddr::new(ip(lab, "legacy/plain-web", family), 80);
        let dst = format!("dst.addr={to}");
        wait_for(
            &format!("{family}: legacy/plain-web reached through the mesh"),
            || {
                rt.block_on(http_get(lab, "shop/client", to)).is_ok()
                    && lab
                        .logs("ztunnel/node-2")
                        .unwrap_or_default()
                        .lines()
                        .any(|l| {
                            l.contains("direction=inbound")
                                && l.contains(&dst)
                                && l.contains("sa/client")
                        })
            },
        );
    }
    apply(lab, plain);
    for &family in all {
        let to = SocketAddr::new(ip(lab, "legacy/plain-web", family), 80);
        wait_for(&format!("{family}: legacy/plain-web released"), || {
            rt.block_on(http_get(lab, "node/node-1", to)).is_ok()
        });
    }
}

fn restart_recovery(lab: &mut Lab, all: &[IpFamily]) {
    let rt = runtime();
    let before = lab.ztunnel("node-2").unwrap();
    kill_process(
        Pid::from_raw(before.pid.unwrap() as i32).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    wait_for("the ztunnel of node-2 restarted", || {
        lab.ztunnel("node-2").unwrap().restarts > before.restarts
    });
    for &family in all {
        let web = SocketAddr::new(ip(lab, "shop/web", family), 80);
        wait_for(&format!("{family}: shop/web served again"), || {
            rt.block_on(http_get(lab, "shop/client", web)).is_ok()
        });
        assert!(
            rt.block_on(http_get(lab, "legacy/plain-client", web))
                .is_err(),
            "{family}: plaintext reached shop/web after the restart"
        );
    }
    // The restarted ztunnel put the UDP guard back as it was.
    let udp = SocketAddr::new(ip(lab, "shop/udp", all[0]), 5000);
    assert!(
        !udp_answered(lab, "legacy/plain-client", udp, 2),
        "UDP reached a closed port after the restart"
    );
    std::thread::sleep(Duration::from_millis(100));
}

fn verify_passes_in_every_family(lab: &Lab, all: &[IpFamily]) {
    let (checks, succeeded) = verify_report(lab);
    for check in &checks {
        if check["name"] == "plaintext to a PERMISSIVE pod" && check["passed"].is_null() {
            continue;
        }
        assert_eq!(check["passed"], true, "{check:#}");
    }
    for &family in all {
        for name in [
            "plaintext to a STRICT pod",
            "UDP to a STRICT pod",
            "a pod's traffic on the node-to-node fabric",
            "a spoofed source address",
        ] {
            assert!(
                checks
                    .iter()
                    .any(|c| c["name"] == name && c["family"] == family.to_string()),
                "{name} ({family}) not checked: {checks:#?}"
            );
        }
    }
    assert!(succeeded);
}
