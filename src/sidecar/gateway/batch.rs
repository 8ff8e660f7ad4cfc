//! JSON-RPC batches (2025-03-26 only): every element goes through steps
//! 5 to 9 on its own; allowed ones are forwarded as one batch.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;

use super::db_access::refuse_data_access;
use super::decision::{decision_event, record_caller};
use super::outcome::outcome_event;
use super::request::{Refusal, session_for_upstream};
use super::response::{content_type_of, mark_private, read_upstream};
use super::scan;
use super::{Gateway, json_response, refuse_unrecorded};
use crate::audit::record::{Outcome, OutcomeStatus};
use crate::policy::Caller;
use crate::sidecar::authz::{self, Decision, ListKind};
use crate::sidecar::data_access::{CallAccess, DataAccess, META_DB};
use crate::sidecar::messages::{self, GATEWAY_REFUSED, INVALID_REQUEST};

/// A 2025-03-26 batch: every element is authorized and recorded on its own;
/// only allowed elements are forwarded (as one batch); refused ones are
/// answered here; list results are filtered by the id of their request.
pub(super) async fn post_batch(
    gw: Arc<Gateway>,
    caller: Caller,
    correlation: String,
    headers: HeaderMap,
    items: Vec<Value>,
) -> Response {
    let upstream_session = match session_for_upstream(&gw, &caller, messages::DEFAULT_REVISION, &headers) {
        Ok(session) => session,
        Err(reason) => {
            let refusal = Refusal { gw: &gw, caller: &caller, correlation: &correlation };
            return refusal.refuse("batch", StatusCode::NOT_FOUND, INVALID_REQUEST, reason, None).await;
        }
    };
    let policy = gw.policy();
    let issuer = policy.authentication.issuer.clone();
    // A batch's elements (and its list answers) are decided with the
    // caller's grants, asked once (as a tools/list would ask).
    let caller = gw.with_grants(caller, Some("tools/list"), None).await;
    let mut forwarded = Vec::new();
    let mut local: Vec<Value> = Vec::new();
    let mut filters: std::collections::HashMap<String, ListKind> = std::collections::HashMap::new();
    let mut element_correlations: Vec<(String, String)> = Vec::new();
    let mut accesses: Vec<CallAccess> = Vec::new();
    let mut scans: std::collections::HashMap<String, super::AnswerScan> = std::collections::HashMap::new();
    for (i, item) in items.into_iter().enumerate() {
        let element = format!("{correlation}-{i}");
        let Value::Object(mut message) = item else {
            let refusal = Refusal { gw: &gw, caller: &caller, correlation: &element };
            let _ =
                refusal.refuse("batch element", StatusCode::OK, INVALID_REQUEST, "not a JSON-RPC message", None).await;
            local.push(messages::error_body(None, INVALID_REQUEST, "not a JSON-RPC message"));
            continue;
        };
        let id = message.get("id").cloned();
        let method = message.get("method").and_then(Value::as_str).map(str::to_string);
        let params = message.get("params").cloned();
        let decision = authz::decide(&policy, &caller, method.as_deref(), params.as_ref());
        let stripped = authz::rewrite_meta(&mut message, &caller, &issuer);
        let event =
            decision_event(&gw, &caller, &issuer, &element, method.as_deref(), params.as_ref(), &decision, stripped);
        let recorded = gw.record(event).await;
        match decision {
            Decision::Deny(denied) => {
                gw.metrics.decision("deny");
                if id.is_some() {
                    local.push(messages::error_body(id.as_ref(), denied.code, &denied.message));
                }
            }
            Decision::Allow(_) if gw.fails_closed(&recorded) => {
                gw.metrics.decision("refused_audit");
                if id.is_some() {
                    let text = "the audit trail cannot record this call, so it is refused";
                    local.push(messages::error_body(id.as_ref(), GATEWAY_REFUSED, text));
                }
            }
            Decision::Allow(allowed) => {
                gw.metrics.decision("allow");
                let access = match (method.as_deref(), allowed.target.as_deref()) {
                    (Some("tools/call"), Some(tool)) => {
                        let token = crate::bearer::bearer(&headers).unwrap_or_default();
                        let who = record_caller(&caller, &issuer);
                        let grant = allowed.grant.as_deref();
                        let opened =
                            DataAccess::open(gw.data_access.as_ref(), &policy, tool, token, &who, &element, grant);
                        match opened.await {
                            Ok(access) => access.map(|mut a| {
                                a.scan = gw.scan_for(tool);
                                a
                            }),
                            Err(e) => {
                                let _ = refuse_data_access(&gw, &element, id.as_ref(), &e).await;
                                if id.is_some() {
                                    local.push(messages::error_body(id.as_ref(), GATEWAY_REFUSED, &e.to_string()));
                                }
                                continue;
                            }
                        }
                    }
                    _ => None,
                };
                if let Some(meta) =
                    message.get_mut("params").and_then(|p| p.get_mut("_meta")).and_then(Value::as_object_mut)
                {
                    meta.insert("io.mcpwarden/correlation".into(), Value::String(element.clone()));
                    if let Some(access) = &access {
                        meta.insert(META_DB.into(), Value::Object(access.dsns.clone()));
                    }
                }
                if let (Some(scan), Some(id)) = (access.as_ref().and_then(|a| a.scan.clone()), &id) {
                    scans.insert(id.to_string(), scan);
                }
                // Held until the batch's answer is read: the calls end with it.
                accesses.extend(access);
                if let (Some(kind), Some(id)) = (allowed.filter, &id) {
                    filters.insert(id.to_string(), kind);
                }
                if let Some(id) = &id {
                    element_correlations.push((id.to_string(), element));
                }
                forwarded.push(Value::Object(message));
            }
        }
    }
    if forwarded.is_empty() {
        return if local.is_empty() {
            StatusCode::ACCEPTED.into_response()
        } else {
            json_response(StatusCode::OK, &Value::Array(local))
        };
    }
    let started = Instant::now();
    let body = Bytes::from(Value::Array(forwarded).to_string());
    let request = gw.upstream.post(&headers, upstream_session.as_deref(), body);
    let upstream = match gw.upstream.send(request).await {
        Ok(response) => response,
        Err(_) => {
            let none = ElementAnswers::default();
            let _ =
                record_batch_outcomes(&gw, &element_correlations, StatusCode::BAD_GATEWAY, &none, started, false).await;
            return json_response(
                StatusCode::BAD_GATEWAY,
                &messages::error_body(None, GATEWAY_REFUSED, "the MCP server is unreachable"),
            );
        }
    };
    let status = upstream.status();
    let content_type = content_type_of(upstream.headers());
    let body = match read_upstream(upstream.into_body()).await {
        Ok(body) => body,
        Err(e) => {
            let none = ElementAnswers::default();
            let _ =
                record_batch_outcomes(&gw, &element_correlations, StatusCode::BAD_GATEWAY, &none, started, false).await;
            return json_response(StatusCode::BAD_GATEWAY, &messages::error_body(None, GATEWAY_REFUSED, e));
        }
    };
    if status == StatusCode::ACCEPTED && local.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    let mut answered = ElementAnswers::default();
    let mut edit = |message: &mut Value| {
        let key = message.get("id").map(ToString::to_string).unwrap_or_default();
        // A de-identified tool's answer holding an identifier shape is
        // replaced by an error before anything else looks at it.
        if let Some(scan) = scans.get(&key)
            && let Some(finding) = scan::search_value(scan, message)
        {
            scan::note(&gw, &finding);
            *message = scan::withheld_body(message.get("id"), &finding);
            answered.withheld.insert(key.clone(), scan::reason(&finding));
        }
        if let Some(code) = message.pointer("/error/code").and_then(Value::as_i64) {
            answered.rpc_errors.insert(key.clone(), code);
        }
        if let (Some(kind), Some(result)) = (filters.get(&key), message.get_mut("result")) {
            if *kind == ListKind::Tools {
                let drift = gw.learn_tools(result);
                if !drift.is_empty() {
                    answered.schema_drift.insert(key.clone(), drift);
                }
            }
            gw.metrics.filtered(authz::filter_list(&policy, &caller, *kind, result));
            mark_private(*kind, result);
        }
    };
    let (body, content_type) = if content_type.starts_with("text/event-stream") {
        let (mut text, withheld) = messages::rewrite_sse(&String::from_utf8_lossy(&body), &mut edit);
        if withheld > 0 {
            tracing::warn!(withheld, "events of a batch answer the gateway cannot read were withheld");
        }
        for answer in &local {
            text.push_str(&format!("data: {answer}\n\n"));
        }
        (Bytes::from(text), "text/event-stream")
    } else {
        let mut answers = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Array(items)) => items,
            Ok(single) if !single.is_null() => vec![single],
            _ => Vec::new(),
        };
        answers.iter_mut().for_each(&mut edit);
        answers.extend(local);
        (Bytes::from(Value::Array(answers).to_string()), "application/json")
    };
    // Calls with database access end with the answer; like a single call's,
    // their outcomes (and with them the statement records the proxy queued
    // before) are made durable before the answer is released.
    let durable = !accesses.is_empty();
    drop(accesses);
    if !record_batch_outcomes(&gw, &element_correlations, status, &answered, started, durable).await {
        let message = "the audit trail cannot record this batch's statements, so its answers are withheld";
        return refuse_unrecorded(&gw, None, message);
    }
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = if status == StatusCode::ACCEPTED { StatusCode::OK } else { status };
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// What the answer said of each element, by its id.
#[derive(Default)]
pub(super) struct ElementAnswers {
    /// JSON-RPC error codes.
    rpc_errors: std::collections::HashMap<String, i64>,
    /// Reasons of answers withheld by the identifier scan.
    withheld: std::collections::HashMap<String, String>,
    /// Schema drift seen in `tools/list` answers.
    schema_drift: std::collections::HashMap<String, crate::audit::record::SchemaDrift>,
}

