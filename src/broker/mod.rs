//! The credential broker: per-caller, per-tool, short-lived PostgreSQL
//! roles holding exactly the columns the policy names.
//!
//! ```text
//!   sidecar ──POST /v1/credentials {server, tool, store, callerToken}──▶ api
//!                                                                        │ sidecar credential checked
//!   inventory (MCPServer, PHIStore, admin Secret) ──▶ issuer ◀───────────┘
//!        │                                              │ caller token verified here, policy checked here
//!        │                                              ▼
//!        └──▶ lifecycle: sync (group roles, admin check, PUBLIC) · reap · revoke ──▶ store (admin connection)
//!                                                       │
//!                                   trail: lease records, durable before the credential is returned
//! ```
//!
//! Module map: `naming` (role names, lease ids, passwords), `sql` (quoting),
//! `grants` (desired vs actual grants, pure), `store` (SQL against one
//! database), `checks` (admin role, PUBLIC), `inventory` (what is served),
//! `issuer` (issue/reuse), `lifecycle` (sync/reap/revoke), `status`
//! (PHIStore status, pure), `trail` (audit), `api` (HTTP), `client` (for
//! sidecars and tests), `metrics`. What the admin role must be:
//! `docs/broker.md`.

pub mod api;
pub mod checks;
pub mod client;
pub mod cluster;
pub mod deid;
pub mod grants;
pub mod inventory;
pub mod issuer;
pub mod lifecycle;
pub mod linkage;
pub mod metrics;
pub mod naming;
pub mod reidentify;
pub mod sql;
pub mod status;
pub mod store;
pub mod trail;
pub mod warm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::health::{self, Health};
use crate::policy::parse_go_duration;

/// `mcp-warden broker` flags.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Read MCPServers, PHIStores, their admin Secrets and JWKS/CA
    /// ConfigMaps from this directory of YAML (laptops, tests, demos),
    /// re-read every --resync-interval. Without it the broker runs in a
    /// cluster: objects from the API, sidecars checked with TokenReview,
    /// PHIStore status written.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// The API's address and TLS (it returns credentials).
    #[command(flatten)]
    pub api: crate::tls_listener::ApiListen,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The static credential sidecars present (>= 32 bytes); --manifests
    /// mode only.
    #[arg(long, env = "MCPW_BROKER_SIDECAR_CREDENTIAL", conflicts_with = "sidecar_credential_file")]
    pub sidecar_credential: Option<String>,
    /// A file holding that credential.
    #[arg(long)]
    pub sidecar_credential_file: Option<PathBuf>,
    /// A file holding the credential for revocations and store reports
    /// (>= 32 bytes); without it those endpoints are closed.
    #[arg(long)]
    pub revoker_credential_file: Option<PathBuf>,
    /// A file holding the credential for re-identification (>= 32 bytes);
    /// --manifests mode only. In a cluster, people present their own
    /// Kubernetes token and need `reidentify` on the PHIStore (RBAC).
    #[arg(long)]
    pub reidentifier_credential_file: Option<PathBuf>,
    /// Directory of the broker's audit trail (one WAL per MCPServer).
    #[arg(long)]
    pub audit_dir: PathBuf,
    /// Cap on every lease's lifetime, below each MCPServer's
    /// `credentials.ttl` (Go duration, e.g. `5m`).
    #[arg(long)]
    pub max_ttl: Option<String>,
    /// CONNECTION LIMIT of each issued role.
    #[arg(long, default_value_t = 4)]
    pub connection_limit: u32,
    /// Roles kept made ahead of demand per store (NOLOGIN, member of
    /// nothing, until issued), so that an issuance skips PostgreSQL's
    /// PBKDF2 (docs/broker.md). 0: every role is made when asked for.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub warm_logins: u16,
    /// How often expired roles are reaped (Go duration).
    #[arg(long, default_value = "15s")]
    pub reap_interval: String,
    /// How often the objects are re-read and stores brought in line (in a
    /// cluster, changes to MCPServers and PHIStores also trigger it).
    #[arg(long, default_value = "60s")]
    pub resync_interval: String,
    /// In a cluster: serve only this namespace's MCPServers and PHIStores.
    #[arg(long, env = "MCPW_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// This pod's name, recorded in every audit record.
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
    /// The audit collector the trail is shipped to (e.g.
    /// `https://mcpw-collector.mcp-warden.svc:8443`); without it the trail
    /// stays in `--audit-dir`.
    #[arg(long, requires = "collector_credential_file")]
    pub collector: Option<String>,
    /// File holding what is presented to the collector, re-read per batch:
    /// a static credential, or the broker's projected token for the
    /// audience `mcp-warden-collector`.
    #[arg(long)]
    pub collector_credential_file: Option<PathBuf>,
    /// PEM CA bundle trusted (besides the system roots) for the collector's
    /// certificate.
    #[arg(long)]
    pub warden_ca_file: Option<PathBuf>,
    /// Name of the chart's break-glass ValidatingAdmissionPolicy (and its
    /// binding): grants are honoured only while it is in force (in
    /// --manifests mode: among the manifests).
    #[arg(long, env = "MCPW_EMERGENCY_ADMISSION_POLICY", default_value = crate::breakglass::DEFAULT_ADMISSION_POLICY)]
    pub emergency_admission_policy: String,
}

