//! `audit query`: an auditor's questions over stored streams — by caller,
//! server, tool, time window, decision, PHI, break-glass grant.
//!
//! ```text
//!   DIR/**/seg-*.jsonl ─ read_records ─▶ records ─ Query::select ─▶ rows (decision ⋈ outcome by correlation)
//!                                                                  ├─ to_table: one row per matching record
//!                                                                  └─ to_json_lines: the matching records verbatim
//! ```
//!
//! Query reads; it does not prove. Run `audit verify` for integrity: an
//! unreadable line is reported, never skipped in silence.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::record::{Decision, Kind, Record};
use super::segment;

/// What to select. Every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The caller's `sub`.
    pub caller: Option<String>,
    /// The MCPServer, `namespace/name`.
    pub server: Option<String>,
    /// The tool (or resource prefix, prompt).
    pub tool: Option<String>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records before this time.
    pub until: Option<DateTime<Utc>>,
    /// The decision (decision records only).
    pub decision: Option<Decision>,
    /// Only records of PHI tools (`phi: true`).
    pub phi_only: bool,
    /// Only records made under break-glass: `Some(None)` any grant,
    /// `Some(Some(name))` that EmergencyAccess.
    pub emergency: Option<Option<String>>,
    /// The record kinds; empty: decisions and leases.
    pub kinds: Vec<Kind>,
}

/// Records read from a directory, and what could not be read.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every readable record.
    pub records: Vec<Record>,
    /// One line per unreadable file or line (position and class only).
    pub problems: Vec<String>,
}

/// Reads every record of every stream under `dir`.
pub fn read_records(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        match entry {
            Ok(e) if e.file_type().is_dir() => dirs.push(e.into_path()),
            Ok(_) => {}
            Err(e) => loaded.problems.push(format!("cannot read {}: {e}", e.path().unwrap_or(dir).display())),
        }
    }
    for stream_dir in dirs {
        let segments = match segment::list_segments(&stream_dir) {
            Ok(s) => s,
            Err(e) => {
                loaded.problems.push(format!("{}: {e}", stream_dir.display()));
                continue;
            }
        };
        for (_, path) in segments {
            match segment::read_lines(&path) {
                Ok(lines) => {
                    for line in lines {
                        match Record::parse_line(&line.bytes) {
                            Ok(record) => loaded.records.push(record),
                            Err(e) => loaded.problems.push(format!("{} line {}: {e}", path.display(), line.number)),
                        }
                    }
                }
                Err(e) => loaded.problems.push(format!("{}: {e}", path.display())),
            }
        }
    }
    if loaded.records.is_empty() && loaded.problems.is_empty() {
        loaded.problems.push(format!("no audit records (seg-*.jsonl) found under {}", dir.display()));
    }
    loaded
}

/// A matching record, with the outcome of a decision joined to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<'a> {
    /// The record.
    pub record: &'a Record,
    /// For an allowed decision: its outcome record (same correlation).
    pub outcome: Option<&'a Record>,
}

impl Query {
    fn kinds(&self) -> Vec<Kind> {
        if self.kinds.is_empty() { vec![Kind::Decision, Kind::Lease] } else { self.kinds.clone() }
    }

    fn matches(&self, record: &Record) -> bool {
        let event = &record.event;
        if !self.kinds().contains(&event.kind) {
            return false;
        }
        if let Some(caller) = &self.caller
            && event.caller.as_ref().map(|c| &c.sub) != Some(caller)
        {
            return false;
        }
        if self.server.as_ref().is_some_and(|s| *s != record.server) {
            return false;
        }
        if self.tool.as_ref().is_some_and(|t| event.tool.as_ref() != Some(t)) {
            return false;
        }
        if self.decision.is_some() && event.decision != self.decision {
            return false;
        }
        if self.phi_only && event.phi != Some(true) {
            return false;
        }
        match (&self.emergency, &event.emergency_access) {
            (None, _) => {}
            (Some(_), None) => return false,
            (Some(Some(wanted)), Some(grant)) if wanted != grant => return false,
            (Some(_), Some(_)) => {}
        }
        let time = record.timestamp();
        if self.since.is_some_and(|since| time.is_none_or(|t| t < since)) {
            return false;
        }
        if self.until.is_some_and(|until| time.is_none_or(|t| t >= until)) {
            return false;
        }
        true
    }

