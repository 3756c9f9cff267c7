//! The ztunnels' traffic metrics after known traffic: every connection is
//! counted once by each side, under the right workloads, identities and
//! transport, with exact byte counts; refusals are counted with their
//! reason; and many short connections add no new series.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use kanava_e2e::{MESH_LAB, exec_ok, http_get, pod_ip, runtime, up, wait_for};

/// What `http_get` sends.
const REQUEST_BYTES: f64 = b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n".len() as f64;

fn scrape(lab: &kanava_lab::Lab, node: &str) -> String {
    exec_ok(
        lab,
        &format!("node/{node}"),
        &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
    )
}

/// The value of the one series of `name` carrying every label of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = text
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches {} series",
        matching.len()
    );
    matching.first().copied().unwrap_or(0.0)
}

/// Every `kanava_tcp_*` series.
fn traffic_series(text: &str) -> usize {
    text.lines()
        .filter(|line| line.starts_with("kanava_tcp_"))
        .count()
}

#[test]
fn traffic_is_counted_by_workload_once_per_side_with_bounded_labels() {
    let mut lab = up(MESH_LAB);
    let rt = runtime();
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    const REQUESTS: usize = 20;
    let mut body_bytes = 0;
    for _ in 0..REQUESTS {
        body_bytes += rt
            .block_on(http_get(&lab, "shop/client", web))
            .unwrap()
            .len();
    }
    let between = [
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/client",
        ),
        ("destination_workload", "web"),
        ("destination_workload_namespace", "shop"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/web",
        ),
        ("destination_service", "unknown"),
        ("transport", "hbone"),
    ];
    for (node, reporter) in [("node-1", "source"), ("node-2", "destination")] {
        let mut labels = between.to_vec();
        labels.push(("reporter", reporter));
        let closed = |text: &str| {
            let mut labels = labels.clone();
            labels.extend([("outcome", "success"), ("reason", "-")]);
            value(text, "kanava_tcp_connections_closed_total", &labels)
        };
        wait_for(&format!("{node} to count every connection closed"), || {
            closed(&scrape(&lab, node)) == REQUESTS as f64
        });
        let text = scrape(&lab, node);
        let requests = REQUESTS as f64;
        assert_eq!(
            value(&text, "kanava_tcp_connections_opened_total", &labels),
            requests,
            "{node}"
        );
        assert_eq!(
            value(&text, "kanava_tcp_sent_bytes_total", &labels),
            requests * REQUEST_BYTES,
            "{node}: exactly the requests' bytes"
        );
        let received = value(&text, "kanava_tcp_received_bytes_total", &labels);
        assert!(
            received > body_bytes as f64,
            "{node}: the responses, headers and bodies ({received} bytes)"
        );
        assert_eq!(
            value(
                &text,
                "kanava_tcp_connection_duration_seconds_count",
                &labels
            ),
            requests,
            "{node}"
        );
    }

    // A refusal, counted with its reason: plaintext into a strict pod.
    assert!(
        rt.block_on(http_get(&lab, "legacy/plain-client", web))
            .is_err()
    );
    wait_for("the refusal to be counted", || {
        value(
            &scrape(&lab, "node-2"),
            "kanava_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "plain-client"),
                ("source_workload_namespace", "legacy"),
                ("source_principal", "unknown"),
                ("destination_workload", "web"),
                ("transport", "passthrough"),
                ("outcome", "denied"),
                ("reason", "plaintext_refused"),
            ],
        ) == 1.0
    });

    // Many more short connections, each from a new client port: the same
    // series, only larger numbers.
    let series = [
        traffic_series(&scrape(&lab, "node-1")),
        traffic_series(&scrape(&lab, "node-2")),
    ];
    for _ in 0..200 {
        rt.block_on(http_get(&lab, "shop/client", web)).unwrap();
    }
    wait_for("the last connections to be counted", || {
        value(
            &scrape(&lab, "node-2"),
            "kanava_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "client"),
                ("outcome", "success"),
            ],
        ) == (REQUESTS + 200) as f64
    });
    assert_eq!(
        [
            traffic_series(&scrape(&lab, "node-1")),
            traffic_series(&scrape(&lab, "node-2"))
        ],
        series,
        "200 connections added no series"
    );

    // What the node holds: certificates and their expiry, the discovery
    // version and its age.
    let text = scrape(&lab, "node-2");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = value(
        &text,
        "kanava_certificate_expiry_timestamp_seconds",
        &[("identity", "spiffe://cluster.local/ns/shop/sa/web")],
    );
    assert!(
        expiry > now + 3600.0,
        "the web certificate expires at {expiry}"
    );
    assert!(value(&text, "kanava_discovery_version", &[]) >= 1.0);
    let updated = value(&text, "kanava_discovery_last_update_timestamp_seconds", &[]);
    assert!(now - updated < 300.0, "last update {} s ago", now - updated);

    // A refusal by policy names the policy.
    kanava_e2e::apply(
        &mut lab,
        "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-web, namespace: shop}\nspec:\n  action: DENY\n  selector: {}\n  rules:\n  - to: [{ports: [80]}]\n",
    );
    assert!(rt.block_on(http_get(&lab, "shop/client", web)).is_err());
    wait_for("the policy refusal to be counted", || {
        value(
            &scrape(&lab, "node-2"),
            "kanava_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "client"),
                ("outcome", "denied"),
                ("reason", "policy"),
                ("policy", "shop/no-web"),
            ],
        ) == 1.0
    });
}

/// With `--log-format json`, an access-log line is one JSON object with the
/// same fields as the text line, under stable names.
#[test]
fn json_access_logs_carry_the_documented_fields() {
    let lab = kanava_e2e::up_with_ztunnel_args(MESH_LAB, &["--log-format", "json"]);
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    runtime()
        .block_on(http_get(&lab, "shop/client", web))
        .unwrap();
    let line = kanava_e2e::log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("\"target\":\"access\"") && l.contains("shop/web")
    });
    let record: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    for field in [
        "timestamp",
        "level",
        "target",
        "message",
        "direction",
        "pod",
        "src.addr",
        "src.identity",
        "dst.addr",
        "dst.service",
        "dst.workload",
        "dst.identity",
        "transport",
        "bytes_sent",
        "bytes_received",
        "duration_ms",
        "outcome",
        "reason",
    ] {
        assert!(record.get(field).is_some(), "{field} missing: {record}");
    }
    assert_eq!(record["message"], "connection complete");
    assert_eq!(record["direction"], "inbound");
    assert_eq!(
        record["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(record["outcome"], "success");
    assert!(
        record["bytes_sent"].is_u64(),
        "numbers stay numbers: {record}"
    );
}
