//! Field sets in the API server's FieldsV1 shape, and server-side apply
//! built on them: which fields an applied configuration holds, the merge of
//! a configuration into a live object, and ownership moving on updates.
//!
//! The list and map types of the kinds this operator touches are listed in
//! [`list_kind`] and [`atomic_map`] (what structured-merge-diff reads from
//! the schemas); the recordings in `tests/k8s-recordings/01-apply` show
//! them (`f:selector: {}`, `k:{"port":8443,"protocol":"TCP"}`, …).

use serde_json::{Map, Value, json};

/// A FieldsV1 tree.
pub type FieldSet = Map<String, Value>;

/// One step of a path into an object.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    /// A field of a map.
    F(String),
    /// The element of a keyed list with these key fields.
    K(Map<String, Value>),
    /// The element of a set with this value.
    V(Value),
}

/// A path into an object.
pub type Path = Vec<Seg>;

/// How a list is merged.
#[derive(Debug, Clone, PartialEq)]
pub enum ListKind {
    /// Replaced whole; owned whole.
    Atomic,
    /// A set of scalars.
    Set,
    /// Elements keyed by these fields; `atomic_elements`: each element is
    /// owned whole (owner references).
    Keyed { keys: Vec<&'static str>, atomic_elements: bool },
}

/// The list type of field `name` holding `items`.
pub fn list_kind(name: &str, items: &[Value]) -> ListKind {
    let keyed = |keys: Vec<&'static str>| ListKind::Keyed { keys, atomic_elements: false };
    match name {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "tools"
        | "tables"
        | "prompts" => keyed(vec!["name"]),
        "volumeMounts" => keyed(vec!["mountPath"]),
        "ports" if items.iter().any(|p| p.get("containerPort").is_some()) => keyed(vec!["containerPort", "protocol"]),
        "ports" if items.iter().all(|p| p.get("port").is_some() && p.get("to").is_none()) && !items.is_empty() => {
            keyed(vec!["port", "protocol"])
        }
        "ownerReferences" => ListKind::Keyed { keys: vec!["uid"], atomic_elements: true },
        "conditions" => keyed(vec!["type"]),
        "controls" => keyed(vec!["id"]),
        "dataAccess" => keyed(vec!["store"]),
        "finalizers" => ListKind::Set,
        // Lists of scalars in the custom resources are sets (x-kubernetes-list-type: set).
        "columns" | "groups" | "subjects" | "requiredScopes" | "privileges" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// Whether the map in field `name` is owned whole.
pub fn atomic_map(name: &str) -> bool {
    matches!(name, "selector" | "podSelector" | "namespaceSelector" | "fieldRef" | "configMapKeyRef" | "secretKeyRef")
}

fn key_of(item: &Value, keys: &[&str]) -> Map<String, Value> {
    keys.iter()
        .filter_map(|k| match item.get(*k) {
            Some(v) => Some((k.to_string(), v.clone())),
            // The one defaulted key field: a port's protocol.
            None if *k == "protocol" => Some((k.to_string(), json!("TCP"))),
            None => None,
        })
        .collect()
}

fn matches_key(item: &Value, key: &Map<String, Value>) -> bool {
    key.iter().all(|(k, v)| item.get(k).map_or(k == "protocol" && v == "TCP", |mine| mine == v))
}

/// The fields an applied configuration (a whole object) holds.
pub fn set_of_object(object: &Value) -> FieldSet {
    let mut set = FieldSet::new();
    let Some(fields) = object.as_object() else { return set };
    for (key, value) in fields {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                let mut meta = FieldSet::new();
                for (mk, mv) in value.as_object().into_iter().flatten() {
                    if matches!(
                        mk.as_str(),
                        "name"
                            | "namespace"
                            | "uid"
                            | "resourceVersion"
                            | "generation"
                            | "creationTimestamp"
                            | "managedFields"
                            | "deletionTimestamp"
                            | "deletionGracePeriodSeconds"
                            | "selfLink"
                            | "generateName"
                    ) {
                        continue;
                    }
                    meta.insert(format!("f:{mk}"), node_of(mk, mv, false));
                }
                if !meta.is_empty() {
                    set.insert("f:metadata".into(), Value::Object(meta));
                }
            }
            _ => {
                set.insert(format!("f:{key}"), node_of(key, value, false));
            }
        }
    }
    set
}

fn node_of(name: &str, value: &Value, element: bool) -> Value {
    match value {
        Value::Object(fields) if !atomic_map(name) => {
            let mut node = FieldSet::new();
            if element {
                node.insert(".".into(), json!({}));
            }
            for (k, v) in fields {
                node.insert(format!("f:{k}"), node_of(k, v, false));
            }
            Value::Object(node)
        }
        Value::Array(items) => match list_kind(name, items) {
            ListKind::Atomic => json!({}),
            ListKind::Set => Value::Object(items.iter().map(|i| (format!("v:{i}"), json!({}))).collect()),
            ListKind::Keyed { keys, atomic_elements } => Value::Object(
                items
                    .iter()
                    .map(|item| {
                        let key = format!("k:{}", Value::Object(key_of(item, &keys)));
                        let node = if atomic_elements { json!({}) } else { node_of("", item, true) };
                        (key, node)
                    })
                    .collect(),
            ),
        },
        _ => json!({}),
    }
}

/// The leaf paths of a field set (an element's `.` counts as the element).
pub fn leaves(set: &FieldSet) -> Vec<Path> {
    let mut out = Vec::new();
    collect_leaves(set, &mut Vec::new(), &mut out);
    out
}

fn collect_leaves(node: &FieldSet, prefix: &mut Path, out: &mut Vec<Path>) {
    if node.is_empty() || (node.len() == 1 && node.contains_key(".")) {
        out.push(prefix.clone());
        return;
    }
    for (key, child) in node {
        if key == "." {
            out.push(prefix.clone());
            continue;
        }
        let Some(seg) = parse_seg(key) else { continue };
        prefix.push(seg);
        collect_leaves(child.as_object().unwrap_or(&FieldSet::new()), prefix, out);
        prefix.pop();
    }
}

fn parse_seg(key: &str) -> Option<Seg> {
    if let Some(f) = key.strip_prefix("f:") {
        return Some(Seg::F(f.to_string()));
    }
    if let Some(k) = key.strip_prefix("k:") {
        return serde_json::from_str(k).ok().map(Seg::K);
    }
    if let Some(v) = key.strip_prefix("v:") {
        return serde_json::from_str(v).ok().map(Seg::V);
    }
    None
}

fn seg_key(seg: &Seg) -> String {
    match seg {
        Seg::F(f) => format!("f:{f}"),
        Seg::K(k) => format!("k:{}", Value::Object(k.clone())),
        Seg::V(v) => format!("v:{v}"),
    }
}

/// Whether `set` holds `path` (or something above it owned whole).
pub fn contains(set: &FieldSet, path: &[Seg]) -> bool {
    let mut node = set;
    for seg in path {
        if node.is_empty() {
            return true;
        }
        match node.get(&seg_key(seg)).and_then(Value::as_object) {
            Some(child) => node = child,
            None => return false,
        }
    }
    true
}

/// Adds `path` to `set`.
pub fn insert(set: &mut FieldSet, path: &[Seg]) {
    let Some((first, rest)) = path.split_first() else { return };
    let key = seg_key(first);
    let child = set.entry(key).or_insert_with(|| json!({}));
    if let Some(map) = child.as_object_mut() {
        if !rest.is_empty() && matches!(first, Seg::K(_)) && !map.contains_key(".") {
            map.insert(".".into(), json!({}));
        }
        insert(map, rest);
    }
}

/// Removes `path` (and what is beneath it) from `set`, pruning emptied
/// parents.
pub fn remove(set: &mut FieldSet, path: &[Seg]) {
    let Some((first, rest)) = path.split_first() else {
        set.clear();
        return;
    };
    let key = seg_key(first);
    if rest.is_empty() {
        set.remove(&key);
        return;
    }
    let emptied = match set.get_mut(&key).and_then(Value::as_object_mut) {
        Some(child) if !child.is_empty() => {
            remove(child, rest);
            child.is_empty() || (child.len() == 1 && child.contains_key("."))
        }
        _ => false,
    };
    if emptied {
        set.remove(&key);
    }
}

/// The value at `path` in `object`.
pub fn get<'a>(object: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut at = object;
    for seg in path {
        at = match seg {
            Seg::F(f) => at.get(f)?,
            Seg::K(k) => at.as_array()?.iter().find(|i| matches_key(i, k))?,
            Seg::V(v) => at.as_array()?.iter().find(|i| *i == v)?,
        };
    }
    Some(at)
}

