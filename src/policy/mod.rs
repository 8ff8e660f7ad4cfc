//! The compiled policy: one MCPServer's declarations, resolved against its
//! PHIStores into the form the sidecar (and later the broker) enforces.
//!
//! ```text
//!   MCPServer.spec ─┐
//!                   ├─ compile() ─▶ CompiledPolicy ─▶ ConfigMap `<name>-policy` (policy.json)
//!   PHIStores ──────┘                 │                 └─ its hash rolls the pods
//!                                     └─ CallerSet::admits(caller) — the one decision
//! ```
//!
//! The compiled form holds no secret: stores carry host, port, database and
//! TLS mode only. It is deterministic (sorted maps and sets), so its hash
//! changes exactly when the policy does.

pub mod arguments;
pub mod contained;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{AllowedCallers, FailurePolicy, MCPServer, Output, PHIStore, Privilege, SslMode};
use crate::deid::classification::{DeidError, tool_view_grants};
use crate::deid::scan::{ScanRules, Scanner};

/// Version of the compiled-policy format; the sidecar refuses others.
pub const POLICY_FORMAT_VERSION: u32 = 1;

/// What the sidecar enforces for one MCPServer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledPolicy {
    /// [`POLICY_FORMAT_VERSION`].
    pub format_version: u32,
    /// The MCPServer this policy belongs to.
    pub server: ServerRef,
    /// Authentication settings.
    pub authentication: CompiledAuthentication,
    /// Tools by name. A tool absent here is refused and hidden.
    pub tools: BTreeMap<String, CompiledTool>,
    /// Resource policies, longest prefix first.
    pub resources: Vec<CompiledResource>,
    /// Prompts by name.
    pub prompts: BTreeMap<String, CallerSet>,
    /// Lifetime of issued database credentials, in seconds.
    pub credential_ttl_seconds: u64,
    /// What happens when an audit record cannot be written.
    pub audit_failure_policy: FailurePolicy,
    /// The PHIStores tools use, by name (connection facts only).
    pub stores: BTreeMap<String, CompiledStore>,
    /// Whose pseudonyms the de-identified tools see (views of
    /// `deid_<scope>`).
    pub pseudonym_scope: String,
    /// The tools a break-glass grant may open (`emergencyAccess.tools`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub emergency_tools: BTreeSet<String>,
}

/// Namespace and name of an MCPServer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerRef {
    /// Namespace (empty when a manifest names none).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ServerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() { f.write_str(&self.name) } else { write!(f, "{}/{}", self.namespace, self.name) }
    }
}

/// Token checks of the resource server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledAuthentication {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`: this server's resource URI.
    pub audience: String,
    /// Claim holding groups.
    pub groups_claim: String,
    /// Scopes every token must carry.
    pub required_scopes: BTreeSet<String>,
    /// Claims taken from a token for argument rules (`caller.claims.<name>`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub rule_claims: BTreeSet<String>,
}

/// One tool's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledTool {
    /// Touches PHI.
    pub phi: bool,
    /// Declared purpose (recorded with every call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Who may list and call it.
    pub callers: CallerSet,
    /// Whether its answers are de-identified (grants on the scope's views)
    /// or identified (grants on the tables).
    #[serde(default)]
    pub output: Output,
    /// Grants per store: on `deid_<scope>` views for a de-identified tool.
    pub data_access: BTreeMap<String, Vec<CompiledTableGrant>>,
    /// Stores on which the database proxy lets this tool run COPY.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub copy_stores: BTreeSet<String>,
    /// For a de-identified tool with data access: what the sidecar searches
    /// its answers for (the Safe Harbor shapes, and its stores' own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanRules>,
    /// Its declared arguments (a closed set), when declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Vec<arguments::CompiledArgument>>,
    /// Rules over its arguments (CEL sources, validated when compiled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argument_rules: Vec<crate::api::ArgumentRule>,
}

/// Column grants on one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledTableGrant {
    /// `schema.table`.
    pub table: String,
    /// Columns, sorted.
    pub columns: BTreeSet<String>,
    /// Privileges, sorted.
    pub privileges: BTreeSet<Privilege>,
}

/// One resource policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledResource {
    /// URI prefix.
    pub uri_prefix: String,
    /// Holds PHI.
    pub phi: bool,
    /// Who may list and read.
    pub callers: CallerSet,
}

