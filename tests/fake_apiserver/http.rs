//! The HTTP face of the fake: the API paths kube-client builds, with the
//! answers' shapes the real server gives (LIST items of built-in kinds
//! without apiVersion/kind, pagination, watch streams of JSON lines, 410 as
//! an ERROR event, Status bodies).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::core::{ApiError, Selector};
use super::kinds::{self, Kind};
use super::{Fault, Request, Shared};

/// The router of one listener.
pub fn router(shared: Arc<Shared>, identity: String) -> Router {
    Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let shared = Arc::clone(&shared);
        let identity = identity.clone();
        async move { serve(shared, identity, method, uri, headers, body).await }
    })
}

/// Where a path points.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(ns.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        other => (None, other.to_vec()),
    };
    let plural = *rest.first()?;
    let kind = kinds::by_plural(group, plural)?;
    Some(Target {
        kind,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| decode(v))
    })
}

fn json_response(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .unwrap_or_default()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.body)
}

fn verb_of(method: &Method, target: Option<&Target>, query: &str) -> &'static str {
    let named = target.is_some_and(|t| t.name.is_some());
    match *method {
        Method::GET if query_param(query, "watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

async fn serve(
    shared: Arc<Shared>,
    identity: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let target = parse_path(&path);
    let mut request = Request {
        at: shared.started.elapsed(),
        identity,
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        verb: verb_of(&method, target.as_ref(), &query),
        plural: target.as_ref().map(|t| t.kind.plural.to_string()).unwrap_or_default(),
        status: 0,
    };
    tokio::time::sleep(shared.delay()).await;
    let response = match shared.fault(&request) {
        Some(Fault::Fail(code)) => json_response(
            code,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "injected by the test", "reason": "InternalError", "code": code}),
        ),
        other => {
            if let Some(Fault::Delay(d)) = other {
                tokio::time::sleep(d).await;
            }
            match target {
                Some(target) => dispatch(&shared, &method, &query, &headers, &body, target).await,
                None if path == "/version" => {
                    json_response(200, &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake"}))
                }
                None => json_response(
                    404,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "the server could not find the requested resource", "reason": "NotFound", "details": {}, "code": 404}),
                ),
            }
        }
    };
    request.status = response.status().as_u16();
    shared.record(request);
    response
}

async fn dispatch(
    shared: &Arc<Shared>,
    method: &Method,
    query: &str,
    headers: &HeaderMap,
    body: &Bytes,
    target: Target,
) -> Response {
    let core = &shared.core;
    let kind = target.kind;
    let namespace = target.namespace.clone().unwrap_or_default();
    let manager = query_param(query, "fieldManager").unwrap_or_else(|| "unknown".into());
    let subresource = target.subresource.as_deref();
    let parsed = || {
        serde_json::from_slice::<Value>(body).map_err(|e| ApiError {
        code: 400,
        body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("body: {e}"), "reason": "BadRequest", "code": 400}),
    })
    };
    let result: Result<(u16, Value), ApiError> = match (method.clone(), target.name.as_deref()) {
        (Method::GET, None) if query_param(query, "watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch(shared, &kind, target.namespace.as_deref(), query);
        }
        (Method::GET, None) => Ok((200, list(shared, &kind, target.namespace.as_deref(), query))),
        (Method::GET, Some(name)) => core.get(&kind, &namespace, name).map(|o| (200, o)),
        (Method::POST, None) => parsed().and_then(|b| core.create(&kind, &namespace, b, &manager)).map(|o| (201, o)),
        (Method::PUT, Some(name)) => parsed()
            .and_then(|b| core.update(&kind, &namespace, name, &manager, subresource, move |_| Ok(b)))
            .map(|o| (200, o)),
        (Method::PATCH, Some(name)) => {
            let content = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            match content.as_str() {
                "application/apply-patch+yaml" => {
                    if query_param(query, "fieldManager").is_none() {
                        Err(ApiError { code: 422, body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch", "reason": "Invalid", "details": {"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]}, "code": 422}) })
                    } else {
                        let force = query_param(query, "force").is_some_and(|f| f == "true");
                        parsed().and_then(|b| core.apply(&kind, &namespace, name, b, &manager, force, subresource))
                    }
                }
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => parsed()
                    .and_then(|patch| {
                        core.update(&kind, &namespace, name, &manager, subresource, move |live| {
                            let mut next = live.clone();
                            json_patch::merge(&mut next, &patch);
                            Ok(next)
                        })
                    })
                    .map(|o| (200, o)),
                "application/json-patch+json" => parsed()
                    .map(|mut ops| {
                        // The API server's JSON patch (evanphx/json-patch)
                        // passes `test` of null on a missing path; RFC 6902
                        // libraries fail it. kube's finalizer helper relies on it.
                        let live = core.get(&kind, &namespace, name).unwrap_or(Value::Null);
                        if let Some(list) = ops.as_array_mut() {
                            list.retain(|op| {
                                let null_test = op["op"] == "test" && op["value"].is_null();
                                let path = op["path"].as_str().unwrap_or_default();
                                !(null_test && live.pointer(path).is_none_or(Value::is_null))
                            });
                        }
                        ops
                    })
                    .and_then(|ops| {
                        let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|e| ApiError {
                            code: 400,
                            body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{e}"), "reason": "BadRequest", "code": 400}),
                        })?;
                        core.update(&kind, &namespace, name, &manager, subresource, move |live| {
                            let mut next = live.clone();
                            json_patch::patch(&mut next, &patch).map_err(|_| ApiError {
                                code: 422,
                                body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "the server rejected our request due to an error in our request", "reason": "Invalid", "details": {}, "code": 422}),
                            })?;
                            Ok(next)
                        })
                    })
                    .map(|o| (200, o)),
                other => Err(ApiError {
                    code: 415,
                    body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other})"), "reason": "UnsupportedMediaType", "code": 415}),
                }),
            }
        }
        (Method::DELETE, Some(name)) => core.delete(&kind, &namespace, name).map(|o| (200, o)),
        _ => Err(ApiError {
            code: 405,
            body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "method not allowed", "reason": "MethodNotAllowed", "code": 405}),
        }),
    };
    match result {
        Ok((code, object)) => json_response(code, &object),
        Err(e) => error_response(&e),
    }
}

