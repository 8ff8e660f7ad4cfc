//! Controller scenarios against a mock API server answering as the real
//! one did (`tests/k8s-recordings/`): creation, the pass that writes status,
//! a steady world, a cache that has not caught up, a dropped tool, an
//! orphan, hand edits, deletion, a widening NetworkPolicy, a pod without the
//! sidecar, a missing PHIStore, JWKS failures, API errors, and a replica
//! that does not lead.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::fixtures::*;
use super::jwks::JwksError;
use super::owned::DESIRED_HASH_ANNOTATION;
use super::reconcile::{error_policy, reconcile};
use crate::api::MCPServer;
use crate::render::names::POLICY_HASH_ANNOTATION;

fn control<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["controls"].as_array().and_then(|c| c.iter().find(|c| c["id"] == id)).expect("control")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == type_)).expect("condition")
}

/// Fields of the compiled policy that the recordings predate or that
/// de-identification changed (a de-identified tool's grants name its
/// scope's views), removed before comparing with them; the render tests
/// check their content.
const POLICY_FIELDS_AFTER_THE_RECORDING: [&str; 1] = ["pseudonymScope"];
const TOOL_FIELDS_AFTER_THE_RECORDING: [&str; 3] = ["output", "dataAccess", "scan"];

fn without_hash(mut object: Value) -> Value {
    if let Some(a) = object.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
        a.remove(DESIRED_HASH_ANNOTATION);
    }
    if let Some(text) = object.pointer("/data/policy.json").and_then(Value::as_str) {
        let mut policy: Value = serde_json::from_str(text).expect("policy JSON");
        for field in POLICY_FIELDS_AFTER_THE_RECORDING {
            policy.as_object_mut().map(|p| p.remove(field));
        }
        for tool in policy["tools"].as_object_mut().into_iter().flat_map(|t| t.values_mut()) {
            for field in TOOL_FIELDS_AFTER_THE_RECORDING {
                tool.as_object_mut().map(|t| t.remove(field));
            }
        }
        object["data"]["policy.json"] = policy;
    }
    // The pod template carries the policy's hash, which those fields change.
    if let Some(a) = object.pointer_mut("/spec/template/metadata/annotations").and_then(Value::as_object_mut) {
        a.remove(POLICY_HASH_ANNOTATION);
    }
    object
}

fn hash_of(object: &Value) -> Value {
    object["metadata"]["annotations"][DESIRED_HASH_ANNOTATION].clone()
}

/// The owned objects as the real server stored them, carrying what this
/// build applies where it differs from the recording: its hashes (the
/// recorder computed its own; see the recordings' README) and, when keys
/// were fetched, the jwks ConfigMap's data, owned by mcp-warden as the
/// server would record it.
async fn stored_by_this_build(jwks: Result<String, JwksError>) -> Vec<Value> {
    let mut world = World::new(vec![]);
    world.jwks = jwks;
    let (ctx, api) = world.context();
    let mock = api.apply_all_owned().events(1).run();
    reconcile(Arc::new(recorded_server()), ctx).await.expect("reconcile");
    let applied = applied_objects(&mock.await.expect("mock api"));
    stored_owned()
        .into_iter()
        .map(|mut stored| {
            let ours = applied
                .iter()
                .find(|a| a["metadata"]["name"] == stored["metadata"]["name"] && a["kind"] == stored["kind"])
                .expect("applied");
            stored["metadata"]["annotations"][DESIRED_HASH_ANNOTATION] = hash_of(ours);
            if let Some(data) = ours.get("data").and_then(Value::as_object) {
                stored["data"] = json!(data);
                let entry = stored["metadata"]["managedFields"]
                    .as_array_mut()
                    .and_then(|m| m.iter_mut().find(|e| e["manager"] == "mcp-warden"))
                    .expect("our entry");
                let keys: serde_json::Map<String, Value> = data.keys().map(|k| (format!("f:{k}"), json!({}))).collect();
                entry["fieldsV1"]["f:data"] = Value::Object(keys);
            }
            stored
        })
        .collect()
}

