//! Local verification of projected service-account tokens, so a ztunnel
//! that (re)connects while the API server is away still gets in.
//!
//! The API server publishes the keys it signs service-account tokens with
//! (`/openid/v1/jwks`) and its issuer (`/.well-known/openid-configuration`).
//! [`Jwks`] fetches both at start and every `--jwks-refresh-interval`, and
//! keeps the last good set through any number of failed refreshes: keys
//! rotate rarely, and an outage is exactly when they are needed.
//!
//! A token is verified here when its `kid` names a known key: signature,
//! issuer, audience, expiry and not-before, and the claims that bind it to
//! a pod. The pod is then checked against the control plane's own watch
//! cache ([`ZtunnelPods`]), not the API server. A token whose key is not
//! known (no keys fetched yet, or a key newer than the last refresh) goes to
//! TokenReview as before, and asks for a refresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use kube::Client;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Refusal;

/// Where the API server publishes its service-account signing keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// Where it publishes its issuer.
pub const OPENID_CONFIGURATION_PATH: &str = "/.well-known/openid-configuration";
/// Least time between two refreshes asked for by unknown keys: made-up
/// `kid`s must not turn into a flood of requests.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(30);
/// Longest wait for one fetch of the keys.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

/// The API server's keys and issuer, as last fetched.
struct Keys {
    issuer: String,
    /// By `kid`; only RSA and EC keys (what the API server signs with).
    keys: HashMap<String, DecodingKey>,
}

/// The signing keys of service-account tokens, kept fresh.
pub struct Jwks {
    client: Client,
    current: ArcSwap<Option<Keys>>,
    /// When a refresh was last attempted (for [`MIN_REFRESH_GAP`]).
    last_attempt: std::sync::Mutex<Option<Instant>>,
    refresh: tokio::sync::Notify,
}

/// What local verification concluded.
#[derive(Debug)]
pub enum Verdict {
    /// Signed by a known key and valid: the pod it is bound to.
    Verified(BoundToken),
    /// No known key for it: TokenReview decides.
    UnknownKey,
    /// Refused (bad signature, issuer, audience, expiry, or not bound).
    Refused(Refusal),
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundToken {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub subject: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// The node the token was issued on, when the API server says (1.30+).
    pub node: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    pod: Option<Named>,
    node: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
    #[serde(default)]
    uid: String,
}

#[derive(Deserialize)]
struct OpenIdConfiguration {
    issuer: String,
}

impl Jwks {
    pub fn new(client: Client) -> Arc<Self> {
        Arc::new(Jwks {
            client,
            current: ArcSwap::from_pointee(None),
            last_attempt: std::sync::Mutex::new(None),
            refresh: tokio::sync::Notify::new(),
        })
    }

    /// Fetches the keys now, then every `every` and whenever an unknown key
    /// asks, until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            self.fetch().await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.refresh.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Whether keys are known (fetched at least once).
    pub fn loaded(&self) -> bool {
        self.current.load().is_some()
    }

    async fn fetch(&self) {
        *self.last_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let read = tokio::time::timeout(FETCH_TIMEOUT, self.read())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")));
        match read {
            Ok(keys) => {
                tracing::debug!(issuer = %keys.issuer, keys = keys.keys.len(), "service-account keys fetched");
                self.current.store(Arc::new(Some(keys)));
            }
            Err(error) => {
                let kept = if self.loaded() {
                    "keeping the keys fetched before"
                } else {
                    "tokens go to TokenReview until they are known"
                };
                tracing::warn!(%error, "cannot fetch the service-account keys; {kept}");
            }
        }
    }

    async fn read(&self) -> Result<Keys, String> {
        let get = |path: &str| {
            let client = self.client.clone();
            let path = path.to_string();
            async move {
                let request = http::Request::get(&path)
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                client
                    .request_text(request)
                    .await
                    .map_err(|e| format!("GET {path}: {e}"))
            }
        };
        let configuration: OpenIdConfiguration =
            serde_json::from_str(&get(OPENID_CONFIGURATION_PATH).await?)
                .map_err(|e| format!("{OPENID_CONFIGURATION_PATH}: {e}"))?;
        let set: JwkSet = serde_json::from_str(&get(JWKS_PATH).await?)
            .map_err(|e| format!("{JWKS_PATH}: {e}"))?;
        Ok(Keys {
            issuer: configuration.issuer,
            keys: usable_keys(&set),
        })
    }

