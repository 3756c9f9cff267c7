//! ztunnels on Kubernetes: a projected service-account token, checked by a
//! TokenReview, bound to the ztunnel's pod, whose node is the one the caller
//! may act for.
//!
//! A token is accepted when, in this order:
//! 1. it looks like a JWT that has not expired (checked here, so junk and
//!    stale tokens cost no API call);
//! 2. it is signed by one of the API server's published keys, for the
//!    audience `kanava` ([`super::jwks`]: checked here, so a ztunnel that
//!    restarts while the API server is away still gets in), or, when its
//!    key is not known, the API server's TokenReview says it is
//!    authenticated for that audience;
//! 3. it belongs to the ztunnel service account
//!    (`system:serviceaccount:<namespace>:ztunnel`);
//! 4. it is bound to a pod (the token's `kubernetes.io` claims, or the
//!    review's `pod-name`/`pod-uid` extras), and that pod exists, has the
//!    same uid, runs as the same account, is not finished, and is scheduled
//!    on a node (the one the token names, if it names one): that node is
//!    the answer. A locally verified token's pod is looked up in the
//!    control plane's own watch cache, and in the API server only when the
//!    cache does not know it yet.
//!
//! Answers are cached by the token's digest until the token expires, and
//! never longer than [`CACHE_FOR`], so a deleted ztunnel pod loses access
//! within that time. At most 16 reviews run at once, so callers presenting
//! made-up tokens cannot turn the control plane into a flood of API calls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

use super::Refusal;
use super::jwks::{BoundToken, Jwks, KnownPod, Verdict, ZtunnelPods};
use super::node_tokens::digest;

/// Longest an answer is reused without asking the API server again.
pub const CACHE_FOR: Duration = Duration::from_secs(60);
/// Most answers kept; beyond that, expired ones are dropped, then all.
const CACHE_ENTRIES: usize = 4096;
/// Most TokenReviews in flight at once, and how long a caller waits for a
/// turn: anyone who reaches port 15012 can present fresh JWT-shaped tokens,
/// and each would otherwise cost the API server a review.
const MAX_REVIEWS_IN_FLIGHT: usize = 16;
const REVIEW_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// The TokenReview extras that bind a token to a pod.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Checks ztunnel tokens with the API server.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the ztunnels.
    username: String,
    namespace: String,
    service_account: String,
    cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    reviews_in_flight: tokio::sync::Semaphore,
    /// The API server's keys, for local verification (absent: TokenReview
    /// only).
    jwks: Option<std::sync::Arc<Jwks>>,
    /// The ztunnel pods the control plane's watch sees.
    pods: ZtunnelPods,
}

impl TokenReviewer {
    pub fn new(client: Client, audience: &str, namespace: &str, service_account: &str) -> Self {
        TokenReviewer {
            client,
            audience: audience.to_string(),
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            cache: Mutex::new(HashMap::new()),
            reviews_in_flight: tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
            jwks: None,
            pods: ZtunnelPods::default(),
        }
    }

    /// Verifies tokens with `jwks` where it knows their key, and checks
    /// their pods against `pods`.
    pub fn with_local_keys(mut self, jwks: std::sync::Arc<Jwks>, pods: ZtunnelPods) -> Self {
        self.jwks = Some(jwks);
        self.pods = pods;
        self
    }

