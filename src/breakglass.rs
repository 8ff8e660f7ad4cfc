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
//!                 admission policy absent, not denying, or newer than the grant (or its approval) ▶ Refused
//! ```

use std::time::Duration;

use k8s_openapi::jiff::{self, Timestamp};

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::api::{
    ApprovalMode, EmergencyAccess, EmergencyAccessSpec, EmergencyAccessStatus, EmergencyProcedure, GrantState,
    MCPServer,
};
use crate::policy::parse_go_duration;

/// How long a grant may wait for its approval.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The longest grant, whatever a procedure says (the CRDs say so too).
pub const MAX_GRANT: Duration = Duration::from_secs(4 * 3600);

/// Whether the API server enforces the chart's break-glass admission
/// policy: without it nobody checked who created or approved a grant. A
/// grant created before the policy (re)appeared is refused for good (its
/// approval, later still, is covered by the same comparison).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The policy and its binding deny, since `since` (the later of their
    /// creations: a grant or approval older than that was not checked).
    Enforced {
        /// When both existed.
        since: Timestamp,
    },
    /// Absent, or not denying: why.
    Unenforced(String),
    /// Not observable here (offline `check`).
    NotObserved,
}

fn covers(list: Option<&Vec<String>>, value: &str) -> bool {
    list.is_some_and(|l| l.iter().any(|x| x == value || x == "*"))
}

/// Whether the ValidatingAdmissionPolicy `name` and its binding of the same
/// name (as the chart installs them) are in force: the policy fails closed,
/// takes the MCPServer as its parameter and covers creating and updating
/// grants; the binding denies, and a missing MCPServer denies too.
pub fn admission(
    name: &str,
    policy: Option<&ValidatingAdmissionPolicy>,
    binding: Option<&ValidatingAdmissionPolicyBinding>,
) -> Admission {
    let unenforced = |why: String| Admission::Unenforced(format!("admission policy {name}: {why}"));
    let Some(policy) = policy else { return unenforced("absent".into()) };
    let Some(binding) = binding else { return unenforced("its binding is absent".into()) };
    let spec = policy.spec.clone().unwrap_or_default();
    if spec.failure_policy.as_deref() == Some("Ignore") {
        return unenforced("failurePolicy is Ignore".into());
    }
    let param = spec.param_kind.unwrap_or_default();
    if param.kind.as_deref() != Some("MCPServer") || param.api_version.as_deref() != Some(crate::api::API_VERSION) {
        return unenforced("its paramKind is not MCPServer".into());
    }
    let selective = |s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>| {
        s.as_ref().is_some_and(|s| s != &Default::default())
    };
    let partial = |m: &k8s_openapi::api::admissionregistration::v1::MatchResources| {
        selective(&m.namespace_selector)
            || selective(&m.object_selector)
            || m.exclude_resource_rules.as_ref().is_some_and(|r| !r.is_empty())
    };
    if spec.match_constraints.as_ref().is_some_and(partial) {
        return unenforced("it matches only some grants".into());
    }
    let rules = spec.match_constraints.and_then(|m| m.resource_rules).unwrap_or_default();
    let operation_covered = |op: &str| {
        rules.iter().any(|r| {
            covers(r.api_groups.as_ref(), crate::api::GROUP)
                && covers(r.resources.as_ref(), "emergencyaccesses")
                && r.resource_names.as_ref().is_none_or(Vec::is_empty)
                && covers(r.operations.as_ref(), op)
        })
    };
    if !operation_covered("CREATE") || !operation_covered("UPDATE") {
        return unenforced("it does not cover creating and updating emergencyaccesses".into());
    }
    if spec.validations.unwrap_or_default().is_empty() {
        return unenforced("it validates nothing".into());
    }
    let bspec = &binding.spec;
    if bspec.policy_name != name {
        return unenforced(format!("its binding names policy {:?}", bspec.policy_name));
    }
    if !bspec.validation_actions.iter().any(|a| a == "Deny") {
        return unenforced("its binding does not Deny".into());
    }
    if bspec.param_ref.as_ref().and_then(|p| p.parameter_not_found_action.as_deref()) != Some("Deny") {
        return unenforced("its binding does not deny when the MCPServer is missing".into());
    }
    if bspec.match_resources.as_ref().is_some_and(partial) {
        return unenforced("its binding selects only some grants".into());
    }
    let created = |t: Option<Time>| t.map(|t| t.0).unwrap_or(Timestamp::MAX);
    let since = created(policy.creation_timestamp()).max(created(binding.creation_timestamp()));
    Admission::Enforced { since }
}

