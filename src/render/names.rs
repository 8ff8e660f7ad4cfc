//! Names, labels and annotations of the objects owned by an MCPServer, in
//! one place so the renderer, the evaluator and (later) the controller agree.

use std::collections::BTreeMap;

/// Label carrying the MCPServer name on every owned object and pod; the pod
/// selector of the Deployment, Service and NetworkPolicies.
pub const SERVER_LABEL: &str = "mcpwarden.io/server";
/// Pod-template annotation holding the compiled policy's hash.
pub const POLICY_HASH_ANNOTATION: &str = "mcpwarden.io/policy-hash";
/// Field manager and `managed-by` value.
pub const MANAGER: &str = "mcp-warden";
/// Name of the MCP server container.
pub const MCP_CONTAINER: &str = "mcp-server";
/// Name of the sidecar (an init container with `restartPolicy: Always`).
pub const SIDECAR_CONTAINER: &str = "mcp-warden-sidecar";
/// What the sidecar container runs: the image's sidecar-only binary (the
/// `mcp-warden sidecar` flags, a fraction of the resident code).
pub const SIDECAR_COMMAND: &str = "/usr/local/bin/mcp-warden-sidecar";

/// Names of the objects rendered for one MCPServer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedNames {
    /// Deployment and Service.
    pub workload: String,
    /// ServiceAccount of the pods.
    pub service_account: String,
    /// ConfigMap with the compiled policy.
    pub policy_config_map: String,
    /// ConfigMap with the JWKS fetched from `jwksUri`.
    pub jwks_config_map: String,
    /// Ingress NetworkPolicy.
    pub ingress_policy: String,
    /// Egress NetworkPolicy.
    pub egress_policy: String,
    /// Secret with the audit key (HMAC of arguments, session binding),
    /// created by the platform team.
    pub audit_key_secret: String,
}

impl OwnedNames {
    /// Names for the MCPServer `server`.
    pub fn for_server(server: &str) -> Self {
        Self {
            workload: server.to_string(),
            service_account: format!("{server}-mcpw"),
            policy_config_map: format!("{server}-policy"),
            jwks_config_map: format!("{server}-jwks"),
            ingress_policy: format!("{server}-ingress"),
            egress_policy: format!("{server}-egress"),
            audit_key_secret: format!("{server}-audit-key"),
        }
    }

    /// Whether `name` is the name of a NetworkPolicy the warden renders.
    pub fn is_owned_network_policy(&self, name: &str) -> bool {
        name == self.ingress_policy || name == self.egress_policy
    }
}

/// Labels selecting the server's pods.
pub fn selector_labels(server: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(SERVER_LABEL.to_string(), server.to_string())])
}

/// Labels on every owned object and pod.
pub fn common_labels(server: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(server);
    labels.insert("app.kubernetes.io/name".into(), "mcp-server".into());
    labels.insert("app.kubernetes.io/instance".into(), server.to_string());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    labels
}

/// Labels of the server's pods (the Deployment's pod template): what other
/// NetworkPolicies are matched against.
pub fn pod_labels(server: &str) -> BTreeMap<String, String> {
    let mut labels = common_labels(server);
    labels.extend(selector_labels(server));
    labels
}
