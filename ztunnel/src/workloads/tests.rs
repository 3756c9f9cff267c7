use kanava_mesh::{Identity, TunnelProtocol};

use super::*;

fn resource(uid: &str, ip: &str) -> pb::Resource {
    let w = Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
        node: "n".into(),
        ips: vec![ip.parse().unwrap()],
        identity: Identity::new("cluster.local", "ns", "sa").unwrap(),
        protocol: TunnelProtocol::Hbone,
        labels: Default::default(),
        mtls_mode: Default::default(),
        resource_version: "1".into(),
        plaintext_inbound_ports: Vec::new(),
    };
    pb::Resource {
        name: w.resource_name(),
        kind: Some(pb::resource::Kind::Workload(w.to_proto())),
    }
}

fn service(name: &str, vip: &str, endpoint: &str) -> pb::Resource {
    pb::Resource {
        name: format!("service/ns/{name}"),
        kind: Some(pb::resource::Kind::Service(pb::Service {
            namespace: "ns".into(),
            name: name.into(),
            addresses: vec![vip.into()],
            ports: vec![pb::ServicePort {
                port: 80,
                target_port: 8080,
                target_port_name: String::new(),
            }],
            endpoints: vec![pb::Endpoint {
                workload_uid: endpoint.into(),
                ports: [(80, 8080)].into(),
            }],
            resource_version: "2".into(),
        })),
    }
}

/// `resource` on another node than the store's ("n").
fn remote(uid: &str, ip: &str) -> pb::Resource {
    let mut r = resource(uid, ip);
    if let Some(pb::resource::Kind::Workload(w)) = &mut r.kind {
        w.node = "m".into();
    }
    r
}

#[test]
fn on_demand_holds_the_node_and_what_it_learned() {
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();
    let store = WorkloadStore::for_node("n");
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "1".into(),
            full_snapshot: true,
            on_demand: true,
            resources: vec![
                resource("own", "10.0.0.1"),
                // As the snapshot carries it: no endpoints.
                pb::Resource {
                    kind: match service("api", "10.96.0.1", "far").kind {
                        Some(pb::resource::Kind::Service(s)) => {
                            Some(pb::resource::Kind::Service(pb::Service {
                                endpoints: Vec::new(),
                                ..s
                            }))
                        }
                        other => other,
                    },
                    ..service("api", "10.96.0.1", "far")
                },
            ],
            ..Default::default()
        })
        .unwrap();
    assert!(store.is_on_demand());
    assert!(!store.needs_learning(ip("10.0.0.1")), "its own pod");
    assert!(store.needs_learning(ip("10.0.0.2")));
    assert!(
        store.needs_learning(ip("10.96.0.1")),
        "a Service without its endpoints"
    );

    // A change of a workload it does not hold is not kept; one of its
    // node is.
    store
        .apply(&delta(
            "2",
            vec![remote("other", "10.0.0.2"), resource("own2", "10.0.0.3")],
            &[],
        ))
        .unwrap();
    assert!(store.find_by_uid("other").is_none());
    assert!(store.find_by_uid("own2").is_some());
    assert_eq!(store.version(), "2");

    // The answers: a workload, a Service with its endpoint, an empty
    // address.
    store.learning().ask("10.0.0.2".into());
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "2".into(),
            learned: vec!["10.0.0.2".into(), "10.96.0.1".into(), "10.0.0.9".into()],
            resources: vec![
                remote("other", "10.0.0.2"),
                service("api", "10.96.0.1", "far"),
                remote("far", "10.0.0.4"),
            ],
            ..Default::default()
        })
        .unwrap();
    for learned in ["10.0.0.2", "10.96.0.1", "10.0.0.9"] {
        assert!(!store.needs_learning(ip(learned)), "{learned}");
    }
    assert!(store.learning().pending().is_empty(), "answered");
    assert!(store.find_by_uid("far").is_some(), "the Service's endpoint");
    assert_eq!(store.version(), "2", "an answer is no new version");

    // Held now, so its changes are kept; a pod that takes the empty
    // address is held too.
    store
        .apply(&delta(
            "3",
            vec![remote("other", "10.0.0.5"), remote("new", "10.0.0.9")],
            &[],
        ))
        .unwrap();
    assert_eq!(
        store.find_by_uid("other").unwrap().ips,
        vec![ip("10.0.0.5")]
    );
    assert!(store.find_by_uid("new").is_some());
    // The held Service gains an endpoint whose workload did not change:
    // it is asked for.
    let mut api = service("api", "10.96.0.1", "far");
    if let Some(pb::resource::Kind::Service(s)) = &mut api.kind {
        s.endpoints.push(pb::Endpoint {
            workload_uid: "ready-now".into(),
            ports: [(80, 8080)].into(),
        });
    }
    store.apply(&delta("4", vec![api], &[])).unwrap();
    assert_eq!(
        store.learning().pending(),
        vec!["workload/ready-now".to_string()]
    );
}

