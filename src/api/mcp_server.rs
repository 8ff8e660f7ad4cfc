//! `MCPServer`: one MCP server, the callers it admits and the PHI it may reach.
//!
//! One declaration per tool (who, why, which columns of which store) drives
//! four enforcement points: the sidecar's `tools/call` decision, its
//! `tools/list` filter, the broker's database grants and the egress
//! NetworkPolicy. Fields are bounded (`maxItems`/`maxLength`) so the API
//! server's CEL cost estimate accepts every rule.

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::api::networking::v1::{NetworkPolicyEgressRule, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{EmergencyProcedure, Output, SIDECAR_METRICS_PORT, SIDECAR_PG_PROXY_PORT, SIDECAR_PUBLIC_PORT};

/// Desired state of an MCP server that may reach protected health information.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mcpwarden.io",
    version = "v1alpha1",
    kind = "MCPServer",
    plural = "mcpservers",
    singular = "mcpserver",
    shortname = "mcpw",
    shortname = "wmcp",
    category = "mcpwarden",
    namespaced,
    status = "MCPServerStatus",
    derive = "PartialEq",
    doc = "An MCP server run by mcp-warden: every caller authenticated, every tool call authorized and audited outside the pod, database access per caller and per tool.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Compliant", type_ = "string", json_path = ".status.conditions[?(@.type==\"Compliant\")].status"),
    printcolumn(name = "PHI tools", type_ = "integer", json_path = ".status.counts.phiTools"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label (lower-case letters, digits, '-', starting with a letter): it names the Service"),
    validation = Rule::new("size(self.metadata.name) <= 52").message("metadata.name must be at most 52 characters: owned objects append suffixes such as '-ingress'"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(
        "!has(self.audit) || !has(self.audit.failurePolicy) || self.audit.failurePolicy != 'Open' || (!(has(self.tools) && self.tools.exists(t, t.phi)) && !(has(self.resources) && self.resources.exists(r, r.phi)))"
    ).message("audit.failurePolicy Open is refused while any tool or resource is PHI: a PHI call must not proceed unrecorded").field_path(".audit.failurePolicy"),
    validation = Rule::new(
        "!has(self.emergencyAccess) || self.emergencyAccess.tools.all(n, has(self.tools) && self.tools.exists(t, t.name == n))"
    ).message("emergencyAccess.tools may name only declared tools").field_path(".emergencyAccess.tools"),
)]
pub struct MCPServerSpec {
    /// Container image of the MCP server.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Port the MCP server listens on inside the pod (Streamable HTTP). Must
    /// not be one of the sidecar's ports.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    #[x_kube(validation = Rule::new(port_collision_rule()).message(Message::Message(port_collision_message())))]
    pub port: i32,

    /// HTTP path of the MCP endpoint on the server.
    #[serde(default = "default_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[A-Za-z0-9._~/-]*$"))]
    pub path: String,

    /// Number of pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 50))]
    pub replicas: i32,

    /// CPU and memory of the MCP server container. (`resources` names the
    /// MCP resources policy, as in the protocol's tools/resources/prompts.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_resources: Option<ResourceRequirements>,

    /// Environment of the MCP server container. Secrets may not be referenced:
    /// the MCP container holds no credential; database access is issued per
    /// call by the broker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(e, !has(e.valueFrom) || !has(e.valueFrom.secretKeyRef))").message("env may not reference Secrets: the MCP container holds no credential; database access is issued per call by the broker"))]
    pub env: Vec<EnvVar>,

    /// How callers are authenticated.
    pub authentication: Authentication,

    /// The tools of the server and who may use them. A tool not listed here is
    /// refused (default deny) and hidden from `tools/list`.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub tools: Vec<ToolPolicy>,

    /// MCP resources, governed like tools, matched by URI prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["uriPrefix".into()]))]
    pub resources: Vec<ResourcePolicy>,

    /// MCP prompts, governed like tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub prompts: Vec<PromptPolicy>,

