//! Offline admission: a manifest is checked against a CRD's
//! `openAPIV3Schema` the way the API server would check it.
//!
//! ```text
//!   object ─▶ prune nulls ─▶ apply defaults ─▶ structural checks ─▶ CEL rules
//!                            (kube-cel)        (this file)          (kube-cel)
//! ```
//!
//! JSON-Schema crates implement the JSON Schema drafts, not the Kubernetes
//! structural-schema dialect (`nullable`, `x-kubernetes-list-type` uniqueness,
//! `x-kubernetes-int-or-string`, unknown fields being errors under strict
//! field validation), so the structural part is written here; it covers the
//! keywords a structural schema may use. CEL evaluation is kube's own
//! (`kube::core::cel`, the kube-cel crate).

use std::collections::BTreeSet;

use kube::core::cel::{Validator, apply_defaults};
use regex::Regex;
use serde_json::{Map, Value};

/// One reason a manifest is not admissible, at a JSON path such as
/// `spec.tools[0].name`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong, in words a platform engineer can act on.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.field, self.message) }
    }
}

/// Validates `object` (a whole custom resource) against `schema` (the CRD
/// version's `openAPIV3Schema`). Returns the defaulted object when admissible.
///
/// `metadata` is left to the caller (the API server validates it as
/// ObjectMeta, not through the CRD schema), and `status` is ignored, as a
/// create through the main resource ignores it.
pub fn admit(schema: &Value, object: &Value) -> Result<Value, Vec<FieldError>> {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    prune_nulls(schema, &mut object);
    let defaulted = apply_defaults(schema, &object);

    let mut errors = Vec::new();
    let mut blocking = false;
    Walk { errors: &mut errors, blocking: &mut blocking }.check(schema, &defaulted, "");
    // As in the API server, a wrong type (or here a missing required field)
    // blocks CEL, whose rules would only fail on it again; other structural
    // errors (patterns, bounds) are reported together with the CEL ones.
    if !blocking && let Err(cel) = Validator::new().validate(schema, &defaulted, None) {
        errors.extend(cel.iter().map(|e| FieldError { field: e.field_path.clone(), message: e.message.clone() }));
    }
    if errors.is_empty() { Ok(defaulted) } else { Err(errors) }
}

/// Removes `null` values of fields that are not `nullable`, as the API server
/// does before defaulting and validation.
fn prune_nulls(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            map.retain(|key, v| {
                let sub = props.and_then(|p| p.get(key)).or(additional);
                !v.is_null() || sub.is_some_and(is_nullable)
            });
            for (key, v) in map.iter_mut() {
                if let Some(sub) = props.and_then(|p| p.get(key)).or(additional) {
                    prune_nulls(sub, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                items.iter_mut().for_each(|item| prune_nulls(sub, item));
            }
        }
        _ => {}
    }
}

fn is_nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool).unwrap_or(false)
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

struct Walk<'e> {
    errors: &'e mut Vec<FieldError>,
    blocking: &'e mut bool,
}