fn duration_flag(flag: &str, text: &str) -> anyhow::Result<Duration> {
    let d = parse_go_duration(text).map_err(|e| anyhow::anyhow!("--{flag} {text:?}: {e}"))?;
    anyhow::ensure!(!d.is_zero(), "--{flag} must be positive");
    Ok(d)
}

fn read_credential(path: &PathBuf, flag: &str) -> anyhow::Result<api::StaticCredential> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--{flag}: cannot read {}", path.display()))?;
    api::StaticCredential::new(&text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

/// Where the inventory comes from.
enum Source {
    Manifests {
        dir: PathBuf,
        admission_policy: String,
    },
    Cluster {
        client: kube::Client,
        namespace: Option<String>,
        status: Box<cluster::StatusWriter>,
        admission_policy: String,
    },
}

impl Source {
    async fn load(&self) -> anyhow::Result<inventory::Inventory> {
        match self {
            Source::Manifests { dir, admission_policy } => {
                inventory::Inventory::from_manifests_with(dir, admission_policy)
                    .map_err(|errors| anyhow::anyhow!("invalid manifests:\n{}", errors.join("\n")))
            }
            Source::Cluster { client, namespace, admission_policy, .. } => {
                Ok(cluster::load_inventory(client, namespace.as_deref(), admission_policy).await?)
            }
        }
    }

    /// Writes the store reports where they belong (the PHIStore status in a
    /// cluster; `GET /v1/stores` serves them either way).
    async fn publish(&self, broker: &issuer::Broker) {
        if let Source::Cluster { status, .. } = self
            && let Err(e) = status.write(&broker.reports()).await
        {
            tracing::warn!(error = %e, "writing PHIStore status failed; retried at the next sync");
        }
    }
}

/// Runs the broker until SIGTERM/SIGINT.
pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let bound = args.api.bind("broker").await?;
    let revoker =
        args.revoker_credential_file.as_ref().map(|p| read_credential(p, "revoker-credential-file")).transpose()?;
    let (source, sidecar, reidentifier) = match &args.manifests {
        Some(dir) => {
            let sidecar = match (&args.sidecar_credential, &args.sidecar_credential_file) {
                (Some(text), None) => {
                    api::StaticCredential::new(text).map_err(|e| anyhow::anyhow!("--sidecar-credential: {e}"))?
                }
                (None, Some(path)) => read_credential(path, "sidecar-credential-file")?,
                _ => anyhow::bail!(
                    "with --manifests, one of --sidecar-credential or --sidecar-credential-file is required"
                ),
            };
            let reidentifier = match &args.reidentifier_credential_file {
                Some(path) => api::ReidentifierAuth::Static(read_credential(path, "reidentifier-credential-file")?),
                None => api::ReidentifierAuth::Closed,
            };
            let source =
                Source::Manifests { dir: dir.clone(), admission_policy: args.emergency_admission_policy.clone() };
            (source, api::SidecarAuth::Static(sidecar), reidentifier)
        }
        None => {
            anyhow::ensure!(
                args.sidecar_credential.is_none() && args.sidecar_credential_file.is_none(),
                "in a cluster sidecars authenticate with their service-account tokens; a static sidecar credential is for --manifests only"
            );
            anyhow::ensure!(
                args.reidentifier_credential_file.is_none(),
                "in a cluster re-identification is authorized per person (SubjectAccessReview); a static reidentifier credential is for --manifests only"
            );
            let client = kube::Client::try_default().await.context("no cluster to run in (or pass --manifests DIR)")?;
            let reviewer = std::sync::Arc::new(cluster::TokenReviewer::new(client.clone(), cluster::BROKER_AUDIENCE));
            let status = Box::new(cluster::StatusWriter::new(client.clone()));
            let people = std::sync::Arc::new(crate::access_review::AccessReviewer::new(client.clone()));
            (
                Source::Cluster {
                    client,
                    namespace: args.watch_namespace.clone(),
                    status,
                    admission_policy: args.emergency_admission_policy.clone(),
                },
                api::SidecarAuth::TokenReview(reviewer),
                api::ReidentifierAuth::Cluster(people),
            )
        }
    };
    let settings = issuer::Settings {
        max_ttl: args.max_ttl.as_deref().map(|t| duration_flag("max-ttl", t)).transpose()?,
        connection_limit: args.connection_limit.max(1),
        warm_logins: usize::from(args.warm_logins),
    };
    let reap_interval = duration_flag("reap-interval", &args.reap_interval)?;
    let resync_interval = duration_flag("resync-interval", &args.resync_interval)?;
    let inventory = source.load().await?;
    let trail = trail::Trail::new(args.audit_dir.clone(), args.pod.clone(), trail::BROKER_STREAM)?;
    let mut registry = Registry::default();
    let metrics = metrics::BrokerMetrics::register(&mut registry);
    let broker = Arc::new(issuer::Broker::new(inventory, trail, settings, metrics));
    let trail_shipping = match (&args.collector, &args.collector_credential_file) {
        (Some(url), Some(file)) => {
            std::fs::metadata(file)
                .with_context(|| format!("--collector-credential-file: cannot read {}", file.display()))?;
            let http = crate::bearer::api_client(args.warden_ca_file.as_deref()).map_err(anyhow::Error::msg)?;
            let credential = crate::bearer::ClientCredential::File(file.clone());
            let to = crate::audit::trail_shipping::Destination { url: url.clone(), credential, http };
            Some(crate::audit::trail_shipping::TrailShipping::start(&broker, issuer::Broker::trail, to))
        }
        _ => None,
    };
    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(tokio::sync::Notify::new());
    let health_task = match args.metrics_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let health = Arc::new(Health::with_flag(Arc::clone(&ready), registry));
            let stop = Arc::clone(&stop);
            Some(tokio::spawn(health::serve(listener, health, async move { stop.notified().await })))
        }
        None => None,
    };
    // Restart-safe: whatever a previous run left is reaped before serving.
    for problem in broker.sync().await {
        tracing::warn!(%problem, "store problem at start");
    }
    source.publish(&broker).await;
    let reaped = broker.reap().await;
    tracing::info!(reaped, "initial reap done");
    ready.store(true, Ordering::Relaxed);
    let source = Arc::new(source);
    let changed = Arc::new(tokio::sync::Notify::new());
    let watchers = match source.as_ref() {
        Source::Cluster { client, namespace, .. } => {
            Some(tokio::spawn(watch_changes(client.clone(), namespace.clone(), Arc::clone(&changed))))
        }
        Source::Manifests { .. } => None,
    };
    // The reaper and the reloader end roles and then record that they did:
    // at shutdown they finish the pass they are in (an abort between the two
    // would leave an ended lease off the trail) and start no new one.
    let stopping = CancellationToken::new();
    let reaper = tokio::spawn(reap_loop(Arc::downgrade(&broker), reap_interval, stopping.clone()));
    let warmer = tokio::spawn(warm::keep_warm(Arc::downgrade(&broker)));
    let reloader = tokio::spawn(reload_loop(
        Arc::downgrade(&broker),
        Arc::clone(&source),
        resync_interval,
        Arc::clone(&changed),
        stopping.clone(),
    ));
    let app = api::router(Arc::clone(&broker), api::Callers { sidecar, revoker, reidentifier });
    tracing::info!(listen = %args.api.listen, tls = bound.is_tls(), "broker serving");
    bound.serve(app).await?;
    stopping.cancel();
    let _ = reaper.await;
    let _ = reloader.await;
    warmer.abort();
    if let Some(w) = watchers {
        w.abort();
    }
    let shippers = match trail_shipping {
        Some(shipping) => shipping.stop().await,
        None => Vec::new(),
    };
    broker.close().await;
    crate::audit::trail_shipping::drain(shippers).await;
    stop.notify_one();
    if let Some(task) = health_task {
        let _ = task.await;
    }
    Ok(())
}

