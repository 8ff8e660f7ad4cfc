//! `PHIStore`: a PostgreSQL database holding PHI, and how it is reached.
//!
//! Only the broker reads `adminSecretRef`; the operator uses `endpoints` to
//! open egress to the store exactly while some allowed tool uses it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Deidentification;

/// A PostgreSQL database holding protected health information.
// clippy reads the repeated `type_ = "string"` of printcolumn(...) as a
// duplicated attribute; they are arguments of distinct columns.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mcpwarden.io",
    version = "v1alpha1",
    kind = "PHIStore",
    plural = "phistores",
    singular = "phistore",
    shortname = "phis",
    category = "mcpwarden",
    namespaced,
    status = "PHIStoreStatus",
    derive = "PartialEq",
    doc = "A PostgreSQL database holding PHI. Its admin credential is read by the mcp-warden broker only.",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.postgres.host"),
    printcolumn(name = "Database", type_ = "string", json_path = ".spec.postgres.database"),
    printcolumn(name = "TLS", type_ = "string", json_path = ".spec.postgres.sslMode"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Admin",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"AdminPrivileges\")].status"
    ),
    printcolumn(
        name = "PUBLIC",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"PublicPrivileges\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PHIStoreSpec {
    /// Connection settings.
    pub postgres: PostgresConnection,
    /// Where the store is on the network (used for egress NetworkPolicy).
    pub endpoints: StoreEndpoints,
    /// How its columns cross to de-identified tools: entities and the
    /// classification of every column such a tool may be granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deidentification: Option<Deidentification>,
}

/// How the broker and the sidecar's proxy reach the database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresConnection {
    /// Host name or address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port.
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Database name.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// Secret with `username` and `password` of a role with CREATEROLE.
    /// Read by the broker only, never mounted into an MCP pod.
    pub admin_secret_ref: SecretRef,
    /// libpq `sslmode`. Only `verify-full` passes the transmission-security
    /// control. The broker connects with `verify-full` or `disable` only: it
    /// sends the admin credential to no server it has not verified, and
    /// never downgrades.
    #[serde(default)]
    pub ssl_mode: SslMode,
    /// A ConfigMap holding the PEM CA bundle the server's certificate chains
    /// to (e.g. the hospital's internal CA). Without it, the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<CaBundleRef>,
    /// Revoke from PUBLIC the privileges that widen every caller's reach
    /// (CONNECT/TEMPORARY on the database, CREATE/USAGE on schemas, table
    /// privileges, EXECUTE on functions). The broker reports them in
    /// `status.publicPrivileges` either way; with `true` it revokes them.
    /// Other applications of the database lose them too: grant them back to
    /// those applications' roles explicitly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoke_public_privileges: bool,
}

fn default_pg_port() -> i32 {
    5432
}

/// A Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a ConfigMap in the same namespace holding PEM certificates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaBundleRef {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside it.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// libpq's `sslmode` values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS only if the server insists.
    Allow,
    /// TLS if available.
    Prefer,
    /// TLS without certificate verification.
    Require,
    /// TLS, certificate chain verified, host name not checked.
    VerifyCa,
    /// TLS, certificate chain and host name verified.
    #[default]
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The store's network location: pods by selector and/or IP blocks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.podSelector) || (has(self.ipBlocks) && size(self.ipBlocks) > 0)").message("endpoints must select the store's pods (podSelector) or name its ipBlocks"),
    validation = Rule::new("!has(self.namespaceSelector) || has(self.podSelector)").message("namespaceSelector must be paired with podSelector: alone it selects every pod of those namespaces").field_path(".namespaceSelector"),
    validation = Rule::new("!has(self.podSelector) || (has(self.podSelector.matchLabels) && size(self.podSelector.matchLabels) > 0) || (has(self.podSelector.matchExpressions) && size(self.podSelector.matchExpressions) > 0)").message("podSelector must not be empty: an empty selector selects every pod").field_path(".podSelector"),
)]
pub struct StoreEndpoints {
    /// Pods serving the database (in this namespace unless
    /// `namespaceSelector` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces of those pods; only together with `podSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Addresses of a database outside the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub ip_blocks: Vec<StoreIpBlock>,
    /// TCP ports the database listens on.
    #[schemars(length(min = 1, max = 8), inner(range(min = 1, max = 65535)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub ports: Vec<i32>,
}

/// A CIDR holding the database. Must be specific: the whole Internet is not a
/// database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreIpBlock {
    /// An IPv4 or IPv6 CIDR.
    #[schemars(length(min = 3, max = 49), regex(pattern = r"^[0-9A-Fa-f.:]+/[0-9]{1,3}$"))]
    #[x_kube(validation = Rule::new("!(self in ['0.0.0.0/0', '::/0'])").message("an ipBlock of the whole address space is not a database endpoint"))]
    pub cidr: String,
}

/// Observed state of a PHIStore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PHIStoreStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Written by the broker: `Ready` (connected as admin, every group role
    /// in line), `AdminPrivileges`, `PublicPrivileges`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the broker's admin role lacks (see docs/broker.md for the role
    /// it needs). Empty when it has everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_missing: Vec<String>,
    /// Privileges PUBLIC holds in the database: every issued role has them
    /// too, beyond its tool's columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_privileges: Vec<PublicPrivilege>,
}

/// One privilege PUBLIC holds on an object of the store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicPrivilege {
    /// `database`, `schema`, `table`, `function` or `security definer
    /// function` (runs with its owner's rights).
    pub kind: String,
    /// The object (`schema.table`, a function signature, …).
    pub object: String,
    /// The privilege.
    pub privilege: String,
    /// How much it widens a caller's reach.
    pub severity: FindingSeverity,
}

/// How much a PUBLIC privilege widens a caller's reach.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum FindingSeverity {
    /// Reaches data, or runs code with another role's rights.
    High,
    /// Lets a caller connect or create objects where no policy says so.
    Medium,
}
