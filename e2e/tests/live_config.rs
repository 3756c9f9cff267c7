//! Configuration changing under live traffic: enrollment at runtime, the
//! control plane going away and coming back, certificates rotating.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kanava_e2e::{apply, exec_ok, http_get, log_line, pod_ip, runtime, up, wait_for};

const LAB: &str = r#"
kind: Lab
nodes: 2
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kanava.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: late}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: client, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: late}
spec:
  nodeName: node-2
  serviceAccountName: app
  containers:
  - {name: c, command: [labapp, http, --port, "80"], readinessProbe: {tcpSocket: {port: 80}}}
"#;

/// Makes a new HTTP connection every `interval` from `from` to `to` until
/// `stop`; returns (successes, failures with their reasons).
fn traffic(
    lab: &kanava_lab::Lab,
    from: &str,
    to: SocketAddr,
    interval: Duration,
    stop: &AtomicBool,
    limit: Duration,
) -> (usize, Vec<String>) {
    let rt = runtime();
    let started = Instant::now();
    let mut ok = 0;
    let mut failures = Vec::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < limit {
        match rt.block_on(http_get(lab, from, to)) {
            Ok(_) => ok += 1,
            Err(e) => failures.push(format!("{:?}: {e}", started.elapsed())),
        }
        std::thread::sleep(interval);
    }
    (ok, failures)
}

#[test]
fn enrolling_a_namespace_at_runtime_captures_and_releases_its_running_pods() {
    let mut lab = up(LAB);
    let app = SocketAddr::from((pod_ip(&lab, "late/app"), 80));
    let pid = lab.pod("late/app").unwrap().pid.unwrap();
    let rt = runtime();
    assert!(!exec_ok(&lab, "late/app", &["iptables-save"]).contains("KANAVA"));
    assert!(
        rt.block_on(http_get(&lab, "shop/client", app)).is_ok(),
        "reachable in plaintext"
    );

    let started = Instant::now();
    apply(
        &mut lab,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late, labels: {kanava.io/dataplane-mode: ambient}}\n",
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "enrollment reached every node in {took:?}"
    );
    assert!(lab.pod("late/app").unwrap().captured);
    assert!(exec_ok(&lab, "late/app", &["iptables-save"]).contains("KANAVA_OUTPUT"));
    let body = rt.block_on(http_get(&lab, "shop/client", app)).unwrap();
    assert!(
        body.contains(&format!("peer {}:", pod_ip(&lab, "shop/client"))),
        "{body}"
    );
    // Now over HBONE, with the client's identity.
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("direction=inbound") && l.contains("pod=late/app") && l.contains("sa/client")
    });
    assert_eq!(lab.pod("late/app").unwrap().pid, Some(pid));
    assert!(
        kanava_lab::process::alive(pid),
        "the process was not restarted"
    );

    let started = Instant::now();
    apply(
        &mut lab,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n",
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "release reached every node in {took:?}"
    );
    assert!(!lab.pod("late/app").unwrap().captured);
    assert!(
        !exec_ok(&lab, "late/app", &["iptables-save"]).contains("KANAVA"),
        "rules removed"
    );
    assert!(kanava_lab::process::alive(pid), "the process keeps running");
    assert!(
        rt.block_on(http_get(&lab, "shop/client", app)).is_ok(),
        "plaintext again"
    );

    // And in again: the pod itself never changed, only its namespace.
    apply(
        &mut lab,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late, labels: {kanava.io/dataplane-mode: ambient}}\n",
    );
    assert!(lab.pod("late/app").unwrap().captured);
    assert!(exec_ok(&lab, "late/app", &["iptables-save"]).contains("KANAVA_OUTPUT"));
}

