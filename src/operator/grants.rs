//! Reconciling one break-glass grant (`EmergencyAccess`).
//!
//! ```text
//!   reconcile ─ leading? ─ caches synced ─ newest grant ─ its MCPServer (cache) ─ admission policy in force? (cache)
//!             → breakglass::judge_grant (pure) → status (only if changed; the approval stamped once)
//!             → events on the grant and its server when the state changes
//!             → look again when time alone can change the judgement (approval window, expiry, review due)
//! ```
//!
//! Everything is read from the caches. A grant's `spec.reason` may name a
//! patient: it never goes into an event, a log line or a metric.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{instrument, warn};

use super::caches::Caches;
use super::context::{Context, ErrorLabels};
use super::reconcile::Error;
use crate::api::{API_VERSION, EmergencyAccess, EmergencyAccessStatus, GrantState, MCPServer};
use crate::breakglass::{self, Judgement};
use crate::render::names::MANAGER;

fn key(grant: &EmergencyAccess) -> String {
    format!("EmergencyAccess/{}/{}", grant.namespace().unwrap_or_default(), grant.name_any())
}

/// Reconciles one grant (the grant controller's entry point).
#[instrument(skip_all, fields(namespace = grant.namespace().unwrap_or_default(), name = grant.name_any()))]
pub async fn reconcile(grant: Arc<EmergencyAccess>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    ctx.caches.sync.wait().await;
    let namespace = grant.namespace().ok_or(Error::NoNamespace)?;
    let name = grant.name_any();
    let grant = newest(&ctx, grant, &namespace);
    let server = ctx.caches.servers.get(&ObjectRef::new(&grant.spec.server).within(&namespace));
    let admission = ctx.caches.emergency_admission(&ctx.emergency_policy);
    let now = breakglass::now();
    let judgement = breakglass::judge_grant(&grant, server.as_deref(), &admission, now);
    let next = breakglass::grant_status(&judgement, grant.status.as_ref(), grant.spec.approval.is_some(), now);
    count_in_force(&ctx, &namespace, &name, judgement.state);

    if grant.status.as_ref() != Some(&next) {
        let before = grant.status.as_ref().and_then(|s| s.state);
        if before != Some(judgement.state) {
            announce(&ctx, &grant, server.as_deref(), before, &judgement).await;
        }
        let overdue = |s: Option<&EmergencyAccessStatus>| {
            s.is_some_and(|s| s.conditions.iter().any(|c| c.reason == "ReviewOverdue"))
        };
        if overdue(Some(&next)) && !overdue(grant.status.as_ref()) {
            let note = "no approver reviewed this emergency access in time".to_string();
            publish(&ctx, &grant, server.as_deref(), EventType::Warning, "EmergencyAccessReviewOverdue", note).await;
        }
        let api: Api<EmergencyAccess> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": API_VERSION, "kind": "EmergencyAccess", "status": next});
        let written = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.recent.written(recent_key(&namespace, &name), serde_json::to_value(&written)?);
    }
    ctx.succeeded(&key(&grant));
    let wait = breakglass::next_check(&judgement, created(&grant, now), now).unwrap_or(ctx.resync).min(ctx.resync);
    Ok(Action::requeue(wait))
}

fn created(grant: &EmergencyAccess, now: Timestamp) -> Timestamp {
    grant.creation_timestamp().map(|t| t.0).unwrap_or(now)
}

fn recent_key(namespace: &str, name: &str) -> super::recent::Key {
    ("EmergencyAccess".to_string(), namespace.to_string(), name.to_string())
}

/// The grant as the cache holds it, unless this process's last status
/// write answered with a newer version (the approval stamp must not be
/// taken again from a stale copy).
fn newest(ctx: &Context, grant: Arc<EmergencyAccess>, namespace: &str) -> Arc<EmergencyAccess> {
    let Ok(cached) = serde_json::to_value(&*grant) else { return grant };
    match ctx.recent.resolve(&recent_key(namespace, &grant.name_any()), Some(cached.clone())) {
        Some(newer) if newer != cached => serde_json::from_value(newer).map(Arc::new).unwrap_or(grant),
        _ => grant,
    }
}