    /// The node `token`'s bearer may act for.
    pub async fn authenticate(&self, token: &str) -> Result<String, Refusal> {
        let expires = expiry_of(token)?;
        let now = SystemTime::now();
        let left = expires
            .duration_since(now)
            .map_err(|_| Refusal::unauthenticated("token expired"))?;
        let key = digest(token);
        if let Some(node) = self.cached(&key) {
            return Ok(node);
        }
        let verdict = self.jwks.as_ref().map_or(Verdict::UnknownKey, |jwks| {
            jwks.verify(token, &self.audience)
        });
        let node = match verdict {
            Verdict::Verified(bound) => self.node_of_bound(&bound).await?,
            Verdict::Refused(refusal) => return Err(refusal),
            Verdict::UnknownKey => self.review(token).await?,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (node.clone(), Instant::now() + left.min(CACHE_FOR)));
        Ok(node)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(node, _)| node.clone())
    }

    async fn review(&self, token: &str) -> Result<String, Refusal> {
        let _turn = tokio::time::timeout(REVIEW_QUEUE_WAIT, self.reviews_in_flight.acquire())
            .await
            .map_err(|_| {
                Refusal::unavailable(format!(
                    "{MAX_REVIEWS_IN_FLIGHT} TokenReviews already in flight for {REVIEW_QUEUE_WAIT:?}"
                ))
            })?
            .map_err(|_| Refusal::unavailable("shutting down"))?;
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        let (pod_name, pod_uid) = self.check_review(&status)?;
        self.node_of_pod(&pod_name, &pod_uid).await
    }

    /// The bound pod's name and uid, if the review allows the caller in.
    fn check_review(&self, status: &TokenReviewStatus) -> Result<(String, String), Refusal> {
        if status.authenticated != Some(true) {
            return Err(Refusal::unauthenticated(format!(
                "TokenReview: not authenticated{}",
                status
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )));
        }
        let audiences = status.audiences.as_deref().unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(Refusal::unauthenticated(format!(
                "TokenReview: the token is for audiences {audiences:?}, not {:?}",
                self.audience
            )));
        }
        let user = status.user.clone().unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(Refusal::permission_denied(format!(
                "the token belongs to {username:?}, not the ztunnel service account {:?}",
                self.username
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| {
            extra
                .get(key)
                .and_then(|values| values.first())
                .filter(|value| !value.is_empty())
                .cloned()
        };
        match (one(POD_NAME_EXTRA), one(POD_UID_EXTRA)) {
            (Some(name), Some(uid)) => Ok((name, uid)),
            _ => Err(Refusal::permission_denied(
                "the token is not bound to a pod (use a projected service-account token)",
            )),
        }
    }

    /// The node of a locally verified token's pod.
    async fn node_of_bound(&self, bound: &BoundToken) -> Result<String, Refusal> {
        if bound.subject != self.username {
            return Err(Refusal::permission_denied(format!(
                "the token belongs to {:?}, not the ztunnel service account {:?}",
                bound.subject, self.username
            )));
        }
        let node = match self.pods.get(&bound.pod_name) {
            Some(known) => self.check_pod(&bound.pod_name, &bound.pod_uid, known)?,
            // A pod newer than the watch's last event: ask.
            None => self.node_of_pod(&bound.pod_name, &bound.pod_uid).await?,
        };
        match &bound.node {
            Some(claimed) if *claimed != node => Err(Refusal::permission_denied(format!(
                "the token was issued on node {claimed}, its pod runs on {node}"
            ))),
            _ => Ok(node),
        }
    }

    async fn node_of_pod(&self, name: &str, uid: &str) -> Result<String, Refusal> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|e| Refusal::unavailable(format!("read pod {}/{name}: {e}", self.namespace)))?
            .ok_or_else(|| {
                Refusal::permission_denied(format!(
                    "the token's pod {}/{name} no longer exists",
                    self.namespace
                ))
            })?;
        let spec = pod.spec.unwrap_or_default();
        let phase = pod.status.and_then(|s| s.phase);
        let known = KnownPod {
            uid: pod.metadata.uid.unwrap_or_default(),
            service_account: spec.service_account_name.unwrap_or_default(),
            node: spec.node_name.filter(|node| !node.is_empty()),
            finished: matches!(phase.as_deref(), Some("Succeeded" | "Failed")),
        };
        self.check_pod(name, uid, known)
    }

    /// The node of pod `name` if it is the one the token is bound to (`uid`)
    /// and may act for it.
    fn check_pod(&self, name: &str, uid: &str, pod: KnownPod) -> Result<String, Refusal> {
        let pod_name = format!("{}/{name}", self.namespace);
        if pod.uid != uid {
            return Err(Refusal::permission_denied(format!(
                "pod {pod_name} is not the token's pod (uid {:?}, token bound to {uid})",
                pod.uid
            )));
        }
        if pod.service_account != self.service_account {
            return Err(Refusal::permission_denied(format!(
                "pod {pod_name} runs as {:?}, not {:?}",
                pod.service_account, self.service_account
            )));
        }
        if pod.finished {
            return Err(Refusal::permission_denied(format!(
                "pod {pod_name} has finished"
            )));
        }
        pod.node.ok_or_else(|| {
            Refusal::permission_denied(format!("pod {pod_name} is not scheduled on a node"))
        })
    }
}

/// When a JWT expires, from its `exp` claim (not verified here: only to
/// refuse junk and stale tokens without asking the API server, and to bound
/// how long an answer is cached).
fn expiry_of(token: &str) -> Result<SystemTime, Refusal> {
    let malformed = |why: &str| Refusal::unauthenticated(format!("malformed token: {why}"));
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a JWT (three dot-separated parts)"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| malformed("payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| malformed("payload is not JSON"))?;
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| malformed("no expiry (exp); only projected tokens are accepted"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(claims))
    }

    #[test]
    fn junk_and_stale_tokens_are_refused_without_asking() {
        for (token, reason) in [
            ("garbage".to_string(), "not a JWT"),
            ("a.!!!.c".to_string(), "not base64url"),
            (jwt("not json"), "not JSON"),
            (jwt(r#"{"sub":"x"}"#), "no expiry"),
        ] {
            let refusal = expiry_of(&token).unwrap_err();
            assert_eq!(refusal.code, tonic::Code::Unauthenticated);
            assert!(refusal.reason.contains(reason), "{token}: {refusal:?}");
        }
        let expires = expiry_of(&jwt(r#"{"exp":4102444800}"#)).unwrap();
        assert_eq!(expires, UNIX_EPOCH + Duration::from_secs(4102444800));
    }
}
