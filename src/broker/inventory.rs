//! The broker's view of the world: MCPServers (their compiled policies and
//! key sources), PHIStores and their admin credentials, and from these the
//! group roles every store must hold.
//!
//! ```text
//!   MCPServer ─┐                       ┌─ servers: ServerRef → policy + JWKS source
//!   PHIStore ──┼─ Inventory::build() ──┼─ stores:  StoreRef  → connection + admin credential
//!   Secret ────┤   (pure)              └─ groups(): StoreRef → group role → (server, tool, grants)
//!   ConfigMap ─┘
//! ```
//!
//! The broker trusts nothing a sidecar says about grants: they come from
//! here. A broken object is kept as an error for that object alone, so one
//! bad manifest does not stop the others from being served.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;

use super::deid::WantedViews;
use super::grants::{self, Grant};
use super::naming::{self, NamingKey};
use super::store::StoreAccess;
use crate::api::{Deidentification, EmergencyAccess, MCPServer, Output, PHIStore};
use crate::breakglass::{self, ActiveGrant, Admission};
use crate::jwt::KeySource;
use crate::manifest;
use crate::policy::{self, CompiledPolicy, ServerRef, namespace_of};
use crate::render::JWKS_FILE;
use crate::render::names::OwnedNames;

/// Namespace and name of a PHIStore.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for StoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A server the broker can issue for.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    /// Its compiled policy.
    pub policy: CompiledPolicy,
    /// Where its issuer's keys are.
    pub keys: KeySource,
}

/// A store the broker can administer.
#[derive(Debug, Clone)]
pub struct StoreEntry {
    /// How to reach it as admin.
    pub access: StoreAccess,
    /// Keys login role names.
    pub naming: NamingKey,
    /// Whether to revoke PUBLIC's privileges.
    pub revoke_public: bool,
    /// How its columns cross to de-identified tools.
    pub deidentification: Option<Deidentification>,
}

/// One group role a store must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// The server.
    pub server: ServerRef,
    /// The tool.
    pub tool: String,
    /// Exactly what it holds.
    pub grants: BTreeSet<Grant>,
}

/// Everything the broker serves, each entry usable or the reason it is not.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// MCPServers.
    pub servers: BTreeMap<ServerRef, Result<ServerEntry, String>>,
    /// PHIStores.
    pub stores: BTreeMap<StoreRef, Result<StoreEntry, String>>,
    /// Each PHIStore's `metadata.generation` (for `status.observedGeneration`).
    pub generations: BTreeMap<StoreRef, Option<i64>>,
    /// Break-glass grants in force when this inventory was built, by
    /// server (each still checked against the clock when used).
    pub grants: BTreeMap<ServerRef, Vec<ActiveGrant>>,
}

/// The Secret key holding the admin role's name.
pub const ADMIN_USER_KEY: &str = "username";
/// The Secret key holding the admin role's password.
pub const ADMIN_PASSWORD_KEY: &str = "password";

impl Inventory {
    /// Reads a manifests directory (the laptop and test mode). Any invalid
    /// manifest refuses the whole set, with every reason. Grants are
    /// honoured only if the chart's admission policy (release `mcp-warden`)
    /// and its binding are among the manifests.
    pub fn from_manifests(dir: &Path) -> Result<Inventory, Vec<String>> {
        Inventory::from_manifests_with(dir, breakglass::DEFAULT_ADMISSION_POLICY)
    }

    /// [`Inventory::from_manifests`], requiring the admission policy named
    /// `admission_policy`, as it would be in force in a cluster.
    pub fn from_manifests_with(dir: &Path, admission_policy: &str) -> Result<Inventory, Vec<String>> {
        let (set, errors) = manifest::load_paths(&[dir.to_path_buf()]);
        if !errors.is_empty() {
            return Err(errors.iter().map(ToString::to_string).collect());
        }
        let servers: Vec<MCPServer> = set.servers.into_iter().map(|l| l.object).collect();
        let grants: Vec<EmergencyAccess> = set.emergency_grants.into_iter().map(|l| l.object).collect();
        let policies: Vec<_> = set.admission_policies.into_iter().map(|l| l.object).collect();
        let bindings: Vec<_> = set.admission_bindings.into_iter().map(|l| l.object).collect();
        let mut inventory = Inventory::build(
            servers.clone(),
            set.stores.into_iter().map(|l| l.object).collect(),
            &set.secrets.into_iter().map(|l| l.object).collect::<Vec<_>>(),
            &set.config_maps.into_iter().map(|l| l.object).collect::<Vec<_>>(),
        );
        inventory.admit_grants(&servers, &grants, &breakglass::admission_named(admission_policy, &policies, &bindings));
        Ok(inventory)
    }

