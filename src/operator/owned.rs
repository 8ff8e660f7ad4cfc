//! The objects an MCPServer owns, as the cluster holds them, and the
//! decision for each desired object: create, leave, update, or restore
//! after a hand edit.
//!
//! ```text
//!   desired (render) ─┐                          ┌─ Create      (absent)
//!                     ├─ plan_object(desired, ─▶ ├─ Unchanged   (same desired hash, every applied field still ours: no write)
//!   live (cache) ─────┘        live)             ├─ Update      (the desired object changed)
//!                                                └─ Drift(path) (same desired object, a field taken by an edit)
//! ```
//!
//! Every applied object carries `mcpwarden.io/desired-hash`, the hash of
//! what the warden applied. Whether the live object still holds it is read
//! from field ownership (`managed_fields`), never by comparing values: the
//! server's defaults, normalisations and stripped type metadata are not
//! differences.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ApiResource;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::managed_fields::{applied_fields, first_unowned};
use crate::render::names::MANAGER;

/// Annotation with the hash of the object as the warden last applied it.
pub const DESIRED_HASH_ANNOTATION: &str = "mcpwarden.io/desired-hash";

/// The kinds an MCPServer owns, in apply order.
pub fn owned_kinds() -> [ApiResource; 5] {
    [
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<Deployment>(&()),
    ]
}

/// Where a kind comes when a server's objects are deleted: the workload
/// first, the NetworkPolicies that isolate its pods last.
pub fn deletion_rank(kind: &str) -> u8 {
    match kind {
        "Deployment" => 0,
        "Service" => 1,
        "ConfigMap" => 2,
        "ServiceAccount" => 3,
        "NetworkPolicy" => 4,
        _ => 5,
    }
}

/// What to do with one desired object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// It does not exist.
    Create,
    /// It holds every desired field: nothing to write.
    Unchanged,
    /// The desired object changed since it was applied.
    Update,
    /// Same desired object, but the field at this path was changed outside
    /// the warden.
    Drift(String),
}

/// Adds the desired-hash annotation to a rendered object.
pub fn with_desired_hash(mut desired: Value) -> Value {
    if let Some(map) = desired.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
        map.remove(DESIRED_HASH_ANNOTATION);
    }
    let hash = hex::encode(Sha256::digest(serde_json::to_vec(&desired).unwrap_or_default()));
    if let Some(meta) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| Value::Object(Default::default()));
        if let Some(map) = annotations.as_object_mut() {
            map.insert(DESIRED_HASH_ANNOTATION.into(), Value::String(hash));
        }
    }
    desired
}

fn desired_hash(object: &Value) -> Option<&str> {
    object.pointer("/metadata/annotations")?.get(DESIRED_HASH_ANNOTATION)?.as_str()
}

/// Decides what to do with `desired` (already carrying its hash) given the
/// object the cluster holds.
pub fn plan_object(desired: &Value, live: Option<&Value>) -> Plan {
    let Some(live) = live else { return Plan::Create };
    if desired_hash(live) != desired_hash(desired) {
        return Plan::Update;
    }
    match applied_fields(live, MANAGER) {
        // Same hash, yet no apply of ours on record: its field ownership
        // was wiped, which only someone else can do.
        None => Plan::Drift("metadata.managedFields".into()),
        Some(owned) => first_unowned(desired, &owned).map_or(Plan::Unchanged, Plan::Drift),
    }
}

/// The (kind, name) key of a JSON object.
pub fn key_of(value: &Value) -> (String, String) {
    (
        value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string(),
        value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string(),
    )
}

/// Whether an object is owned (controller reference) by the object `uid`.
pub fn is_owned_by(object: &Value, uid: &str) -> bool {
    object.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|owners| {
        owners.iter().any(|r| r["uid"].as_str() == Some(uid) && r["controller"].as_bool() == Some(true))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn recorded(file: &str) -> Value {
        let path = format!("{}/tests/k8s-recordings/{file}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("recording")).expect("json")
    }

    /// The Deployment the operator applied, and the object a real API server
    /// stored: defaults, `deployment.kubernetes.io/revision`, status, and
    /// (in a LIST) no apiVersion/kind.
    fn applied_and_stored() -> (Value, Value) {
        let desired = recorded("01-apply/ssa-deployment-patient-lookup.request.json");
        let mut stored = recorded("01-apply/ssa-again-deployment-patient-lookup.response.json");
        let listed = stored.as_object_mut().expect("object");
        listed.remove("apiVersion");
        listed.remove("kind");
        (desired, stored)
    }

    #[test]
    fn server_defaults_type_metadata_and_status_are_not_differences() {
        let (desired, stored) = applied_and_stored();
        assert_eq!(plan_object(&desired, Some(&stored)), Plan::Unchanged);
    }

    #[test]
    fn an_edit_by_another_manager_is_drift_and_a_new_hash_is_an_update() {
        let (desired, _) = applied_and_stored();
        assert_eq!(plan_object(&desired, None), Plan::Create);
        let taken = recorded("05-errors/409-setup-ssa-replicas-by-someone-else.response.json");
        assert_eq!(plan_object(&desired, Some(&taken)), Plan::Drift("spec.replicas".into()));
        let mut changed = desired.clone();
        changed["metadata"]["annotations"][DESIRED_HASH_ANNOTATION] = json!("another-spec");
        assert_eq!(plan_object(&changed, Some(&taken)), Plan::Update);
        let mut wiped = taken.clone();
        wiped["metadata"]["managedFields"] = json!([]);
        assert_eq!(plan_object(&desired, Some(&wiped)), Plan::Drift("metadata.managedFields".into()));
    }

    #[test]
    fn the_hash_is_stable_and_follows_the_object() {
        let object =
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"type": "ClusterIP"}});
        assert_eq!(with_desired_hash(object.clone()), with_desired_hash(object.clone()));
        let mut other = object.clone();
        other["spec"]["type"] = json!("NodePort");
        assert_ne!(desired_hash(&with_desired_hash(other)), desired_hash(&with_desired_hash(object)));
    }
}
