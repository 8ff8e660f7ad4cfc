//! Break-glass decisions, pure: where an `EmergencyAccess` grant stands,
//! from its spec, its server's procedure and the times the controller
//! stamped. Admission CEL has no clock, so timing lives here; it also
//! re-checks what admission checks (defence in depth): the procedure
//! exists, tools and duration are within it, nobody approves their own
//! grant or one for themselves.
//!
//! ```text
//!   Required:     Pending ──approval (stamped ≤ 15 min after creation)──▶ Active ──duration──▶ Expired
//!                    └──── no approval in 15 min ───▶ Refused
//!   ReviewAfter:  Active at creation ──duration──▶ Expired; review due within reviewWithin
//!   any:          revoked ▶ Revoked · outside the procedure ▶ Refused (why)
//! ```

use std::time::Duration;

use k8s_openapi::jiff::{self, Timestamp};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{ApprovalMode, EmergencyAccessSpec, EmergencyAccessStatus, EmergencyProcedure, GrantState};
use crate::policy::parse_go_duration;

/// How long a grant may wait for its approval.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The longest grant, whatever a procedure says (the CRDs say so too).
pub const MAX_GRANT: Duration = Duration::from_secs(4 * 3600);

/// What the controller knows of a grant.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The grant.
    pub grant: &'a EmergencyAccessSpec,
    /// Its server's procedure; `None` when the server declares none (or
    /// does not exist).
    pub procedure: Option<&'a EmergencyProcedure>,
    /// The tools the server declares.
    pub declared_tools: &'a [String],
    /// When the grant was created.
    pub created: Timestamp,
    /// When the controller first saw its approval (stamped in status).
    pub approved_at: Option<Timestamp>,
    /// Now.
    pub now: Timestamp,
}

/// Where the grant stands and its times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// The state.
    pub state: GrantState,
    /// Why (for `Refused`), or what holds.
    pub message: String,
    /// When it came into force.
    pub activated_at: Option<Timestamp>,
    /// When it ends (or ended).
    pub expires_at: Option<Timestamp>,
    /// For `ReviewAfter`: when the review is due.
    pub review_due_at: Option<Timestamp>,
    /// For `ReviewAfter`: the review is late (the control fails).
    pub review_overdue: bool,
}

impl Judgement {
    fn refused(message: String) -> Judgement {
        Judgement {
            state: GrantState::Refused,
            message,
            activated_at: None,
            expires_at: None,
            review_due_at: None,
            review_overdue: false,
        }
    }
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)).unwrap_or(Timestamp::MAX)
}

