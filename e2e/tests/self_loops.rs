//! No pod can make a ztunnel proxy a connection back into its own
//! listeners. Before these were refused, one connection to 127.0.0.1:15001
//! from an enrolled pod, or to a permissive pod's :15006 from anywhere,
//! looped through the ztunnel until the whole node ran out of file
//! descriptors. Each case counts the ztunnel's open files before and after.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kanava_e2e::{MESH_LAB, apply, log_line, pod_ip, up};
use kanava_lab::Lab;

const PERMISSIVE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: open
  labels: {kanava.io/dataplane-mode: ambient, kanava.io/mtls-mode: permissive}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: open}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
"#;

/// Open files of the ztunnel on `node`.
fn open_files(lab: &Lab, node: &str) -> usize {
    let pid = lab
        .state()
        .node(node)
        .and_then(|n| n.ztunnel.pid)
        .expect("ztunnel pid");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the ztunnel's descriptors")
        .count()
}

/// Connects from `from` to `to`, sends a few bytes and waits for the
/// connection to end. Returns how long it stayed open (a loop keeps it
/// open while the ztunnel drowns).
fn poke(lab: &Lab, from: &str, to: SocketAddr) -> Duration {
    let started = Instant::now();
    let Ok(mut stream) = lab.connect(from, to, Duration::from_secs(5)) else {
        return started.elapsed();
    };
    let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sink = [0u8; 256];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    started.elapsed()
}

/// Waits until `node`'s ztunnel holds at most `limit` open files; returns
/// the last count.
fn settle(lab: &Lab, node: &str, limit: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_files(lab, node);
        if now <= limit || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pod_cannot_loop_connections_through_its_own_ztunnel() {
    let lab = up(MESH_LAB);
    let client_ip = pod_ip(&lab, "shop/client");
    let before = open_files(&lab, "node-1");
    for to in [
        SocketAddr::from(([127, 0, 0, 1], 15001)),
        SocketAddr::from(([127, 0, 0, 1], 15006)),
        SocketAddr::from(([127, 0, 0, 1], 15008)),
        SocketAddr::from((client_ip, 15001)),
        SocketAddr::from((client_ip, 15006)),
    ] {
        let open_for = poke(&lab, "shop/client", to);
        assert!(
            open_for < Duration::from_secs(5),
            "{to} stayed open {open_for:?}"
        );
    }
    let after = settle(&lab, "node-1", before + 10);
    assert!(
        after <= before + 10,
        "the ztunnel on node-1 went from {before} to {after} open files"
    );
    let refusal = log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("127.0.0.1:15001") && l.contains("outcome=denied")
    });
    assert!(refusal.contains("loop"), "{refusal}");
}

#[test]
fn no_peer_can_loop_a_permissive_pods_plaintext_port() {
    let mut lab = up(MESH_LAB);
    apply(&mut lab, PERMISSIVE);
    let web = pod_ip(&lab, "open/web");
    // Control: plaintext to the app is admitted in permissive mode.
    let open_for = poke(&lab, "legacy/plain-client", SocketAddr::from((web, 80)));
    assert!(open_for < Duration::from_secs(5));
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains(&format!("{web}:80")) && l.contains("outcome=success")
    });

    let before = open_files(&lab, "node-2");
    for from in ["legacy/plain-client", "shop/client"] {
        for port in [15001, 15006] {
            let to = SocketAddr::from((web, port));
            let open_for = poke(&lab, from, to);
            assert!(
                open_for < Duration::from_secs(5),
                "{from} → {to} stayed open {open_for:?}"
            );
        }
    }
    let after = settle(&lab, "node-2", before + 10);
    assert!(
        after <= before + 10,
        "the ztunnel on node-2 went from {before} to {after} open files"
    );
    let refusal = log_line(&lab, "ztunnel/node-2", |l| {
        l.contains(&format!("{web}:15006")) && l.contains("outcome=denied")
    });
    assert!(refusal.contains("loop"), "{refusal}");
}
