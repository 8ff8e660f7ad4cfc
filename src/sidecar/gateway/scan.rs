//! Step 8b: a de-identified tool's answer is searched for identifier
//! shapes before it is released (the second line behind the database's
//! views; see `crate::deid::scan`). A hit withholds the answer: the caller
//! gets a JSON-RPC error, the record names the pattern and where it was
//! found, never the value.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::outcome::outcome_event;
use super::{Gateway, json_response, refuse_unrecorded};
use crate::audit::record::{Outcome, OutcomeStatus};
use crate::deid::scan::{Finding, Scanner};
use crate::policy::CompiledPolicy;
use crate::sidecar::messages::{self, GATEWAY_REFUSED};

/// One tool's scanner, or why it could not be built (which withholds every
/// answer of the tool: fail closed).
pub type AnswerScan = Arc<Result<Scanner, String>>;

/// The scanners of a policy's de-identified tools, by tool name.
pub(super) fn scans_for(policy: &CompiledPolicy) -> HashMap<String, AnswerScan> {
    policy
        .tools
        .iter()
        .filter_map(|(name, tool)| {
            let rules = tool.scan.as_ref()?;
            let columns = tool.data_access.values().flatten().flat_map(|g| g.columns.iter().cloned());
            Some((name.clone(), Arc::new(Scanner::showing(rules, columns))))
        })
        .collect()
}

/// Searches an answer (`sse`: an event stream, else JSON).
pub(super) fn search(scan: &AnswerScan, body: &[u8], sse: bool) -> Option<Finding> {
    let scanner = match scan.as_ref() {
        Ok(scanner) => scanner,
        Err(_) => return Some(Finding { pattern: "scanner_unavailable".into(), path: String::new() }),
    };
    let text = String::from_utf8_lossy(body);
    if sse {
        return scanner.scan_sse(&text);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => scanner.scan_json(&value),
        Err(_) => scanner.scan_json(&Value::String(text.into_owned())),
    }
}

/// Searches one JSON-RPC message of a batch.
pub(super) fn search_value(scan: &AnswerScan, message: &Value) -> Option<Finding> {
    match scan.as_ref() {
        Ok(scanner) => scanner.scan_json(message),
        Err(_) => Some(Finding { pattern: "scanner_unavailable".into(), path: String::new() }),
    }
}

/// The record's reason for a withheld answer.
pub(super) fn reason(finding: &Finding) -> String {
    format!("identifier_shape {} at {}", finding.pattern, if finding.path.is_empty() { "/" } else { &finding.path })
}

/// The caller's error for a withheld answer.
pub(super) fn withheld_body(id: Option<&Value>, finding: &Finding) -> Value {
    messages::error_body(
        id,
        GATEWAY_REFUSED,
        &format!(
            "the answer of this de-identified tool held an identifier shape ({}) and was withheld",
            finding.pattern
        ),
    )
}

/// Counts and logs a withheld answer (the pattern only, never the value).
pub(super) fn note(gw: &Gateway, finding: &Finding) {
    gw.metrics.withheld(&finding.pattern);
    tracing::warn!(pattern = %finding.pattern, "a de-identified tool's answer held an identifier shape; withheld");
}

/// The outcome record of a withheld answer: refused, with the finding's
/// reason.
pub(super) fn withheld_event(
    correlation: &str,
    http_status: u16,
    rpc_error: Option<i64>,
    reason: String,
    started: Instant,
) -> crate::audit::record::Event {
    let outcome = Outcome { status: OutcomeStatus::Refused, http_status: Some(http_status), rpc_error, rows: None };
    let mut event = outcome_event(correlation, outcome, started);
    event.reason = Some(reason);
    event
}

/// Withholds a single call's answer: its outcome (refused, naming the
/// finding) is made durable, then the caller gets the error.
pub(super) async fn withhold(
    gw: &Gateway,
    correlation: &str,
    id: Option<&Value>,
    finding: &Finding,
    http_status: u16,
    started: Instant,
) -> Response {
    note(gw, finding);
    let event = withheld_event(correlation, http_status, None, reason(finding), started);
    if gw.fails_closed(&gw.record(event).await) {
        return refuse_unrecorded(
            gw,
            id,
            "the audit trail cannot record this call's statements, so its answer is withheld",
        );
    }
    json_response(StatusCode::OK, &withheld_body(id, finding))
}
