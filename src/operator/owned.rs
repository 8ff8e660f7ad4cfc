//! The objects an MCPServer owns, as the cluster holds them, and the
//! decision for each desired object: create, leave, update, or restore
//! after a hand edit.
//!
//! ```text
//!   desired (render) ─┐                          ┌─ Create      (absent)
//!                     ├─ plan_object(desired, ─▶ ├─ Unchanged   (every desired field holds: no write)
//!   existing (list) ──┘        existing)         ├─ Update      (the spec changed)
//!                                                └─ Drift(path) (same spec, a field was edited by hand)
//! ```
//!
//! Every applied object carries `mcpwarden.io/desired-hash`, the hash of
//! what the warden applied; a non-conforming object whose hash still
//! matches was edited by someone else.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject};
use serde_json::Value;
use sha2::{Digest, Sha256};

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
pub fn plan_object(desired: &Value, existing: Option<&Value>) -> Plan {
    let Some(existing) = existing else { return Plan::Create };
    match first_difference(desired, existing, "") {
        None => Plan::Unchanged,
        Some(path) if desired_hash(existing) == desired_hash(desired) => Plan::Drift(path),
        Some(_) => Plan::Update,
    }
}

/// The first path where `actual` does not hold what `desired` says, or
/// None. Fields the API server adds (defaults, status, metadata it manages)
/// are ignored; an empty or zero desired value matches an absent one, as
/// the API server omits those.
pub fn first_difference(desired: &Value, actual: &Value, path: &str) -> Option<String> {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().find_map(|(key, dv)| {
            let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            match a.get(key) {
                Some(av) => first_difference(dv, av, &child),
                None if is_empty(dv) => None,
                None => Some(child),
            }
        }),
        (Value::Array(d), Value::Array(a)) => {
            if d.len() != a.len() {
                return Some(path.to_string());
            }
            d.iter().zip(a).enumerate().find_map(|(i, (dv, av))| first_difference(dv, av, &format!("{path}[{i}]")))
        }
        (d, a) if d == a => None,
        (d, Value::Null) if is_empty(d) => None,
        _ => Some(path.to_string()),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
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
pub fn is_owned_by(object: &DynamicObject, uid: &str) -> bool {
    object.metadata.owner_references.iter().flatten().any(|r| r.uid == uid && r.controller == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desired() -> Value {
        with_desired_hash(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "n", "labels": {"a": "b"}},
            "spec": {"ports": [{"name": "mcp", "port": 8443}], "selector": {"a": "b"}, "type": "ClusterIP"}
        }))
    }

    #[test]
    fn server_defaults_and_managed_metadata_are_not_differences() {
        let mut existing = desired();
        existing["metadata"]["uid"] = json!("u");
        existing["metadata"]["resourceVersion"] = json!("7");
        existing["spec"]["ports"][0]["protocol"] = json!("TCP");
        existing["spec"]["clusterIP"] = json!("10.0.0.1");
        existing["status"] = json!({"loadBalancer": {}});
        assert_eq!(plan_object(&desired(), Some(&existing)), Plan::Unchanged);
    }

    #[test]
    fn empty_desired_values_match_omitted_ones() {
        let d = json!({"spec": {"ingress": [], "flag": false, "n": 0, "emptyDir": {}}});
        assert_eq!(first_difference(&d, &json!({"spec": {"emptyDir": {}}}), ""), None);
    }

    #[test]
    fn a_hand_edit_is_drift_and_a_new_spec_is_an_update() {
        assert_eq!(plan_object(&desired(), None), Plan::Create);
        let mut edited = desired();
        edited["spec"]["ports"][0]["port"] = json!(80);
        assert_eq!(plan_object(&desired(), Some(&edited)), Plan::Drift("spec.ports[0].port".into()));
        let mut extra_port = desired();
        extra_port["spec"]["ports"].as_array_mut().expect("ports").push(json!({"port": 22}));
        assert_eq!(plan_object(&desired(), Some(&extra_port)), Plan::Drift("spec.ports".into()));
        let mut older = edited.clone();
        older["metadata"]["annotations"][DESIRED_HASH_ANNOTATION] = json!("an-older-hash");
        assert_eq!(plan_object(&desired(), Some(&older)), Plan::Update);
        let mut label_removed = desired();
        label_removed["metadata"]["labels"] = json!({});
        assert_eq!(plan_object(&desired(), Some(&label_removed)), Plan::Drift("metadata.labels.a".into()));
    }

    #[test]
    fn the_hash_is_stable_and_follows_the_object() {
        assert_eq!(desired(), desired());
        let mut other = desired();
        other["spec"]["type"] = json!("NodePort");
        assert_ne!(desired_hash(&with_desired_hash(other)), desired_hash(&desired()));
    }
}