#[test]
fn applies_snapshots_and_changes() {
    let store = WorkloadStore::new();
    assert!(!store.is_ready());
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "1".into(),
            full_snapshot: true,
            resources: vec![
                resource("a", "10.0.0.1"),
                resource("b", "10.0.0.2"),
                service("web", "10.96.0.1", "a"),
            ],
            ..Default::default()
        })
        .unwrap();
    assert!(store.is_ready());
    assert_eq!(
        store.find_by_ip("10.0.0.1".parse().unwrap()).unwrap().uid,
        "a"
    );
    assert_eq!(
        store
            .find_by_ip("::ffff:10.0.0.2".parse().unwrap())
            .unwrap()
            .uid,
        "b",
        "IPv4-mapped addresses find IPv4 workloads"
    );
    assert_eq!(
        store
            .find_service("10.96.0.1".parse().unwrap())
            .unwrap()
            .name,
        "web"
    );

    store
        .apply(&pb::DiscoveryResponse {
            version_info: "2".into(),
            resources: vec![resource("a", "10.0.0.3")],
            removed: vec!["workload/b".into(), "service/ns/web".into()],
            ..Default::default()
        })
        .unwrap();
    assert!(store.find_by_ip("10.0.0.1".parse().unwrap()).is_none());
    assert!(store.find_by_ip("10.0.0.2".parse().unwrap()).is_none());
    assert!(store.find_service("10.96.0.1".parse().unwrap()).is_none());
    assert_eq!(
        store.find_by_ip("10.0.0.3".parse().unwrap()).unwrap().uid,
        "a"
    );
    assert_eq!(
        store.find_by_uid("a").unwrap().ips[0].to_string(),
        "10.0.0.3"
    );
    assert_eq!(store.version(), "2");
    assert_eq!(*store.subscribe().borrow(), 2);
}

#[test]
fn an_invalid_update_changes_nothing() {
    let store = WorkloadStore::new();
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "1".into(),
            full_snapshot: true,
            resources: vec![resource("a", "10.0.0.1")],
            ..Default::default()
        })
        .unwrap();
    let mut bad = resource("b", "10.0.0.2");
    if let Some(pb::resource::Kind::Workload(w)) = &mut bad.kind {
        w.ips = vec!["not-an-ip".into()];
    }
    let bad_policy = pb::Resource {
        name: "policy/ns/p".into(),
        kind: Some(pb::resource::Kind::Policy(pb::Policy {
            namespace: "ns".into(),
            name: "p".into(),
            rules: vec![pb::PolicyRule {
                from: vec![pb::PolicySource {
                    ip_blocks: vec!["10.0.0.0/99".into()],
                    ..Default::default()
                }],
                to: vec![],
            }],
            ..Default::default()
        })),
    };
    for bad in [bad, bad_policy] {
        let err = store
            .apply(&pb::DiscoveryResponse {
                version_info: "2".into(),
                resources: vec![resource("c", "10.0.0.3"), bad],
                removed: vec!["workload/a".into()],
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            err.contains("not-an-ip") || err.contains("10.0.0.0/99"),
            "{err}"
        );
        assert_eq!(store.version(), "1");
        assert!(store.find_by_ip("10.0.0.1".parse().unwrap()).is_some());
        assert!(store.find_by_ip("10.0.0.3".parse().unwrap()).is_none());
        assert!(store.policies().is_empty());
    }
}

fn delta(version: &str, resources: Vec<pb::Resource>, removed: &[&str]) -> pb::DiscoveryResponse {
    pb::DiscoveryResponse {
        version_info: version.into(),
        resources,
        removed: removed.iter().map(ToString::to_string).collect(),
        ..Default::default()
    }
}

fn owner(store: &WorkloadStore, ip: &str) -> Option<String> {
    store.find_by_ip(ip.parse().unwrap()).map(|w| w.uid.clone())
}