async fn reap_loop(broker: std::sync::Weak<issuer::Broker>, interval: Duration, stopping: CancellationToken) {
    loop {
        if stopping.run_until_cancelled(tokio::time::sleep(interval)).await.is_none() {
            return;
        }
        let Some(broker) = broker.upgrade() else { return };
        let reaped = broker.reap().await;
        if reaped > 0 {
            tracing::info!(reaped, "expired roles reaped");
        }
    }
}

async fn reload_loop(
    broker: std::sync::Weak<issuer::Broker>,
    source: Arc<Source>,
    interval: Duration,
    changed: Arc<tokio::sync::Notify>,
    stopping: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = changed.notified() => {
                // Let a burst of changes (an apply of many objects) settle.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ = stopping.cancelled() => return,
        }
        if stopping.is_cancelled() {
            return;
        }
        let Some(broker) = broker.upgrade() else { return };
        match source.load().await {
            Ok(inventory) => {
                broker.reload(inventory).await;
                source.publish(&broker).await;
            }
            Err(e) => tracing::error!(error = %e, "inventory refused; the previous one stays in force"),
        }
    }
}

/// Wakes the reload loop when an MCPServer, PHIStore or break-glass grant
/// (or the admission policy grants need) changes: a revoked grant's
/// sessions end within seconds, not at the next resync.
async fn watch_changes(client: kube::Client, namespace: Option<String>, changed: Arc<tokio::sync::Notify>) {
    use futures::StreamExt;
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    use kube::runtime::{WatchStreamExt, watcher};
    fn touched<K>(api: kube::Api<K>) -> futures::stream::BoxStream<'static, bool>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        K::DynamicType: Default,
    {
        watcher(api, watcher::Config::default()).default_backoff().touched_objects().map(|r| r.is_ok()).boxed()
    }
    let namespace = namespace.as_deref();
    let mut events = futures::stream::select_all([
        touched(cluster::scoped::<crate::api::MCPServer>(&client, namespace)),
        touched(cluster::scoped::<crate::api::PHIStore>(&client, namespace)),
        touched(cluster::scoped::<crate::api::EmergencyAccess>(&client, namespace)),
        touched(kube::Api::<ValidatingAdmissionPolicy>::all(client.clone())),
        touched(kube::Api::<ValidatingAdmissionPolicyBinding>::all(client)),
    ]);
    while let Some(ok) = events.next().await {
        if ok {
            changed.notify_one();
        }
    }
}