/// Connection facts of a PHIStore (no credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledStore {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub database: String,
    /// libpq sslmode.
    pub ssl_mode: SslMode,
}

/// The callers admitted to one tool, resource or prompt.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CallerSet {
    /// Admitted groups.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub groups: BTreeSet<String>,
    /// Admitted subjects.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub subjects: BTreeSet<String>,
    /// Any authenticated caller.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_authenticated: bool,
}

/// An authenticated caller, as the sidecar learns it from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `sub`.
    pub subject: String,
    /// Groups from the groups claim.
    pub groups: BTreeSet<String>,
    /// Break-glass grants in force for this caller now (the sidecar learns
    /// them from the broker when a decision needs them; empty otherwise).
    pub emergency: Vec<crate::breakglass::ActiveGrant>,
    /// The token's claims the policy names for argument rules
    /// (`authentication.ruleClaims`), those with a usable value.
    pub claims: BTreeMap<String, serde_json::Value>,
}

impl Caller {
    /// A caller with a subject and groups, and nothing else.
    pub fn new(subject: impl Into<String>, groups: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Caller {
            subject: subject.into(),
            groups: groups.into_iter().map(Into::into).collect(),
            emergency: Vec::new(),
            claims: BTreeMap::new(),
        }
    }
}

impl CallerSet {
    /// Whether this set admits the caller: by subject, by any shared group,
    /// or because any authenticated caller is admitted.
    pub fn admits(&self, caller: &Caller) -> bool {
        self.any_authenticated
            || self.subjects.contains(&caller.subject)
            || caller.groups.iter().any(|g| self.groups.contains(g))
    }

    /// Whether the set names nobody.
    pub fn is_empty(&self) -> bool {
        !self.any_authenticated && self.groups.is_empty() && self.subjects.is_empty()
    }
}

impl From<&AllowedCallers> for CallerSet {
    fn from(a: &AllowedCallers) -> Self {
        CallerSet {
            groups: a.groups.iter().cloned().collect(),
            subjects: a.subjects.iter().cloned().collect(),
            any_authenticated: a.any_authenticated,
        }
    }
}

/// Why a policy cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An argument rule is not accepted.
    #[error("tool {tool:?}: argumentRules[{index}] {why}")]
    ArgumentRule {
        /// The tool.
        tool: String,
        /// The rule's position.
        index: usize,
        /// Why.
        why: String,
    },
    /// A tool names a PHIStore that does not exist in the namespace.
    #[error("tool {tool:?} uses PHIStore {store:?}, which does not exist in namespace {namespace:?}")]
    MissingStore {
        /// The tool.
        tool: String,
        /// The missing store.
        store: String,
        /// Where it was looked for.
        namespace: String,
    },
    /// The credential TTL is not a duration mcp-warden accepts.
    #[error("credentials.ttl {ttl:?} is invalid: {reason}")]
    InvalidTtl {
        /// The declared value.
        ttl: String,
        /// Why.
        reason: String,
    },
    /// A de-identified tool's grants cannot be served as views.
    #[error("tool {tool:?}: {error}")]
    Deidentification {
        /// The tool.
        tool: String,
        /// Why.
        error: DeidError,
    },
    /// A PHIStore's port is out of range.
    #[error("PHIStore {store:?} has port {port}, outside 1-65535")]
    InvalidStorePort {
        /// The store.
        store: String,
        /// The port.
        port: i32,
    },
}

/// Namespace of an object, empty when unset.
pub fn namespace_of<K: ResourceExt>(obj: &K) -> String {
    obj.namespace().unwrap_or_default()
}

/// Names of the PHIStores that the server's tools use (callers are always
/// named: the schema refuses an empty `allowedCallers`).
pub fn stores_in_use(server: &MCPServer) -> BTreeSet<String> {
    server
        .spec
        .tools
        .iter()
        .filter(|t| !CallerSet::from(&t.allowed_callers).is_empty())
        .flat_map(|t| t.data_access.iter().map(|d| d.store.clone()))
        .collect()
}

