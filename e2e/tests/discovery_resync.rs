//! A ztunnel that rejects a discovery update keeps its last good state; the
//! control plane must then not go on sending deltas on top of a state the
//! ztunnel does not have. This test speaks the discovery protocol to a lab's
//! real control plane as a ztunnel would, and rejects updates on purpose.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kanava_e2e::{MESH_LAB, apply, as_node, control_plane_channel, runtime, up};
use kanava_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The next response, or a panic after 10 s.
async fn next(responses: &mut tonic::Streaming<pb::DiscoveryResponse>) -> pb::DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// Reads the parts of a full snapshot; returns the last one.
async fn full_snapshot(
    responses: &mut tonic::Streaming<pb::DiscoveryResponse>,
    first: pb::DiscoveryResponse,
) -> pb::DiscoveryResponse {
    assert!(
        first.full_snapshot,
        "expected a full snapshot, got {first:?}"
    );
    let mut last = first;
    while last.more {
        last = next(responses).await;
        assert!(last.full_snapshot);
    }
    last
}

fn reply(response: &pb::DiscoveryResponse, reject: Option<&str>) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest {
        response_nonce: response.nonce.clone(),
        version_info: response.version_info.clone(),
        error_detail: reject.map(|message| pb::ErrorDetail {
            message: message.to_string(),
        }),
        ..Default::default()
    }
}

/// A harmless policy: every apply of a new one changes the mesh state.
fn policy(name: &str) -> String {
    format!(
        "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\n\
         spec: {{action: DENY, rules: [{{from: [{{namespaces: [nowhere]}}]}}]}}\n"
    )
}

#[test]
fn after_a_rejected_update_the_control_plane_resends_the_whole_state() {
    let mut lab = up(MESH_LAB);
    let rt = runtime();
    let (requests, rx) = mpsc::channel(16);
    let mut responses = rt.block_on(async {
        requests
            .send(pb::DiscoveryRequest {
                node_name: "node-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let channel = control_plane_channel(&lab).await;
        pb::discovery_client::DiscoveryClient::new(channel)
            .stream(as_node(&lab, "node-1", ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner()
    });
    let snapshot = rt.block_on(async {
        let first = next(&mut responses).await;
        let snapshot = full_snapshot(&mut responses, first).await;
        requests.send(reply(&snapshot, None)).await.unwrap();
        snapshot
    });

    // A change arrives as a delta; this client rejects it.
    apply(&mut lab, &policy("first"));
    let delta = rt.block_on(next(&mut responses));
    assert!(
        !delta.full_snapshot,
        "a change is sent as a delta: {delta:?}"
    );
    assert!(delta.nonce.ends_with("-delta"));
    rt.block_on(requests.send(reply(&delta, Some("test: rejected on purpose"))))
        .unwrap();

    // The control plane converges by sending everything, at least as new as
    // the rejected delta.
    let resync = rt.block_on(async {
        let first = next(&mut responses).await;
        full_snapshot(&mut responses, first).await
    });
    let version = |r: &pb::DiscoveryResponse| r.version_info.parse::<u64>().unwrap();
    assert!(version(&resync) >= version(&delta));
    assert!(version(&resync) > version(&snapshot));
    rt.block_on(requests.send(reply(&resync, None))).unwrap();

    // Accepted again: the next change is a delta once more.
    apply(&mut lab, &policy("second"));
    let delta = rt.block_on(next(&mut responses));
    assert!(!delta.full_snapshot, "back to deltas: {delta:?}");

    // A rejected full snapshot is not resent at once (it would be rejected
    // again); the next change comes as a full snapshot instead of a delta.
    rt.block_on(requests.send(reply(&delta, None))).unwrap();
    apply(&mut lab, &policy("third"));
    let delta = rt.block_on(next(&mut responses));
    rt.block_on(requests.send(reply(&delta, Some("test: rejected again"))))
        .unwrap();
    let resync = rt.block_on(async {
        let first = next(&mut responses).await;
        full_snapshot(&mut responses, first).await
    });
    rt.block_on(requests.send(reply(&resync, Some("test: the full state too"))))
        .unwrap();
    let quiet = rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(500), responses.message()).await
    });
    assert!(
        quiet.is_err(),
        "nothing is resent until the state changes: {quiet:?}"
    );
    apply(&mut lab, &policy("fourth"));
    let after = rt.block_on(next(&mut responses));
    assert!(
        after.full_snapshot,
        "after a rejected snapshot, changes come whole: {after:?}"
    );
}
