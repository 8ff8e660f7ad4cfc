//! Which fields of an object a field manager owns, read from the object's
//! `metadata.managedFields` (FieldsV1), and the first field of a desired
//! object that the manager no longer owns.
//!
//! ```text
//!   desired (what mcp-warden applies) ──┐
//!                                       ├─ first_unowned ─▶ None: every applied field is still ours
//!   live.managedFields[mcp-warden/Apply]┘                   Some(path): someone else changed or removed it
//! ```
//!
//! Why ownership and not values: the API server adds defaults, normalises
//! values and strips type metadata from list items, so comparing values
//! invents differences (the first real cluster saw a reconcile loop on
//! `apiVersion`). Ownership is exact: after a server-side apply the manager
//! owns every field of its applied configuration; an Update by anyone else
//! that changes one of them (`kubectl edit`, a merge patch) moves that field
//! to the editor, and a forced apply by another manager takes it. A field we
//! still own holds the value we applied.
//!
//! FieldsV1 keys: `f:<name>` a field, `k:<json>` an element of a list keyed
//! by the fields in the JSON object, `v:<json>` an element of a set, `.` the
//! element itself. A list whose node has no `k:`/`v:` children is atomic:
//! owning it owns every element.

use serde_json::{Map, Value};

/// The FieldsV1 of `manager`'s Apply entry on the main resource (not a
/// subresource such as `status`), if it has one. The caches keep it as its
/// JSON text (see `caches`); either form is read.
pub fn applied_fields(object: &Value, manager: &str) -> Option<Value> {
    object.pointer("/metadata/managedFields")?.as_array()?.iter().find_map(|entry| {
        let ours = entry.get("manager").and_then(Value::as_str) == Some(manager)
            && entry.get("operation").and_then(Value::as_str) == Some("Apply")
            && entry.get("subresource").and_then(Value::as_str).is_none_or(str::is_empty);
        match entry.get("fieldsV1") {
            Some(Value::String(text)) if ours => serde_json::from_str(text).ok(),
            Some(fields) if ours => Some(fields.clone()),
            _ => None,
        }
    })
}

/// The first field of `desired` (a whole object as applied) that `owned`
/// (a FieldsV1 tree) does not cover, as a readable path such as
/// `spec.template.spec.containers[name=mcp-server].image`, or None.
///
/// Identity and type metadata (`apiVersion`, `kind`, `metadata.name`,
/// `metadata.namespace`) are not fields anyone owns; `status` is not
/// applied with the object.
pub fn first_unowned(desired: &Value, owned: &Value) -> Option<String> {
    let desired = desired.as_object()?;
    for (key, value) in desired {
        match key.as_str() {
            "apiVersion" | "kind" | "status" => continue,
            "metadata" => {
                let Some(meta) = value.as_object() else { continue };
                let meta_owned = owned.get("f:metadata");
                for (mk, mv) in meta {
                    if matches!(mk.as_str(), "name" | "namespace" | "generateName") {
                        continue;
                    }
                    let path = format!("metadata.{mk}");
                    let Some(node) = meta_owned.and_then(|m| m.get(format!("f:{mk}"))) else {
                        return Some(first_leaf(mv, path));
                    };
                    if let Some(missing) = walk(mv, node, &path) {
                        return Some(missing);
                    }
                }
            }
            _ => {
                let Some(node) = owned.get(format!("f:{key}")) else { return Some(first_leaf(value, key.clone())) };
                if let Some(missing) = walk(value, node, key) {
                    return Some(missing);
                }
            }
        }
    }
    None
}

fn walk(desired: &Value, node: &Value, path: &str) -> Option<String> {
    // An empty node owns what is beneath it whole: a leaf, an atomic map
    // (a label selector) or an atomic list element (an owner reference).
    // Emptied parents are pruned by the server, so it never means "nothing".
    if node.as_object().is_some_and(Map::is_empty) {
        return None;
    }
    match desired {
        Value::Object(fields) => fields.iter().find_map(|(key, value)| {
            let child = format!("{path}.{key}");
            match node.get(format!("f:{key}")) {
                Some(sub) => walk(value, sub, &child),
                None => Some(first_leaf(value, child)),
            }
        }),
        Value::Array(items) => {
            let Some(children) = node.as_object() else { return Some(path.to_string()) };
            let keyed = children.keys().any(|k| k.starts_with("k:") || k.starts_with("v:"));
            if !keyed {
                // An atomic list: owned whole.
                return None;
            }
            items.iter().enumerate().find_map(|(i, item)| match element_node(children, item) {
                Some((label, sub)) => {
                    let child = format!("{path}[{label}]");
                    if item.is_object() { walk(item, sub, &child) } else { None }
                }
                None => Some(format!("{path}[{}]", describe(item, i))),
            })
        }
        // A scalar: owned when its node exists, which the caller checked.
        _ => None,
    }
}

