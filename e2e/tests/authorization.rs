//! Who may talk to whom: AuthorizationPolicy semantics, mTLS modes, and
//! policy changes that reach open connections.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kanava_e2e::{apply, connect, delete, http_get, log_line, pod_ip, runtime, up};
use tokio::io::AsyncWriteExt;

const LAB: &str = r#"
kind: Lab
nodes: 2
---
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {kanava.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {kanava.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - name: c
    command: [sh, -c, "labapp http --port 9090 & exec labapp http --port 8080"]
    readinessProbe: {tcpSocket: {port: 8080}}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: app, labels: {app: other}}
spec:
  nodeName: node-2
  serviceAccountName: other
  containers:
  - {name: c, command: [labapp, http, --port, "8080"], readinessProbe: {tcpSocket: {port: 8080}}}
---
apiVersion: v1
kind: Pod
metadata: {name: sink, namespace: app, labels: {app: sink}}
spec:
  nodeName: node-2
  serviceAccountName: sink
  containers:
  - {name: c, command: [labapp, sink, --port, "9000"], readinessProbe: {tcpSocket: {port: 9000}}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: app}
spec: {nodeName: node-1, serviceAccountName: frontend, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: app}
spec: {nodeName: node-1, serviceAccountName: batch, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: admin, namespace: ops}
spec: {nodeName: node-2, serviceAccountName: admin, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: monitor, namespace: ops}
spec: {nodeName: node-1, serviceAccountName: monitor, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: legacy}
spec: {nodeName: node-1, containers: [{name: c, command: [sleep, infinity]}]}
"#;

/// `(client pod, target IP, target port, allowed)`.
type Check = (&'static str, std::net::IpAddr, u16, bool);

fn policy(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

#[test]
fn policies_allow_and_refuse_exactly_as_specified() {
    let mut lab = up(LAB);
    let web = pod_ip(&lab, "app/web");
    let other = pod_ip(&lab, "app/other");
    let node_1_pods = "10.244.1.0/24";
    // (description, policies, [(client, target, port, allowed)])
    let cases: Vec<(&str, String, Vec<Check>)> = vec![
        (
            "namespace-wide ALLOW by namespace",
            policy(
                "ns-allow",
                "app",
                "  rules:\n  - from: [{namespaces: [app]}]\n",
            ),
            vec![
                ("app/frontend", web, 8080, true),
                ("app/batch", other, 8080, true),
                ("ops/admin", web, 8080, false),
            ],
        ),
        (
            "selector ALLOW by principal",
            policy(
                "web-frontend",
                "app",
                "  selector: {matchLabels: {app: web}}\n  rules:\n  - from: [{principals: [cluster.local/ns/app/sa/frontend]}]\n",
            ),
            vec![
                ("app/frontend", web, 8080, true),
                ("app/batch", web, 8080, false),
                ("app/batch", other, 8080, true),
            ],
        ),
        (
            "DENY by namespace",
            policy(
                "no-ops",
                "app",
                "  action: DENY\n  rules:\n  - from: [{namespaces: [ops]}]\n",
            ),
            vec![
                ("ops/admin", web, 8080, false),
                ("ops/monitor", other, 8080, false),
                ("app/frontend", web, 8080, true),
            ],
        ),
        (
            "DENY by port",
            policy(
                "no-9090",
                "app",
                "  action: DENY\n  rules:\n  - to: [{ports: [9090]}]\n",
            ),
            vec![
                ("app/frontend", web, 9090, false),
                ("app/frontend", web, 8080, true),
            ],
        ),
        (
            "ALLOW with notPorts",
            policy(
                "not-9090",
                "app",
                "  rules:\n  - to: [{notPorts: [\"9090\"]}]\n",
            ),
            vec![
                ("app/frontend", web, 8080, true),
                ("app/frontend", web, 9090, false),
            ],
        ),
        (
            "ALLOW by ipBlocks",
            policy(
                "node-1-only",
                "app",
                &format!("  rules:\n  - from: [{{ipBlocks: [{node_1_pods}]}}]\n"),
            ),
            vec![
                ("app/frontend", web, 8080, true),
                ("ops/monitor", web, 8080, true),
                ("ops/admin", web, 8080, false),
            ],
        ),
        (
            "mesh-wide DENY from the root namespace",
            policy(
                "no-batch",
                "kanava-system",
                "  action: DENY\n  rules:\n  - from: [{principals: [\"*/sa/batch\"]}]\n",
            ),
            vec![
                ("app/batch", web, 8080, false),
                ("app/batch", other, 8080, false),
                ("app/frontend", web, 8080, true),
            ],
        ),
        (
            "prefix and suffix principals",
            policy(
                "ops-or-frontend",
                "app",
                "  rules:\n  - from: [{principals: [\"cluster.local/ns/ops/*\"]}, {principals: [\"*/sa/frontend\"]}]\n",
            ),
            vec![
                ("ops/admin", web, 8080, true),
                ("ops/monitor", web, 8080, true),
                ("app/frontend", web, 8080, true),
                ("app/batch", web, 8080, false),
            ],
        ),
    ];

    let rt = runtime();
    for (description, policies, checks) in cases {
        let report = apply(&mut lab, &policies);
        assert!(
            report.warnings.is_empty(),
            "{description}: {:?}",
            report.warnings
        );
        assert!(
            report.propagation < Duration::from_secs(1),
            "{description}: reached every node in {:?}",
            report.propagation
        );
        for (client, target, port, allowed) in checks {
            let result = rt.block_on(http_get(&lab, client, SocketAddr::from((target, port))));
            assert_eq!(
                result.is_ok(),
                allowed,
                "{description}: {client} → {target}:{port} should be {}: {result:?}",
                if allowed { "allowed" } else { "refused" }
            );
        }
        delete(&mut lab, &policies);
    }
    // Refusals name the policy.
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("outcome=denied") && l.contains("denied by DENY policy app/no-ops")
    });
}

#[test]
fn strict_refuses_plaintext_and_permissive_admits_it_subject_to_policy() {
    let mut lab = up(LAB);
    let web = SocketAddr::from((pod_ip(&lab, "app/web"), 8080));
    let rt = runtime();
    let refused = rt.block_on(http_get(&lab, "legacy/plain", web));
    assert!(
        refused.is_err(),
        "strict (the default) refuses plaintext: {refused:?}"
    );

    apply(
        &mut lab,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: {kanava.io/dataplane-mode: ambient, kanava.io/mtls-mode: permissive}}\n",
    );
    let admitted = rt
        .block_on(http_get(&lab, "legacy/plain", web))
        .expect("permissive admits plaintext");
    assert!(
        admitted.contains(&format!("peer {}:", pod_ip(&lab, "legacy/plain"))),
        "{admitted}"
    );

    // A DENY naming namespaces refuses the authenticated peers it names,
    // and cannot match the unauthenticated one.
    apply(
        &mut lab,
        &policy(
            "no-ops",
            "app",
            "  action: DENY\n  rules:\n  - from: [{namespaces: [ops]}]\n",
        ),
    );
    assert!(
        rt.block_on(http_get(&lab, "ops/admin", web)).is_err(),
        "named namespace refused"
    );
    assert!(rt.block_on(http_get(&lab, "app/frontend", web)).is_ok());
    assert!(
        rt.block_on(http_get(&lab, "legacy/plain", web)).is_ok(),
        "plaintext peer is not in ops"
    );

    // A DENY of everyone outside a namespace refuses the plaintext peer too:
    // it cannot prove it is inside.
    apply(
        &mut lab,
        &policy(
            "app-only",
            "app",
            "  action: DENY\n  rules:\n  - from: [{notNamespaces: [app, ops]}]\n",
        ),
    );
    assert!(
        rt.block_on(http_get(&lab, "legacy/plain", web)).is_err(),
        "plaintext peer refused by a negative DENY"
    );
    assert!(rt.block_on(http_get(&lab, "app/frontend", web)).is_ok());
    delete(&mut lab, &policy("app-only", "app", "  action: DENY\n"));

    // An ALLOW by principal can never admit a plaintext peer.
    apply(
        &mut lab,
        &policy(
            "frontend-only",
            "app",
            "  rules:\n  - from: [{principals: [\"*\"]}]\n",
        ),
    );
    assert!(
        rt.block_on(http_get(&lab, "legacy/plain", web)).is_err(),
        "plaintext peers have no principal"
    );
    assert!(rt.block_on(http_get(&lab, "app/frontend", web)).is_ok());
}

