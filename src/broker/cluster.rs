//! The broker in a cluster: who a sidecar is (TokenReview of its projected
//! service-account token), what the broker serves (MCPServers, PHIStores and
//! the Secrets and ConfigMaps they name, read from the API), and the
//! PHIStore status it reports.
//!
//! ```text
//!   sidecar token (audience mcp-warden-broker) ─ TokenReview ─▶ system:serviceaccount:<ns>:<server>-mcpw ─▶ <ns>/<server>
//!   list MCPServers, PHIStores; get each Secret / ConfigMap they name ─▶ Inventory::build
//!   list EmergencyAccesses; get the break-glass admission policy + binding ─▶ grants in force
//!   store report ─ server-side apply, field manager mcp-warden-broker ─▶ PHIStore status (only when changed)
//! ```
//!
//! A sidecar may ask only for the server its service account belongs to;
//! the broker still verifies the caller's token and the policy itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::inventory::{Inventory, StoreRef};
use crate::api::{API_VERSION, EmergencyAccess, MCPServer, PHIStore, PHIStoreStatus};
use crate::policy::namespace_of;
pub use crate::token_review::{BROKER_AUDIENCE, ReviewError, TokenReviewer, server_of_service_account};

/// Field manager of the PHIStore status the broker writes.
pub const STATUS_MANAGER: &str = "mcp-warden-broker";

/// Reads the inventory from the API: every MCPServer and PHIStore (of one
/// namespace, or all), each Secret and ConfigMap they name, and the
/// break-glass grants with the admission policy `admission_policy` (and
/// its binding) they need in force.
pub async fn load_inventory(
    client: &Client,
    namespace: Option<&str>,
    admission_policy: &str,
) -> Result<Inventory, kube::Error> {
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
    let grants: Vec<EmergencyAccess> =
        scoped::<EmergencyAccess>(client, namespace).list(&ListParams::default()).await?.items;
    let policy = Api::<ValidatingAdmissionPolicy>::all(client.clone()).get_opt(admission_policy).await?;
    let binding = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone()).get_opt(admission_policy).await?;
    let admission = crate::breakglass::admission(admission_policy, policy.as_ref(), binding.as_ref());
    let mut inventory = Inventory::build(servers.clone(), stores, &secrets, &maps);
    inventory.admit_grants(&servers, &grants, &admission);
    Ok(inventory)
}

/// An Api for namespaced kind `K` in one namespace, or all.
pub(super) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
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
    use crate::policy::ServerRef;

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
            .expect(Method::GET, "/apis/mcpwarden.io/v1alpha1/namespaces/clinic/emergencyaccesses", move |_| (StatusCode::OK, list(vec![])))
            .expect(Method::GET, "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/mcp-warden-emergency-access", |_| (StatusCode::NOT_FOUND, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})))
            .expect(Method::GET, "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings/mcp-warden-emergency-access", |_| (StatusCode::NOT_FOUND, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})))
            .run();
        let inventory = load_inventory(&client, Some("clinic"), "mcp-warden-emergency-access").await.unwrap();
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