/// The FieldsV1 child describing list element `item`, with a label for
/// paths (`name=mcp-server`).
fn element_node<'a>(children: &'a Map<String, Value>, item: &Value) -> Option<(String, &'a Value)> {
    children.iter().find_map(|(key, sub)| {
        if let Some(set_value) = key.strip_prefix("v:") {
            let value: Value = serde_json::from_str(set_value).ok()?;
            return (&value == item).then(|| (set_value.to_string(), sub));
        }
        let fields: Map<String, Value> = serde_json::from_str(key.strip_prefix("k:")?).ok()?;
        // A key field the desired element leaves out is one the server
        // defaulted (a port's protocol): it does not tell elements apart.
        let matches = fields.iter().all(|(f, v)| item.get(f).is_none_or(|mine| mine == v));
        let label = fields.iter().map(|(f, v)| format!("{f}={}", plain(v))).collect::<Vec<_>>().join(",");
        matches.then_some((label, sub))
    })
}

/// The path of the first leaf under `value` (an unowned map names the
/// field inside it that was taken, not just the map).
fn first_leaf(value: &Value, path: String) -> String {
    match value.as_object().and_then(|m| m.iter().next()) {
        Some((key, child)) => first_leaf(child, format!("{path}.{key}")),
        None => path,
    }
}