/// `fieldSelector` on `metadata.name` / `metadata.namespace` (what
/// kube-client's `watch_object` and `await_condition` send).
fn field_matches(query: &str, object: &Value) -> bool {
    let Some(fields) = query_param(query, "fieldSelector") else { return true };
    fields.split(',').filter(|f| !f.is_empty()).all(|f| {
        let (key, value) = f.split_once('=').unwrap_or((f, ""));
        let value = value.trim_start_matches('=');
        match key {
            "metadata.name" => object.pointer("/metadata/name").and_then(Value::as_str) == Some(value),
            "metadata.namespace" => object.pointer("/metadata/namespace").and_then(Value::as_str) == Some(value),
            _ => true,
        }
    })
}

fn list(shared: &Arc<Shared>, kind: &Kind, namespace: Option<&str>, query: &str) -> Value {
    let selector = Selector::parse(&query_param(query, "labelSelector").unwrap_or_default());
    let (mut items, rv) = shared.core.list(kind, namespace, &selector);
    items.retain(|o| field_matches(query, o));
    let limit = query_param(query, "limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let start_after = query_param(query, "continue").filter(|c| !c.is_empty()).and_then(|c| hex_decode(&c));
    let list_rv = start_after.as_ref().and_then(|(rv, _)| rv.parse::<u64>().ok()).unwrap_or(rv);
    if let Some((_, last)) = &start_after {
        items.retain(|o| object_key(o).as_str() > last.as_str());
    }
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().map(object_key).unwrap_or_default();
        metadata["continue"] = json!(hex_encode(&format!("{list_rv}|{last}")));
        metadata["remainingItemCount"] = json!(remaining);
    } else if !kind.builtin {
        metadata["continue"] = json!("");
    }
    if kind.builtin {
        for item in &mut items {
            if let Some(o) = item.as_object_mut() {
                o.remove("apiVersion");
                o.remove("kind");
            }
        }
    }
    json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version(), "metadata": metadata, "items": items})
}

fn object_key(o: &Value) -> String {
    format!(
        "{}/{}",
        o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default(),
        o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
    )
}

fn hex_encode(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<(String, String)> {
    let bytes: Option<Vec<u8>> =
        (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (rv, last) = text.split_once('|')?;
    Some((rv.to_string(), last.to_string()))
}

fn line(type_: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A watch: the events after the requested version, then live ones, until
/// `timeoutSeconds`; a version older than the log is one ERROR 410 event
/// in a 200 answer (never an HTTP 410).
fn watch(shared: &Arc<Shared>, kind: &Kind, namespace: Option<&str>, query: &str) -> Response {
    let selector = Selector::parse(&query_param(query, "labelSelector").unwrap_or_default());
    let timeout = query_param(query, "timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
    let bookmarks = query_param(query, "allowWatchBookmarks").is_some_and(|b| b == "true");
    let from = query_param(query, "resourceVersion").unwrap_or_default();
    let query = query.to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let core = Arc::clone(&shared.core);
    let kind = *kind;
    let namespace = namespace.map(str::to_string);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut cursor = match from.as_str() {
            "" | "0" if bookmarks => {
                let error = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "an error on the server (\"unable to decode an event from the watch stream\")", "reason": "InternalError", "code": 500});
                let _ = tx.send(Ok(line("ERROR", &error))).await;
                return;
            }
            "" | "0" => {
                // Synthetic ADDED events for what exists, then live events.
                let (items, rv) = core.list(&kind, namespace.as_deref(), &selector);
                for item in items.into_iter().filter(|o| field_matches(&query, o)) {
                    if tx.send(Ok(line("ADDED", &item))).await.is_err() {
                        return;
                    }
                }
                rv
            }
            other => other.parse::<u64>().unwrap_or(0),
        };
        let mut latest = core.latest.subscribe();
        loop {
            match core.events_after(cursor, kind.plural, namespace.as_deref()) {
                Err(now) => {
                    let error = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {cursor} ({now})"), "reason": "Expired", "code": 410});
                    let _ = tx.send(Ok(line("ERROR", &error))).await;
                    return;
                }
                Ok((events, now)) => {
                    for event in events {
                        if !field_matches(&query, &event.object) {
                            continue;
                        }
                        let was = event.old.as_ref().is_some_and(|o| selector.matches(o));
                        let is = selector.matches(&event.object);
                        let type_ = match (event.type_, was, is) {
                            ("DELETED", _, true) | ("MODIFIED", true, false) => "DELETED",
                            ("ADDED", _, true) | ("MODIFIED", false, true) => "ADDED",
                            ("MODIFIED", true, true) => "MODIFIED",
                            _ => continue,
                        };
                        if tx.send(Ok(line(type_, &event.object))).await.is_err() {
                            return;
                        }
                    }
                    cursor = now;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                changed = latest.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