    /// Lifetime of the per-caller database credentials.
    #[serde(default)]
    pub credentials: Credentials,

    /// What happens when an audit record cannot be made durable.
    #[serde(default)]
    pub audit: AuditSettings,

    /// Network reach of the server's pods.
    #[serde(default)]
    pub network: NetworkSettings,

    /// Whose pseudonyms agree: de-identified tools of servers with the same
    /// scope on the same store see the same patient as the same pseudonym,
    /// and read the views of schema `deid_<scope>`. Unset: the server's own
    /// scope, its name with `-` as `_`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 52), regex(pattern = r"^[a-z][a-z0-9_]{0,51}$"))]
    pub pseudonym_scope: Option<String>,

    /// The break-glass procedure: who approves, for how long at most, which
    /// declared tools a grant (`EmergencyAccess`) may open. Unset: no
    /// emergency access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency_access: Option<EmergencyProcedure>,
}

impl MCPServerSpec {
    /// The counts status reports (and the `PHI tools` printer column shows).
    pub fn counts(&self) -> Counts {
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        let stores: std::collections::BTreeSet<&str> =
            self.tools.iter().flat_map(|t| t.data_access.iter().map(|d| d.store.as_str())).collect();
        Counts {
            tools: count(self.tools.len()),
            phi_tools: count(self.tools.iter().filter(|t| t.phi).count()),
            resources: count(self.resources.len()),
            prompts: count(self.prompts.len()),
            stores: count(stores.len()),
        }
    }
}

fn default_port() -> i32 {
    8080
}
fn default_path() -> String {
    "/mcp".into()
}
fn default_replicas() -> i32 {
    1
}

/// CEL rule refusing the sidecar's ports; built from the constants so the
/// schema cannot drift from the sidecar.
fn port_collision_rule() -> String {
    format!("!(self in [{SIDECAR_PUBLIC_PORT}, {SIDECAR_METRICS_PORT}, {SIDECAR_PG_PROXY_PORT}])")
}

fn port_collision_message() -> String {
    format!(
        "port collides with a port of the mcp-warden sidecar ({SIDECAR_PUBLIC_PORT} public, {SIDECAR_METRICS_PORT} metrics, {SIDECAR_PG_PROXY_PORT} database proxy)"
    )
}

/// Caller authentication. OIDC is the only scheme, and it is required.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    /// OAuth 2.1 / OIDC bearer tokens (JWT), checked by the sidecar.
    pub oidc: Oidc,
}

/// OIDC settings of the resource server (the sidecar).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.jwksUri) ? 1 : 0) + (has(self.jwksConfigMapRef) ? 1 : 0) + (has(self.jwksSecretRef) ? 1 : 0) == 1"
).message("set exactly one of jwksUri, jwksConfigMapRef, jwksSecretRef"))]
pub struct Oidc {
    /// Token issuer (`iss`), an https URL.
    #[schemars(length(min = 9, max = 512), regex(pattern = r"^https://[^\s]+$"))]
    pub issuer: String,
    /// This server's resource URI: tokens must carry it in `aud` (RFC 8707).
    #[schemars(length(min = 9, max = 512), regex(pattern = r"^https://[^\s]+$"))]
    pub audience: String,
    /// Where the operator fetches the issuer's keys; it copies them into a
    /// ConfigMap so the pod needs no egress to the identity provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 512), regex(pattern = r"^https://[^\s]+$"))]
    pub jwks_uri: Option<String>,
    /// A ConfigMap in the namespace holding the JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_config_map_ref: Option<KeyRef>,
    /// A Secret in the namespace holding the JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret_ref: Option<KeyRef>,
    /// Claim holding the caller's groups.
    #[serde(default = "default_groups_claim")]
    #[schemars(length(min = 1, max = 128))]
    pub groups_claim: String,
    /// Scopes every token must carry (403 `insufficient_scope` otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub required_scopes: Vec<String>,
    /// Claims argument rules may read as `caller.claims.<name>` (e.g.
    /// `department`). Only these are taken from a token; a string, number,
    /// boolean or list of strings, bounded in size — any other value is
    /// absent, and a rule reading it refuses the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub rule_claims: Vec<String>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

/// A key of a ConfigMap or Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Object name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the object.
    #[serde(default = "default_jwks_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_jwks_key() -> String {
    "jwks.json".into()
}