/// The status the first full pass writes over the stored objects, and the
/// server carrying it.
async fn settled() -> (Vec<Value>, MCPServer) {
    let stored = stored_by_this_build(recorded_jwks()).await;
    let server = recorded_server();
    let (ctx, api) = World::new(stored.clone()).context();
    let mock = api.status_patch(&server).run();
    reconcile(Arc::new(server.clone()), ctx).await.expect("reconcile");
    let status = written_status(&mock.await.expect("mock api")).expect("status written");
    let mut settled = server;
    settled.status = Some(serde_json::from_value(status).expect("status"));
    (stored, settled)
}

#[tokio::test]
async fn a_new_server_first_gets_the_finalizer() {
    let mut fresh = recorded_server();
    fresh.metadata.finalizers = None;
    let (ctx, api) = World::new(vec![]).context();
    let mock = api.finalizer_patch("add", recording("01-apply/jsonpatch-add-finalizer-mcpserver.response.json")).run();
    let action = reconcile(Arc::new(fresh), ctx).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    mock.await.expect("mock api");
}

#[tokio::test]
async fn creation_applies_what_the_real_server_recorded_and_leaves_status_for_the_next_pass() {
    let (ctx, api) = World::new(vec![]).context();
    let mock = api.apply_all_owned().events(1).run();
    let action = reconcile(Arc::new(recorded_server()), ctx).await.expect("reconcile");
    // Status waits until the caches show these objects (their watch events
    // trigger the next pass); the requeue covers a write that sends none.
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    let seen = mock.await.expect("mock api");
    let applied = applied_objects(&seen);
    assert_eq!(applied.len(), 7);
    for ((stem, _, _), body) in OWNED.iter().zip(&applied) {
        // Exactly the bodies recorded against the real server, but for the
        // hash (the recorder computed its own).
        assert_eq!(without_hash(body.clone()), without_hash(recorded_request(stem)), "{stem}");
        assert!(hash_of(body).is_string());
    }
    assert_eq!(event_reasons(&seen), ["Applied"]);
    assert!(written_status(&seen).is_none());
}

#[tokio::test]
async fn the_pass_after_creation_reports_from_the_stored_objects() {
    let (_, settled) = settled().await;
    let status = serde_json::to_value(settled.status.expect("status")).expect("json");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["counts"]["phiTools"], 1);
    assert_eq!(status["controls"].as_array().map(Vec::len), Some(10));
    // The recorded world fetched no keys: every caller would be refused.
    assert_eq!(condition(&status, "Ready")["reason"], "NoSigningKeys");
    assert_eq!(condition(&status, "JWKSCurrent")["reason"], "NoKeys");
    assert_eq!(condition(&status, "Compliant")["status"], "Unknown");
    assert_eq!(control(&status, "access-control")["verdict"], "Pass");
    assert_eq!(control(&status, "integrity")["verdict"], "Unknown");
}

#[tokio::test]
async fn with_keys_served_readiness_follows_the_recorded_deployment() {
    let stored = stored_by_this_build(Ok(JWKS.into())).await;
    let server = recorded_server();
    let mut world = World::new(stored);
    world.jwks = Ok(JWKS.into());
    let (ctx, api) = world.context();
    let mock = api.status_patch(&server).run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let status = written_status(&mock.await.expect("mock api")).expect("status");
    // The recorded Deployment: observed by its controller, 0 of 2 available.
    let ready = condition(&status, "Ready");
    assert_eq!((ready["status"].as_str(), ready["message"].as_str()), (Some("False"), Some("0/2 replicas available")));
    assert_eq!(condition(&status, "JWKSCurrent")["status"], "True");
}

#[tokio::test]
async fn a_settled_world_sends_no_request_at_all() {
    let (stored, settled) = settled().await;
    let (ctx, api) = World::new(stored).context();
    let mock = api.run();
    let action = reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(mock.await.expect("mock api").is_empty(), "no read, no write");
}

