//! `mcp-warden operator`: reconciles MCPServers into isolated workloads and
//! reports compliance from what it observes.
//!
//! ```text
//!   watch MCPServer ─────────────┐
//!   watch owned kinds (by owner) ├─▶ Controller ─▶ reconcile (render, apply, evaluate, status)
//!   watch PHIStore  → servers using it (same namespace)
//!   watch NetworkPolicy → servers of its namespace
//!   watch Pod (label) → its server
//!   :8080  /healthz /readyz /metrics
//! ```

pub mod collector;
pub mod context;
pub mod jwks;
pub mod owned;
pub mod reconcile;
pub mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::api::{MCPServer, PHIStore};
use crate::health::{self, Health};
use crate::render::Settings;
use crate::render::names::{MANAGER, SERVER_LABEL};
use context::Context;
use jwks::HttpsJwksSource;

/// Flags of `mcp-warden operator` (each also read from the environment).
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Image of the sidecar injected into every MCP server pod.
    #[arg(long, env = "MCPW_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,
    /// Namespace of the warden's control plane (broker, audit collector).
    #[arg(long, env = "MCPW_WARDEN_NAMESPACE", default_value = "mcp-warden")]
    pub warden_namespace: String,
    /// Labels of the control-plane pods the sidecars may reach, as
    /// `key=value,key=value`.
    #[arg(long, env = "MCPW_CONTROL_PLANE_LABELS", default_value = "app.kubernetes.io/part-of=mcp-warden")]
    pub control_plane_labels: String,
    /// The audit collector (e.g. `https://mcpw-collector.mcp-warden.svc:8443`),
    /// whose per-server health decides audit-controls and integrity.
    #[arg(long, env = "MCPW_COLLECTOR_URL", requires = "collector_token_file")]
    pub collector_url: Option<String>,
    /// The operator's projected service-account token for the audience
    /// `mcp-warden-collector` (re-read on every fetch).
    #[arg(long, env = "MCPW_COLLECTOR_TOKEN_FILE")]
    pub collector_token_file: Option<std::path::PathBuf>,
    /// PEM CA bundle the collector's certificate chains to (besides the
    /// system roots); default: `--warden-ca-file`.
    #[arg(long, env = "MCPW_COLLECTOR_CA_FILE")]
    pub collector_ca_file: Option<std::path::PathBuf>,
    /// The credential broker (e.g. `https://mcpw-broker.mcp-warden.svc:8443`),
    /// given to the sidecars of servers with `dataAccess` tools. Without
    /// it, their calls to such tools are refused.
    #[arg(long, env = "MCPW_BROKER_URL")]
    pub broker_url: Option<String>,
    /// PEM CA bundle of the broker's and the collector's certificates,
    /// handed to every sidecar (in its policy ConfigMap).
    #[arg(long, env = "MCPW_WARDEN_CA_FILE")]
    pub warden_ca_file: Option<std::path::PathBuf>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "MCPW_HEALTH_LISTEN", default_value = "0.0.0.0:8080")]
    pub health_listen: SocketAddr,
    /// MCPServers reconciled at the same time.
    #[arg(long, env = "MCPW_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Period of re-evaluation and JWKS refresh, in seconds.
    #[arg(long, env = "MCPW_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Timeout of one JWKS fetch, in seconds.
    #[arg(long, env = "MCPW_JWKS_TIMEOUT_SECONDS", default_value_t = 10)]
    pub jwks_timeout_seconds: u64,
    /// This pod's name, for events.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MCPW_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
}

impl OperatorArgs {
    /// Render settings from the flags.
    pub fn settings(&self) -> Result<Settings, String> {
        let mut settings = Settings::for_namespace(&self.warden_namespace);
        if let Some(image) = &self.sidecar_image {
            settings.sidecar_image = image.clone();
        }
        settings.control_plane_labels = parse_labels(&self.control_plane_labels)?;
        settings.broker_url = self.broker_url.clone();
        settings.collector_url = self.collector_url.clone();
        if let Some(path) = &self.warden_ca_file {
            let pem = std::fs::read_to_string(path).map_err(|e| format!("--warden-ca-file {}: {e}", path.display()))?;
            settings.warden_ca_pem = Some(pem);
        }
        Ok(settings)
    }
}

/// Parses `key=value,key=value`.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    if labels.is_empty() {
        return Err("at least one control-plane label is required".into());
    }
    Ok(labels)
}

