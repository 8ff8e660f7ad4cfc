//! Reading manifests from files and directories, as `check` and `render` do.
//!
//! ```text
//!   FILE|DIR… ─▶ YAML documents ─▶ by apiVersion/kind ─┬▶ MCPServer, PHIStore (admitted against the CRD schema)
//!                                                      ├▶ NetworkPolicy (context for access-control)
//!                                                      └▶ anything else (counted, ignored)
//! ```
//!
//! Every error names the file, the document and, where there is one, the
//! field, so a pipeline log points at the line to fix.

pub mod schema;

use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::CustomResourceExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{API_VERSION, EmergencyAccess, GROUP, MCPServer, PHIStore};
pub use schema::FieldError;

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// 1-based position of the YAML document in the file (0: the file as a whole).
    pub document: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.document == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{} (document {})", self.file.display(), self.document)
        }
    }
}

/// An object and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// Its file and document.
    pub origin: Origin,
    /// The object.
    pub object: T,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestError {
    /// File and document.
    pub origin: Origin,
    /// `Kind namespace/name`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Field path, when the error is about one field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The objects found in a set of manifests.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    /// Admitted MCPServers, defaults applied.
    pub servers: Vec<Loaded<MCPServer>>,
    /// Admitted PHIStores, defaults applied.
    pub stores: Vec<Loaded<PHIStore>>,
    /// NetworkPolicies (other than mcp-warden's own kinds, they can widen a
    /// server's traffic).
    pub network_policies: Vec<Loaded<NetworkPolicy>>,
    /// Secrets (the broker's admin credentials, a JWKS). Never printed.
    pub secrets: Vec<Loaded<Secret>>,
    /// ConfigMaps (a JWKS).
    pub config_maps: Vec<Loaded<ConfigMap>>,
    /// Emergency-access grants, admitted (schema and CEL).
    pub emergency_grants: Vec<Loaded<EmergencyAccess>>,
    /// ValidatingAdmissionPolicies (the break-glass one must be in force
    /// for the broker to honour a grant).
    pub admission_policies: Vec<Loaded<ValidatingAdmissionPolicy>>,
    /// Their bindings.
    pub admission_bindings: Vec<Loaded<ValidatingAdmissionPolicyBinding>>,
    /// Objects of other kinds, which `check` does not judge.
    pub other_objects: usize,
}

/// Reads every `.yaml`, `.yml` and `.json` file under the given files and
/// directories (directories recursively, in name order). Valid objects are
/// collected even when others fail, so one run reports every error.
pub fn load_paths(paths: &[PathBuf]) -> (ManifestSet, Vec<ManifestError>) {
    let mut set = ManifestSet::default();
    let mut errors = Vec::new();
    for path in paths {
        for file in manifest_files(path, &mut errors) {
            match std::fs::read_to_string(&file) {
                Ok(text) => parse_into(&text, &file, &mut set, &mut errors),
                Err(e) => errors.push(whole_file_error(&file, format!("cannot read: {e}"))),
            }
        }
    }
    (set, errors)
}

/// Parses one YAML stream (possibly several documents) into `set`.
pub fn parse_into(text: &str, file: &Path, set: &mut ManifestSet, errors: &mut Vec<ManifestError>) {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: file.to_path_buf(), document: index + 1 };
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => classify(value, &origin, set, errors),
            Err(e) => {
                errors.push(ManifestError {
                    origin,
                    object: None,
                    field: None,
                    message: format!("not valid YAML: {e}"),
                });
                // The YAML parser cannot resume after a syntax error.
                return;
            }
        }
    }
}

fn manifest_files(path: &Path, errors: &mut Vec<ManifestError>) -> Vec<PathBuf> {
    if !path.exists() {
        errors.push(whole_file_error(path, "no such file or directory".into()));
        return Vec::new();
    }
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(path).sort_by_file_name() {
        match entry {
            Ok(entry) if entry.file_type().is_file() && is_manifest_name(entry.path()) => {
                files.push(entry.into_path());
            }
            Ok(_) => {}
            Err(e) => errors.push(whole_file_error(e.path().unwrap_or(path), format!("cannot read directory: {e}"))),
        }
    }
    files
}