#[tokio::test]
async fn a_pass_before_the_caches_show_our_writes_does_not_write_them_again() {
    let server = recorded_server();
    let mut world = World::new(vec![]);
    world.jwks = Ok(JWKS.into());
    let (ctx, api) = world.context();
    // First pass: every object created. Second pass, with the caches still
    // empty (the watch events have not arrived): the answers to its own
    // applies stand in for them, so nothing is applied twice and the
    // status is written from those answers.
    let mock = api.apply_all_owned().events(1).status_patch(&server).run();
    reconcile(Arc::new(server.clone()), Arc::clone(&ctx)).await.expect("first pass");
    assert_eq!(ctx.recent.len(), 7);
    reconcile(Arc::new(server), Arc::clone(&ctx)).await.expect("second pass");
    let seen = mock.await.expect("mock api");
    assert_eq!(applied_objects(&seen).len(), 7, "each object applied once");
    let status = written_status(&seen).expect("status");
    // From the answer to its own apply: the created Deployment, not yet
    // observed by its controller.
    assert_eq!(condition(&status, "Ready")["message"], "the Deployment controller has not observed the latest spec");
}

#[tokio::test]
async fn dropping_the_phi_tool_closes_egress_to_its_store() {
    let (stored, settled) = settled().await;
    let mut server = settled;
    server.spec.tools.retain(|t| t.name != "lookup_patient");
    server.metadata.generation = Some(2);
    let (ctx, api) = World::new(stored).context();
    let mock = api
        .apply(CONFIG_MAPS, "patient-lookup-policy", false)
        .apply(NETWORK_POLICIES, "patient-lookup-egress", false)
        .apply(DEPLOYMENTS, "patient-lookup", false)
        .events(1)
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let egress = seen.iter().find(|r| r.path.ends_with("patient-lookup-egress")).expect("egress applied");
    let text = egress.body.to_string();
    assert!(!text.contains("ehr-db"), "egress still reaches the store: {text}");
    assert_eq!(egress.body["spec"]["egress"].as_array().map(Vec::len), Some(2), "DNS and the warden only");
    assert_eq!(event_reasons(&seen), ["Applied"]);
}

#[tokio::test]
async fn an_object_the_spec_no_longer_needs_is_deleted() {
    let (stored, settled) = settled().await;
    let mut server = settled;
    // Keys now come from a ConfigMap of the user's: the operator's copy goes.
    let oidc = &mut server.spec.authentication.oidc;
    oidc.jwks_uri = None;
    oidc.jwks_config_map_ref = Some(crate::api::KeyRef { name: "idp-keys".into(), key: "jwks.json".into() });
    let (ctx, api) = World::new(stored).context();
    let mock =
        api.apply(DEPLOYMENTS, "patient-lookup", false).delete(CONFIG_MAPS, "patient-lookup-jwks").events(2).run();
    reconcile(Arc::new(server.clone()), Arc::clone(&ctx)).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    assert_eq!(event_reasons(&seen), ["Applied", "OrphansDeleted"]);
    assert_eq!(writes(&seen).iter().filter(|w| w.starts_with("DELETE")).count(), 1);
}

#[tokio::test]
async fn a_kubectl_edit_is_restored_once_with_a_warning_naming_the_field() {
    let (mut stored, settled) = settled().await;
    // The recorded merge patch by kubectl-edit: it took two fields.
    let policy = stored.iter_mut().find(|o| o["metadata"]["name"] == "patient-lookup-policy").expect("policy");
    let mut edited = recording("05-errors/409-setup-merge-patch-by-kubectl-edit.response.json");
    edited["metadata"]["annotations"][DESIRED_HASH_ANNOTATION] = hash_of(policy);
    *policy = edited;
    let (ctx, api) = World::new(stored).context();
    let mock = api
        .expect(Method::PATCH, &format!("{CONFIG_MAPS}/patient-lookup-policy"), |req| {
            assert!(req.query.contains("force=true"), "restored with force, taking the fields back");
            let answer = recording("05-errors/409-conflict-with-update-manager-resolved.response.json");
            (http::StatusCode::OK, answer)
        })
        .events(1)
        .run();
    reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let event = seen.iter().find(|r| r.path == EVENTS).expect("event");
    assert_eq!((event.body["reason"].as_str(), event.body["type"].as_str()), (Some("DriftCorrected"), Some("Warning")));
    let note = event.body["note"].as_str().unwrap_or_default();
    assert!(note.contains("ConfigMap patient-lookup-policy") && note.contains("data.policy.json"), "{note}");
}

