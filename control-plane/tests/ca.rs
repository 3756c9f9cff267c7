//! The CA in the cluster (Secrets and a ConfigMap through an in-test API
//! server), the plug-in CA, and the trust that lets a root rotate without a
//! failed connection, checked with real TLS handshakes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use kanava_control_plane::ca::{self, CertificateAuthority, SigningMaterial};
use kanava_mesh::Identity;
use kanava_tls::{CertificateRequest, MeshRoots, WorkloadCert};
use prost::Message as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;
use support::api_server::ApiServer;

const NS: &str = "kanava-system";

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn secret_of(name: &str, material: &SigningMaterial) -> serde_json::Value {
    let mut data = json!({
        "ca-cert.pem": b64(&material.ca_cert_pem),
        "ca-key.pem": b64(&material.ca_key_pem),
        "root-cert.pem": b64(&material.roots_pem),
    });
    if let Some(chain) = &material.chain_pem {
        data["cert-chain.pem"] = json!(b64(chain));
    }
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": name, "namespace": NS}, "data": data})
}

fn roots_in_configmap(server: &ApiServer) -> String {
    let configmap = server
        .configmap(NS, "kanava-root-cert")
        .expect("roots published");
    configmap["data"]["root-cert.pem"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_root_is_created_once_in_its_secret_and_published() {
    let server = ApiServer::start().await;
    let client = server.client();
    let first = ca::secret::load_or_create(&client, NS, "cacerts", "cluster.local")
        .await
        .unwrap();
    let secret = server.secret(NS, "kanava-ca").expect("root Secret created");
    for key in ["ca-cert.pem", "ca-key.pem", "root-cert.pem"] {
        assert!(secret["data"][key].is_string(), "{key} in {secret}");
    }
    assert_eq!(roots_in_configmap(&server), first.root_pem());

    // Run outside the chart (no Service of its own): owned by nothing.
    assert!(secret["metadata"]["ownerReferences"].is_null(), "{secret}");

    // A restart (or a second replica) uses the same root.
    let again = ca::secret::load_or_create(&client, NS, "cacerts", "cluster.local")
        .await
        .unwrap();
    assert_eq!(first.root_pem(), again.root_pem());
}

/// Installed by the chart, what the control plane creates belongs to its
/// Service, so `helm uninstall` leaves no Secret behind.
#[tokio::test]
async fn the_root_belongs_to_the_control_planes_service() {
    let server = ApiServer::start().await;
    server.apply(
        support::api_server::SERVICES,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kanava-control-plane", "namespace": NS, "uid": "svc-uid-1"},
            "spec": {"ports": [{"port": 15012}]},
        }),
    );
    ca::secret::load_or_create(&server.client(), NS, "cacerts", "cluster.local")
        .await
        .unwrap();
    let secret = server.secret(NS, "kanava-ca").unwrap();
    let owners = &secret["metadata"]["ownerReferences"];
    assert_eq!(owners[0]["kind"], "Service", "{secret}");
    assert_eq!(owners[0]["uid"], "svc-uid-1");
    let configmap = server.configmap(NS, "kanava-root-cert").unwrap();
    assert_eq!(
        configmap["metadata"]["ownerReferences"][0]["uid"],
        "svc-uid-1"
    );
}

#[tokio::test]
async fn two_replicas_starting_at_once_share_one_root() {
    let server = ApiServer::start().await;
    let winner = ca::generate_root("cluster.local").unwrap();
    // The other replica's creation lands between our read and our create.
    server.lose_secret_race(secret_of("kanava-ca", &winner));
    let ca = ca::secret::load_or_create(&server.client(), NS, "cacerts", "cluster.local")
        .await
        .unwrap();
    assert_eq!(
        ca.root_pem(),
        winner.roots_pem,
        "the winner's root, no second root"
    );
    assert_eq!(roots_in_configmap(&server), winner.roots_pem);
}

/// An intermediate CA signed by `root`, as an operator's PKI would hand out.
fn intermediate_of(root: &SigningMaterial) -> SigningMaterial {
    let root_key = KeyPair::from_pem(&root.ca_key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&root.ca_cert_pem, root_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.signed_by(&key, &issuer).unwrap();
    SigningMaterial {
        ca_cert_pem: cert.pem(),
        ca_key_pem: key.serialize_pem(),
        roots_pem: root.roots_pem.clone(),
        chain_pem: Some(format!("{}{}", cert.pem(), root.roots_pem)),
    }
}

fn workload_cert(ca: &CertificateAuthority, identity: &Identity) -> WorkloadCert {
    let request = CertificateRequest::generate(identity).unwrap();
    let issued = ca
        .sign_workload(request.csr_der(), identity, Duration::from_secs(3600))
        .unwrap();
    request.into_cert(&issued.chain_pem).unwrap()
}

/// A real mutual-TLS handshake over loopback, as between two ztunnels:
/// whether `client` and `server`, each trusting its roots, accept each other.
async fn handshake(
    client: &WorkloadCert,
    client_roots: &MeshRoots,
    server: &WorkloadCert,
    server_roots: &MeshRoots,
) -> bool {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server_config = kanava_tls::hbone_server_config(
        Arc::new(kanava_tls::SingleCert(server.certified_key())),
        &kanava_tls::TrustBundle::new(server_roots.clone()).unwrap(),
    )
    .unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match tokio_rustls::TlsAcceptor::from(server_config)
            .accept(tcp)
            .await
        {
            Ok(mut tls) => {
                // Echo one byte, so the client knows it was accepted.
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.is_ok() && tls.write_all(&byte).await.is_ok()
            }
            Err(_) => false,
        }
    });
    let client_config =
        kanava_tls::hbone_client_config(client, client_roots, server.identity()).unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = kanava_tls::pki_types::ServerName::try_from("mesh").unwrap();
    let connected = match tokio_rustls::TlsConnector::from(client_config)
        .connect(name, tcp)
        .await
    {
        Ok(mut tls) => {
            // TLS 1.3: the server judges the client's certificate after the
            // client finished; a refusal arrives as an alert on first read.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut byte = [0u8; 1];
            tls.write_all(b"x").await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut byte)).await,
                    Ok(Ok(_))
                )
        }
        Err(_) => false,
    };
    let accepted = accept.await.unwrap();
    connected && accepted
}

