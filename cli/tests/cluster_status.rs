//! `kanava status --kubeconfig` against an HTTP server in the test that
//! speaks the API server's protocol: nodes, the ztunnel pods, and the API
//! server's proxy to their metrics and to the control plane's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../control-plane/tests/support/api_server.rs"]
mod api_server;

use api_server::{ApiServer, NODES, PODS};
use serde_json::json;

const NS: &str = "kanava-system";

fn ztunnel_pod(name: &str, node: &str, ready: bool, restarts: i32) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "labels": {"app.kubernetes.io/name": "ztunnel"}},
        "spec": {"nodeName": node, "containers": [{"name": "ztunnel"}]},
        "status": {
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": "ztunnel", "ready": ready, "restartCount": restarts,
                                   "image": "i", "imageID": "i"}]
        }
    })
}

fn ztunnel_metrics(version: u32, captured: u32, expiry: f64) -> String {
    format!(
        "# TYPE kanava_discovery_version gauge\nkanava_discovery_version {version}\n\
         # TYPE kanava_pods_captured gauge\nkanava_pods_captured {captured}\n\
         # TYPE kanava_certificate_expiry_timestamp_seconds gauge\n\
         kanava_certificate_expiry_timestamp_seconds{{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}} {expiry}\n# EOF\n"
    )
}

fn status(server: &ApiServer, dir: &std::path::Path, json: bool) -> (i32, String) {
    let kubeconfig = server.kubeconfig(dir);
    let mut args = vec![
        "status".to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    if json {
        args.extend(["--output".into(), "json".into()]);
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kanava"))
        .args(&args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn cluster_status_reads_ztunnels_and_the_control_plane_through_the_api_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(ApiServer::start());
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for node in ["node-a", "node-b"] {
        server.apply(
            NODES,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        );
    }
    server.apply(PODS, ztunnel_pod("ztunnel-a", "node-a", true, 0));
    server.apply(PODS, ztunnel_pod("ztunnel-b", "node-b", true, 2));
    server.proxy(
        &format!("/api/v1/namespaces/{NS}/services/kanava-control-plane:15014/proxy/metrics"),
        "# TYPE kanava_control_plane_configuration_version gauge\nkanava_control_plane_configuration_version 7\n\
         # TYPE kanava_control_plane_source_synced gauge\nkanava_control_plane_source_synced 1\n# EOF\n",
    );
    for pod in ["ztunnel-a", "ztunnel-b"] {
        server.proxy(
            &format!("/api/v1/namespaces/{NS}/pods/{pod}:15020/proxy/metrics"),
            &ztunnel_metrics(7, 3, now + 86_000.0),
        );
    }

    let (code, out) = status(&server, dir.path(), false);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("control plane: ready, version 7"), "{out}");
    let b = out.lines().find(|l| l.starts_with("node-b")).unwrap();
    assert!(
        b.contains("ztunnel-b") && b.contains(" 3 ") && b.ends_with('2'),
        "{b}"
    );
    assert!(out.contains("all healthy"), "{out}");

    // node-b's ztunnel is behind and not ready; a third node has none.
    server.apply(PODS, ztunnel_pod("ztunnel-b", "node-b", false, 3));
    server.proxy(
        &format!("/api/v1/namespaces/{NS}/pods/ztunnel-b:15020/proxy/metrics"),
        &ztunnel_metrics(5, 3, now + 120.0),
    );
    server.apply(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c"}}),
    );
    let (code, out) = status(&server, dir.path(), true);
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["healthy"], false);
    let problems = |node: &str| {
        json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node)
            .unwrap()["problems"]
            .to_string()
    };
    assert!(problems("node-a") == "[]", "{}", problems("node-a"));
    let b = problems("node-b");
    assert!(
        b.contains("not ready")
            && b.contains("version 5")
            && b.contains("expires within 10 minutes"),
        "{b}"
    );
    assert!(
        problems("node-c").contains("no ztunnel pod"),
        "{}",
        problems("node-c")
    );

    // The requests were reads through the API server's proxy, nothing else.
    let requests = server.requests();
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("labelSelector=app.kubernetes.io%2Fname%3Dztunnel")),
        "{requests:?}"
    );
}