fn is_manifest_name(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn whole_file_error(file: &Path, message: String) -> ManifestError {
    ManifestError { origin: Origin { file: file.to_path_buf(), document: 0 }, object: None, field: None, message }
}

fn classify(value: Value, origin: &Origin, set: &mut ManifestSet, errors: &mut Vec<ManifestError>) {
    let error = |field: Option<&str>, message: String| ManifestError {
        origin: origin.clone(),
        object: None,
        field: field.map(str::to_string),
        message,
    };
    let (Some(api_version), Some(kind)) =
        (value.get("apiVersion").and_then(Value::as_str), value.get("kind").and_then(Value::as_str))
    else {
        errors.push(error(None, "not a Kubernetes object: apiVersion and kind are required".into()));
        return;
    };
    let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
    match (api_version, kind) {
        (API_VERSION, "MCPServer") => {
            if let Some(server) = admit_custom::<MCPServer>(&value, origin, errors) {
                set.servers.push(Loaded { origin: origin.clone(), object: server });
            }
        }
        (API_VERSION, "PHIStore") => {
            if let Some(store) = admit_custom::<PHIStore>(&value, origin, errors) {
                set.stores.push(Loaded { origin: origin.clone(), object: store });
            }
        }
        (API_VERSION, "EmergencyAccess") => {
            if let Some(mut grant) = admit_custom::<EmergencyAccess>(&value, origin, errors) {
                // Admission is of what people write; the status is the
                // operator's (a snapshot of a cluster carries it), kept as
                // written when it parses.
                grant.status = value.get("status").cloned().and_then(|s| serde_json::from_value(s).ok());
                set.emergency_grants.push(Loaded { origin: origin.clone(), object: grant });
            }
        }
        (API_VERSION, other) => errors.push(error(
            Some("kind"),
            format!("unknown kind {other:?} in {API_VERSION}: expected MCPServer, PHIStore or EmergencyAccess"),
        )),
        (_, _) if group == GROUP => errors.push(error(
            Some("apiVersion"),
            format!("unsupported version {api_version:?}: this mcp-warden serves {API_VERSION}"),
        )),
        ("networking.k8s.io/v1", "NetworkPolicy") => match serde_json::from_value::<NetworkPolicy>(value) {
            Ok(policy) => set.network_policies.push(Loaded { origin: origin.clone(), object: policy }),
            Err(e) => errors.push(error(None, format!("invalid NetworkPolicy: {e}"))),
        },
        // serde's message could quote a value of the Secret: only say which.
        ("v1", "Secret") => match serde_json::from_value::<Secret>(value) {
            Ok(secret) => set.secrets.push(Loaded { origin: origin.clone(), object: secret }),
            Err(_) => errors.push(error(None, "invalid Secret (contents not shown)".into())),
        },
        ("v1", "ConfigMap") => match serde_json::from_value::<ConfigMap>(value) {
            Ok(map) => set.config_maps.push(Loaded { origin: origin.clone(), object: map }),
            Err(e) => errors.push(error(None, format!("invalid ConfigMap: {e}"))),
        },
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => match serde_json::from_value(value) {
            Ok(policy) => set.admission_policies.push(Loaded { origin: origin.clone(), object: policy }),
            Err(e) => errors.push(error(None, format!("invalid ValidatingAdmissionPolicy: {e}"))),
        },
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            match serde_json::from_value(value) {
                Ok(binding) => set.admission_bindings.push(Loaded { origin: origin.clone(), object: binding }),
                Err(e) => errors.push(error(None, format!("invalid ValidatingAdmissionPolicyBinding: {e}"))),
            }
        }
        ("v1", "List") => {
            for item in value.get("items").and_then(Value::as_array).cloned().unwrap_or_default() {
                classify(item, origin, set, errors);
            }
        }
        _ => set.other_objects += 1,
    }
}

/// Admits a custom resource the way the API server would and turns it into
/// its Rust type.
fn admit_custom<K>(value: &Value, origin: &Origin, errors: &mut Vec<ManifestError>) -> Option<K>
where
    K: CustomResourceExt + DeserializeOwned,
{
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    let name = value.pointer("/metadata/name").and_then(Value::as_str);
    let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str);
    let object = Some(match (namespace, name) {
        (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
        (None, Some(n)) => format!("{kind} {n}"),
        _ => kind.clone(),
    });
    let error = |field: &str, message: String| ManifestError {
        origin: origin.clone(),
        object: object.clone(),
        field: (!field.is_empty()).then(|| field.to_string()),
        message,
    };
    if name.is_none() {
        errors.push(error("metadata.name", "required field is missing".into()));
        return None;
    }
    match admit::<K>(value) {
        Ok(object) => Some(object),
        Err(field_errors) => {
            errors.extend(field_errors.into_iter().map(|fe| error(&fe.field, fe.message)));
            None
        }
    }
}

/// Admits one custom resource against its CRD schema (structure, defaults,
/// CEL) and returns it typed, or every reason it is refused.
pub fn admit<K>(value: &Value) -> Result<K, Vec<FieldError>>
where
    K: CustomResourceExt + DeserializeOwned,
{
    let internal = |message: String| vec![FieldError { field: String::new(), message }];
    let crd = K::crd();
    let kind = crd.spec.names.kind.clone();
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .ok_or_else(|| internal(format!("internal error: the {kind} CRD has no schema")))?;
    let schema = serde_json::to_value(schema)
        .map_err(|e| internal(format!("internal error: the {kind} schema does not serialize: {e}")))?;
    let defaulted = schema::admit(&schema, value)?;
    serde_json::from_value::<K>(defaulted).map_err(|e| internal(format!("does not match the {kind} type: {e}")))
}
