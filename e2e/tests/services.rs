//! Services: virtual IPs resolved by the ztunnel to ready endpoints on any
//! node, load spread, refused endpoints skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kanava_e2e::{apply, delete, http_get, log_line, runtime, up};

const LAB: &str = r#"
kind: Lab
nodes: 2
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kanava.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: client, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "8080"], ports: [{name: http, containerPort: 8080}], readinessProbe: {tcpSocket: {port: http}}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "8080"], ports: [{name: http, containerPort: 8080}], readinessProbe: {tcpSocket: {port: http}}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: legacy, labels: {app: web}}
spec:
  nodeName: node-2
  containers:
  - {name: c, command: [labapp, http, --port, "8080"], ports: [{name: http, containerPort: 8080}], readinessProbe: {tcpSocket: {port: http}}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: shop}
spec:
  clusterIP: 10.96.7.7
  selector: {app: nobody}
  ports: [{port: 80}]
"#;

/// A pod in `legacy` cannot be an endpoint of a Service in `shop`; the third
/// endpoint is added at runtime in `shop`, through HBONE like the others.
const THIRD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "8080"], ports: [{name: http, containerPort: 8080}], readinessProbe: {tcpSocket: {port: http}}}
"#;

fn who_answers(
    lab: &kanava_lab::Lab,
    vip: SocketAddr,
    connections: usize,
) -> BTreeMap<String, usize> {
    let rt = runtime();
    let mut answers = BTreeMap::new();
    for _ in 0..connections {
        let body = rt
            .block_on(http_get(lab, "shop/client", vip))
            .unwrap_or_else(|e| panic!("connection to {vip} failed: {e}"));
        let first = body.lines().next().unwrap_or_default().to_string();
        *answers.entry(first).or_default() += 1;
    }
    answers
}

#[test]
fn a_service_spreads_load_and_follows_its_endpoints() {
    let mut lab = up(LAB);
    let services = lab.services().unwrap();
    let web = services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(
        web.endpoints,
        ["shop/web-1", "shop/web-2"],
        "legacy/web-3 is in another namespace"
    );
    let nobody = services.iter().find(|s| s.name == "nobody").unwrap();
    assert_eq!(
        nobody.cluster_ip, "10.96.7.7",
        "a requested clusterIP in range is kept"
    );
    let vip = SocketAddr::new(web.cluster_ip.parse().unwrap(), 80);

    let report = apply(&mut lab, THIRD);
    assert!(
        report.propagation < Duration::from_secs(1),
        "a new pod reached every node in {:?}",
        report.propagation
    );
    let services = lab.services().unwrap();
    assert_eq!(
        services
            .iter()
            .find(|s| s.name == "web")
            .unwrap()
            .endpoints
            .len(),
        3
    );

    // Three endpoints on two nodes: 300 connections reach all three.
    let answers = who_answers(&lab, vip, 300);
    assert_eq!(answers.values().sum::<usize>(), 300);
    for pod in ["shop/web-1", "shop/web-2", "shop/web-3"] {
        let count = answers
            .get(&format!("hello from {pod}"))
            .copied()
            .unwrap_or(0);
        assert!(count >= 30, "{pod} got {count} of 300: {answers:?}");
    }

    // A deleted endpoint gets nothing.
    let report = delete(&mut lab, THIRD);
    assert!(
        report.propagation < Duration::from_secs(1),
        "a deleted pod left every node in {:?}",
        report.propagation
    );
    let answers = who_answers(&lab, vip, 100);
    assert!(
        !answers.contains_key("hello from shop/web-3"),
        "{answers:?}"
    );
    assert_eq!(answers.len(), 2, "{answers:?}");

    // An endpoint whose process stopped is skipped after a refused connect.
    let stopped = lab.pod("shop/web-2").unwrap().pid.unwrap();
    kanava_lab::process::terminate(&[stopped], Duration::from_secs(3));
    let answers = who_answers(&lab, vip, 50);
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["hello from shop/web-1"],
        "{answers:?}"
    );
    let log = lab.logs("ztunnel/node-1").unwrap();
    assert!(
        log.contains("endpoint refused the connection; trying another"),
        "{log}"
    );

    // A service without ready endpoints is refused at once, and logged.
    let rt = runtime();
    let started = Instant::now();
    let refused = rt.block_on(http_get(
        &lab,
        "shop/client",
        "10.96.7.7:80".parse().unwrap(),
    ));
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused immediately, took {:?}",
        started.elapsed()
    );
    log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("service shop/nobody has no ready endpoint for port 80")
    });
}

#[test]
fn cluster_ips_outside_the_range_are_refused() {
    let mut lab = up(LAB);
    let err = lab
        .apply("apiVersion: v1\nkind: Service\nmetadata: {name: odd, namespace: shop}\nspec: {clusterIP: 192.168.1.1, ports: [{port: 80}]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("outside the service range 10.96.0.0/16"),
        "{err}"
    );
    let err = lab
        .apply("apiVersion: v1\nkind: Service\nmetadata: {name: twin, namespace: shop}\nspec: {clusterIP: 10.96.7.7, ports: [{port: 80}]}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("already allocated"), "{err}");
}