impl Walk<'_> {
    fn fail(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: path.to_string(), message: message.into() });
    }

    /// An error after which CEL rules cannot be evaluated meaningfully.
    fn block(&mut self, path: &str, message: impl Into<String>) {
        *self.blocking = true;
        self.fail(path, message);
    }

    fn check(mut self, schema: &Value, value: &Value, path: &str) {
        self.node(schema, value, path);
    }

    fn node(&mut self, schema: &Value, value: &Value, path: &str) {
        if value.is_null() {
            if !is_nullable(schema) {
                self.block(path, "must not be null");
            }
            return;
        }
        if flag(schema, "x-kubernetes-int-or-string") {
            if !(value.is_string() || value.is_i64() || value.is_u64()) {
                self.block(path, format!("must be an integer or a string, found {}", type_name(value)));
            }
            return;
        }
        let ty = schema.get("type").and_then(Value::as_str);
        match (ty, value) {
            (Some("object"), Value::Object(map)) => self.object(schema, map, path),
            (Some("array"), Value::Array(items)) => self.array(schema, items, path),
            (Some("string"), Value::String(s)) => self.string(schema, s, path),
            (Some("integer"), v) if v.is_i64() || v.is_u64() => self.number(schema, v, path),
            (Some("number"), v) if v.is_number() => self.number(schema, v, path),
            (Some("boolean"), Value::Bool(_)) => {}
            (None, _) => {}
            (Some(expected), v) => {
                self.block(path, format!("must be of type {expected}, found {}", type_name(v)));
                return;
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let names: Vec<String> = allowed.iter().map(render_scalar).collect();
            self.fail(path, format!("unsupported value {}: must be one of {}", render_scalar(value), names.join(", ")));
        }
    }

    fn object(&mut self, schema: &Value, map: &Map<String, Value>, path: &str) {
        let props = schema.get("properties").and_then(Value::as_object);
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(name) {
                    self.block(&join(path, name), "required field is missing");
                }
            }
        }
        let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
        let additional = schema.get("additionalProperties");
        for (key, v) in map {
            let child = join(path, key);
            // The API server owns the root's type and object metadata.
            if path.is_empty() && ROOT_FIELDS.contains(&key.as_str()) {
                continue;
            }
            if let Some(sub) = props.and_then(|p| p.get(key)) {
                self.node(sub, v, &child);
            } else if let Some(sub) = additional.filter(|a| a.is_object()) {
                self.node(sub, v, &child);
            } else if !(preserve || additional == Some(&Value::Bool(true))) {
                self.fail(&child, "unknown field");
            }
        }
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
            && map.len() as u64 > max
        {
            self.fail(path, format!("must have at most {max} entries"));
        }
    }

    fn array(&mut self, schema: &Value, items: &[Value], path: &str) {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && items.len() as u64 > max
        {
            self.fail(path, format!("must have at most {max} items, found {}", items.len()));
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && (items.len() as u64) < min
        {
            self.fail(path, format!("must have at least {min} item(s)"));
        }
        if let Some(sub) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.node(sub, item, &format!("{path}[{i}]"));
            }
        }
        match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        self.fail(&format!("{path}[{i}]"), format!("duplicate value {}", render_scalar(item)));
                    }
                }
            }
            Some("map") => {
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<String> =
                        keys.iter().map(|k| item.get(*k).map(render_scalar).unwrap_or_default()).collect();
                    if !seen.insert(key.clone()) {
                        let described: Vec<String> = keys.iter().zip(&key).map(|(k, v)| format!("{k}={v}")).collect();
                        self.fail(&format!("{path}[{i}]"), format!("duplicate entry with {}", described.join(", ")));
                    }
                }
            }
            _ => {}
        }
    }

    fn string(&mut self, schema: &Value, s: &str, path: &str) {
        let len = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            self.fail(path, format!("may not be longer than {max} characters"));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            self.fail(path, format!("must be at least {min} character(s)"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match Regex::new(pattern) {
                Ok(re) if !re.is_match(s) => self.fail(path, format!("must match the pattern {pattern}")),
                Ok(_) => {}
                Err(e) => self.fail(path, format!("schema pattern {pattern} does not compile: {e}")),
            }
        }
    }

    fn number(&mut self, schema: &Value, v: &Value, path: &str) {
        let Some(x) = v.as_f64() else { return };
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && x > max
        {
            self.fail(path, format!("must be less than or equal to {max}"));
        }
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && x < min
        {
            self.fail(path, format!("must be greater than or equal to {min}"));
        }
        if schema.get("format").and_then(Value::as_str) == Some("int32")
            && (x < f64::from(i32::MIN) || x > f64::from(i32::MAX))
        {
            self.fail(path, "must fit in a 32-bit integer");
        }
    }
}

