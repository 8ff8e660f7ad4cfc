//! Reconciling one MCPServer.
//!
//! ```text
//!   reconcile ─ leading? ─ caches synced ─ newest server ─ finalizer ─┬─ Apply:   caches → JWKS → render
//!                                                                     │           → create / update / restore / skip each object → delete orphans
//!                                                                     │           → wrote anything? requeue: status waits for the caches to show it
//!                                                                     │           → pods → evaluate → status (only if changed) → events
//!                                                                     └─ Cleanup: delete every owned object (idempotent; fine if Apply never ran)
//! ```
//!
//! Nothing is read from the API server here: the objects come from the
//! watch caches (`caches`), overlaid with the answers to this process's own
//! recent writes (`recent`), so an unchanged world costs no request at all.
//! Writes, in order, so the controller tests can follow them: the
//! finalizer; server-side apply of each object that needs it; deletion of
//! orphans; events; the status.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, instrument, warn};

use super::caches::as_cached;
use super::context::{Context, ErrorLabels};
use super::jwks::validate_jwks;
use super::owned::{self, Plan};
use super::recent::{Key, version_of};
use super::status::{self, ConditionValue, JwksState};
use crate::api::{API_VERSION, MCPServer};
use crate::compliance::{self, Observations, Source};
use crate::render::names::MANAGER;
use crate::render::{self, OwnedNames};

/// How soon a reconcile that wrote objects looks again, in case no watch
/// event follows (a write the server found to be a no-op sends none).
const AFTER_WRITES: std::time::Duration = std::time::Duration::from_secs(2);

/// Finalizer guarding cleanup of owned objects.
pub const FINALIZER: &str = "mcpwarden.io/cleanup";

/// Why a reconciliation failed; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// MCPServers are namespaced; one without a namespace is malformed.
    #[error("the MCPServer has no namespace")]
    NoNamespace,
    /// An object could not be encoded or decoded.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    /// An object from the API did not have the expected shape.
    #[error("unexpected object: {0}")]
    Parse(#[from] kube::core::dynamic::ParseDynamicObjectError),
}

impl Error {
    /// Stable error class for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace => "no_namespace",
            Error::Serialization(_) => "serialization",
            Error::Parse(_) => "parse",
        }
    }
}

fn key(server: &MCPServer) -> String {
    format!("{}/{}", server.namespace().unwrap_or_default(), server.name_any())
}

