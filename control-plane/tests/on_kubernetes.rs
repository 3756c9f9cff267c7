//! The `kanava-control-plane` binary with `--source kubernetes --kubeconfig`
//! pointed at an in-test API server, and a ztunnel-like client over gRPC
//! and TLS: nothing before the initial lists, then the right snapshot, then
//! updates; TokenReview-bound node identity; the CA's Secret and ConfigMap;
//! policy status and Events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use kanava_proto::v1 as pb;
use kanava_tls::pki_types::ServerName;
use serde_json::{Value, json};
use support::api_server::{self, ApiServer, PODS, POLICIES};
use tokio_stream::StreamExt;

/// Kills the control plane when the test ends, also on panic.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts the control plane against `server`, with `extra` arguments: it,
/// and its gRPC and readiness addresses.
fn start_control_plane(
    server: &ApiServer,
    dir: &std::path::Path,
    extra: &[&str],
) -> (Running, SocketAddr, SocketAddr) {
    let kubeconfig = server.kubeconfig(dir);
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let readiness = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join("control-plane.log");
    let running = Running {
        child: Command::new(env!("CARGO_BIN_EXE_kanava-control-plane"))
            .args(["--source", "kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--listen", &grpc.to_string()])
            .args(["--readiness-listen", &readiness.to_string()])
            .args(extra)
            .env("POD_NAME", "kanava-control-plane-7f9c-abcde")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    (running, grpc, readiness)
}

/// A port free now, below the kernel's ephemeral range (32768 and up by
/// default): a port the kernel handed out could be taken again by any
/// loopback connection of the tests running beside this one before the
/// control plane binds it (seen once as a control plane that never
/// answered).
fn free_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn jwt(subject: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256"}"#),
        b64(&json!({"sub": subject, "exp": exp}).to_string()),
        b64("sig")
    )
}

fn ztunnel_review() -> Value {
    json!({"authenticated": true, "audiences": ["kanava"],
           "user": {"username": "system:serviceaccount:kanava-system:ztunnel",
                    "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-8kq2w"],
                              "authentication.kubernetes.io/pod-uid": ["44444444-5555-4666-8777-888888888888"]}}})
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready(address: SocketAddr) -> Option<u16> {
    get_status(address, "/ready").await
}