/// Keeps sending to a sink (which reads until the end) for up to 30 s;
/// returns when the connection was cut.
async fn send_until_cut(mut stream: tokio::net::TcpStream) -> Instant {
    let chunk = vec![b'x'; 64 * 1024];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if stream.write_all(&chunk).await.is_err() {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the transfer was not cut within 30 s");
}

#[test]
fn switching_to_strict_closes_open_plaintext_connections() {
    let mut lab = up(LAB);
    let permissive = |mode: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: app, labels: {{kanava.io/dataplane-mode: ambient, kanava.io/mtls-mode: {mode}}}}}\n"
        )
    };
    apply(&mut lab, &permissive("permissive"));
    let sink = SocketAddr::from((pod_ip(&lab, "app/sink"), 9000));
    let rt = runtime();
    let stream = rt.block_on(connect(&lab, "legacy/plain", sink));
    let sender = rt.spawn(send_until_cut(stream));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!sender.is_finished(), "plaintext flows in permissive mode");

    let applied = Instant::now();
    apply(&mut lab, &permissive("strict"));
    let ended = rt.block_on(sender).unwrap();
    let after = ended.duration_since(applied);
    assert!(
        after < Duration::from_secs(1),
        "the plaintext transfer ended {after:?} after the switch to strict"
    );
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("closing an open connection") && l.contains("requires mutual TLS")
    });
}