/// Sets the gauge of grants in force: the cached ones, with this one as
/// just judged.
fn count_in_force(ctx: &Context, namespace: &str, name: &str, state: GrantState) {
    let others = ctx
        .caches
        .grants
        .state()
        .iter()
        .filter(|g| !(g.namespace().as_deref() == Some(namespace) && g.name_any() == name))
        .filter(|g| g.status.as_ref().and_then(|s| s.state) == Some(GrantState::Active))
        .count();
    let total = others + usize::from(state == GrantState::Active);
    ctx.metrics.emergency_grants_active.set(i64::try_from(total).unwrap_or(i64::MAX));
}

/// Events for a change of state, on the grant and on its server: a grant
/// coming into force alerts (Warning), so does a refusal.
async fn announce(
    ctx: &Context,
    grant: &EmergencyAccess,
    server: Option<&MCPServer>,
    before: Option<GrantState>,
    judgement: &Judgement,
) {
    let state = judgement.state;
    let type_ = match state {
        GrantState::Active | GrantState::Refused => EventType::Warning,
        _ => EventType::Normal,
    };
    let note = format!(
        "emergency access {} for {} to {} ({}): {}",
        grant.name_any(),
        grant.spec.beneficiary,
        grant.spec.tools.join(", "),
        before.map(|b| format!("{b:?} -> {state:?}")).unwrap_or_else(|| format!("{state:?}")),
        judgement.message
    );
    match state {
        GrantState::Active | GrantState::Refused => {
            warn!(grant = %grant.name_any(), state = ?state, "emergency access")
        }
        _ => tracing::info!(grant = %grant.name_any(), state = ?state, "emergency access"),
    }
    publish(ctx, grant, server, type_, &format!("EmergencyAccess{state:?}"), note).await;
}

/// Publishes an event on the grant and on its server; a failure to publish
/// is logged, not fatal.
async fn publish(
    ctx: &Context,
    grant: &EmergencyAccess,
    server: Option<&MCPServer>,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent { type_, reason: reason.into(), note: Some(note), action: "Judge".into(), secondary: None };
    let mut targets = vec![grant.object_ref(&())];
    targets.extend(server.map(|s| s.object_ref(&())));
    for target in targets {
        if let Err(e) = ctx.recorder.publish(&event, &target).await {
            warn!(error = %e, reason, "could not publish an event");
        }
    }
}

/// Logs and counts a failure, then retries with exponential backoff.
pub fn error_policy(grant: Arc<EmergencyAccess>, error: &Error, ctx: Arc<Context>) -> Action {
    let wait = ctx.backoff(&key(&grant));
    warn!(error = %error, retry_in = ?wait, "grant reconcile failed");
    ctx.metrics.failures.get_or_create(&ErrorLabels { error: error.metric_label().into() }).inc();
    Action::requeue(wait)
}

/// The grants of an MCPServer: its procedure (or its tools) changing
/// changes their judgement.
pub fn grants_of_server(caches: &Caches, server: &MCPServer) -> Vec<ObjectRef<EmergencyAccess>> {
    let namespace = server.namespace().unwrap_or_default();
    caches.grants_of(&namespace, &server.name_any()).iter().map(|g| ObjectRef::from_obj(&**g)).collect()
}

/// Every grant: the admission policy changing changes them all.
pub fn every_grant(caches: &Caches) -> Vec<ObjectRef<EmergencyAccess>> {
    caches.grants.state().iter().map(|g| ObjectRef::from_obj(&**g)).collect()
}

