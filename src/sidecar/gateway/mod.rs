//! The gateway: one request's path through the sidecar.
//!
//! ```text
//!   1. Host and Origin (DNS-rebinding protection) ........ 403
//!   2. authentication: bearer JWT ........................ 401 / 403 insufficient_scope / 400
//!   3. body: size bound, JSON-RPC parse .................. 413 / 400
//!   4. transport checks: batches, Mcp-* headers, session . 400 / 404
//!   5. authorization from the policy (and, for a server with a break-glass
//!      procedure, the caller's grants in force, from the broker) .. JSON-RPC error; the server never sees it
//!   6. audit: decision record durable in the WAL ......... 503 if it cannot be (failurePolicy Closed)
//!   7. forward: token stripped, _meta rewritten, Host set for the upstream
//!   8. response: lists filtered to the caller; everything else streamed,
//!      but a call with database access is read whole and, for a
//!      de-identified tool, searched for identifier shapes (withheld on a hit)
//!   9. audit: outcome record when the response completes (or is cut off)
//! ```
//!
//! One file per stage: `admission` (1–2), `request` (3–4), `decision`
//! (5–6), `db_access` and `upstream` (7), `response` and `scan` (8),
//! `outcome` (9);
//! `batch` runs 5–9 per element of a 2025-03-26 batch. This file holds the
//! shared state and reads as the pipeline.
//!
//! Nothing from a token, a header value or an argument goes into a log
//! line, a metric label or an error message.

mod admission;
mod batch;
mod db_access;
mod decision;
mod outcome;
mod request;
mod response;
mod scan;
pub mod upstream;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use serde_json::{Value, json};

use super::authn::{Authenticator, authenticate};
use super::authz::{self, Decision};
use super::data_access::{DataAccess, META_DB};
use super::messages::{self, GATEWAY_REFUSED, HEADER_MISMATCH, INVALID_REQUEST, PARSE_ERROR};
use super::metrics::SidecarMetrics;
use super::session::SessionKey;
use crate::api::FailurePolicy;
use crate::audit::args_hmac::ArgsKey;
use crate::audit::budget::RefusalBudget;
use crate::audit::record::{Decision as RecordDecision, Event, Kind, SchemaDrift};
use crate::audit::{Receipt, Wal, WalError};
use crate::policy::{Caller, CompiledPolicy, arguments};
use admission::{check_host_and_origin, record_unauthenticated, refuse_unauthenticated};
use batch::post_batch;
use db_access::refuse_data_access;
use decision::{decision_event, record_caller};
use request::{Refusal, read_body, session_for_upstream};
use response::forward;
pub use scan::AnswerScan;
use upstream::{Upstream, UpstreamError};

/// Largest response body buffered for list filtering or outcome reading.
pub const MAX_BUFFERED_RESPONSE: usize = 32 * 1024 * 1024;

