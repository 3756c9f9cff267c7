//! The bodies of Kanava's fuzz targets: every parser that takes bytes from
//! outside the process, driven as far into the code as those bytes go.
//!
//! | target | input | goes through |
//! | --- | --- | --- |
//! | [`handoff`] | a handoff message | decoding, pod validation, identity |
//! | [`discovery`] | a discovery response | decoding, the ztunnel's workload store and trust bundle check, routing and policy on the result |
//! | [`identity`] | text, and DER | SPIFFE parsing, certificate SAN extraction, peer-certificate reading |
//! | [`csr`] | a CSR (DER or PEM) | the CA's checks and signing |
//! | [`policy_proto`] | a policy on the wire | validation, evaluation |
//! | [`manifests`] | Kubernetes YAML | parsing, translation (policies, pods, services), evaluation |
//! | [`lab_file`] | a lab file | parsing, planning |
//! | [`upgrade`] | an upgrade-socket message, and the hand-over headers and trailers of HBONE | JSON decoding, tokens, identities; `kanava-handover`, `kanava-resume`, `kanava-moving` |
//!
//! `fuzz/` (cargo-fuzz, nightly) runs them under libFuzzer; the tests in
//! `tests/` replay the committed corpus and a bounded stream of generated
//! inputs on every `cargo test`, so the targets cannot rot. None of them
//! may panic on any input.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kanava_mesh::policy::{Connection, Policy, PolicySet};
use kanava_mesh::{DEFAULT_TRUST_DOMAIN, Identity};
use kanava_proto::v1 as pb;
use prost::Message;

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// Every target, by name: what `fuzz/` and the replay tests share.
pub const TARGETS: &[(&str, Target)] = &[
    ("handoff", handoff),
    ("discovery", discovery),
    ("identity", identity),
    ("csr", csr),
    ("policy_proto", policy_proto),
    ("manifests", manifests),
    ("lab_file", lab_file),
    ("upgrade", upgrade),
];

/// What the hand-over extension parses: a message on the upgrade socket
/// (from a predecessor), and HBONE headers and trailers from a peer.
/// A message that decodes must encode back to one that decodes the same.
pub fn upgrade(data: &[u8]) {
    use kanava_ztunnel::proxy::hbone::resume;
    use kanava_ztunnel::upgrade::protocol::{self, Message as UpgradeMessage};
    if let Ok(message) = UpgradeMessage::decode(data) {
        assert_eq!(
            UpgradeMessage::decode(&message.encode()).ok().as_ref(),
            Some(&message),
            "an upgrade message reads back as itself"
        );
        match &message {
            UpgradeMessage::Client(moved) => {
                let _ = protocol::token(&moved.token);
                let _ = moved.destination_identity.parse::<Identity>();
            }
            UpgradeMessage::Server(moved) => {
                let _ = protocol::token(&moved.token);
                let _ = moved.client_identity.parse::<Identity>();
            }
            _ => {}
        }
    }
    // The same bytes as the value of each header the extension reads.
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    for name in [
        resume::HANDOVER_HEADER,
        resume::RESUME_HEADER,
        resume::MOVING_TRAILER,
    ] {
        let mut headers = http::HeaderMap::new();
        headers.insert(name, value.clone());
        let _ = resume::read_request(&headers);
        let _ = resume::read_grant(&headers);
        let _ = resume::read_moving(Some(&headers));
    }
    if let Some(token) = resume::Token::parse(data) {
        assert_eq!(
            resume::Token::parse(token.to_string().as_bytes()),
            Some(token)
        );
    }
}

/// A handoff message as the ztunnel's socket receives it.
pub fn handoff(data: &[u8]) {
    let _ = kanava_ztunnel::pods::handoff::parse(data, DEFAULT_TRUST_DOMAIN);
}

