//! Reconciling one MCPServer.
//!
//! ```text
//!   reconcile ─ finalizer ─┬─ Apply:   stores → owned objects (listed) → JWKS → render
//!                          │           → create / update / restore / skip each object → delete orphans
//!                          │           → pods → evaluate → status (only if changed) → events
//!                          └─ Cleanup: delete every owned object (idempotent; fine if Apply never ran)
//! ```
//!
//! Requests, in order, so the controller tests can follow them: list
//! PHIStores; list owned ServiceAccounts, ConfigMaps, NetworkPolicies (all
//! of the namespace), Services, Deployments; server-side apply of each object
//! that needs it; delete orphans; list pods; events; status patch.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, instrument, warn};

use super::context::{Context, ErrorLabels};
use super::jwks::validate_jwks;
use super::owned::{self, Plan};
use super::status::{self, ConditionValue, JwksState};
use crate::api::{API_VERSION, MCPServer, PHIStore};
use crate::compliance::{self, Observations, Source};
use crate::render::names::{MANAGER, SERVER_LABEL};
use crate::render::{self, OwnedNames};

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

/// Reconciles one MCPServer (the controller's entry point).
#[instrument(skip_all, fields(namespace = server.namespace().unwrap_or_default(), name = server.name_any()))]
pub async fn reconcile(server: Arc<MCPServer>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = server.namespace().ok_or(Error::NoNamespace)?;
    ctx.metrics.reconciles.inc();
    let started = std::time::Instant::now();
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

/// Logs and counts a failure, then retries with exponential backoff.
pub fn error_policy(server: Arc<MCPServer>, error: &Error, ctx: Arc<Context>) -> Action {
    let wait = ctx.backoff(&key(&server));
    warn!(error = %error, retry_in = ?wait, "reconcile failed");
    ctx.metrics.failures.get_or_create(&ErrorLabels { error: error.metric_label().into() }).inc();
    Action::requeue(wait)
}

/// The owned objects the cluster holds, as listed at the start of a
/// reconcile, plus every NetworkPolicy of the namespace.
struct Existing {
    owned: BTreeMap<(String, String), DynamicObject>,
    network_policies: Vec<NetworkPolicy>,
}

impl Existing {
    async fn list(ctx: &Context, namespace: &str, server: &str) -> Result<Self, Error> {
        let selector = format!("{SERVER_LABEL}={server},app.kubernetes.io/managed-by={MANAGER}");
        let mut owned = BTreeMap::new();
        let mut network_policies = Vec::new();
        for resource in owned::owned_kinds() {
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, &resource);
            let is_network_policy = resource.kind == "NetworkPolicy";
            // NetworkPolicies are listed whole: other policies selecting the
            // server's pods are part of its access-control verdict.
            let params =
                if is_network_policy { ListParams::default() } else { ListParams::default().labels(&selector) };
            for object in api.list(&params).await? {
                if is_network_policy {
                    network_policies.push(object.clone().try_parse::<NetworkPolicy>()?);
                    let labels = object.labels();
                    if labels.get(SERVER_LABEL).map(String::as_str) != Some(server)
                        || labels.get("app.kubernetes.io/managed-by").map(String::as_str) != Some(MANAGER)
                    {
                        continue;
                    }
                }
                owned.insert((resource.kind.clone(), object.name_any()), object);
            }
        }
        Ok(Existing { owned, network_policies })
    }

    fn get(&self, kind: &str, name: &str) -> Option<&DynamicObject> {
        self.owned.get(&(kind.to_string(), name.to_string()))
    }
}

/// What applying the objects did, for events.
#[derive(Default)]
struct Changes {
    created: Vec<String>,
    updated: Vec<String>,
    drifted: Vec<(String, String)>,
    deleted: Vec<String>,
    deployment: Option<Deployment>,
}

