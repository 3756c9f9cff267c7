//! The benchmark cannot rot: its quick mode runs in CI and must produce a
//! number for every scenario (the numbers themselves are not judged here),
//! in A/B mode: the baseline is this very build, in a second lab; and beside
//! a peer, whose hook (below) enrolls the peer lab's pods in this very
//! build's mesh, so the hook protocol is exercised end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kanava_e2e::require_root;

/// A peer hook as `--peer` expects one (see the README): here the "other
/// proxy" is Kanava itself, reached through the hook protocol: `up` enrolls
/// the namespace it is given, waits until the lab says every pod of it is
/// captured, and names the lab's ztunnels.
const PEER_HOOK: &str = r#"#!/usr/bin/env python3
import json, os, subprocess, sys, time
command, state_path = sys.argv[1], sys.argv[2]
if command == "down":
    sys.exit(0)
namespace = sys.argv[3]
state = json.load(open(state_path))
manifest = os.path.join(os.path.dirname(state_path), "peer-enroll.yaml")
with open(manifest, "w") as f:
    f.write("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s, labels: {kanava.io/dataplane-mode: ambient}}\n" % namespace)
subprocess.run([os.environ["KANAVA"], "lab", "apply", "--name", state["name"], "-f", manifest], check=True, stdout=sys.stderr)
deadline = time.time() + 60
while True:
    state = json.load(open(state_path))
    pods = [p for p in state["pods"] if p["namespace"] == namespace]
    if pods and all(p["captured"] for p in pods):
        break
    if time.time() > deadline:
        sys.exit("pods not captured: %s" % [p["name"] for p in pods if not p["captured"]])
    time.sleep(0.2)
print(json.dumps({"name": "Kanava as its own peer", "pids": [n["ztunnel"]["pid"] for n in state["nodes"]]}))
"#;