    /// Keeps the grants in force now of the usable servers (pure but for
    /// the clock).
    pub fn admit_grants(&mut self, servers: &[MCPServer], grants: &[EmergencyAccess], admission: &Admission) {
        let now = breakglass::now();
        self.grants.clear();
        for server in servers {
            let key = ServerRef { namespace: namespace_of(server), name: server.name_any() };
            if !matches!(self.servers.get(&key), Some(Ok(_))) {
                continue;
            }
            let in_force = breakglass::in_force(server, grants, admission, now);
            if !in_force.is_empty() {
                self.grants.insert(key, in_force);
            }
        }
    }

    /// The grants of `server` in force now for `subject`.
    pub fn grants_of(&self, server: &ServerRef, subject: &str) -> Vec<ActiveGrant> {
        let now = breakglass::now();
        let grants = self.grants.get(server).map(Vec::as_slice).unwrap_or_default();
        grants.iter().filter(|g| g.beneficiary == subject && now < g.expires_at.0).cloned().collect()
    }

    /// The grant that opens `tool` of `server` to `subject` now, if any (a
    /// tool answering with identified PHI: only a grant allowing that).
    pub fn grant_for(&self, server: &ServerRef, subject: &str, tool: &str) -> Option<&ActiveGrant> {
        let now = breakglass::now();
        let Some(Ok(entry)) = self.servers.get(server) else { return None };
        self.grants.get(server)?.iter().find(|g| entry.policy.grant_opens(g, subject, tool) && now < g.expires_at.0)
    }

    /// Builds the inventory from objects (pure).
    pub fn build(
        servers: Vec<MCPServer>,
        stores: Vec<PHIStore>,
        secrets: &[Secret],
        config_maps: &[ConfigMap],
    ) -> Inventory {
        let mut inventory = Inventory::default();
        let mut by_namespace: BTreeMap<String, BTreeMap<String, PHIStore>> = BTreeMap::new();
        for store in stores {
            let key = StoreRef { namespace: namespace_of(&store), name: store.name_any() };
            inventory.stores.insert(key.clone(), store_entry(&store, &key, secrets, config_maps));
            inventory.generations.insert(key.clone(), store.metadata.generation);
            by_namespace.entry(key.namespace).or_default().insert(key.name, store);
        }
        let empty = BTreeMap::new();
        for server in servers {
            let key = ServerRef { namespace: namespace_of(&server), name: server.name_any() };
            let stores = by_namespace.get(&key.namespace).unwrap_or(&empty);
            // Deleting an MCPServer ends its access at once, not when the
            // operator's finalizer lets the object go.
            let entry = if server.metadata.deletion_timestamp.is_some() {
                Err("the MCPServer is being deleted".to_string())
            } else {
                policy::compile(&server, stores).map_err(|e| e.to_string()).and_then(|policy| {
                    Ok(ServerEntry { keys: key_source(&server, &key.namespace, secrets, config_maps)?, policy })
                })
            };
            inventory.servers.insert(key, entry);
        }
        inventory
    }

    /// The group roles each store must hold, from every usable server.
    /// Tools that name nobody get none.
    pub fn groups(&self) -> BTreeMap<StoreRef, BTreeMap<String, GroupSpec>> {
        let mut out: BTreeMap<StoreRef, BTreeMap<String, GroupSpec>> = BTreeMap::new();
        for (server, entry) in &self.servers {
            let Ok(entry) = entry else { continue };
            for (tool_name, tool) in &entry.policy.tools {
                if tool.callers.is_empty() {
                    continue;
                }
                for (store, tables) in &tool.data_access {
                    let Ok(wanted) = grants::desired(tables) else { continue };
                    let key = StoreRef { namespace: server.namespace.clone(), name: store.clone() };
                    out.entry(key).or_default().insert(
                        naming::group_role(server, store, tool_name),
                        GroupSpec { server: server.clone(), tool: tool_name.clone(), grants: wanted },
                    );
                }
            }
        }
        out
    }

    /// Every use of a classified store by a de-identified tool that names
    /// someone: (its store, the store's classification, the server's
    /// pseudonym scope, the tool's grants on the scope's views).
    pub fn deidentified_uses(
        &self,
    ) -> impl Iterator<Item = (StoreRef, &Deidentification, &String, &[crate::policy::CompiledTableGrant])> {
        self.servers.iter().filter_map(|(server, entry)| entry.as_ref().ok().map(|e| (server, e))).flat_map(
            move |(server, entry)| {
                let scope = &entry.policy.pseudonym_scope;
                entry
                    .policy
                    .tools
                    .values()
                    .filter(|tool| tool.output == Output::Deidentified && !tool.callers.is_empty())
                    .flat_map(|tool| tool.data_access.iter())
                    .filter_map(move |(store, grants)| {
                        let key = StoreRef { namespace: server.namespace.clone(), name: store.clone() };
                        let deid = self.stores.get(&key)?.as_ref().ok()?.deidentification.as_ref()?;
                        Some((key, deid, scope, grants.as_slice()))
                    })
            },
        )
    }