/// Who may use a tool, resource or prompt. Matching any entry admits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.anyAuthenticated) && self.anyAuthenticated) || (has(self.groups) && size(self.groups) > 0) || (has(self.subjects) && size(self.subjects) > 0)"
).message("allowedCallers names nobody: list groups or subjects (or anyAuthenticated for a non-PHI entry)"))]
pub struct AllowedCallers {
    /// Groups (from the token's groups claim) admitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub groups: Vec<String>,
    /// Token subjects (`sub`) admitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub subjects: Vec<String>,
    /// Any authenticated caller. Refused on PHI tools and resources.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_authenticated: bool,
}

/// Policy of one MCP tool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.phi || (has(self.purpose) && size(self.purpose) > 0)").message("a PHI tool must state its purpose").field_path(".purpose"),
    validation = Rule::new("!self.phi || !has(self.allowedCallers.anyAuthenticated) || !self.allowedCallers.anyAuthenticated").message("anyAuthenticated is refused on a PHI tool: name the groups or subjects that need it").field_path(".allowedCallers.anyAuthenticated"),
    validation = Rule::new("size(self.dataAccess) > 0 || (has(self.noDataAccessReason) && size(self.noDataAccessReason) > 0)").message("a tool with empty dataAccess must say why in noDataAccessReason").field_path(".noDataAccessReason"),
    validation = Rule::new("size(self.dataAccess) == 0 || !has(self.noDataAccessReason)").message("noDataAccessReason is only for tools with empty dataAccess").field_path(".noDataAccessReason"),
    validation = Rule::new("size(self.dataAccess) == 0 || self.phi").message("a tool that reads a PHIStore is a PHI tool: set phi: true and a purpose").field_path(".phi"),
    validation = Rule::new("!has(self.output) || self.output != 'Identified' || (has(self.identifiedReason) && size(self.identifiedReason) > 0)").message("an Identified tool must say why in identifiedReason").field_path(".identifiedReason"),
    validation = Rule::new("!has(self.identifiedReason) || (has(self.output) && self.output == 'Identified')").message("identifiedReason is only for Identified tools").field_path(".identifiedReason"),
    validation = Rule::new("(has(self.output) && self.output == 'Identified') || self.dataAccess.all(d, d.tables.all(t, t.privileges.all(p, p == 'SELECT')))").message("a Deidentified tool reads pseudonymized views: SELECT only (declare output: Identified to write)").field_path(".dataAccess"),
)]
pub struct ToolPolicy {
    /// Tool name as the MCP server announces it.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{1,128}$"), length(min = 1, max = 128))]
    pub name: String,
    /// Whether the tool touches protected health information. Required, so
    /// that nobody gets "not PHI" by omission.
    pub phi: bool,
    /// Why the tool exists (required for PHI tools; shown to auditors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub purpose: Option<String>,
    /// Who may call it. Everyone else neither sees nor calls it.
    pub allowed_callers: AllowedCallers,
    /// Exactly which tables and columns of which PHIStores the tool reads or
    /// writes; the broker grants nothing else. `[]` requires
    /// `noDataAccessReason`.
    #[schemars(length(max = 4))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["store".into()]))]
    pub data_access: Vec<DataAccess>,
    /// Why a tool declares no data access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub no_data_access_reason: Option<String>,
    /// What its answers may hold. `Deidentified` (the default) reads the
    /// store's pseudonymized views, where every granted column must be
    /// classified; `Identified` reads the tables themselves and is meant for
    /// emergency access only.
    #[serde(default)]
    pub output: Output,
    /// Why a tool needs identified output (required with `Identified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub identified_reason: Option<String>,
    /// The arguments the tool takes. When listed, the sidecar refuses a call
    /// with an argument not listed, a required one missing, one of another
    /// type or out of its bounds — before the MCP server sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub arguments: Option<Vec<ArgumentSpec>>,
    /// Rules every call must satisfy, in CEL over `args` (the call's
    /// arguments), `caller` (`subject`, `groups`) and `now` (a timestamp),
    /// e.g. `args.limit <= 50`. A rule that is false or cannot be evaluated
    /// (a missing argument, unless the rule uses `has()`) refuses the call
    /// with its message. No comprehensions (`all`, `exists`, `map`, `filter`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub argument_rules: Vec<ArgumentRule>,
}

