//! `kanava verify` against a lab: every isolation check runs and passes,
//! the exit code says so, and the JSON report names each check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kanava_e2e::{MESH_LAB, up, verify_report};

#[test]
fn verify_passes_every_isolation_check_on_a_healthy_lab() {
    let lab = up(MESH_LAB);
    let (checks, succeeded) = verify_report(&lab);
    assert!(checks.len() >= 10, "{checks:#?}");
    for check in &checks {
        // This lab has no PERMISSIVE namespace: the one check that needs
        // one says so; every other runs.
        if check["name"] == "plaintext to a PERMISSIVE pod" {
            assert!(check["passed"].is_null(), "{check:#}");
            continue;
        }
        assert_eq!(
            check["passed"],
            serde_json::Value::Bool(true),
            "every check runs and passes on this lab: {check:#}"
        );
    }
    assert!(succeeded, "kanava verify failed");
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
        "identities in the server's access log",
        "UDP to a STRICT pod",
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
