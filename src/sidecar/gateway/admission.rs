//! Steps 1 and 2: who may knock. Host and Origin (DNS-rebinding
//! protection), then the bearer token. Refusals here come before the caller
//! is known, so their records are rate-limited.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::{Gateway, GatewayConfig, json_response};
use crate::audit::record::{Decision as RecordDecision, Event, Kind};
use crate::sidecar::authn::{AuthnError, www_authenticate};
use crate::sidecar::messages::{self, GATEWAY_REFUSED};

pub(super) fn check_host_and_origin(config: &GatewayConfig, headers: &HeaderMap) -> Result<(), &'static str> {
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

pub(super) async fn refuse_unauthenticated(
    gw: &Gateway,
    correlation: &str,
    method: &str,
    error: &AuthnError,
) -> Response {
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
pub(super) async fn record_unauthenticated(
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