/// Compiles the server's policy. `stores` maps store names to PHIStores of
/// the server's namespace.
pub fn compile(server: &MCPServer, stores: &BTreeMap<String, PHIStore>) -> Result<CompiledPolicy, PolicyError> {
    let spec = &server.spec;
    let namespace = namespace_of(server);
    let scope = spec.pseudonym_scope.clone().unwrap_or_else(|| crate::deid::default_scope(&server.name_any()));
    let mut compiled_stores = BTreeMap::new();
    let mut tools = BTreeMap::new();
    let rule_claims: BTreeSet<String> = spec.authentication.oidc.rule_claims.iter().cloned().collect();
    for tool in &spec.tools {
        let mut data_access = BTreeMap::new();
        let mut copy_stores = BTreeSet::new();
        let mut scan = ScanRules::default();
        for access in &tool.data_access {
            if access.allow_copy {
                copy_stores.insert(access.store.clone());
            }
            let Some(store) = stores.get(&access.store) else {
                return Err(PolicyError::MissingStore {
                    tool: tool.name.clone(),
                    store: access.store.clone(),
                    namespace: namespace.clone(),
                });
            };
            let pg = &store.spec.postgres;
            let port = u16::try_from(pg.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PolicyError::InvalidStorePort { store: access.store.clone(), port: pg.port })?;
            compiled_stores.insert(
                access.store.clone(),
                CompiledStore { host: pg.host.clone(), port, database: pg.database.clone(), ssl_mode: pg.ssl_mode },
            );
            let grants = match tool.output {
                Output::Identified => access
                    .tables
                    .iter()
                    .map(|t| CompiledTableGrant {
                        table: t.name.clone(),
                        columns: t.columns.iter().cloned().collect(),
                        privileges: t.privileges.iter().copied().collect(),
                    })
                    .collect(),
                Output::Deidentified => {
                    let deid = store.spec.deidentification.as_ref();
                    let refused = |error| PolicyError::Deidentification { tool: tool.name.clone(), error };
                    let grants = tool_view_grants(&scope, &access.store, deid, &access.tables).map_err(refused)?;
                    add_scan_rules(&mut scan, &access.store, deid).map_err(refused)?;
                    grants.grants
                }
            };
            data_access.insert(access.store.clone(), grants);
        }
        tools.insert(
            tool.name.clone(),
            CompiledTool {
                phi: tool.phi,
                purpose: tool.purpose.clone(),
                callers: CallerSet::from(&tool.allowed_callers),
                output: tool.output,
                scan: (tool.output == Output::Deidentified && !data_access.is_empty()).then_some(scan),
                data_access,
                copy_stores,
                arguments: tool.arguments.clone(),
                argument_rules: tool.argument_rules.clone(),
            },
        );
        for (index, rule) in tool.argument_rules.iter().enumerate() {
            arguments::validate_rule(&rule.rule, &rule_claims).map_err(|why| PolicyError::ArgumentRule {
                tool: tool.name.clone(),
                index,
                why,
            })?;
        }
    }
    let mut resources: Vec<CompiledResource> = spec
        .resources
        .iter()
        .map(|r| CompiledResource {
            uri_prefix: r.uri_prefix.clone(),
            phi: r.phi,
            callers: CallerSet::from(&r.allowed_callers),
        })
        .collect();
    resources.sort_by(|a, b| b.uri_prefix.len().cmp(&a.uri_prefix.len()).then_with(|| a.uri_prefix.cmp(&b.uri_prefix)));
    let ttl = parse_go_duration(&spec.credentials.ttl)
        .map_err(|reason| PolicyError::InvalidTtl { ttl: spec.credentials.ttl.clone(), reason })?;
    let oidc = &spec.authentication.oidc;
    Ok(CompiledPolicy {
        format_version: POLICY_FORMAT_VERSION,
        server: ServerRef { namespace, name: server.name_any() },
        authentication: CompiledAuthentication {
            issuer: oidc.issuer.clone(),
            audience: oidc.audience.clone(),
            groups_claim: oidc.groups_claim.clone(),
            required_scopes: oidc.required_scopes.iter().cloned().collect(),
            rule_claims: oidc.rule_claims.iter().cloned().collect(),
        },
        tools,
        resources,
        prompts: spec.prompts.iter().map(|p| (p.name.clone(), CallerSet::from(&p.allowed_callers))).collect(),
        credential_ttl_seconds: ttl.as_secs(),
        audit_failure_policy: spec.audit.failure_policy,
        stores: compiled_stores,
        pseudonym_scope: scope,
        emergency_tools: spec.emergency_access.iter().flat_map(|p| p.tools.iter().cloned()).collect(),
    })
}

