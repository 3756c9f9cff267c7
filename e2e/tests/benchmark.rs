//! The benchmark cannot rot: its quick mode runs in CI and must produce a
//! number for every scenario (the numbers themselves are not judged here),
//! in A/B mode: the baseline is this very build, in a second lab.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kanava_e2e::require_root;

#[test]
fn quick_benchmark_produces_every_number() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let bins = kanava_lab::bin_dir(None).unwrap();
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
            // The baseline's mesh took its turn too.
            let baseline = c["baseline"]["median"].as_f64().unwrap_or(f64::NAN);
            assert!(
                baseline.is_finite() && baseline > 0.0,
                "{scenario} / {metric} / baseline: {c:#}"
            );
        }
    }
    assert!(results["baseline"].as_str().is_some_and(|s| !s.is_empty()));
    let report = std::fs::read_to_string(dir.path().join("RESULTS.md")).unwrap();
    assert!(
        report.contains("## This build against the baseline"),
        "{report}"
    );
    // Every metric held to the baseline was measured.
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