async fn apply(server: &MCPServer, ctx: &Context) -> Result<Action, Error> {
    let namespace = server.namespace().ok_or(Error::NoNamespace)?;
    let name = server.name_any();
    let names = OwnedNames::for_server(&name);
    let client = &ctx.client;

    let stores: BTreeMap<String, PHIStore> = Api::<PHIStore>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let existing = Existing::list(ctx, &namespace, &name).await?;

    let jwks_uri = server.spec.authentication.oidc.jwks_uri.clone();
    let (jwks, jwks_state) = match &jwks_uri {
        Some(uri) => {
            let last_good = existing
                .get("ConfigMap", &names.jwks_config_map)
                .and_then(|cm| cm.data.pointer("/data/jwks.json"))
                .and_then(Value::as_str)
                .map(str::to_string);
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
    let deployment = match changes.deployment.take() {
        Some(d) => Some(d),
        None => {
            existing.get("Deployment", &names.workload).cloned().map(|d| d.try_parse::<Deployment>()).transpose()?
        }
    };

    let listed = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels(&format!("{SERVER_LABEL}={name}")))
        .await?
        .items;
    let (present_names, pods) = present_and_running(listed);
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
        network_policies: Some(existing.network_policies.clone()),
        pods: Some(pods),
        collector,
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

    publish_changes(ctx, server, &changes).await;
    for (type_, old, new) in status::transitions(server.status.as_ref(), &next) {
        let message = next.conditions.iter().find(|c| c.type_ == type_).map(|c| c.message.clone()).unwrap_or_default();
        let type_event = if new == "True" { EventType::Normal } else { EventType::Warning };
        publish(ctx, server, type_event, &format!("{type_}{new}"), format!("{type_} {old} -> {new}: {message}")).await;
    }
    if server.status.as_ref() != Some(&next) {
        let api: Api<MCPServer> = Api::namespaced(client.clone(), &namespace);
        let patch = json!({"apiVersion": API_VERSION, "kind": "MCPServer", "status": next});
        api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    Ok(Action::requeue(ctx.resync))
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
    existing: &Existing,
    changes: &mut Changes,
) -> Result<(), Error> {
    let kinds = owned::owned_kinds();
    let mut wanted = Vec::new();
    for desired in objects.to_values() {
        let desired = owned::with_desired_hash(desired);
        let (kind, name) = owned::key_of(&desired);
        wanted.push((kind.clone(), name.clone()));
        let current = existing.get(&kind, &name).map(serde_json::to_value).transpose()?;
        let plan = owned::plan_object(&desired, current.as_ref());
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
        ctx.metrics.applied.inc();
        if matches!(plan, Plan::Drift(_)) {
            ctx.metrics.drift_corrected.inc();
        }
        if kind == "Deployment" {
            changes.deployment = Some(applied.try_parse::<Deployment>()?);
        }
    }
    let uid = server.uid().unwrap_or_default();
    for ((kind, name), object) in &existing.owned {
        if wanted.contains(&(kind.clone(), name.clone())) || !owned::is_owned_by(object, &uid) {
            continue;
        }
        let Some(resource) = kinds.iter().find(|r| &r.kind == kind) else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, resource);
        delete_ignoring_absent(&api, name).await?;
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
/// fine, and so is a server whose apply never ran.
async fn cleanup(server: &MCPServer, ctx: &Context) -> Result<Action, Error> {
    let namespace = server.namespace().ok_or(Error::NoNamespace)?;
    let name = server.name_any();
    let uid = server.uid().unwrap_or_default();
    let selector = format!("{SERVER_LABEL}={name},app.kubernetes.io/managed-by={MANAGER}");
    let mut deleted = Vec::new();
    for resource in owned::owned_kinds() {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
        for object in api.list(&ListParams::default().labels(&selector)).await? {
            if owned::is_owned_by(&object, &uid) {
                delete_ignoring_absent(&api, &object.name_any()).await?;
                deleted.push(format!("{} {}", resource.kind, object.name_any()));
            }
        }
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