    /// The de-identified views each store must serve: per scope, the
    /// classified tables behind the views its tools are granted.
    pub fn views(&self) -> BTreeMap<StoreRef, WantedViews> {
        use crate::deid::classification::relname;
        let mut out: BTreeMap<StoreRef, WantedViews> = BTreeMap::new();
        for (key, deid, scope, grants) in self.deidentified_uses() {
            let tables = out.entry(key).or_default().entry(scope.clone()).or_default();
            for grant in grants.iter().filter(|g| relname(&g.table) != crate::deid::views::ALIASES) {
                if let Some(t) = deid.tables.iter().find(|t| relname(&t.name) == relname(&grant.table)) {
                    tables.insert(t.name.clone());
                }
            }
        }
        out
    }
}

fn store_entry(
    store: &PHIStore,
    key: &StoreRef,
    secrets: &[Secret],
    config_maps: &[ConfigMap],
) -> Result<StoreEntry, String> {
    let pg = &store.spec.postgres;
    let secret_name = &pg.admin_secret_ref.name;
    let secret = find(secrets, &key.namespace, secret_name).ok_or_else(|| {
        format!("PHIStore {key}: admin Secret {secret_name:?} not found in namespace {}", key.namespace)
    })?;
    let user = secret_value(secret, ADMIN_USER_KEY)
        .ok_or_else(|| format!("PHIStore {key}: admin Secret {secret_name:?} has no {ADMIN_USER_KEY:?} key"))?;
    let password = secret_value(secret, ADMIN_PASSWORD_KEY)
        .ok_or_else(|| format!("PHIStore {key}: admin Secret {secret_name:?} has no {ADMIN_PASSWORD_KEY:?} key"))?;
    let port = u16::try_from(pg.port).map_err(|_| format!("PHIStore {key}: port {} out of range", pg.port))?;
    let ca_pem = pg
        .ca_config_map_ref
        .as_ref()
        .map(|r| {
            config_map_value(config_maps, &key.namespace, &r.name, &r.key)
                .map_err(|e| format!("PHIStore {key}: CA {e}"))
        })
        .transpose()?;
    Ok(StoreEntry {
        naming: NamingKey::derive(&user, &password),
        access: StoreAccess {
            store: policy::CompiledStore {
                host: pg.host.clone(),
                port,
                database: pg.database.clone(),
                ssl_mode: pg.ssl_mode,
            },
            admin_user: user,
            admin_password: password,
            ca_pem,
        },
        revoke_public: pg.revoke_public_privileges,
        deidentification: store.spec.deidentification.clone(),
    })
}

fn key_source(
    server: &MCPServer,
    namespace: &str,
    secrets: &[Secret],
    config_maps: &[ConfigMap],
) -> Result<KeySource, String> {
    let oidc = &server.spec.authentication.oidc;
    if let Some(uri) = &oidc.jwks_uri {
        // The operator's validated copy (the sidecar mounts the same), so
        // the broker needs no egress to the identity provider; without it
        // (a laptop), the URI itself.
        let copy = OwnedNames::for_server(&server.name_any()).jwks_config_map;
        return Ok(match config_map_value(config_maps, namespace, &copy, JWKS_FILE) {
            Ok(text) => KeySource::Inline { origin: format!("ConfigMap {namespace}/{copy}"), text },
            Err(_) => KeySource::Url(uri.clone()),
        });
    }
    if let Some(r) = &oidc.jwks_config_map_ref {
        let text = config_map_value(config_maps, namespace, &r.name, &r.key).map_err(|e| format!("JWKS {e}"))?;
        return Ok(KeySource::Inline { origin: format!("ConfigMap {namespace}/{}", r.name), text });
    }
    if let Some(r) = &oidc.jwks_secret_ref {
        let secret = find(secrets, namespace, &r.name)
            .ok_or_else(|| format!("JWKS Secret {:?} not found in namespace {namespace}", r.name))?;
        let text =
            secret_value(secret, &r.key).ok_or_else(|| format!("JWKS Secret {:?} has no key {:?}", r.name, r.key))?;
        return Ok(KeySource::Inline { origin: format!("Secret {namespace}/{}", r.name), text });
    }
    Err("authentication.oidc names no JWKS source".into())
}

/// A ConfigMap's value; the error names the map and key.
fn config_map_value(maps: &[ConfigMap], namespace: &str, name: &str, key: &str) -> Result<String, String> {
    let map =
        find(maps, namespace, name).ok_or_else(|| format!("ConfigMap {name:?} not found in namespace {namespace}"))?;
    map.data.as_ref().and_then(|d| d.get(key)).cloned().ok_or_else(|| format!("ConfigMap {name:?} has no key {key:?}"))
}