#[test]
fn quick_benchmark_produces_every_number() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let bins = kanava_lab::bin_dir(None).unwrap();
    let hook = dir.path().join("peer-hook");
    std::fs::write(&hook, PEER_HOOK).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let binary = bins.join("kanava-bench");
    assert!(
        binary.is_file(),
        "{} missing: cargo build --workspace first",
        binary.display()
    );
    let output = std::process::Command::new(&binary)
        .args(["--quick", "--output-dir"])
        .arg(dir.path())
        .arg("--baseline")
        .arg(&bins)
        .arg("--peer")
        .arg(&hook)
        .env("KANAVA", bins.join("kanava"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kanava-bench --quick failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("RESULTS.md").is_file());
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    for field in ["date", "commit"] {
        assert!(
            results[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}"
        );
    }
    assert!(results["machine"]["cores"].as_u64().unwrap() > 0);

    let comparisons = results["comparisons"].as_array().unwrap();
    let compared = |scenario: &str, metric: &str| {
        comparisons
            .iter()
            .find(|c| c["scenario"] == scenario && c["metric"] == metric)
            .unwrap_or_else(|| panic!("no numbers for {scenario} / {metric}"))
    };
    for (scenario, metrics) in [
        ("throughput", &["1 stream", "8 streams"][..]),
        ("latency back-to-back", &["p50", "p90", "p99", "p99.9"][..]),
        ("latency at 1000/s", &["p50", "p90", "p99", "p99.9"][..]),
        ("connection churn", &["1 client", "16 clients"][..]),
        ("first connection", &["connect + 1 KiB round trip"][..]),
    ] {
        for metric in metrics {
            let c = compared(scenario, metric);
            for side in ["direct", "mesh"] {
                let median = c[side]["median"].as_f64().unwrap();
                assert!(
                    median.is_finite() && median > 0.0,
                    "{scenario} / {metric} / {side}: {median}"
                );
            }
            assert!(c["ratio"].as_f64().unwrap().is_finite());
            // The baseline's mesh and the peer took their turns too.
            for side in ["baseline", "peer"] {
                let median = c[side]["median"].as_f64().unwrap_or(f64::NAN);
                assert!(
                    median.is_finite() && median > 0.0,
                    "{scenario} / {metric} / {side}: {c:#}"
                );
            }
        }
    }
    assert!(results["baseline"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(results["peer"], "Kanava as its own peer");
    let report = std::fs::read_to_string(dir.path().join("RESULTS.md")).unwrap();
    for section in [
        "## This build against the baseline",
        "## Kanava against Kanava as its own peer",
    ] {
        assert!(report.contains(section), "{report}");
    }
    assert!(report.contains("kanava/peer <= 0.8"), "{report}");
    // The peer's own proxies were measured (memory and CPU per byte).
    let peer_measured = results["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["peer"]["median"].as_f64().is_some_and(f64::is_finite))
        .count();
    assert!(peer_measured >= 4, "{results:#}");
    // Every metric held to the baseline and to the peer was measured.
    assert!(!report.contains("not measured"), "{report}");
    let measurements = results["measurements"].as_array().unwrap();
    for metric in [
        "ztunnel RSS idle",
        "ztunnel CPU per GiB (1 stream)",
        "memory per idle connection, client ztunnel",
        "memory per idle connection, server ztunnel",
        "full snapshot to every stream",
        "one pod change to every stream p50",
        "one pod change to every stream p99",
        "RSS",
        "new connections per second achieved",
        "client ztunnel peak RSS",
        "server ztunnel peak RSS",
    ] {
        let m = measurements
            .iter()
            .find(|m| m["metric"] == metric)
            .unwrap_or_else(|| panic!("no numbers for {metric}"));
        assert!(
            m["stats"]["median"].as_f64().unwrap().is_finite(),
            "{metric}"
        );
    }
    // The control plane ran at both quick sizes, each with every figure,
    // and the report shows them side by side.
    for size in ["500 pods, 10 streams", "1,000 pods, 20 streams"] {
        let scenario = format!("control plane, {size}");
        for metric in [
            "full snapshot to every stream",
            "full snapshot, bytes to one stream",
            "one pod change to every stream p99",
            "bytes sent to one stream for one pod change (median)",
            "rollout of 10 pods to every stream",
            "RSS",
        ] {
            let m = measurements
                .iter()
                .find(|m| m["scenario"] == scenario.as_str() && m["metric"] == metric)
                .unwrap_or_else(|| panic!("{scenario}: no numbers for {metric}"));
            let median = m["stats"]["median"].as_f64().unwrap();
            assert!(median.is_finite() && median > 0.0, "{scenario}: {m:#}");
        }
    }
    assert!(report.contains("## Control plane at scale"), "{report}");
    assert!(
        report.contains("| metric | 500 pods, 10 streams | 1,000 pods, 20 streams |"),
        "{report}"
    );
    // One pod change costs a stream the same bytes at either size: what
    // changed is sent, not the cluster.
    let change_bytes = |size: &str| {
        measurements
            .iter()
            .find(|m| {
                m["scenario"] == format!("control plane, {size}").as_str()
                    && m["metric"] == "bytes sent to one stream for one pod change (median)"
            })
            .and_then(|m| m["stats"]["median"].as_f64())
            .unwrap()
    };
    let (small, large) = (
        change_bytes("500 pods, 10 streams"),
        change_bytes("1,000 pods, 20 streams"),
    );
    assert!(large < small * 1.2, "{small} bytes, then {large} bytes");
    // The soak leaves nothing behind and breaks nothing.
    for m in measurements.iter().filter(|m| m["scenario"] == "soak") {
        if m["target"].is_object() {
            assert_eq!(m["target"]["met"], true, "soak: {m:#}");
        }
    }
    assert!(
        measurements
            .iter()
            .filter(|m| m["scenario"] == "soak" && m["target"].is_object())
            .count()
            >= 4,
        "soak numbers are held to their goals"
    );
}