/// Reconciles one MCPServer (the controller's entry point). A replica that
/// does not lead does nothing: the leader reconciles every server when its
/// term starts.
#[instrument(skip_all, fields(namespace = server.namespace().unwrap_or_default(), name = server.name_any()))]
pub async fn reconcile(server: Arc<MCPServer>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    // Planning from half-filled caches would re-create what exists.
    ctx.caches.sync.wait().await;
    let namespace = server.namespace().ok_or(Error::NoNamespace)?;
    ctx.metrics.reconciles.inc();
    let started = std::time::Instant::now();
    let server = newest(&ctx, server, &namespace);
    let api: Api<MCPServer> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = key(&server);
    let result = finalizer(&api, FINALIZER, server, |event| async {
        match event {
            Finalizer::Apply(server) => apply(&server, &ctx).await,
            Finalizer::Cleanup(server) => cleanup(&server, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

fn object_key(kind: &str, namespace: &str, name: &str) -> Key {
    (kind.to_string(), namespace.to_string(), name.to_string())
}

/// The server as the cache holds it, unless this process's last status
/// write answered with a newer version.
fn newest(ctx: &Context, server: Arc<MCPServer>, namespace: &str) -> Arc<MCPServer> {
    let key = object_key("MCPServer", namespace, &server.name_any());
    let Ok(cached) = serde_json::to_value(&*server) else { return server };
    match ctx.recent.resolve(&key, Some(cached.clone())) {
        Some(newer) if newer != cached => serde_json::from_value(newer).map(Arc::new).unwrap_or(server),
        _ => server,
    }
}

/// Logs and counts a failure, then retries with exponential backoff.
pub fn error_policy(server: Arc<MCPServer>, error: &Error, ctx: Arc<Context>) -> Action {
    let wait = ctx.backoff(&key(&server));
    warn!(error = %error, retry_in = ?wait, "reconcile failed");
    ctx.metrics.failures.get_or_create(&ErrorLabels { error: error.metric_label().into() }).inc();
    Action::requeue(wait)
}

/// The objects the server owns as this process knows them: the caches,
/// overlaid with the answers to its own recent writes.
struct Existing<'a> {
    ctx: &'a Context,
    namespace: String,
    cached: BTreeMap<(String, String), Value>,
}

impl<'a> Existing<'a> {
    fn of(ctx: &'a Context, namespace: &str, server: &str) -> Self {
        Existing { ctx, namespace: namespace.to_string(), cached: ctx.caches.managed_of(namespace, server) }
    }

    fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let cached = self.cached.get(&(kind.to_string(), name.to_string())).cloned();
        self.ctx.recent.resolve(&object_key(kind, &self.namespace, name), cached)
    }

    /// Every owned object known, resolved.
    fn all(&self) -> Vec<((String, String), Value)> {
        self.cached
            .keys()
            .filter_map(|(kind, name)| Some(((kind.clone(), name.clone()), self.get(kind, name)?)))
            .collect()
    }
}

/// What applying the objects did, for events.
#[derive(Default)]
struct Changes {
    created: Vec<String>,
    updated: Vec<String>,
    drifted: Vec<(String, String)>,
    deleted: Vec<String>,
}

impl Changes {
    fn wrote(&self) -> bool {
        !(self.created.is_empty() && self.updated.is_empty() && self.drifted.is_empty() && self.deleted.is_empty())
    }
}

async fn apply(server: &MCPServer, ctx: &Context) -> Result<Action, Error> {
    let namespace = server.namespace().ok_or(Error::NoNamespace)?;
    let name = server.name_any();
    let names = OwnedNames::for_server(&name);

    let stores = ctx.caches.stores_in(&namespace);
    let existing = Existing::of(ctx, &namespace, &name);

    let jwks_uri = server.spec.authentication.oidc.jwks_uri.clone();
    let (jwks, jwks_state) = match &jwks_uri {
        Some(uri) => {
            let last_good = existing
                .get("ConfigMap", &names.jwks_config_map)
                .and_then(|cm| cm.pointer("/data/jwks.json").and_then(Value::as_str).map(str::to_string));
            let (doc, state) = current_jwks(ctx, uri, last_good).await;
            (doc, Some(state))
        }
        None => (None, None),
    };

    let rendered = render::render(server, &stores, &ctx.settings, jwks.as_deref());
    let mut changes = Changes::default();
    if let Ok(objects) = &rendered {
        sync_objects(ctx, server, &namespace, objects, &existing, &mut changes).await?;
    }
    publish_changes(ctx, server, &changes).await;
    if changes.wrote() {
        // Status describes what the caches show; they show these writes
        // only once their watch events arrive, which trigger the next pass.
        return Ok(Action::requeue(AFTER_WRITES));
    }
    let deployment =
        existing.get("Deployment", &names.workload).map(serde_json::from_value::<Deployment>).transpose()?;

    let (present_names, pods) = present_and_running(ctx.caches.pods_of(&namespace, &name));
    let collector = match &ctx.collector {
        Some(source) => match source.health().await {
            Ok(health) => {
                let running: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
                let key = format!("{namespace}/{name}");
                match source.report_pods(&key, &present_names).await {
                    Ok(abandoned) if !abandoned.is_empty() => {
                        tracing::warn!(streams = abandoned.len(), server = %key, "audit streams of deleted pods ended without their final record; the collector recorded incidents");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not report present pods to the audit collector"),
                }
                super::collector::collector_view(health.get(&key), &running, chrono::Utc::now())
            }
            Err(e) => {
                tracing::warn!(error = %e, "the audit collector's health could not be read");
                None
            }
        },
        None => None,
    };
    let observed = Observations {
        source: Source::Cluster,
        network_policies: Some(ctx.caches.network_policies_selecting(&namespace, &name)),
        pods: Some(pods),
        collector,
        emergency: Some(emergency_view(ctx, server, &namespace, &name)),
        pod_admission: Some(ctx.caches.pod_admission(&ctx.server_pod_policy, &namespace)),
    };
    let report = compliance::evaluate(&compliance::Input {
        server,
        stores: &stores,
        rendered: rendered.as_ref(),
        settings: &ctx.settings,
        observed: &observed,
    });

    let render_error = rendered.as_ref().err().map(ToString::to_string);
    let mut ready = status::ready_condition(render_error.as_deref(), deployment.as_ref(), server.spec.replicas);
    let mut conditions = Vec::new();
    if let (Some(uri), Some(state)) = (&jwks_uri, &jwks_state) {
        if let JwksState::Missing(_) = state
            && render_error.is_none()
        {
            ready = ConditionValue {
                status: "False",
                reason: "NoSigningKeys",
                message: "the issuer's keys could not be fetched: the sidecar refuses every caller".into(),
                ..ready
            };
        }
        conditions.push(status::jwks_condition(uri, state));
    }
    conditions.insert(0, status::compliant_condition(&report));
    conditions.insert(0, ready);
    let next = status::desired_status(
        server.metadata.generation,
        conditions,
        report.controls,
        server.spec.counts(),
        server.status.as_ref(),
        &Time(k8s_openapi::jiff::Timestamp::now()),
    );

    if server.status.as_ref() != Some(&next) {
        for (type_, old, new) in status::transitions(server.status.as_ref(), &next) {
            let message =
                next.conditions.iter().find(|c| c.type_ == type_).map(|c| c.message.clone()).unwrap_or_default();
            let type_event = if new == "True" { EventType::Normal } else { EventType::Warning };
            publish(ctx, server, type_event, &format!("{type_}{new}"), format!("{type_} {old} -> {new}: {message}"))
                .await;
        }
        record_verdicts(ctx, &namespace, &name, server.status.as_ref(), &next).await;
        let api: Api<MCPServer> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": API_VERSION, "kind": "MCPServer", "status": next});
        let written = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.recent.written(
            object_key("MCPServer", &namespace, &name),
            as_cached("MCPServer", serde_json::to_value(&written)?),
        );
    }
    Ok(Action::requeue(ctx.resync))
}

/// Writes the controls whose verdict changed to the server's stream of the
/// operator's trail, before the status that carries them. A record that
/// cannot be written is counted and logged; the status is written anyway
/// (the cluster's view must not stall on the trail).
async fn record_verdicts(
    ctx: &Context,
    namespace: &str,
    name: &str,
    previous: Option<&crate::api::MCPServerStatus>,
    next: &crate::api::MCPServerStatus,
) {
    let Some(trail) = &ctx.verdicts else { return };
    let server = crate::policy::ServerRef { namespace: namespace.to_string(), name: name.to_string() };
    for event in super::verdicts::changes(previous.map(|s| s.controls.as_slice()), &next.controls) {
        if let Err(e) = trail.record(Some(&server), event).await {
            ctx.metrics.verdict_records_failed.inc();
            tracing::warn!(error = %e, "a verdict change could not be recorded in the operator's trail");
        }
    }
}

/// The server's grants as the grant controller judges them, now.
fn emergency_view(ctx: &Context, server: &MCPServer, namespace: &str, name: &str) -> compliance::EmergencyView {
    let admission = ctx.caches.emergency_admission(&ctx.emergency_policy);
    let now = crate::breakglass::now();
    let grants = ctx
        .caches
        .grants_of(namespace, name)
        .iter()
        .map(|g| compliance::GrantView {
            name: g.name_any(),
            beneficiary: g.spec.beneficiary.clone(),
            tools: g.spec.tools.clone(),
            approver: g.spec.approval.as_ref().map(|a| a.approver.clone()),
            judgement: crate::breakglass::judge_grant(g, Some(server), &admission, now),
        })
        .collect();
    compliance::EmergencyView { admission, grants }
}

/// The JWKS document to serve, and whether it is current.
async fn current_jwks(ctx: &Context, uri: &str, last_good: Option<String>) -> (Option<String>, JwksState) {
    let fetched = match ctx.jwks.fetch(uri).await {
        Ok(text) => validate_jwks(&text),
        Err(e) => Err(e),
    };
    match (fetched, last_good) {
        (Ok(doc), _) => (Some(doc), JwksState::Current),
        (Err(e), Some(last)) => {
            ctx.metrics.jwks_fetch_failures.inc();
            warn!(error = %e, "JWKS fetch failed; serving the last good keys");
            (Some(last), JwksState::Stale(e.to_string()))
        }
        (Err(e), None) => {
            ctx.metrics.jwks_fetch_failures.inc();
            warn!(error = %e, "JWKS fetch failed and there are no earlier keys");
            (None, JwksState::Missing(e.to_string()))
        }
    }
}

/// Applies what needs applying and deletes what the spec no longer needs.
async fn sync_objects(
    ctx: &Context,
    server: &MCPServer,
    namespace: &str,
    objects: &render::OwnedObjects,
    existing: &Existing<'_>,
    changes: &mut Changes,
) -> Result<(), Error> {
    let kinds = owned::owned_kinds();
    let mut wanted = Vec::new();
    for desired in objects.to_values() {
        let desired = owned::with_desired_hash(desired);
        let (kind, name) = owned::key_of(&desired);
        wanted.push((kind.clone(), name.clone()));
        let live = existing.get(&kind, &name);
        let plan = owned::plan_object(&desired, live.as_ref());
        let label = format!("{kind} {name}");
        match &plan {
            Plan::Unchanged => continue,
            Plan::Create => changes.created.push(label),
            Plan::Update => changes.updated.push(label),
            Plan::Drift(path) => changes.drifted.push((label, path.clone())),
        }
        let Some(resource) = kinds.iter().find(|r| r.kind == kind) else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, resource);
        let applied = api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired)).await?;
        ctx.recent.written(object_key(&kind, namespace, &name), as_cached(&kind, serde_json::to_value(&applied)?));
        ctx.metrics.applied.inc();
        if matches!(plan, Plan::Drift(_)) {
            ctx.metrics.drift_corrected.inc();
        }
    }
    let uid = server.uid().unwrap_or_default();
    for ((kind, name), object) in existing.all() {
        if wanted.contains(&(kind.clone(), name.clone())) || !owned::is_owned_by(&object, &uid) {
            continue;
        }
        let Some(resource) = kinds.iter().find(|r| r.kind == kind) else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, resource);
        delete_ignoring_absent(&api, &name).await?;
        ctx.recent.deleted(object_key(&kind, namespace, &name), version_of(&object));
        ctx.metrics.orphans_deleted.inc();
        changes.deleted.push(format!("{kind} {name}"));
    }
    Ok(())
}