#[tokio::test]
async fn replicas_taken_by_another_manager_are_taken_back() {
    let (mut stored, settled) = settled().await;
    let deployment = stored.iter_mut().find(|o| o["kind"] == "Deployment").expect("deployment");
    let mut taken = recording("05-errors/409-setup-ssa-replicas-by-someone-else.response.json");
    taken["metadata"]["annotations"][DESIRED_HASH_ANNOTATION] = hash_of(deployment);
    *deployment = taken;
    let (ctx, api) = World::new(stored).context();
    let mock = api.apply(DEPLOYMENTS, "patient-lookup", false).events(1).run();
    reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let note = seen.iter().find(|r| r.path == EVENTS).and_then(|e| e.body["note"].as_str().map(str::to_string));
    assert!(note.is_some_and(|n| n.contains("spec.replicas")));
    let restored = seen.iter().find(|r| r.path.ends_with("/deployments/patient-lookup")).expect("apply");
    assert_eq!(restored.body["spec"]["replicas"], 2);
}

#[tokio::test]
async fn a_widening_network_policy_fails_compliance_by_name() {
    let (mut stored, settled) = settled().await;
    stored.push(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all", "namespace": NS, "resourceVersion": "9100"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}
    }));
    let (ctx, api) = World::new(stored).context();
    let mock = api.events(1).status_patch(&settled).run();
    reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let status = written_status(&seen).expect("status");
    assert_eq!(condition(&status, "Compliant")["status"], "False");
    assert_eq!(condition(&status, "Compliant")["message"], "failing: access-control");
    let message = control(&status, "access-control")["message"].as_str().unwrap_or_default();
    assert!(message.contains("NetworkPolicy rec-ssa/allow-all"), "{message}");
    assert_eq!(event_reasons(&seen), ["CompliantFalse"]);
}

#[tokio::test]
async fn pods_are_judged_as_the_real_server_shows_them() {
    let (mut stored, settled) = settled().await;
    // The recorded pod the ReplicaSet made: Pending, no node.
    stored.push(recording("03-get/get-pod.json"));
    let mut bare = recording("03-get/get-pod.json");
    bare["metadata"]["name"] = json!("patient-lookup-bare");
    bare["spec"]["initContainers"] = json!([]);
    bare["status"]["phase"] = json!("Running");
    stored.push(bare);
    let (ctx, api) = World::new(stored).context();
    let mock = api.events(1).status_patch(&settled).run();
    reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    let status = written_status(&mock.await.expect("mock api")).expect("status");
    let audit = control(&status, "audit-controls");
    assert_eq!(audit["verdict"], "Fail");
    let message = audit["message"].as_str().unwrap_or_default();
    assert!(message.contains("patient-lookup-bare"), "{message}");
    assert!(!message.contains("patient-lookup-5d975f8958-65rcg"), "the rendered pod carries the sidecar: {message}");
}

#[tokio::test]
async fn pending_pods_are_said_to_be_pending() {
    let (mut stored, settled) = settled().await;
    stored.push(recording("03-get/get-pod.json"));
    let (ctx, api) = World::new(stored).context();
    let mock = api.status_patch(&settled).run();
    reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    let status = written_status(&mock.await.expect("mock api")).expect("status");
    let message = control(&status, "audit-controls")["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("all 1 pod(s) carry the auditing sidecar (1 Pending)"), "{message}");
}

#[tokio::test]
async fn a_missing_store_deploys_nothing_and_says_why() {
    let server = recorded_server();
    let mut world = World::new(vec![]);
    world.cached.clear();
    let (ctx, api) = world.context();
    let mock = api.status_patch(&server).run();
    reconcile(Arc::new(server), ctx).await.expect("bad input is not a reconcile error");
    let seen = mock.await.expect("mock api");
    assert!(applied_objects(&seen).is_empty(), "no partial objects");
    let status = written_status(&seen).expect("status");
    let ready = condition(&status, "Ready");
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("InvalidSpec")));
    assert!(ready["message"].as_str().unwrap_or_default().contains(r#"uses PHIStore "ehr", which does not exist"#));
    assert_eq!(control(&status, "minimum-necessary")["verdict"], "Fail");
}

#[tokio::test]
async fn an_argument_rule_the_sidecar_would_refuse_deploys_nothing_and_says_why() {
    let mut server = recorded_server();
    server.spec.tools[0].argument_rules = vec![crate::api::ArgumentRule {
        rule: "caller.claims.department == 'cardiology'".into(),
        message: "cardiology only".into(),
    }];
    let (ctx, api) = World::new(vec![]).context();
    let mock = api.status_patch(&server).run();
    reconcile(Arc::new(server), ctx).await.expect("bad input is not a reconcile error");
    let seen = mock.await.expect("mock api");
    assert!(applied_objects(&seen).is_empty(), "no pod whose sidecar would refuse its policy");
    let status = written_status(&seen).expect("status");
    let ready = condition(&status, "Ready");
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("InvalidSpec")));
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(message.contains("argumentRules[0] reads caller.claims.department"), "{message}");
    assert!(message.contains("ruleClaims does not name"), "{message}");
}

