//! Rotating the mesh root under live traffic (`kanava ca rotate`): held
//! connections keep every byte and new connections between pods on two
//! nodes never fail; afterwards a certificate under the old root is
//! refused, and one under the new root is taken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kanava_e2e::{MESH_LAB, churn, connect, hold, kanava, mesh_cert, pod_ip, runtime, up};
use kanava_tls::{MeshRoots, WorkloadCert};

/// Held connections through the rotation.
const HELD: usize = 50;

/// A CONNECT through the echo pod's HBONE port, proving `cert` and
/// trusting `roots`: the status of the answer, or why there was none.
async fn hbone_connect(
    lab: &kanava_lab::Lab,
    cert: &WorkloadCert,
    roots: &MeshRoots,
) -> Result<http::StatusCode, String> {
    let echo_ip = pod_ip(lab, "shop/echo");
    let attempt = async {
        let stream = kanava_e2e::tls_to_echo_hbone(lab, cert, roots)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = h2::client::handshake(stream)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{echo_ip}:7000"))
            .body(())
            .unwrap();
        let (response, _send) = sender
            .send_request(request, false)
            .map_err(|e| format!("CONNECT: {e}"))?;
        let response = response.await.map_err(|e| format!("CONNECT: {e}"))?;
        Ok(response.status())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

#[test]
fn a_root_rotates_under_traffic_without_a_failed_connection_and_the_old_root_is_refused_after() {
    let lab = up(MESH_LAB);
    let echo = SocketAddr::new(pod_ip(&lab, "shop/echo"), 7000);
    let client: kanava_mesh::Identity = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    let rt = runtime();
    let old_roots = kanava_e2e::mesh_roots(&lab);
    let under_old_root = mesh_cert(&lab, &client);
    assert_eq!(
        rt.block_on(hbone_connect(&lab, &under_old_root, &old_roots)),
        Ok(http::StatusCode::OK),
        "before the rotation, the old root is the mesh's"
    );

    // Connections from node-1's client to node-2's echo: held, and new
    // ones throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let tcp = rt.block_on(connect(&lab, "shop/client", echo));
            rt.spawn(hold(tcp, i as u64, stop.clone()))
        })
        .collect();
    let churn = churn(&lab, "shop/client", echo, 16, 100, 8);
    std::thread::sleep(Duration::from_secs(1));
    let rotated = kanava()
        .args(["ca", "rotate", "--name", lab.name(), "--output", "json"])
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rotated.stdout),
        String::from_utf8_lossy(&rotated.stderr)
    );
    let rotation: serde_json::Value = serde_json::from_slice(&rotated.stdout).unwrap();
    let steps: Vec<&str> = rotation["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["trust", "sign", "retire"], "{rotation}");
    assert!(
        rotation["steps"][1]["certificates"].as_u64().unwrap() >= 4,
        "every enrolled identity's certificate was replaced: {rotation}"
    );
    assert_ne!(rotation["oldRoots"][0], rotation["newRoot"]);

    let churned = churn.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    for (i, task) in held.into_iter().enumerate() {
        let (sent, received, bytes) = rt.block_on(task).expect("held connection task");
        assert_eq!(sent, received, "connection {i}: every byte came back");
        assert!(bytes > 0);
    }
    assert_eq!(churned["errors"], 0, "no new connection failed: {churned}");
    assert!(
        churned["connections"].as_u64().unwrap_or(0) > 500,
        "the churn ran: {churned}"
    );

    // After: the old root is refused, the new one taken; the lab's files
    // hold the new root alone, and the old root's key is gone.
    let new_roots = kanava_e2e::mesh_roots(&lab);
    assert_eq!(
        new_roots.fingerprints(),
        [rotation["newRoot"].as_str().unwrap()]
    );
    assert!(!lab.ca_dir().join("root-key.pem").exists());
    let refused = rt.block_on(hbone_connect(&lab, &under_old_root, &new_roots));
    assert!(
        refused.is_err(),
        "a certificate under the retired root was accepted: {refused:?}"
    );
    let under_new_root = mesh_cert(&lab, &client);
    assert_eq!(
        rt.block_on(hbone_connect(&lab, &under_new_root, &new_roots)),
        Ok(http::StatusCode::OK)
    );
    // `kanava status` shows one root and no certificate left to replace.
    let status = kanava()
        .args(["status", "--name", lab.name(), "--output", "json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["roots"], 1, "{status}");
        assert_eq!(node["superseded"], 0, "{status}");
    }
    assert_eq!(status["healthy"], true, "{status}");
}