/// The status code of `GET path` on the monitoring port.
async fn get_status(address: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(address).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// A channel to the control plane's gRPC listener; `None` while nothing
/// listens there yet.
async fn channel(address: SocketAddr, roots_pem: &str) -> Option<tonic::transport::Channel> {
    let roots = kanava_tls::MeshRoots::from_pem(roots_pem.as_bytes()).unwrap();
    let tls =
        kanava_tls::control_plane_client_config(&kanava_tls::TrustBundle::new(roots).unwrap())
            .unwrap();
    tonic::transport::Endpoint::from_static("http://control-plane")
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(address).await?;
                let name = ServerName::try_from(kanava_mesh::names::CONTROL_PLANE_SERVER_NAME)
                    .map_err(std::io::Error::other)?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .ok()
}

/// Opens a discovery stream as `node`: where to send ACKs, and the
/// responses.
async fn subscribe(
    discovery: &mut pb::discovery_client::DiscoveryClient<tonic::transport::Channel>,
    node: &str,
    token: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<pb::DiscoveryRequest>,
        tonic::Streaming<pb::DiscoveryResponse>,
    ),
    tonic::Status,
> {
    let (requests, requests_rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(pb::DiscoveryRequest {
            node_name: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let responses = discovery
        .stream(with_token(
            tokio_stream::wrappers::ReceiverStream::new(requests_rx),
            token,
        ))
        .await?
        .into_inner();
    Ok((requests, responses))
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_a_cluster_it_watches_through_the_api() {
    let server = ApiServer::start().await;
    api_server::serve_golden(&server);
    // Policies cannot be listed yet: the control plane must serve nothing.
    server.set_unavailable(POLICIES, true);
    let token = jwt("ztunnel");
    server.review(&token, ztunnel_review());

    let dir = tempfile::tempdir().unwrap();
    let (running, grpc, readiness) = start_control_plane(&server, dir.path(), &[]);

    // The CA: a root created in its Secret, published in the ConfigMap.
    let roots = eventually("the roots ConfigMap", async || {
        let configmap = server.configmap("kanava-system", "kanava-root-cert")?;
        Some(configmap["data"]["root-cert.pem"].as_str()?.to_string())
    })
    .await;
    assert!(server.secret("kanava-system", "kanava-ca").is_some());
    assert_eq!(
        eventually("readiness answers", async || ready(readiness).await).await,
        503,
        "not ready before the initial lists"
    );
    assert_eq!(
        get_status(readiness, "/healthz").await,
        Some(200),
        "alive (the liveness probe) while not ready: an API server away never restarts it"
    );

    let channel = eventually("the gRPC listener", async || {
        tokio::time::timeout(Duration::from_secs(2), async {
            channel(grpc, &roots).await
        })
        .await
        .ok()
        .flatten()
    })
    .await;
    let mut discovery = pb::discovery_client::DiscoveryClient::new(channel.clone());
    let (requests, mut responses) = subscribe(&mut discovery, "node-1", &token).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), responses.next())
            .await
            .is_err(),
        "a snapshot before every initial list"
    );

    // The policies can be listed: the first snapshot is complete.
    server.set_unavailable(POLICIES, false);
    let first = tokio::time::timeout(Duration::from_secs(20), responses.next())
        .await
        .expect("a snapshot once listed")
        .unwrap()
        .unwrap();
    assert!(first.full_snapshot);
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert!(
        names.contains(&"workload/9d8e7f6a-5b4c-4d3e-8f2a-1b0c9d8e7f6a"),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("policy/")).count(),
        2,
        "{names:?}"
    );
    assert_eq!(ready(readiness).await, Some(200));
    requests
        .send(pb::DiscoveryRequest {
            response_nonce: first.nonce.clone(),
            version_info: first.version_info.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A change in the cluster arrives as an update.
    server.delete(PODS, "shop", "client");
    let update = tokio::time::timeout(Duration::from_secs(20), responses.next())
        .await
        .expect("an update")
        .unwrap()
        .unwrap();
    assert!(!update.full_snapshot);
    assert_eq!(
        update.removed,
        ["workload/9d8e7f6a-5b4c-4d3e-8f2a-1b0c9d8e7f6a"]
    );

    // node-1's ztunnel cannot subscribe as node-2.
    let (other, other_rx) = tokio::sync::mpsc::channel(1);
    other
        .send(pb::DiscoveryRequest {
            node_name: "node-2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = discovery
        .stream(with_token(
            tokio_stream::wrappers::ReceiverStream::new(other_rx),
            &token,
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Certificates: only for an enrolled pod on the token's node.
    let mut certificates = pb::certificates_client::CertificatesClient::new(channel);
    let sign = |identity: &str| {
        let id: kanava_mesh::Identity = identity.parse().unwrap();
        let csr = kanava_tls::CertificateRequest::generate(&id).unwrap();
        with_token(
            pb::SignRequest {
                csr: csr.csr_der().to_vec(),
                identity: identity.into(),
                ttl_seconds: 0,
            },
            &token,
        )
    };
    server.apply(PODS, api_server::golden("pods.json").remove(1)); // client is back
    let client = "spiffe://cluster.local/ns/shop/sa/client";
    let signed = eventually("the client pod back, and its certificate", async || {
        certificates.sign(sign(client)).await.ok()
    })
    .await;
    assert!(!signed.get_ref().cert_chain.is_empty());
    for (identity, why) in [
        (
            "spiffe://cluster.local/ns/shop/sa/web",
            "web runs on node-2",
        ),
        (
            "spiffe://cluster.local/ns/legacy/sa/default",
            "reports is not enrolled",
        ),
    ] {
        let status = certificates.sign(sign(identity)).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{why}: {status:?}"
        );
    }
    // A token the API server does not vouch for: refused, reason logged only.
    let status = certificates
        .sign(with_token(
            pb::SignRequest {
                csr: vec![],
                identity: client.into(),
                ttl_seconds: 0,
            },
            &jwt("stranger"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(!status.message().contains("TokenReview"), "{status:?}");

    // Policy status: the valid policy Accepted at its generation, the broken
    // one not, with an Event.
    let patches = eventually("both policies' statuses", async || {
        let patches = server.status_patches();
        (patches.len() >= 2).then_some(patches)
    })
    .await;
    let condition = |key: &str| {
        patches
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, patch)| patch["status"]["conditions"][0].clone())
            .unwrap()
    };
    let accepted = condition("shop/web-from-client");
    assert_eq!(accepted["type"], "Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["observedGeneration"], 3);
    let rejected = condition("shop/typo");
    assert_eq!(rejected["status"], "False");
    assert_eq!(rejected["reason"], "Invalid");
    assert!(
        rejected["message"]
            .as_str()
            .unwrap()
            .contains("refuses every connection"),
        "{rejected}"
    );
    let events = eventually("an Event for the rejected policy", async || {
        let events = server.events();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events[0]["regarding"]["name"], "typo", "{events:?}");
    assert_eq!(events[0]["type"], "Warning");

    let log = running.log();
    assert!(
        log.contains("caller refused") && log.contains("not authenticated"),
        "{log}"
    );
    assert!(log.contains("initial lists complete"), "{log}");

    // Every call it made is one its RBAC allows.
    let rbac = support::rbac::load(&rbac_file());
    for request in server.requests() {
        let attributes = support::rbac::attributes_of(&request);
        assert!(
            support::rbac::allows(&rbac, &attributes),
            "{request} ({attributes:?}) is not allowed by {}",
            rbac_file().display()
        );
    }
}

/// An in-test service-account signing key, published as the API server
/// publishes its own (`/openid/v1/jwks`, with the issuer in
/// `/.well-known/openid-configuration`).
struct IssuerKey {
    kid: String,
    key: jsonwebtoken::EncodingKey,
}

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl IssuerKey {
    fn publish(server: &ApiServer, kid: &str) -> IssuerKey {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public = key.public_key_raw();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        server.document(
            "/.well-known/openid-configuration",
            json!({"issuer": ISSUER, "jwks_uri": format!("{ISSUER}/openid/v1/jwks")}),
        );
        server.document(
            "/openid/v1/jwks",
            json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                             "kid": kid, "x": b64(&public[1..33]), "y": b64(&public[33..65])}]}),
        );
        IssuerKey {
            kid: kid.into(),
            key: jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
        }
    }

    /// A projected token of the ztunnel pod ztunnel-8kq2w on node-1, as the
    /// kubelet would mount after a restart.
    fn ztunnel_token(&self) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": ISSUER, "aud": ["kanava"], "exp": now + 3600, "iat": now, "nbf": now,
            "sub": "system:serviceaccount:kanava-system:ztunnel",
            "jti": format!("{now}-{}", rand::random::<u32>()),
            "kubernetes.io": {
                "namespace": "kanava-system",
                "node": {"name": "node-1", "uid": "node-1-uid"},
                "pod": {"name": "ztunnel-8kq2w", "uid": "44444444-5555-4666-8777-888888888888"},
                "serviceaccount": {"name": "ztunnel", "uid": "sa-uid"}
            }
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

/// The API server goes away. A ztunnel that restarts meanwhile presents a
/// token nobody has seen (no cached answer can help) and still gets its
/// snapshot and its certificates: the token is verified with the keys the
/// control plane fetched before the outage and kept through every failed
/// refresh since, and its pod checked against the control plane's own watch
/// cache. A token whose key is not known still needs TokenReview, and is
/// answered UNAVAILABLE until the API server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_restarted_while_the_api_server_is_away_gets_its_snapshot_and_certificates() {
    let server = ApiServer::start().await;
    api_server::serve_golden(&server);
    let issuer = IssuerKey::publish(&server, "key-1");
    let dir = tempfile::tempdir().unwrap();
    // Keys refreshed every second: the outage below spans several
    // refreshes, as a long one spans many at the default 5 minutes.
    let (running, grpc, readiness) =
        start_control_plane(&server, dir.path(), &["--jwks-refresh-interval", "1s"]);
    let roots = eventually("the roots ConfigMap", async || {
        let configmap = server.configmap("kanava-system", "kanava-root-cert")?;
        Some(configmap["data"]["root-cert.pem"].as_str()?.to_string())
    })
    .await;
    eventually("ready", async || {
        (ready(readiness).await == Some(200)).then_some(())
    })
    .await;
    eventually("the keys fetched", async || {
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /openid/v1/jwks"))
            .then_some(())
    })
    .await;

    // The API server goes away; refreshes fail meanwhile.
    server.set_away(true);
    let requests_before = server.requests().len();
    eventually("three failed refreshes", async || {
        let failed = running
            .log()
            .matches("cannot fetch the service-account keys; keeping the keys fetched before")
            .count();
        (failed >= 3).then_some(())
    })
    .await;

    // The restarted ztunnel: a new connection, a new token.
    let token = issuer.ztunnel_token();
    let channel = channel(grpc, &roots)
        .await
        .expect("the control plane still listens");
    let mut discovery = pb::discovery_client::DiscoveryClient::new(channel.clone());
    let (_requests, mut responses) = subscribe(&mut discovery, "node-1", &token)
        .await
        .expect("subscribed while the API server is away");
    let snapshot = tokio::time::timeout(Duration::from_secs(20), responses.next())
        .await
        .expect("a snapshot")
        .unwrap()
        .unwrap();
    assert!(snapshot.full_snapshot && !snapshot.resources.is_empty());
    assert_eq!(
        snapshot.trust_bundle.expect("the trust bundle").roots.len(),
        1
    );

    let mut certificates = pb::certificates_client::CertificatesClient::new(channel);
    let identity = "spiffe://cluster.local/ns/shop/sa/client";
    let csr = kanava_tls::CertificateRequest::generate(&identity.parse().unwrap()).unwrap();
    let signed = certificates
        .sign(with_token(
            pb::SignRequest {
                csr: csr.csr_der().to_vec(),
                identity: identity.into(),
                ttl_seconds: 0,
            },
            &token,
        ))
        .await
        .expect("a certificate while the API server is away");
    assert!(!signed.get_ref().cert_chain.is_empty());
    assert!(!signed.get_ref().signer.is_empty());

    // A token whose key is unknown still needs the API server.
    let status = certificates
        .sign(with_token(
            pb::SignRequest {
                csr: vec![],
                identity: identity.into(),
                ttl_seconds: 0,
            },
            &jwt("ztunnel"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // The restarted ztunnel's token cost the API server nothing: the only
    // requests during the outage are the key refreshes, the watches'
    // retries and that last TokenReview.
    let during: Vec<String> = server.requests()[requests_before..].to_vec();
    assert!(
        !during.iter().any(|r| r.contains("/pods/ztunnel-8kq2w")),
        "{during:?}"
    );
    server.set_away(false);
}

fn rbac_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac/control-plane.yaml")
}

#[test]
fn the_rbac_is_least_privilege() {
    let objects = support::rbac::load(&rbac_file());
    for object in &objects {
        for rule in object["rules"].as_array().into_iter().flatten() {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                let text = rule[field].to_string();
                assert!(!text.contains('*'), "wildcard in {field}: {rule}");
            }
            let resources = rule["resources"].to_string();
            if resources.contains("secrets") || resources.contains("configmaps") {
                assert_eq!(
                    object["kind"], "Role",
                    "secrets and configmaps only in its namespace"
                );
                assert_eq!(object["metadata"]["namespace"], "kanava-system");
            }
        }
    }
    // What must be refused is.
    use support::rbac::{Attributes, allows};
    let request =
        |verb: &str, group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>| {
            Attributes {
                verb: verb.into(),
                group: group.into(),
                resource: resource.into(),
                namespace: namespace.map(str::to_string),
                name: name.map(str::to_string),
                non_resource_path: None,
            }
        };
    for (what, attributes) in [
        (
            "secrets elsewhere",
            request("get", "", "secrets", Some("shop"), Some("db")),
        ),
        (
            "other secrets",
            request("get", "", "secrets", Some("kanava-system"), Some("other")),
        ),
        (
            "listing secrets",
            request("list", "", "secrets", Some("kanava-system"), None),
        ),
        (
            "changing pods",
            request("patch", "", "pods", Some("shop"), Some("web")),
        ),
        (
            "changing policies",
            request(
                "update",
                "security.kanava.io",
                "authorizationpolicies",
                Some("shop"),
                Some("p"),
            ),
        ),
    ] {
        assert!(!allows(&objects, &attributes), "{what} must not be allowed");
    }
}

/// Against a real cluster, read-only: the watches list everything and the
/// control plane's view is complete. Run it with
/// `KANAVA_TEST_KUBECONFIG=$HOME/.kube/config cargo test -p kanava-control-plane
/// --test on_kubernetes -- --ignored`, after `kubectl apply -f deploy/crds/`.
#[tokio::test]
#[ignore = "needs a real cluster: set KANAVA_TEST_KUBECONFIG"]
async fn against_a_real_cluster() {
    let path = std::env::var_os("KANAVA_TEST_KUBECONFIG").expect("KANAVA_TEST_KUBECONFIG");
    let client = kanava_control_plane::kube_client(Some(std::path::Path::new(&path)))
        .await
        .unwrap();
    let store = std::sync::Arc::new(kanava_control_plane::store::Store::new());
    let config = <kanava_control_plane::Config as clap::Parser>::try_parse_from(["x"]).unwrap();
    let _watch = kanava_control_plane::source::kubernetes::watch(
        client,
        kanava_control_plane::translate_into(&config, store.clone(), None),
    );
    eventually("the initial lists", async || {
        store.is_loaded().then_some(())
    })
    .await;
    println!("{} resources", store.snapshot().resources.len());
}
