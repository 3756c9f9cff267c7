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
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": "ztunnel", "ready": ready, "restartCount": restarts,
                                   "image": "i", "imageID": "i"}]
        }
    })
}

fn control_plane_pod(ready: bool) -> serde_json::Value {
    let status = if ready {
        json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    } else {
        json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 Insufficient memory."}]})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kanava-control-plane-7d9f", "namespace": NS, "uid": "uid-cp",
                     "labels": {"app.kubernetes.io/name": "kanava-control-plane"}},
        "spec": {"containers": [{"name": "control-plane"}]},
        "status": status,
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
    status_within(server, dir, json, None)
}

fn status_within(
    server: &ApiServer,
    dir: &std::path::Path,
    json: bool,
    timeout: Option<&str>,
) -> (i32, String) {
    let kubeconfig = server.kubeconfig(dir);
    let mut args = vec![
        "status".to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    if let Some(timeout) = timeout {
        args.extend(["--timeout".into(), timeout.into()]);
    }
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
    server.apply(PODS, control_plane_pod(true));
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

/// The chart is installed but its control plane pod cannot be scheduled,
/// and a ztunnel pod is still being created: the API server's proxy
/// answers 503 at once. `status` says what is wrong and how to see why,
/// at once (it used to retry the 503 for minutes).
#[test]
fn status_names_pods_that_cannot_answer_instead_of_waiting_on_them() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(ApiServer::start());
    let dir = tempfile::tempdir().unwrap();
    for node in ["node-a", "node-b"] {
        server.apply(
            NODES,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    server.apply(PODS, control_plane_pod(false));
    server.apply(PODS, ztunnel_pod("ztunnel-a", "node-a", true, 0));
    server.proxy(
        &format!("/api/v1/namespaces/{NS}/pods/ztunnel-a:15020/proxy/metrics"),
        &ztunnel_metrics(7, 3, now + 86_000.0),
    );
    let mut creating = ztunnel_pod("ztunnel-b", "node-b", false, 0);
    creating["status"]["phase"] = json!("Pending");
    creating["status"]["containerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "ContainerCreating"}});
    server.apply(PODS, creating);

    let (code, out) = status_within(&server, dir.path(), false, Some("60s"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "no ready control plane pod (kanava-control-plane-7d9f is Pending (Unschedulable: \
             0/2 nodes are available: 2 Insufficient memory.)): kubectl -n {NS} describe pod \
             kanava-control-plane-7d9f"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "node-b: the ztunnel pod is Pending (ContainerCreating): kubectl -n {NS} describe pod ztunnel-b"
        )),
        "{out}"
    );
    assert!(!out.contains("node-a:"), "node-a is fine: {out}");
    // Nobody asked the pods that could not answer.
    let requests = server.requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.contains("kanava-control-plane:15014") || r.contains("ztunnel-b:15020")),
        "{requests:?}"
    );

    // A control plane pod that is ready, but whose metrics answer 503:
    // reported from the first answer, not retried.
    server.apply(PODS, control_plane_pod(true));
    let (code, out) = status_within(&server, dir.path(), false, Some("60s"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the control plane's metrics are unreachable") && out.contains("503"),
        "{out}"
    );
    let proxied = server
        .requests()
        .iter()
        .filter(|r| r.contains("kanava-control-plane:15014"))
        .count();
    assert_eq!(
        proxied,
        1,
        "one request, no retries: {:?}",
        server.requests()
    );
}

/// A server that accepts connections and never answers: every call is
/// bounded by one deadline, and what did not answer is named.
#[test]
fn status_gives_up_at_its_deadline_and_says_what_did_not_answer() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(ApiServer::start());
    let dir = tempfile::tempdir().unwrap();
    server.apply(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
    );
    server.apply(PODS, control_plane_pod(true));
    server.apply(PODS, ztunnel_pod("ztunnel-a", "node-a", true, 0));
    server.proxy(
        &format!("/api/v1/namespaces/{NS}/services/kanava-control-plane:15014/proxy/metrics"),
        "# TYPE kanava_control_plane_source_synced gauge\nkanava_control_plane_source_synced 1\n# EOF\n",
    );
    // The ztunnel's node is gone silent behind the API server's proxy.
    server.hang(&format!("/api/v1/namespaces/{NS}/pods/ztunnel-a:15020/"));
    let (code, out) = status_within(&server, dir.path(), false, Some("2s"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("node-a: its metrics are unreachable (read the metrics of ztunnel-a: no answer within 2s (--timeout))"),
        "{out}"
    );
    assert!(out.starts_with("control plane: ready"), "{out}");

    // The API server itself is silent: one clear error, at the deadline.
    server.hang("/api/v1/nodes");
    let (code, out) = status_within(&server, dir.path(), false, Some("2s"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("list nodes (API server http://127.0.0.1:")
            && out.contains("no answer within 2s (--timeout)"),
        "{out}"
    );
}
