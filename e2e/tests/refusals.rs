//! Bad input is refused, and says why: CONNECT to the wrong pod, TLS
//! clients without a mesh certificate, plaintext to an enrolled pod, and
//! certificate requests for identities the node does not run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use kanava_e2e::{
    MESH_LAB, connect, control_plane_channel, control_plane_metric, http_get, log_line, mesh_cert,
    mesh_roots, pod_ip, runtime, up,
};
use kanava_mesh::Identity;
use kanava_proto::v1 as pb;
use kanava_tls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Opens HBONE to `pod`:15008 from `from` and sends `CONNECT target`.
async fn connect_status(
    lab: &kanava_lab::Lab,
    from: &str,
    pod: &str,
    target: SocketAddr,
    tls: Arc<kanava_tls::rustls::ClientConfig>,
) -> Result<StatusCode, String> {
    let tcp = connect(lab, from, SocketAddr::from((pod_ip(lab, pod), 15008))).await;
    let server_name = ServerName::IpAddress(pod_ip(lab, pod).into());
    let stream = TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(connection);
    let mut sender = sender.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let (response, _send) = sender
        .send_request(request, false)
        .map_err(|e| format!("send: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .map_err(|_| "no response".to_string())?
        .map_err(|e| format!("response: {e}"))?;
    Ok(response.status())
}

#[test]
fn hbone_refuses_wrong_targets_and_clients_without_mesh_certificates() {
    let lab = up(MESH_LAB);
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    let sink = SocketAddr::from((pod_ip(&lab, "shop/sink"), 9000));
    let roots = mesh_roots(&lab);
    let web_identity: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let intruder: Identity = "spiffe://cluster.local/ns/legacy/sa/intruder"
        .parse()
        .unwrap();

    runtime().block_on(async {
        // A client with a valid mesh certificate, from an uncaptured pod.
        let cert = mesh_cert(&lab, &intruder);
        let tls = kanava_tls::hbone_client_config(&cert, &roots, &web_identity).unwrap();
        let ok = connect_status(&lab, "legacy/plain-client", "shop/web", web, tls.clone()).await;
        assert_eq!(
            ok,
            Ok(StatusCode::OK),
            "control: the right target is accepted"
        );
        let wrong = connect_status(&lab, "legacy/plain-client", "shop/web", sink, tls).await;
        assert_eq!(
            wrong,
            Ok(StatusCode::BAD_REQUEST),
            "CONNECT to another pod's IP"
        );

        // No client certificate at all.
        let no_cert =
            kanava_tls::rustls::ClientConfig::builder_with_provider(kanava_tls::provider())
                .with_protocol_versions(&[&kanava_tls::rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(kanava_tls::SpiffeServerVerifier::new(
                    &roots,
                    web_identity.clone(),
                )))
                .with_no_client_auth();
        let mut no_cert = no_cert;
        no_cert.alpn_protocols = vec![b"h2".to_vec()];
        let refused = connect_status(
            &lab,
            "legacy/plain-client",
            "shop/web",
            web,
            Arc::new(no_cert),
        )
        .await;
        assert!(
            refused.is_err(),
            "a client without certificate got {refused:?}"
        );

        // A certificate from another CA, for a plausible identity.
        let other_ca = tempfile::tempdir().unwrap();
        let foreign =
            kanava_control_plane::ca::files::load_or_create(other_ca.path(), "cluster.local")
                .unwrap();
        let client_id: Identity = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        let request = kanava_tls::CertificateRequest::generate(&client_id).unwrap();
        let issued = foreign
            .sign_workload(request.csr_der(), &client_id, Duration::from_secs(60))
            .unwrap();
        let forged = request.into_cert(&issued.chain_pem).unwrap();
        let tls = kanava_tls::hbone_client_config(&forged, &roots, &web_identity).unwrap();
        let refused = connect_status(&lab, "legacy/plain-client", "shop/web", web, tls).await;
        assert!(
            refused.is_err(),
            "a certificate from a foreign CA got {refused:?}"
        );
    });
    let failures = kanava_e2e::metric(&lab, "node-2", "kanava_hbone_handshake_failures_total");
    assert!(
        failures >= 2.0,
        "refused handshakes are counted ({failures})"
    );
    // The 400 is logged with its reason.
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("is not an address of pod shop/web")
    });
}

#[test]
fn plaintext_to_an_enrolled_pod_is_refused() {
    let lab = up(MESH_LAB);
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    // The reset may come before connect() even returns; either way the
    // client must get nothing from the app.
    let answer = runtime().block_on(http_get(&lab, "legacy/plain-client", web));
    assert!(
        answer.is_err(),
        "plaintext connection to an enrolled pod must be refused, got {answer:?}"
    );
    log_line(&lab, "ztunnel/node-2", |l| {
        l.contains("outcome=denied") && l.contains("mutual TLS is required")
    });
}

#[test]
fn the_ca_signs_only_for_identities_on_the_requesting_node() {
    let lab = up(MESH_LAB);
    // Only node-2 runs a pod (shop/sink) with this identity.
    let sink: Identity = "spiffe://cluster.local/ns/shop/sa/sink".parse().unwrap();
    let before_not_on_node = control_plane_metric(
        &lab,
        "kanava_control_plane_certificate_requests_total",
        "reason=\"not_on_node\"",
    );
    let before_signed = control_plane_metric(
        &lab,
        "kanava_control_plane_certificate_requests_total",
        "result=\"signed\"",
    );

    runtime().block_on(async {
        let sign = |token: String, identity: Identity| {
            let lab = &lab;
            async move {
                let channel = control_plane_channel(lab).await;
                let request = kanava_tls::CertificateRequest::generate(&identity).unwrap();
                let mut call = tonic::Request::new(pb::SignRequest {
                    csr: request.csr_der().to_vec(),
                    identity: identity.to_string(),
                    ttl_seconds: 0,
                });
                call.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                pb::certificates_client::CertificatesClient::new(channel).sign(call).await
            }
        };

        // node-1 runs no pod with the sink identity: refused, saying so.
        let status = sign(lab.node_token("node-1").unwrap(), sink.clone()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("no pod with identity spiffe://cluster.local/ns/shop/sa/sink is scheduled on node node-1"),
            "{status:?}"
        );
        // node-2 does: signed.
        let signed = sign(lab.node_token("node-2").unwrap(), sink.clone()).await.unwrap();
        assert!(!signed.get_ref().cert_chain.is_empty());
        // A made-up credential: refused as unauthenticated.
        let status = sign("x".repeat(64), sink).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    });
    let log = lab.logs("control-plane").unwrap();
    assert!(
        log.contains("certificate request refused"),
        "refusals are logged:\n{log}"
    );
    // ...and counted, by reason (the made-up credential never reached the
    // service: authentication refused it first). A ztunnel may have been
    // refused the same way at start-up, asking before the control plane
    // knew its pod, so the count is compared with the one before the calls.
    let requests = "kanava_control_plane_certificate_requests_total";
    let not_on_node = control_plane_metric(&lab, requests, "reason=\"not_on_node\"");
    assert!(
        not_on_node >= before_not_on_node + 1.0,
        "{before_not_on_node} -> {not_on_node}"
    );
    assert!(control_plane_metric(&lab, requests, "result=\"signed\"") >= before_signed + 1.0);
}

#[test]
fn the_control_plane_reports_its_state_in_metrics() {
    let lab = up(MESH_LAB);
    let value = |name: &str, labels: &str| control_plane_metric(&lab, name, labels);
    assert_eq!(value("kanava_control_plane_ztunnels_connected", ""), 2.0);
    assert_eq!(value("kanava_control_plane_source_synced", ""), 1.0);
    assert!(value("kanava_control_plane_configuration_version", "") >= 1.0);
    assert!(
        value(
            "kanava_control_plane_discovery_pushes_total",
            "kind=\"snapshot\""
        ) >= 2.0,
        "one snapshot per ztunnel at least"
    );
    assert!(
        value(
            "kanava_control_plane_discovery_pushes_total",
            "kind=\"update\""
        ) >= 1.0
    );
    assert!(
        value(
            "kanava_control_plane_discovery_push_delay_seconds_count",
            ""
        ) >= 1.0
    );
    assert_eq!(value("kanava_control_plane_discovery_nacks_total", ""), 0.0);
    // Every captured pod's identity was signed for its node.
    assert!(
        value(
            "kanava_control_plane_certificate_requests_total",
            "result=\"signed\""
        ) >= 5.0
    );
    let changed = value(
        "kanava_control_plane_source_last_change_timestamp_seconds",
        "",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - changed < 120.0,
        "the source changed {} s ago",
        now - changed
    );
    assert_eq!(value("kanava_control_plane_policies_rejected", ""), 0.0);
}

#[test]
fn the_control_plane_authenticates_before_it_reads_and_caps_requests() {
    let lab = up(MESH_LAB);
    let sink: Identity = "spiffe://cluster.local/ns/shop/sa/sink".parse().unwrap();
    runtime().block_on(async {
        let sign = |token: Option<String>, csr: Vec<u8>| {
            let lab = &lab;
            let identity = sink.to_string();
            async move {
                let channel = control_plane_channel(lab).await;
                let mut call = tonic::Request::new(pb::SignRequest {
                    csr,
                    identity,
                    ttl_seconds: 0,
                });
                if let Some(token) = token {
                    call.metadata_mut()
                        .insert("authorization", format!("Bearer {token}").parse().unwrap());
                }
                pb::certificates_client::CertificatesClient::new(channel)
                    .max_encoding_message_size(8 * 1024 * 1024)
                    .sign(call)
                    .await
            }
        };
        let huge = vec![0x30u8; 4 * 1024 * 1024];
        // Without a credential, refused as such whatever the body.
        let status = sign(None, huge.clone()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        // With one, a body far larger than any CSR is not decoded at all.
        let token = lab.node_token("node-2").unwrap();
        let status = sign(Some(token), huge).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    });
}