#[test]
fn a_deny_ends_a_running_transfer_within_a_second() {
    let mut lab = up(LAB);
    let web = SocketAddr::from((pod_ip(&lab, "app/web"), 8080));
    let sink = SocketAddr::from((pod_ip(&lab, "app/sink"), 9000));
    let rt = runtime();
    let stream = rt.block_on(connect(&lab, "app/frontend", sink));
    let sender = rt.spawn(send_until_cut(stream));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!sender.is_finished(), "the transfer runs before the policy");

    let applied = Instant::now();
    apply(
        &mut lab,
        &policy(
            "deny-frontend",
            "app",
            "  action: DENY\n  rules:\n  - from: [{principals: [cluster.local/ns/app/sa/frontend]}]\n",
        ),
    );
    let ended = rt.block_on(sender).unwrap();
    let after = ended.duration_since(applied);
    assert!(
        after < Duration::from_secs(1),
        "the transfer ended {after:?} after the DENY was applied"
    );
    assert!(
        rt.block_on(http_get(&lab, "app/frontend", web)).is_err(),
        "new connections are refused"
    );
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("closing an open connection the new policy refuses")
    });
}

#[test]
fn an_invalid_policy_leaves_enforcement_unchanged_and_is_reported() {
    let mut lab = up(LAB);
    let web = SocketAddr::from((pod_ip(&lab, "app/web"), 8080));
    let rt = runtime();
    let valid = policy(
        "frontend-only",
        "app",
        "  rules:\n  - from: [{principals: [cluster.local/ns/app/sa/frontend]}]\n",
    );
    apply(&mut lab, &valid);
    assert!(rt.block_on(http_get(&lab, "app/frontend", web)).is_ok());
    assert!(rt.block_on(http_get(&lab, "app/batch", web)).is_err());

    // The same policy, broken: a CIDR that is not one.
    let broken = policy(
        "frontend-only",
        "app",
        "  rules:\n  - from: [{principals: [cluster.local/ns/app/sa/frontend]}, {ipBlocks: [10.0.0.0/99]}]\n",
    );
    let report = lab.apply(&broken).unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("policy/app/frontend-only")),
        "the lab reports the policy did not reach the ztunnels: {:?}",
        report.warnings
    );
    assert!(
        rt.block_on(http_get(&lab, "app/frontend", web)).is_ok(),
        "enforcement unchanged"
    );
    assert!(
        rt.block_on(http_get(&lab, "app/batch", web)).is_err(),
        "enforcement unchanged"
    );

    // A new policy that was never valid refuses everything for the
    // workloads it selects until it is fixed: never weaker than intended.
    let empty_entry = policy(
        "deny-all-by-accident",
        "app",
        "  action: DENY\n  rules:\n  - from: [{}]\n",
    );
    lab.apply(&empty_entry).unwrap();
    assert!(
        rt.block_on(http_get(&lab, "app/frontend", web)).is_err(),
        "the invalid DENY refuses everything"
    );

    let log = lab.logs("control-plane").unwrap();
    let bad_cidr = log
        .lines()
        .find(|l| l.contains("AuthorizationPolicy app/frontend-only rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(
        bad_cidr.contains("10.0.0.0/99") && bad_cidr.contains("last valid version stays in force"),
        "{bad_cidr}"
    );
    assert!(
        log.contains("AuthorizationPolicy app/deny-all-by-accident rejected"),
        "{log}"
    );

    // An unknown action never gets past the API (the CRD schema's enum).
    let err = lab
        .apply(&policy("odd", "app", "  action: BLOCK\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("BLOCK"), "{err}");
}