/// A pod that started before Kanava was installed on its node has no record
/// (no plugin of ours saw it): when its namespace joins the mesh, its
/// ztunnel finds its network namespace by its address and captures it.
#[test]
fn a_running_pod_without_a_record_is_found_by_its_address_and_captured() {
    let mut lab = up(LAB);
    let pod = lab.pod("late/app").unwrap().clone();
    let record = lab
        .pod_records_dir(&pod.node)
        .join(format!("{}.json", pod.uid));
    std::fs::remove_file(&record).expect("the CNI plugin recorded the pod");

    apply(
        &mut lab,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late, labels: {kanava.io/dataplane-mode: ambient}}\n",
    );
    assert!(lab.pod("late/app").unwrap().captured);
    assert!(exec_ok(&lab, "late/app", &["iptables-save"]).contains("KANAVA_OUTPUT"));
    log_line(&lab, &format!("ztunnel/{}", pod.node), |l| {
        l.contains("found the network namespace of a pod without a record")
            && l.contains("late/app")
    });
    // Recorded now, like any other pod, for the next restart.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(written["uid"], pod.uid.as_str());
    assert!(written["netns"].as_str().unwrap().ends_with(&pod.netns));
    let app = SocketAddr::from((pod_ip(&lab, "late/app"), 80));
    runtime()
        .block_on(http_get(&lab, "shop/client", app))
        .unwrap();
    log_line(&lab, &format!("ztunnel/{}", pod.node), |l| {
        l.contains("direction=inbound") && l.contains("pod=late/app") && l.contains("sa/client")
    });
}

