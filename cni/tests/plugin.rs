//! The `kanava-cni` binary, run as a container runtime runs it: `CNI_*`
//! environment, configuration on standard input, a result or a CNI error
//! on standard output. The lab runs it for every pod with a real ztunnel;
//! these tests cover what the lab cannot make happen: bad input, an absent
//! ztunnel, the API server as the source of enrollment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../control-plane/tests/support/api_server.rs"]
mod api_server;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// What a call printed, and whether it succeeded.
struct Outcome {
    success: bool,
    stdout: Value,
}

fn call(env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kanava-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    Outcome {
        success: output.status.success(),
        stdout: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        },
    }
}

fn env<'a>(command: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "sandbox-1"),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args),
    ]
}

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=uid-web";

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/proc/self/ns/net"}],
        "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
    })
}

/// A node: a manifest directory standing in for the API server, and the
/// ztunnel's socket path (nothing listens there: the ztunnel is down).
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(namespace_labels: Value) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        let manifests = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {namespace_labels}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: uid-web}}\n\
             spec: {{nodeName: node-1, serviceAccountName: web, containers: [{{name: c}}]}}\n"
        );
        std::fs::write(dir.path().join("manifests/all.yaml"), manifests).unwrap();
        Node { dir }
    }

    fn records(&self) -> std::path::PathBuf {
        self.dir.path().join("pods")
    }

    fn conf(&self, prev: Option<Value>) -> Vec<u8> {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "kanava-cni",
            "socketPath": self.dir.path().join("ztunnel.sock"),
            "podRecordsDir": self.records(),
            "manifestDir": self.dir.path().join("manifests"),
            "timeoutSeconds": 2,
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        conf.to_string().into_bytes()
    }

    fn recorded(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.records())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

fn assert_error(outcome: &Outcome, code: u64, mentions: &str) {
    assert!(!outcome.success, "must fail: {}", outcome.stdout);
    assert_eq!(outcome.stdout["code"], code, "{}", outcome.stdout);
    let msg = outcome.stdout["msg"].as_str().unwrap();
    assert!(
        msg.contains(mentions),
        "{msg:?} should mention {mentions:?}"
    );
}

#[test]
fn version_answers_with_the_supported_versions() {
    let outcome = call(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    assert!(outcome.success);
    assert_eq!(outcome.stdout["cniVersion"], "1.0.0");
    let versions = outcome.stdout["supportedVersions"].as_array().unwrap();
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&json!(version)), "{versions:?}");
    }
}

#[test]
fn bad_input_gets_a_cni_error_with_a_clear_message() {
    let node = Node::new(json!({}));
    assert_error(
        &call(&env("ADD", POD_ARGS), b"{not json"),
        6,
        "not valid JSON",
    );
    assert_error(&call(&env("ADD", POD_ARGS), b""), 6, "empty");
    assert_error(
        &call(
            &env("ADD", POD_ARGS),
            br#"{"cniVersion":"7.0.0","type":"kanava-cni"}"#,
        ),
        1,
        "7.0.0",
    );
    assert_error(
        &call(&env("ADD", POD_ARGS), &node.conf(None)),
        7,
        "prevResult",
    );
    assert_error(
        &call(&env("CHECK", POD_ARGS), &node.conf(None)),
        7,
        "prevResult",
    );
    let without_netns: Vec<_> = env("ADD", POD_ARGS)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    assert_error(
        &call(&without_netns, &node.conf(Some(prev_result()))),
        4,
        "CNI_NETNS",
    );
    assert_error(&call(&env("ADD", POD_ARGS)[1..], b"{}"), 4, "CNI_COMMAND");
    assert_error(
        &call(&env("ADD", "K8S_POD_NAME"), &node.conf(Some(prev_result()))),
        4,
        "CNI_ARGS",
    );
    assert!(node.recorded().is_empty(), "nothing recorded for bad calls");
}

#[test]
fn a_pod_outside_the_mesh_passes_through_even_when_the_ztunnel_is_down() {
    let node = Node::new(json!({}));
    let outcome = call(&env("ADD", POD_ARGS), &node.conf(Some(prev_result())));
    assert!(outcome.success, "{}", outcome.stdout);
    assert_eq!(outcome.stdout, prev_result(), "prevResult unchanged");
    // Remembered, for the day its namespace joins the mesh.
    assert_eq!(node.recorded(), vec!["uid-web.json"]);
    let record: Value =
        serde_json::from_slice(&std::fs::read(node.records().join("uid-web.json")).unwrap())
            .unwrap();
    assert_eq!(record["ips"], json!(["10.244.1.7"]));
    assert_eq!(record["serviceAccount"], "web");
    assert_eq!(record["containerId"], "sandbox-1");
    assert!(call(&env("CHECK", POD_ARGS), &node.conf(Some(prev_result()))).success);

    // Not a Kubernetes pod at all: nothing to look up.
    let outcome = call(&env("ADD", ""), &node.conf(Some(prev_result())));
    assert!(outcome.success);
    assert_eq!(outcome.stdout, prev_result());
}

#[test]
fn an_enrolled_pod_does_not_start_when_the_ztunnel_cannot_capture_it() {
    let node = Node::new(json!({"kanava.io/dataplane-mode": "ambient"}));
    let outcome = call(&env("ADD", POD_ARGS), &node.conf(Some(prev_result())));
    assert_error(&outcome, 100, "must not start");
    assert!(
        outcome.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("ztunnel.sock"),
        "{}",
        outcome.stdout
    );
    assert!(node.recorded().is_empty(), "a failed ADD leaves no record");
    assert_error(
        &call(&env("CHECK", POD_ARGS), &node.conf(Some(prev_result()))),
        100,
        "shop/web",
    );
    // An enrolled pod the primary plugin gave no address.
    assert_error(
        &call(
            &env("ADD", POD_ARGS),
            &node.conf(Some(json!({"cniVersion": "1.0.0"}))),
        ),
        7,
        "no IP",
    );
}

