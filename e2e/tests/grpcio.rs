//! The control plane's API driven by a client generated with Google's
//! `grpcio` (Python) from the project's `.proto` files alone: reflection
//! (`grpcio-reflection`), the discovery stream as a node, and a refused
//! certificate request. Interoperability beyond our own Rust client.
//!
//! The Python tools come from `scripts/setup.sh` (`/opt/kanava-tools/venv`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kanava_e2e::{MESH_LAB, up};

fn python() -> PathBuf {
    let python = std::env::var_os("KANAVA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kanava-tools/venv/bin/python"));
    assert!(
        python.is_file(),
        "{} missing: run scripts/setup.sh (it installs grpcio, grpcio-tools and grpcio-reflection)",
        python.display()
    );
    python
}

#[test]
fn a_grpcio_client_generated_from_the_protos_speaks_to_the_control_plane() {
    let lab = up(MESH_LAB);
    let python = python();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = tempfile::tempdir().unwrap();
    let generated = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .args(["kanava/v1/discovery.proto", "kanava/v1/certificates.proto"])
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");

    let output = Command::new("ip")
        .args(["netns", "exec", &lab.netns("fabric").unwrap()])
        .arg(&python)
        .arg(repo.join("e2e/tests/data/grpcio_client.py"))
        .arg(stubs.path())
        .arg(lab.state().control_plane_address().to_string())
        .arg(lab.state().layout().root_cert())
        .arg(lab.node_token("node-1").unwrap())
        .arg("node-1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let services = result["reflection_v1alpha"]
        .as_array()
        .expect("reflection answered");
    for service in ["kanava.v1.Certificates", "kanava.v1.Discovery"] {
        assert!(services.contains(&serde_json::json!(service)), "{result}");
    }
    assert_eq!(result["snapshot"]["full"], true, "{result}");
    let workloads = result["snapshot"]["workloads"].as_array().unwrap();
    for workload in ["shop/client", "shop/web", "legacy/plain-web"] {
        assert!(workloads.contains(&serde_json::json!(workload)), "{result}");
    }
    assert_eq!(
        result["sign"], "PERMISSION_DENIED",
        "node-1 runs no sink pod: {result}"
    );
}
