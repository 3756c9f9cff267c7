//! Writes the seed corpus of every fuzz target (`fuzz/corpus/<target>/`):
//! valid inputs of each kind, from which libFuzzer and the replay test
//! mutate. Run again only to reset the seeds:
//! `cargo test -p kanava-fuzzing --test seeds -- --ignored`.

use std::path::Path;

use kanava_mesh::policy::{Action, Policy, Rule, SourceBuilder};
use kanava_mesh::{Identity, MtlsMode, Service, ServicePort, TunnelProtocol, Workload};
use kanava_proto::v1 as pb;
use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn identity(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa).expect("identity")
}

fn workload() -> Workload {
    Workload {
        uid: "3f1c".into(),
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        node: "node-2".into(),
        ips: vec!["10.244.2.3".parse().expect("IP")],
        identity: identity("web"),
        protocol: TunnelProtocol::Hbone,
        labels: std::sync::Arc::new([("app".to_string(), "web".to_string())].into()),
        mtls_mode: MtlsMode::Strict,
        resource_version: "7".into(),
        plaintext_inbound_ports: Vec::new(),
    }
}

fn policy() -> Policy {
    Policy {
        namespace: "shop".into(),
        name: "web-from-frontend".into(),
        selector: Some([("app".to_string(), "web".to_string())].into()),
        mesh_wide: false,
        action: Action::Allow,
        rules: vec![Rule {
            from: vec![
                SourceBuilder {
                    principals: &["cluster.local/ns/shop/sa/frontend"],
                    not_principals: &[],
                    namespaces: &[],
                    not_namespaces: &["ops"],
                    ip_blocks: &["10.244.1.0/24"],
                    not_ip_blocks: &[],
                }
                .build()
                .expect("source"),
            ],
            to: vec![kanava_mesh::policy::destination(&[8080], &[]).expect("to")],
        }],
        resource_version: "3".into(),
    }
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seed_corpus() {
    let add = pb::HandoffRequest {
        request: Some(pb::handoff_request::Request::Add(pb::AddPod {
            pod: Some(pb::PodInfo {
                uid: "3f1c".into(),
                name: "web".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
                ips: vec!["10.244.2.3".into(), "fd00::3".into()],
                container_id: "sandbox-3f1c".into(),
            }),
        })),
    };
    write("handoff", "add", &add.encode_to_vec());
    let delete = pb::HandoffRequest {
        request: Some(pb::handoff_request::Request::Delete(pb::DeletePod {
            uid: "3f1c".into(),
            container_id: "sandbox-3f1c".into(),
        })),
    };
    write("handoff", "delete", &delete.encode_to_vec());

    let service = Service {
        namespace: "shop".into(),
        name: "web".into(),
        addresses: vec!["10.96.0.10".parse().expect("IP")],
        ports: vec![ServicePort {
            port: 80,
            target_port: 0,
            target_port_name: "http".into(),
        }],
        endpoints: vec![kanava_mesh::Endpoint {
            workload_uid: "3f1c".into(),
            ports: [(80, 8080)].into(),
        }],
        resource_version: "5".into(),
    };
    let snapshot = pb::DiscoveryResponse {
        version_info: "12".into(),
        nonce: "12-full-0".into(),
        full_snapshot: true,
        resources: vec![
            pb::Resource {
                name: workload().resource_name(),
                kind: Some(pb::resource::Kind::Workload(workload().to_proto())),
            },
            pb::Resource {
                name: service.resource_name(),
                kind: Some(pb::resource::Kind::Service(service.to_proto())),
            },
            pb::Resource {
                name: policy().resource_name(),
                kind: Some(pb::resource::Kind::Policy(policy().to_proto())),
            },
        ],
        removed: vec![],
        more: false,
        trust_bundle: None,
        ..Default::default()
    };
    write("discovery", "snapshot", &snapshot.encode_to_vec());
    let delta = pb::DiscoveryResponse {
        version_info: "13".into(),
        nonce: "13-delta".into(),
        full_snapshot: false,
        resources: vec![],
        removed: vec![service.resource_name()],
        more: false,
        trust_bundle: None,
        ..Default::default()
    };
    write("discovery", "delta", &delta.encode_to_vec());

    write(
        "policy_proto",
        "allow",
        &policy().to_proto().encode_to_vec(),
    );
    let mut deny = policy();
    deny.action = Action::Deny;
    deny.selector = None;
    write("policy_proto", "deny", &deny.to_proto().encode_to_vec());

    write("identity", "text", b"spiffe://cluster.local/ns/shop/sa/web");
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca =
        kanava_control_plane::ca::files::load_or_create(dir.path(), "cluster.local").expect("CA");
    let request = kanava_tls::CertificateRequest::generate(&identity("web")).expect("CSR");
    write("csr", "der", request.csr_der());
    let issued = ca
        .sign_workload(
            request.csr_der(),
            &identity("web"),
            std::time::Duration::from_secs(3600),
        )
        .expect("signed");
    let leaf = kanava_tls::parse_pem_certs(issued.chain_pem[0].as_bytes()).expect("PEM");
    write("identity", "certificate", leaf[0].as_ref());
    write("identity", "pem", issued.chain_pem[0].as_bytes());

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for entry in std::fs::read_dir(examples).expect("examples").flatten() {
        let text = std::fs::read(entry.path()).expect("example");
        let name = entry.file_name().to_string_lossy().into_owned();
        write("lab_file", &name, &text);
        write("manifests", &name, &text);
    }
    write(
        "manifests",
        "policies.yaml",
        b"apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from: [{notNamespaces: [shop], ipBlocks: [10.0.0.0/8]}]\n    to: [{ports: [8080, \"443\"]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n",
    );
}
