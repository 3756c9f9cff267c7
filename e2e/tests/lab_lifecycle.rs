//! The lab's contract: bad files fail cleanly, `down` leaves nothing, and
//! neither does a test that panics halfway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use kanava_e2e::{MESH_LAB, kanava, require_root, unique_name, up};
use kanava_lab::process;

/// Network namespaces of lab `name` that exist now.
fn namespaces_of(name: &str) -> Vec<String> {
    let prefix = format!("kanava-{name}_");
    kanava_lab::network::list_netns()
        .unwrap()
        .into_iter()
        .filter(|ns| ns.starts_with(&prefix))
        .collect()
}

/// Every pid the lab recorded: pods, components and their supervisors.
fn pids_of(state: &kanava_lab::LabState) -> Vec<u32> {
    state
        .pods
        .iter()
        .filter_map(|p| p.pid)
        .chain(state.components().iter().filter_map(|c| c.pid))
        .chain(state.components().iter().filter_map(|c| c.supervisor))
        .collect()
}

fn lab_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn bad_lab_files_fail_naming_the_problem_and_leave_nothing() {
    require_root();
    let pod = |name: &str, node: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{nodeName: {node}, containers: [{{name: c, command: [sleep, infinity]}}]}}\n"
        )
    };
    let cases = [
        (
            format!("kind: Lab\nnodes: 2\n{}", pod("a", "node-7")),
            "unknown node node-7",
        ),
        (
            format!(
                "kind: Lab\nnodes: 2\n{}{}",
                pod("a", "node-1"),
                pod("a", "node-2")
            ),
            "duplicate pod default/a",
        ),
        ("kind: Lab\nnodes: [a, b\n".to_string(), "invalid lab file"),
    ];
    for (text, expected) in cases {
        let name = unique_name();
        let file = lab_file(&text);
        let output = kanava()
            .args(["lab", "up", "--name", &name, "-f"])
            .arg(file.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "lab up accepted {text}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
        assert!(
            namespaces_of(&name).is_empty(),
            "namespaces left behind for {expected}"
        );
        assert!(
            !kanava_lab::layout::Layout::new(&name).dir.exists(),
            "files left behind"
        );
    }
}

#[test]
fn a_pod_that_cannot_start_fails_up_and_leaves_nothing() {
    require_root();
    let name = unique_name();
    let file = lab_file(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nspec: {containers: [{name: c, command: [sh, -c, 'echo cannot start; exit 3']}]}\n",
    );
    let output = kanava()
        .args(["lab", "up", "--name", &name, "-f"])
        .arg(file.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("pod default/broken exited") && stderr.contains("cannot start"),
        "{stderr}"
    );
    assert!(namespaces_of(&name).is_empty());
}

#[test]
fn lab_down_removes_every_namespace_and_process() {
    require_root();
    let name = unique_name();
    let file = lab_file(MESH_LAB);
    let output = kanava()
        .args(["lab", "up", "--name", &name, "-f"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let status = kanava()
        .args(["lab", "status", "--name", &name, "--output", "json"])
        .output()
        .unwrap();
    assert!(status.status.success());
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["name"], name.as_str());
    assert_eq!(json["nodes"].as_array().unwrap().len(), 2);
    let pods = json["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 8);
    let client = pods.iter().find(|p| p["name"] == "client").unwrap();
    assert_eq!(client["namespace"], "shop");
    assert_eq!(client["node"], "node-1");
    assert_eq!(client["enrolled"], true);
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert!(client["ip"].as_str().unwrap().starts_with("10.244.1."));
    let components: Vec<&str> = json["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        components,
        ["control-plane", "ztunnel/node-1", "ztunnel/node-2"]
    );

    let state = kanava_lab::LabState::load(&name).unwrap();
    let pids = pids_of(&state);
    assert_eq!(pids.len(), 14, "8 pods, 3 components and their supervisors");
    assert!(pids.iter().all(|&pid| process::alive(pid)));
    assert!(!namespaces_of(&name).is_empty());

    let down = kanava()
        .args(["lab", "down", "--name", &name])
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        namespaces_of(&name).is_empty(),
        "namespaces remain: {:?}",
        namespaces_of(&name)
    );
    let alive: Vec<_> = pids.iter().filter(|&&pid| process::alive(pid)).collect();
    assert!(alive.is_empty(), "processes remain: {alive:?}");
    assert!(!state.dir.exists());
}

#[test]
fn a_test_that_panics_midway_leaves_nothing() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let lab = up(MESH_LAB);
        tx.send(lab.state().clone()).unwrap();
        panic!("a test failing halfway through");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let state = rx.recv().unwrap();
    assert!(
        namespaces_of(&state.name).is_empty(),
        "namespaces remain after a panic"
    );
    let alive: Vec<_> = pids_of(&state)
        .into_iter()
        .filter(|&pid| process::alive(pid))
        .collect();
    assert!(
        alive.is_empty(),
        "processes remain after a panic: {alive:?}"
    );
    assert!(!state.dir.exists());
}
