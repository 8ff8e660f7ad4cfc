//! `mcp-warden report`: an auditor's document from evidence held outside
//! the MCP servers — the collector's storage, plus manifests for the
//! controls.
//!
//! ```text
//!   storage ── read_records ── Query::select (the code of `audit query`) ─┐
//!          └── verify_dir (with the auditor's checkpoint key) ────────────┤
//!   manifests ─ check_paths (the code of `check`) ─────────────────────────┼─ summarize ─▶ AuditReport
//!                                                                          │                 ├─ html::render (one file)
//!                                                                          │                 └─ JSON
//! ```
//!
//! Every number is a count of rows `audit query` selects over the same
//! records with the same filters; nothing is computed a second way. The
//! output depends only on its inputs (no clock in it), so the same evidence
//! gives the same bytes, and its SHA-256 is printed for the file of record.

pub mod chart;
pub mod html;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::api::{ControlStatus, Verdict};
use crate::audit::query::{Query, read_records};
use crate::audit::record::{ControlVerdict, Decision, Kind, Record};
use crate::audit::verify::{StreamReport, VerifyOptions, VerifyReport, verify_dir};

/// What the report is made from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The collector's storage (or any directory of streams).
    pub storage: PathBuf,
    /// Manifests holding the MCPServers (and their PHIStores).
    pub manifests: Vec<PathBuf>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records before this time.
    pub until: Option<DateTime<Utc>>,
    /// The collector's checkpoint public key, as the auditor was given it.
    pub checkpoint_key: Option<[u8; 32]>,
}

/// The auditor's document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditReport {
    /// The period covered (RFC 3339; `null`: unbounded).
    pub period: Period,
    /// Where the evidence came from.
    pub storage: String,
    /// Controls per MCPServer.
    pub servers: Vec<ServerControls>,
    /// The trail's integrity.
    pub trail: Trail,
    /// PHI access per caller and tool.
    pub phi_access: Vec<Access>,
    /// PHI calls per day (allowed, refused).
    pub days: Vec<Day>,
    /// Refusals by class.
    pub refusals: Vec<Refusals>,
    /// Use of emergency grants.
    pub emergency: Vec<GrantUse>,
    /// What this report cannot show.
    pub limits: Vec<String>,
}

/// The period.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Period {
    /// Start (inclusive).
    pub since: Option<String>,
    /// End (exclusive).
    pub until: Option<String>,
    /// The last record in the period: what "as of" means for the trail.
    pub last_record: Option<String>,
}

/// One MCPServer's controls.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerControls {
    /// `namespace/name`.
    pub server: String,
    /// Where the verdicts come from and as of when.
    pub assessed: String,
    /// Every control, with citation, verdict and evidence.
    pub controls: Vec<ControlStatus>,
    /// Per control, its verdicts in the period as the operator recorded
    /// them (empty when the trail holds none).
    pub history: Vec<ControlHistory>,
}

/// One control's verdicts over the period, from the operator's records.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ControlHistory {
    /// The control's id.
    pub id: String,
    /// Its verdict when the period began (the last change before it).
    pub at_start: Option<String>,
    /// Changes within the period: time and new verdict.
    pub changes: Vec<(String, String)>,
}

/// The trail's integrity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Trail {
    /// Every chain whole (and every checkpoint signature good, when a key
    /// was given).
    pub passed: bool,
    /// Whether checkpoint signatures were checked against the auditor's key.
    pub key_supplied: bool,
    /// Per stream, as `audit verify` reports it.
    pub streams: Vec<StreamReport>,
    /// Problems outside any stream, and breaks.
    pub problems: Vec<String>,
    /// Integrity incidents on record (e.g. a stream that ended unsealed).
    pub incidents: Vec<String>,
}

/// Calls of one PHI tool by one caller.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Access {
    /// The caller's subject.
    pub caller: String,
    /// `namespace/name` of the MCPServer.
    pub server: String,
    /// The tool.
    pub tool: String,
    /// Allowed decisions.
    pub allowed: usize,
    /// Refused decisions.
    pub refused: usize,
}

/// One day's PHI calls.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Day {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Allowed.
    pub allowed: usize,
    /// Refused.
    pub refused: usize,
}

/// Refusals of one class.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Refusals {
    /// `deny` or `authn-failure`.
    pub decision: String,
    /// The recorded reason class.
    pub reason: String,
    /// How many.
    pub count: usize,
}

/// Use of one emergency grant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GrantUse {
    /// The EmergencyAccess's name.
    pub grant: String,
    /// Who acted under it.
    pub callers: Vec<String>,
    /// Tools used under it.
    pub tools: Vec<String>,
    /// Records under it (decisions, outcomes, statements, leases).
    pub records: usize,
    /// First record.
    pub first: Option<String>,
    /// Last record.
    pub last: Option<String>,
}