/// What the gateway is set up with.
pub struct GatewayConfig {
    /// The MCP endpoint of the server, on loopback.
    pub upstream: reqwest::Url,
    /// Host names this server answers to (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call (browsers); none by default.
    pub allowed_origins: Vec<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

/// The sidecar's shared state.
pub struct Gateway {
    policy: std::sync::RwLock<Arc<CompiledPolicy>>,
    authn: Authenticator,
    wal: Arc<Wal>,
    args_key: ArgsKey,
    sessions: SessionKey,
    config: GatewayConfig,
    upstream: Upstream,
    /// Public metrics.
    pub metrics: SidecarMetrics,
    authn_records: Mutex<RefusalBudget>,
    /// `Mcp-Param-*` mirroring of each tool, learnt from `tools/list`
    /// responses passing through.
    mirrored_params: std::sync::RwLock<std::collections::HashMap<String, messages::MirroredParams>>,
    /// Each declared tool's schema drift as last listed (for logging changes).
    drift_seen: Mutex<SchemaDrift>,
    /// The broker and database proxy, for tools with `dataAccess`.
    data_access: Option<DataAccess>,
    /// The answer scanners of the policy's de-identified tools (replaced
    /// with the policy).
    scans: std::sync::RwLock<Arc<std::collections::HashMap<String, AnswerScan>>>,
    /// Break-glass grants, asked of the broker.
    emergency: Option<crate::sidecar::emergency::EmergencyGrants>,
    /// Calls allowed under a grant and not yet ended: correlation → grant
    /// (their outcome records carry it).
    under_grant: Mutex<std::collections::HashMap<String, String>>,
    /// Whether `under_grant` may hold anything: every other call's outcome
    /// skips its lock.
    any_under_grant: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// A gateway over an open WAL.
    pub fn new(
        policy: Arc<CompiledPolicy>,
        authn: Authenticator,
        wal: Arc<Wal>,
        args_key: ArgsKey,
        config: GatewayConfig,
        metrics: SidecarMetrics,
    ) -> Result<Self, UpstreamError> {
        let sessions = SessionKey::derive(args_key.secret());
        let upstream = Upstream::new(&config.upstream)?;
        let scans = std::sync::RwLock::new(Arc::new(scan::scans_for(&policy)));
        Ok(Gateway {
            scans,
            policy: std::sync::RwLock::new(policy),
            authn,
            wal,
            args_key,
            sessions,
            config,
            upstream,
            metrics,
            authn_records: Mutex::new(RefusalBudget::default()),
            mirrored_params: std::sync::RwLock::new(std::collections::HashMap::new()),
            drift_seen: Mutex::default(),
            data_access: None,
            emergency: None,
            under_grant: Mutex::new(std::collections::HashMap::new()),
            any_under_grant: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Serves tools with `dataAccess` through this broker and proxy; without
    /// it, calls to them are refused.
    /// Break-glass grants come from the same broker.
    pub fn with_data_access(mut self, data_access: DataAccess) -> Self {
        self.emergency = Some(crate::sidecar::emergency::EmergencyGrants::new(data_access.broker().clone()));
        self.data_access = Some(data_access);
        self
    }

    /// The caller with the grants in force for it, when deciding this
    /// message may depend on one.
    async fn with_grants(&self, mut caller: Caller, method: Option<&str>, params: Option<&Value>) -> Caller {
        let Some(source) = &self.emergency else { return caller };
        let policy = self.policy();
        if crate::sidecar::emergency::needs_grants(&policy, &caller, method, params) {
            caller.emergency = source.of(&policy.server.to_string(), &caller.subject).await;
        }
        caller
    }

    /// Notes a call allowed under a grant, for its outcome record.
    fn note_grant(&self, correlation: &str, grant: &str) {
        let mut calls = self.under_grant.lock().unwrap_or_else(|p| p.into_inner());
        if calls.len() >= 65_536 {
            // Calls that never got an outcome; their decisions name the grant.
            calls.clear();
        }
        calls.insert(correlation.to_string(), grant.to_string());
        self.any_under_grant.store(true, std::sync::atomic::Ordering::Release);
    }

    /// An outcome record of a call made under a grant carries its name.
    fn tag_outcome(&self, event: &mut Event) {
        if event.kind != Kind::Outcome || !self.any_under_grant.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let Some(correlation) = &event.correlation else { return };
        let mut calls = self.under_grant.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(grant) = calls.remove(correlation) {
            event.emergency_access = Some(grant);
        }
        if calls.is_empty() {
            // Under the same lock as note_grant sets it.
            self.any_under_grant.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts a new policy in force, for the same server. The authentication
    /// settings follow it.
    pub fn replace_policy(&self, next: CompiledPolicy) -> Result<(), String> {
        let current = self.policy();
        if next.server != current.server {
            return Err(format!("the new policy is for {}, not {}", next.server, current.server));
        }
        next.check_argument_rules()?;
        self.authn.set_settings(next.authentication.clone());
        *self.scans.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(scan::scans_for(&next));
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// The answer scanner of a de-identified tool.
    fn scan_for(&self, tool: &str) -> Option<AnswerScan> {
        self.scans.read().unwrap_or_else(|p| p.into_inner()).get(tool).cloned()
    }

    /// Remembers which parameters each declared tool mirrors into headers,
    /// and compares each listed tool that declares its arguments with its
    /// declaration: the drift goes on the list's outcome record. Tools the
    /// policy does not declare are never remembered: they cannot be called,
    /// and a server listing new names in every answer would grow the map
    /// without bound.
    fn learn_tools(&self, result: &Value) -> SchemaDrift {
        let Some(tools) = result.get("tools").and_then(Value::as_array) else { return SchemaDrift::new() };
        let policy = self.policy();
        let mut drift = SchemaDrift::new();
        let mut map = self.mirrored_params.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, _| policy.tools.contains_key(name));
        for tool in tools {
            let Some((known, declared)) =
                tool.get("name").and_then(Value::as_str).and_then(|n| policy.tools.get_key_value(n))
            else {
                continue;
            };
            let mirrored = tool.get("inputSchema").map(messages::mirrored_params).unwrap_or_default();
            map.insert(known.clone(), mirrored);
            if let Some(arguments) = declared.arguments.as_deref() {
                drift.insert(known.clone(), arguments::schema_drift(arguments, tool.get("inputSchema")));
            }
        }
        drop(map);
        self.note_drift(&drift);
        drift
    }

    /// Logs a tool's drift when it changes (lists are frequent), and keeps
    /// the metric.
    fn note_drift(&self, drift: &SchemaDrift) {
        let mut seen = self.drift_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (tool, findings) in drift {
            let before = seen.get(tool);
            if before != Some(findings) {
                if findings.is_empty() {
                    if before.is_some() {
                        tracing::info!(tool = %tool, "the listed inputSchema agrees with the declared arguments again");
                    }
                } else {
                    tracing::warn!(tool = %tool, drift = %findings.join("; "), "the listed inputSchema differs from the declared arguments");
                }
                seen.insert(tool.clone(), findings.clone());
            }
        }
        self.metrics.tools_drifted(seen.values().filter(|f| !f.is_empty()).count());
    }

    /// How many tools' mirrored parameters are remembered (tests).
    pub fn remembered_tools(&self) -> usize {
        self.mirrored_params.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn mirrored_for(&self, tool: &str) -> Option<messages::MirroredParams> {
        self.mirrored_params.read().unwrap_or_else(|p| p.into_inner()).get(tool).cloned()
    }

    /// Whether the sidecar can serve: keys loaded and the WAL accepting.
    pub fn readiness(&self) -> Result<(), String> {
        if self.authn.keys().is_empty() {
            return Err("no signing keys".into());
        }
        if self.wal.is_poisoned() {
            return Err("audit WAL refuses appends".into());
        }
        if !self.metrics.last_append_ok() && self.policy().audit_failure_policy == FailurePolicy::Closed {
            return Err("the last audit record could not be written; PHI calls are refused".into());
        }
        Ok(())
    }

    /// The public router: the MCP endpoint and the protected-resource
    /// metadata.
    pub fn router(self: Arc<Self>) -> Router {
        let path = self.config.upstream.path().to_string();
        let metadata_path = format!("/.well-known/oauth-protected-resource{}", self.audience_path());
        let mut router = Router::new().route("/.well-known/oauth-protected-resource", get(resource_metadata));
        if metadata_path != "/.well-known/oauth-protected-resource" {
            router = router.route(&metadata_path, get(resource_metadata));
        }
        router.route(&path, any(mcp_endpoint)).fallback(not_found).with_state(self)
    }

    fn audience_path(&self) -> String {
        reqwest::Url::parse(&self.policy().authentication.audience)
            .map(|u| u.path().trim_end_matches('/').to_string())
            .unwrap_or_default()
    }

    /// URL of this server's protected-resource metadata (RFC 9728).
    fn resource_metadata_url(&self) -> String {
        match reqwest::Url::parse(&self.policy().authentication.audience) {
            Ok(url) => format!(
                "{}://{}/.well-known/oauth-protected-resource{}",
                url.scheme(),
                url.host_str()
                    .map(|h| match url.port() {
                        Some(p) => format!("{h}:{p}"),
                        None => h.to_string(),
                    })
                    .unwrap_or_default(),
                self.audience_path()
            ),
            Err(_) => String::new(),
        }
    }

    /// Whether a record that could not be written stops the request: the
    /// audit failure policy is `Closed`.
    fn fails_closed(&self, recorded: &Result<Receipt, WalError>) -> bool {
        recorded.is_err() && self.policy().audit_failure_policy == FailurePolicy::Closed
    }

    async fn record(&self, mut event: Event) -> Result<Receipt, WalError> {
        self.tag_outcome(&mut event);
        let started = Instant::now();
        let result = self.wal.append(event).await;
        self.metrics.wal_append(started.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, "audit record not written");
        }
        result
    }
}

/// A request refused because its record could not be made durable under
/// `failurePolicy: Closed`: 503, counted as `refused_audit`.
fn refuse_unrecorded(gw: &Gateway, id: Option<&Value>, message: &str) -> Response {
    gw.metrics.decision("refused_audit");
    json_response(StatusCode::SERVICE_UNAVAILABLE, &messages::error_body(id, GATEWAY_REFUSED, message))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, &messages::error_body(None, GATEWAY_REFUSED, "not found"))
}

async fn resource_metadata(State(gw): State<Arc<Gateway>>) -> Response {
    let policy = gw.policy();
    let auth = &policy.authentication;
    let body = json!({
        "resource": auth.audience,
        "authorization_servers": [auth.issuer],
        "scopes_supported": auth.required_scopes,
        "bearer_methods_supported": ["header"],
    });
    json_response(StatusCode::OK, &body)
}

/// Response header naming the call's correlation id: the id every record
/// of the call carries, so a client (or its operator) can find the call in
/// the trail. Random; says nothing about the call.
pub const CORRELATION_HEADER: &str = "mcp-warden-correlation";

/// Steps 1–9 for every method on the MCP endpoint; every answer names its
/// correlation id.
async fn mcp_endpoint(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let correlation = uuid::Uuid::new_v4().simple().to_string();
    let value = header::HeaderValue::from_str(&correlation);
    let mut response = answer(gw, correlation, method, uri, headers, body).await;
    if let Ok(value) = value {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

async fn answer(
    gw: Arc<Gateway>,
    correlation: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // 1. Host and Origin.
    if let Err(why) = check_host_and_origin(&gw.config, &headers) {
        gw.metrics.decision("origin");
        record_unauthenticated(&gw, &correlation, method.as_str(), RecordDecision::Deny, why.to_string()).await;
        return json_response(StatusCode::FORBIDDEN, &messages::error_body(None, GATEWAY_REFUSED, why));
    }
    // 2. Authentication.
    let caller = match authenticate(&gw.authn, &headers, &uri).await {
        Ok(caller) => caller,
        Err(error) => return refuse_unauthenticated(&gw, &correlation, method.as_str(), &error).await,
    };
    let revision = messages::revision(&headers);
    match method {
        Method::POST => post(gw, caller, correlation, revision, headers, body).await,
        Method::GET | Method::DELETE if !messages::is_stateless(&revision) => {
            stream_or_delete(gw, caller, correlation, method, headers).await
        }
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &messages::error_body(None, GATEWAY_REFUSED, "method not allowed for this protocol revision"),
        ),
    }
}

async fn post(
    gw: Arc<Gateway>,
    caller: Caller,
    correlation: String,
    revision: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let refusal = Refusal { gw: &gw, caller: &caller, correlation: &correlation };
    // 3. Body.
    let bytes = match read_body(body, gw.config.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(StatusCode::PAYLOAD_TOO_LARGE) => {
            let reason = format!("request body larger than {} bytes", gw.config.max_body_bytes);
            return refusal.refuse("POST", StatusCode::PAYLOAD_TOO_LARGE, INVALID_REQUEST, &reason, None).await;
        }
        Err(StatusCode::REQUEST_TIMEOUT) => {
            let reason = "request body not received in time";
            return refusal.refuse("POST", StatusCode::REQUEST_TIMEOUT, INVALID_REQUEST, reason, None).await;
        }
        Err(status) => {
            return refusal.refuse("POST", status, INVALID_REQUEST, "unreadable body", None).await;
        }
    };
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => {
            return refusal.refuse("POST", StatusCode::BAD_REQUEST, PARSE_ERROR, "malformed JSON", None).await;
        }
    };
    // 4. Transport checks.
    let mut message = match message {
        Value::Object(map) => map,
        // Batches exist only in 2025-03-26, where each element is decided
        // on its own; later revisions have none.
        Value::Array(items) if revision == messages::DEFAULT_REVISION && !items.is_empty() => {
            return post_batch(Arc::clone(&gw), caller.clone(), correlation.clone(), headers, items).await;
        }
        Value::Array(_) => {
            let reason = "JSON-RPC batches are not part of this protocol revision (or empty)";
            return refusal.refuse("batch", StatusCode::BAD_REQUEST, INVALID_REQUEST, reason, None).await;
        }
        _ => {
            return refusal
                .refuse("POST", StatusCode::BAD_REQUEST, INVALID_REQUEST, "not a JSON-RPC message", None)
                .await;
        }
    };
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str).map(str::to_string);
    let is_response = method.is_none() && (message.contains_key("result") || message.contains_key("error"));
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || (method.is_none() && !is_response) {
        return refusal
            .refuse("POST", StatusCode::BAD_REQUEST, INVALID_REQUEST, "not a JSON-RPC 2.0 message", id.as_ref())
            .await;
    }
    let method_name = method.clone().unwrap_or_else(|| "response".into());
    let params = message.get("params").cloned();
    if messages::is_stateless(&revision)
        && let Some(m) = &method
        && let Err(reason) = messages::check_mirrored_headers(&headers, m, params.as_ref())
    {
        return refusal.refuse(&method_name, StatusCode::BAD_REQUEST, HEADER_MISMATCH, &reason, id.as_ref()).await;
    }
    // Mcp-Param-* headers, for tools whose schema a tools/list has shown.
    if messages::is_stateless(&revision)
        && method.as_deref() == Some("tools/call")
        && let Some(mirrored) =
            params.as_ref().and_then(|p| p.get("name")).and_then(Value::as_str).and_then(|t| gw.mirrored_for(t))
        && let Err(reason) =
            messages::check_param_headers(&headers, &mirrored, params.as_ref().and_then(|p| p.get("arguments")))
    {
        return refusal.refuse(&method_name, StatusCode::BAD_REQUEST, HEADER_MISMATCH, &reason, id.as_ref()).await;
    }
    let upstream_session = match session_for_upstream(&gw, &caller, &revision, &headers) {
        Ok(session) => session,
        Err(reason) => {
            return refusal.refuse(&method_name, StatusCode::NOT_FOUND, INVALID_REQUEST, reason, id.as_ref()).await;
        }
    };
    // 5. Authorization.
    let caller = gw.with_grants(caller, method.as_deref(), params.as_ref()).await;
    let decision = authz::decide(&gw.policy(), &caller, method.as_deref(), params.as_ref());
    let stripped = authz::rewrite_meta(&mut message, &caller, &gw.policy().authentication.issuer);
    // 6. Audit first.
    let issuer = gw.policy().authentication.issuer.clone();
    let event =
        decision_event(&gw, &caller, &issuer, &correlation, method.as_deref(), params.as_ref(), &decision, stripped);
    let recorded = gw.record(event).await;
    let allowed = match decision {
        Decision::Deny(denied) => {
            gw.metrics.decision("deny");
            let status = if denied.code == authz::METHOD_NOT_FOUND && messages::is_stateless(&revision) {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            };
            return json_response(status, &messages::error_body(id.as_ref(), denied.code, &denied.message));
        }
        Decision::Allow(allowed) => allowed,
    };
    if gw.fails_closed(&recorded) {
        return refuse_unrecorded(&gw, id.as_ref(), "the audit trail cannot record this call, so it is refused");
    }
    gw.metrics.decision("allow");
    // 7. Database access: the caller's credentials, as per-call DSNs.
    let access = match (method.as_deref(), allowed.target.as_deref()) {
        (Some("tools/call"), Some(tool)) => {
            let token = crate::bearer::bearer(&headers).unwrap_or_default();
            let who = record_caller(&caller, &issuer);
            let grant = allowed.grant.as_deref();
            match DataAccess::open(gw.data_access.as_ref(), &gw.policy(), tool, token, &who, &correlation, grant).await
            {
                Ok(access) => access.map(|mut a| {
                    a.scan = gw.scan_for(tool);
                    a
                }),
                Err(e) => return refuse_data_access(&gw, &correlation, id.as_ref(), &e).await,
            }
        }
        _ => None,
    };
    // 8. Forward.
    if let Some(params) = message.get_mut("params").and_then(Value::as_object_mut)
        && let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut)
    {
        meta.insert("io.mcpwarden/correlation".into(), Value::String(correlation.clone()));
        if let Some(access) = &access {
            meta.insert(META_DB.into(), Value::Object(access.dsns.clone()));
        }
    }
    let body = Bytes::from(Value::Object(message).to_string());
    let request = gw.upstream.post(&headers, upstream_session.as_deref(), body);
    forward(gw, caller, correlation, request, allowed.filter, id, access).await
}

/// GET (the server's stream) and DELETE (end of session), 2025 revisions.
async fn stream_or_delete(
    gw: Arc<Gateway>,
    caller: Caller,
    correlation: String,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let label = if method == Method::GET { "GET stream" } else { "DELETE session" };
    let refusal = Refusal { gw: &gw, caller: &caller, correlation: &correlation };
    let session = match session_for_upstream(&gw, &caller, messages::DEFAULT_REVISION, &headers) {
        Ok(Some(session)) => session,
        Ok(None) => {
            return refusal
                .refuse(label, StatusCode::BAD_REQUEST, INVALID_REQUEST, "Mcp-Session-Id required", None)
                .await;
        }
        Err(reason) => {
            return refusal.refuse(label, StatusCode::NOT_FOUND, INVALID_REQUEST, reason, None).await;
        }
    };
    let event = Event {
        correlation: Some(correlation.clone()),
        caller: Some(record_caller(&caller, &gw.policy().authentication.issuer)),
        method: Some(label.to_string()),
        phi: Some(false),
        decision: Some(RecordDecision::Allow),
        ..Event::new(Kind::Decision)
    };
    if gw.fails_closed(&gw.record(event).await) {
        return refuse_unrecorded(&gw, None, "the audit trail cannot record this request, so it is refused");
    }
    gw.metrics.decision("allow");
    let request = gw.upstream.request(method, &headers, Some(&session), Bytes::new());
    forward(gw, caller, correlation, request, None, None, None).await
}