#[test]
fn an_address_claimed_twice_belongs_to_the_latest_and_returns_to_the_earlier() {
    let store = WorkloadStore::new();
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "1".into(),
            full_snapshot: true,
            resources: vec![resource("old", "10.0.0.1")],
            ..Default::default()
        })
        .unwrap();
    // A new pod got the address before the old one's removal arrived.
    store
        .apply(&delta("2", vec![resource("new", "10.0.0.1")], &[]))
        .unwrap();
    assert_eq!(owner(&store, "10.0.0.1").as_deref(), Some("new"));
    // The new one goes first: the address is the old one's again.
    store.apply(&delta("3", vec![], &["workload/new"])).unwrap();
    assert_eq!(owner(&store, "10.0.0.1").as_deref(), Some("old"));
    // Claimed again, then the earlier claimant goes: the latest keeps it.
    store
        .apply(&delta("4", vec![resource("new", "10.0.0.1")], &[]))
        .unwrap();
    store.apply(&delta("5", vec![], &["workload/old"])).unwrap();
    assert_eq!(owner(&store, "10.0.0.1").as_deref(), Some("new"));
    // A workload that moves to another address leaves the first free.
    store
        .apply(&delta("6", vec![resource("new", "10.0.0.2")], &[]))
        .unwrap();
    assert_eq!(owner(&store, "10.0.0.1"), None);
    assert_eq!(owner(&store, "10.0.0.2").as_deref(), Some("new"));
    assert!(store.find_by_uid("old").is_none());
    assert!(store.find_by_uid("new").is_some());
}

#[test]
fn incremental_updates_leave_the_indexes_a_full_snapshot_would_build() {
    // A long, deterministic run of changes: workloads move, Services
    // change endpoints, policies come and go.
    let store = WorkloadStore::new();
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "0".into(),
            full_snapshot: true,
            ..Default::default()
        })
        .unwrap();
    let policy = |n: u32| pb::Resource {
        name: format!("policy/ns/p{n}"),
        kind: Some(pb::resource::Kind::Policy(pb::Policy {
            namespace: "ns".into(),
            name: format!("p{n}"),
            ..Default::default()
        })),
    };
    let mut state: HashMap<String, pb::Resource> = HashMap::new();
    let mut seed = 7u32;
    for step in 1..400u32 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let n = (seed >> 8) % 40;
        let (resources, removed): (Vec<pb::Resource>, Vec<String>) = match (seed >> 4) % 4 {
            0 => (
                vec![resource(
                    &format!("w{n}"),
                    &format!("10.0.{}.{}", n % 3, step % 7),
                )],
                vec![],
            ),
            1 => (
                vec![service(
                    &format!("s{n}"),
                    &format!("10.96.0.{}", n % 5),
                    &format!("w{}", (n + step) % 40),
                )],
                vec![],
            ),
            2 => (vec![policy(n)], vec![]),
            _ => {
                let name = state.keys().nth(n as usize % state.len().max(1)).cloned();
                (vec![], name.into_iter().collect())
            }
        };
        for name in &removed {
            state.remove(name);
        }
        for r in &resources {
            state.insert(r.name.clone(), r.clone());
        }
        let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
        store
            .apply(&delta(&step.to_string(), resources, &removed))
            .unwrap();
    }
    let rebuilt = WorkloadStore::new();
    rebuilt
        .apply(&pb::DiscoveryResponse {
            version_info: "x".into(),
            full_snapshot: true,
            resources: state.values().cloned().collect(),
            ..Default::default()
        })
        .unwrap();
    let uids = |s: &WorkloadStore| -> Vec<String> {
        s.workloads().iter().map(|w| w.uid.clone()).collect()
    };
    assert_eq!(uids(&store), uids(&rebuilt));
    let services =
        |s: &WorkloadStore| -> Vec<String> { s.services().iter().map(|s| s.key()).collect() };
    assert_eq!(services(&store), services(&rebuilt));
    assert_eq!(store.policies().len(), rebuilt.policies().len());
    // Every address one store resolves, the other resolves to a
    // claimant of it too (which one may differ where two claim it).
    for a in 0..3 {
        for b in 0..7 {
            let ip: IpAddr = format!("10.0.{a}.{b}").parse().unwrap();
            assert_eq!(
                store.find_by_ip(ip).is_some(),
                rebuilt.find_by_ip(ip).is_some(),
                "{ip}"
            );
            if let Some(w) = store.find_by_ip(ip) {
                assert!(w.ips.contains(&ip), "{ip} resolves to {}", w.uid);
                assert!(rebuilt.find_by_uid(&w.uid).is_some());
            }
        }
    }
    for v in 0..5 {
        let ip: IpAddr = format!("10.96.0.{v}").parse().unwrap();
        assert_eq!(
            store.find_service(ip).map(|s| s.key()).is_some(),
            rebuilt.find_service(ip).is_some(),
            "{ip}"
        );
    }
}
