//! The broker in a cluster: who a sidecar is (TokenReview of its projected
//! service-account token), what the broker serves (MCPServers, PHIStores and
//! the Secrets and ConfigMaps they name, read from the API), and the
//! PHIStore status it reports.
//!
//! ```text
//!   sidecar token (audience mcp-warden-broker) ─ TokenReview ─▶ system:serviceaccount:<ns>:<server>-mcpw ─▶ <ns>/<server>
//!   list MCPServers, PHIStores; get each Secret / ConfigMap they name ─▶ Inventory::build
//!   store report ─ server-side apply, field manager mcp-warden-broker ─▶ PHIStore status (only when changed)
//! ```
//!
//! A sidecar may ask only for the server its service account belongs to;
//! the broker still verifies the caller's token and the policy itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::inventory::{Inventory, StoreRef};
use crate::api::{API_VERSION, MCPServer, PHIStore, PHIStoreStatus};
use crate::policy::{ServerRef, namespace_of};

/// Audience of the token a sidecar presents to the broker (the collector's
/// is different, so neither token is good for the other).
pub const BROKER_AUDIENCE: &str = "mcp-warden-broker";
/// Field manager of the PHIStore status the broker writes.
pub const STATUS_MANAGER: &str = "mcp-warden-broker";
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
    #[error("the sidecar token is not valid for audience {BROKER_AUDIENCE}{0}")]
    NotAuthenticated(String),
    /// Authenticated, but not an MCPServer's service account.
    #[error("the token does not belong to an MCPServer's service account")]
    NotASidecar,
    /// The TokenReview call failed.
    #[error("TokenReview failed: {0}")]
    Api(String),
}

/// Checks sidecar tokens with TokenReview.
pub struct TokenReviewer {
    client: Client,
    reviewed: Mutex<HashMap<[u8; 32], (ServerRef, Instant)>>,
}

impl TokenReviewer {
    /// A reviewer using `client`'s credentials (RBAC: create tokenreviews).
    pub fn new(client: Client) -> Self {
        TokenReviewer { client, reviewed: Mutex::new(HashMap::new()) }
    }

    /// The MCPServer whose sidecar holds `token`.
    pub async fn server_of(&self, token: &str) -> Result<ServerRef, ReviewError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((server, at)) = self.reviewed.lock().unwrap_or_else(|p| p.into_inner()).get(&digest)
            && at.elapsed() < REVIEW_CACHE
        {
            return Ok(server.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![BROKER_AUDIENCE.into()]) },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| ReviewError::Api(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.map(|e| format!(" ({e})")).unwrap_or_default();
            return Err(ReviewError::NotAuthenticated(why));
        }
        if let Some(audiences) = &status.audiences
            && !audiences.iter().any(|a| a == BROKER_AUDIENCE)
        {
            return Err(ReviewError::NotAuthenticated(" (audience not confirmed)".into()));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let server = server_of_service_account(&username).ok_or(ReviewError::NotASidecar)?;
        let mut reviewed = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
        if reviewed.len() > 10_000 {
            reviewed.clear();
        }
        reviewed.insert(digest, (server.clone(), Instant::now()));
        Ok(server)
    }
}