async fn delete_ignoring_absent(api: &Api<DynamicObject>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn publish_changes(ctx: &Context, server: &MCPServer, changes: &Changes) {
    let mut applied: Vec<String> = changes.created.iter().map(|c| format!("created {c}")).collect();
    applied.extend(changes.updated.iter().map(|u| format!("updated {u}")));
    if !applied.is_empty() {
        info!(changes = %applied.join(", "), "applied owned objects");
        publish(ctx, server, EventType::Normal, "Applied", applied.join(", ")).await;
    }
    for (object, path) in &changes.drifted {
        warn!(object = %object, field = %path, "restored an owned object edited outside mcp-warden");
        publish(
            ctx,
            server,
            EventType::Warning,
            "DriftCorrected",
            format!("{object} was changed outside mcp-warden (at {path}) and was restored"),
        )
        .await;
    }
    if !changes.deleted.is_empty() {
        publish(ctx, server, EventType::Normal, "OrphansDeleted", format!("deleted {}", changes.deleted.join(", ")))
            .await;
    }
}

/// Publishes an event; a failure to publish is logged, not fatal.
async fn publish(ctx: &Context, server: &MCPServer, type_: EventType, reason: &str, note: String) {
    let event =
        KubeEvent { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &server.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an event");
    }
}

/// Deletes every object the server owns. Idempotent; absent objects are
/// fine, and so is a server whose apply never ran. (Kubernetes' garbage
/// collector would delete them too, by their owner reference; deleting them
/// here ends the server's workload before the MCPServer is gone.)
async fn cleanup(server: &MCPServer, ctx: &Context) -> Result<Action, Error> {
    let namespace = server.namespace().ok_or(Error::NoNamespace)?;
    let name = server.name_any();
    let uid = server.uid().unwrap_or_default();
    let kinds = owned::owned_kinds();
    let existing = Existing::of(ctx, &namespace, &name);
    let mut deleted = Vec::new();
    let mut owned_objects = existing.all();
    // The workload first, its NetworkPolicies last: pods never run a moment
    // without their isolation.
    owned_objects.sort_by_key(|((kind, name), _)| (owned::deletion_rank(kind), name.clone()));
    for ((kind, object_name), object) in owned_objects {
        if !owned::is_owned_by(&object, &uid) {
            continue;
        }
        let Some(resource) = kinds.iter().find(|r| r.kind == kind) else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, resource);
        delete_ignoring_absent(&api, &object_name).await?;
        ctx.recent.deleted(object_key(&kind, &namespace, &object_name), version_of(&object));
        deleted.push(format!("{kind} {object_name}"));
    }
    info!(deleted = deleted.len(), "cleaned up owned objects");
    publish(ctx, server, EventType::Normal, "CleanedUp", format!("deleted {} owned object(s)", deleted.len())).await;
    Ok(Action::await_change())
}

/// Of a server's pods: the names of those whose sidecar may still write to
/// the audit collector (terminating ones drain and seal their stream), and
/// those serving (not terminating, not finished).
pub(crate) fn present_and_running(pods: Vec<Pod>) -> (Vec<String>, Vec<Pod>) {
    let present: Vec<Pod> = pods
        .into_iter()
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .collect();
    let names = present.iter().map(|p| p.name_any()).collect();
    let running = present.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    (names, running)
}
