//! The broker's HTTP API.
//!
//! ```text
//!   POST /v1/credentials   sidecar (static credential, or its service-account token via TokenReview)
//!                          {server, tool, store, callerToken, correlation?} → Credential
//!   POST /v1/emergency-grants  sidecar (as for credentials) {server, subject} → {grants: [in force for that subject]}
//!   POST /v1/revocations   revoker credential   {leaseId} | {server, subject?, reason?}         → {revoked: [role]}
//!   GET  /v1/stores        revoker credential   → {namespace/name: PHIStore status}
//!   POST /v1/reidentifications  reidentifier credential, or in a cluster a person's token
//!                          (TokenReview + SubjectAccessReview: verb reidentify on phistores/<name>)
//!                          {store, pseudonym, reason} → {entity, key, scope, epoch}
//! ```
//!
//! Every answer carries `Cache-Control: no-store`. Refusals are
//! `{"error": class, "message": …}`; no message quotes the request body,
//! which holds a bearer token.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::cluster::TokenReviewer;
use super::issuer::{Broker, BrokerError, CredentialRequest};
use super::lifecycle::Revocation;
use super::reidentify::{ReidentifyRequest, Requester, parse_store};
pub use crate::bearer::StaticCredential;
use crate::bearer::bearer;
use crate::policy::ServerRef;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How sidecars prove who they are.
#[derive(Clone)]
pub enum SidecarAuth {
    /// A shared credential (laptops, tests, demos): any holder may ask for
    /// any server.
    Static(StaticCredential),
    /// The sidecar's projected service-account token, checked with
    /// TokenReview: it may ask only for the server it belongs to.
    TokenReview(Arc<TokenReviewer>),
}

impl SidecarAuth {
    /// `Ok(None)`: any server; `Ok(Some(server))`: that server only.
    async fn check(&self, headers: &HeaderMap) -> Result<Option<ServerRef>, String> {
        match self {
            SidecarAuth::Static(credential) => {
                if credential.admits(headers) {
                    Ok(None)
                } else {
                    Err("a sidecar credential is required".into())
                }
            }
            SidecarAuth::TokenReview(reviewer) => {
                let token = bearer(headers).ok_or("a sidecar service-account token is required")?;
                reviewer.server_of(token).await.map(Some).map_err(|e| e.to_string())
            }
        }
    }
}

/// Who may re-identify a pseudonym.
#[derive(Clone, Default)]
pub enum ReidentifierAuth {
    /// Nobody: the endpoint is closed.
    #[default]
    Closed,
    /// The holder of a static credential (laptops, tests, demos).
    Static(StaticCredential),
    /// A person whose Kubernetes token the API server authenticates and
    /// whose access to `reidentify` the PHIStore it authorizes.
    Cluster(Arc<crate::access_review::AccessReviewer>),
}

/// Who may call which endpoint.
#[derive(Clone)]
pub struct Callers {
    /// Sidecars asking for credentials.
    pub sidecar: SidecarAuth,
    /// Operators revoking leases and reading store reports; without it those
    /// endpoints are closed.
    pub revoker: Option<StaticCredential>,
    /// People re-identifying pseudonyms.
    pub reidentifier: ReidentifierAuth,
}

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    callers: Callers,
}

/// The API router.
pub fn router(broker: Arc<Broker>, callers: Callers) -> Router {
    Router::new()
        .route("/v1/credentials", post(credentials))
        .route("/v1/emergency-grants", post(emergency_grants))
        .route("/v1/revocations", post(revocations))
        .route("/v1/stores", get(stores))
        .route("/v1/reidentifications", post(reidentifications))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState { broker, callers })
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn refuse(status: StatusCode, class: &str, message: String) -> Response {
    let mut response = answer(status, json!({"error": class, "message": message}));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn refusal(error: &BrokerError) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    refuse(status, error.class(), error.to_string())
}

/// Parses a JSON body, naming only where it is malformed, never what it
/// holds.
fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes, what: &str) -> Result<T, Box<Response>> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if !json {
        return Err(Box::new(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "send application/json".into(),
        )));
    }
    parse_json(body, what).map_err(|message| Box::new(refuse(StatusCode::BAD_REQUEST, "invalid_request", message)))
}

/// Parses a request body; the error names where it is malformed, never
/// what it holds (a body can carry a caller's token).
pub fn parse_json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!("not a valid {what} ({:?} error at line {} column {})", e.classify(), e.line(), e.column())
    })
}

