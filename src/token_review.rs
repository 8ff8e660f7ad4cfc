//! Who a sidecar is, for the control plane's APIs: its projected
//! service-account token, for an audience of the receiving service, checked
//! with TokenReview and mapped to the MCPServer whose pods run under it.
//!
//! ```text
//!   token (audience mcp-warden-broker | mcp-warden-collector) ─ TokenReview
//!     ─▶ system:serviceaccount:<ns>:<server>-mcpw ─▶ <ns>/<server>
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use crate::policy::ServerRef;

/// Audience of the token a sidecar presents to the broker.
pub const BROKER_AUDIENCE: &str = "mcp-warden-broker";
/// Audience of the token a sidecar presents to the audit collector (not
/// the broker's, so neither token is good for the other).
pub const COLLECTOR_AUDIENCE: &str = "mcp-warden-collector";
/// How long a successful review is remembered (by the token's hash).
const REVIEW_CACHE: Duration = Duration::from_secs(60);
/// Suffix of the service account the operator gives each MCPServer's pods
/// (`render::names`).
const SA_SUFFIX: &str = "-mcpw";

/// The MCPServer a service account username serves:
/// `system:serviceaccount:<ns>:<server>-mcpw` → `<ns>/<server>`.
pub fn server_of_service_account(username: &str) -> Option<ServerRef> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, account) = rest.split_once(':')?;
    let server = account.strip_suffix(SA_SUFFIX)?;
    (!namespace.is_empty() && !server.is_empty())
        .then(|| ServerRef { namespace: namespace.to_string(), name: server.to_string() })
}

/// Why a sidecar is not recognised. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server did not authenticate the token for our audience.
    #[error("the sidecar token is not valid for this audience{0}")]
    NotAuthenticated(String),
    /// Authenticated, but not an MCPServer's service account.
    #[error("the token does not belong to an MCPServer's service account")]
    NotASidecar,
    /// The TokenReview call failed.
    #[error("TokenReview failed: {0}")]
    Api(String),
}

/// Reviews `token` for `audiences` (`None`: the API server's own) and
/// returns what the API server says of it, once it says authenticated.
/// Errors never hold the token.
pub async fn review(
    client: &Client,
    token: &str,
    audiences: Option<Vec<String>>,
) -> Result<k8s_openapi::api::authentication::v1::TokenReviewStatus, ReviewError> {
    let review =
        TokenReview { spec: TokenReviewSpec { token: token.to_string(), audiences }, ..TokenReview::default() };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await.map_err(|e| ReviewError::Api(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(ReviewError::NotAuthenticated(why));
    }
    Ok(status)
}

/// Checks sidecar tokens with TokenReview.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    reviewed: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl TokenReviewer {
    /// A reviewer of tokens for `audience`, using `client`'s credentials
    /// (RBAC: create tokenreviews).
    pub fn new(client: Client, audience: &str) -> Self {
        TokenReviewer { client, audience: audience.to_string(), reviewed: Mutex::new(HashMap::new()) }
    }

    /// The MCPServer whose sidecar holds `token`.
    pub async fn server_of(&self, token: &str) -> Result<ServerRef, ReviewError> {
        let username = self.username_of(token).await?;
        server_of_service_account(&username).ok_or(ReviewError::NotASidecar)
    }

    /// The authenticated username `token` belongs to (for our audience).
    pub async fn username_of(&self, token: &str) -> Result<String, ReviewError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((username, at)) = self.reviewed.lock().unwrap_or_else(|p| p.into_inner()).get(&digest)
            && at.elapsed() < REVIEW_CACHE
        {
            return Ok(username.clone());
        }
        let status = review(&self.client, token, Some(vec![self.audience.clone()])).await?;
        if let Some(audiences) = &status.audiences
            && !audiences.contains(&self.audience)
        {
            return Err(ReviewError::NotAuthenticated(" (audience not confirmed)".into()));
        }
        let username = status.user.and_then(|u| u.username).filter(|u| !u.is_empty());
        let username = username.ok_or(ReviewError::NotAuthenticated(" (no username)".into()))?;
        let mut reviewed = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
        if reviewed.len() > 10_000 {
            reviewed.clear();
        }
        reviewed.insert(digest, (username.clone(), Instant::now()));
        Ok(username)
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use serde_json::json;

    use super::*;
    use crate::operator::fixtures::mock_client;

    #[test]
    fn service_accounts_map_to_their_server() {
        assert_eq!(
            server_of_service_account("system:serviceaccount:clinic:patient-lookup-mcpw"),
            Some(ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() })
        );
        for other in [
            "system:serviceaccount:clinic:default",
            "system:serviceaccount:clinic:-mcpw",
            "system:serviceaccount::x-mcpw",
            "alice",
            "system:node:worker-1",
        ] {
            assert_eq!(server_of_service_account(other), None, "{other}");
        }
    }

    const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

    fn review_answer(authenticated: bool, username: &str, audiences: &[&str]) -> serde_json::Value {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {"creationTimestamp": null}, "spec": {},
               "status": {"authenticated": authenticated, "user": {"username": username}, "audiences": audiences}})
    }

    #[tokio::test]
    async fn a_sidecar_token_is_reviewed_for_our_audience_then_remembered() {
        let (client, verifier) = mock_client();
        let server = verifier
            .expect(Method::POST, REVIEWS, |req| {
                assert_eq!(req.body["spec"]["token"], "sidecar-token");
                assert_eq!(req.body["spec"]["audiences"], json!([BROKER_AUDIENCE]));
                (
                    StatusCode::CREATED,
                    review_answer(true, "system:serviceaccount:clinic:patient-lookup-mcpw", &[BROKER_AUDIENCE]),
                )
            })
            .run();
        let reviewer = TokenReviewer::new(client, BROKER_AUDIENCE);
        let expected = ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() };
        assert_eq!(reviewer.server_of("sidecar-token").await.unwrap(), expected);
        // The second time no request is made (the mock would fail on one).
        assert_eq!(reviewer.server_of("sidecar-token").await.unwrap(), expected);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unauthenticated_wrong_audience_and_other_accounts_are_refused() {
        let (client, verifier) = mock_client();
        let server = verifier
            // A failed review as the real server answers it: 201, no
            // `authenticated` at all, an error string.
            .expect(Method::POST, REVIEWS, |_| {
                (
                    StatusCode::CREATED,
                    crate::operator::fixtures::recording("06-auth/tokenreview-bad-signature.response.json"),
                )
            })
            .expect(Method::POST, REVIEWS, |_| {
                (
                    StatusCode::CREATED,
                    review_answer(
                        true,
                        "system:serviceaccount:clinic:patient-lookup-mcpw",
                        &["https://kubernetes.default.svc"],
                    ),
                )
            })
            .expect(Method::POST, REVIEWS, |_| {
                (StatusCode::CREATED, review_answer(true, "system:serviceaccount:clinic:default", &[BROKER_AUDIENCE]))
            })
            .fail(Method::POST, REVIEWS, 500)
            .run();
        let reviewer = TokenReviewer::new(client, BROKER_AUDIENCE);
        assert!(matches!(reviewer.server_of("t1").await, Err(ReviewError::NotAuthenticated(_))));
        assert!(matches!(reviewer.server_of("t2").await, Err(ReviewError::NotAuthenticated(_))));
        assert!(matches!(reviewer.server_of("t3").await, Err(ReviewError::NotASidecar)));
        let err = reviewer.server_of("t4").await.unwrap_err();
        assert!(matches!(err, ReviewError::Api(_)));
        assert!(!err.to_string().contains("t4"));
        server.await.unwrap();
    }
}
