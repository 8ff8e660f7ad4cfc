//! Controller scenarios against a mock API server: create, nothing
//! changed, a dropped tool, an orphan, a hand edit, deletion, a widening
//! NetworkPolicy, a pod without the sidecar, a missing PHIStore, JWKS
//! failures, and API errors.

use std::sync::Arc;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::fixtures::*;
use super::jwks::JwksError;
use super::reconcile::{FINALIZER, error_policy, reconcile};
use crate::api::MCPServer;
use crate::fixtures::{clinic_server, clinic_store};

const UID: &str = "11111111-2222-4333-8444-555555555555";

fn server() -> MCPServer {
    let mut server = clinic_server();
    server.metadata.uid = Some(UID.into());
    server.metadata.generation = Some(1);
    server.metadata.resource_version = Some("1".into());
    server.metadata.finalizers = Some(vec![FINALIZER.into()]);
    server
}

fn as_value(server: &MCPServer) -> Value {
    serde_json::to_value(server).expect("json")
}

fn store_value() -> Value {
    let mut store = serde_json::to_value(clinic_store()).expect("json");
    store["metadata"]["uid"] = json!("store-uid");
    store
}

fn control<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["controls"].as_array().and_then(|c| c.iter().find(|c| c["id"] == id)).expect("control")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == type_)).expect("condition")
}

/// The objects as applied on first creation, and the status written then.
async fn first_creation() -> (Vec<Value>, Value) {
    let (ctx, api) = context(Ok(JWKS.into()));
    first_creation_in(ctx, api).await
}

/// [`first_creation`] with a given context and mock API.
async fn first_creation_in(ctx: Arc<super::context::Context>, api: Verifier) -> (Vec<Value>, Value) {
    let server = server();
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&[], &[])
        .apply_all_owned()
        .list(PODS, vec![])
        .events(4)
        .status_patch(as_value(&server))
        .run();
    let action = reconcile(Arc::new(server), ctx).await.expect("reconcile");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));
    let seen = mock.await.expect("mock api");
    let status = written_status(&seen).expect("status written");
    (applied_objects(&seen), status)
}

/// The state after first creation: what was applied, a fresh mock API, and
/// the server carrying the status written then.
async fn after_creation(
    jwks: Result<String, JwksError>,
) -> (Vec<Value>, Arc<super::context::Context>, Verifier, MCPServer) {
    let (applied, status) = first_creation().await;
    let (ctx, api) = context(jwks);
    let mut server = server();
    server.status = Some(serde_json::from_value(status).expect("status"));
    (applied, ctx, api, server)
}

#[tokio::test]
async fn a_new_server_first_gets_the_finalizer() {
    let (ctx, api) = context(Ok(JWKS.into()));
    let mut fresh = server();
    fresh.metadata.finalizers = None;
    let with_finalizer = as_value(&server());
    let mock = api
        .expect(Method::PATCH, SERVER, move |req| {
            let ops = req.body.as_array().expect("json patch");
            assert!(ops.iter().any(|op| op["op"] == "add" && op["value"] == json!([FINALIZER])), "{ops:?}");
            (http::StatusCode::OK, with_finalizer)
        })
        .run();
    let action = reconcile(Arc::new(fresh), ctx).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    mock.await.expect("mock api");
}

#[tokio::test]
async fn create_applies_every_object_and_writes_status() {
    let (applied, status) = first_creation().await;
    assert_eq!(applied.len(), 7);
    for object in &applied {
        assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], UID, "{}", object["kind"]);
        assert!(object["metadata"]["annotations"]["mcpwarden.io/desired-hash"].is_string());
    }
    let jwks = applied.iter().find(|o| o["metadata"]["name"] == "patient-lookup-jwks").expect("jwks cm");
    let canonical = super::jwks::validate_jwks(JWKS).expect("valid");
    assert_eq!(jwks["data"]["jwks.json"], canonical.as_str());
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["counts"]["phiTools"], 1);
    assert_eq!(status["controls"].as_array().map(Vec::len), Some(9));
    assert_eq!(condition(&status, "Ready")["status"], "False");
    // Just applied: the Deployment controller has not caught up yet.
    assert_eq!(condition(&status, "Ready")["reason"], "Progressing");
    assert_eq!(condition(&status, "Compliant")["status"], "Unknown");
    assert_eq!(condition(&status, "JWKSCurrent")["status"], "True");
    assert_eq!(control(&status, "access-control")["verdict"], "Pass");
    assert_eq!(control(&status, "integrity")["verdict"], "Unknown");
}