/// One outcome record per forwarded batch element that has an id:
/// deferred, or (`durable`, when calls had database access) made durable
/// before the answer goes out. Returns false when a durable record failed
/// and the policy fails closed.
pub(super) async fn record_batch_outcomes(
    gw: &Gateway,
    elements: &[(String, String)],
    status: StatusCode,
    answered: &ElementAnswers,
    started: Instant,
    durable: bool,
) -> bool {
    let mut recorded = true;
    for (id, element) in elements {
        let rpc_error = answered.rpc_errors.get(id).copied();
        let mut event = match answered.withheld.get(id) {
            Some(reason) => scan::withheld_event(element, status.as_u16(), rpc_error, reason.clone(), started),
            None => {
                let outcome_status =
                    if !status.is_success() || rpc_error.is_some() { OutcomeStatus::Error } else { OutcomeStatus::Ok };
                let outcome =
                    Outcome { status: outcome_status, http_status: Some(status.as_u16()), rpc_error, rows: None };
                outcome_event(element, outcome, started)
            }
        };
        event.schema_drift = answered.schema_drift.get(id).cloned();
        gw.tag_outcome(&mut event);
        if durable {
            recorded &= !gw.fails_closed(&gw.record(event).await);
        } else if let Err(e) = gw.wal.defer(event).await {
            tracing::error!(error = %e, "an outcome record could not be queued");
        }
    }
    recorded
}