/// A sidecar's request: the sidecar authenticated, the body parsed, and
/// (in a cluster) the server it names its own.
async fn sidecar_request<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
    what: &str,
    server_of: impl FnOnce(&T) -> &str,
) -> Result<T, Response> {
    let bound = state
        .callers
        .sidecar
        .check(headers)
        .await
        .map_err(|why| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", why))?;
    let request: T = parse(headers, body, what).map_err(|response| *response)?;
    let asked = server_of(&request);
    if let Some(server) = bound
        && server.to_string() != asked
    {
        let message = format!("the sidecar of {server} may not make a {what} for {asked}");
        return Err(refuse(StatusCode::FORBIDDEN, "wrong_server", message));
    }
    Ok(request)
}

async fn credentials(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request: CredentialRequest =
        match sidecar_request(&state, &headers, &body, "credential request", |r: &CredentialRequest| &r.server).await {
            Ok(r) => r,
            Err(response) => return response,
        };
    match state.broker.issue(&request).await {
        Ok(credential) => answer(StatusCode::OK, json!(credential)),
        Err(e) => {
            // The class only: the message can echo names the sidecar sent.
            tracing::info!(class = e.class(), "credential request refused");
            refusal(&e)
        }
    }
}

/// What a sidecar asks of break-glass: the grants in force for one caller.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantsRequest {
    /// The MCPServer, `namespace/name`.
    pub server: String,
    /// The caller's `sub` (verified by the sidecar; the broker verifies the
    /// caller's token again when it issues a credential under a grant).
    pub subject: String,
}

/// The answer: grants in force for that caller now.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GrantsAnswer {
    /// Each grant in force.
    pub grants: Vec<crate::breakglass::ActiveGrant>,
}

async fn emergency_grants(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request: GrantsRequest =
        match sidecar_request(&state, &headers, &body, "grants request", |r: &GrantsRequest| &r.server).await {
            Ok(r) => r,
            Err(response) => return response,
        };
    let Some(server) = super::issuer::parse_server(&request.server) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "server must be namespace/name".into());
    };
    let grants = state.broker.inventory().grants_of(&server, &request.subject);
    answer(StatusCode::OK, json!(GrantsAnswer { grants }))
}

async fn revocations(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.callers.revoker.as_ref().is_some_and(|r| r.admits(&headers)) {
        return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a revoker credential is required".into());
    }
    let revocation: Revocation = match parse(&headers, &body, "revocation") {
        Ok(r) => r,
        Err(response) => return *response,
    };
    match state.broker.revoke(&revocation).await {
        Ok(roles) => answer(StatusCode::OK, json!({"revoked": roles})),
        Err(e) => refusal(&e),
    }
}

async fn stores(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !state.callers.revoker.as_ref().is_some_and(|r| r.admits(&headers)) {
        return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a revoker credential is required".into());
    }
    let reports: serde_json::Map<String, serde_json::Value> =
        state.broker.reports().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    answer(StatusCode::OK, serde_json::Value::Object(reports))
}

async fn reidentifications(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let unauthenticated = |why: String| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", why);
    // Who asks, before anything of the request is read.
    let (who, reviewer) = match &state.callers.reidentifier {
        ReidentifierAuth::Closed => return unauthenticated("re-identification is not enabled on this broker".into()),
        ReidentifierAuth::Static(credential) => {
            if !credential.admits(&headers) {
                return unauthenticated("a reidentifier credential is required".into());
            }
            let who = Requester {
                name: "reidentifier-credential".into(),
                issuer: "mcp-warden/static".into(),
                groups: vec![],
            };
            (who, None)
        }
        ReidentifierAuth::Cluster(reviewer) => {
            let Some(token) = bearer(&headers) else { return unauthenticated("a Kubernetes token is required".into()) };
            match reviewer.person(token).await {
                Ok(person) => {
                    let who = Requester {
                        name: person.username.clone(),
                        issuer: "kubernetes".into(),
                        groups: person.groups.clone(),
                    };
                    (who, Some((reviewer, person)))
                }
                Err(e) => return unauthenticated(e.to_string()),
            }
        }
    };
    let request: ReidentifyRequest = match parse(&headers, &body, "reidentification request") {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let allowed = match (&reviewer, parse_store(&request.store)) {
        (None, _) => true,
        (Some(_), None) => {
            return refuse(StatusCode::BAD_REQUEST, "invalid_request", "store must be namespace/name".into());
        }
        (Some((reviewer, person)), Some(store)) => {
            match reviewer.may(person, "reidentify", &store.namespace, &store.name).await {
                Ok(allowed) => allowed,
                Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "review_failed", e.to_string()),
            }
        }
    };
    match state.broker.reidentify(&request, &who, allowed).await {
        Ok(found) => answer(StatusCode::OK, json!(found)),
        Err(e) => {
            tracing::info!(class = e.class(), "reidentification refused");
            refusal(&e)
        }
    }
}

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        refusal(&self)
    }
}
