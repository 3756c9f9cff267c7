//! ztunnel authentication with TokenReview, against an in-test API server:
//! every kind of answer, and what the caller gets for each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use base64::Engine as _;
use kanava_control_plane::auth::{Authenticator, TokenReviewer};
use serde_json::{Value, json};
use support::api_server::{self, ApiServer, PODS};
use tonic::Code;

const ZTUNNEL_USER: &str = "system:serviceaccount:kanava-system:ztunnel";
const ZTUNNEL_POD: &str = "ztunnel-8kq2w";
const ZTUNNEL_UID: &str = "44444444-5555-4666-8777-888888888888";

fn jwt(subject: &str, expires_in_secs: i64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + expires_in_secs;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&json!({"sub": subject, "exp": exp, "aud": ["kanava"]}).to_string()),
        b64("signature")
    )
}

fn review(user: &str, audiences: &[&str], pod: Option<(&str, &str)>) -> Value {
    let mut extra = json!({});
    if let Some((name, uid)) = pod {
        extra = json!({
            "authentication.kubernetes.io/pod-name": [name],
            "authentication.kubernetes.io/pod-uid": [uid],
            "authentication.kubernetes.io/node-name": ["node-1"]
        });
    }
    json!({"authenticated": true, "audiences": audiences,
           "user": {"username": user, "uid": "sa-uid", "groups": ["system:serviceaccounts"], "extra": extra}})
}

fn headers(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers
}

async fn setup() -> (ApiServer, Authenticator) {
    let server = ApiServer::start().await;
    api_server::serve_golden(&server);
    let mut other = api_server::golden("pods.json").remove(5);
    other["metadata"]["name"] = json!("impostor");
    other["metadata"]["uid"] = json!("impostor-uid");
    other["spec"]["serviceAccountName"] = json!("default");
    server.apply(PODS, other);
    let auth = Authenticator::TokenReview(TokenReviewer::new(
        server.client(),
        "kanava",
        "kanava-system",
        "ztunnel",
    ));
    (server, auth)
}

#[tokio::test]
async fn a_ztunnel_token_bound_to_its_pod_acts_for_that_pods_node_only() {
    let (server, auth) = setup().await;
    let token = jwt("ztunnel", 3600);
    server.review(
        &token,
        review(ZTUNNEL_USER, &["kanava"], Some((ZTUNNEL_POD, ZTUNNEL_UID))),
    );
    assert_eq!(auth.authenticate(&headers(&token)).await.unwrap(), "node-1");

    // Cached: a second call asks the API server nothing.
    let asked = server.requests().len();
    assert_eq!(auth.authenticate(&headers(&token)).await.unwrap(), "node-1");
    assert_eq!(server.requests().len(), asked, "answer cached");
}

#[tokio::test]
async fn every_other_answer_is_refused_with_the_right_code() {
    let (server, auth) = setup().await;
    let cases: Vec<(&str, Value, Code, &str)> = vec![
        (
            "not authenticated",
            json!({"authenticated": false, "error": "invalid bearer token"}),
            Code::Unauthenticated,
            "not authenticated",
        ),
        (
            "wrong audience",
            review(
                ZTUNNEL_USER,
                &["https://kubernetes.default.svc"],
                Some((ZTUNNEL_POD, ZTUNNEL_UID)),
            ),
            Code::Unauthenticated,
            "audiences",
        ),
        (
            "wrong service account",
            review(
                "system:serviceaccount:shop:web",
                &["kanava"],
                Some((ZTUNNEL_POD, ZTUNNEL_UID)),
            ),
            Code::PermissionDenied,
            "not the ztunnel service account",
        ),
        (
            "not bound to a pod",
            review(ZTUNNEL_USER, &["kanava"], None),
            Code::PermissionDenied,
            "not bound to a pod",
        ),
        (
            "pod gone",
            review(
                ZTUNNEL_USER,
                &["kanava"],
                Some(("ztunnel-gone", "gone-uid")),
            ),
            Code::PermissionDenied,
            "no longer exists",
        ),
        (
            "pod replaced (same name, new uid)",
            review(ZTUNNEL_USER, &["kanava"], Some((ZTUNNEL_POD, "older-uid"))),
            Code::PermissionDenied,
            "not the token's pod",
        ),
        (
            "pod of another account",
            review(
                ZTUNNEL_USER,
                &["kanava"],
                Some(("impostor", "impostor-uid")),
            ),
            Code::PermissionDenied,
            "runs as",
        ),
        (
            "API error",
            json!("error"),
            Code::Unavailable,
            "TokenReview failed",
        ),
    ];
    for (n, (case, answer, code, reason)) in cases.into_iter().enumerate() {
        let token = jwt(&format!("case-{n}"), 3600);
        server.review(&token, answer);
        let refusal = auth.authenticate(&headers(&token)).await.unwrap_err();
        assert_eq!(refusal.code, code, "{case}: {refusal:?}");
        assert!(refusal.reason.contains(reason), "{case}: {refusal:?}");
        // The caller learns the code, not what was found.
        let status = refusal.status();
        assert!(!status.message().contains(reason), "{case}: {status:?}");
    }
}

#[tokio::test]
async fn malformed_expired_and_missing_tokens_are_refused_without_asking_the_api_server() {
    let (server, auth) = setup().await;
    let expired = jwt("ztunnel", -10);
    server.review(
        &expired,
        review(ZTUNNEL_USER, &["kanava"], Some((ZTUNNEL_POD, ZTUNNEL_UID))),
    );
    let asked = server.requests().len();
    for (token, reason) in [
        (expired.as_str(), "expired"),
        ("not-a-jwt", "malformed token"),
        ("a.b.c", "malformed token"),
    ] {
        let refusal = auth.authenticate(&headers(token)).await.unwrap_err();
        assert_eq!(refusal.code, Code::Unauthenticated);
        assert!(refusal.reason.contains(reason), "{token}: {refusal:?}");
    }
    let refusal = auth
        .authenticate(&http::HeaderMap::new())
        .await
        .unwrap_err();
    assert!(refusal.reason.contains("no credential"), "{refusal:?}");
    let huge = "x".repeat(20_000);
    let refusal = auth.authenticate(&headers(&huge)).await.unwrap_err();
    assert!(refusal.reason.contains("more than"), "{refusal:?}");
    assert_eq!(
        server.requests().len(),
        asked,
        "the API server was not asked"
    );
}
