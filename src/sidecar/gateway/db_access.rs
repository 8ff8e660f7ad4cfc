//! Step 7, for tools with `dataAccess`: a call whose database access could
//! not be set up is refused here, and the MCP server never sees it.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::{Gateway, json_response};
use crate::audit::record::{Event, Kind, Outcome, OutcomeStatus};
use crate::sidecar::data_access::DataAccessError;
use crate::sidecar::messages::{self, GATEWAY_REFUSED};

/// An allowed call whose database access could not be set up: refused with
/// an outcome record naming the class; the MCP server never sees it.
pub(super) async fn refuse_data_access(
    gw: &Gateway,
    correlation: &str,
    id: Option<&Value>,
    error: &DataAccessError,
) -> Response {
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
