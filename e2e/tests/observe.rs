//! `kanava status` and `kanava config-dump` against a running lab.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kanava_e2e::{MESH_LAB, kanava, up, wait_for};
use rustix::process::{Pid, Signal, kill_process};

fn run(args: &[&str]) -> (i32, String, String) {
    let output = kanava().args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn status_and_config_dump_show_what_each_ztunnel_holds_and_what_is_wrong() {
    let mut lab = up(MESH_LAB);
    let name = lab.state().name.clone();

    // `up` returns once every pod is captured; a ztunnel may still be
    // fetching the certificate of the last one, which status rightly
    // reports as a problem until it arrives.
    wait_for("the lab to be healthy", || {
        run(&["status", "--name", &name]).0 == 0
    });
    let (code, out, err) = run(&["status", "--name", &name]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("all healthy"), "{out}");
    assert!(out.starts_with("control plane: ready, version "), "{out}");
    let node_2 = out.lines().find(|l| l.starts_with("node-2")).unwrap();
    assert!(node_2.contains(" 3/3 "), "three captured pods: {node_2}");

    let (code, out, _) = run(&["status", "--name", &name, "--output", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["healthy"], true);
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["captured"], 2, "shop/client and shop/local-web");
    assert_eq!(nodes[0]["certificates"], 2);
    assert_eq!(
        nodes[0]["version"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap(),
        json["controlPlane"]["version"].as_f64().unwrap(),
        "the ztunnel is current"
    );

    let (code, out, err) = run(&["config-dump", "--name", &name, "node-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ztunnel on node-1: ready"), "{out}");
    assert!(out.contains("shop/client"), "{out}");
    assert!(
        out.contains("spiffe://cluster.local/ns/shop/sa/client"),
        "{out}"
    );
    let (code, out, _) = run(&["config-dump", "--name", &name, "node-1", "-o", "json"]);
    assert_eq!(code, 0);
    let dump: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dump["capturedPods"].as_array().unwrap().len(), 2);
    assert!(dump["certificates"][0]["notAfter"].is_string());
    assert!(!out.contains("PRIVATE KEY"), "never a key");
    let (code, _, err) = run(&["config-dump", "--name", &name, "node-9"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no node \"node-9\"") && err.contains("node-1, node-2"),
        "{err}"
    );

    // node-2's ztunnel dies and stays dead (its supervisor is held still).
    let ztunnel = lab.ztunnel("node-2").unwrap();
    let signal =
        |pid: u32, signal| kill_process(Pid::from_raw(pid as i32).unwrap(), signal).unwrap();
    signal(ztunnel.supervisor.unwrap(), Signal::STOP);
    signal(ztunnel.pid.unwrap(), Signal::KILL);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, out, _) = run(&["status", "--name", &name]);
    signal(ztunnel.supervisor.unwrap(), Signal::CONT);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PROBLEM node-2: the ztunnel is not running; see `kanava lab logs"),
        "{out}"
    );
    assert!(!out.contains("PROBLEM node-1"), "{out}");
}