/// Removes the value at `path` from `object`.
pub fn remove_value(object: &mut Value, path: &[Seg]) {
    let Some((last, parent)) = path.split_last() else { return };
    let mut at = object;
    for seg in parent {
        let next = match seg {
            Seg::F(f) => at.get_mut(f),
            Seg::K(k) => at.as_array_mut().and_then(|a| a.iter_mut().find(|i| matches_key(i, k))),
            Seg::V(v) => at.as_array_mut().and_then(|a| a.iter_mut().find(|i| *i == v)),
        };
        match next {
            Some(n) => at = n,
            None => return,
        }
    }
    match last {
        Seg::F(f) => {
            at.as_object_mut().map(|m| m.remove(f));
        }
        Seg::K(k) => {
            if let Some(a) = at.as_array_mut() {
                a.retain(|i| !matches_key(i, k));
            }
        }
        Seg::V(v) => {
            if let Some(a) = at.as_array_mut() {
                a.retain(|i| i != v);
            }
        }
    }
}

/// Merges an applied `config` into `live`: maps field by field, keyed lists
/// element by element, atomic lists and scalars replaced.
pub fn merge(live: &mut Value, config: &Value, name: &str) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) if !atomic_map(name) => {
            for (k, v) in c {
                match l.get_mut(k) {
                    Some(existing) => merge(existing, v, k),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(c)) => match list_kind(name, c) {
            ListKind::Keyed { keys, .. } => {
                for item in c {
                    let key = key_of(item, &keys);
                    match l.iter_mut().find(|i| matches_key(i, &key)) {
                        Some(existing) => merge(existing, item, ""),
                        None => l.push(item.clone()),
                    }
                }
            }
            ListKind::Set => {
                for item in c {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            ListKind::Atomic => *l = c.clone(),
        },
        (l, c) => *l = c.clone(),
    }
}

/// The leaf paths where `old` and `new` differ (added, changed or removed),
/// as an update by some manager changes them.
pub fn changed(old: &Value, new: &Value) -> Vec<Path> {
    let mut out = Vec::new();
    for path in leaves(&set_of_object(new)) {
        if get(old, &path) != get(new, &path) {
            out.push(path);
        }
    }
    for path in leaves(&set_of_object(old)) {
        if get(new, &path).is_none() && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(file: &str) -> Value {
        let path = format!("{}/tests/k8s-recordings/{file}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).expect("recording")).expect("json")
    }

    /// The field set this fake computes for each recorded apply is the one
    /// the real API server recorded for it.
    #[test]
    fn applied_field_sets_are_what_the_real_server_recorded() {
        for stem in [
            "deployment-patient-lookup",
            "service-patient-lookup",
            "configmap-patient-lookup-policy",
            "configmap-patient-lookup-jwks",
            "networkpolicy-patient-lookup-ingress",
            "networkpolicy-patient-lookup-egress",
            "serviceaccount-patient-lookup-mcpw",
        ] {
            let request = recorded(&format!("01-apply/ssa-{stem}.request.json"));
            let response = recorded(&format!("01-apply/ssa-{stem}.response.json"));
            let entry = response["metadata"]["managedFields"]
                .as_array()
                .and_then(|m| m.iter().find(|e| e["manager"] == "mcp-warden"))
                .expect("entry");
            assert_eq!(Value::Object(set_of_object(&request)), entry["fieldsV1"], "{stem}");
        }
    }
}