/// One declared argument of a tool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.maxLength) || self.type == 'string'").message("maxLength is for string arguments").field_path(".maxLength"),
    validation = Rule::new("(!has(self.minimum) && !has(self.maximum)) || self.type == 'integer' || self.type == 'number'").message("minimum and maximum are for integer and number arguments"),
    validation = Rule::new("!has(self.minimum) || !has(self.maximum) || self.minimum <= self.maximum").message("minimum is above maximum").field_path(".minimum"),
)]
pub struct ArgumentSpec {
    /// The argument's name (a key of the call's `arguments`).
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"), length(min = 1, max = 64))]
    pub name: String,
    /// Its JSON type.
    #[serde(rename = "type")]
    pub kind: ArgumentType,
    /// Whether every call must give it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// Longest string, in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_length: Option<u32>,
    /// Smallest number allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<Bound>,
    /// Largest number allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<Bound>,
}

/// A number bound (finite, as the API server admits it), comparable for
/// equality so compiled policies can be compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, JsonSchema)]
#[serde(transparent)]
pub struct Bound(pub f64);

impl PartialEq for Bound {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}

impl Eq for Bound {}

/// JSON types of declared arguments.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArgumentType {
    /// A JSON string.
    String,
    /// A JSON number without a fractional part (`50.0` is 50).
    Integer,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
}

/// A rule over a call's arguments.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArgumentRule {
    /// A CEL expression that must be true, e.g. `args.limit <= 50`.
    #[schemars(length(min = 1, max = 512))]
    pub rule: String,
    /// What the caller is told when it is not (never a value).
    #[schemars(length(min = 1, max = 200))]
    pub message: String,
}

/// The grants a tool needs on one PHIStore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataAccess {
    /// Name of a PHIStore in the same namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub store: String,
    /// Tables and their columns.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub tables: Vec<TableGrant>,
    /// Whether the database proxy lets the tool run COPY on this store.
    /// PostgreSQL has no COPY privilege of its own: a SELECT grant would
    /// otherwise allow a bulk export in one statement. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_copy: bool,
}

/// Column-level grants on one schema-qualified table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableGrant {
    /// `schema.table`; the schema is required so `search_path` cannot change
    /// what is granted.
    #[schemars(
        length(min = 3, max = 127),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$")
    )]
    pub name: String,
    /// The columns, each named: `*` is refused (minimum necessary).
    /// (The identifier check is a structural pattern, which costs no CEL
    /// budget; only the `*` rule, for its message, is CEL.)
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]*$"))
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(c, c != '*')").message("'*' is refused: name each column the tool needs (minimum necessary)"))]
    pub columns: Vec<String>,
    /// Column-level privileges. DELETE and TRUNCATE cannot be limited to
    /// columns and are therefore not offered.
    #[schemars(length(min = 1, max = 3))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub privileges: Vec<Privilege>,
}

/// A column-level PostgreSQL privilege.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Privilege {
    /// Read the named columns.
    Select,
    /// Insert values into the named columns.
    Insert,
    /// Update the named columns.
    Update,
}