    /// Asks for a refresh, at most once per [`MIN_REFRESH_GAP`].
    fn ask_refresh(&self) {
        let last = *self.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= MIN_REFRESH_GAP) {
            self.refresh.notify_one();
        }
    }

    /// Verifies `token` for `audience` with the keys known now.
    pub fn verify(&self, token: &str, audience: &str) -> Verdict {
        let current = self.current.load();
        let Some(keys) = current.as_ref() else {
            return Verdict::UnknownKey;
        };
        let verdict = verify_with(keys, token, audience);
        if matches!(verdict, Verdict::UnknownKey) {
            self.ask_refresh();
        }
        verdict
    }
}

/// The RSA and EC keys of `set` that have a `kid`, ready to verify with.
fn usable_keys(set: &JwkSet) -> HashMap<String, DecodingKey> {
    let mut usable = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let skipped = |why: String| tracing::warn!(?kid, %why, "service-account key skipped");
        let Some(id) = kid.clone() else {
            skipped("no kid".into());
            continue;
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) if matches!(key.family(), AlgorithmFamily::Rsa | AlgorithmFamily::Ec) => {
                usable.insert(id, key);
            }
            Ok(key) => skipped(format!("a {:?} key, not RSA or EC", key.family())),
            Err(error) => skipped(error.to_string()),
        }
    }
    usable
}

fn verify_with(keys: &Keys, token: &str, audience: &str) -> Verdict {
    let refused = |why: String| Verdict::Refused(Refusal::unauthenticated(why));
    let header = match jsonwebtoken::decode_header(token) {
        Ok(header) => header,
        Err(error) => return refused(format!("malformed token: {error}")),
    };
    let Some(key) = header.kid.as_deref().and_then(|kid| keys.keys.get(kid)) else {
        return Verdict::UnknownKey;
    };
    // The algorithm must fit the key (an RSA key never verifies an HMAC or
    // EC signature); the API server signs with RS256 or ES256.
    if !matches!(
        header.alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::ES256
            | Algorithm::ES384
    ) || header.alg.family() != key.family()
    {
        return refused(format!(
            "token signed with {:?}, which its key cannot verify",
            header.alg
        ));
    }
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[keys.issuer.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECONDS;
    let claims = match jsonwebtoken::decode::<Claims>(token, key, &validation) {
        Ok(data) => data.claims,
        Err(error) => return refused(format!("token refused by the API server's keys: {error}")),
    };
    let kubernetes = claims.kubernetes.unwrap_or(KubernetesClaims {
        pod: None,
        node: None,
    });
    let Some(pod) = kubernetes
        .pod
        .filter(|pod| !pod.name.is_empty() && !pod.uid.is_empty())
    else {
        return Verdict::Refused(Refusal::permission_denied(
            "the token is not bound to a pod (use a projected service-account token)",
        ));
    };
    Verdict::Verified(BoundToken {
        subject: claims.sub,
        pod_name: pod.name,
        pod_uid: pod.uid,
        node: kubernetes.node.map(|node| node.name),
    })
}

/// The ztunnel pods as the control plane's own watch sees them, so a
/// verified token's pod is checked without asking the API server.
#[derive(Clone, Default)]
pub struct ZtunnelPods {
    pods: Arc<ArcSwap<HashMap<String, KnownPod>>>,
}

/// What the binding check needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownPod {
    pub uid: String,
    pub service_account: String,
    pub node: Option<String>,
    /// Succeeded or Failed.
    pub finished: bool,
}