#[test]
fn del_is_idempotent_and_forgets_the_pod() {
    let node = Node::new(json!({}));
    assert!(call(&env("ADD", POD_ARGS), &node.conf(Some(prev_result()))).success);
    assert_eq!(node.recorded().len(), 1);
    // DEL may come without the namespace and without the pod's uid: the
    // sandbox id finds the record.
    let del: Vec<_> = env("DEL", "IgnoreUnknown=1")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    for _ in 0..2 {
        let outcome = call(&del, &node.conf(None));
        assert!(outcome.success, "{}", outcome.stdout);
    }
    assert!(node.recorded().is_empty());
    assert!(
        call(&env("DEL", POD_ARGS), &node.conf(None)).success,
        "unknown pod"
    );
}

#[test]
fn gc_forgets_pods_of_attachments_the_runtime_no_longer_has() {
    let node = Node::new(json!({}));
    assert!(call(&env("ADD", POD_ARGS), &node.conf(Some(prev_result()))).success);
    let mut conf: Value = serde_json::from_slice(&node.conf(None)).unwrap();
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "sandbox-1", "ifname": "eth0"}]);
    assert!(call(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes()).success);
    assert_eq!(node.recorded().len(), 1, "still in use");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "other", "ifname": "eth0"}]);
    assert!(call(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes()).success);
    assert!(node.recorded().is_empty());
    assert!(call(&[("CNI_COMMAND", "STATUS")], &node.conf(None)).success);
}

/// On a cluster the plugin reads the pod and its namespace from the API
/// server, with the kubeconfig the installer writes.
#[test]
fn enrollment_is_read_from_the_api_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(api_server::ApiServer::start());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let conf = |prev: Option<Value>| {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "kanava-cni",
            "socketPath": dir.path().join("ztunnel.sock"),
            "podRecordsDir": dir.path().join("pods"),
            "kubeconfig": kubeconfig,
            "timeoutSeconds": 2,
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        conf.to_string().into_bytes()
    };
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
    });
    let namespace = |labels: Value| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}});

    // The pod does not exist (yet): cannot tell, try again later.
    server.apply(api_server::NAMESPACES, namespace(json!({})));
    assert_error(
        &call(&env("ADD", POD_ARGS), &conf(Some(prev_result()))),
        11,
        "does not exist",
    );

    server.apply(api_server::PODS, pod);
    let outcome = call(&env("ADD", POD_ARGS), &conf(Some(prev_result())));
    assert!(outcome.success, "{}", outcome.stdout);

    // Labelled now: the next pod of the namespace must be captured, and
    // with no ztunnel to capture it, it does not start.
    server.apply(
        api_server::NAMESPACES,
        namespace(json!({"kanava.io/dataplane-mode": "ambient"})),
    );
    assert_error(
        &call(&env("ADD", POD_ARGS), &conf(Some(prev_result()))),
        100,
        "must not start",
    );

    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/shop?")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/shop/pods/web?"))
    );

    // The API server away: cannot tell.
    drop(server);
    assert_error(
        &call(&env("ADD", POD_ARGS), &conf(Some(prev_result()))),
        11,
        "shop/web",
    );
}

/// `helm uninstall` that could not clean a node leaves kanava-cni in its
/// conflist with credentials the API server no longer accepts. With no
/// ztunnel on the node the mesh is gone: pods start (outside the mesh)
/// instead of never. With a ztunnel there, the plugin cannot tell and the
/// pod waits. The mesh's own pods start whatever the state, without asking.
#[test]
fn dead_credentials_block_no_pod_once_the_mesh_is_gone_nor_ever_the_meshs_own() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(api_server::ApiServer::start());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let socket = dir.path().join("ztunnel.sock");
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "kanava-cni",
        "socketPath": socket,
        "podRecordsDir": dir.path().join("pods"),
        "kubeconfig": kubeconfig,
        "meshNamespace": "mesh-system",
        "timeoutSeconds": 2,
        "prevResult": prev_result(),
    })
    .to_string()
    .into_bytes();
    server.apply(
        api_server::NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"kanava.io/dataplane-mode": "ambient"}}}),
    );
    server.apply(
        api_server::PODS,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web"},
               "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]}}),
    );
    server.set_unauthorized(true);

    // A ztunnel is on the node: the mesh is there, the answer unknown.
    let ztunnel = kanava_netns::seqpacket::Listener::bind(&socket, 0o600).unwrap();
    assert_error(&call(&env("ADD", POD_ARGS), &conf), 11, "Unauthorized");

    // No ztunnel either: the pod starts, outside the mesh.
    drop(ztunnel);
    std::fs::remove_file(&socket).unwrap();
    let outcome = call(&env("ADD", POD_ARGS), &conf);
    assert!(outcome.success, "{}", outcome.stdout);
    assert_eq!(outcome.stdout, prev_result());

    // The mesh's own pods: not even asked about, with the API server gone
    // and a ztunnel present that would refuse them.
    drop(server);
    let _ztunnel = kanava_netns::seqpacket::Listener::bind(&socket, 0o600).unwrap();
    let mesh_pod = "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=ztunnel-x;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=uid-z";
    for command in ["ADD", "CHECK", "DEL"] {
        let outcome = call(&env(command, mesh_pod), &conf);
        assert!(outcome.success, "{command}: {}", outcome.stdout);
    }
}
