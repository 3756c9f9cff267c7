//! `kanava-cni-install` on a node of a real lab, with the in-test API
//! server standing in for the cluster's: it installs the plugin into the
//! node's CNI directories and keeps it there; stopped while its DaemonSet
//! exists (a restart, an upgrade) it leaves everything; stopped after the
//! DaemonSet is gone (`helm uninstall`) it takes the plugin out and releases
//! every pod of the node: no rule is left in a running pod.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../control-plane/tests/support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kanava_e2e::{MESH_LAB, exec_ok, up, wait_for};
use serde_json::{Value, json};

const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"containerd-net","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "net.d"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("net.d/10-containerd-net.conflist"), PRIMARY).unwrap();
        // The chart's `api-token` volume, as the kubelet projects it.
        kanava_lab::files::write_projected_volume(
            &dir.path().join("sa"),
            &[
                ("token", b"installer-token\n"),
                ("ca.crt", b"-----BEGIN CERTIFICATE-----\n"),
                ("namespace", b"kanava-system"),
            ],
        )
        .unwrap();
        Node { dir }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn chain(&self) -> Vec<String> {
        let conflist: Value = serde_json::from_slice(
            &std::fs::read(self.path("net.d/10-containerd-net.conflist")).unwrap(),
        )
        .unwrap();
        conflist["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect()
    }

    fn installed(&self) -> bool {
        self.path("bin/kanava-cni").exists()
            && self.path("net.d/kanava-cni.kubeconfig").exists()
            && self.chain().last().map(String::as_str) == Some("kanava-cni")
    }
}

fn start_installer(
    lab: &kanava_lab::Lab,
    node: &Node,
    server: &api_server::ApiServer,
    node_name: &str,
) -> Child {
    let bins = kanava_lab::bin_dir(None).unwrap();
    let socket = lab.state().node(node_name).unwrap().handoff_socket.clone();
    Command::new(bins.join("kanava-cni-install"))
        .env_clear()
        .env("KANAVA_CNI_PLUGIN", bins.join("kanava-cni"))
        .env("KANAVA_CNI_BIN_DIR", node.path("bin"))
        .env("KANAVA_CNI_CONF_DIR", node.path("net.d"))
        .env("KANAVA_HOST_CNI_CONF_DIR", "/etc/cni/net.d")
        .env("KANAVA_HANDOFF_SOCKET", socket)
        .env("KANAVA_POD_RECORDS_DIR", lab.pod_records_dir(node_name))
        .env("KANAVA_SERVICE_ACCOUNT_DIR", node.path("sa"))
        .env("KANAVA_CNI_CHECK_INTERVAL", "100ms")
        .env("POD_NAMESPACE", "kanava-system")
        // No KUBECONFIG: the installer finds the API server as it does in
        // a pod, with its own token; the in-test server speaks plain HTTP.
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", server.address.port().to_string())
        .env(
            "KANAVA_API_SERVER",
            format!("http://127.0.0.1:{}", server.address.port()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends SIGTERM and returns what the installer logged.
fn stop(mut child: Child) -> String {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the installer did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn captured(lab: &kanava_lab::Lab, pod: &str) -> bool {
    exec_ok(lab, pod, &["iptables-save"]).contains("KANAVA")
}

#[test]
fn the_installer_keeps_the_plugin_through_restarts_and_uninstalls_with_its_daemonset() {
    let lab = up(MESH_LAB);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(api_server::ApiServer::start());
    server.apply(
        api_server::DAEMONSETS,
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
               "metadata": {"name": "ztunnel", "namespace": "kanava-system"}}),
    );
    let node = Node::new();
    let records = lab.pod_records_dir("node-2");
    assert!(
        std::fs::read_dir(&records).unwrap().count() >= 5,
        "the lab's CNI chain recorded node-2's pods"
    );

    // Installed, and put back when the primary plugin rewrites its file.
    let installer = start_installer(&lab, &node, &server, "node-2");
    wait_for("the plugin to be installed", || node.installed());
    assert_eq!(node.chain(), ["bridge", "portmap", "kanava-cni"]);
    let kubeconfig = std::fs::read_to_string(node.path("net.d/kanava-cni.kubeconfig")).unwrap();
    assert!(kubeconfig.contains("token: installer-token"));
    assert!(kubeconfig.contains(&format!(
        "server: http://127.0.0.1:{}",
        server.address.port()
    )));
    std::fs::write(node.path("net.d/10-containerd-net.conflist"), PRIMARY).unwrap();
    wait_for("the entry to come back", || node.installed());

    // A restart: the DaemonSet is still there; nothing is taken away.
    let log = stop(installer);
    assert!(log.contains("kanava-cni stays installed"), "{log}");
    assert!(node.installed());
    assert!(captured(&lab, "shop/web"));

    // Uninstall: the DaemonSet is gone when the installer is stopped. (The
    // binary is taken away first, so that its return shows the new
    // installer running, its signal handler in place.)
    std::fs::remove_file(node.path("bin/kanava-cni")).unwrap();
    let installer = start_installer(&lab, &node, &server, "node-2");
    wait_for("the plugin to be installed", || node.installed());
    server.delete(api_server::DAEMONSETS, "kanava-system", "ztunnel");
    let log = stop(installer);
    assert!(log.contains("uninstalling"), "{log}");
    let primary: Value = serde_json::from_str(PRIMARY).unwrap();
    let left: Value = serde_json::from_slice(
        &std::fs::read(node.path("net.d/10-containerd-net.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(left, primary, "the primary conflist as it was");
    assert!(!node.path("bin/kanava-cni").exists());
    assert!(!node.path("net.d/kanava-cni.kubeconfig").exists());
    assert_eq!(
        std::fs::read_dir(&records).unwrap().count(),
        0,
        "no pod record left"
    );
    // Every pod of node-2 released: no rule, no listener; node-1 untouched.
    for pod in ["shop/web", "shop/echo", "shop/sink"] {
        assert!(!captured(&lab, pod), "{pod} still has capture rules");
        let listening = exec_ok(&lab, pod, &["ss", "-Hltn"]);
        assert!(
            !listening.contains(":15008"),
            "{pod} still has listeners: {listening}"
        );
    }
    assert!(captured(&lab, "shop/client"), "node-1 is another node");
}