/// The MCPServer of a grant: its `emergency-access` control reads it.
pub fn server_of_grant(grant: &EmergencyAccess) -> Option<ObjectRef<MCPServer>> {
    Some(ObjectRef::new(&grant.spec.server).within(&grant.namespace()?))
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use serde_json::{Value, json};

    use super::*;
    use crate::operator::fixtures::*;

    const GRANT: &str = "/apis/mcpwarden.io/v1alpha1/namespaces/rec-ssa/emergencyaccesses/ea-1";

    fn ago(minutes: i64) -> String {
        (Timestamp::now() - SignedDuration::from_mins(minutes))
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap()
            .to_string()
    }

    /// The recorded server with a break-glass procedure.
    fn server() -> Value {
        let mut server = serde_json::to_value(recorded_server()).expect("server");
        server["spec"]["emergencyAccess"] = json!({
            "approvers": {"users": ["oidc:dr-house"]}, "maxDuration": "2h",
            "tools": ["lookup_patient"], "kubernetesUsernamePrefix": "oidc:"
        });
        server
    }

    fn admission_policy(created: &str) -> Vec<Value> {
        let name = crate::operator::context::DEFAULT_EMERGENCY_POLICY;
        vec![
            json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name, "creationTimestamp": created, "resourceVersion": "1"},
                "spec": {"failurePolicy": "Fail",
                    "paramKind": {"apiVersion": "mcpwarden.io/v1alpha1", "kind": "MCPServer"},
                    "matchConstraints": {"resourceRules": [{"apiGroups": ["mcpwarden.io"], "apiVersions": ["v1alpha1"],
                        "operations": ["CREATE", "UPDATE"], "resources": ["emergencyaccesses"]}]},
                    "validations": [{"expression": "true"}]}}),
            json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name, "creationTimestamp": created, "resourceVersion": "2"},
                "spec": {"policyName": name, "validationActions": ["Deny"],
                    "paramRef": {"selector": {}, "parameterNotFoundAction": "Deny"}}}),
        ]
    }

    fn grant(created: &str, approval: Option<&str>, status: Option<Value>) -> Value {
        let mut grant = json!({
            "apiVersion": "mcpwarden.io/v1alpha1", "kind": "EmergencyAccess",
            "metadata": {"name": "ea-1", "namespace": NS, "uid": "ea-uid", "resourceVersion": "7", "creationTimestamp": created},
            "spec": {"server": "patient-lookup", "requester": "oidc:nurse-joy", "beneficiary": "er-agent",
                "tools": ["lookup_patient"], "reason": "patient P-1234 unconscious", "duration": "1h"}
        });
        if let Some(approver) = approval {
            grant["spec"]["approval"] = json!({"approver": approver});
        }
        if let Some(status) = status {
            grant["status"] = status;
        }
        grant
    }

    fn status_patch(verifier: Verifier, grant: Value) -> Verifier {
        verifier.expect(Method::PATCH, &format!("{GRANT}/status"), move |req| {
            assert!(req.query.contains("fieldManager=mcp-warden"), "{}", req.query);
            assert_eq!(req.body["kind"], "EmergencyAccess");
            let mut answer = grant;
            answer["status"] = req.body["status"].clone();
            answer["metadata"]["resourceVersion"] = json!("8");
            (StatusCode::OK, answer)
        })
    }

    async fn judge(world: Vec<Value>, expect: impl FnOnce(Verifier) -> Verifier) -> (Action, Vec<Recorded>) {
        let object: EmergencyAccess =
            serde_json::from_value(world.iter().find(|v| v["kind"] == "EmergencyAccess").cloned().expect("a grant"))
                .expect("grant");
        let (ctx, api) = World::new(world).context();
        let mock = expect(api).run();
        let action = reconcile(Arc::new(object), ctx).await.expect("reconcile");
        (action, mock.await.expect("mock api"))
    }

    fn written(seen: &[Recorded]) -> Value {
        seen.iter().find(|r| r.path.ends_with("/status")).map(|r| r.body["status"].clone()).expect("a status write")
    }

    #[tokio::test]
    async fn a_new_grant_waits_for_its_approver_and_says_so_without_its_reason() {
        let mut world = vec![server(), grant(&ago(1), None, None)];
        world.extend(admission_policy(&ago(60)));
        let (action, seen) = judge(world.clone(), |api| status_patch(api.events(2), grant(&ago(1), None, None))).await;
        let status = written(&seen);
        assert_eq!(status["state"], "Pending");
        assert_eq!(event_reasons(&seen), ["EmergencyAccessPending", "EmergencyAccessPending"]);
        let regarding: Vec<&str> =
            seen.iter().filter(|r| r.path == EVENTS).filter_map(|r| r.body["regarding"]["kind"].as_str()).collect();
        assert_eq!(regarding, ["EmergencyAccess", "MCPServer"]);
        for event in seen.iter().filter(|r| r.path == EVENTS) {
            assert!(!event.body.to_string().contains("P-1234"), "the reason stays out of events: {}", event.body);
        }
        // Looked at again by the resync (5 min), before its approval window
        // closes (14 min left); a window closing sooner is waited for.
        assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));
        let world = {
            let mut w = vec![
                server(),
                grant(&ago(14), None, Some(json!({"state": "Pending", "message": "waiting for an approver"}))),
            ];
            w.extend(admission_policy(&ago(60)));
            w
        };
        let (action, seen) = judge(world, |api| api).await;
        assert!(writes(&seen).is_empty());
        let around = (59..=62).map(|s| Action::requeue(std::time::Duration::from_secs(s)));
        assert!(around.into_iter().any(|a| a == action), "{action:?}");
    }

    #[tokio::test]
    async fn an_approval_is_stamped_once_and_opens_the_grant_until_its_end() {
        let pending = json!({"state": "Pending", "message": "waiting for an approver"});
        let mut world = vec![server(), grant(&ago(5), Some("oidc:dr-house"), Some(pending))];
        world.extend(admission_policy(&ago(60)));
        let answer = grant(&ago(5), Some("oidc:dr-house"), None);
        let (_, seen) = judge(world, |api| status_patch(api.events(2), answer)).await;
        let status = written(&seen);
        assert_eq!(status["state"], "Active", "{status}");
        assert_eq!(event_reasons(&seen), ["EmergencyAccessActive", "EmergencyAccessActive"]);
        let approved: Timestamp = status["approvedAt"].as_str().expect("stamped").parse().expect("time");
        let expires: Timestamp = status["expiresAt"].as_str().expect("expiry").parse().expect("time");
        assert_eq!(expires.duration_since(approved), SignedDuration::from_hours(1));

        // Judged again from what was written: nothing changes, nothing is sent.
        let mut world = vec![server(), grant(&ago(5), Some("oidc:dr-house"), Some(status))];
        world.extend(admission_policy(&ago(60)));
        let (_, seen) = judge(world, |api| api).await;
        assert!(writes(&seen).is_empty(), "{:?}", writes(&seen));
    }

    #[tokio::test]
    async fn without_the_admission_policy_no_grant_comes_into_force() {
        let world = vec![server(), grant(&ago(5), Some("oidc:dr-house"), None)];
        let (_, seen) =
            judge(world, |api| status_patch(api.events(2), grant(&ago(5), Some("oidc:dr-house"), None))).await;
        let status = written(&seen);
        assert_eq!(status["state"], "Refused");
        assert!(
            status["message"].as_str().unwrap_or_default().contains("mcp-warden-emergency-access: absent"),
            "{status}"
        );
        // A policy younger than the grant did not check who created it.
        let mut world = vec![server(), grant(&ago(5), None, None)];
        world.extend(admission_policy(&ago(1)));
        let (_, seen) = judge(world, |api| status_patch(api.events(2), grant(&ago(5), None, None))).await;
        assert!(written(&seen)["message"].as_str().unwrap_or_default().contains("requester was not checked"));
    }

    #[tokio::test]
    async fn a_replica_that_does_not_lead_judges_nothing() {
        let mut world = World::new(vec![server(), grant(&ago(1), None, None)]);
        world.leading = false;
        let (ctx, api) = world.context();
        let mock = api.run();
        let object: EmergencyAccess = serde_json::from_value(grant(&ago(1), None, None)).expect("grant");
        assert_eq!(reconcile(Arc::new(object), ctx).await.expect("reconcile"), Action::await_change());
        assert!(mock.await.expect("mock").is_empty());
    }
}
