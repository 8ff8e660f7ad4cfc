//! Step 8: the MCP server's answer. Lists are filtered to the caller;
//! other answers go back as the server wrote them, SSE as it arrives.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;

use super::outcome::{OutcomeStream, outcome_event, record_outcome};
use super::{Gateway, MAX_BUFFERED_RESPONSE, json_response, refuse_unrecorded};
use crate::audit::record::{Outcome, OutcomeStatus, SchemaDrift};
use crate::policy::Caller;
use crate::sidecar::authz::{self, ListKind};
use crate::sidecar::data_access::CallAccess;
use crate::sidecar::messages::{self, GATEWAY_REFUSED};

/// Sends the request upstream and relays the answer (step 8), recording
/// the outcome (step 9).
pub(super) async fn forward(
    gw: Arc<Gateway>,
    caller: Caller,
    correlation: String,
    request: Request<Full<Bytes>>,
    filter: Option<ListKind>,
    id: Option<Value>,
    access: Option<CallAccess>,
) -> Response {
    let started = Instant::now();
    let upstream = match gw.upstream.send(request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(error = %e, "upstream unreachable");
            let outcome = Outcome { status: OutcomeStatus::Error, http_status: Some(502), rpc_error: None, rows: None };
            record_outcome(&gw, &correlation, outcome, started, None).await;
            return json_response(
                StatusCode::BAD_GATEWAY,
                &messages::error_body(id.as_ref(), GATEWAY_REFUSED, "the MCP server is unreachable"),
            );
        }
    };
    let status = upstream.status();
    let mut headers = HeaderMap::with_capacity(upstream.headers().len());
    for (name, value) in upstream.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "connection" | "keep-alive" | "transfer-encoding" | "mcp-session-id"
        ) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(session) = upstream.headers().get("mcp-session-id").and_then(|v| v.to_str().ok())
        && let Ok(bound) = HeaderValue::from_str(&gw.sessions.bind(&caller.subject, session))
    {
        headers.insert("mcp-session-id", bound);
    }
    let content_type = content_type_of(upstream.headers());
    let streaming = content_type.starts_with("text/event-stream");
    if streaming && filter.is_none() && access.is_none() {
        // SSE is relayed as it arrives; dropping the response (client gone)
        // drops the upstream connection, which cancels the request there.
        // A call with database access is read whole instead: its answer
        // waits for its statement records (below).
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        let mut body = upstream.into_body().into_data_stream().boxed();
        let ready = take_ready(&mut body).await;
        let body = if ready.ended {
            // Whole already (an error ends the taking before any end): one
            // write with its end, and the outcome now — the MCP server's,
            // as for a relayed answer (that the client read it is not
            // known either way: a write to a socket is not a read).
            let whole: Vec<Bytes> = ready.items.into_iter().flatten().collect();
            let outcome =
                Outcome { status: OutcomeStatus::Ok, http_status: Some(status.as_u16()), rpc_error: None, rows: None };
            record_outcome(&gw, &correlation, outcome, started, None).await;
            Body::from(whole.concat())
        } else {
            let taken = futures::stream::iter(ready.items);
            let stream =
                OutcomeStream::new(taken.chain(body).boxed(), Arc::clone(&gw), correlation, status.as_u16(), started);
            Body::from_stream(stream)
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        return response;
    }
    let body = match read_upstream(upstream.into_body()).await {
        Ok(body) => body,
        Err(e) => {
            let outcome = Outcome { status: OutcomeStatus::Error, http_status: Some(502), rpc_error: None, rows: None };
            record_outcome(&gw, &correlation, outcome, started, None).await;
            return json_response(StatusCode::BAD_GATEWAY, &messages::error_body(id.as_ref(), GATEWAY_REFUSED, e));
        }
    };
    let mut rpc_error = None;
    let mut drift = SchemaDrift::new();
    let body = if content_type.starts_with("application/json") {
        match serde_json::from_slice::<Value>(&body) {
            // A list answer is filtered per caller: one this cannot read
            // (serde_json refuses some texts a browser's JSON.parse takes)
            // or that is not one message is withheld, not passed on whole.
            Ok(value) if filter.is_some() && !value.is_object() => {
                return withhold_unreadable(&gw, &correlation, id.as_ref(), started).await;
            }
            Err(_) if filter.is_some() => return withhold_unreadable(&gw, &correlation, id.as_ref(), started).await,
            Ok(mut value) => {
                rpc_error = value.pointer("/error/code").and_then(Value::as_i64);
                match (filter, value.get_mut("result")) {
                    (Some(kind), Some(result)) => {
                        if kind == ListKind::Tools {
                            drift = gw.learn_tools(result);
                        }
                        let removed = authz::filter_list(&gw.policy(), &caller, kind, result);
                        gw.metrics.filtered(removed);
                        mark_private(kind, result);
                        Bytes::from(value.to_string())
                    }
                    // Anything not filtered goes back exactly as the server wrote it.
                    _ => body,
                }
            }
            Err(_) => body,
        }
    } else if streaming && filter.is_some() {
        let text = String::from_utf8_lossy(&body).into_owned();
        let policy = gw.policy();
        let (rewritten, withheld) = messages::rewrite_sse(&text, |message| {
            if let (Some(kind), Some(result)) = (filter, message.get_mut("result")) {
                if kind == ListKind::Tools {
                    drift.extend(gw.learn_tools(result));
                }
                let removed = authz::filter_list(&policy, &caller, kind, result);
                gw.metrics.filtered(removed);
                mark_private(kind, result);
            }
        });
        if withheld > 0 {
            // On the record as the gateway's refusal, not as a clean answer.
            rpc_error = Some(GATEWAY_REFUSED);
            tracing::warn!(withheld, "events of a list answer the gateway cannot read were withheld");
        }
        Bytes::from(rewritten)
    } else if filter.is_some() {
        // A list answer in neither JSON nor SSE cannot be filtered.
        return withhold_unreadable(&gw, &correlation, id.as_ref(), started).await;
    } else {
        body
    };
    let outcome_status =
        if !status.is_success() || rpc_error.is_some() { OutcomeStatus::Error } else { OutcomeStatus::Ok };
    let outcome = Outcome { status: outcome_status, http_status: Some(status.as_u16()), rpc_error, rows: None };
    match access {
        // The call's database access ends with its answer. The proxy queued
        // every statement record before the MCP server could read its
        // results, so this durable record, written after them, makes them
        // durable too: the answer is released only then.
        Some(access) => {
            let finding = access.scan.as_ref().and_then(|scan| super::scan::search(scan, &body, streaming));
            drop(access);
            if let Some(finding) = finding {
                return super::scan::withhold(&gw, &correlation, id.as_ref(), &finding, status.as_u16(), started).await;
            }
            if gw.fails_closed(&gw.record(outcome_event(&correlation, outcome, started)).await) {
                let message = "the audit trail cannot record this call's statements, so its answer is withheld";
                return refuse_unrecorded(&gw, id.as_ref(), message);
            }
        }
        None => {
            let drift = (!drift.is_empty()).then_some(drift);
            record_outcome(&gw, &correlation, outcome, started, drift).await
        }
    }
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// What an SSE answer's connection had read by the time its head came.
struct Ready {
    items: Vec<Result<Bytes, hyper::Error>>,
    /// The answer ended within them.
    ended: bool,
}

/// How many turns the upstream connection's task gets to hand over what it
/// has read: one for the first event, one for the end after it.
const READY_TURNS: usize = 3;
/// Above this, an answer is relayed as it arrives even if it is whole.
const READY_BYTES: usize = 64 * 1024;

/// Takes what an SSE answer has ready, never waiting for the MCP server:
/// the upstream connection's task hands over one piece at a time, and only
/// after this side asked, so it is given a few turns of the runtime (no
/// timer). A short answer is usually whole by then, and goes out in one
/// write with its end instead of one for its event and one for its end;
/// one still being written (a long tool's progress) is relayed as it
/// arrives, starting with what was taken.
async fn take_ready(body: &mut futures::stream::BoxStream<'static, Result<Bytes, hyper::Error>>) -> Ready {
    let mut ready = Ready { items: Vec::new(), ended: false };
    let mut bytes = 0;
    for _ in 0..READY_TURNS {
        while let Some(next) = body.next().now_or_never() {
            match next {
                Some(Ok(chunk)) => {
                    bytes += chunk.len();
                    ready.items.push(Ok(chunk));
                }
                Some(Err(e)) => {
                    ready.items.push(Err(e));
                    return ready;
                }
                None => {
                    ready.ended = true;
                    return ready;
                }
            }
            if bytes > READY_BYTES {
                return ready;
            }
        }
        tokio::task::yield_now().await;
    }
    ready
}

/// A list answer the gateway cannot filter: recorded as an error and
/// answered with one, never passed on whole.
async fn withhold_unreadable(
    gw: &Arc<Gateway>,
    correlation: &str,
    id: Option<&Value>,
    started: std::time::Instant,
) -> Response {
    tracing::warn!("a list answer the gateway cannot read was withheld");
    let outcome =
        Outcome { status: OutcomeStatus::Error, http_status: Some(502), rpc_error: Some(GATEWAY_REFUSED), rows: None };
    record_outcome(gw, correlation, outcome, started, None).await;
    json_response(
        StatusCode::BAD_GATEWAY,
        &messages::error_body(
            id,
            GATEWAY_REFUSED,
            "the MCP server's list answer could not be read, so it was withheld",
        ),
    )
}

/// A filtered list differs per caller: in 2026-07-28 terms, its cache scope
/// is private.
pub(super) fn mark_private(kind: ListKind, result: &mut Value) {
    if kind == ListKind::Tools
        && let Some(map) = result.as_object_mut()
    {
        map.insert("cacheScope".into(), Value::String("private".into()));
    }
}

pub(super) fn content_type_of(headers: &HeaderMap) -> String {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// The whole answer, up to [`MAX_BUFFERED_RESPONSE`].
pub(super) async fn read_upstream(body: Incoming) -> Result<Bytes, &'static str> {
    match http_body_util::Limited::new(body, MAX_BUFFERED_RESPONSE).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err("the MCP server's response is too large"),
        Err(_) => Err("the MCP server's response was cut off"),
    }
}
