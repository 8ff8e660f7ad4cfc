//! `mcp-warden check`: the GitOps gate. Reads manifests, admits them as the
//! API server would, renders each MCPServer and reports every control.
//!
//! ```text
//!   FILE|DIR… ─ manifest::load_paths ─▶ servers, stores, NetworkPolicies, EmergencyAccess grants
//!      ├─ per MCPServer: render ─▶ compliance::evaluate ─▶ table | JSON
//!      └─ per grant: breakglass::judge against its server's procedure (a refusal is invalid input)
//!   exit 0 all pass (Unknown allowed) · 1 a control fails (or Unknown with --strict) · 2 invalid input
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use kube::ResourceExt;
use serde::Serialize;

use k8s_openapi::jiff;

use crate::api::{Counts, EmergencyAccess, GrantState, MCPServer, PHIStore, Verdict};
use crate::breakglass;
use crate::compliance::{self, Observations, Report};
use crate::manifest::{self, Loaded, ManifestError, Origin};
use crate::policy::namespace_of;
use crate::render::{self, Settings};

/// Exit status when every control passes (or is Unknown without `--strict`).
pub const EXIT_PASS: u8 = 0;
/// Exit status when a control fails (or is Unknown with `--strict`).
pub const EXIT_NON_COMPLIANT: u8 = 1;
/// Exit status when the input is invalid: unreadable, not YAML, refused by
/// the schema, or holding no MCPServer.
pub const EXIT_INVALID: u8 = 2;

/// The verdicts for one MCPServer.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResult {
    /// Where it was declared.
    pub origin: Origin,
    /// Namespace (empty when the manifest names none).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// What it declares (the printer columns' counts).
    pub counts: Counts,
    /// Verdicts.
    #[serde(flatten)]
    pub report: Report,
}

/// Everything `check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// One entry per MCPServer, in file order.
    pub servers: Vec<ServerResult>,
    /// Manifests that could not be admitted.
    pub errors: Vec<ManifestError>,
}

/// Checks the manifests under `paths`.
pub fn check_paths(paths: &[PathBuf], settings: &Settings) -> CheckResult {
    let (set, mut errors) = manifest::load_paths(paths);
    let mut stores: BTreeMap<String, BTreeMap<String, PHIStore>> = BTreeMap::new();
    for Loaded { origin, object } in &set.stores {
        let by_name = stores.entry(namespace_of(object)).or_default();
        if by_name.insert(object.name_any(), object.clone()).is_some() {
            errors.push(duplicate(origin, "PHIStore", object));
        }
    }
    let observations = Observations::from_manifests(set.network_policies.iter().map(|p| p.object.clone()).collect());
    let mut seen = BTreeMap::new();
    let mut servers = Vec::new();
    for Loaded { origin, object: server } in &set.servers {
        if seen.insert((namespace_of(server), server.name_any()), ()).is_some() {
            errors.push(duplicate(origin, "MCPServer", server));
            continue;
        }
        // Argument rules are compiled as the sidecar will compile them: a
        // rule it would refuse makes the manifest invalid, not a server
        // whose controls are merely Unknown.
        let invalid = crate::policy::arguments::invalid_rules(server);
        if !invalid.is_empty() {
            errors.extend(invalid.into_iter().map(|(field, why)| ManifestError {
                origin: origin.clone(),
                object: Some(format!("MCPServer {}/{}", namespace_of(server), server.name_any())),
                field: Some(field),
                message: why,
            }));
            continue;
        }
        let empty = BTreeMap::new();
        let stores = stores.get(&namespace_of(server)).unwrap_or(&empty);
        servers.push(ServerResult {
            origin: origin.clone(),
            namespace: namespace_of(server),
            name: server.name_any(),
            counts: server.spec.counts(),
            report: evaluate(server, stores, settings, &observations),
        });
    }
    errors.extend(set.emergency_grants.iter().filter_map(|g| judge_grant(g, &set.servers)));
    if servers.is_empty() && errors.is_empty() {
        let files = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        errors.push(ManifestError {
            origin: Origin { file: PathBuf::from(files), document: 0 },
            object: None,
            field: None,
            message: "no MCPServer found: nothing to check".into(),
        });
    }
    CheckResult { servers, errors }
}

fn evaluate(
    server: &MCPServer,
    stores: &BTreeMap<String, PHIStore>,
    settings: &Settings,
    observed: &Observations,
) -> Report {
    let rendered = render::render(server, stores, settings, None);
    compliance::evaluate(&compliance::Input { server, stores, rendered: rendered.as_ref(), settings, observed })
}

