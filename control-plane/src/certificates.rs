//! The certificate service: signs workload certificates, only for the node
//! that runs the workload.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use kanava_mesh::Identity;
use kanava_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::auth::{self, Authenticated, Authenticator};
use crate::ca::Authority;
use crate::metrics::CertificateLabels;
use crate::store::Store;

pub struct CertificateService {
    ca: Arc<Authority>,
    store: Arc<Store>,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl CertificateService {
    pub fn new(
        ca: Arc<Authority>,
        store: Arc<Store>,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Self {
        CertificateService {
            ca,
            store,
            default_ttl,
            max_ttl,
        }
    }

    fn sign(&self, node: &str, request: &pb::SignRequest) -> Result<pb::SignResponse, Error> {
        let identity: Identity = request.identity.parse()?;
        // One CA for the whole request: the signer reported is the one
        // that signed, even while a rotation replaces it.
        let ca = self.ca.current();
        if identity.trust_domain() != ca.trust_domain() {
            return Err(Error::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: ca.trust_domain().to_string(),
            });
        }
        if !self.store.node_runs(node, &identity) {
            return Err(Error::NotOnNode {
                identity: identity.to_string(),
                node: node.to_string(),
            });
        }
        let ttl = match request.ttl_seconds {
            0 => self.default_ttl,
            secs => Duration::from_secs(secs).min(self.max_ttl),
        };
        let issued = ca.sign_workload(&request.csr, &identity, ttl)?;
        let not_after = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        tracing::info!(%node, %identity, ttl = ?ttl, "signed workload certificate");
        Ok(pb::SignResponse {
            cert_chain: issued.chain_pem,
            trust_roots: ca.roots_pem().to_vec(),
            not_after_unix: not_after,
            signer: ca.signer().to_string(),
        })
    }
}

/// Largest signing request accepted: a CSR for one identity is well under a
/// kilobyte, so anything near this is not one.
pub const MAX_SIGN_REQUEST_BYTES: usize = 16 * 1024;

/// The certificate service as served: callers are authenticated from their
/// headers before a byte of the request body is decoded, and bodies are
/// capped at [`MAX_SIGN_REQUEST_BYTES`].
pub fn server(
    service: CertificateService,
    auth: Arc<Authenticator>,
) -> Authenticated<pb::certificates_server::CertificatesServer<CertificateService>> {
    let server = pb::certificates_server::CertificatesServer::new(service)
        .max_decoding_message_size(MAX_SIGN_REQUEST_BYTES);
    Authenticated::new(server, auth)
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for CertificateService {
    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let node = auth::node_of(&request)?;
        let requests = &self.store.metrics().certificate_requests;
        match self.sign(&node, request.get_ref()) {
            Ok(response) => {
                requests
                    .get_or_create(&CertificateLabels {
                        result: "signed",
                        reason: "-",
                    })
                    .inc();
                Ok(Response::new(response))
            }
            Err(error) => {
                requests
                    .get_or_create(&CertificateLabels {
                        result: "refused",
                        reason: error.refusal_reason(),
                    })
                    .inc();
                tracing::warn!(%node, identity = %request.get_ref().identity, %error, "certificate request refused");
                Err(error.into())
            }
        }
    }
}