#[test]
fn traffic_survives_the_control_plane_going_away_and_changes_flow_after_it_returns() {
    let mut lab = up(LAB);
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    let stop = AtomicBool::new(false);
    let (ok, failures) = std::thread::scope(|scope| {
        let lab = &lab;
        let stop = &stop;
        let driver = scope.spawn(move || {
            traffic(
                lab,
                "shop/client",
                web,
                Duration::from_millis(20),
                stop,
                Duration::from_secs(60),
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        let pid = kanava_e2e::kill_control_plane(lab);
        std::thread::sleep(Duration::from_secs(4));
        assert!(
            !kanava_lab::process::alive(pid),
            "the control plane is down"
        );
        stop.store(true, Ordering::SeqCst);
        driver.join().unwrap()
    });
    assert!(
        ok > 50,
        "traffic flowed while the control plane was down ({ok} connections)"
    );
    assert!(
        failures.is_empty(),
        "{} failed connections: {failures:?}",
        failures.len()
    );

    let subscriptions = |lab: &kanava_lab::Lab, node: &str| {
        let log = lab.logs("control-plane").unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("ztunnel subscribed") && l.contains(&format!("node={node}")))
            .count()
    };
    let before = ["node-1", "node-2"].map(|node| subscriptions(&lab, node));
    lab.restart_control_plane().unwrap();
    // Each ztunnel comes back on its own backoff (capped at 15 s, with
    // jitter): wait for both before changing anything, so the change is
    // carried by the new streams rather than racing the reconnect.
    for (node, before) in ["node-1", "node-2"].into_iter().zip(before) {
        wait_for(&format!("{node} to subscribe again"), || {
            subscriptions(&lab, node) > before
        });
    }
    // A change made now reaches every node (apply waits for each ztunnel).
    let report = apply(
        &mut lab,
        "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: after-restart, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - to: [{ports: [9999]}]\n",
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let rt = runtime();
    assert!(rt.block_on(http_get(&lab, "shop/client", web)).is_ok());
    for node in ["node-1", "node-2"] {
        let log = lab.logs(&format!("ztunnel/{node}")).unwrap();
        assert!(
            log.contains("discovery stream failed"),
            "{node} noticed the outage"
        );
    }
}

#[test]
fn certificates_rotate_under_continuous_traffic() {
    let lab = up(&LAB.replace("nodes: 2", "nodes: 2\ncertificateTTL: 20s"));
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    let stop = AtomicBool::new(false);
    let (ok, failures) = traffic(
        &lab,
        "shop/client",
        web,
        Duration::from_millis(250),
        &stop,
        Duration::from_secs(60),
    );
    assert!(ok > 150, "{ok} connections in a minute");
    assert!(
        failures.is_empty(),
        "{} failed connections: {failures:?}",
        failures.len()
    );
    for (node, identity) in [
        ("node-1", "spiffe://cluster.local/ns/shop/sa/client"),
        ("node-2", "spiffe://cluster.local/ns/shop/sa/web"),
    ] {
        let log = lab.logs(&format!("ztunnel/{node}")).unwrap();
        let issued = log
            .lines()
            .filter(|l| {
                l.contains("workload certificate issued")
                    && l.contains(&format!("identity={identity}"))
            })
            .count();
        assert!(
            issued >= 4,
            "{identity}: {issued} certificates issued in a minute (first + renewals every 10 s)"
        );
    }
}

/// The README's root rotation, in the lab: both roots trusted from the
/// start (step 1), then the control plane switched to signing with the new
/// root (step 2) under continuous traffic. Certificates are short-lived here,
/// so both pods' certificates are renewed from the new root while the other
/// side may still hold one from the old: no connection fails.
#[test]
fn the_root_rotates_without_a_failed_connection() {
    use kanava_control_plane::ca::{SigningMaterial, generate_root};
    use kanava_mesh::names;

    kanava_e2e::require_root();
    let old = generate_root("cluster.local").unwrap();
    let new = generate_root("cluster.local").unwrap();
    let both = format!("{}{}", old.roots_pem, new.roots_pem);
    let spec =
        kanava_lab::LabSpec::parse(&LAB.replace("nodes: 2", "nodes: 2\ncertificateTTL: 20s"), 2)
            .unwrap();
    let mut options = kanava_lab::UpOptions::named(kanava_e2e::unique_name());
    options.ca_files = vec![
        (names::CA_CERT_KEY.to_string(), old.ca_cert_pem.clone()),
        (names::CA_KEY_KEY.to_string(), old.ca_key_pem.clone()),
        (names::ROOT_CERT_KEY.to_string(), both.clone()),
    ];
    let mut lab = kanava_lab::Lab::up(&spec, &options).unwrap();
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));

    // Traffic through a second handle on the same lab, so this one can
    // restart the control plane meanwhile.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let driver = {
        let (name, stop) = (lab.name().to_string(), stop.clone());
        std::thread::spawn(move || {
            let handle = kanava_lab::Lab::attach(Some(&name)).unwrap();
            traffic(
                &handle,
                "shop/client",
                web,
                Duration::from_millis(50),
                &stop,
                Duration::from_secs(90),
            )
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // Step 2: sign with the new root, both still trusted.
    let switch = |signer: &SigningMaterial| {
        for (name, contents) in [
            (names::CA_CERT_KEY, &signer.ca_cert_pem),
            (names::CA_KEY_KEY, &signer.ca_key_pem),
        ] {
            let tmp = lab.ca_dir().join(format!(".{name}"));
            std::fs::write(&tmp, contents).unwrap();
            std::fs::rename(&tmp, lab.ca_dir().join(name)).unwrap();
        }
    };
    switch(&new);
    lab.restart_control_plane().unwrap();

    // Both pods' certificates renewed by the new CA (20 s lifetime: renewed
    // every 10 s), while traffic flows.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let log = lab.logs("control-plane").unwrap();
        let since_switch = log
            .rsplit("certificate authority ready")
            .next()
            .unwrap_or("");
        let renewed = |sa: &str| {
            since_switch
                .lines()
                .any(|l| l.contains("signed workload certificate") && l.contains(sa))
        };
        if renewed("sa/client") && renewed("sa/web") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not renewed by the new root:\n{since_switch}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let (ok, failures) = driver.join().unwrap();
    assert!(ok > 50, "traffic flowed ({ok} connections)");
    assert!(
        failures.is_empty(),
        "{} failed connections: {failures:?}",
        failures.len()
    );
    let log = lab.logs("control-plane").unwrap();
    assert!(
        log.matches("certificate authority ready").count() >= 2,
        "restarted with the new signer"
    );
}
