//! Test fixtures: the compliant example admitted as the API server would,
//! and small helpers to derive variants from it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::api::{MCPServer, PHIStore};
use crate::manifest::{self, FieldError};

/// The compliant clinic example, as committed.
pub const CLINIC_YAML: &str = include_str!("../examples/compliant/clinic.yaml");

/// The documents of the clinic example as JSON values: `(store, server)`.
pub fn clinic_values() -> (Value, Value) {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(CLINIC_YAML)
        .map(|d| serde::Deserialize::deserialize(d).expect("example is YAML"))
        .collect();
    (docs[0].clone(), docs[1].clone())
}

/// The clinic's MCPServer.
pub fn clinic_server() -> MCPServer {
    admit_server(&clinic_values().1).expect("example server is admissible")
}

/// The clinic's PHIStore.
pub fn clinic_store() -> PHIStore {
    manifest::admit(&clinic_values().0).expect("example store is admissible")
}

/// The clinic's stores by name.
pub fn clinic_stores() -> BTreeMap<String, PHIStore> {
    BTreeMap::from([("ehr".to_string(), clinic_store())])
}

/// Admits an MCPServer value.
pub fn admit_server(value: &Value) -> Result<MCPServer, Vec<FieldError>> {
    manifest::admit(value)
}

/// Sets the value at a JSON pointer (creating the last key).
pub fn set(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let target = value.pointer_mut(parent).expect("parent exists");
    match target {
        Value::Object(map) => {
            map.insert(key.to_string(), new);
        }
        Value::Array(items) => {
            let index: usize = key.parse().expect("array index");
            if index == items.len() { items.push(new) } else { items[index] = new }
        }
        _ => panic!("{parent} is not a container"),
    }
    value
}

/// Removes the value at a JSON pointer.
pub fn remove(mut value: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    match value.pointer_mut(parent).expect("parent exists") {
        Value::Object(map) => {
            map.remove(key);
        }
        Value::Array(items) => {
            items.remove(key.parse::<usize>().expect("array index"));
        }
        _ => panic!("{parent} is not a container"),
    }
    value
}

/// The messages of an admission result (empty when admitted).
pub fn refusals<K>(result: Result<K, Vec<FieldError>>) -> Vec<String> {
    result.err().unwrap_or_default().iter().map(ToString::to_string).collect()
}
