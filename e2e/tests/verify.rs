//! `kanava verify` against a lab: every isolation check runs and passes,
//! the exit code says so, and the JSON report names each check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kanava_e2e::{MESH_LAB, kanava, up};

#[test]
fn verify_passes_every_isolation_check_on_a_healthy_lab() {
    let lab = up(MESH_LAB);
    let output = kanava()
        .args(["verify", "--name", lab.name(), "--output", "json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let checks = report.as_array().expect("a list of checks");
    assert!(checks.len() >= 10, "{report:#}");
    for check in checks {
        assert_eq!(
            check["passed"],
            serde_json::Value::Bool(true),
            "every check runs and passes on this lab: {check:#}"
        );
    }
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for expected in [
        "ztunnel admin port from a pod",
        "control plane from a pod",
        "plaintext to a STRICT pod",
        "certificate from a foreign CA on :15008",
        "CSR for an identity of another node",
        "a pod dialling its ztunnel's own listeners",
        "a spoofed source address",
        "a pod's traffic on the node-to-node fabric",
        "a DENY added while connections are open",
    ] {
        assert!(names.contains(&expected), "missing {expected}: {names:?}");
    }
    // The temporary policy is gone again.
    let manifests = std::fs::read_dir(lab.state().layout().manifest_dir()).unwrap();
    assert!(
        manifests
            .flatten()
            .all(|f| !f.file_name().to_string_lossy().contains("kanava-verify")),
        "verify left its policy behind"
    );
}