#[tokio::test]
async fn a_second_reconcile_with_nothing_changed_writes_nothing() {
    let (applied, ctx, api, server) = after_creation(Ok(JWKS.into())).await;
    // Only reads: the mock fails the test on any other request.
    let mock = api.list(STORES, vec![store_value()]).owned_lists(&applied, &[]).list(PODS, vec![]).run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    assert!(seen.iter().all(|r| r.method == Method::GET));
}

#[tokio::test]
async fn dropping_the_phi_tool_closes_egress_to_its_store() {
    let (applied, ctx, api, mut server) = after_creation(Ok(JWKS.into())).await;
    server.spec.tools.retain(|t| t.name != "lookup_patient");
    server.metadata.generation = Some(2);
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&applied, &[])
        .apply(CONFIG_MAPS, "patient-lookup-policy")
        .apply(NETWORK_POLICIES, "patient-lookup-egress")
        .apply(DEPLOYMENTS, "patient-lookup")
        .list(PODS, vec![])
        .events(1)
        .status_patch(as_value(&server))
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let egress = seen.iter().find(|r| r.path.ends_with("patient-lookup-egress")).expect("egress applied");
    let text = egress.body.to_string();
    assert!(!text.contains("ehr-db"), "egress still reaches the store: {text}");
    assert_eq!(egress.body["spec"]["egress"].as_array().map(Vec::len), Some(2), "DNS and the warden only");
    assert_eq!(event_reasons(&seen), ["Applied"]);
    let status = written_status(&seen).expect("status");
    assert_eq!(status["counts"]["phiTools"], 0);
    assert_eq!(status["observedGeneration"], 2);
}

#[tokio::test]
async fn an_object_the_spec_no_longer_needs_is_deleted() {
    let (applied, ctx, api, mut server) = after_creation(Ok(JWKS.into())).await;
    // Keys now come from a ConfigMap of the user's: the operator's copy goes.
    let oidc = &mut server.spec.authentication.oidc;
    oidc.jwks_uri = None;
    oidc.jwks_config_map_ref = Some(crate::api::KeyRef { name: "idp-keys".into(), key: "jwks.json".into() });
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&applied, &[])
        .apply(DEPLOYMENTS, "patient-lookup")
        .delete(CONFIG_MAPS, "patient-lookup-jwks")
        .list(PODS, vec![])
        .events(2)
        .status_patch(as_value(&server))
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    assert_eq!(event_reasons(&seen), ["Applied", "OrphansDeleted"]);
}

#[tokio::test]
async fn a_hand_edited_deployment_is_restored_with_a_warning() {
    let (mut applied, ctx, api, server) = after_creation(Ok(JWKS.into())).await;
    let deployment = applied.iter_mut().find(|o| o["kind"] == "Deployment").expect("deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = json!("registry.example/other:latest");
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&applied, &[])
        .apply(DEPLOYMENTS, "patient-lookup")
        .list(PODS, vec![])
        .events(1)
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let event = seen.iter().find(|r| r.path == EVENTS).expect("event");
    assert_eq!(event.body["reason"], "DriftCorrected");
    assert_eq!(event.body["type"], "Warning");
    let note = event.body["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("Deployment patient-lookup") && note.contains("spec.template.spec.containers[0].image"),
        "{note}"
    );
    let restored = seen.iter().find(|r| r.path.ends_with("/deployments/patient-lookup")).expect("apply");
    assert_eq!(restored.body["spec"]["template"]["spec"]["containers"][0]["image"], "registry.example/phi-tools:1.4");
}

#[tokio::test]
async fn a_widening_network_policy_fails_compliance_by_name() {
    let (applied, ctx, api, server) = after_creation(Ok(JWKS.into())).await;
    let allow_all = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all", "namespace": NS},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}
    });
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&applied, &[allow_all])
        .list(PODS, vec![])
        .events(1)
        .status_patch(as_value(&server))
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let status = written_status(&seen).expect("status");
    assert_eq!(condition(&status, "Compliant")["status"], "False");
    assert_eq!(condition(&status, "Compliant")["message"], "failing: access-control");
    let message = control(&status, "access-control")["message"].as_str().unwrap_or_default();
    assert!(message.contains("NetworkPolicy clinic/allow-all"), "{message}");
    assert_eq!(event_reasons(&seen), ["CompliantFalse"]);
}