/// The servers of `store`'s namespace whose tools use it.
pub fn servers_using_store(servers: &[Arc<MCPServer>], store: &PHIStore) -> Vec<ObjectRef<MCPServer>> {
    let name = store.name_any();
    servers
        .iter()
        .filter(|s| s.namespace() == store.namespace())
        .filter(|s| s.spec.tools.iter().any(|t| t.data_access.iter().any(|d| d.store == name)))
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

/// Every server of a namespace.
pub fn servers_in_namespace(servers: &[Arc<MCPServer>], namespace: Option<&str>) -> Vec<ObjectRef<MCPServer>> {
    servers.iter().filter(|s| s.namespace().as_deref() == namespace).map(|s| ObjectRef::from_obj(&**s)).collect()
}

/// The server a pod says it belongs to.
pub fn server_of_pod(pod: &Pod) -> Option<ObjectRef<MCPServer>> {
    let name = pod.labels().get(SERVER_LABEL)?;
    let reference = ObjectRef::<MCPServer>::new(name);
    Some(match pod.namespace() {
        Some(ns) => reference.within(&ns),
        None => reference,
    })
}

/// Where the operator watches: every namespace, or one.
struct Scope {
    client: Client,
    namespace: Option<String>,
}

impl Scope {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}

/// Runs the controllers and the health server until SIGTERM or SIGINT.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let settings = args.settings().map_err(anyhow::Error::msg)?;
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let jwks = Arc::new(HttpsJwksSource::new(Duration::from_secs(args.jwks_timeout_seconds))?);
    let mut ctx = Context::new(
        client.clone(),
        settings,
        jwks,
        &mut registry,
        Duration::from_secs(args.resync_seconds),
        args.pod_name.clone(),
    );
    if let (Some(url), Some(token)) = (&args.collector_url, &args.collector_token_file) {
        // The collector's certificate chains to the warden CA unless told otherwise.
        let ca = args.collector_ca_file.as_deref().or(args.warden_ca_file.as_deref());
        let source = collector::HttpsCollectorHealth::new(url, token.clone(), ca)
            .map_err(|e| anyhow::anyhow!("--collector-url: {e}"))?;
        ctx = ctx.with_collector(Arc::new(source));
    }
    let ctx = Arc::new(ctx);
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = Arc::new(Health::with_flag(Arc::clone(&synced), registry));

    let scope = Scope { client: client.clone(), namespace: args.watch_namespace.clone() };
    let servers: Api<MCPServer> = scope.api();
    let stores: Api<PHIStore> = scope.api();
    let owned_cfg = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let controller = Controller::new(servers, watcher::Config::default())
        .with_config(ControllerConfig::default().concurrency(args.concurrency));
    let server_store = controller.store();

    let by_store = server_store.clone();
    let by_namespace = server_store.clone();
    let controller = controller
        .owns(scope.api::<Deployment>(), owned_cfg.clone())
        .owns(scope.api::<Service>(), owned_cfg.clone())
        .owns(scope.api::<ConfigMap>(), owned_cfg.clone())
        .owns(scope.api::<ServiceAccount>(), owned_cfg.clone())
        // A PHIStore change re-renders every server of its namespace using it.
        .watches(stores, watcher::Config::default(), move |store: PHIStore| {
            servers_using_store(&by_store.state(), &store)
        })
        // Any NetworkPolicy can widen a server's traffic: re-evaluate its namespace.
        .watches(scope.api::<NetworkPolicy>(), watcher::Config::default(), move |policy: NetworkPolicy| {
            servers_in_namespace(&by_namespace.state(), policy.namespace().as_deref())
        })
        // Pods, so status follows what really runs (label set by the renderer,
        // and by anyone imitating it: a pod without the sidecar is what we look for).
        .watches(scope.api::<Pod>(), watcher::Config::default().labels(SERVER_LABEL), |pod: Pod| server_of_pod(&pod))
        .shutdown_on_signal();

    let readiness = async move {
        let _ = server_store.wait_until_ready().await;
        synced.store(true, Ordering::Relaxed);
        info!("caches synced; reconciling");
    };

    let servers_done =
        controller.run(reconcile::reconcile, reconcile::error_policy, Arc::clone(&ctx)).for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "controller event");
            }
        });
    // The controllers stop on SIGTERM/SIGINT; the health server stops after them.
    let stopped = Arc::new(tokio::sync::Notify::new());
    let stop_health = Arc::clone(&stopped);
    let listener = tokio::net::TcpListener::bind(args.health_listen).await?;
    let health_server = health::serve(listener, Arc::clone(&health), async move { stop_health.notified().await });
    let controllers = async move {
        servers_done.await;
        stopped.notify_one();
    };
    info!(listen = %args.health_listen, "mcp-warden operator starting");
    let readiness = tokio::spawn(readiness);
    let (_, served) = tokio::join!(controllers, health_server);
    readiness.abort();
    served?;
    info!("mcp-warden operator stopped");
    Ok(())
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
