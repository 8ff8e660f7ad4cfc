//! Steps 5 and 6: the policy's decision, and its record. What the client
//! made up and the policy does not know is recorded as a keyed HMAC.

use serde_json::Value;

use super::Gateway;
use crate::audit::record::{Caller as RecordCaller, Decision as RecordDecision, Event, Kind};
use crate::policy::Caller;
use crate::sidecar::authz::{self, Decision};

pub(super) fn record_caller(caller: &Caller, issuer: &str) -> RecordCaller {
    RecordCaller {
        sub: caller.subject.clone(),
        iss: issuer.to_string(),
        groups: caller.groups.iter().cloned().collect(),
    }
}

/// The decision record of one message. Text the client made up that the
/// policy does not know (an unknown tool or prompt name, an unknown method)
/// is attacker-chosen and could carry PHI: it is recorded as its keyed HMAC,
/// which an investigator holding the key can still match.
#[allow(clippy::too_many_arguments)]
pub(super) fn decision_event(
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
    let grant = match decision {
        Decision::Allow(a) => a.grant.clone(),
        Decision::Deny(_) => None,
    };
    if let Some(grant) = &grant {
        gw.note_grant(correlation, grant);
    }
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
        emergency_access: grant,
        ..Event::new(Kind::Decision)
    }
}