/// A grant that its server's procedure would refuse, as an error. Judged
/// as if created and (when it carries an approval) approved now: offline,
/// only what the grant says can be wrong, not when it happens.
fn judge_grant(grant: &Loaded<EmergencyAccess>, servers: &[Loaded<MCPServer>]) -> Option<ManifestError> {
    let (namespace, spec) = (namespace_of(&grant.object), &grant.object.spec);
    let object = Some(format!("EmergencyAccess {namespace}/{}", grant.object.name_any()));
    let error =
        |message: String| ManifestError { origin: grant.origin.clone(), object: object.clone(), field: None, message };
    let Some(server) =
        servers.iter().find(|s| namespace_of(&s.object) == namespace && s.object.name_any() == spec.server)
    else {
        return Some(error(format!("MCPServer {namespace}/{} is not among the manifests", spec.server)));
    };
    let declared: Vec<String> = server.object.spec.tools.iter().map(|t| t.name.clone()).collect();
    let now = jiff::Timestamp::now();
    let judgement = breakglass::judge(&breakglass::Facts {
        grant: spec,
        procedure: server.object.spec.emergency_access.as_ref(),
        declared_tools: &declared,
        created: now,
        approved_at: spec.approval.as_ref().map(|_| now),
        // The chart's admission policy is not among the manifests.
        admission: &breakglass::Admission::NotObserved,
        now,
    });
    (judgement.state == GrantState::Refused).then(|| error(format!("would be refused: {}", judgement.message)))
}

fn duplicate<K: ResourceExt>(origin: &Origin, kind: &str, obj: &K) -> ManifestError {
    ManifestError {
        origin: origin.clone(),
        object: Some(format!("{kind} {}/{}", namespace_of(obj), obj.name_any())),
        field: Some("metadata.name".into()),
        message: format!("a {kind} of this namespace and name was already declared"),
    }
}

impl CheckResult {
    /// The process exit status for this result.
    pub fn exit_code(&self, strict: bool) -> u8 {
        if !self.errors.is_empty() {
            return EXIT_INVALID;
        }
        let failing = self.servers.iter().any(|s| match s.report.compliant {
            Verdict::Fail => true,
            Verdict::Unknown => strict,
            Verdict::Pass => false,
        });
        if failing { EXIT_NON_COMPLIANT } else { EXIT_PASS }
    }

    /// JSON for pipelines.
    pub fn to_json(&self, strict: bool) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            let result = match self.exit_code(strict) {
                EXIT_PASS => "pass",
                EXIT_NON_COMPLIANT => "fail",
                _ => "invalid",
            };
            map.insert("result".into(), result.into());
            map.insert("strict".into(), strict.into());
        }
        value
    }

    /// A readable report: errors first, then one table per server, then a
    /// summary line.
    pub fn to_table(&self, strict: bool) -> String {
        let mut out = String::new();
        for error in &self.errors {
            let _ = writeln!(out, "ERROR {error}");
        }
        if !self.errors.is_empty() {
            out.push('\n');
        }
        let id_width = "CONTROL"
            .len()
            .max(self.servers.iter().flat_map(|s| &s.report.controls).map(|c| c.id.len()).max().unwrap_or(0));
        let cite_width = "CITATION"
            .len()
            .max(self.servers.iter().flat_map(|s| &s.report.controls).map(|c| c.citation.len()).max().unwrap_or(0));
        for server in &self.servers {
            let qualified = if server.namespace.is_empty() {
                server.name.clone()
            } else {
                format!("{}/{}", server.namespace, server.name)
            };
            let _ = writeln!(out, "MCPServer {qualified} — {}", server.origin);
            let _ = writeln!(out, "Compliant: {}", condition_status(server.report.compliant));
            let _ = writeln!(out, "  {:id_width$}  {:cite_width$}  {:7}  MESSAGE", "CONTROL", "CITATION", "VERDICT");
            for c in &server.report.controls {
                let _ = writeln!(
                    out,
                    "  {:id_width$}  {:cite_width$}  {:7}  {}",
                    c.id,
                    c.citation,
                    c.verdict.to_string(),
                    c.message
                );
            }
            out.push('\n');
        }
        let count = |v: Verdict| self.servers.iter().filter(|s| s.report.compliant == v).count();
        let _ = writeln!(
            out,
            "{} MCPServer(s): {} compliant, {} failing, {} unknown; {} invalid manifest(s){}",
            self.servers.len(),
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Unknown),
            self.errors.len(),
            if strict { " (--strict: Unknown fails)" } else { "" }
        );
        out
    }
}

/// Condition-style spelling of a roll-up verdict.
pub fn condition_status(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "True",
        Verdict::Fail => "False",
        Verdict::Unknown => "Unknown",
    }
}