fn describe(item: &Value, index: usize) -> String {
    if let Value::String(s) = item {
        return s.clone();
    }
    for key in ["name", "mountPath", "uid", "type", "containerPort", "port"] {
        if let Some(v) = item.get(key) {
            return format!("{key}={}", plain(v));
        }
    }
    index.to_string()
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn recorded(file: &str) -> Value {
        let path = format!("{}/tests/k8s-recordings/{file}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("recording")).expect("json")
    }

    /// The Deployment as the operator applied it, and as a real API server
    /// stored it (with defaults, the controller's revision annotation and
    /// status): every applied field is the operator's.
    #[test]
    fn a_real_servers_answer_to_our_apply_leaves_every_applied_field_ours() {
        for kind in [
            "deployment-patient-lookup",
            "service-patient-lookup",
            "configmap-patient-lookup-policy",
            "configmap-patient-lookup-jwks",
            "networkpolicy-patient-lookup-ingress",
            "networkpolicy-patient-lookup-egress",
            "serviceaccount-patient-lookup-mcpw",
        ] {
            let desired = recorded(&format!("01-apply/ssa-{kind}.request.json"));
            let stored = recorded(&format!("01-apply/ssa-again-{kind}.response.json"));
            let owned = applied_fields(&stored, "mcp-warden").expect("our entry");
            assert_eq!(first_unowned(&desired, &owned), None, "{kind}");
        }
    }

    #[test]
    fn a_merge_patch_by_kubectl_edit_takes_the_fields_it_changed() {
        let desired = recorded("01-apply/ssa-configmap-patient-lookup-policy.request.json");
        let edited = recorded("05-errors/409-setup-merge-patch-by-kubectl-edit.response.json");
        let owned = applied_fields(&edited, "mcp-warden").expect("our entry");
        // Both taken fields are named by path; the first in key order is reported.
        assert_eq!(first_unowned(&desired, &owned).as_deref(), Some("data.policy.json"));
        let mut labels_only = desired.clone();
        labels_only.as_object_mut().map(|o| o.remove("data"));
        assert_eq!(first_unowned(&labels_only, &owned).as_deref(), Some("metadata.labels.app.kubernetes.io/name"));
    }

    #[test]
    fn a_forced_apply_by_someone_else_takes_the_replicas() {
        let desired = recorded("01-apply/ssa-deployment-patient-lookup.request.json");
        let taken = recorded("05-errors/409-setup-ssa-replicas-by-someone-else.response.json");
        let owned = applied_fields(&taken, "mcp-warden").expect("our entry");
        assert_eq!(first_unowned(&desired, &owned).as_deref(), Some("spec.replicas"));
        let back = recorded("05-errors/409-conflict-resolved-with-force.response.json");
        assert_eq!(first_unowned(&desired, &applied_fields(&back, "mcp-warden").expect("entry")), None);
    }

    #[test]
    fn keyed_lists_name_the_element_that_is_no_longer_ours() {
        let desired = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "y"}
        ]}});
        let owned = json!({"f:spec": {"f:containers": {
            "k:{\"name\":\"a\"}": {".": {}, "f:name": {}, "f:image": {},
                "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}}},
            "k:{\"name\":\"b\"}": {".": {}, "f:name": {}}
        }}});
        assert_eq!(first_unowned(&desired, &owned).as_deref(), Some("spec.containers[name=b].image"));
        let partly = json!({"f:spec": {"f:containers": {"k:{\"name\":\"a\"}": {".": {}, "f:name": {}}}}});
        assert_eq!(first_unowned(&desired, &partly).as_deref(), Some("spec.containers[name=a].image"));
        // An element node without children owns the element whole.
        let atomic = json!({"f:spec": {"f:containers": {"k:{\"name\":\"a\"}": {}, "k:{\"name\":\"b\"}": {}}}});
        assert_eq!(first_unowned(&desired, &atomic), None);
        let no_b = json!({"f:spec": {"f:containers": {"k:{\"name\":\"a\"}": {".": {}, "f:name": {}, "f:image": {}, "f:ports": {}}}}});
        assert_eq!(first_unowned(&desired, &no_b).as_deref(), Some("spec.containers[name=b]"));
    }

    #[test]
    fn atomic_lists_sets_and_identity() {
        let desired = json!({
            "apiVersion": "v1", "kind": "X",
            "metadata": {"name": "n", "namespace": "ns", "finalizers": ["a"], "labels": {"l": "1"}},
            "spec": {"args": ["--x", "1"], "empty": {}}
        });
        let owned = json!({
            "f:metadata": {"f:finalizers": {"v:\"a\"": {}}, "f:labels": {"f:l": {}}},
            "f:spec": {"f:args": {}, "f:empty": {}}
        });
        assert_eq!(first_unowned(&desired, &owned), None);
        let other_set = json!({"f:metadata": {"f:finalizers": {"v:\"b\"": {}}, "f:labels": {"f:l": {}}}, "f:spec": {"f:args": {}, "f:empty": {}}});
        assert_eq!(first_unowned(&desired, &other_set).as_deref(), Some("metadata.finalizers[a]"));
        assert_eq!(first_unowned(&desired, &json!({})).as_deref(), Some("metadata.finalizers"));
        let no_labels =
            json!({"f:metadata": {"f:finalizers": {"v:\"a\"": {}}}, "f:spec": {"f:args": {}, "f:empty": {}}});
        assert_eq!(first_unowned(&desired, &no_labels).as_deref(), Some("metadata.labels.l"));
    }

    #[test]
    fn only_the_managers_apply_entry_on_the_main_resource_counts() {
        let object = json!({"metadata": {"managedFields": [
            {"manager": "mcp-warden", "operation": "Apply", "subresource": "status", "fieldsV1": {"f:status": {}}},
            {"manager": "mcp-warden", "operation": "Update", "fieldsV1": {"f:x": {}}},
            {"manager": "other", "operation": "Apply", "fieldsV1": {"f:y": {}}},
            {"manager": "mcp-warden", "operation": "Apply", "fieldsV1": {"f:spec": {}}}
        ]}});
        assert_eq!(applied_fields(&object, "mcp-warden"), Some(json!({"f:spec": {}})));
        assert_eq!(applied_fields(&json!({"metadata": {}}), "mcp-warden"), None);
        // As the caches keep it: the entry's JSON text.
        let compact = json!({"metadata": {"managedFields": [
            {"manager": "mcp-warden", "operation": "Apply", "fieldsV1": "{\"f:spec\":{}}"}
        ]}});
        assert_eq!(applied_fields(&compact, "mcp-warden"), Some(json!({"f:spec": {}})));
    }
}