#[tokio::test]
async fn a_plug_in_ca_signs_with_the_operators_intermediate_and_serves_its_chain() {
    let server = ApiServer::start().await;
    let operators_root = ca::generate_root("cluster.local").unwrap();
    let intermediate = intermediate_of(&operators_root);
    server.put_secret(NS, secret_of("cacerts", &intermediate));
    let ca = ca::secret::load_or_create(&server.client(), NS, "cacerts", "cluster.local")
        .await
        .unwrap();
    assert!(
        server.secret(NS, "kanava-ca").is_none(),
        "no root of our own"
    );
    assert_eq!(ca.root_pem(), operators_root.roots_pem);

    let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let request = CertificateRequest::generate(&web).unwrap();
    let issued = ca
        .sign_workload(request.csr_der(), &web, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(
        issued.chain_pem.len(),
        2,
        "leaf and intermediate (the root is trusted)"
    );
    assert_eq!(issued.chain_pem[1], intermediate.ca_cert_pem);

    // Peers trusting only the operator's root accept it.
    let roots = MeshRoots::from_pem(operators_root.roots_pem.as_bytes()).unwrap();
    let client: Identity = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    assert!(
        handshake(
            &workload_cert(&ca, &client),
            &roots,
            &workload_cert(&ca, &web),
            &roots
        )
        .await
    );
}

#[tokio::test]
async fn a_broken_ca_secret_is_refused_by_name() {
    let server = ApiServer::start().await;
    let root = ca::generate_root("cluster.local").unwrap();
    let other = ca::generate_root("cluster.local").unwrap();
    let mut mismatched = root.clone();
    mismatched.ca_key_pem = other.ca_key_pem;
    server.put_secret(NS, secret_of("cacerts", &mismatched));
    let error = ca::secret::load_or_create(&server.client(), NS, "cacerts", "cluster.local")
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("does not belong"), "{error}");

    let mut incomplete = secret_of("cacerts", &root);
    incomplete["data"]
        .as_object_mut()
        .unwrap()
        .remove("ca-key.pem");
    server.put_secret(NS, incomplete);
    let error = ca::secret::load_or_create(&server.client(), NS, "cacerts", "cluster.local")
        .await
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("ca-key.pem is missing"),
        "{error}"
    );
}

/// The trust half of a root rotation: once both roots are trusted,
/// workloads with certificates from the old root and from the new one
/// accept each other in both directions; a side that trusts only the old
/// root would refuse the new certificates, which is why the roots are
/// widened first.
#[tokio::test]
async fn while_both_roots_are_trusted_old_and_new_certificates_connect() {
    let old = ca::generate_root("cluster.local").unwrap();
    let new = ca::generate_root("cluster.local").unwrap();
    let both = format!("{}{}", old.roots_pem, new.roots_pem);
    let signing_with = |material: &SigningMaterial| {
        let mut material = material.clone();
        material.roots_pem = both.clone();
        CertificateAuthority::from_material(&material, "cluster.local", "test").unwrap()
    };
    let (old_ca, new_ca) = (signing_with(&old), signing_with(&new));
    let a: Identity = "spiffe://cluster.local/ns/shop/sa/a".parse().unwrap();
    let b: Identity = "spiffe://cluster.local/ns/shop/sa/b".parse().unwrap();
    let (a_old, b_new) = (workload_cert(&old_ca, &a), workload_cert(&new_ca, &b));
    let trust_both = MeshRoots::from_pem(both.as_bytes()).unwrap();
    let trust_old = MeshRoots::from_pem(old.roots_pem.as_bytes()).unwrap();

    assert!(
        handshake(&a_old, &trust_both, &b_new, &trust_both).await,
        "old → new"
    );
    assert!(
        handshake(&b_new, &trust_both, &a_old, &trust_both).await,
        "new → old"
    );
    assert!(
        !handshake(&b_new, &trust_both, &a_old, &trust_old).await,
        "a side trusting only the old root refuses the new certificate"
    );
}

