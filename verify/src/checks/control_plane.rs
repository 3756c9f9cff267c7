//! The control plane as a pod sees it: it answers only nodes. A pod cannot
//! subscribe to discovery or have a certificate signed, and a node cannot
//! have an identity signed that runs only elsewhere.

use kanava_mesh::{Identity, names};
use kanava_proto::v1 as pb;
use kanava_tls::pki_types::ServerName;

use crate::{Check, Dial, Ground, Seat, Seats, short};

/// A gRPC channel to the control plane from inside `from`, over TLS
/// verified against the mesh root.
async fn channel<G: Ground>(ground: &G, from: &Seat) -> Result<tonic::transport::Channel, String> {
    let tcp = ground
        .connect(from, ground.control_plane(), Dial::default())
        .await?;
    channel_over(tcp, ground.mesh_roots()?).await
}

/// A gRPC channel to the control plane over `tcp` (a connection to it),
/// with TLS verified against `roots`.
pub async fn channel_over(
    tcp: crate::Stream,
    roots: kanava_tls::MeshRoots,
) -> Result<tonic::transport::Channel, String> {
    let tls = kanava_tls::control_plane_client_config(
        &kanava_tls::TrustBundle::new(roots).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(names::CONTROL_PLANE_SERVER_NAME).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    // tonic asks its connector for a connection; this one has exactly one.
    let mut once = Some(hyper_util::rt::TokioIo::new(stream));
    tonic::transport::Endpoint::from_static("http://control-plane")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = once.take();
            async move { stream.ok_or_else(|| std::io::Error::other("connection used")) }
        }))
        .await
        .map_err(|e| e.to_string())
}

fn identity_of(seat: &Seat) -> Result<Identity, String> {
    seat.identity
        .as_deref()
        .ok_or_else(|| format!("{} has no identity", seat.name))?
        .parse::<Identity>()
        .map_err(|e| e.to_string())
}

pub async fn from_a_pod<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "control plane from a pod",
        "discovery and signing refused without a node credential",
    );
    let client = &seats.client;
    let result = async {
        let channel = channel(ground, client).await?;
        let identity = identity_of(client)?;
        let request =
            kanava_tls::CertificateRequest::generate(&identity).map_err(|e| e.to_string())?;
        let sign = pb::certificates_client::CertificatesClient::new(channel.clone())
            .sign(pb::SignRequest {
                csr: request.csr_der().to_vec(),
                identity: identity.to_string(),
                ttl_seconds: 0,
            })
            .await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(pb::DiscoveryRequest {
                node_name: client.node.clone(),
                ..Default::default()
            })
            .await;
        let discovery = pb::discovery_client::DiscoveryClient::new(channel)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        Ok::<_, String>((sign.err(), discovery.err()))
    }
    .await;
    match result {
        Ok((Some(sign), Some(discovery)))
            if sign.code() == tonic::Code::Unauthenticated
                && discovery.code() == tonic::Code::Unauthenticated =>
        {
            check.pass("both answered UNAUTHENTICATED")
        }
        Ok((sign, discovery)) => check
            .fail(format!(
                "sign: {}, discovery: {}",
                sign.map(|s| format!("{:?}", s.code()))
                    .unwrap_or_else(|| "signed!".into()),
                discovery
                    .map(|s| format!("{:?}", s.code()))
                    .unwrap_or_else(|| "subscribed!".into())
            ))
            .fix_if_failed(
                "the control plane serves callers without a node credential: upgrade it \
                 and rotate the mesh root (kanava ca rotate)",
            ),
        // Not even reachable is as good as refused.
        Err(error) => check.pass(format!("unreachable: {}", short(&error))),
    }
}

pub async fn csr_for_another_node<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let node = &seats.client.node;
    // An identity that runs elsewhere and not here; else one that runs
    // nowhere, which this node may not have either.
    let (foreign, whose) = match ground.identity_only_elsewhere(node) {
        Some(identity) => (identity, "runs only on other nodes"),
        None => match seats
            .client
            .identity
            .as_deref()
            .and_then(|own| own.rsplit_once("/sa/"))
        {
            Some((namespace, _)) => (
                format!("{namespace}/sa/kanava-verify-nobody"),
                "runs on no node",
            ),
            None => {
                return Check::new("CSR for an identity of another node", "PERMISSION_DENIED")
                    .skip("no enrolled identity");
            }
        },
    };
    let check = Check::new("CSR for an identity of another node", "PERMISSION_DENIED");
    let result = async {
        let token = ground.node_credential(node).await?;
        let channel = channel(ground, &seats.node_side).await?;
        let identity: Identity = foreign
            .parse()
            .map_err(|e: kanava_mesh::Error| e.to_string())?;
        let request =
            kanava_tls::CertificateRequest::generate(&identity).map_err(|e| e.to_string())?;
        let mut call = tonic::Request::new(pb::SignRequest {
            csr: request.csr_der().to_vec(),
            identity: identity.to_string(),
            ttl_seconds: 0,
        });
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| "token".to_string())?;
        call.metadata_mut().insert("authorization", header);
        Ok::<_, String>(
            pb::certificates_client::CertificatesClient::new(channel)
                .sign(call)
                .await,
        )
    }
    .await;
    let fix = "the control plane signs identities for nodes that do not run them: upgrade \
               it, then rotate the mesh root (kanava ca rotate)";
    match result {
        Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => check.pass(format!(
            "{foreign} ({whose}) with {node}'s credential: PERMISSION_DENIED"
        )),
        Ok(Err(status)) => check
            .fail(format!("{:?}: {}", status.code(), status.message()))
            .fix_if_failed(
                "the node's own credential was not accepted: see the control plane's log \
                 (kubectl logs -n kanava-system deploy/kanava-control-plane)",
            ),
        Ok(Ok(_)) => check
            .fail(format!("signed {foreign} for {node}"))
            .fix_if_failed(fix),
        Err(error) => check.fail(error),
    }
}
