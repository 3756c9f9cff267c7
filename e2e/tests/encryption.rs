//! What crosses the wire between nodes: TLS on port 15008, never the
//! payload in plaintext.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kanava_e2e::{Capture, MESH_LAB, connect, contains, pod_ip, runtime, up};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MARKER: &[u8] = b"KANAVA-PLAINTEXT-CANARY-";

/// Sends 1 MiB of repeated marker text and waits for the sink's answer.
async fn send_marker(lab: &kanava_lab::Lab, from: &str, to: SocketAddr) {
    let mut stream = connect(lab, from, to).await;
    let payload = MARKER.repeat(1024 * 1024 / MARKER.len());
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(&format!("{} ", payload.len())),
        "{answer}"
    );
}

#[test]
fn the_fabric_carries_tls_on_15008_and_never_the_payload() {
    let lab = up(MESH_LAB);
    let client = pod_ip(&lab, "shop/client");
    let sink = SocketAddr::from((pod_ip(&lab, "shop/sink"), 9000));

    let capture = Capture::start(&lab);
    runtime().block_on(send_marker(&lab, "shop/client", sink));
    let packets = capture.stop();

    let between_pods: Vec<_> = packets
        .iter()
        .filter(|p| p.source.ip() == client || p.destination.ip() == client)
        .collect();
    assert!(!between_pods.is_empty(), "the capture saw the transfer");
    for packet in &between_pods {
        assert!(
            packet.source.port() == 15008 || packet.destination.port() == 15008,
            "pod traffic outside HBONE: {packet:?}"
        );
        assert!(
            !contains(&packet.payload, MARKER),
            "plaintext payload on the fabric: {packet:?}"
        );
    }
    let to_hbone: Vec<_> = between_pods
        .iter()
        .filter(|p| p.destination.port() == 15008 && !p.payload.is_empty())
        .collect();
    let first = to_hbone.first().expect("data sent to port 15008");
    assert_eq!(
        &first.payload[..3],
        &[0x16, 0x03, 0x01],
        "HBONE starts with a TLS ClientHello"
    );
    assert!(
        to_hbone
            .iter()
            .any(|p| p.payload.starts_with(&[0x17, 0x03, 0x03])),
        "HBONE carries TLS application data records"
    );
    let carried: usize = to_hbone.iter().map(|p| p.payload.len()).sum();
    assert!(
        carried > 1024 * 1024,
        "the 1 MiB transfer went over 15008 ({carried} bytes)"
    );

    // Control: the same transfer between unenrolled pods IS visible, so the
    // capture would have caught a leak.
    let capture = Capture::start(&lab);
    let plain_sink = SocketAddr::from((pod_ip(&lab, "legacy/plain-sink"), 9000));
    runtime().block_on(send_marker(&lab, "legacy/plain-client", plain_sink));
    let packets = capture.stop();
    assert!(
        packets.iter().any(|p| contains(&p.payload, MARKER)),
        "plaintext between unenrolled pods must show in the capture"
    );
}
