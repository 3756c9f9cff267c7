//! HBONE's TLS, end to end in memory: a real rustls client and server
//! configured by this crate, with certificates signed by a test mesh root.
//! The client must refuse a server that proves the wrong identity, and the
//! server one whose certificate does not chain to the mesh root.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kanava_mesh::Identity;
use kanava_tls::rustls::{self, ClientConnection, ServerConnection};
use kanava_tls::{
    CertificateRequest, MeshRoots, SingleCert, TrustBundle, WorkloadCert, hbone_client_config,
    hbone_server_config, peer_certificate,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A mesh root that signs workload CSRs the way the control plane does.
struct TestRoot {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestRoot {
    fn new() -> TestRoot {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).expect("root");
        TestRoot {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn roots(&self) -> MeshRoots {
        MeshRoots::from_pem(self.pem.as_bytes()).expect("roots")
    }

    /// A key pair for `identity` and its certificate (PEM), signed.
    fn sign(&self, identity: &Identity) -> (CertificateRequest, String) {
        let request = CertificateRequest::generate(identity).expect("CSR");
        let csr = CertificateSigningRequestParams::from_der(&request.csr_der().to_vec().into())
            .expect("parse CSR");
        let mut params = csr.params;
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(3600)).into();
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .expect("sign");
        (request, leaf.pem())
    }

    fn issue(&self, identity: &Identity) -> WorkloadCert {
        let (request, pem) = self.sign(identity);
        request.into_cert(&[pem]).expect("certificate")
    }
}

fn identity(service_account: &str) -> Identity {
    Identity::new("cluster.local", "shop", service_account).expect("identity")
}

/// Runs the handshake to its end, or to the first error either side raises.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), rustls::Error> {
    let mut wire = Vec::new();
    for _ in 0..10 {
        wire.clear();
        client.write_tls(&mut wire).expect("write");
        server.read_tls(&mut wire.as_slice()).expect("read");
        server.process_new_packets()?;
        wire.clear();
        server.write_tls(&mut wire).expect("write");
        client.read_tls(&mut wire.as_slice()).expect("read");
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

fn connect(
    root: &TestRoot,
    client_cert: &WorkloadCert,
    server_cert: &WorkloadCert,
    expected: &Identity,
) -> (
    ClientConnection,
    ServerConnection,
    Result<(), rustls::Error>,
) {
    let roots = root.roots();
    let trust = TrustBundle::new(roots.clone()).expect("bundle");
    connect_with(&roots, &trust, client_cert, server_cert, expected)
}

/// A handshake whose client trusts `client_roots` and whose server trusts
/// the bundle `server_trust`.
fn connect_with(
    client_roots: &MeshRoots,
    server_trust: &TrustBundle,
    client_cert: &WorkloadCert,
    server_cert: &WorkloadCert,
    expected: &Identity,
) -> (
    ClientConnection,
    ServerConnection,
    Result<(), rustls::Error>,
) {
    let client_config = hbone_client_config(client_cert, client_roots, expected).expect("client");
    let server_config = hbone_server_config(
        Arc::new(SingleCert(server_cert.certified_key())),
        server_trust,
    )
    .expect("server");
    let name = rustls::pki_types::ServerName::IpAddress(
        "10.244.2.3".parse::<std::net::IpAddr>().expect("ip").into(),
    );
    let mut client = ClientConnection::new(client_config, name).expect("client connection");
    let mut server = ServerConnection::new(server_config).expect("server connection");
    let result = handshake(&mut client, &mut server);
    (client, server, result)
}

#[test]
fn both_sides_learn_the_identity_the_other_proved() {
    let root = TestRoot::new();
    let (client_cert, server_cert) = (
        root.issue(&identity("client")),
        root.issue(&identity("web")),
    );
    let (client, server, result) = connect(&root, &client_cert, &server_cert, &identity("web"));
    result.expect("handshake");
    assert_eq!(
        client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(client.alpn_protocol(), Some(kanava_tls::ALPN_H2));
    let seen_by_server = peer_certificate(&server).expect("client certificate");
    assert_eq!(seen_by_server.identity, identity("client"));
    assert_eq!(seen_by_server.not_after, client_cert.not_after());
    let seen_by_client = peer_certificate(&client).expect("server certificate");
    assert_eq!(seen_by_client.identity, identity("web"));
}

#[test]
fn a_client_refuses_a_server_proving_another_identity() {
    let root = TestRoot::new();
    let client_cert = root.issue(&identity("client"));
    // A valid mesh certificate, but for the wrong workload: what a
    // compromised or misrouted pod would present.
    let impostor = root.issue(&identity("attacker"));
    let (_, _, result) = connect(&root, &client_cert, &impostor, &identity("web"));
    let error = result.expect_err("the handshake must fail").to_string();
    assert!(error.contains("IdentityMismatch"), "{error}");
    assert!(
        error.contains("spiffe://cluster.local/ns/shop/sa/attacker"),
        "{error}"
    );
    assert!(
        error.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{error}"
    );
}

#[test]
fn a_server_refuses_a_client_from_another_root() {
    let (mesh, foreign) = (TestRoot::new(), TestRoot::new());
    let server_cert = mesh.issue(&identity("web"));
    let stranger = foreign.issue(&identity("client"));
    let (_, _, result) = connect(&mesh, &stranger, &server_cert, &identity("web"));
    assert!(
        result.is_err(),
        "a client outside the mesh root was admitted"
    );
}

#[test]
fn a_client_refuses_a_server_from_another_root_even_with_the_right_identity() {
    let (mesh, foreign) = (TestRoot::new(), TestRoot::new());
    let client_cert = mesh.issue(&identity("client"));
    let forged = foreign.issue(&identity("web"));
    let (_, _, result) = connect(&mesh, &client_cert, &forged, &identity("web"));
    assert!(
        result.is_err(),
        "a server outside the mesh root was trusted"
    );
}

#[test]
fn a_signed_certificate_for_another_identity_is_not_taken() {
    let root = TestRoot::new();
    let request = CertificateRequest::generate(&identity("web")).expect("CSR");
    // The signer swapped the identity: the key pair must not accept it.
    let (_, other_pem) = root.sign(&identity("attacker"));
    let error = request.into_cert(&[other_pem]).expect_err("wrong identity");
    assert!(
        error
            .to_string()
            .contains("requested spiffe://cluster.local/ns/shop/sa/web"),
        "{error}"
    );
}

/// A root rotation as a server sees it, with one configuration built
/// before it: the new root is trusted beside the old one, then alone.
#[test]
fn a_server_follows_its_trust_bundle_without_being_rebuilt() {
    let (old, new) = (TestRoot::new(), TestRoot::new());
    let both = MeshRoots::from_pem(format!("{}{}", old.pem, new.pem).as_bytes()).expect("both");
    let trust = TrustBundle::new(old.roots()).expect("bundle");
    let server_cert = old.issue(&identity("web"));
    let (under_old, under_new) = (
        old.issue(&identity("client")),
        new.issue(&identity("client")),
    );
    let attempt = |client_cert: &WorkloadCert| {
        connect_with(&both, &trust, client_cert, &server_cert, &identity("web")).2
    };
    attempt(&under_old).expect("old root trusted");
    assert!(attempt(&under_new).is_err(), "new root trusted too early");

    assert!(trust.replace(both.clone()).expect("replace"));
    assert!(!trust.replace(both.clone()).expect("replace"), "no change");
    assert_eq!(trust.roots().fingerprints(), both.fingerprints());
    assert_eq!(both.fingerprints().len(), 2);
    attempt(&under_old).expect("old root still trusted");
    attempt(&under_new).expect("new root trusted");

    trust.replace(new.roots()).expect("replace");
    attempt(&under_new).expect("new root trusted");
    assert!(
        attempt(&under_old).is_err(),
        "a certificate under the retired root was accepted"
    );
}