/// [`admission`] of the policy and binding named `name` among those found
/// (the broker reads them as lists).
pub fn admission_named(
    name: &str,
    policies: &[ValidatingAdmissionPolicy],
    bindings: &[ValidatingAdmissionPolicyBinding],
) -> Admission {
    admission(name, policies.iter().find(|p| p.name_any() == name), bindings.iter().find(|b| b.name_any() == name))
}

/// The break-glass admission policy's (and binding's) name when the chart
/// is installed as release `mcp-warden`.
pub const DEFAULT_ADMISSION_POLICY: &str = "mcp-warden-emergency-access";

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
    /// Whether the API server checked who created and approved it.
    pub admission: &'a Admission,
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
    /// For `ReviewAfter`: an approver reviewed it.
    pub reviewed: bool,
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
            reviewed: false,
            review_overdue: false,
        }
    }
}

/// Now, at the API server's precision (whole seconds): a time stamped in
/// status comes back truncated, and a judgement made from the full clock
/// would differ from the one made from what was written (a write each
/// pass).
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)).unwrap_or(Timestamp::MAX)
}

/// Judges a grant.
pub fn judge(f: &Facts<'_>) -> Judgement {
    let g = f.grant;
    match f.admission {
        Admission::Unenforced(why) => return Judgement::refused(format!("not checked by the API server: {why}")),
        Admission::Enforced { since } if *since > f.created => {
            return Judgement::refused(format!(
                "created before the admission policy was in force (since {since}): its requester was not checked"
            ));
        }
        _ => {}
    }
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
                    reviewed: false,
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
        reviewed: review_due.is_some() && reviewed,
        review_overdue,
    }
}

/// A grant in force, as the broker hands it to a sidecar: what it opens,
/// for whom, until when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveGrant {
    /// The EmergencyAccess's name (carried by every record made under it).
    pub name: String,
    /// The MCP subject it is for.
    pub beneficiary: String,
    /// The tools it opens.
    pub tools: Vec<String>,
    /// Whether `Identified` tools may answer with real values under it.
    #[serde(default)]
    pub identified_output: bool,
    /// When it ends.
    pub expires_at: Time,
}

/// The grants of `server` in force at `now`: those the controller has
/// judged Active (its status stamps the approval time the expiry counts
/// from) and that this judgement, against `admission`, finds Active too.
pub fn in_force<'a>(
    server: &MCPServer,
    grants: impl IntoIterator<Item = &'a EmergencyAccess>,
    admission: &Admission,
    now: Timestamp,
) -> Vec<ActiveGrant> {
    let (namespace, name) = (server.namespace(), server.name_any());
    grants
        .into_iter()
        .filter(|g| g.namespace() == namespace && g.spec.server == name)
        .filter(|g| g.status.as_ref().and_then(|s| s.state) == Some(GrantState::Active))
        .filter(|g| g.spec.approval.is_none() || g.status.as_ref().is_some_and(|s| s.approved_at.is_some()))
        .filter_map(|g| {
            let judgement = judge_grant(g, Some(server), admission, now);
            (judgement.state == GrantState::Active).then(|| ActiveGrant {
                name: g.name_any(),
                beneficiary: g.spec.beneficiary.clone(),
                tools: g.spec.tools.clone(),
                identified_output: g.spec.identified_output,
                expires_at: Time(judgement.expires_at.unwrap_or(now)),
            })
        })
        .collect()
}

/// Judges a grant object as the controller, the broker and the control
/// see it: created at its `creationTimestamp`, approved when its status
/// says (or now, when the approval is new), against its server's
/// procedure.
pub fn judge_grant(
    grant: &EmergencyAccess,
    server: Option<&MCPServer>,
    admission: &Admission,
    now: Timestamp,
) -> Judgement {
    let declared: Vec<String> =
        server.map(|s| s.spec.tools.iter().map(|t| t.name.clone()).collect()).unwrap_or_default();
    judge(&Facts {
        grant: &grant.spec,
        procedure: server.and_then(|s| s.spec.emergency_access.as_ref()),
        declared_tools: &declared,
        created: grant.creation_timestamp().map(|t| t.0).unwrap_or(now),
        approved_at: approved_at(grant, now),
        admission,
        now,
    })
}

/// When the grant's approval was first seen: the controller's stamp, or
/// now for an approval it has not stamped yet.
pub fn approved_at(grant: &EmergencyAccess, now: Timestamp) -> Option<Timestamp> {
    grant.spec.approval.as_ref()?;
    Some(grant.status.as_ref().and_then(|s| s.approved_at.as_ref()).map(|t| t.0).unwrap_or(now))
}

