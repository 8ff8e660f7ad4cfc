//! audit-controls (164.312(b)), integrity (164.312(c)(1)) and
//! emergency-access (164.312(a)(2)(ii)).

use k8s_openapi::api::core::v1::PodSpec;
use kube::ResourceExt;

use super::identity::sidecar_of;
use super::{Assessment, Input, Source};
use crate::api::FailurePolicy;
use crate::api::GrantState;
use crate::breakglass::Admission;
use crate::render::names::{MCP_CONTAINER, SIDECAR_CONTAINER};

const AUDIT_DIR_FLAG: &str = "--audit-dir";

pub(super) fn audit_controls(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    match input.server.spec.audit.failure_policy {
        FailurePolicy::Closed => {
            a.held("a call whose audit record cannot be made durable is refused (failurePolicy Closed)")
        }
        FailurePolicy::Open => {
            a.failed("audit.failurePolicy is Open: calls proceed when their audit record cannot be written; set Closed")
        }
    }
    match input.rendered {
        Ok(rendered) => {
            let problems = rendered.deployment.spec.template.spec.as_ref().map(auditing_pod_problems);
            match problems {
                Some(problems) if problems.is_empty() => a.held(format!(
                    "every pod runs {SIDECAR_CONTAINER} as a native sidecar; its audit WAL volume is not mounted by {MCP_CONTAINER}"
                )),
                Some(problems) => problems.into_iter().for_each(|p| a.failed(format!("the rendered Deployment: {p}"))),
                None => a.failed("the rendered Deployment has no pod template"),
            }
        }
        Err(e) => a.unseen(format!("no objects can be rendered ({e}), so no call is audited")),
    }
    if let Some(pods) = &input.observed.pods {
        let bare: Vec<String> = pods
            .iter()
            .filter(|pod| pod.spec.as_ref().is_none_or(|spec| !auditing_pod_problems(spec).is_empty()))
            .map(|pod| pod.name_any())
            .collect();
        if pods.is_empty() {
            a.held("no pod of this server exists yet");
        } else if bare.is_empty() {
            a.held(format!("all {} pod(s) carry the auditing sidecar ({})", pods.len(), phases(pods)));
        } else {
            a.failed(format!("pod(s) running without the auditing sidecar: {}", bare.join(", ")));
        }
    }
    if let Some(view) = &input.observed.pod_admission {
        let label = super::pod_admission::OPT_IN_LABEL;
        match (&view.in_force, view.namespace_opted_in) {
            (Ok(()), true) => a.held(format!(
                "the API server refuses this server's pods unless they run the sidecar in the rendered shape \
                 (ValidatingAdmissionPolicy {}; the namespace is labelled {label}=true)",
                view.policy
            )),
            (Ok(()), false) => a.held(format!(
                "pods without the sidecar are found after the fact only: the namespace is not labelled {label}=true, \
                 so ValidatingAdmissionPolicy {} does not refuse them",
                view.policy
            )),
            (Err(why), _) => a.held(format!(
                "pods without the sidecar are found after the fact only: ValidatingAdmissionPolicy {}: {why}",
                view.policy
            )),
        }
    }
    match (&input.observed.collector, input.observed.source) {
        (Some(c), _) if c.receiving => {
            a.held(format!("the audit collector, outside the pod, is receiving this server's records: {}", c.observed))
        }
        (Some(c), _) => a.failed(format!("the audit collector is not receiving this server's records: {}", c.observed)),
        (None, Source::Manifests) => a.unseen("records reaching the audit collector cannot be observed from manifests"),
        (None, Source::Cluster) => a.unseen("the audit collector has not reported on this server"),
    }
    a
}

/// How many pods are in each phase, e.g. `1 Running, 2 Pending`: a pod
/// that exists is not yet a pod that serves.
fn phases(pods: &[k8s_openapi::api::core::v1::Pod]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
        *counts.entry(phase).or_default() += 1;
    }
    counts.iter().map(|(phase, n)| format!("{n} {phase}")).collect::<Vec<_>>().join(", ")
}

/// What keeps a pod from auditing every call: the sidecar must run as a
/// native sidecar with an audit WAL volume that no other container mounts.
fn auditing_pod_problems(pod: &PodSpec) -> Vec<String> {
    let Some(sidecar) = sidecar_of(pod) else {
        return vec![format!("no {SIDECAR_CONTAINER} container")];
    };
    let mut problems = Vec::new();
    let native = pod.init_containers.iter().flatten().any(|c| c.name == SIDECAR_CONTAINER)
        && sidecar.restart_policy.as_deref() == Some("Always");
    if !native {
        problems.push(format!(
            "{SIDECAR_CONTAINER} runs outside the native-sidecar slot (an init container with restartPolicy Always)"
        ));
    }
    let args = sidecar.args.as_deref().unwrap_or_default();
    let Some(audit_dir) = args.iter().position(|x| x == AUDIT_DIR_FLAG).and_then(|i| args.get(i + 1)) else {
        problems.push(format!("{SIDECAR_CONTAINER} has no {AUDIT_DIR_FLAG}"));
        return problems;
    };
    let audit_volume = sidecar.volume_mounts.iter().flatten().find(|m| &m.mount_path == audit_dir).map(|m| &m.name);
    let Some(audit_volume) = audit_volume else {
        problems.push(format!("the audit directory {audit_dir} is not a volume of its own"));
        return problems;
    };
    let shared = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .filter(|c| c.name != SIDECAR_CONTAINER)
        .any(|c| c.volume_mounts.iter().flatten().any(|m| &m.name == audit_volume));
    if shared {
        problems.push(format!(
            "the audit volume {audit_volume} is mounted by another container, which could alter the trail"
        ));
    }
    problems
}