/// Waits up to 10 s for `done`.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 10 s");
}

fn signer_of(material: &SigningMaterial) -> String {
    let der = kanava_tls::parse_pem_certs(material.ca_cert_pem.as_bytes()).unwrap();
    kanava_tls::fingerprint(der[0].as_ref())
}

/// A rotation in a CA directory, as `kanava ca rotate` does it, followed
/// by a running CA: each step becomes the CA in force and a trust bundle in
/// the store (a change every discovery stream sends on); a half-written
/// step is refused and the CA in force stays.
#[tokio::test]
async fn a_ca_directory_is_followed_through_a_rotation() {
    use kanava_control_plane::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let first = ca::files::load_or_create(dir.path(), "cluster.local").unwrap();
    let old_signer = first.signer().to_string();
    let store = Arc::new(Store::new());
    store.set_trust_bundle(first.trust_bundle());
    store.replace(&kanava_cluster::MeshState::default());
    let (_, mut changes) = store.subscribe().await;
    let authority = Arc::new(ca::Authority::new(first));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ca::follow(
        ca::MaterialSource::Files(dir.path().to_path_buf()),
        authority.clone(),
        store.clone(),
        "cluster.local".into(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let old_root = std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap();
    let old_key = std::fs::read_to_string(dir.path().join("root-key.pem")).unwrap();
    let new = ca::generate_root("cluster.local").unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();

    // 1. Trust the new root beside the old one; still sign with the old.
    write("ca-key.pem", &old_key);
    write("ca-cert.pem", &old_root);
    write("root-cert.pem", &format!("{old_root}{}", new.roots_pem));
    eventually("both roots trusted", || {
        authority.current().roots_pem().len() == 2
    })
    .await;
    assert_eq!(authority.current().signer(), old_signer);
    let delta = changes.recv().await.unwrap();
    let sent = kanava_proto::v1::DiscoveryResponse::decode(delta.encoded()).unwrap();
    let bundle = sent.trust_bundle.expect("the change carries the bundle");
    assert_eq!((bundle.roots.len(), bundle.signer), (2, old_signer.clone()));
    assert!(sent.resources.is_empty() && sent.removed.is_empty());
    let snapshot = store.snapshot();
    let full =
        kanava_proto::v1::DiscoveryResponse::decode(snapshot.encoded(false)[0].bytes.clone())
            .unwrap();
    assert_eq!(full.trust_bundle.unwrap().roots.len(), 2);

    // Half of step 2 (a new key under the old certificate): refused.
    write("ca-key.pem", &new.ca_key_pem);
    eventually("the half-written step refused", || {
        store
            .metrics()
            .encode()
            .contains("kanava_control_plane_ca_reloads_total{result=\"refused\"}")
    })
    .await;
    assert_eq!(authority.current().signer(), old_signer);

    // 2. Sign with the new root.
    write("ca-cert.pem", &new.ca_cert_pem);
    eventually("signing with the new root", || {
        authority.current().signer() == signer_of(&new)
    })
    .await;
    // 3. Drop the old root.
    write("root-cert.pem", &new.roots_pem);
    eventually("only the new root trusted", || {
        authority.current().roots_pem() == [new.roots_pem.clone()]
    })
    .await;
    let text = store.metrics().encode();
    assert!(
        text.contains("kanava_control_plane_trust_roots 1"),
        "{text}"
    );
    assert!(
        text.contains("kanava_control_plane_ca_reloads_total{result=\"changed\"} 3"),
        "{text}"
    );
    stop.cancel();
}

/// The same in the cluster: a change of the CA's Secret is followed, and
/// the roots ConfigMap follows it.
#[tokio::test]
async fn a_ca_secret_is_followed_and_its_roots_published() {
    use kanava_control_plane::store::Store;
    let server = ApiServer::start().await;
    let client = server.client();
    let first = ca::secret::load_or_create(&client, NS, "cacerts", "cluster.local")
        .await
        .unwrap();
    let store = Arc::new(Store::new());
    let authority = Arc::new(ca::Authority::new(first));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ca::follow(
        ca::MaterialSource::Secrets {
            client,
            namespace: NS.into(),
            plugin_ca_secret: "cacerts".into(),
        },
        authority.clone(),
        store.clone(),
        "cluster.local".into(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let old_root = roots_in_configmap(&server);
    let new = ca::generate_root("cluster.local").unwrap();
    // The operator plugs in a CA that signs under the new root and trusts
    // both: it wins over kanava-ca.
    let mut plugged = new.clone();
    plugged.roots_pem = format!("{old_root}{}", new.roots_pem);
    server.put_secret(NS, secret_of("cacerts", &plugged));
    eventually("the plug-in CA followed", || {
        authority.current().signer() == signer_of(&new)
    })
    .await;
    assert_eq!(authority.current().roots_pem().len(), 2);
    eventually("the roots ConfigMap follows", || {
        roots_in_configmap(&server) == plugged.roots_pem
    })
    .await;
    assert_eq!(
        store.snapshot().trust_bundle.as_ref().unwrap().roots.len(),
        2
    );
    stop.cancel();
}
