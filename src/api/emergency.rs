//! Break-glass: the procedure an MCPServer declares
//! (`spec.emergencyAccess`) and the `EmergencyAccess` grants people request
//! under it.
//!
//! ```text
//!   MCPServer.spec.emergencyAccess   approvers (users/groups), maxDuration ≤ 4h, tools, approval mode
//!   EmergencyAccess (namespaced)     server, requester, beneficiary (MCP sub), tools, reason, duration
//!     spec.approval                  set by a second person (an UPDATE; admission checks who)
//!     status                         Pending → Active → Expired | Revoked | Refused (why), times stamped by the controller
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest grant any procedure may allow.
pub const MAX_EMERGENCY_DURATION: &str = "4h";

/// How a grant starts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ApprovalMode {
    /// A second person approves before the grant starts.
    #[default]
    Required,
    /// The requester activates at once (no approver reachable); everyone is
    /// alerted, and an approver's review is due within `reviewWithin`.
    ReviewAfter,
}

/// Who may approve (or review) grants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.users) && size(self.users) > 0) || (has(self.groups) && size(self.groups) > 0)").message("approvers names nobody: list Kubernetes users or groups"))]
pub struct Approvers {
    /// Kubernetes usernames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub users: Vec<String>,
    /// Kubernetes groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub groups: Vec<String>,
}

/// An MCPServer's break-glass procedure.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyProcedure {
    /// Who may approve or review grants (never the requester or the
    /// beneficiary).
    pub approvers: Approvers,
    /// The longest grant (Go duration, at most 4h).
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('4h') && duration(self) >= duration('1m')").message("maxDuration must be between 1m and 4h"))]
    pub max_duration: String,
    /// The declared tools a grant may open.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tools: Vec<String>,
    /// `Required` (default) or `ReviewAfter`.
    #[serde(default)]
    pub approval: ApprovalMode,
    /// For `ReviewAfter`: when the review is due after activation (Go
    /// duration, at most 72h).
    #[serde(default = "default_review_within")]
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('72h')").message("reviewWithin may be at most 72h"))]
    pub review_within: String,
    /// How the issuer's subjects appear as Kubernetes usernames (the API
    /// server's `--oidc-username-prefix`, e.g. `oidc:`): a beneficiary
    /// `alice` is the Kubernetes user `oidc:alice`, who may not approve
    /// her own grant.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 64))]
    pub kubernetes_username_prefix: String,
}

fn default_review_within() -> String {
    "24h".into()
}

/// A request for emergency access to one MCPServer's tools, for one caller.
// clippy reads the repeated `type_ = "string"` of printcolumn(...) as a
// duplicated attribute; they are arguments of distinct columns.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mcpwarden.io",
    version = "v1alpha1",
    kind = "EmergencyAccess",
    plural = "emergencyaccesses",
    singular = "emergencyaccess",
    shortname = "ea",
    category = "mcpwarden",
    namespaced,
    status = "EmergencyAccessStatus",
    derive = "PartialEq",
    doc = "Break-glass: emergency access to declared tools of one MCPServer for one caller, approved (or reviewed) by a second person, bounded and on the record.",
    printcolumn(name = "Server", type_ = "string", json_path = ".spec.server"),
    printcolumn(name = "Requester", type_ = "string", json_path = ".spec.requester"),
    printcolumn(name = "Approver", type_ = "string", json_path = ".spec.approval.approver"),
    printcolumn(name = "Tools", type_ = "string", json_path = ".spec.tools"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".status.expiresAt"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.duration) <= duration('4h') && duration(self.duration) >= duration('1m')").message("duration must be between 1m and 4h").field_path(".duration"))]
pub struct EmergencyAccessSpec {
    /// The MCPServer, in this namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub server: String,
    /// The Kubernetes user who asks (admission checks it is the creator).
    #[schemars(length(min = 1, max = 256))]
    pub requester: String,
    /// The MCP caller the grant is for: a `sub` of the server's issuer.
    #[schemars(length(min = 1, max = 256))]
    pub beneficiary: String,
    /// The tools it opens (each in the server's procedure).
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tools: Vec<String>,
    /// Why (required; shown to approvers and auditors).
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// How long once active (Go duration, at most the procedure's
    /// `maxDuration`, never over 4h).
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    pub duration: String,
    /// Whether `Identified` tools may answer with real values under it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identified_output: bool,
    /// The second person's approval (or, for `ReviewAfter`, review).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Set to end the grant now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

/// An approver's act.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The approver's Kubernetes username (admission checks it is the user
    /// who set it).
    #[schemars(length(min = 1, max = 256))]
    pub approver: String,
    /// A note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub note: Option<String>,
}

/// Where a grant stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GrantState {
    /// Waiting for approval.
    Pending,
    /// In force.
    Active,
    /// Its time is over.
    Expired,
    /// Ended by `revoked` (or deletion).
    Revoked,
    /// Never in force; `message` says why.
    Refused,
}

/// Observed state of a grant, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyAccessStatus {
    /// The state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<GrantState>,
    /// Why (for `Refused`), or what holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the controller first saw the approval (or review).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<Time>,
    /// When the grant came into force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Time>,
    /// When it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// For `ReviewAfter`: when the review is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_due_at: Option<Time>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