fn decision_name(decision: Option<Decision>) -> &'static str {
    match decision {
        Some(Decision::Allow) => "allow",
        Some(Decision::Deny) => "deny",
        Some(Decision::AuthnFailure) => "authn-failure",
        None => "-",
    }
}

/// The decision records of the period, as `audit query` selects them.
pub fn period_query(inputs: &Inputs) -> Query {
    Query { since: inputs.since, until: inputs.until, kinds: vec![Kind::Decision], ..Default::default() }
}

/// Reads the evidence and summarizes it.
pub fn build(inputs: &Inputs) -> AuditReport {
    let loaded = read_records(&inputs.storage);
    let verified =
        verify_dir(&inputs.storage, VerifyOptions { require_sealed: false, checkpoint_key: inputs.checkpoint_key });
    let servers = if inputs.manifests.is_empty() {
        Vec::new()
    } else {
        let checked = crate::check::check_paths(&inputs.manifests, &crate::render::Settings::default());
        checked
            .servers
            .into_iter()
            .map(|s| ServerControls {
                server: format!("{}/{}", s.namespace, s.name),
                assessed: format!("offline check of {} when this report was made", s.origin.file.display()),
                controls: s.report.controls,
                history: Vec::new(),
            })
            .collect()
    };
    let mut report = summarize(inputs, &loaded.records, &verified, servers);
    report.trail.problems.extend(loaded.problems);
    report
}

/// The report over records already read (pure).
pub fn summarize(
    inputs: &Inputs,
    records: &[Record],
    verified: &VerifyReport,
    servers: Vec<ServerControls>,
) -> AuditReport {
    let period = period_query(inputs);
    let servers = with_history(servers, inputs, records);
    let decisions = period.select(records);
    let phi = Query { phi_only: true, ..period.clone() }.select(records);

    let mut access: BTreeMap<(String, String, String), (usize, usize)> = BTreeMap::new();
    let mut days: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for row in &phi {
        let e = &row.record.event;
        let Some(caller) = e.caller.as_ref() else { continue };
        let allowed = e.decision == Some(Decision::Allow);
        let key = (caller.sub.clone(), row.record.server.clone(), e.tool.clone().unwrap_or_default());
        let counts = access.entry(key).or_default();
        let day = days.entry(row.record.time.get(..10).unwrap_or_default().to_string()).or_default();
        if allowed {
            counts.0 += 1;
            day.0 += 1;
        } else {
            counts.1 += 1;
            day.1 += 1;
        }
    }
    let mut refusals: BTreeMap<(String, String), usize> = BTreeMap::new();
    for row in &decisions {
        let e = &row.record.event;
        if matches!(e.decision, Some(Decision::Deny | Decision::AuthnFailure)) {
            let reason = e.reason.clone().unwrap_or_else(|| "-".into());
            *refusals.entry((decision_name(e.decision).to_string(), reason)).or_default() += 1;
        }
    }
    let all_kinds = vec![Kind::Decision, Kind::Outcome, Kind::Lease, Kind::Statement];
    let emergency = Query { emergency: Some(None), kinds: all_kinds, ..period.clone() }.select(records);
    let mut grants: BTreeMap<String, GrantUse> = BTreeMap::new();
    for row in &emergency {
        let e = &row.record.event;
        let Some(name) = &e.emergency_access else { continue };
        let entry = grants.entry(name.clone()).or_insert_with(|| GrantUse {
            grant: name.clone(),
            callers: Vec::new(),
            tools: Vec::new(),
            records: 0,
            first: None,
            last: None,
        });
        entry.records += 1;
        entry.first.get_or_insert_with(|| row.record.time.clone());
        entry.last = Some(row.record.time.clone());
        if let Some(c) = &e.caller
            && !entry.callers.contains(&c.sub)
        {
            entry.callers.push(c.sub.clone());
        }
        if let Some(t) = &e.tool
            && !entry.tools.contains(t)
        {
            entry.tools.push(t.clone());
        }
    }
    let incidents: Vec<String> = records
        .iter()
        .filter(|r| r.event.kind == Kind::Incident)
        .filter_map(|r| {
            let i = r.event.incident.as_ref()?;
            Some(format!("{} {:?} on {}: {}", r.time, i.class, i.stream, i.detail))
        })
        .collect();
    let last_record = decisions.last().map(|r| r.record.time.clone());
    let key_supplied = inputs.checkpoint_key.is_some();
    let trail = Trail {
        passed: verified.passed(),
        key_supplied,
        streams: verified.streams.clone(),
        problems: verified.problems.clone(),
        incidents,
    };
    let mut limits = vec![
        "Control history comes from the verdict changes the operator records (with --audit-dir, shipped to \
         the collector); a server whose operator ran without it, or before this version, has none, and its \
         verdicts are those of the manifests given."
            .to_string(),
        "A decision is recorded before the call is forwarded; an outcome can be missing when a node failed \
         in the ≤10 ms before it was made durable (a decision without an outcome reads as a call cut off)."
            .to_string(),
        "What a caller did with an answer after it left the sidecar is outside the trail.".to_string(),
        "Records are as complete as the sidecars that wrote them: a pod running without the sidecar writes \
         none (the admission policy refuses such pods where a namespace opted in)."
            .to_string(),
    ];
    if !key_supplied {
        limits.insert(
            0,
            "No checkpoint key was supplied: the chains are whole, but nothing shows that a stream's tail \
             was not cut and rewritten by whoever holds the storage."
                .to_string(),
        );
    }
    if servers.is_empty() {
        limits.insert(
            0,
            "No manifests were given and the trail holds no verdict record: no control is assessed here.".to_string(),
        );
    }
    let rfc = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    AuditReport {
        period: Period { since: rfc(inputs.since), until: rfc(inputs.until), last_record },
        storage: inputs.storage.display().to_string(),
        servers,
        trail,
        phi_access: access
            .into_iter()
            .map(|((caller, server, tool), (allowed, refused))| Access { caller, server, tool, allowed, refused })
            .collect(),
        days: days.into_iter().map(|(day, (allowed, refused))| Day { day, allowed, refused }).collect(),
        refusals: refusals
            .into_iter()
            .map(|((decision, reason), count)| Refusals { decision, reason, count })
            .collect(),
        emergency: grants.into_values().collect(),
        limits,
    }
}