/// Judges a grant.
pub fn judge(f: &Facts<'_>) -> Judgement {
    let g = f.grant;
    let Some(procedure) = f.procedure else {
        return Judgement::refused(format!("MCPServer {} declares no emergencyAccess procedure", g.server));
    };
    let undeclared: Vec<&str> = g
        .tools
        .iter()
        .filter(|t| !procedure.tools.contains(t) || !f.declared_tools.contains(t))
        .map(String::as_str)
        .collect();
    if !undeclared.is_empty() {
        return Judgement::refused(format!("tools outside the procedure: {}", undeclared.join(", ")));
    }
    let duration = match parse_go_duration(&g.duration) {
        Ok(d) if d > Duration::ZERO => d,
        _ => return Judgement::refused(format!("duration {:?} is not a duration", g.duration)),
    };
    let max = parse_go_duration(&procedure.max_duration).unwrap_or(Duration::ZERO).min(MAX_GRANT);
    if duration > max {
        return Judgement::refused(format!(
            "duration {} exceeds the procedure's maxDuration {}",
            g.duration, procedure.max_duration
        ));
    }
    let beneficiary_user = format!("{}{}", procedure.kubernetes_username_prefix, g.beneficiary);
    if g.requester == beneficiary_user && procedure.approval == ApprovalMode::ReviewAfter {
        // Activating for oneself without anyone is exactly what the
        // second person is for: ReviewAfter may be started for someone
        // else only.
        return Judgement::refused("ReviewAfter grants may not be started by their beneficiary".into());
    }
    if let Some(approval) = &g.approval {
        if approval.approver == g.requester {
            return Judgement::refused("self-approval: the approver is the requester".into());
        }
        if approval.approver == beneficiary_user {
            return Judgement::refused("the approver is the beneficiary".into());
        }
        let named = procedure.approvers.users.contains(&approval.approver);
        if !named && procedure.approvers.groups.is_empty() {
            return Judgement::refused(format!("{} is not an approver of this procedure", approval.approver));
        }
    }
    let (activated, review_due) = match procedure.approval {
        ApprovalMode::Required => match (&g.approval, f.approved_at) {
            (Some(_), Some(at)) if at <= plus(f.created, PENDING_TIMEOUT) => (at, None),
            (Some(_), Some(_)) => return Judgement::refused("approved after the 15-minute window".into()),
            _ if f.now > plus(f.created, PENDING_TIMEOUT) => {
                return Judgement::refused("not approved within 15 minutes".into());
            }
            _ => {
                return Judgement {
                    state: if g.revoked { GrantState::Revoked } else { GrantState::Pending },
                    message: "waiting for an approver".into(),
                    activated_at: None,
                    expires_at: None,
                    review_due_at: None,
                    review_overdue: false,
                };
            }
        },
        ApprovalMode::ReviewAfter => {
            let within = parse_go_duration(&procedure.review_within).unwrap_or(Duration::ZERO);
            (f.created, Some(plus(f.created, within)))
        }
    };
    let expires = plus(activated, duration);
    let reviewed = g.approval.is_some() && f.approved_at.is_some();
    let review_overdue = review_due.is_some_and(|due| !reviewed && f.now > due);
    let (state, message) = if g.revoked {
        (GrantState::Revoked, "revoked".to_string())
    } else if f.now >= expires {
        (GrantState::Expired, "its time is over".to_string())
    } else {
        (GrantState::Active, format!("tools {} open for {} until {expires}", g.tools.join(", "), g.beneficiary))
    };
    Judgement {
        state,
        message,
        activated_at: Some(activated),
        expires_at: Some(expires),
        review_due_at: review_due,
        review_overdue,
    }
}

/// The status a controller writes for a judgement. `previous` keeps the
/// approval stamp: the first time an approval is seen it is stamped `now`,
/// never again (an approver's later edit cannot move it).
pub fn grant_status(
    judgement: &Judgement,
    previous: Option<&EmergencyAccessStatus>,
    has_approval: bool,
    now: Timestamp,
) -> EmergencyAccessStatus {
    let time = |t: Option<Timestamp>| t.map(Time);
    let approved_at = previous.and_then(|p| p.approved_at.clone()).or_else(|| has_approval.then_some(Time(now)));
    EmergencyAccessStatus {
        state: Some(judgement.state),
        message: Some(judgement.message.clone()),
        approved_at,
        activated_at: time(judgement.activated_at),
        expires_at: time(judgement.expires_at),
        review_due_at: time(judgement.review_due_at),
        conditions: previous.map(|p| p.conditions.clone()).unwrap_or_default(),
    }
}

