//! Handing pods to the ztunnel and taking them back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kanava_e2e::{MESH_LAB, exec_ok, listening_ports, log_line, pod_ip, up};
use kanava_handoff::client;

#[test]
fn a_released_pod_loses_rules_and_listeners_but_keeps_running() {
    let lab = up(MESH_LAB);
    let web = lab.pod("shop/web").unwrap().clone();
    let socket = lab.state().node(&web.node).unwrap().handoff_socket.clone();

    let ports = listening_ports(&lab, "shop/web");
    for port in [15001, 15006, 15008, 80] {
        assert!(
            ports.contains(&port),
            "port {port} not listening in the captured pod: {ports:?}"
        );
    }
    assert!(exec_ok(&lab, "shop/web", &["iptables-save"]).contains("KANAVA_PRERT"));

    client::delete_pod(&socket, &web.uid, None, Duration::from_secs(10)).unwrap();

    let ports = listening_ports(&lab, "shop/web");
    for port in [15001, 15006, 15008] {
        assert!(
            !ports.contains(&port),
            "port {port} still open after release: {ports:?}"
        );
    }
    assert!(ports.contains(&80), "the app keeps running");
    assert!(kanava_lab::process::alive(web.pid.unwrap()));
    let rules = exec_ok(&lab, "shop/web", &["iptables-save"]);
    assert!(
        !rules.contains("KANAVA"),
        "rules remain after release:\n{rules}"
    );
    let ip_rules = exec_ok(&lab, "shop/web", &["ip", "rule"]);
    assert!(
        !ip_rules.contains("0x111"),
        "policy route remains:\n{ip_rules}"
    );

    // Uncaptured now: plaintext reaches it.
    let url = format!("http://{}/", pod_ip(&lab, "shop/web"));
    let body = exec_ok(
        &lab,
        "legacy/plain-client",
        &["curl", "-sf", "-m", "10", &url],
    );
    assert!(body.starts_with("hello from shop/web"), "{body}");

    // Releasing an unknown or already released pod succeeds.
    client::delete_pod(&socket, &web.uid, None, Duration::from_secs(10)).unwrap();
    let log = lab.logs(&format!("ztunnel/{}", web.node)).unwrap();
    assert!(log.contains("pod released"), "{log}");
}

#[test]
fn the_handoff_refuses_malformed_requests() {
    let lab = up(MESH_LAB);
    let node = &lab.state().nodes[0];
    let netns = std::fs::File::open(
        std::path::PathBuf::from("/run/netns").join(lab.netns("legacy/plain-client").unwrap()),
    )
    .unwrap();
    let not_a_netns = std::fs::File::open("/proc/self/exe").unwrap();
    let info = |ips: Vec<&str>| kanava_proto::v1::PodInfo {
        uid: "u-1".into(),
        name: "plain-client".into(),
        namespace: "legacy".into(),
        service_account: String::new(),
        ips: ips.into_iter().map(String::from).collect(),
        container_id: String::new(),
    };
    let err = client::add_pod(
        &node.handoff_socket,
        info(vec!["not-an-ip"]),
        &netns,
        Duration::from_secs(10),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not-an-ip"), "{err}");
    let err = client::add_pod(
        &node.handoff_socket,
        info(vec![]),
        &netns,
        Duration::from_secs(10),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("has no IP"), "{err}");
    // A descriptor that is not a network namespace.
    let err = client::add_pod(
        &node.handoff_socket,
        info(vec!["10.244.1.9"]),
        &not_a_netns,
        Duration::from_secs(10),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("network namespace"), "{err}");
    // Nothing was captured by any of them.
    assert!(!exec_ok(&lab, "legacy/plain-client", &["iptables-save"]).contains("KANAVA"));
}

#[test]
fn only_root_may_hand_pods_over() {
    use std::os::unix::fs::PermissionsExt;
    let lab = up(MESH_LAB);
    let socket = lab.state().node("node-1").unwrap().handoff_socket.clone();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the handoff socket is root's alone");

    // Even with the file opened up, the ztunnel asks the kernel who is
    // connecting and refuses anyone but root.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = std::thread::spawn(move || {
        // Only this thread becomes `nobody`; the test process stays root.
        rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(65534)).unwrap();
        client::delete_pod(&socket, "no-such-pod", None, Duration::from_secs(10))
            .map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    let error = refused.expect_err("a non-root peer is refused");
    assert!(
        error.contains("uid 65534 may not hand pods over"),
        "{error}"
    );
    log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("handoff connection refused") && l.contains("65534")
    });
}