/// One control's verdict records: time and verdict, oldest first.
type Recorded<'a> = Vec<(&'a str, &'a ControlVerdict)>;

/// Adds each server's control history from the operator's `verdict`
/// records (as `audit query --kind verdict` selects them); servers only the
/// trail knows are added with the operator's latest verdicts.
fn with_history(mut servers: Vec<ServerControls>, inputs: &Inputs, records: &[Record]) -> Vec<ServerControls> {
    let up_to_end = Query { until: inputs.until, kinds: vec![Kind::Verdict], ..Default::default() }.select(records);
    // server → control id → its records, oldest first.
    let mut by_server: BTreeMap<&str, BTreeMap<&str, Recorded<'_>>> = BTreeMap::new();
    for row in &up_to_end {
        if let Some(c) = &row.record.event.control {
            let history = by_server.entry(row.record.server.as_str()).or_default().entry(c.id.as_str()).or_default();
            history.push((row.record.time.as_str(), c));
        }
    }
    let in_period = |time: &str| {
        DateTime::parse_from_rfc3339(time)
            .is_ok_and(|t| inputs.since.is_none_or(|since| t.with_timezone(&Utc) >= since))
    };
    for (server, controls) in &by_server {
        if !servers.iter().any(|s| s.server == *server) {
            let latest = controls.values().filter_map(|h| h.last()).map(|(t, _)| *t).max().unwrap_or_default();
            servers.push(ServerControls {
                server: server.to_string(),
                assessed: format!("by the operator in the cluster, as recorded in the trail (latest change {latest})"),
                controls: controls
                    .iter()
                    .filter_map(|(id, h)| {
                        let (_, last) = h.last()?;
                        Some(ControlStatus {
                            id: id.to_string(),
                            citation: last.citation.clone(),
                            verdict: parse_verdict(&last.verdict),
                            message: last.message.clone(),
                        })
                    })
                    .collect(),
                history: Vec::new(),
            });
        }
    }
    for server in &mut servers {
        let Some(controls) = by_server.get(server.server.as_str()) else { continue };
        server.history = controls
            .iter()
            .map(|(id, h)| ControlHistory {
                id: id.to_string(),
                at_start: h.iter().rev().find(|(t, _)| !in_period(t)).map(|(_, c)| c.verdict.clone()),
                changes: h
                    .iter()
                    .filter(|(t, _)| in_period(t))
                    .map(|(t, c)| (t.to_string(), c.verdict.clone()))
                    .collect(),
            })
            .collect();
    }
    servers.sort_by(|a, b| a.server.cmp(&b.server));
    servers
}

fn parse_verdict(text: &str) -> Verdict {
    match text {
        "Pass" => Verdict::Pass,
        "Fail" => Verdict::Fail,
        _ => Verdict::Unknown,
    }
}

/// The distinct callers who reached PHI (allowed), for the summary line.
pub fn callers_with_access(report: &AuditReport) -> BTreeSet<&str> {
    report.phi_access.iter().filter(|a| a.allowed > 0).map(|a| a.caller.as_str()).collect()
}