impl ZtunnelPods {
    /// Replaces what is known with the pods of `namespace` running as
    /// `service_account` in `pods`.
    pub fn update<'a>(
        &self,
        namespace: &str,
        service_account: &str,
        pods: impl Iterator<Item = &'a kanava_cluster::MeshPod>,
    ) {
        let known: HashMap<String, KnownPod> = pods
            .filter(|pod| pod.namespace == namespace && !pod.name.is_empty())
            .filter_map(|pod| {
                if !pod.has_spec || pod.service_account_name.as_deref() != Some(service_account) {
                    return None;
                }
                Some((
                    pod.name.clone(),
                    KnownPod {
                        uid: pod.uid.clone()?,
                        service_account: service_account.to_string(),
                        node: pod.node_name.clone().filter(|n| !n.is_empty()),
                        finished: pod.finished,
                    },
                ))
            })
            .collect();
        if **self.pods.load() != known {
            self.pods.store(Arc::new(known));
        }
    }

    pub fn get(&self, name: &str) -> Option<KnownPod> {
        self.pods.load().get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};

    /// An EC P-256 key pair, as a JWK (public) and an encoding key.
    fn key_pair(kid: &str) -> (serde_json::Value, EncodingKey) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public = key.public_key_raw(); // 0x04 || x || y
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&public[1..33]), "y": b64(&public[33..65]),
        });
        (jwk, EncodingKey::from_ec_der(&key.serialize_der()))
    }

    fn keys(jwks: &[serde_json::Value]) -> Keys {
        let set: JwkSet = serde_json::from_value(serde_json::json!({ "keys": jwks })).unwrap();
        Keys {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            keys: usable_keys(&set),
        }
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn token(key: &EncodingKey, kid: &str, mut claims: serde_json::Value) -> String {
        let defaults = serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "aud": ["kanava"],
            "sub": "system:serviceaccount:kanava-system:ztunnel",
            "exp": now() + 3600, "iat": now(), "nbf": now(),
            "kubernetes.io": {
                "namespace": "kanava-system",
                "pod": {"name": "ztunnel-8kq2w", "uid": "uid-1"},
                "node": {"name": "node-1", "uid": "node-uid"},
                "serviceaccount": {"name": "ztunnel", "uid": "sa-uid"}
            }
        });
        let mut merged = defaults;
        if let (Some(merged), Some(claims)) = (merged.as_object_mut(), claims.as_object_mut()) {
            for (k, v) in std::mem::take(claims) {
                merged.insert(k, v);
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &merged, key).unwrap()
    }

    #[test]
    fn a_token_signed_by_a_known_key_is_verified_with_its_pod_binding() {
        let (jwk, signing) = key_pair("k1");
        let keys = keys(&[jwk]);
        let token = token(&signing, "k1", serde_json::json!({}));
        match verify_with(&keys, &token, "kanava") {
            Verdict::Verified(bound) => assert_eq!(
                bound,
                BoundToken {
                    subject: "system:serviceaccount:kanava-system:ztunnel".into(),
                    pod_name: "ztunnel-8kq2w".into(),
                    pod_uid: "uid-1".into(),
                    node: Some("node-1".into()),
                }
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_wrong_token_is_refused_and_an_unknown_key_left_to_token_review() {
        let (jwk, signing) = key_pair("k1");
        let (_, forger) = key_pair("k1");
        let keys = keys(&[jwk]);
        let refused = |token: &str, reason: &str| match verify_with(&keys, token, "kanava") {
            Verdict::Refused(refusal) => {
                assert!(refusal.reason.contains(reason), "{reason}: {refusal:?}")
            }
            other => panic!("{reason}: {other:?}"),
        };
        refused(
            &token(&forger, "k1", serde_json::json!({})),
            "InvalidSignature",
        );
        refused(
            &token(&signing, "k1", serde_json::json!({"aud": ["other"]})),
            "InvalidAudience",
        );
        refused(
            &token(&signing, "k1", serde_json::json!({"iss": "https://evil"})),
            "InvalidIssuer",
        );
        refused(
            &token(&signing, "k1", serde_json::json!({"exp": now() - 600})),
            "ExpiredSignature",
        );
        refused(
            &token(&signing, "k1", serde_json::json!({"nbf": now() + 600})),
            "ImmatureSignature",
        );
        refused(
            &token(&signing, "k1", serde_json::json!({"kubernetes.io": {}})),
            "not bound to a pod",
        );
        refused("not.a.token", "malformed");
        assert!(matches!(
            verify_with(
                &keys,
                &token(&signing, "k2", serde_json::json!({})),
                "kanava"
            ),
            Verdict::UnknownKey
        ));
    }
}