/// Reads the inventory from the API: every MCPServer and PHIStore (of one
/// namespace, or all), and each Secret and ConfigMap they name.
pub async fn load_inventory(client: &Client, namespace: Option<&str>) -> Result<Inventory, kube::Error> {
    let servers: Vec<MCPServer> = scoped::<MCPServer>(client, namespace).list(&ListParams::default()).await?.items;
    let stores: Vec<PHIStore> = scoped::<PHIStore>(client, namespace).list(&ListParams::default()).await?.items;
    let mut secret_names: BTreeSet<(String, String)> = BTreeSet::new();
    let mut map_names: BTreeSet<(String, String)> = BTreeSet::new();
    for store in &stores {
        let ns = namespace_of(store);
        secret_names.insert((ns.clone(), store.spec.postgres.admin_secret_ref.name.clone()));
        if let Some(ca) = &store.spec.postgres.ca_config_map_ref {
            map_names.insert((ns, ca.name.clone()));
        }
    }
    for server in &servers {
        let ns = namespace_of(server);
        let oidc = &server.spec.authentication.oidc;
        if let Some(r) = &oidc.jwks_secret_ref {
            secret_names.insert((ns.clone(), r.name.clone()));
        }
        if let Some(r) = &oidc.jwks_config_map_ref {
            map_names.insert((ns.clone(), r.name.clone()));
        }
        if oidc.jwks_uri.is_some() {
            // The operator's copy of the keys fetched from jwksUri.
            map_names.insert((ns, crate::render::names::OwnedNames::for_server(&server.name_any()).jwks_config_map));
        }
    }
    let mut secrets = Vec::new();
    for (ns, name) in secret_names {
        // A missing Secret is the store's problem, named in its status.
        if let Some(secret) = Api::<Secret>::namespaced(client.clone(), &ns).get_opt(&name).await? {
            secrets.push(secret);
        }
    }
    let mut maps = Vec::new();
    for (ns, name) in map_names {
        if let Some(map) = Api::<ConfigMap>::namespaced(client.clone(), &ns).get_opt(&name).await? {
            maps.push(map);
        }
    }
    Ok(Inventory::build(servers, stores, &secrets, &maps))
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Writes PHIStore status when it differs from what was last written.
pub struct StatusWriter {
    client: Client,
    written: Mutex<BTreeMap<StoreRef, PHIStoreStatus>>,
}

impl StatusWriter {
    /// A writer using `client` (RBAC: patch phistores/status).
    pub fn new(client: Client) -> Self {
        StatusWriter { client, written: Mutex::new(BTreeMap::new()) }
    }

    /// Applies each changed report; returns how many were written.
    pub async fn write(&self, reports: &BTreeMap<StoreRef, PHIStoreStatus>) -> Result<usize, kube::Error> {
        let mut count = 0;
        for (key, status) in reports {
            if self.written.lock().unwrap_or_else(|p| p.into_inner()).get(key) == Some(status) {
                continue;
            }
            let api: Api<PHIStore> = Api::namespaced(self.client.clone(), &key.namespace);
            let patch = json!({"apiVersion": API_VERSION, "kind": "PHIStore", "status": status});
            api.patch_status(&key.name, &PatchParams::apply(STATUS_MANAGER).force(), &Patch::Apply(&patch)).await?;
            self.written.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), status.clone());
            count += 1;
        }
        Ok(count)
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
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {},
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
        let reviewer = TokenReviewer::new(client);
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
            .expect(Method::POST, REVIEWS, |_| (StatusCode::CREATED, review_answer(false, "", &[])))
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
        let reviewer = TokenReviewer::new(client);
        assert!(matches!(reviewer.server_of("t1").await, Err(ReviewError::NotAuthenticated(_))));
        assert!(matches!(reviewer.server_of("t2").await, Err(ReviewError::NotAuthenticated(_))));
        assert!(matches!(reviewer.server_of("t3").await, Err(ReviewError::NotASidecar)));
        let err = reviewer.server_of("t4").await.unwrap_err();
        assert!(matches!(err, ReviewError::Api(_)));
        assert!(!err.to_string().contains("t4"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_inventory_is_read_with_the_secrets_and_config_maps_it_names() {
        let (store, server_value) = crate::fixtures::clinic_values();
        let mut server_value = server_value;
        server_value["spec"]["authentication"]["oidc"] = json!({
            "issuer": "https://login.example.org", "audience": "https://patient-lookup.clinic.example/mcp",
            "jwksConfigMapRef": {"name": "idp-jwks", "key": "jwks.json"}, "groupsClaim": "groups"});
        let mut store_value = store;
        store_value["metadata"]["generation"] = json!(4);
        let (client, verifier) = mock_client();
        let list = |items: Vec<serde_json::Value>| json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items});
        let server = verifier
            .expect(Method::GET, "/apis/mcpwarden.io/v1alpha1/namespaces/clinic/mcpservers", move |_| (StatusCode::OK, list(vec![server_value])))
            .expect(Method::GET, "/apis/mcpwarden.io/v1alpha1/namespaces/clinic/phistores", move |_| (StatusCode::OK, list(vec![store_value])))
            .expect(Method::GET, "/api/v1/namespaces/clinic/secrets/ehr-db-admin", |_| {
                (StatusCode::OK, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ehr-db-admin", "namespace": "clinic"},
                                        "data": {"username": "d2FyZGVu", "password": "c2VjcmV0"}}))
            })
            .expect(Method::GET, "/api/v1/namespaces/clinic/configmaps/idp-jwks", |_| {
                (StatusCode::OK, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "idp-jwks", "namespace": "clinic"},
                                        "data": {"jwks.json": crate::operator::fixtures::JWKS}}))
            })
            .run();
        let inventory = load_inventory(&client, Some("clinic")).await.unwrap();
        server.await.unwrap();
        let key = StoreRef { namespace: "clinic".into(), name: "ehr".into() };
        let store = inventory.stores[&key].as_ref().expect("store usable");
        assert_eq!((store.access.admin_user.as_str(), store.access.admin_password.as_str()), ("warden", "secret"));
        assert_eq!(inventory.generations[&key], Some(4));
        let server_key = ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() };
        assert!(inventory.servers[&server_key].is_ok(), "{:?}", inventory.servers[&server_key].as_ref().err());
        assert_eq!(inventory.groups()[&key].len(), 1);
    }

    #[tokio::test]
    async fn status_is_applied_under_the_brokers_field_manager_only_when_it_changes() {
        let (client, verifier) = mock_client();
        let path = "/apis/mcpwarden.io/v1alpha1/namespaces/clinic/phistores/ehr/status";
        let server = verifier
            .expect(Method::PATCH, path, |req| {
                assert!(req.query.contains("fieldManager=mcp-warden-broker"), "{}", req.query);
                assert!(req.query.contains("force=true"));
                assert_eq!(req.body["status"]["adminMissing"], json!(["CREATEROLE"]));
                (StatusCode::OK, json!({"apiVersion": API_VERSION, "kind": "PHIStore", "metadata": {"name": "ehr", "namespace": "clinic"},
                    "spec": {"postgres": {"host": "db", "database": "ehr", "adminSecretRef": {"name": "a"}}, "endpoints": {"ports": [5432]}}}))
            })
            .run();
        let writer = StatusWriter::new(client);
        let key = StoreRef { namespace: "clinic".into(), name: "ehr".into() };
        let status = PHIStoreStatus { admin_missing: vec!["CREATEROLE".into()], ..PHIStoreStatus::default() };
        let reports = BTreeMap::from([(key, status)]);
        assert_eq!(writer.write(&reports).await.unwrap(), 1);
        assert_eq!(writer.write(&reports).await.unwrap(), 0, "unchanged: nothing written");
        server.await.unwrap();
    }
}
