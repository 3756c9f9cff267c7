use kanava_mesh::{TunnelProtocol, Workload};

use super::*;

fn state(workloads: Vec<Workload>) -> MeshState {
    MeshState {
        workloads: workloads.into_iter().map(Arc::new).collect(),
        ..Default::default()
    }
}

fn workload(uid: &str, node: &str, sa: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        node: node.into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        identity: Identity::new("cluster.local", "shop", sa).unwrap(),
        protocol: TunnelProtocol::Hbone,
        labels: Default::default(),
        mtls_mode: Default::default(),
        resource_version: "1".into(),
        plaintext_inbound_ports: Vec::new(),
    }
}

#[tokio::test]
async fn changes_are_computed_once_and_in_order() {
    let store = Store::new();
    let first = store
        .replace(&state(vec![
            workload("a", "n1", "web"),
            workload("b", "n2", "db"),
        ]))
        .unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first.upserts.len(), 2);

    let (snapshot, mut changes) = store.subscribe().await;
    assert_eq!(snapshot.version, 1);
    assert!(store.node_runs(
        "n1",
        &Identity::new("cluster.local", "shop", "web").unwrap()
    ));
    assert!(!store.node_runs(
        "n2",
        &Identity::new("cluster.local", "shop", "web").unwrap()
    ));

    assert!(
        store
            .replace(&state(vec![
                workload("a", "n1", "web"),
                workload("b", "n2", "db")
            ]))
            .is_none(),
        "no change, no new version"
    );
    let mut moved = workload("a", "n2", "web");
    moved.ips = vec!["10.0.0.2".parse().unwrap()];
    store.replace(&state(vec![moved])).unwrap();
    let delta = changes.recv().await.unwrap();
    assert_eq!(delta.version, 2);
    assert_eq!(delta.upserts.len(), 1);
    assert_eq!(delta.removed, vec!["workload/b".to_string()]);
    assert!(store.node_runs(
        "n2",
        &Identity::new("cluster.local", "shop", "web").unwrap()
    ));
    assert!(
        !store.node_runs(
            "n1",
            &Identity::new("cluster.local", "shop", "web").unwrap()
        ),
        "the pod left n1"
    );
    assert!(
        !store.node_runs("n2", &Identity::new("cluster.local", "shop", "db").unwrap()),
        "the db pod is gone"
    );
}

#[test]
fn changes_applied_in_place_serve_what_a_fresh_store_would() {
    let shared = |workloads: &[&Arc<Workload>]| MeshState {
        workloads: workloads.iter().map(|w| Arc::clone(w)).collect(),
        ..Default::default()
    };
    let store = Store::new();
    let a = Arc::new(workload("a", "n1", "web"));
    let b = Arc::new(workload("b", "n2", "db"));
    store.replace(&shared(&[&a, &b])).unwrap();
    assert!(
        store.replace(&shared(&[&a, &b])).is_none(),
        "the same items again"
    );
    let a_again = Arc::new(workload("a", "n1", "web"));
    assert!(
        store.replace(&shared(&[&a_again, &b])).is_none(),
        "a new item that makes what is served is not a change"
    );

    // Two pods claim one uid: the name stays while either does.
    let c1 = Arc::new(workload("c", "n1", "web"));
    let c2 = Arc::new(workload("c", "n1", "web"));
    let delta = store.replace(&shared(&[&a_again, &b, &c1, &c2])).unwrap();
    assert_eq!(delta.upserts.len(), 1);
    assert!(store.replace(&shared(&[&a_again, &b, &c2])).is_none());
    let delta = store.replace(&shared(&[&a_again, &c2])).unwrap();
    assert_eq!(delta.removed, vec!["workload/b".to_string()]);
    assert!(!store.node_runs("n2", &Identity::new("cluster.local", "shop", "db").unwrap()));
    assert!(store.node_runs(
        "n1",
        &Identity::new("cluster.local", "shop", "web").unwrap()
    ));

    let fresh = Store::new();
    fresh.replace(&shared(&[&a_again, &c2]));
    assert_eq!(store.snapshot().resources, fresh.snapshot().resources);

    // Two claims that differ: the latest is served; when it goes, the
    // earlier one is served again.
    let d1 = Arc::new(workload("d", "n1", "web"));
    let d2 = Arc::new(workload("d", "n2", "web"));
    store.replace(&shared(&[&a_again, &c2, &d1])).unwrap();
    store.replace(&shared(&[&a_again, &c2, &d1, &d2])).unwrap();
    let served = |store: &Store| store.snapshot().resources["workload/d"].clone();
    let expected = Store::new();
    expected.replace(&shared(&[&d2]));
    assert_eq!(served(&store), served(&expected));
    let delta = store.replace(&shared(&[&a_again, &c2, &d1])).unwrap();
    assert!(delta.removed.is_empty());
    expected.replace(&shared(&[&d1]));
    assert_eq!(*delta.upserts, [served(&expected)]);
    assert_eq!(served(&store), served(&expected));
    store.replace(&shared(&[&a_again, &c2])).unwrap();
    assert_eq!(store.snapshot().resources, fresh.snapshot().resources);
    let delta = store.replace(&shared(&[])).unwrap();
    assert_eq!(delta.removed.len(), 2);
    assert!(store.snapshot().resources.is_empty());
    assert!(!store.node_runs(
        "n1",
        &Identity::new("cluster.local", "shop", "web").unwrap()
    ));
}

