//! The operator's trail of verdicts: whenever a control's verdict on an
//! MCPServer changes (or is first put in status), a `verdict` record goes
//! into that server's stream, shipped to the audit collector like the
//! broker's leases — so an auditor's report shows when each control passed
//! or failed in a period, from evidence outside the cluster's own state.
//!
//! ```text
//!   reconcile ─ status changes? ─ changes(previous, next) ─▶ Trail (server's stream) ─▶ collector
//! ```
//!
//! The record is written before the status that carries the verdict, so a
//! status is never ahead of the trail; a failed status write is retried
//! and, since status still holds the previous verdict, recorded again (a
//! repeated verdict in history, never a missing one).

use crate::api::ControlStatus;
use crate::audit::record::{ControlVerdict, Event, Kind};
use crate::audit::trail::OwnStream;

/// `server` of the operator's own stream (nothing is written there but
/// its start and end).
pub const OPERATOR_SERVER: &str = "mcp-warden/operator";
/// The operator's own stream.
pub const OPERATOR_STREAM: OwnStream = OwnStream { server: OPERATOR_SERVER, dir: "_operator" };

/// The controls whose verdict differs from `previous` (all of them when
/// there was none), as `verdict` events.
pub fn changes(previous: Option<&[ControlStatus]>, next: &[ControlStatus]) -> Vec<Event> {
    next.iter()
        .filter(|control| {
            previous.and_then(|p| p.iter().find(|c| c.id == control.id)).is_none_or(|p| p.verdict != control.verdict)
        })
        .map(|control| Event {
            control: Some(ControlVerdict {
                id: control.id.clone(),
                citation: control.citation.clone(),
                verdict: control.verdict.to_string(),
                message: control.message.clone(),
            }),
            ..Event::new(Kind::Verdict)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Verdict;

    fn control(id: &str, verdict: Verdict, message: &str) -> ControlStatus {
        ControlStatus { id: id.into(), citation: "45 CFR 164.312(b)".into(), verdict, message: message.into() }
    }

    #[test]
    fn first_status_records_every_control_then_only_changes_of_verdict() {
        let first = [control("audit-controls", Verdict::Unknown, "a"), control("integrity", Verdict::Pass, "b")];
        let all = changes(None, &first);
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|e| e.check().is_ok() && e.kind == Kind::Verdict));
        assert_eq!(all[0].control.as_ref().unwrap().verdict, "Unknown");
        // Evidence text changing alone is not a verdict change.
        let reworded =
            [control("audit-controls", Verdict::Unknown, "a, reworded"), control("integrity", Verdict::Pass, "b")];
        assert!(changes(Some(&first), &reworded).is_empty());
        let failed =
            [control("audit-controls", Verdict::Unknown, "a"), control("integrity", Verdict::Fail, "chain broken")];
        let changed = changes(Some(&first), &failed);
        assert_eq!(changed.len(), 1);
        let c = changed[0].control.as_ref().unwrap();
        assert_eq!((c.id.as_str(), c.verdict.as_str(), c.message.as_str()), ("integrity", "Fail", "chain broken"));
        // A control new to status (an upgrade added it) is recorded.
        let grown = [failed[0].clone(), failed[1].clone(), control("de-identification", Verdict::Pass, "c")];
        assert_eq!(changes(Some(&failed), &grown).len(), 1);
    }
}
