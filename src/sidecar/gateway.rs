//! The gateway: one request's path through the sidecar.
//!
//! ```text
//!   1. Host and Origin (DNS-rebinding protection) ........ 403
//!   2. authentication: bearer JWT ........................ 401 / 403 insufficient_scope / 400
//!   3. body: size bound, JSON-RPC parse .................. 413 / 400
//!   4. transport checks: batches, Mcp-* headers, session . 400 / 404
//!   5. authorization from the policy ..................... JSON-RPC error; the server never sees it
//!   6. audit: decision record durable in the WAL ......... 503 if it cannot be (failurePolicy Closed)
//!   7. forward: token stripped, _meta rewritten, Host set for the upstream
//!   8. response: lists filtered to the caller; everything else streamed
//!   9. audit: outcome record when the response completes (or is cut off)
//! ```
//!
//! Nothing from a token, a header value or an argument goes into a log
//! line, a metric label or an error message.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::authn::{Authenticator, AuthnError, www_authenticate};
use super::authz::{self, Decision, ListKind};
use super::data_access::{CallAccess, DataAccess, DataAccessError, META_DB};
use super::messages::{self, GATEWAY_REFUSED, HEADER_MISMATCH, INVALID_REQUEST, PARSE_ERROR};
use super::metrics::SidecarMetrics;
use super::session::SessionKey;
use crate::api::FailurePolicy;
use crate::audit::args_hmac::ArgsKey;
use crate::audit::budget::RefusalBudget;
use crate::audit::record::{Caller as RecordCaller, Decision as RecordDecision, Event, Kind, Outcome, OutcomeStatus};
use crate::audit::{Receipt, Wal, WalError};
use crate::policy::{Caller, CompiledPolicy};

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
    http: reqwest::Client,
    /// Public metrics.
    pub metrics: SidecarMetrics,
    authn_records: Mutex<RefusalBudget>,
    /// `Mcp-Param-*` mirroring of each tool, learnt from `tools/list`
    /// responses passing through.
    mirrored_params: std::sync::RwLock<std::collections::HashMap<String, messages::MirroredParams>>,
    /// The broker and database proxy, for tools with `dataAccess`.
    data_access: Option<DataAccess>,
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
    ) -> Result<Self, reqwest::Error> {
        let sessions = SessionKey::derive(args_key.secret());
        let http = reqwest::Client::builder().no_proxy().connect_timeout(std::time::Duration::from_secs(5)).build()?;
        Ok(Gateway {
            policy: std::sync::RwLock::new(policy),
            authn,
            wal,
            args_key,
            sessions,
            config,
            http,
            metrics,
            authn_records: Mutex::new(RefusalBudget::default()),
            mirrored_params: std::sync::RwLock::new(std::collections::HashMap::new()),
            data_access: None,
        })
    }

    /// Serves tools with `dataAccess` through this broker and proxy; without
    /// it, calls to them are refused.
    pub fn with_data_access(mut self, data_access: DataAccess) -> Self {
        self.data_access = Some(data_access);
        self
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
        self.authn.set_settings(next.authentication.clone());
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// Remembers which parameters each tool mirrors into headers.
    fn learn_tools(&self, result: &Value) {
        let Some(tools) = result.get("tools").and_then(Value::as_array) else { return };
        let mut map = self.mirrored_params.write().unwrap_or_else(|p| p.into_inner());
        for tool in tools {
            if let Some(name) = tool.get("name").and_then(Value::as_str) {
                let mirrored = tool.get("inputSchema").map(messages::mirrored_params).unwrap_or_default();
                map.insert(name.to_string(), mirrored);
            }
        }
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

    async fn record(&self, event: Event) -> Result<Receipt, WalError> {
        let started = Instant::now();
        let result = self.wal.append(event).await;
        self.metrics.wal_append(started.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, "audit record not written");
        }
        result
    }
}

