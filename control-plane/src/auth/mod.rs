//! How a ztunnel proves which node it speaks for.
//!
//! Every request carries `authorization: Bearer <token>`, and the
//! [`Authenticated`] layer turns it into the one node the caller may act
//! for, before the request's body is decoded. Two authenticators:
//!
//! - [`node_tokens`]: a file of per-node tokens (the lab, `--source
//!   manifests`);
//! - [`token_review`]: the ztunnel's projected service-account token,
//!   verified with the API server's published keys ([`jwks`]) or, when they
//!   are not known, by a TokenReview, and bound to the ztunnel's pod, whose
//!   node it is (`--source kubernetes`).
//!
//! Every refusal is logged with its reason; the caller learns only its
//! status code, never what the control plane found out about the token.

pub mod jwks;
pub mod node_tokens;
pub mod token_review;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::server::NamedService;
use tonic::{Code, Status};

pub use node_tokens::NodeAuthenticator;
pub use token_review::TokenReviewer;

/// Longest token accepted: service-account tokens are about a kilobyte.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Authenticates callers, one way or the other.
// One per process, behind an Arc: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Authenticator {
    NodeTokens(NodeAuthenticator),
    TokenReview(TokenReviewer),
}

/// Why a caller was refused: the status code it gets, and the reason that
/// only the log sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub reason: String,
}

impl Refusal {
    pub fn unauthenticated(reason: impl Into<String>) -> Self {
        Refusal {
            code: Code::Unauthenticated,
            reason: reason.into(),
        }
    }

    pub fn permission_denied(reason: impl Into<String>) -> Self {
        Refusal {
            code: Code::PermissionDenied,
            reason: reason.into(),
        }
    }

    /// The credential could not be checked now (the API server is away).
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Refusal {
            code: Code::Unavailable,
            reason: reason.into(),
        }
    }

    /// What the caller is told: the code, and nothing of the reason.
    pub fn status(&self) -> Status {
        let message = match self.code {
            Code::Unauthenticated => "credential refused",
            Code::PermissionDenied => "the credential does not allow this",
            _ => "the credential cannot be checked now; retry later",
        };
        Status::new(self.code, message)
    }
}

/// The node a request's caller acts for, as the authenticator found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthenticatedNode(pub String);

impl Authenticator {
    /// The node the bearer token in `headers` acts for.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<String, Refusal> {
        let token = bearer_token(headers)?;
        match self {
            Authenticator::NodeTokens(tokens) => tokens.authenticate(token),
            Authenticator::TokenReview(reviewer) => reviewer.authenticate(token).await,
        }
    }
}

fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Refusal> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Refusal::unauthenticated("no credential (authorization header)"))?;
    if header.len() > MAX_TOKEN_BYTES + "Bearer ".len() {
        return Err(Refusal::unauthenticated(format!(
            "credential of {} bytes, more than {MAX_TOKEN_BYTES}",
            header.len()
        )));
    }
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Refusal::unauthenticated("authorization header is not `Bearer <token>`"))
}

/// A gRPC service whose callers are authenticated first: the request's
/// body is not touched until its caller is known, and the node it acts for
/// rides along as an [`AuthenticatedNode`] extension.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, auth: Arc<Authenticator>) -> Self {
        Authenticated { inner, auth }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is always ready (tonic's generated servers and
        // the discovery server are); it is driven in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let auth = self.auth.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            match auth.authenticate(request.headers()).await {
                Ok(node) => {
                    request.extensions_mut().insert(AuthenticatedNode(node));
                    inner.call(request).await
                }
                Err(refusal) => {
                    // What the TLS listener recorded (see `server::TlsConn`).
                    let peer = request
                        .extensions()
                        .get::<Option<std::net::SocketAddr>>()
                        .copied()
                        .flatten();
                    tracing::warn!(
                        method = %request.uri().path(),
                        ?peer,
                        code = ?refusal.code,
                        reason = %refusal.reason,
                        "caller refused"
                    );
                    Ok(refusal.status().into_http())
                }
            }
        })
    }
}

/// The node a request was authenticated for (set by [`Authenticated`]).
pub fn node_of<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    request
        .extensions()
        .get::<AuthenticatedNode>()
        .map(|AuthenticatedNode(node)| node.clone())
        // Only reachable if a service were served without the layer.
        .ok_or_else(|| Status::unauthenticated("not authenticated"))
}