/// When the controller must look at a grant again without a watch event:
/// the next moment its judgement can change on its own (the approval window
/// closing, expiry, the review falling due). `None`: it cannot change by
/// time alone.
pub fn next_check(judgement: &Judgement, created: Timestamp, now: Timestamp) -> Option<Duration> {
    let candidates = [
        (judgement.state == GrantState::Pending).then(|| plus(created, PENDING_TIMEOUT)),
        (judgement.state == GrantState::Active).then_some(judgement.expires_at).flatten(),
        judgement.review_due_at.filter(|_| !judgement.review_overdue),
    ];
    candidates
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min()
        .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or_default() + Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Approval, Approvers};

    fn procedure(mode: ApprovalMode) -> EmergencyProcedure {
        EmergencyProcedure {
            approvers: Approvers { users: vec!["oidc:dr-house".into()], groups: vec![] },
            max_duration: "2h".into(),
            tools: vec!["lookup_identity".into()],
            approval: mode,
            review_within: "24h".into(),
            kubernetes_username_prefix: "oidc:".into(),
        }
    }

    fn grant() -> EmergencyAccessSpec {
        EmergencyAccessSpec {
            server: "patient-lookup".into(),
            requester: "oidc:nurse-joy".into(),
            beneficiary: "er-agent".into(),
            tools: vec!["lookup_identity".into()],
            reason: "unconscious patient, no id".into(),
            duration: "1h".into(),
            identified_output: true,
            approval: None,
            revoked: false,
        }
    }

    fn at(minutes: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + minutes * 60).unwrap()
    }

    fn judge_at(g: &EmergencyAccessSpec, p: Option<&EmergencyProcedure>, approved: Option<i64>, now: i64) -> Judgement {
        let declared = vec!["lookup_identity".to_string(), "clinic_hours".to_string()];
        judge(&Facts {
            grant: g,
            procedure: p,
            declared_tools: &declared,
            created: at(0),
            approved_at: approved.map(at),
            now: at(now),
        })
    }

    fn approved(by: &str) -> EmergencyAccessSpec {
        EmergencyAccessSpec { approval: Some(Approval { approver: by.into(), note: None }), ..grant() }
    }

    #[test]
    fn a_required_grant_waits_then_runs_for_its_duration_from_approval() {
        let p = procedure(ApprovalMode::Required);
        assert_eq!(judge_at(&grant(), Some(&p), None, 5).state, GrantState::Pending);
        let g = approved("oidc:dr-house");
        let j = judge_at(&g, Some(&p), Some(10), 30);
        assert_eq!((j.state, j.activated_at, j.expires_at), (GrantState::Active, Some(at(10)), Some(at(70))));
        assert_eq!(judge_at(&g, Some(&p), Some(10), 70).state, GrantState::Expired);
    }

    #[test]
    fn no_approval_in_time_is_a_refusal_and_late_approval_does_not_revive_it() {
        let p = procedure(ApprovalMode::Required);
        let j = judge_at(&grant(), Some(&p), None, 16);
        assert_eq!(j.state, GrantState::Refused);
        assert!(j.message.contains("15 minutes"), "{}", j.message);
        let j = judge_at(&approved("oidc:dr-house"), Some(&p), Some(20), 21);
        assert_eq!((j.state, j.message.contains("after the 15-minute window")), (GrantState::Refused, true));
    }

    #[test]
    fn nobody_approves_their_own_grant_or_one_for_themselves() {
        let p = procedure(ApprovalMode::Required);
        let cases = [
            (approved("oidc:nurse-joy"), "self-approval"),
            (approved("oidc:er-agent"), "the approver is the beneficiary"),
            (approved("oidc:janitor"), "is not an approver"),
        ];
        for (g, needle) in cases {
            let j = judge_at(&g, Some(&p), Some(1), 2);
            assert_eq!(j.state, GrantState::Refused, "{needle}");
            assert!(j.message.contains(needle), "{}", j.message);
        }
    }

    #[test]
    fn grants_outside_the_procedure_are_refused_naming_why() {
        let p = procedure(ApprovalMode::Required);
        let refused = |g: EmergencyAccessSpec, proc_: Option<&EmergencyProcedure>, needle: &str| {
            let j = judge_at(&g, proc_, None, 1);
            assert_eq!(j.state, GrantState::Refused, "{needle}");
            assert!(j.message.contains(needle), "{} lacks {needle}", j.message);
        };
        refused(grant(), None, "declares no emergencyAccess procedure");
        refused(EmergencyAccessSpec { tools: vec!["clinic_hours".into()], ..grant() }, Some(&p), "clinic_hours");
        refused(EmergencyAccessSpec { tools: vec!["drop_tables".into()], ..grant() }, Some(&p), "drop_tables");
        refused(EmergencyAccessSpec { duration: "3h".into(), ..grant() }, Some(&p), "exceeds");
        refused(EmergencyAccessSpec { duration: "forever".into(), ..grant() }, Some(&p), "not a duration");
        let mut generous = procedure(ApprovalMode::Required);
        generous.max_duration = "100h".into();
        refused(EmergencyAccessSpec { duration: "5h".into(), ..grant() }, Some(&generous), "exceeds");
    }

    #[test]
    fn review_after_starts_at_once_and_a_missing_review_becomes_overdue() {
        let p = procedure(ApprovalMode::ReviewAfter);
        let j = judge_at(&grant(), Some(&p), None, 5);
        assert_eq!((j.state, j.activated_at, j.review_due_at), (GrantState::Active, Some(at(0)), Some(at(24 * 60))));
        assert!(!j.review_overdue);
        // Expired after its hour; the review is still due and then late.
        let late = judge_at(&grant(), Some(&p), None, 24 * 60 + 1);
        assert_eq!((late.state, late.review_overdue), (GrantState::Expired, true));
        let reviewed = judge_at(&approved("oidc:dr-house"), Some(&p), Some(120), 24 * 60 + 1);
        assert!(!reviewed.review_overdue);
        // The beneficiary cannot start one for themselves.
        let own = EmergencyAccessSpec { requester: "oidc:er-agent".into(), ..grant() };
        assert_eq!(judge_at(&own, Some(&p), None, 1).state, GrantState::Refused);
    }

    #[test]
    fn the_approval_is_stamped_once_and_the_next_look_is_the_next_change() {
        let p = procedure(ApprovalMode::Required);
        let pending = judge_at(&grant(), Some(&p), None, 5);
        let status = grant_status(&pending, None, false, at(5));
        assert_eq!((status.state, status.approved_at.clone()), (Some(GrantState::Pending), None));
        // Pending: look again when the approval window closes.
        assert_eq!(next_check(&pending, at(0), at(5)), Some(Duration::from_secs(10 * 60 + 1)));
        // The approval is stamped when first seen, and kept after.
        let g = approved("oidc:dr-house");
        let active = judge_at(&g, Some(&p), Some(7), 7);
        let first = grant_status(&active, Some(&status), true, at(7));
        assert_eq!(first.approved_at, Some(Time(at(7))));
        let later = grant_status(&active, Some(&first), true, at(30));
        assert_eq!(later.approved_at, Some(Time(at(7))));
        assert_eq!(later.expires_at, Some(Time(at(67))));
        // Active: look again at expiry; expired: never by time alone.
        assert_eq!(next_check(&active, at(0), at(30)), Some(Duration::from_secs(37 * 60 + 1)));
        let expired = judge_at(&g, Some(&p), Some(7), 70);
        assert_eq!(next_check(&expired, at(0), at(70)), None);
        // ReviewAfter: the review falling due is a change too.
        let review = procedure(ApprovalMode::ReviewAfter);
        let after = judge_at(&grant(), Some(&review), None, 90);
        assert_eq!(
            (after.state, next_check(&after, at(0), at(90))),
            (GrantState::Expired, Some(Duration::from_secs((24 * 60 - 90) * 60 + 1)))
        );
    }

    #[test]
    fn revocation_ends_a_grant_in_any_state() {
        let p = procedure(ApprovalMode::Required);
        let revoked = EmergencyAccessSpec { revoked: true, ..approved("oidc:dr-house") };
        assert_eq!(judge_at(&revoked, Some(&p), Some(1), 2).state, GrantState::Revoked);
        let pending = EmergencyAccessSpec { revoked: true, ..grant() };
        assert_eq!(judge_at(&pending, Some(&p), None, 2).state, GrantState::Revoked);
    }
}