fn record_caller(caller: &Caller, issuer: &str) -> RecordCaller {
    RecordCaller {
        sub: caller.subject.clone(),
        iss: issuer.to_string(),
        groups: caller.groups.iter().cloned().collect(),
    }
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

/// Steps 1–9 for every method on the MCP endpoint.
async fn mcp_endpoint(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let correlation = uuid::Uuid::new_v4().simple().to_string();
    // 1. Host and Origin.
    if let Err(why) = check_host_and_origin(&gw.config, &headers) {
        gw.metrics.decision("origin");
        record_unauthenticated(&gw, &correlation, method.as_str(), RecordDecision::Deny, why.to_string()).await;
        return json_response(StatusCode::FORBIDDEN, &messages::error_body(None, GATEWAY_REFUSED, why));
    }
    // 2. Authentication.
    let caller = match gw.authn.authenticate(&headers, &uri).await {
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

fn check_host_and_origin(config: &GatewayConfig, headers: &HeaderMap) -> Result<(), &'static str> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let hostname =
        host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
    if !config.allowed_hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(hostname)) {
        return Err("host not allowed");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !config.allowed_origins.iter().any(|allowed| allowed == origin) {
            return Err("origin not allowed");
        }
    }
    Ok(())
}

async fn refuse_unauthenticated(gw: &Gateway, correlation: &str, method: &str, error: &AuthnError) -> Response {
    let (status, verdict) = match error {
        AuthnError::InsufficientScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
        AuthnError::TokenInQuery => (StatusCode::BAD_REQUEST, "authn_failure"),
        _ => (StatusCode::UNAUTHORIZED, "authn_failure"),
    };
    gw.metrics.decision(verdict);
    record_unauthenticated(gw, correlation, method, RecordDecision::AuthnFailure, error.reason()).await;
    let mut response = json_response(status, &messages::error_body(None, GATEWAY_REFUSED, &error.to_string()));
    if let Ok(value) = HeaderValue::from_str(&www_authenticate(error, &gw.resource_metadata_url())) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// Records a refusal of a request whose caller is unknown (Host, Origin,
/// authentication). These are rate-limited: a flood of them must not fill
/// the WAL and trip fail-closed for every caller; what is over the limit is
/// counted instead. The request is refused whatever happens to its record.
async fn record_unauthenticated(
    gw: &Gateway,
    correlation: &str,
    method: &str,
    decision: RecordDecision,
    reason: String,
) {
    if gw.authn_records.lock().map(|mut b| b.take()).unwrap_or(false) {
        let event = Event {
            correlation: Some(correlation.to_string()),
            method: Some(method.to_string()),
            decision: Some(decision),
            reason: Some(reason),
            ..Event::new(Kind::Decision)
        };
        let _ = gw.record(event).await;
    } else {
        gw.metrics.authn_unrecorded();
    }
}

/// One authenticated request, for refusals that happen before
/// authorization (body, transport checks).
struct Refusal<'a> {
    gw: &'a Gateway,
    caller: &'a Caller,
    correlation: &'a str,
}

impl Refusal<'_> {
    /// Records the refusal, then answers with a JSON-RPC error.
    async fn refuse(&self, method: &str, status: StatusCode, code: i64, reason: &str, id: Option<&Value>) -> Response {
        self.gw.metrics.decision("deny");
        let event = Event {
            correlation: Some(self.correlation.to_string()),
            caller: Some(record_caller(self.caller, &self.gw.policy().authentication.issuer)),
            method: Some(method.to_string()),
            decision: Some(RecordDecision::Deny),
            reason: Some(reason.to_string()),
            ..Event::new(Kind::Decision)
        };
        let _ = self.gw.record(event).await;
        json_response(status, &messages::error_body(id, code, reason))
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, StatusCode> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
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
    if recorded.is_err() && gw.policy().audit_failure_policy == FailurePolicy::Closed {
        gw.metrics.decision("refused_audit");
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &messages::error_body(
                id.as_ref(),
                GATEWAY_REFUSED,
                "the audit trail cannot record this call, so it is refused",
            ),
        );
    }
    gw.metrics.decision("allow");
    // 7. Database access: the caller's credentials, as per-call DSNs.
    let access = match (method.as_deref(), allowed.target.as_deref()) {
        (Some("tools/call"), Some(tool)) => {
            let token = crate::bearer::bearer(&headers).unwrap_or_default();
            let who = record_caller(&caller, &issuer);
            match DataAccess::open(gw.data_access.as_ref(), &gw.policy(), tool, token, &who, &correlation).await {
                Ok(access) => access,
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
    let request = upstream_post(&gw, &headers, upstream_session.as_deref(), &Value::Object(message));
    forward(gw, caller, correlation, request, allowed.filter, id, access).await
}

/// An allowed call whose database access could not be set up: refused with
/// an outcome record naming the class; the MCP server never sees it.
async fn refuse_data_access(gw: &Gateway, correlation: &str, id: Option<&Value>, error: &DataAccessError) -> Response {
    gw.metrics.decision("refused_data_access");
    tracing::warn!(class = %error.class(), "a tool call's database access could not be set up");
    let event = Event {
        correlation: Some(correlation.to_string()),
        outcome: Some(Outcome {
            status: OutcomeStatus::Refused,
            http_status: Some(503),
            rpc_error: Some(GATEWAY_REFUSED),
            rows: None,
        }),
        reason: Some(error.class()),
        ..Event::new(Kind::Outcome)
    };
    if let Err(e) = gw.record(event).await {
        tracing::error!(error = %e, "could not record a refused call's outcome");
    }
    json_response(StatusCode::SERVICE_UNAVAILABLE, &messages::error_body(id, GATEWAY_REFUSED, &error.to_string()))
}

/// The decision record of one message. Text the client made up that the
/// policy does not know (an unknown tool or prompt name, an unknown method)
/// is attacker-chosen and could carry PHI: it is recorded as its keyed HMAC,
/// which an investigator holding the key can still match.
#[allow(clippy::too_many_arguments)]
fn decision_event(
    gw: &Gateway,
    caller: &Caller,
    issuer: &str,
    correlation: &str,
    method: Option<&str>,
    params: Option<&Value>,
    decision: &Decision,
    meta_stripped: bool,
) -> Event {
    let keyed = |text: &str| format!("hmac:{}", gw.args_key.hmac_json(&Value::String(text.to_string())));
    let unknown_method = matches!(decision, Decision::Deny(d) if d.code == authz::METHOD_NOT_FOUND);
    let method = match method {
        None => "response".to_string(),
        Some(m) if unknown_method => keyed(m),
        Some(m) => m.to_string(),
    };
    let (record_decision, tool, phi, reason) = match decision {
        Decision::Allow(a) => (RecordDecision::Allow, a.target.clone(), a.phi, None),
        Decision::Deny(d) => {
            let tool = d.target.as_deref().map(|t| if d.client_named { keyed(t) } else { t.to_string() });
            (RecordDecision::Deny, tool, false, Some(d.reason.to_string()))
        }
    };
    let reason = match (reason, meta_stripped) {
        (r, false) => r,
        (Some(r), true) => Some(format!("{r}; client-supplied io.mcpwarden/ _meta removed")),
        (None, true) => Some("client-supplied io.mcpwarden/ _meta removed".into()),
    };
    Event {
        correlation: Some(correlation.to_string()),
        caller: Some(record_caller(caller, issuer)),
        method: Some(method),
        tool,
        phi: Some(phi),
        decision: Some(record_decision),
        reason,
        args_hmac: params.and_then(|p| p.get("arguments")).map(|a| gw.args_key.hmac_json(a)),
        ..Event::new(Kind::Decision)
    }
}

/// A 2025-03-26 batch: every element is authorized and recorded on its own;
/// only allowed elements are forwarded (as one batch); refused ones are
/// answered here; list results are filtered by the id of their request.
async fn post_batch(
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
    let mut forwarded = Vec::new();
    let mut local: Vec<Value> = Vec::new();
    let mut filters: std::collections::HashMap<String, ListKind> = std::collections::HashMap::new();
    let mut element_correlations: Vec<(String, String)> = Vec::new();
    let mut accesses: Vec<CallAccess> = Vec::new();
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
            Decision::Allow(_) if recorded.is_err() && policy.audit_failure_policy == FailurePolicy::Closed => {
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
                        match DataAccess::open(gw.data_access.as_ref(), &policy, tool, token, &who, &element).await {
                            Ok(access) => access,
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
    let request = upstream_post(&gw, &headers, upstream_session.as_deref(), &Value::Array(forwarded));
    let no_errors = std::collections::HashMap::new();
    let upstream = match request.send().await {
        Ok(response) => response,
        Err(_) => {
            record_batch_outcomes(&gw, &element_correlations, StatusCode::BAD_GATEWAY, &no_errors, started).await;
            return json_response(
                StatusCode::BAD_GATEWAY,
                &messages::error_body(None, GATEWAY_REFUSED, "the MCP server is unreachable"),
            );
        }
    };
    let status = StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = content_type_of(&upstream);
    let body = match read_upstream(upstream).await {
        Ok(body) => body,
        Err(e) => {
            record_batch_outcomes(&gw, &element_correlations, StatusCode::BAD_GATEWAY, &no_errors, started).await;
            return json_response(StatusCode::BAD_GATEWAY, &messages::error_body(None, GATEWAY_REFUSED, e));
        }
    };
    if status == StatusCode::ACCEPTED && local.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    let mut rpc_errors: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut edit = |message: &mut Value| {
        let key = message.get("id").map(ToString::to_string).unwrap_or_default();
        if let Some(code) = message.pointer("/error/code").and_then(Value::as_i64) {
            rpc_errors.insert(key.clone(), code);
        }
        if let (Some(kind), Some(result)) = (filters.get(&key), message.get_mut("result")) {
            if *kind == ListKind::Tools {
                gw.learn_tools(result);
            }
            gw.metrics.filtered(authz::filter_list(&policy, &caller, *kind, result));
            mark_private(*kind, result);
        }
    };
    let (body, content_type) = if content_type.starts_with("text/event-stream") {
        let mut text = messages::rewrite_sse(&String::from_utf8_lossy(&body), &mut edit);
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
    record_batch_outcomes(&gw, &element_correlations, status, &rpc_errors, started).await;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = if status == StatusCode::ACCEPTED { StatusCode::OK } else { status };
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// One outcome record per forwarded batch element that has an id.
async fn record_batch_outcomes(
    gw: &Gateway,
    elements: &[(String, String)],
    status: StatusCode,
    rpc_errors: &std::collections::HashMap<String, i64>,
    started: Instant,
) {
    for (id, element) in elements {
        let rpc_error = rpc_errors.get(id).copied();
        let outcome_status =
            if !status.is_success() || rpc_error.is_some() { OutcomeStatus::Error } else { OutcomeStatus::Ok };
        let outcome = Outcome { status: outcome_status, http_status: Some(status.as_u16()), rpc_error, rows: None };
        record_outcome(gw, element, outcome, started).await;
    }
}

/// The server's own session id for this request (old revisions only),
/// after checking that the presented one is bound to this caller.
fn session_for_upstream(
    gw: &Gateway,
    caller: &Caller,
    revision: &str,
    headers: &HeaderMap,
) -> Result<Option<String>, &'static str> {
    if messages::is_stateless(revision) {
        return Ok(None);
    }
    match headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        None => Ok(None),
        Some(presented) => {
            gw.sessions.unbind(&caller.subject, presented).map(Some).map_err(|_| "session not found for this caller")
        }
    }
}

/// A JSON-RPC POST to the MCP server.
fn upstream_post(gw: &Gateway, headers: &HeaderMap, session: Option<&str>, body: &Value) -> reqwest::RequestBuilder {
    gw.http
        .post(gw.config.upstream.clone())
        .headers(upstream_headers(headers, session))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
}

/// Request headers for the upstream: no credential, no hop-by-hop header,
/// the server's own session id.
fn upstream_headers(incoming: &HeaderMap, session: Option<&str>) -> reqwest::header::HeaderMap {
    const DROPPED: [&str; 12] = [
        "host",
        "authorization",
        "cookie",
        "proxy-authorization",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "mcp-session-id",
    ];
    let mut out = reqwest::header::HeaderMap::new();
    for (name, value) in incoming {
        if DROPPED.contains(&name.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(name.as_str().as_bytes()),
            reqwest::header::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            out.append(n, v);
        }
    }
    if let Some(session) = session
        && let Ok(v) = reqwest::header::HeaderValue::from_str(session)
    {
        out.insert("mcp-session-id", v);
    }
    out
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
    if gw.record(event).await.is_err() && gw.policy().audit_failure_policy == FailurePolicy::Closed {
        gw.metrics.decision("refused_audit");
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &messages::error_body(
                None,
                GATEWAY_REFUSED,
                "the audit trail cannot record this request, so it is refused",
            ),
        );
    }
    gw.metrics.decision("allow");
    let request =
        gw.http.request(method, gw.config.upstream.clone()).headers(upstream_headers(&headers, Some(&session)));
    forward(gw, caller, correlation, request, None, None, None).await
}

/// Sends the request upstream and relays the answer (step 8), recording
/// the outcome (step 9).
async fn forward(
    gw: Arc<Gateway>,
    caller: Caller,
    correlation: String,
    request: reqwest::RequestBuilder,
    filter: Option<ListKind>,
    id: Option<Value>,
    access: Option<CallAccess>,
) -> Response {
    let started = Instant::now();
    let upstream = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "upstream unreachable");
            let outcome = Outcome { status: OutcomeStatus::Error, http_status: Some(502), rpc_error: None, rows: None };
            record_outcome(&gw, &correlation, outcome, started).await;
            return json_response(
                StatusCode::BAD_GATEWAY,
                &messages::error_body(id.as_ref(), GATEWAY_REFUSED, "the MCP server is unreachable"),
            );
        }
    };
    let status = StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for (name, value) in upstream.headers() {
        let lower = name.as_str();
        if matches!(lower, "content-length" | "connection" | "keep-alive" | "transfer-encoding" | "mcp-session-id") {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(lower.as_bytes()), HeaderValue::from_bytes(value.as_bytes())) {
            headers.append(n, v);
        }
    }
    if let Some(session) = upstream.headers().get("mcp-session-id").and_then(|v| v.to_str().ok())
        && let Ok(bound) = HeaderValue::from_str(&gw.sessions.bind(&caller.subject, session))
    {
        headers.insert("mcp-session-id", bound);
    }
    let content_type = content_type_of(&upstream);
    let streaming = content_type.starts_with("text/event-stream");
    if streaming && filter.is_none() {
        // SSE is relayed as it arrives; dropping the response (client gone)
        // drops the upstream connection, which cancels the request there.
        let mut stream =
            OutcomeStream::new(upstream.bytes_stream().boxed(), Arc::clone(&gw), correlation, status.as_u16(), started);
        stream.access = access;
        let mut response = Response::new(Body::from_stream(stream));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
        return response;
    }
    let body = match read_upstream(upstream).await {
        Ok(body) => body,
        Err(e) => {
            let outcome = Outcome { status: OutcomeStatus::Error, http_status: Some(502), rpc_error: None, rows: None };
            record_outcome(&gw, &correlation, outcome, started).await;
            return json_response(StatusCode::BAD_GATEWAY, &messages::error_body(id.as_ref(), GATEWAY_REFUSED, e));
        }
    };
    let mut rpc_error = None;
    let body = if content_type.starts_with("application/json") {
        match serde_json::from_slice::<Value>(&body) {
            Ok(mut value) => {
                rpc_error = value.pointer("/error/code").and_then(Value::as_i64);
                match (filter, value.get_mut("result")) {
                    (Some(kind), Some(result)) => {
                        if kind == ListKind::Tools {
                            gw.learn_tools(result);
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
    } else if streaming {
        let text = String::from_utf8_lossy(&body).into_owned();
        let policy = gw.policy();
        let rewritten = messages::rewrite_sse(&text, |message| {
            if let (Some(kind), Some(result)) = (filter, message.get_mut("result")) {
                if kind == ListKind::Tools {
                    gw.learn_tools(result);
                }
                let removed = authz::filter_list(&policy, &caller, kind, result);
                gw.metrics.filtered(removed);
                mark_private(kind, result);
            }
        });
        Bytes::from(rewritten)
    } else {
        body
    };
    let outcome_status =
        if !status.is_success() || rpc_error.is_some() { OutcomeStatus::Error } else { OutcomeStatus::Ok };
    let outcome = Outcome { status: outcome_status, http_status: Some(status.as_u16()), rpc_error, rows: None };
    record_outcome(&gw, &correlation, outcome, started).await;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A filtered list differs per caller: in 2026-07-28 terms, its cache scope
/// is private.
fn mark_private(kind: ListKind, result: &mut Value) {
    if kind == ListKind::Tools
        && let Some(map) = result.as_object_mut()
    {
        map.insert("cacheScope".into(), Value::String("private".into()));
    }
}

fn content_type_of(response: &reqwest::Response) -> String {
    response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

async fn read_upstream(response: reqwest::Response) -> Result<Bytes, &'static str> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| "the MCP server's response was cut off")?;
        if body.len() + chunk.len() > MAX_BUFFERED_RESPONSE {
            return Err("the MCP server's response is too large");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

async fn record_outcome(gw: &Gateway, correlation: &str, outcome: Outcome, started: Instant) {
    let event = Event {
        correlation: Some(correlation.to_string()),
        outcome: Some(outcome),
        duration_us: Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        ..Event::new(Kind::Outcome)
    };
    let _ = gw.record(event).await;
}

/// An SSE body relayed as it arrives, recording its outcome when it ends,
/// fails, or is dropped because the client went away.
struct OutcomeStream {
    inner: futures::stream::BoxStream<'static, Result<Bytes, reqwest::Error>>,
    pending: Option<(Arc<Gateway>, String, u16, Instant)>,
    /// The call's database access, ended with the stream.
    access: Option<CallAccess>,
}

impl OutcomeStream {
    fn new(
        inner: futures::stream::BoxStream<'static, Result<Bytes, reqwest::Error>>,
        gw: Arc<Gateway>,
        correlation: String,
        http_status: u16,
        started: Instant,
    ) -> Self {
        OutcomeStream { inner, pending: Some((gw, correlation, http_status, started)), access: None }
    }

    fn finish(&mut self, status: OutcomeStatus) {
        // The call is over: its database tokens and connections end.
        self.access = None;
        if let Some((gw, correlation, http_status, started)) = self.pending.take() {
            let outcome = Outcome { status, http_status: Some(http_status), rpc_error: None, rows: None };
            tokio::spawn(async move { record_outcome(&gw, &correlation, outcome, started).await });
        }
    }
}

impl Stream for OutcomeStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(Some(Err(_))) => {
                self.finish(OutcomeStatus::Error);
                Poll::Ready(Some(Err(std::io::Error::other("the MCP server's stream failed"))))
            }
            Poll::Ready(None) => {
                self.finish(OutcomeStatus::Ok);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for OutcomeStream {
    fn drop(&mut self) {
        self.finish(OutcomeStatus::Cancelled);
    }
}