#[tokio::test]
async fn a_failed_jwks_fetch_keeps_the_last_good_keys() {
    let stored = stored_by_this_build(Ok(JWKS.into())).await;
    let settled = recorded_server();
    let mut world = World::new(stored);
    world.jwks = Err(JwksError::Fetch("connection failed".into()));
    let (ctx, api) = world.context();
    // The jwks ConfigMap is unchanged (last good keys), so nothing is applied.
    let mock = api.status_patch(&settled).run();
    reconcile(Arc::new(settled), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    assert!(applied_objects(&seen).is_empty(), "the last good keys stay in place");
    let status = written_status(&seen).expect("status");
    let jwks = condition(&status, "JWKSCurrent");
    assert_eq!((jwks["status"].as_str(), jwks["reason"].as_str()), (Some("False"), Some("FetchFailed")));
    assert!(jwks["message"].as_str().unwrap_or_default().contains("last good keys are still served"));
}

#[tokio::test]
async fn no_keys_at_all_invents_none() {
    let (ctx, api) = World::new(vec![]).context();
    let mock = api.apply_all_owned().events(1).run();
    reconcile(Arc::new(recorded_server()), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let jwks_cm = applied_objects(&seen).into_iter().find(|o| o["metadata"]["name"] == "patient-lookup-jwks");
    assert!(jwks_cm.expect("cm").get("data").is_none(), "no keys are invented");
}

#[tokio::test]
async fn fetched_keys_are_served_to_the_sidecar() {
    let mut world = World::new(vec![]);
    world.jwks = Ok(JWKS.into());
    let (ctx, api) = world.context();
    let mock = api.apply_all_owned().events(1).run();
    reconcile(Arc::new(recorded_server()), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let jwks_cm = applied_objects(&seen).into_iter().find(|o| o["metadata"]["name"] == "patient-lookup-jwks");
    let canonical = super::jwks::validate_jwks(JWKS).expect("valid");
    assert_eq!(jwks_cm.expect("cm")["data"]["jwks.json"], canonical.as_str());
}

#[tokio::test]
async fn deletion_cleans_up_every_owned_object_then_releases_the_finalizer() {
    let (stored, settled) = settled().await;
    let mut server = settled;
    server.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let mut released = serde_json::to_value(&server).expect("json");
    released["metadata"]["finalizers"] = json!([]);
    let (ctx, api) = World::new(stored).context();
    let mock = api
        // The workload first, its isolation last.
        .delete(DEPLOYMENTS, "patient-lookup")
        .delete(SERVICES, "patient-lookup")
        .delete(CONFIG_MAPS, "patient-lookup-jwks")
        .delete(CONFIG_MAPS, "patient-lookup-policy")
        .delete(SERVICE_ACCOUNTS, "patient-lookup-mcpw")
        .delete(NETWORK_POLICIES, "patient-lookup-egress")
        .delete(NETWORK_POLICIES, "patient-lookup-ingress")
        .events(1)
        .finalizer_patch("remove", released)
        .run();
    reconcile(Arc::new(server), ctx).await.expect("cleanup");
    mock.await.expect("mock api");
}

#[tokio::test]
async fn cleanup_works_when_apply_never_ran() {
    let mut server = recorded_server();
    server.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let released = serde_json::to_value(&server).expect("json");
    let (ctx, api) = World::new(vec![]).context();
    let mock = api.events(1).finalizer_patch("remove", released).run();
    reconcile(Arc::new(server), ctx).await.expect("cleanup");
    mock.await.expect("mock api");
}

#[tokio::test]
async fn an_api_error_is_retried_with_growing_backoff() {
    let (ctx, api) = World::new(vec![]).context();
    let server = Arc::new(recorded_server());
    let sa = format!("{SERVICE_ACCOUNTS}/patient-lookup-mcpw");
    let mock = api.fail(Method::PATCH, &sa, 500).fail(Method::PATCH, &sa, 500).run();
    let first = reconcile(Arc::clone(&server), Arc::clone(&ctx)).await.expect_err("api error");
    assert_eq!(first.metric_label(), "finalizer");
    assert_eq!(error_policy(Arc::clone(&server), &first, Arc::clone(&ctx)), Action::requeue(Duration::from_secs(5)));
    let second = reconcile(Arc::clone(&server), Arc::clone(&ctx)).await.expect_err("api error");
    assert_eq!(error_policy(Arc::clone(&server), &second, Arc::clone(&ctx)), Action::requeue(Duration::from_secs(10)));
    mock.await.expect("mock api");
    let failures = ctx.metrics.failures.get_or_create(&super::context::ErrorLabels { error: "finalizer".into() }).get();
    assert_eq!(failures, 2);
}

#[tokio::test]
async fn a_replica_that_does_not_lead_sends_nothing() {
    let mut world = World::new(vec![]);
    world.leading = false;
    let (ctx, api) = world.context();
    let mock = api.run();
    let action = reconcile(Arc::new(recorded_server()), ctx).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert!(mock.await.expect("mock api").is_empty());
}

fn collector_health(incidents: u32) -> super::collector::Health {
    let health =
        crate::audit::collector::store::ServerHealth { streams: 2, open_incidents: incidents, ..Default::default() };
    std::collections::BTreeMap::from([(format!("{NS}/patient-lookup"), health)])
}

/// The status written over the stored objects with the collector answering.
async fn status_with_collector(health: Result<super::collector::Health, String>) -> Value {
    let stored = stored_by_this_build(recorded_jwks()).await;
    let server = recorded_server();
    let mut world = World::new(stored);
    world.collector = Some(health);
    let (ctx, api) = world.context();
    let mock = api.status_patch(&server).run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    written_status(&mock.await.expect("mock api")).expect("status")
}

#[tokio::test]
async fn the_collectors_health_decides_integrity_with_what_it_observed() {
    let status = status_with_collector(Ok(collector_health(0))).await;
    let integrity = control(&status, "integrity");
    assert_eq!(integrity["verdict"], "Pass", "{integrity}");
    assert!(
        integrity["message"].as_str().unwrap_or_default().contains("2 stream(s) held, 0 incident(s)"),
        "{integrity}"
    );

    let status = status_with_collector(Ok(collector_health(3))).await;
    let integrity = control(&status, "integrity");
    assert_eq!(integrity["verdict"], "Fail");
    assert!(integrity["message"].as_str().unwrap_or_default().contains("3 open integrity incident(s)"), "{integrity}");

    // An unreachable collector is not evidence either way.
    let status = status_with_collector(Err("connection refused".into())).await;
    assert_eq!(control(&status, "integrity")["verdict"], "Unknown");
}

#[test]
fn terminating_pods_still_write_their_trail_finished_ones_do_not() {
    let pod = |name: &str, phase: &str, deleting: bool| -> k8s_openapi::api::core::v1::Pod {
        let mut value = json!({"metadata": {"name": name}, "status": {"phase": phase}});
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-11-22T00:00:00Z");
        }
        serde_json::from_value(value).expect("pod")
    };
    let (present, running) = super::reconcile::present_and_running(vec![
        pod("serving", "Running", false),
        pod("draining", "Running", true),
        pod("starting", "Pending", false),
        pod("crashed", "Failed", false),
        pod("done", "Succeeded", false),
    ]);
    assert_eq!(present, ["serving", "draining", "starting"]);
    let running: Vec<String> = running.iter().map(kube::ResourceExt::name_any).collect();
    assert_eq!(running, ["serving", "starting"]);
}
