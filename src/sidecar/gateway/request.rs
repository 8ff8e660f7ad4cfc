//! Steps 3 and 4: the request itself. Its body is bounded and parsed as
//! JSON-RPC; the transport's own rules (mirrored headers, sessions bound to
//! their caller) are checked. Refusals are recorded with the caller.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

use super::decision::record_caller;
use super::{Gateway, json_response};
use crate::audit::record::{Decision as RecordDecision, Event, Kind};
use crate::policy::Caller;
use crate::sidecar::messages;

/// One authenticated request, for refusals that happen before
/// authorization (body, transport checks).
pub(super) struct Refusal<'a> {
    pub(super) gw: &'a Gateway,
    pub(super) caller: &'a Caller,
    pub(super) correlation: &'a str,
}

impl Refusal<'_> {
    /// Records the refusal, then answers with a JSON-RPC error.
    pub(super) async fn refuse(
        &self,
        method: &str,
        status: StatusCode,
        code: i64,
        reason: &str,
        id: Option<&Value>,
    ) -> Response {
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

/// The request's body, up to `limit` bytes: 413 past it, 408 when it did
/// not arrive in time (`http_server`'s deadline), 400 when unreadable.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, StatusCode> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) if crate::http_server::is_body_timeout(&*e) => Err(StatusCode::REQUEST_TIMEOUT),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// The server's own session id for this request (old revisions only),
/// after checking that the presented one is bound to this caller.
pub(super) fn session_for_upstream(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_server::BodyTimeout;

    fn failing(error: impl std::error::Error + Send + Sync + 'static) -> Body {
        let chunks: Vec<Result<Bytes, Box<dyn std::error::Error + Send + Sync>>> =
            vec![Ok(Bytes::from_static(b"{\"jsonrpc\"")), Err(Box::new(error))];
        Body::from_stream(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_or_refused_with_why() {
        let whole = read_body(Body::from("{}"), 1024).await;
        assert_eq!(whole.as_deref(), Ok(&b"{}"[..]));
        assert_eq!(read_body(Body::from("x".repeat(2048)), 1024).await, Err(StatusCode::PAYLOAD_TOO_LARGE));
        let late = read_body(failing(BodyTimeout(std::time::Duration::from_secs(30))), 1024).await;
        assert_eq!(late, Err(StatusCode::REQUEST_TIMEOUT));
        assert_eq!(read_body(failing(std::io::Error::other("reset")), 1024).await, Err(StatusCode::BAD_REQUEST));
    }
}