#[tokio::test]
async fn a_pod_without_the_sidecar_fails_audit_controls() {
    let (applied, ctx, api, server) = after_creation(Ok(JWKS.into())).await;
    let bare_pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "patient-lookup-bare", "namespace": NS, "labels": {"mcpwarden.io/server": "patient-lookup"}},
        "spec": {"containers": [{"name": "mcp-server", "image": "registry.example/phi-tools:1.4"}]},
        "status": {"phase": "Running"}
    });
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&applied, &[])
        .list(PODS, vec![bare_pod])
        .events(1)
        .status_patch(as_value(&server))
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    let status = written_status(&seen).expect("status");
    let audit = control(&status, "audit-controls");
    assert_eq!(audit["verdict"], "Fail");
    assert!(audit["message"].as_str().unwrap_or_default().contains("patient-lookup-bare"), "{audit}");
}

#[tokio::test]
async fn a_missing_store_deploys_nothing_and_says_why() {
    let (ctx, api) = context(Ok(JWKS.into()));
    let server = server();
    let mock = api
        .list(STORES, vec![])
        .owned_lists(&[], &[])
        .list(PODS, vec![])
        .events(3)
        .status_patch(as_value(&server))
        .run();
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
async fn a_failed_jwks_fetch_keeps_the_last_good_keys() {
    let (applied, ctx, api, server) = after_creation(Err(JwksError::Fetch("connection failed".into()))).await;
    // The jwks ConfigMap is unchanged (last good keys), so nothing is applied.
    let mock = api
        .list(STORES, vec![store_value()])
        .owned_lists(&applied, &[])
        .list(PODS, vec![])
        .events(1)
        .status_patch(as_value(&server))
        .run();
    reconcile(Arc::new(server), ctx).await.expect("reconcile");
    let seen = mock.await.expect("mock api");
    assert!(applied_objects(&seen).is_empty(), "the last good keys stay in place");
    let status = written_status(&seen).expect("status");
    let jwks = condition(&status, "JWKSCurrent");
    assert_eq!((jwks["status"].as_str(), jwks["reason"].as_str()), (Some("False"), Some("FetchFailed")));
    assert!(jwks["message"].as_str().unwrap_or_default().contains("last good keys are still served"));
}

#[tokio::test]
async fn no_keys_at_all_is_not_ready() {
    let (ctx, api) = context(Err(JwksError::Fetch("timed out".into())));
    let (applied, status) = first_creation_in(ctx, api).await;
    assert_eq!(condition(&status, "Ready")["reason"], "NoSigningKeys");
    assert_eq!(condition(&status, "JWKSCurrent")["reason"], "NoKeys");
    let jwks_cm = applied.into_iter().find(|o| o["metadata"]["name"] == "patient-lookup-jwks").expect("cm");
    assert!(jwks_cm.get("data").is_none(), "no keys are invented");
}

#[tokio::test]
async fn deletion_cleans_up_every_owned_object_then_releases_the_finalizer() {
    let (applied, _) = first_creation().await;
    let (ctx, api) = context(Ok(JWKS.into()));
    let mut server = server();
    server.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let of = |kind: &str| applied.iter().filter(|o| o["kind"] == kind).cloned().collect::<Vec<_>>();
    let mut released = as_value(&server);
    released["metadata"]["finalizers"] = json!([]);
    let mock = api
        .list(SERVICE_ACCOUNTS, of("ServiceAccount"))
        .delete(SERVICE_ACCOUNTS, "patient-lookup-mcpw")
        .list(CONFIG_MAPS, of("ConfigMap"))
        .delete(CONFIG_MAPS, "patient-lookup-policy")
        .delete(CONFIG_MAPS, "patient-lookup-jwks")
        .list(NETWORK_POLICIES, of("NetworkPolicy"))
        .delete(NETWORK_POLICIES, "patient-lookup-ingress")
        .delete(NETWORK_POLICIES, "patient-lookup-egress")
        .list(SERVICES, of("Service"))
        .delete(SERVICES, "patient-lookup")
        .list(DEPLOYMENTS, of("Deployment"))
        .delete(DEPLOYMENTS, "patient-lookup")
        .events(1)
        .expect(Method::PATCH, SERVER, move |req| {
            let ops = req.body.as_array().expect("json patch");
            assert!(ops.iter().any(|op| op["op"] == "remove"), "{ops:?}");
            (http::StatusCode::OK, released)
        })
        .run();
    reconcile(Arc::new(server), ctx).await.expect("cleanup");
    mock.await.expect("mock api");
}

#[tokio::test]
async fn cleanup_works_when_apply_never_ran() {
    let (ctx, api) = context(Ok(JWKS.into()));
    let mut server = server();
    server.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let released = as_value(&server);
    let mock = api
        .list(SERVICE_ACCOUNTS, vec![])
        .list(CONFIG_MAPS, vec![])
        .list(NETWORK_POLICIES, vec![])
        .list(SERVICES, vec![])
        .list(DEPLOYMENTS, vec![])
        .events(1)
        .expect(Method::PATCH, SERVER, move |_| (http::StatusCode::OK, released))
        .run();
    reconcile(Arc::new(server), ctx).await.expect("cleanup");
    mock.await.expect("mock api");
}

#[tokio::test]
async fn an_api_error_is_retried_with_growing_backoff() {
    let (ctx, api) = context(Ok(JWKS.into()));
    let server = Arc::new(server());
    let mock = api.fail(Method::GET, STORES, 500).fail(Method::GET, STORES, 500).run();
    let first = reconcile(Arc::clone(&server), Arc::clone(&ctx)).await.expect_err("api error");
    assert_eq!(first.metric_label(), "finalizer");
    assert_eq!(
        error_policy(Arc::clone(&server), &first, Arc::clone(&ctx)),
        Action::requeue(std::time::Duration::from_secs(5))
    );
    let second = reconcile(Arc::clone(&server), Arc::clone(&ctx)).await.expect_err("api error");
    assert_eq!(
        error_policy(Arc::clone(&server), &second, Arc::clone(&ctx)),
        Action::requeue(std::time::Duration::from_secs(10))
    );
    mock.await.expect("mock api");
    let failures = ctx.metrics.failures.get_or_create(&super::context::ErrorLabels { error: "finalizer".into() }).get();
    assert_eq!(failures, 2);
}

#[test]
fn watch_mappers_find_the_servers_concerned() {
    use super::{server_of_pod, servers_in_namespace, servers_using_store};
    let using = Arc::new(server());
    let mut other_ns = server();
    other_ns.metadata.namespace = Some("billing".into());
    let mut not_using = server();
    not_using.metadata.name = Some("scheduler".into());
    not_using.spec.tools.retain(|t| t.data_access.is_empty());
    let servers = vec![Arc::clone(&using), Arc::new(other_ns), Arc::new(not_using)];
    let refs = servers_using_store(&servers, &clinic_store());
    assert_eq!(
        refs.iter().map(|r| (r.name.as_str(), r.namespace.as_deref())).collect::<Vec<_>>(),
        [("patient-lookup", Some("clinic"))]
    );
    assert_eq!(servers_in_namespace(&servers, Some("clinic")).len(), 2);
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "clinic", "labels": {"mcpwarden.io/server": "patient-lookup"}}
    }))
    .expect("pod");
    let r = server_of_pod(&pod).expect("server");
    assert_eq!((r.name.as_str(), r.namespace.as_deref()), ("patient-lookup", Some("clinic")));
    let unlabelled: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(json!({"metadata": {"name": "q"}})).expect("pod");
    assert!(server_of_pod(&unlabelled).is_none());
}