#[test]
fn responses_encoded_without_copies_decode_as_the_whole_message() {
    let store = Store::new();
    store.set_trust_bundle(pb::TrustBundle {
        roots: vec!["root".into()],
        ..Default::default()
    });
    let delta = store
        .replace(&state(vec![
            workload("a", "n1", "web"),
            workload("b", "n2", "db"),
        ]))
        .unwrap();
    let decoded = pb::DiscoveryResponse::decode(delta.encoded()).unwrap();
    let expected = pb::DiscoveryResponse {
        version_info: "1".into(),
        nonce: "1-delta".into(),
        full_snapshot: false,
        resources: delta.upserts.iter().map(|r| r.decode().unwrap()).collect(),
        removed: Vec::new(),
        more: false,
        trust_bundle: None,
        ..Default::default()
    };
    assert_eq!(decoded, expected);
    assert_eq!(decoded.resources.len(), 2);

    let parts = store.snapshot().encoded(false);
    assert!(!parts[0].compressed);
    let full = pb::DiscoveryResponse::decode(parts[0].bytes.clone()).unwrap();
    assert_eq!(full.resources, expected.resources);
    assert_eq!(full.trust_bundle.unwrap().roots, vec!["root".to_string()]);
    assert!(full.full_snapshot && !full.more);
}

#[test]
fn compressed_parts_decompress_to_the_plain_ones() {
    let store = Store::new();
    let workloads = |extra: Option<&str>| {
        (0..SNAPSHOT_PART + 10)
            .map(|i| format!("pod-{i}"))
            .chain(extra.map(String::from))
            .map(|uid| workload(&uid, "n1", "web"))
            .collect()
    };
    store.replace(&state(workloads(None))).unwrap();
    let snapshot = store.snapshot();
    let plain = snapshot.encoded(false);
    let compressed = snapshot.encoded(true);
    assert_eq!(plain.len(), 2, "two parts");
    assert_eq!(compressed.len(), plain.len());
    for (plain, compressed) in plain.iter().zip(compressed.iter()) {
        assert!(compressed.compressed);
        assert!(
            compressed.bytes.len() * 4 < plain.bytes.len(),
            "compressed well"
        );
        let inflated = zstd::bulk::decompress(&compressed.bytes, plain.bytes.len()).unwrap();
        assert_eq!(inflated, plain.bytes);
    }
    // Built once, shared by every stream.
    assert!(Arc::ptr_eq(&compressed, &snapshot.encoded(true)));
    // One pod's change is small: it goes as it is.
    let delta = store.replace(&state(workloads(Some("one-more")))).unwrap();
    assert_eq!(delta.upserts.len(), 1);
    assert_eq!(delta.outgoing(true), Outgoing::plain(delta.encoded()));
}

#[test]
fn a_change_of_the_resource_version_alone_is_no_change() {
    let store = Store::new();
    let pod = |version: &str, node: &str| Workload {
        resource_version: version.into(),
        ..workload("a", node, "web")
    };
    store.replace(&state(vec![pod("5", "n1")])).unwrap();
    // The kubelet's status updates: a new version, nothing else.
    assert!(store.replace(&state(vec![pod("6", "n1")])).is_none());
    assert!(store.replace(&state(vec![pod("7", "n1")])).is_none());
    let served = store.snapshot();
    let Some(pb::resource::Kind::Workload(served)) =
        served.resources["workload/a"].decode().unwrap().kind
    else {
        panic!("a workload");
    };
    assert_eq!(
        served.resource_version, "5",
        "the version of the last change"
    );
    // A change the mesh sees goes out, with its version.
    let delta = store.replace(&state(vec![pod("8", "n2")])).unwrap();
    let Some(pb::resource::Kind::Workload(changed)) = delta.upserts[0].decode().unwrap().kind
    else {
        panic!("a workload");
    };
    assert_eq!(changed.resource_version, "8");
}

#[tokio::test]
async fn subscribers_wait_for_the_first_load() {
    let store = Arc::new(Store::new());
    let waiting = tokio::spawn({
        let store = store.clone();
        async move { store.subscribe().await.0.version }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    store.replace(&MeshState::default());
    assert_eq!(
        waiting.await.unwrap(),
        1,
        "an empty but loaded mesh is version 1"
    );
}

/// Resources are compared by their bytes (what ztunnels are sent), so
/// equal items must encode alike: maps in a fixed order.
#[test]
fn equal_items_encode_to_the_same_bytes() {
    let labelled = || {
        let labels: std::collections::BTreeMap<String, String> = (0..16)
            .map(|i| (format!("label-{i}"), format!("value-{i}")))
            .collect();
        Item::Workload(Arc::new(Workload {
            labels: Arc::new(labels),
            ..workload("a", "n1", "web")
        }))
    };
    let service = || {
        Item::Service(Arc::new(kanava_mesh::Service {
            namespace: "shop".into(),
            name: "api".into(),
            addresses: vec!["10.96.0.1".parse().unwrap()],
            ports: Vec::new(),
            endpoints: vec![kanava_mesh::Endpoint {
                workload_uid: "a".into(),
                ports: (1..16).map(|p| (p, p + 1000)).collect(),
            }],
            resource_version: "1".into(),
        }))
    };
    for _ in 0..8 {
        assert_eq!(Served::new(labelled()), Served::new(labelled()));
        assert_eq!(Served::new(service()), Served::new(service()));
    }
}