/// Root fields every object has, validated by the API server itself.
const ROOT_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn render_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "maxLength": 5, "pattern": "^[a-z]+$"},
                        "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                        "port": {"type": "integer", "minimum": 1, "maximum": 10},
                        "opt": {"type": "string", "nullable": true},
                        "tags": {"type": "array", "maxItems": 2, "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                        "items": {
                            "type": "array",
                            "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["id"],
                            "items": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}
                        },
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "qty": {"x-kubernetes-int-or-string": true}
                    },
                    "x-kubernetes-validations": [{"rule": "self.name != 'bad'", "message": "name may not be bad"}]
                }
            }
        })
    }

    fn errors(v: Value) -> Vec<String> {
        admit(&schema(), &v).err().unwrap_or_default().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn valid_object_is_defaulted() {
        let out = admit(&schema(), &json!({"spec": {"name": "ok"}})).expect("admissible");
        assert_eq!(out["spec"]["mode"], "A");
    }

    #[test]
    fn unknown_field_is_named() {
        assert_eq!(errors(json!({"spec": {"name": "ok", "nmae": 1}})), ["spec.nmae: unknown field"]);
    }

    #[test]
    fn preserve_unknown_fields_admits_anything_below() {
        assert!(errors(json!({"spec": {"name": "ok", "free": {"x": {"y": 1}}}})).is_empty());
    }

    #[test]
    fn required_type_enum_bounds_and_pattern() {
        assert_eq!(errors(json!({"spec": {}})), ["spec.name: required field is missing"]);
        assert_eq!(errors(json!({"spec": {"name": 3}})), ["spec.name: must be of type string, found integer"]);
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "mode": "C"}})),
            [r#"spec.mode: unsupported value "C": must be one of "A", "B""#]
        );
        assert_eq!(errors(json!({"spec": {"name": "abcdef"}})), ["spec.name: may not be longer than 5 characters"]);
        assert_eq!(errors(json!({"spec": {"name": "AB"}})), ["spec.name: must match the pattern ^[a-z]+$"]);
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "port": 11}})),
            ["spec.port: must be less than or equal to 10"]
        );
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "port": 0}})),
            ["spec.port: must be greater than or equal to 1"]
        );
    }

    #[test]
    fn nulls_are_pruned_unless_nullable() {
        // A non-nullable null is dropped, so a required one reads as missing.
        assert_eq!(errors(json!({"spec": {"name": null}})), ["spec.name: required field is missing"]);
        assert!(errors(json!({"spec": {"name": "ok", "opt": null}})).is_empty());
    }

    #[test]
    fn list_types_enforce_uniqueness_and_bounds() {
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "tags": ["a", "a"]}})),
            [r#"spec.tags[1]: duplicate value "a""#]
        );
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "tags": ["a", "b", "c"]}})),
            ["spec.tags: must have at most 2 items, found 3"]
        );
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "items": [{"id": "x"}, {"id": "x"}]}})),
            [r#"spec.items[1]: duplicate entry with id="x""#]
        );
    }

    #[test]
    fn int_or_string() {
        assert!(errors(json!({"spec": {"name": "ok", "qty": "1Gi"}})).is_empty());
        assert!(errors(json!({"spec": {"name": "ok", "qty": 2}})).is_empty());
        assert_eq!(
            errors(json!({"spec": {"name": "ok", "qty": true}})),
            ["spec.qty: must be an integer or a string, found boolean"]
        );
    }

    #[test]
    fn cel_runs_beside_non_blocking_errors_only() {
        assert_eq!(errors(json!({"spec": {"name": "bad"}})), ["spec: name may not be bad"]);
        // A bound error and a CEL error are reported together...
        assert_eq!(
            errors(json!({"spec": {"name": "bad", "port": 11}})),
            ["spec.port: must be less than or equal to 10", "spec: name may not be bad"]
        );
        // ...but a type error blocks CEL.
        assert_eq!(
            errors(json!({"spec": {"name": "bad", "port": "x"}})),
            ["spec.port: must be of type integer, found string"]
        );
    }

    #[test]
    fn status_is_ignored() {
        assert!(errors(json!({"spec": {"name": "ok"}, "status": {"anything": 1}})).is_empty());
    }
}