/// CNI CHECK, run through the node's chain as the runtime runs it, asks the
/// ztunnel whether the pod is captured, and fails when it is not.
#[test]
fn cni_check_verifies_the_capture_is_in_place() {
    let lab = up(MESH_LAB);
    lab.cni_check("shop/web")
        .expect("a captured pod passes CHECK");
    lab.cni_check("legacy/plain-web")
        .expect("a pod outside the mesh has nothing to check");

    // Its rules removed behind the ztunnel's back.
    let netns = lab.netns("shop/web").unwrap();
    for args in [
        ["-t", "nat", "-D", "PREROUTING", "-j", "KANAVA_PRERT"],
        ["-t", "nat", "-F", "KANAVA_PRERT", "", ""],
        ["-t", "nat", "-X", "KANAVA_PRERT", "", ""],
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "iptables"])
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success(), "iptables {args:?}");
    }
    let error = lab.cni_check("shop/web").unwrap_err().to_string();
    assert!(error.contains("capture rules are gone"), "{error}");

    // Released: the ztunnel no longer holds it.
    let web = lab.pod("shop/web").unwrap().clone();
    let socket = lab.state().node(&web.node).unwrap().handoff_socket.clone();
    client::delete_pod(&socket, &web.uid, None, Duration::from_secs(10)).unwrap();
    let error = lab.cni_check("shop/web").unwrap_err().to_string();
    assert!(error.contains("does not hold it"), "{error}");
    assert!(error.contains("\"code\":100"), "a CNI error: {error}");
}

/// Runtimes send DEL more than once: again once the sandbox is gone, and
/// for sandboxes whose ADD failed, sometimes long after the pod's next
/// sandbox was captured. Only a DEL for the sandbox that is captured
/// releases the pod.
#[test]
fn only_a_del_for_the_captured_sandbox_releases_the_pod() {
    let lab = up(MESH_LAB);
    let web = lab.pod("shop/web").unwrap().clone();
    let socket = lab.state().node(&web.node).unwrap().handoff_socket.clone();
    let still_captured = |after: &str| {
        lab.cni_check("shop/web")
            .unwrap_or_else(|e| panic!("after {after}, the live pod must stay captured: {e}"));
        let ports = listening_ports(&lab, "shop/web");
        assert!(
            [15001, 15006, 15008].iter().all(|p| ports.contains(p)),
            "after {after}: {ports:?}"
        );
    };

    // A sandbox of the same pod whose ADD failed, cleaned up again after
    // its namespace is gone (the runtime's garbage collection, a kubelet
    // restart), twice.
    for _ in 0..2 {
        lab.cni_delete("shop/web", Some("sandbox-whose-add-failed"), false)
            .expect("DEL of a stale sandbox succeeds");
    }
    still_captured("DELs for another sandbox");

    // The ztunnel checks the sandbox too: a pod without a record (found on
    // the node, or a record lost) is not released for another sandbox.
    client::delete_pod(
        &socket,
        &web.uid,
        Some("sandbox-whose-add-failed"),
        Duration::from_secs(10),
    )
    .unwrap();
    still_captured("a handoff release for another sandbox");

    // Its own sandbox: released, and the runtime's repeats succeed.
    lab.cni_delete("shop/web", None, true)
        .expect("DEL of the live sandbox");
    let error = client::check_pod(&socket, &web.uid, Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not hold it"), "{error}");
    lab.cni_delete("shop/web", None, true)
        .expect("a repeated DEL succeeds");
    lab.cni_delete("shop/web", None, false)
        .expect("a DEL once the namespace is gone succeeds");
    let log = lab.logs(&format!("ztunnel/{}", web.node)).unwrap();
    assert!(
        log.contains("release for another sandbox of the pod ignored"),
        "{log}"
    );
}