/// A fresh server's status, with the audit collector answering `health`.
async fn created_with_collector(health: Result<super::collector::Health, String>) -> Value {
    let (ctx, api) = super::fixtures::context_with_collector(Ok(JWKS.into()), health);
    first_creation_in(ctx, api).await.1
}

fn collector_health(incidents: u32) -> super::collector::Health {
    let health =
        crate::audit::collector::store::ServerHealth { streams: 2, open_incidents: incidents, ..Default::default() };
    std::collections::BTreeMap::from([("clinic/patient-lookup".to_string(), health)])
}

#[tokio::test]
async fn the_collectors_health_decides_integrity_with_what_it_observed() {
    let status = created_with_collector(Ok(collector_health(0))).await;
    let integrity = control(&status, "integrity");
    assert_eq!(integrity["verdict"], "Pass", "{integrity}");
    assert!(
        integrity["message"].as_str().unwrap_or_default().contains("2 stream(s) held, 0 incident(s)"),
        "{integrity}"
    );

    let status = created_with_collector(Ok(collector_health(3))).await;
    let integrity = control(&status, "integrity");
    assert_eq!(integrity["verdict"], "Fail");
    assert!(integrity["message"].as_str().unwrap_or_default().contains("3 open integrity incident(s)"), "{integrity}");

    // An unreachable collector is not evidence either way.
    let status = created_with_collector(Err("connection refused".into())).await;
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
