//! On-demand discovery in a lab whose control plane serves it from the
//! first pod (`--on-demand-above 0`): a ztunnel holds its own node's
//! workloads and the Services without endpoints, learns a destination on
//! its first connection, and refuses a destination it cannot learn while
//! the control plane is away instead of sending it in plaintext.

use std::net::SocketAddr;

use kanava_e2e::{
    http_get, kill_control_plane, log_line, pod_ip, require_root, runtime, unique_name, wait_for,
};
use kanava_lab::{Lab, LabSpec, UpOptions};

const LAB: &str = r#"
kind: Lab
nodes: 2
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {kanava.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{name: c, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
apiVersion: v1
kind: Pod
metadata: {name: later, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: later
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
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
  clusterIP: 10.96.8.8
  selector: {app: api}
  ports: [{port: 8080, targetPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain-web, namespace: legacy}
spec:
  nodeName: node-2
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
"#;

/// The names (`namespace/name`) of the workloads node-1's ztunnel holds,
/// and whether it says it is on demand.
fn held_on_node_1(lab: &Lab) -> (Vec<String>, bool) {
    let netns = &lab.state().nodes[0].netns;
    let dump = kanava_lab::propagation::config_dump(netns).expect("node-1's config dump");
    let workloads = dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            format!(
                "{}/{}",
                w["namespace"].as_str().unwrap_or(""),
                w["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    (workloads, dump["onDemand"].as_bool().unwrap_or(false))
}

#[test]
fn a_ztunnel_learns_what_it_reaches_and_refuses_what_it_cannot_learn() {
    require_root();
    let spec = LabSpec::parse(LAB, 2).unwrap();
    let mut options = UpOptions::named(unique_name());
    options.control_plane_args = vec!["--on-demand-above".into(), "0".into()];
    // A refusal comes at this bound.
    options.ztunnel_args = vec!["--connect-timeout".into(), "3s".into()];
    let mut lab = Lab::up(&spec, &options).unwrap();
    let rt = runtime();

    let (held, on_demand) = held_on_node_1(&lab);
    assert!(on_demand, "node-1's ztunnel is served on demand");
    assert!(
        held.contains(&"shop/client".to_string()),
        "its own pod: {held:?}"
    );
    for remote in ["shop/web", "shop/api", "shop/later"] {
        assert!(
            !held.contains(&remote.to_string()),
            "{remote} is not held before it is needed: {held:?}"
        );
    }

    // A pod on the other node, then a Service: each learned on its first
    // connection, which is answered.
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    let body = rt.block_on(http_get(&lab, "shop/client", web)).unwrap();
    assert!(body.contains("shop/web"), "{body}");
    let api = SocketAddr::from(([10, 96, 8, 8], 8080));
    let body = rt.block_on(http_get(&lab, "shop/client", api)).unwrap();
    assert!(body.contains("shop/api"), "{body}");
    let (held, _) = held_on_node_1(&lab);
    for learned in ["shop/web", "shop/api"] {
        assert!(
            held.contains(&learned.to_string()),
            "{learned} learned: {held:?}"
        );
    }
    assert!(
        !held.contains(&"shop/later".to_string()),
        "nothing more: {held:?}"
    );
    // A pod outside the mesh is learned as such, and reached as before.
    let plain = SocketAddr::from((pod_ip(&lab, "legacy/plain-web"), 80));
    let body = rt.block_on(http_get(&lab, "shop/client", plain)).unwrap();
    assert!(body.contains("legacy/plain-web"), "{body}");

    // The control plane goes away.
    let control_plane = kill_control_plane(&lab);
    wait_for("the control plane to be gone", || {
        !kanava_lab::process::alive(control_plane)
    });
    // What was learned is still served; what was not is refused: nothing
    // reaches `later`, in plaintext or at all.
    let body = rt.block_on(http_get(&lab, "shop/client", web)).unwrap();
    assert!(body.contains("shop/web"), "{body}");
    let later = SocketAddr::from((pod_ip(&lab, "shop/later"), 80));
    let refused = rt.block_on(http_get(&lab, "shop/client", later));
    assert!(
        refused.is_err(),
        "an unlearned destination without a control plane: {refused:?}"
    );
    let line = log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("has not said what this address is")
    });
    assert!(line.contains(&later.ip().to_string()), "{line}");
    let client = pod_ip(&lab, "shop/client");
    let served = lab.logs("shop/later").unwrap_or_default();
    assert!(
        !served.contains(&format!("connection from {client}")),
        "nothing reached `later`: {served}"
    );

    // With the control plane back, it is learned and reached.
    lab.restart_control_plane().unwrap();
    wait_for("`later` to be reached", || {
        rt.block_on(http_get(&lab, "shop/client", later))
            .is_ok_and(|body| body.contains("shop/later"))
    });
}
