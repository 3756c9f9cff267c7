//! The Grafana dashboard (`deploy/grafana/kanava-mesh.json`) against the real
//! thing: Prometheus (Debian's package) scrapes a lab's ztunnels and control
//! plane while known traffic flows, and every query of every panel must
//! return data. The test prints the snapshot: each panel's first value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kanava_e2e::{MESH_LAB, apply, http_get, pod_ip, runtime, up};
use kanava_lab::clients;
use serde_json::Value;

const PROMETHEUS: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9090,
));

/// Prometheus inside the lab's fabric namespace; stopped when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(lab: &kanava_lab::Lab, dir: &std::path::Path) -> Prometheus {
    let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("prometheus is not installed: run scripts/setup.sh (Debian package prometheus)");
    let ztunnels: Vec<String> = lab
        .state()
        .nodes
        .iter()
        .map(|n| format!("\"{}\"", std::net::SocketAddr::new(n.ip().unwrap(), 15020)))
        .collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         scrape_configs:\n\
         - job_name: ztunnel\n  static_configs: [{{targets: [{}]}}]\n\
         - job_name: control-plane\n  static_configs: [{{targets: [\"{}\"]}}]\n",
        ztunnels.join(", "),
        std::net::SocketAddr::new(lab.state().control_plane_address().ip(), 15014)
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.netns("fabric").unwrap(), binary])
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Prometheus(child)
}

/// Percent-encodes a query string value (everything but unreserved
/// characters).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(lab: &kanava_lab::Lab, expr: &str) -> Result<Vec<Value>, String> {
    let (status, body) = clients::http_get(
        lab,
        "fabric",
        PROMETHEUS,
        &format!("/api/v1/query?query={}", encode(expr)),
    )?;
    let answer: Value =
        serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if answer["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Sends garbage to a pod's HBONE port: a failed TLS handshake.
fn garbage_to_hbone(lab: &kanava_lab::Lab, from: &str, pod_ip: std::net::IpAddr) {
    if let Ok(mut stream) = lab.connect(
        from,
        SocketAddr::from((pod_ip, 15008)),
        Duration::from_secs(5),
    ) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(b"this is not TLS\r\n\r\n");
        let _ = stream.read(&mut [0u8; 64]);
    }
}

#[test]
fn every_panel_of_the_dashboard_shows_data_from_a_lab() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/kanava-mesh.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut lab = up(MESH_LAB);
    let dir = tempfile::tempdir().unwrap();
    let _prometheus = start_prometheus(&lab, dir.path());
    let started = Instant::now();
    while !matches!(
        clients::http_get(&lab, "fabric", PROMETHEUS, "/-/ready"),
        Ok((200, _))
    ) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "prometheus did not start: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Prometheus scrapes only once its target discovery has settled (a few
    // seconds after it is ready): wait until every target is up.
    let targets = 1 + lab.state().nodes.len();
    while query(&lab, "up == 1").map(|r| r.len()).unwrap_or(0) < targets {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "prometheus does not scrape the lab: {:?}",
            query(&lab, "up")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Known traffic for a few seconds: requests, refusals, failed
    // handshakes, and a configuration change (pushes). Refusals come twice,
    // seconds apart: Prometheus counts no increase in a series' first
    // sample.
    let rt = runtime();
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    for round in 0..40 {
        if round % 20 == 0 {
            assert!(
                rt.block_on(http_get(&lab, "legacy/plain-client", web))
                    .is_err()
            );
            garbage_to_hbone(&lab, "legacy/plain-client", pod_ip(&lab, "shop/web"));
        }
        rt.block_on(http_get(&lab, "shop/client", web)).unwrap();
        if round == 20 {
            apply(
                &mut lab,
                "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: shop}\nspec:\n  rules:\n  - {}\n",
            );
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    // A few more scrapes after the last request.
    std::thread::sleep(Duration::from_secs(3));

    let mut empty = Vec::new();
    let mut snapshot = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            match query(&lab, expr) {
                // A value, and a number: a quantile over no observations is
                // NaN, which a panel shows as nothing.
                Ok(result)
                    if result
                        .iter()
                        .any(|r| r["value"][1].as_str().is_some_and(|v| v != "NaN")) =>
                {
                    snapshot.push_str(&format!(
                        "{:45} {}\n",
                        panel["title"].as_str().unwrap_or(""),
                        result[0]["value"][1]
                    ));
                }
                Ok(_) => empty.push(format!("{}: {expr} returned nothing", panel["title"])),
                Err(error) => empty.push(format!("{}: {expr}: {error}", panel["title"])),
            }
        }
    }
    eprintln!("dashboard snapshot:\n{snapshot}");
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
}