/// Condition of a `ReviewAfter` grant: an approver reviewed it.
pub const REVIEWED: &str = "Reviewed";

/// The `Reviewed` condition of a `ReviewAfter` grant (none otherwise); its
/// transition time moves only when its status does.
fn review_condition(judgement: &Judgement, previous: Option<&EmergencyAccessStatus>, now: Timestamp) -> Vec<Condition> {
    let Some(due) = judgement.review_due_at else { return Vec::new() };
    let (status, reason, message) = if judgement.reviewed {
        ("True", "Reviewed", "an approver reviewed this grant".to_string())
    } else if judgement.review_overdue {
        ("False", "ReviewOverdue", format!("no approver reviewed this grant by {due}"))
    } else {
        ("False", "ReviewDue", format!("an approver's review is due by {due}"))
    };
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == REVIEWED))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    vec![Condition {
        type_: REVIEWED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: None,
    }]
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
        conditions: review_condition(judgement, previous, now),
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
            admission: &Admission::Enforced { since: at(-60) },
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
        assert!(!reviewed.review_overdue && reviewed.reviewed);
        // The grant says so in a condition that moves only when it changes.
        let due = grant_status(&j, None, false, at(5));
        assert_eq!((due.conditions[0].status.as_str(), due.conditions[0].reason.as_str()), ("False", "ReviewDue"));
        let overdue = grant_status(&late, Some(&due), false, at(24 * 60 + 1));
        assert_eq!(overdue.conditions[0].reason, "ReviewOverdue");
        assert_eq!(overdue.conditions[0].last_transition_time, Time(at(5)), "still False");
        let done = grant_status(&reviewed, Some(&overdue), true, at(24 * 60 + 2));
        assert_eq!(
            (done.conditions[0].status.as_str(), &done.conditions[0].last_transition_time),
            ("True", &Time(at(24 * 60 + 2)))
        );
        assert!(
            grant_status(&judge_at(&grant(), Some(&procedure(ApprovalMode::Required)), None, 1), None, false, at(1))
                .conditions
                .is_empty()
        );
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

    fn policy_pair(created: &str) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
        let policy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mcpw-emergency-access", "creationTimestamp": created},
            "spec": {
                "failurePolicy": "Fail",
                "paramKind": {"apiVersion": "mcpwarden.io/v1alpha1", "kind": "MCPServer"},
                "matchConstraints": {"resourceRules": [{"apiGroups": ["mcpwarden.io"], "apiVersions": ["v1alpha1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["emergencyaccesses"]}]},
                "validations": [{"expression": "true"}]
            }
        }))
        .expect("policy");
        let binding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mcpw-emergency-access", "creationTimestamp": created},
            "spec": {"policyName": "mcpw-emergency-access", "validationActions": ["Deny"],
                "paramRef": {"selector": {}, "parameterNotFoundAction": "Deny"}}
        }))
        .expect("binding");
        (policy, binding)
    }

    #[test]
    fn the_admission_policy_must_deny_and_predate_the_grant() {
        let (policy, binding) = policy_pair("2027-01-15T08:00:00Z");
        let name = "mcpw-emergency-access";
        let since = "2027-01-15T08:00:00Z".parse::<Timestamp>().unwrap();
        assert_eq!(admission(name, Some(&policy), Some(&binding)), Admission::Enforced { since });
        let unenforced = |p: &ValidatingAdmissionPolicy, b: Option<&ValidatingAdmissionPolicyBinding>, needle: &str| {
            match admission(name, Some(p), b) {
                Admission::Unenforced(why) => assert!(why.contains(needle), "{why} lacks {needle}"),
                other => panic!("{needle}: {other:?}"),
            }
        };
        assert!(matches!(admission(name, None, Some(&binding)), Admission::Unenforced(w) if w.contains("absent")));
        unenforced(&policy, None, "binding is absent");
        let mut ignoring = policy.clone();
        ignoring.spec.as_mut().unwrap().failure_policy = Some("Ignore".into());
        unenforced(&ignoring, Some(&binding), "Ignore");
        let mut creates_only = policy.clone();
        creates_only.spec.as_mut().unwrap().match_constraints.as_mut().unwrap().resource_rules.as_mut().unwrap()[0]
            .operations = Some(vec!["CREATE".into()]);
        unenforced(&creates_only, Some(&binding), "creating and updating");
        let mut empty = policy.clone();
        empty.spec.as_mut().unwrap().validations = Some(vec![]);
        unenforced(&empty, Some(&binding), "validates nothing");
        let mut warns = binding.clone();
        warns.spec.validation_actions = vec!["Warn".into(), "Audit".into()];
        unenforced(&policy, Some(&warns), "does not Deny");
        let mut allows = binding.clone();
        allows.spec.param_ref.as_mut().unwrap().parameter_not_found_action = Some("Allow".into());
        unenforced(&policy, Some(&allows), "MCPServer is missing");
        let mut other = binding.clone();
        other.spec.policy_name = "something-else".into();
        unenforced(&policy, Some(&other), "names policy");
        let mut one_namespace = binding.clone();
        one_namespace.spec.match_resources = serde_json::from_value(serde_json::json!(
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clinic"}}}
        ))
        .ok();
        unenforced(&policy, Some(&one_namespace), "selects only some grants");
        let mut narrowed = policy.clone();
        narrowed.spec.as_mut().unwrap().match_constraints.as_mut().unwrap().object_selector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"team": "er"}})).ok();
        unenforced(&narrowed, Some(&binding), "matches only some grants");
        // What the API server defaults (empty selectors) selects everything.
        let mut defaulted = binding.clone();
        defaulted.spec.match_resources = serde_json::from_value(serde_json::json!(
            {"namespaceSelector": {}, "objectSelector": {}, "matchPolicy": "Equivalent"}
        ))
        .ok();
        assert!(matches!(admission(name, Some(&policy), Some(&defaulted)), Admission::Enforced { .. }));

        // In force since the policy's creation: a grant older than that was
        // never checked by it.
        let p = procedure(ApprovalMode::Required);
        let declared = vec!["lookup_identity".to_string()];
        let g = approved("oidc:dr-house");
        let facts = |created: Timestamp, approved: Timestamp, admission: &Admission| {
            judge(&Facts {
                grant: &g,
                procedure: Some(&p),
                declared_tools: &declared,
                created,
                approved_at: Some(approved),
                admission,
                now: approved,
            })
        };
        let enforced = Admission::Enforced { since: at(0) };
        assert_eq!(facts(at(1), at(2), &enforced).state, GrantState::Active);
        let before = facts(at(-5), at(2), &enforced);
        assert!(before.state == GrantState::Refused && before.message.contains("requester was not checked"));
        let absent = facts(at(1), at(2), &Admission::Unenforced("admission policy x: absent".into()));
        assert_eq!((absent.state, absent.message.contains("absent")), (GrantState::Refused, true));
    }

    #[test]
    fn only_grants_of_the_servers_namespace_judged_active_by_the_controller_are_in_force() {
        // The clinic example: namespace clinic, lookup_patient in its procedure.
        let mut server = crate::fixtures::clinic_server();
        server.spec.emergency_access =
            Some(EmergencyProcedure { tools: vec!["lookup_patient".into()], ..procedure(ApprovalMode::Required) });
        let object = |namespace: &str, state: GrantState| -> EmergencyAccess {
            let spec = EmergencyAccessSpec { tools: vec!["lookup_patient".into()], ..approved("oidc:dr-house") };
            let mut g = EmergencyAccess::new("ea-1", spec);
            g.metadata.namespace = Some(namespace.into());
            g.metadata.creation_timestamp = Some(Time(at(0)));
            g.status = Some(EmergencyAccessStatus {
                state: Some(state),
                approved_at: Some(Time(at(1))),
                ..Default::default()
            });
            g
        };
        let admission = Admission::Enforced { since: at(-60) };
        let in_force_of = |grants: &[EmergencyAccess]| in_force(&server, grants, &admission, at(5));
        let here = in_force_of(&[object("clinic", GrantState::Active)]);
        assert_eq!(here.len(), 1);
        assert_eq!((here[0].beneficiary.as_str(), here[0].expires_at.0), ("er-agent", at(61)));
        let policy = crate::policy::compile(&server, &crate::fixtures::clinic_stores()).expect("policy");
        assert!(policy.grant_opens(&here[0], "er-agent", "lookup_patient"));
        assert!(!policy.grant_opens(&here[0], "someone-else", "lookup_patient"));
        assert!(!policy.grant_opens(&here[0], "er-agent", "clinic_hours"));
        // A grant naming the same server from another namespace opens nothing here.
        assert!(in_force_of(&[object("elsewhere", GrantState::Active)]).is_empty());
        // Nor one the controller has not judged Active (its stamp is what
        // the end counts from).
        assert!(in_force_of(&[object("clinic", GrantState::Pending)]).is_empty());
    }
}
