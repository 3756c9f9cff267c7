//! Traffic between pods through the mesh: correctness, identities, peers,
//! multiplexing, large transfers and half-closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kanava_e2e::{MESH_LAB, connect, exec_ok, kanava, log_line, metric, pod_ip, runtime, up};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn http_crosses_nodes_and_the_server_sees_the_client() {
    let lab = up(MESH_LAB);
    let client_ip = pod_ip(&lab, "shop/client");

    // Across nodes, through the CLI as a user would.
    let url = format!("http://{}/", pod_ip(&lab, "shop/web"));
    let output = kanava()
        .args([
            "lab",
            "exec",
            "--name",
            lab.name(),
            "shop/client",
            "--",
            "curl",
            "-sf",
            "-m",
            "10",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body = String::from_utf8(output.stdout).unwrap();
    assert!(body.starts_with("hello from shop/web\n"), "{body}");
    assert!(
        body.contains(&format!("peer {client_ip}:")),
        "the server must see the client pod's IP: {body}"
    );

    // On one node.
    let url = format!("http://{}/", pod_ip(&lab, "shop/local-web"));
    let body = exec_ok(&lab, "shop/client", &["curl", "-sf", "-m", "10", &url]);
    assert!(body.starts_with("hello from shop/local-web\n"), "{body}");
    assert!(body.contains(&format!("peer {client_ip}:")), "{body}");

    // Both went over HBONE, and the destination logged who called.
    let inbound = log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("connection complete")
            && l.contains("direction=inbound")
            && l.contains("pod=shop/web")
    });
    assert!(
        inbound.contains("src.identity=\"spiffe://cluster.local/ns/shop/sa/client\""),
        "{inbound}"
    );
    assert!(inbound.contains("transport=hbone"), "{inbound}");
    assert!(inbound.contains("outcome=success"), "{inbound}");
    // The same-node request went through HBONE too.
    log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("direction=inbound")
            && l.contains("pod=shop/local-web")
            && l.contains("sa/client")
    });
}

#[test]
fn unenrolled_pods_are_not_captured_but_reachable_from_the_mesh() {
    let lab = up(MESH_LAB);
    // No capture rules in the unenrolled pod's namespace, none of ours anywhere
    // but in enrolled pods.
    let rules = exec_ok(&lab, "legacy/plain-client", &["iptables-save"]);
    assert!(
        !rules.contains("KANAVA"),
        "unenrolled pod has capture rules:\n{rules}"
    );
    let rules = exec_ok(&lab, "shop/client", &["iptables-save"]);
    assert!(
        rules.contains("KANAVA_OUTPUT"),
        "enrolled pod lacks capture rules:\n{rules}"
    );
    for node in ["node/node-1", "node/node-2"] {
        assert!(
            !exec_ok(&lab, node, &["iptables-save"]).contains("KANAVA"),
            "rules in {node}'s namespace"
        );
    }

    // Plain pod to plain pod works, in plaintext.
    let plain_web = pod_ip(&lab, "legacy/plain-web");
    let body = exec_ok(
        &lab,
        "legacy/plain-client",
        &["curl", "-sf", "-m", "10", &format!("http://{plain_web}/")],
    );
    assert!(body.starts_with("hello from legacy/plain-web"), "{body}");

    // An enrolled pod reaches it too (passthrough), keeping its own IP.
    let body = exec_ok(
        &lab,
        "shop/client",
        &["curl", "-sf", "-m", "10", &format!("http://{plain_web}/")],
    );
    assert!(body.starts_with("hello from legacy/plain-web"), "{body}");
    assert!(
        body.contains(&format!("peer {}:", pod_ip(&lab, "shop/client"))),
        "{body}"
    );
    log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("direction=outbound")
            && l.contains("transport=passthrough")
            && l.contains("outcome=success")
    });
}

#[test]
fn hundred_concurrent_streams_share_few_tls_connections() {
    let lab = up(MESH_LAB);
    let echo = SocketAddr::from((pod_ip(&lab, "shop/echo"), 7000));
    let streams = 100;
    let size = 1024 * 1024;
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for seed in 0..streams {
            let stream = connect(&lab, "shop/client", echo).await;
            tasks.push(tokio::spawn(async move {
                let mut data = vec![0u8; size];
                kanava_lab::pattern(seed as u64 + 1, &mut data);
                let expected = Sha256::digest(&data);
                let (mut read, mut write) = stream.into_split();
                let writer = tokio::spawn(async move {
                    write.write_all(&data).await.unwrap();
                    write.shutdown().await.unwrap();
                });
                let mut echoed = Vec::with_capacity(size);
                read.read_to_end(&mut echoed).await.unwrap();
                writer.await.unwrap();
                assert_eq!(echoed.len(), size, "stream {seed} lost bytes");
                assert_eq!(Sha256::digest(&echoed), expected, "stream {seed} corrupted");
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("streams finish in time")
                .unwrap();
        }
    });
    let opened = metric(&lab, "node-1", "kanava_hbone_connections_opened_total");
    assert!(opened >= 1.0, "the streams went over HBONE");
    assert!(
        opened < streams as f64,
        "{streams} streams used {opened} TLS connections; they must be multiplexed"
    );
}

#[test]
fn large_transfer_arrives_intact_and_half_close_keeps_the_reply() {
    let lab = up(MESH_LAB);
    let sink = SocketAddr::from((pod_ip(&lab, "shop/sink"), 9000));
    let echo = SocketAddr::from((pod_ip(&lab, "shop/echo"), 7000));
    runtime().block_on(async {
        // 256 MiB; the sink answers with length and SHA-256 only after our
        // half-close, so the answer also proves half-close is carried.
        let total: u64 = 256 * 1024 * 1024;
        let mut stream = connect(&lab, "shop/client", sink).await;
        let mut hasher = Sha256::new();
        let mut block = vec![0u8; 1024 * 1024];
        for seed in 0..(total / block.len() as u64) {
            kanava_lab::pattern(seed, &mut block);
            hasher.update(&block);
            stream.write_all(&block).await.unwrap();
        }
        stream.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(300), stream.read_to_string(&mut answer))
            .await
            .expect("sink answers")
            .unwrap();
        assert_eq!(
            answer.trim(),
            format!("{total} {}", hex::encode(hasher.finalize()))
        );

        // Half-close against an echo: everything sent comes back after FIN.
        let mut stream = connect(&lab, "shop/client", echo).await;
        let message = b"the reply must outlive our half-close".repeat(1000);
        stream.write_all(&message).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut echoed))
            .await
            .expect("echo completes")
            .unwrap();
        assert_eq!(echoed, message);
    });
}
