//! Rendering: the objects an MCPServer owns, as pure functions of the
//! MCPServer, its PHIStores and the operator's settings.
//!
//! ```text
//!   MCPServer + PHIStores + Settings ─ render() ─▶ OwnedObjects
//!     ServiceAccount   <name>-mcpw      no token automount
//!     ConfigMap        <name>-policy    CompiledPolicy (hash on the pod template)
//!     ConfigMap        <name>-jwks      only for jwksUri (the operator fetches it)
//!     Deployment       <name>           MCP container + native sidecar (audit key: Secret <name>-audit-key)
//!     Service          <name>           sidecar public port only
//!     NetworkPolicy    <name>-ingress   sidecar port, allowedClients only
//!     NetworkPolicy    <name>-egress    DNS, warden, stores in use, extras
//! ```
//!
//! The controller applies exactly these objects; `mcp-warden render` prints
//! them; the compliance evaluator inspects them.

mod config_maps;
mod deployment;
pub mod names;
mod network_policy;
mod service;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::{MCPServer, PHIStore};
use crate::policy::{self, CompiledPolicy, PolicyError};
pub use config_maps::{JWKS_FILE, JWKS_SOURCE_ANNOTATION};
pub use names::OwnedNames;
pub use network_policy::{StoreEgress, store_peers};

/// Operator-wide settings that shape what is rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Image of the `mcp-warden` binary run as the sidecar.
    pub sidecar_image: String,
    /// Namespace of the warden's control plane (broker, audit collector).
    pub warden_namespace: String,
    /// Labels of the control-plane pods the sidecar must reach.
    pub control_plane_labels: BTreeMap<String, String>,
    /// TCP port of the broker and the collector.
    pub control_plane_port: i32,
    /// Namespace labels of the cluster DNS pods.
    pub dns_namespace_labels: BTreeMap<String, String>,
    /// Pod labels of the cluster DNS pods.
    pub dns_pod_labels: BTreeMap<String, String>,
    /// UID of the MCP server container.
    pub mcp_uid: i64,
    /// UID of the sidecar (distinct, so the MCP container cannot read the
    /// sidecar's files).
    pub sidecar_uid: i64,
    /// Size limit of the audit WAL volume.
    pub audit_volume_size: String,
    /// The credential broker's URL: given to sidecars of servers with
    /// `dataAccess` tools (without it such calls are refused).
    pub broker_url: Option<String>,
    /// The audit collector's URL: sidecars ship their trail to it (without
    /// it the trail stays in the pod's WAL).
    pub collector_url: Option<String>,
    /// PEM CA bundle of the broker's and the collector's certificates,
    /// handed to each sidecar in its policy ConfigMap.
    pub warden_ca_pem: Option<String>,
}

impl Settings {
    /// Defaults for a control plane installed in `warden_namespace` by the
    /// Helm chart.
    pub fn for_namespace(warden_namespace: &str) -> Self {
        Settings {
            sidecar_image: format!("ghcr.io/mcp-warden/mcp-warden:{}", env!("CARGO_PKG_VERSION")),
            warden_namespace: warden_namespace.to_string(),
            control_plane_labels: BTreeMap::from([("app.kubernetes.io/part-of".into(), "mcp-warden".into())]),
            control_plane_port: 8443,
            dns_namespace_labels: BTreeMap::from([("kubernetes.io/metadata.name".into(), "kube-system".into())]),
            dns_pod_labels: BTreeMap::from([("k8s-app".into(), "kube-dns".into())]),
            mcp_uid: 10001,
            sidecar_uid: 10002,
            audit_volume_size: "1Gi".into(),
            broker_url: None,
            collector_url: None,
            warden_ca_pem: None,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::for_namespace("mcp-warden")
    }
}

/// Everything one MCPServer owns.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedObjects {
    /// The compiled policy carried by `policy_config_map`.
    pub policy: CompiledPolicy,
    /// Pods' ServiceAccount.
    pub service_account: ServiceAccount,
    /// Compiled policy.
    pub policy_config_map: ConfigMap,
    /// JWKS carried by the operator (only with `jwksUri`).
    pub jwks_config_map: Option<ConfigMap>,
    /// The workload.
    pub deployment: Deployment,
    /// The sidecar's Service.
    pub service: Service,
    /// Ingress NetworkPolicy.
    pub ingress_policy: NetworkPolicy,
    /// Egress NetworkPolicy.
    pub egress_policy: NetworkPolicy,
}

/// Why an MCPServer cannot be rendered. Nothing is rendered in that case: a
/// partial set of objects would be a workload without its controls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The policy does not compile (e.g. a missing PHIStore).
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Renders the objects of `server`. `stores` maps names to the PHIStores of
/// the server's namespace; `jwks` is the JWKS document the operator fetched
/// from `jwksUri` (None leaves the ConfigMap's data to the operator).
pub fn render(
    server: &MCPServer,
    stores: &BTreeMap<String, PHIStore>,
    settings: &Settings,
    jwks: Option<&str>,
) -> Result<OwnedObjects, RenderError> {
    let policy = policy::compile(server, stores)?;
    let names = OwnedNames::for_server(&server.name_any());
    let ctx = Context { server, names: &names, settings };
    let store_egress: Vec<StoreEgress> = policy::stores_in_use(server)
        .into_iter()
        .filter_map(|name| stores.get(&name).map(|store| StoreEgress { name, store }))
        .collect();
    Ok(OwnedObjects {
        service_account: service::service_account(&ctx),
        policy_config_map: config_maps::policy_config_map(&ctx, &policy),
        jwks_config_map: config_maps::jwks_config_map(&ctx, jwks),
        deployment: deployment::deployment(&ctx, &policy),
        service: service::service(&ctx),
        ingress_policy: network_policy::ingress(&ctx),
        egress_policy: network_policy::egress(&ctx, &store_egress),
        policy,
    })
}

impl OwnedObjects {
    /// The objects as JSON values, in apply order (config before workload).
    pub fn to_values(&self) -> Vec<serde_json::Value> {
        let mut out = vec![to_value(&self.service_account), to_value(&self.policy_config_map)];
        if let Some(jwks) = &self.jwks_config_map {
            out.push(to_value(jwks));
        }
        out.extend([
            to_value(&self.ingress_policy),
            to_value(&self.egress_policy),
            to_value(&self.service),
            to_value(&self.deployment),
        ]);
        out
    }

    /// The objects as a multi-document YAML stream.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut out = String::new();
        for value in self.to_values() {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&value)?);
        }
        Ok(out)
    }
}

/// Serializes a k8s-openapi object with its `apiVersion` and `kind`.
fn to_value<K: Resource<DynamicType = ()> + Serialize>(obj: &K) -> serde_json::Value {
    let mut value = serde_json::to_value(obj).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
    }
    value
}

/// What every renderer needs.
struct Context<'a> {
    server: &'a MCPServer,
    names: &'a OwnedNames,
    settings: &'a Settings,
}

impl Context<'_> {
    /// Metadata of an owned object: namespace, labels, controller reference.
    fn meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: self.server.namespace(),
            labels: Some(names::common_labels(&self.server.name_any())),
            // blockOwnerDeletion: a foreground deletion of the MCPServer
            // waits for its workload and policies to be gone (the API server
            // checks the operator may update mcpservers/finalizers).
            owner_references: self
                .server
                .controller_owner_ref(&())
                .map(|r| vec![OwnerReference { block_owner_deletion: Some(true), ..r }]),
            ..ObjectMeta::default()
        }
    }

    fn server_name(&self) -> String {
        self.server.name_any()
    }
}

#[cfg(test)]
mod tests;