/// A discovery response applied to a workload store, twice (a snapshot,
/// then the same bytes as an update), and the state it leaves routed and
/// evaluated.
pub fn discovery(data: &[u8]) {
    let Ok(response) = pb::DiscoveryResponse::decode(data) else {
        return;
    };
    if let Some(bundle) = &response.trust_bundle {
        let _ = kanava_ztunnel::trust::Trust::check(bundle);
    }
    let store = kanava_ztunnel::workloads::WorkloadStore::new();
    let _ = store.apply(&response);
    let mut update = response;
    update.full_snapshot = false;
    let _ = store.apply(&update);
    for workload in store.workloads() {
        for ip in &workload.ips {
            let _ = store.find_by_ip(*ip);
            let _ = store.find_service(*ip);
        }
        let _ = store.policies().evaluate(
            &workload.namespace,
            &workload.labels,
            &Connection {
                identity: Some(&workload.identity),
                source_ip: IpAddr::from([10, 0, 0, 1]),
                destination_port: 80,
            },
        );
    }
}

/// Text as a SPIFFE identity, and bytes as a certificate whose identity and
/// validity are read.
pub fn identity(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(identity) = text.parse::<Identity>()
    {
        let _ = identity.principal();
        let again: Result<Identity, _> = identity.to_string().parse();
        assert_eq!(
            again.ok(),
            Some(identity),
            "an identity reads back as itself"
        );
    }
    let der = kanava_tls::pki_types::CertificateDer::from(data);
    let _ = kanava_tls::identity_of(&der);
    let _ = kanava_tls::not_after_of(&der);
    let _ = kanava_tls::parse_pem_certs(data);
}

fn ca() -> &'static kanava_control_plane::ca::CertificateAuthority {
    static CA: OnceLock<(
        tempfile::TempDir,
        kanava_control_plane::ca::CertificateAuthority,
    )> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = kanava_control_plane::ca::files::load_or_create(dir.path(), DEFAULT_TRUST_DOMAIN)
            .expect("a CA");
        (dir, ca)
    })
    .1
}

/// A CSR (DER or PEM) sent to the CA for an identity.
pub fn csr(data: &[u8]) {
    let identity = Identity::new(DEFAULT_TRUST_DOMAIN, "shop", "web").expect("identity");
    let _ = ca().sign_workload(data, &identity, Duration::from_secs(3600));
}

/// A policy as a ztunnel receives it, validated and evaluated.
pub fn policy_proto(data: &[u8]) {
    let Ok(wire) = pb::Policy::decode(data) else {
        return;
    };
    let Ok(policy) = Policy::from_proto(&wire) else {
        return;
    };
    let back = Policy::from_proto(&policy.to_proto());
    assert_eq!(
        back.as_ref().ok(),
        Some(&policy),
        "a valid policy survives the wire"
    );
    evaluate(&[Arc::new(policy)]);
}

/// Kubernetes manifests read and translated into the mesh, and the
/// resulting policies evaluated.
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((objects, _)) = kanava_cluster::parse_manifests(text) else {
        return;
    };
    // As the control plane holds them.
    let mut cluster = kanava_cluster::SlimObjects::default();
    for object in objects {
        cluster.insert(object.slimmed());
    }
    let mut translator = kanava_cluster::Translator::new(kanava_cluster::TranslateConfig {
        trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        root_namespace: kanava_mesh::names::ROOT_NAMESPACE.into(),
    });
    let state = translator.translate(&cluster);
    let _ = translator.new_problems(&state);
    for workload in &state.workloads {
        let _ = workload.to_proto();
    }
    for service in &state.services {
        let _ = kanava_mesh::Service::from_proto(&service.to_proto());
    }
    let policies: Vec<Arc<Policy>> = state.policies;
    evaluate(&policies);
}

/// A lab file parsed and planned into an empty lab.
pub fn lab_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = kanava_lab::LabSpec::parse(text, 2) {
        let _ = spec.plan();
    }
}

/// Evaluates `policies` for a handful of peers, the plaintext one among them.
fn evaluate(policies: &[Arc<Policy>]) {
    let set = PolicySet::new(policies.iter().cloned());
    let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
    let peer = Identity::new(DEFAULT_TRUST_DOMAIN, "shop", "client").expect("identity");
    for identity in [Some(&peer), None] {
        for namespace in ["shop", "default", kanava_mesh::names::ROOT_NAMESPACE] {
            let _ = set.evaluate(
                namespace,
                &labels,
                &Connection {
                    identity,
                    source_ip: IpAddr::from([10, 244, 1, 2]),
                    destination_port: 8080,
                },
            );
        }
    }
}