    /// The matching records, oldest first, each decision with its outcome.
    pub fn select<'a>(&self, records: &'a [Record]) -> Vec<Row<'a>> {
        let outcomes: HashMap<(&str, &str), &Record> = records
            .iter()
            .filter(|r| r.event.kind == Kind::Outcome)
            .filter_map(|r| Some(((r.server.as_str(), r.event.correlation.as_deref()?), r)))
            .collect();
        let mut rows: Vec<Row<'a>> = records
            .iter()
            .filter(|r| self.matches(r))
            .map(|record| Row {
                record,
                outcome: match (record.event.kind, record.event.correlation.as_deref()) {
                    (Kind::Decision, Some(c)) => outcomes.get(&(record.server.as_str(), c)).copied(),
                    _ => None,
                },
            })
            .collect();
        rows.sort_by(|a, b| {
            (&a.record.time, &a.record.stream, a.record.seq).cmp(&(&b.record.time, &b.record.stream, b.record.seq))
        });
        rows
    }
}

fn decision_name(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "allow",
        Decision::Deny => "deny",
        Decision::AuthnFailure => "authn-failure",
    }
}

/// A readable table, one row per matching record.
pub fn to_table(rows: &[Row<'_>]) -> String {
    let header =
        ["TIME", "SERVER", "KIND", "CALLER", "METHOD", "TOOL", "PHI", "DECISION", "REASON", "OUTCOME", "CORRELATION"];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for row in rows {
        let e = &row.record.event;
        let dash = || "-".to_string();
        let outcome = match (row.outcome, &e.lease, &e.outcome) {
            (Some(o), _, _) => o.event.outcome.as_ref().map(|o| {
                let status = format!("{:?}", o.status).to_lowercase();
                o.http_status.map_or(status.clone(), |h| format!("{status} {h}"))
            }),
            (None, Some(lease), _) => {
                Some(format!("lease {} {}", format!("{:?}", lease.action).to_lowercase(), lease.id))
            }
            // A statement: what ran, on which store, with what result.
            (None, None, Some(o)) if e.kind == Kind::Statement => Some(format!(
                "{} {} row(s) on {}: {}",
                format!("{:?}", o.status).to_lowercase(),
                o.rows.unwrap_or(0),
                e.store.as_deref().unwrap_or("-"),
                e.statement.as_deref().unwrap_or("-")
            )),
            (None, None, Some(o)) => Some(format!("{:?}", o.status).to_lowercase()),
            _ => None,
        };
        table.push(vec![
            row.record.time.clone(),
            row.record.server.clone(),
            e.kind.as_str().to_string(),
            e.caller.as_ref().map_or_else(dash, |c| c.sub.clone()),
            e.method.clone().unwrap_or_else(dash),
            e.tool.clone().unwrap_or_else(dash),
            e.phi.map_or_else(dash, |p| if p { "yes".into() } else { "no".into() }),
            e.decision.map_or_else(dash, |d| decision_name(d).to_string()),
            match (&e.emergency_access, &e.reason) {
                (Some(grant), Some(reason)) => format!("emergency access {grant}; {reason}"),
                (Some(grant), None) => format!("emergency access {grant}"),
                (None, reason) => reason.clone().unwrap_or_else(dash),
            },
            outcome.unwrap_or_else(dash),
            e.correlation.clone().unwrap_or_else(dash),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|i| table.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} record(s)\n", rows.len()));
    out
}

/// The matching records verbatim (canonical lines, so they can be
/// re-verified), each decision followed by its outcome.
pub fn to_json_lines(rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    for row in rows {
        for record in std::iter::once(row.record).chain(row.outcome) {
            out.push_str(&String::from_utf8_lossy(&record.to_line()));
            out.push('\n');
        }
    }
    out
}

/// Parses `--since`/`--until`: RFC 3339, or a duration back from `now`
/// (`7d`, `36h`, `90m`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let amount: i64 = digits.parse().map_err(|_| format!("{text:?} is neither RFC 3339 nor a duration like 7d"))?;
    let delta = match unit {
        "d" => chrono::Duration::try_days(amount),
        "h" => chrono::Duration::try_hours(amount),
        "m" => chrono::Duration::try_minutes(amount),
        "s" => chrono::Duration::try_seconds(amount),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?}: use RFC 3339 or a number with d, h, m or s"))?;
    Ok(now - delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Caller, Chain, Event, Outcome, OutcomeStatus};

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_790_000_000 + second, 0).unwrap()
    }

    fn decision(sub: &str, tool: &str, phi: bool, decision: Decision, correlation: &str) -> Event {
        let mut e = Event::new(Kind::Decision);
        e.caller = Some(Caller { sub: sub.into(), iss: "https://idp".into(), groups: vec![] });
        e.method = Some("tools/call".into());
        e.tool = Some(tool.into());
        e.phi = Some(phi);
        e.decision = Some(decision);
        if decision != Decision::Allow {
            e.reason = Some("not in allowedCallers".into());
        }
        e.correlation = Some(correlation.into());
        e
    }

    fn outcome(correlation: &str) -> Event {
        let mut e = Event::new(Kind::Outcome);
        e.correlation = Some(correlation.into());
        e.outcome = Some(Outcome { status: OutcomeStatus::Ok, http_status: Some(200), rpc_error: None, rows: None });
        e
    }

    fn trail() -> Vec<Record> {
        let mut chain = Chain::new("clinic/lookup/pod-1/s1".into(), "clinic/lookup".into(), Some("pod-1".into()));
        let events = vec![
            (decision("alice", "lookup_patient", true, Decision::Allow, "c1"), 10),
            (outcome("c1"), 11),
            (decision("bob", "lookup_patient", true, Decision::Deny, "c2"), 20),
            (decision("alice", "clinic_hours", false, Decision::Allow, "c3"), 30),
            (outcome("c3"), 31),
            (decision("alice", "lookup_patient", true, Decision::Allow, "c4"), 9000),
        ];
        events.into_iter().map(|(e, t)| chain.seal(e, at(t)).unwrap().record).collect()
    }

    fn correlations(rows: &[Row<'_>]) -> Vec<String> {
        rows.iter().map(|r| r.record.event.correlation.clone().unwrap()).collect()
    }

    #[test]
    fn phi_access_by_a_caller_in_a_window_with_outcomes() {
        let records = trail();
        let query = Query {
            caller: Some("alice".into()),
            phi_only: true,
            since: Some(at(0)),
            until: Some(at(100)),
            ..Query::default()
        };
        let rows = query.select(&records);
        assert_eq!(correlations(&rows), vec!["c1"]);
        assert_eq!(rows[0].outcome.unwrap().event.correlation.as_deref(), Some("c1"));
        let table = to_table(&rows);
        assert!(table.contains("alice") && table.contains("ok 200") && table.contains("1 record(s)"), "{table}");
    }

    #[test]
    fn what_was_done_under_break_glass() {
        let mut chain = Chain::new("clinic/lookup/pod-1/s1".into(), "clinic/lookup".into(), Some("pod-1".into()));
        let under = |mut e: Event, grant: &str| {
            e.emergency_access = Some(grant.into());
            e
        };
        let events = vec![
            under(decision("er-doc", "lookup_patient", true, Decision::Allow, "c1"), "ea-1"),
            under(outcome("c1"), "ea-1"),
            decision("alice", "lookup_patient", true, Decision::Allow, "c2"),
            under(decision("er-doc", "lookup_patient", true, Decision::Allow, "c3"), "ea-2"),
        ];
        let records: Vec<Record> =
            events.into_iter().enumerate().map(|(i, e)| chain.seal(e, at(i as i64)).unwrap().record).collect();
        let any = Query { emergency: Some(None), ..Query::default() }.select(&records);
        assert_eq!(correlations(&any), vec!["c1", "c3"]);
        let one = Query { emergency: Some(Some("ea-1".into())), ..Query::default() }.select(&records);
        assert_eq!(correlations(&one), vec!["c1"]);
        assert!(to_table(&one).contains("emergency access ea-1"), "{}", to_table(&one));
    }

    #[test]
    fn every_denied_call() {
        let records = trail();
        let rows = Query { decision: Some(Decision::Deny), ..Query::default() }.select(&records);
        assert_eq!(correlations(&rows), vec!["c2"]);
        assert!(rows[0].outcome.is_none());
    }

    #[test]
    fn by_server_and_tool_and_kind() {
        let records = trail();
        let rows = Query { server: Some("clinic/other".into()), ..Query::default() }.select(&records);
        assert!(rows.is_empty());
        let rows = Query { tool: Some("clinic_hours".into()), ..Query::default() }.select(&records);
        assert_eq!(correlations(&rows), vec!["c3"]);
        let rows = Query { kinds: vec![Kind::Outcome], ..Query::default() }.select(&records);
        assert_eq!(correlations(&rows), vec!["c1", "c3"]);
    }

    #[test]
    fn json_lines_are_the_canonical_records_and_reparse() {
        let records = trail();
        let rows = Query { caller: Some("alice".into()), ..Query::default() }.select(&records);
        let text = to_json_lines(&rows);
        let parsed: Vec<Record> = text.lines().map(|l| Record::parse_line(l.as_bytes()).unwrap()).collect();
        // c1 + outcome, c3 + outcome, c4 (no outcome yet).
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[1].event.kind, Kind::Outcome);
    }

    #[test]
    fn statements_show_what_ran_where_and_how_it_ended() {
        let mut chain = Chain::new("clinic/lookup/pod-1/s1".into(), "clinic/lookup".into(), Some("pod-1".into()));
        let mut e = Event::new(Kind::Statement);
        e.caller = Some(Caller { sub: "alice".into(), iss: "https://idp".into(), groups: vec![] });
        e.tool = Some("lookup_patient".into());
        e.correlation = Some("c1".into());
        e.store = Some("ehr".into());
        e.statement = Some("SELECT name FROM clinical.patients WHERE mrn = $1".into());
        e.outcome = Some(Outcome { status: OutcomeStatus::Ok, http_status: None, rpc_error: None, rows: Some(1) });
        let records = vec![chain.seal(e, at(1)).unwrap().record];
        let rows =
            Query { caller: Some("alice".into()), kinds: vec![Kind::Statement], ..Query::default() }.select(&records);
        let table = to_table(&rows);
        assert!(table.contains("ok 1 row(s) on ehr: SELECT name FROM clinical.patients WHERE mrn = $1"), "{table}");
    }

    #[test]
    fn times_are_rfc3339_or_durations_back_from_now() {
        let now = at(1_000_000);
        assert_eq!(parse_time("7d", now).unwrap(), now - chrono::Duration::days(7));
        assert_eq!(parse_time("36h", now).unwrap(), now - chrono::Duration::hours(36));
        assert_eq!(parse_time("2026-11-14T00:00:00Z", now).unwrap().to_rfc3339(), "2026-11-14T00:00:00+00:00");
        assert!(parse_time("last week", now).is_err());
        assert!(parse_time("7w", now).is_err());
    }
}