fn find<'a, K: ResourceExt>(objects: &'a [K], namespace: &str, name: &str) -> Option<&'a K> {
    objects.iter().find(|o| o.name_any() == name && namespace_of(*o) == namespace)
}

/// A Secret value from `data` (base64, as the API serves it) or, in a
/// manifest, `stringData`.
fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(value) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(value.clone());
    }
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::clinic_values;

    fn objects() -> (MCPServer, PHIStore) {
        let (store, server) = clinic_values();
        (serde_json::from_value(server).unwrap(), serde_json::from_value(store).unwrap())
    }

    fn admin_secret(data: serde_json::Value) -> Secret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ehr-db-admin", "namespace": "clinic"}, "stringData": data}))
        .unwrap()
    }

    fn store_key() -> StoreRef {
        StoreRef { namespace: "clinic".into(), name: "ehr".into() }
    }

    #[test]
    fn a_usable_store_and_server_give_one_group_per_tool_with_data_access() {
        let (server, store) = objects();
        let secret = admin_secret(serde_json::json!({"username": "warden", "password": "pw"}));
        let inventory = Inventory::build(vec![server], vec![store], &[secret], &[]);
        let entry = inventory.stores[&store_key()].as_ref().unwrap();
        assert_eq!(entry.access.admin_user, "warden");
        let groups = inventory.groups();
        // lookup_patient reads the store; clinic_hours declares no data access.
        assert_eq!(groups[&store_key()].len(), 1);
        let spec = groups[&store_key()].values().next().unwrap();
        assert_eq!(spec.tool, "lookup_patient");
        assert!(spec.grants.contains(&Grant::Database("CONNECT".into())));
    }

    #[test]
    fn missing_secrets_and_keys_are_named_per_store_without_values() {
        let (server, store) = objects();
        let inventory = Inventory::build(vec![server.clone()], vec![store.clone()], &[], &[]);
        let err = inventory.stores[&store_key()].as_ref().unwrap_err();
        assert!(err.contains("admin Secret \"ehr-db-admin\" not found"), "{err}");
        let secret = admin_secret(serde_json::json!({"username": "warden", "pass": "hunter2"}));
        let inventory = Inventory::build(vec![server], vec![store], &[secret], &[]);
        let err = inventory.stores[&store_key()].as_ref().unwrap_err();
        assert!(err.contains("no \"password\" key") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_server_whose_store_is_missing_is_unusable_and_wants_no_group() {
        let (server, _) = objects();
        let inventory = Inventory::build(vec![server], vec![], &[], &[]);
        let key = ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() };
        assert!(inventory.servers[&key].as_ref().unwrap_err().contains("ehr"));
        assert!(inventory.groups().is_empty());
    }

    #[test]
    fn a_server_being_deleted_is_unusable_and_wants_no_group() {
        let (mut server, store) = objects();
        let secret = admin_secret(serde_json::json!({"username": "warden", "password": "pw"}));
        server.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let inventory = Inventory::build(vec![server], vec![store], &[secret], &[]);
        let key = ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() };
        assert!(inventory.servers[&key].as_ref().unwrap_err().contains("being deleted"));
        assert!(inventory.groups().is_empty(), "its group roles, and so its leases, end");
    }

    #[test]
    fn a_jwks_uri_is_read_from_the_operators_copy_when_there_is_one() {
        let (server, store) = objects();
        let key = ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() };
        let inventory = Inventory::build(vec![server.clone()], vec![store.clone()], &[], &[]);
        assert!(
            matches!(&inventory.servers[&key].as_ref().unwrap().keys, KeySource::Url(u) if u.starts_with("https://"))
        );
        let copy: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "patient-lookup-jwks", "namespace": "clinic"}, "data": {"jwks.json": "{\"keys\":[]}"}}))
        .unwrap();
        let inventory = Inventory::build(vec![server], vec![store], &[], &[copy]);
        assert!(matches!(
            &inventory.servers[&key].as_ref().unwrap().keys,
            KeySource::Inline { origin, .. } if origin == "ConfigMap clinic/patient-lookup-jwks"
        ));
    }

    #[test]
    fn a_named_jwks_config_map_must_exist() {
        let (mut server, store) = objects();
        server.spec.authentication.oidc.jwks_uri = None;
        server.spec.authentication.oidc.jwks_config_map_ref =
            Some(crate::api::KeyRef { name: "idp-jwks".into(), key: "jwks.json".into() });
        let inventory = Inventory::build(vec![server], vec![store], &[], &[]);
        let key = ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() };
        let err = inventory.servers[&key].as_ref().unwrap_err();
        assert!(err.contains("JWKS ConfigMap \"idp-jwks\" not found"), "{err}");
    }
}
