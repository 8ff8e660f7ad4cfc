//! Whether a person may do what the broker guards beyond its sidecars
//! (re-identification): their Kubernetes token, checked with TokenReview for
//! the API server's own audience, then a SubjectAccessReview of the act.
//!
//! ```text
//!   token (kubectl's: OIDC id token, or `kubectl create token`) ─ TokenReview ─▶ user, groups
//!   SubjectAccessReview {user, groups, verb reidentify, group mcpwarden.io, resource phistores, ns, name}
//!   ─▶ allowed | denied (a Role names who may: verbs [reidentify] on phistores)
//! ```
//!
//! Nothing here holds or logs the token.

use std::collections::BTreeMap;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};

pub use crate::token_review::ReviewError;

/// A person the API server authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// Username.
    pub username: String,
    /// UID, when the authenticator gives one.
    pub uid: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (e.g. scopes), passed on to the access review.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Reviews people's tokens and their access.
pub struct AccessReviewer {
    client: Client,
}

impl AccessReviewer {
    /// A reviewer using `client`'s credentials (RBAC: create tokenreviews
    /// and subjectaccessreviews).
    pub fn new(client: Client) -> Self {
        AccessReviewer { client }
    }

    /// Who holds `token` (audience: the API server's own).
    pub async fn person(&self, token: &str) -> Result<Person, ReviewError> {
        let status = crate::token_review::review(&self.client, token, None).await?;
        let user = status.user.unwrap_or_default();
        let username = user.username.filter(|u| !u.is_empty());
        let username = username.ok_or(ReviewError::NotAuthenticated(" (no username)".into()))?;
        Ok(Person {
            username,
            uid: user.uid,
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        })
    }

    /// Whether `person` may `verb` the PHIStore `namespace/name`.
    pub async fn may(&self, person: &Person, verb: &str, namespace: &str, name: &str) -> Result<bool, ReviewError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(person.username.clone()),
                uid: person.uid.clone(),
                groups: Some(person.groups.clone()),
                extra: (!person.extra.is_empty()).then(|| person.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(crate::api::GROUP.into()),
                    resource: Some("phistores".into()),
                    verb: Some(verb.into()),
                    namespace: Some(namespace.into()),
                    name: Some(name.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| ReviewError::Api(e.to_string()))?;
        Ok(answer.status.is_some_and(|s| s.allowed && s.denied != Some(true)))
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use serde_json::json;

    use super::*;
    use crate::operator::fixtures::{mock_client, recording};

    const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
    const ACCESS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

    #[tokio::test]
    async fn a_person_is_reviewed_for_the_api_servers_audience_then_their_access() {
        let (client, verifier) = mock_client();
        let server = verifier
            .expect(Method::POST, REVIEWS, |req| {
                assert_eq!(req.body["spec"]["token"], "kubectl-token");
                assert!(req.body["spec"].get("audiences").is_none(), "the API server's own audience");
                let answer = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": {},
                    "status": {"authenticated": true, "user": {"username": "oidc:priya", "uid": "u-1", "groups": ["privacy-office"],
                               "extra": {"scopes": ["openid"]}}}});
                (StatusCode::CREATED, answer)
            })
            .expect(Method::POST, ACCESS, |req| {
                let spec = &req.body["spec"];
                assert_eq!(spec["user"], "oidc:priya");
                assert_eq!(spec["groups"], json!(["privacy-office"]));
                assert_eq!(spec["extra"], json!({"scopes": ["openid"]}));
                assert_eq!(
                    spec["resourceAttributes"],
                    json!({"group": "mcpwarden.io", "resource": "phistores", "verb": "reidentify", "namespace": "clinic", "name": "ehr"})
                );
                let answer = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {},
                    "spec": spec, "status": {"allowed": true}});
                (StatusCode::CREATED, answer)
            })
            .expect(Method::POST, ACCESS, |req| {
                let answer = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {},
                    "spec": req.body["spec"], "status": {"allowed": false, "reason": "no RBAC policy matched"}});
                (StatusCode::CREATED, answer)
            })
            .run();
        let reviewer = AccessReviewer::new(client);
        let person = reviewer.person("kubectl-token").await.unwrap();
        assert_eq!(person.username, "oidc:priya");
        assert!(reviewer.may(&person, "reidentify", "clinic", "ehr").await.unwrap());
        assert!(!reviewer.may(&person, "reidentify", "clinic", "ehr").await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_token_the_api_server_refuses_is_not_a_person() {
        let (client, verifier) = mock_client();
        let server = verifier
            .expect(Method::POST, REVIEWS, |_| {
                (StatusCode::CREATED, recording("06-auth/tokenreview-no-audience.response.json"))
            })
            .fail(Method::POST, REVIEWS, 500)
            .run();
        let reviewer = AccessReviewer::new(client);
        assert!(matches!(reviewer.person("t1").await, Err(ReviewError::NotAuthenticated(_))));
        let err = reviewer.person("secret-t2").await.unwrap_err();
        assert!(matches!(err, ReviewError::Api(_)) && !err.to_string().contains("secret-t2"));
        server.await.unwrap();
    }
}