impl Privilege {
    /// SQL keyword of the privilege.
    pub fn as_sql(self) -> &'static str {
        match self {
            Privilege::Select => "SELECT",
            Privilege::Insert => "INSERT",
            Privilege::Update => "UPDATE",
        }
    }
}

/// Policy of MCP resources whose URI starts with a prefix.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.phi || (has(self.purpose) && size(self.purpose) > 0)").message("a PHI resource must state its purpose").field_path(".purpose"),
    validation = Rule::new("!self.phi || !has(self.allowedCallers.anyAuthenticated) || !self.allowedCallers.anyAuthenticated").message("anyAuthenticated is refused on a PHI resource: name the groups or subjects that need it").field_path(".allowedCallers.anyAuthenticated"),
)]
pub struct ResourcePolicy {
    /// Resource URIs starting with this prefix are governed by this entry
    /// (the longest matching prefix wins).
    #[schemars(length(min = 1, max = 512))]
    pub uri_prefix: String,
    /// Whether these resources hold PHI.
    pub phi: bool,
    /// Why (required when PHI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub purpose: Option<String>,
    /// Who may list and read them.
    pub allowed_callers: AllowedCallers,
}

/// Policy of one MCP prompt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptPolicy {
    /// Prompt name.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Who may list and get it.
    pub allowed_callers: AllowedCallers,
}

/// Per-caller database credential settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// Lifetime of each issued database role (Go duration, e.g. `15m`), at
    /// most `1h`: sessions end with it (automatic logoff).
    #[serde(default = "default_ttl")]
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('1h')").message("credentials.ttl may be at most 1h"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("credentials.ttl must be at least 1m"))]
    pub ttl: String,
}

fn default_ttl() -> String {
    "15m".into()
}

impl Default for Credentials {
    fn default() -> Self {
        Self { ttl: default_ttl() }
    }
}

/// Audit settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSettings {
    /// `Closed` (default) refuses a call whose audit record cannot be made
    /// durable; `Open` lets it through and is refused while any tool is PHI.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
}

/// Behaviour when the audit trail cannot record an action.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FailurePolicy {
    /// Refuse the action.
    #[default]
    Closed,
    /// Let the action proceed unrecorded (never for PHI).
    Open,
}

/// Network reach of the server's pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSettings {
    /// Peers allowed to reach the sidecar's public port. Empty admits nobody.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub allowed_clients: Vec<NetworkPolicyPeer>,
    /// Extra non-PHI egress rules, rendered as declared and judged by the
    /// access-control check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub egress: Vec<NetworkPolicyEgressRule>,
}

/// Observed state of an MCPServer: what an auditor reads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MCPServerStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Compliant`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One verdict per HIPAA control.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub controls: Vec<ControlStatus>,
    /// Counts shown in printer columns.
    #[serde(default)]
    pub counts: Counts,
}

/// Verdict of one control, with what was observed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlStatus {
    /// Stable control id, e.g. `access-control`.
    pub id: String,
    /// The regulation it answers, e.g. `45 CFR 164.312(a)(1)`.
    pub citation: String,
    /// Pass, Fail or Unknown.
    pub verdict: Verdict,
    /// What was observed.
    pub message: String,
}

/// Outcome of a control check. Unknown is never rounded up to Pass.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Verdict {
    /// Observed to hold.
    Pass,
    /// Observed not to hold.
    Fail,
    /// Could not be observed.
    Unknown,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "Pass",
            Verdict::Fail => "Fail",
            Verdict::Unknown => "Unknown",
        })
    }
}

/// Counts of declared entries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Tools declared.
    pub tools: i32,
    /// Tools that touch PHI.
    pub phi_tools: i32,
    /// Resource policies declared.
    pub resources: i32,
    /// Prompt policies declared.
    pub prompts: i32,
    /// Distinct PHIStores used by tools.
    pub stores: i32,
}