pub(super) fn integrity(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    match &input.observed.collector {
        Some(c) if c.open_incidents > 0 => a.failed(format!(
            "the audit collector reports {} open integrity incident(s) on this server's streams ({})",
            c.open_incidents, c.observed
        )),
        Some(c) if !c.chain_verified => {
            a.failed(format!("the audit collector could not verify this server's hash chain ({})", c.observed))
        }
        Some(c) => {
            a.held(format!("the audit collector verified every stream's hash chain of this server ({})", c.observed))
        }
        None => a.unseen(
            "no audit collector has verified this server's hash chain yet, so the trail's integrity is not verified",
        ),
    }
    a
}

pub(super) fn emergency_access(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let Some(p) = &input.server.spec.emergency_access else {
        a.unseen(
            "no break-glass procedure is configured (spec.emergencyAccess), so no emergency access is granted, bounded or recorded through mcp-warden",
        );
        return a;
    };
    let approvers: Vec<String> =
        p.approvers.users.iter().cloned().chain(p.approvers.groups.iter().map(|g| format!("group {g}"))).collect();
    a.held(format!(
        "a procedure is declared: {:?} approval by {}, grants of at most {} to {}",
        p.approval,
        approvers.join(", "),
        p.max_duration,
        p.tools.join(", ")
    ));
    let Some(view) = &input.observed.emergency else {
        a.unseen("grants (EmergencyAccess) and the admission policy are observed in a cluster only");
        return a;
    };
    match &view.admission {
        Admission::Enforced { .. } => {
            a.held("the API server enforces the break-glass admission policy (no self-approval, no widening)")
        }
        Admission::Unenforced(why) => {
            a.failed(format!("the procedure cannot be used: every grant is refused because {why}"))
        }
        Admission::NotObserved => a.unseen("the break-glass admission policy is not observed"),
    }
    let overdue: Vec<&str> =
        view.grants.iter().filter(|g| g.judgement.review_overdue).map(|g| g.name.as_str()).collect();
    if !overdue.is_empty() {
        a.failed(format!("no approver reviewed emergency access {} in time", overdue.join(", ")));
    }
    let in_force: Vec<String> = view
        .grants
        .iter()
        .filter(|g| g.judgement.state == GrantState::Active)
        .map(|g| {
            let until = g.judgement.expires_at.map(|t| t.to_string()).unwrap_or_default();
            let by = match (&g.approver, g.judgement.review_due_at) {
                (Some(who), _) => format!("approved by {who}"),
                (None, Some(due)) => format!("review due by {due}"),
                (None, None) => "unapproved".into(),
            };
            format!("{} ({} → {}, until {until}, {by})", g.name, g.beneficiary, g.tools.join(", "))
        })
        .collect();
    if in_force.is_empty() {
        a.held("no emergency access is in force");
    } else {
        a.held(format!(
            "emergency access in force, each approved (or under review) and bounded: {}",
            in_force.join("; ")
        ));
    }
    match &input.observed.collector {
        Some(collector) => trail_within_bounds(&view.grants, &collector.emergency_use, &mut a),
        None => a.held("use under grants is not checked against the audit trail: no audit collector report"),
    }
    a
}

/// Clocks of the sidecars, the broker and the controller may differ by this
/// much before a use counts as outside a grant's bounds.
const CLOCK_SKEW: k8s_openapi::jiff::SignedDuration = k8s_openapi::jiff::SignedDuration::from_secs(30);

/// Checks the collector's record of use under each grant against the
/// grant's bounds: used before it came into force, after its end, or under
/// a grant that is not in force by any judgement fails the control.
fn trail_within_bounds(
    grants: &[super::GrantView],
    used: &std::collections::BTreeMap<String, crate::audit::collector::store::GrantUse>,
    a: &mut Assessment,
) {
    use k8s_openapi::jiff::Timestamp;
    if used.is_empty() {
        a.held("the audit trail holds no use under emergency access");
        return;
    }
    let mut within = Vec::new();
    for (name, use_) in used {
        // Status is written only when it changes: the evidence of use in
        // bounds names grants, not counts or times that move with each call.
        let span = format!("{} use(s), {} to {}", use_.uses, use_.first, use_.last);
        let Some(grant) = grants.iter().find(|g| &g.name == name) else {
            within.push(format!("{name} (deleted since)"));
            continue;
        };
        let (Some(start), Some(end)) = (grant.judgement.activated_at, grant.judgement.expires_at) else {
            a.failed(format!(
                "emergency access {name} was used ({span}) but was never in force: {:?}, {}",
                grant.judgement.state, grant.judgement.message
            ));
            continue;
        };
        let (first, last) = (use_.first.parse::<Timestamp>().ok(), use_.last.parse::<Timestamp>().ok());
        match (first, last) {
            (Some(first), Some(last)) if first + CLOCK_SKEW >= start && last <= end + CLOCK_SKEW => {
                within.push(name.clone())
            }
            (Some(_), Some(_)) => a.failed(format!(
                "emergency access {name} was used outside its bounds ({span}; in force {start} to {end})"
            )),
            _ => a.failed(format!("emergency access {name}: the trail's times of its use do not parse ({span})")),
        }
    }
    if !within.is_empty() {
        a.held(format!("the audit trail shows use only within each grant's bounds: {}", within.join("; ")));
    }
}
