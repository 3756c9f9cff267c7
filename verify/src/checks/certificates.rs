//! A certificate the mesh did not issue, presented on the HBONE port: the
//! ztunnel refuses it, whatever identity it claims.

use std::net::SocketAddr;

use kanava_mesh::{Identity, ports};
use kanava_tls::pki_types::ServerName;

use crate::{Check, Dial, Ground, PROBE_PORT, Seats, TIMEOUT, short};

pub async fn foreign_ca<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "certificate from a foreign CA on :15008",
        "TLS refused by the ztunnel",
    );
    let client = &seats.client;
    let result = async {
        let identity: Identity = client
            .identity
            .as_deref()
            .ok_or("no identity")?
            .parse()
            .map_err(|e: kanava_mesh::Error| e.to_string())?;
        let foreign = foreign_cert(&identity)?;
        let tls = kanava_tls::hbone_client_config(&foreign, &ground.mesh_roots()?, &identity)
            .map_err(|e| e.to_string())?;
        let tcp = ground
            .connect(
                &seats.outsider,
                SocketAddr::from((client.ip, ports::HBONE)),
                Dial::default(),
            )
            .await?;
        let server_name = ServerName::IpAddress(client.ip.into());
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // A TLS 1.3 client learns that its certificate was refused only
        // when it reads: ask for a stream and wait for the answer.
        let exchange = async {
            let (sender, connection) = h2::client::handshake(stream)
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
            tokio::spawn(connection);
            let mut sender = sender.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
            let mut request = http::Request::new(());
            *request.method_mut() = http::Method::CONNECT;
            *request.uri_mut() = SocketAddr::new(client.ip, PROBE_PORT)
                .to_string()
                .parse()
                .map_err(|_| "uri".to_string())?;
            let (response, _send) = sender
                .send_request(request, false)
                .map_err(|e| format!("HTTP/2: {e}"))?;
            let response = response.await.map_err(|e| format!("refused: {e}"))?;
            Ok::<_, String>(response.status())
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(refusal)) => Err(refusal),
            Err(_) => Err("no answer".to_string()),
        }
    }
    .await;
    match result {
        Err(refusal) => check.pass(short(&refusal)),
        Ok(status) => check
            .fail(format!("a CONNECT was answered {status}"))
            .fix_if_failed(
                "the ztunnel trusts a CA other than the mesh's: check the roots it was \
                 given (kanava config-dump NODE) and upgrade it",
            ),
    }
}

/// A certificate for `identity` signed by a CA the mesh has never seen.
fn foreign_cert(identity: &Identity) -> Result<kanava_tls::WorkloadCert, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    };
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issuer = Issuer::new(params, key);
    let request = kanava_tls::CertificateRequest::generate(identity).map_err(|e| e.to_string())?;
    let csr = CertificateSigningRequestParams::from_der(&request.csr_der().to_vec().into())
        .map_err(|e| e.to_string())?;
    let leaf = csr
        .params
        .signed_by(&csr.public_key, &issuer)
        .map_err(|e| e.to_string())?;
    request.into_cert(&[leaf.pem()]).map_err(|e| e.to_string())
}