/// Adds a store's identifier patterns and allowances to a tool's scan
/// rules, proving they compile.
pub(crate) fn add_scan_rules(
    scan: &mut ScanRules,
    store: &str,
    deid: Option<&crate::api::Deidentification>,
) -> Result<(), DeidError> {
    let invalid = |problem: String| DeidError::InvalidClassification { store: store.into(), problems: vec![problem] };
    let Some(deid) = deid else { return Ok(()) };
    for pattern in &deid.identifier_patterns {
        match scan.patterns.get(&pattern.name) {
            Some(other) if *other != pattern.regex => {
                return Err(invalid(format!(
                    "identifier pattern {:?} differs from the one another store of the tool declares",
                    pattern.name
                )));
            }
            _ => {
                scan.patterns.insert(pattern.name.clone(), pattern.regex.clone());
            }
        }
    }
    for allow in &deid.scan_allow {
        scan.allow.entry(allow.pattern.clone()).or_default().extend(allow.fields.iter().cloned());
    }
    Scanner::new(scan).map(|_| ()).map_err(invalid)
}

impl CompiledPolicy {
    /// Compiles every tool's argument rules as the sidecar will run them;
    /// the first that is not accepted, named.
    pub fn check_argument_rules(&self) -> Result<(), String> {
        for (name, tool) in &self.tools {
            for (index, rule) in tool.argument_rules.iter().enumerate() {
                arguments::validate_rule(&rule.rule, &self.authentication.rule_claims)
                    .map_err(|why| format!("tool {name:?}: argumentRules[{index}] {why}"))?;
            }
        }
        Ok(())
    }

    /// Canonical JSON of the policy (what the ConfigMap holds).
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// SHA-256 of [`Self::to_json`], hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.to_json().as_bytes()))
    }

    /// Whether `grant` opens `tool` to `subject` (its end is the caller's
    /// to check against a clock): the tool is in the procedure, the grant is
    /// the subject's and names the tool, and a tool answering with identified
    /// PHI only under a grant allowing identified output. The gateway and
    /// the broker decide with this one rule.
    pub fn grant_opens(&self, grant: &crate::breakglass::ActiveGrant, subject: &str, tool: &str) -> bool {
        let Some(compiled) = self.tools.get(tool).filter(|_| self.emergency_tools.contains(tool)) else {
            return false;
        };
        grant.beneficiary == subject
            && grant.tools.iter().any(|t| t == tool)
            && (compiled.output != crate::api::Output::Identified || grant.identified_output)
    }

    /// Whether `tool` answers with identified PHI and is in the break-glass
    /// procedure: then it is served only under a grant allowing identified
    /// output, whoever its `allowedCallers` name.
    pub fn break_glass_only(&self, tool: &str) -> bool {
        self.emergency_tools.contains(tool)
            && self.tools.get(tool).is_some_and(|t| t.output == crate::api::Output::Identified)
    }
}

/// Parses the subset of Go durations the schema admits (`1h30m`, `15m`,
/// `900s`).
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit = match ch {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            other => return Err(format!("unexpected {other:?}: use h, m and s, as in 15m or 1h")),
        };
        let n: u64 = digits.parse().map_err(|_| format!("a number must come before {ch:?}"))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or("duration too large")?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err("a unit (h, m or s) must follow every number".into());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(sub: &str, groups: &[&str]) -> Caller {
        Caller::new(sub, groups.iter().copied())
    }

    #[test]
    fn caller_set_admits_by_group_subject_or_anyone() {
        let set = CallerSet {
            groups: ["front-desk".into()].into(),
            subjects: ["bob".into()].into(),
            any_authenticated: false,
        };
        assert!(set.admits(&caller("alice", &["front-desk"])));
        assert!(set.admits(&caller("bob", &[])));
        assert!(!set.admits(&caller("mallory", &["billing"])));
        // Group names are exact: no prefix or case folding.
        assert!(!set.admits(&caller("eve", &["front-desk-2", "Front-Desk"])));
        let anyone = CallerSet { any_authenticated: true, ..CallerSet::default() };
        assert!(anyone.admits(&caller("x", &[])));
        assert!(CallerSet::default().is_empty());
        assert!(!CallerSet::default().admits(&caller("x", &["any"])));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_go_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("45s"), Ok(Duration::from_secs(45)));
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("15").is_err());
        assert!(parse_go_duration("m").is_err());
        assert!(parse_go_duration("1d").is_err());
        assert!(parse_go_duration("99999999999999999999h").is_err());
    }
}
