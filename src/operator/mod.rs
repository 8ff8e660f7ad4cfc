//! `mcp-warden operator`: reconciles MCPServers into isolated workloads and
//! reports compliance from what it observes.
//!
//! ```text
//!   watch MCPServer ──────────────┐
//!   watch owned kinds (label) ────┤  caches ── read by ──▶ reconcile (render, apply, evaluate, status)
//!   watch PHIStore → servers using it      ─▶ Controller ──┘        │ writes pass the fence
//!   watch NetworkPolicy → servers whose pods it selects              ▼
//!   watch Pod (label) → its server                         API server (only while leading)
//!   watch EmergencyAccess → its server ─┐
//!   watch MCPServer → its grants ───────┼─▶ grant Controller ─▶ grants::reconcile (judge, status, events)
//!   watch admission policy → all grants ┘
//!   Lease (leader election) ─ new term ─▶ reconcile every server
//!   :8080  /healthz /readyz (every cache synced) /metrics
//! ```
//!
//! Every replica watches and keeps its caches warm (and reports ready);
//! only the one holding the Lease writes.

pub mod caches;
pub mod collector;
pub mod context;
pub mod grants;
pub mod jwks;
pub mod managed_fields;
pub mod owned;
pub mod pod_view;
pub mod recent;
pub mod reconcile;
pub mod status;
pub mod triggers;
pub mod verdicts;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args};
use futures::{FutureExt, StreamExt, TryStreamExt};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::health::{self, Health};
use crate::leader::fence::{FenceLayer, RequestCounts};
use crate::leader::{self, Leadership, LeaseConfig};
use crate::policy::parse_go_duration;
use crate::render::Settings;
use caches::{Caches, Scope};
use context::Context;
use jwks::HttpsJwksSource;
use triggers::PolicyTargets;

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
    /// Directory of the operator's trail of verdict changes (one stream per
    /// MCPServer, shipped to `--collector-url` when given; the report's
    /// control history). Without it no verdict change is recorded.
    #[arg(long, env = "MCPW_AUDIT_DIR")]
    pub audit_dir: Option<std::path::PathBuf>,
    /// The credential broker (e.g. `https://mcpw-broker.mcp-warden.svc:8443`),
    /// given to the sidecars of servers with `dataAccess` tools. Without
    /// it, their calls to such tools are refused.
    #[arg(long, env = "MCPW_BROKER_URL")]
    pub broker_url: Option<String>,
    /// PEM CA bundle of the broker's and the collector's certificates,
    /// handed to every sidecar (in its policy ConfigMap).
    #[arg(long, env = "MCPW_WARDEN_CA_FILE")]
    pub warden_ca_file: Option<std::path::PathBuf>,
    /// Name of the chart's break-glass ValidatingAdmissionPolicy (and its
    /// binding): without it in force, every emergency-access grant is
    /// refused.
    #[arg(long, env = "MCPW_EMERGENCY_ADMISSION_POLICY", default_value = context::DEFAULT_EMERGENCY_POLICY)]
    pub emergency_admission_policy: String,
    /// Name of the chart's ValidatingAdmissionPolicy (and binding) refusing
    /// MCP-server pods without their sidecar in opted-in namespaces
    /// (reported by the audit-controls control).
    #[arg(
        long,
        env = "MCPW_SERVER_POD_ADMISSION_POLICY",
        default_value = crate::compliance::pod_admission::DEFAULT_SERVER_POD_POLICY
    )]
    pub server_pod_admission_policy: String,
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
    /// Quiet time after a change before a server is reconciled, so a burst
    /// of events (its own writes, the Deployment controller's answer, new
    /// pods) makes one pass, e.g. `1s`.
    #[arg(long, env = "MCPW_DEBOUNCE", default_value = "1s", value_parser = duration)]
    pub debounce: Duration,
    /// Elect one writing replica with a Lease (`false`: this process always
    /// writes; run one replica only).
    #[arg(long, env = "MCPW_LEADER_ELECTION", default_value_t = true, action = ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the Lease (default: the warden namespace).
    #[arg(long, env = "MCPW_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "MCPW_LEASE_NAME", default_value = "mcp-warden-operator")]
    pub lease_name: String,
    /// How long a standby waits on an unrenewed Lease before taking it.
    #[arg(long, env = "MCPW_LEASE_DURATION", default_value = "10s", value_parser = duration)]
    pub lease_duration: Duration,
    /// How long after its last successful renewal a leader stops writing
    /// (shorter than the lease duration: the gap is the fencing margin).
    #[arg(long, env = "MCPW_LEASE_RENEW_DEADLINE", default_value = "7s", value_parser = duration)]
    pub lease_renew_deadline: Duration,
    /// How often the Lease is renewed, or polled by a standby.
    #[arg(long, env = "MCPW_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    pub lease_retry_period: Duration,
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

/// A flag's duration: `500ms`, or a Go duration (`10s`, `1m30s`).
fn duration(text: &str) -> Result<Duration, String> {
    match text.strip_suffix("ms") {
        Some(ms) => ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("{text:?}: whole milliseconds, as in 500ms")),
        None => parse_go_duration(text),
    }
}

impl OperatorArgs {
    /// The election's timing and identity, when leader election is on.
    pub fn lease(&self) -> Result<Option<LeaseConfig>, String> {
        if !self.leader_election {
            return Ok(None);
        }
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "mcp-warden".into());
        let base = self.pod_name.clone().unwrap_or(host);
        let config = LeaseConfig {
            namespace: self.lease_namespace.clone().unwrap_or_else(|| self.warden_namespace.clone()),
            name: self.lease_name.clone(),
            // Unique per process: a restarted replica must not inherit its
            // predecessor's term.
            identity: format!("{base}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            lease_duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        };
        config.validate()?;
        Ok(Some(config))
    }
}

/// Runs the controllers and the health server until SIGTERM or SIGINT;
/// then stops reconciling, releases the Lease, and exits.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let settings = args.settings().map_err(anyhow::Error::msg)?;
    let lease = args.lease().map_err(anyhow::Error::msg)?;
    let config = kube::Config::infer().await?;
    let leadership = if lease.is_some() { Leadership::elected() } else { Leadership::standalone() };
    let mut registry = Registry::default();
    // Every write of the controllers passes the fence; the elector's own
    // client does not.
    let fence = FenceLayer::new(leadership.clone(), RequestCounts::register(&mut registry));
    let client = kube::client::ClientBuilder::try_from(config.clone())?.with_layer(&fence).build();
    let lease_client = kube::Client::try_from(config)?;

    let scope = Scope { client: client.clone(), namespace: args.watch_namespace.clone() };
    let (caches, triggers) = Caches::watch(&scope);
    let jwks = Arc::new(HttpsJwksSource::new(Duration::from_secs(args.jwks_timeout_seconds))?);
    let mut ctx = Context::new(
        client,
        caches.clone(),
        leadership.clone(),
        settings,
        jwks,
        &mut registry,
        Duration::from_secs(args.resync_seconds),
        args.pod_name.clone(),
    )
    .with_admission_policies(&args.emergency_admission_policy, &args.server_pod_admission_policy);
    if let (Some(url), Some(token)) = (&args.collector_url, &args.collector_token_file) {
        // The collector's certificate chains to the warden CA unless told otherwise.
        let ca = args.collector_ca_file.as_deref().or(args.warden_ca_file.as_deref());
        let source = collector::HttpsCollectorHealth::new(url, token.clone(), ca)
            .map_err(|e| anyhow::anyhow!("--collector-url: {e}"))?;
        ctx = ctx.with_collector(Arc::new(source));
    }
    let verdict_trail = match &args.audit_dir {
        Some(dir) => {
            let trail = crate::audit::trail::Trail::new(dir.clone(), args.pod_name.clone(), verdicts::OPERATOR_STREAM)
                .map_err(|e| anyhow::anyhow!("--audit-dir: {e}"))?;
            Some(Arc::new(trail))
        }
        None => None,
    };
    let verdict_shipping = match (&verdict_trail, &args.collector_url, &args.collector_token_file) {
        (Some(trail), Some(url), Some(token)) => {
            let ca = args.collector_ca_file.as_deref().or(args.warden_ca_file.as_deref());
            let http = crate::bearer::api_client(ca).map_err(anyhow::Error::msg)?;
            let credential = crate::bearer::ClientCredential::File(token.clone());
            let to = crate::audit::trail_shipping::Destination { url: url.clone(), credential, http };
            Some(crate::audit::trail_shipping::TrailShipping::start(trail, |t| t, to))
        }
        _ => None,
    };
    if let Some(trail) = &verdict_trail {
        ctx = ctx.with_verdict_trail(Arc::clone(trail));
    }
    let leader_gauge = ctx.metrics.leader.clone();
    if lease.is_none() {
        leader_gauge.set(1);
    }
    let ctx = Arc::new(ctx);
    let sync = Arc::clone(&caches.sync);
    let health = Arc::new(Health {
        ready: Box::new(move || {
            let pending = sync.pending();
            if pending.is_empty() { Ok(()) } else { Err(format!("caches not synced: {}", pending.join(", "))) }
        }),
        registry,
    });

    let signal = health::shutdown_signal().boxed().shared();
    let by_store = caches.servers.clone();
    let by_policy = caches.servers.clone();
    let by_namespace = caches.servers.clone();
    let targets = PolicyTargets::default();
    // Each trigger stream has one consumer; what the other controller must
    // hear of it goes through a channel.
    let (grants_to_judge, grants_to_judge_rx) = futures::channel::mpsc::unbounded();
    let (servers_to_evaluate, servers_to_evaluate_rx) = futures::channel::mpsc::unbounded();
    let grants_of = caches.clone();
    let server_triggers = triggers.servers.inspect_ok(move |server| {
        for grant in grants::grants_of_server(&grants_of, server) {
            let _ = grants_to_judge.unbounded_send(grant);
        }
    });
    let grant_triggers = triggers.grants.inspect_ok(move |grant| {
        if let Some(server) = grants::server_of_grant(grant) {
            let _ = servers_to_evaluate.unbounded_send(server);
        }
    });
    let controller = Controller::for_stream(server_triggers, caches.servers.clone())
        .with_config(ControllerConfig::default().concurrency(args.concurrency).debounce(args.debounce))
        .owns_stream(triggers.deployments)
        .owns_stream(triggers.services)
        .owns_stream(triggers.config_maps)
        .owns_stream(triggers.service_accounts)
        // A PHIStore change re-renders the servers of its namespace using it.
        .watches_stream(triggers.stores, move |store| triggers::servers_using_store(&by_store.state(), &store))
        // A NetworkPolicy can widen the traffic of the pods it selects.
        .watches_stream(triggers.network_policies, move |policy| targets.concerned(&by_policy.state(), &policy))
        // Pods, so status follows what really runs (label set by the renderer,
        // and by anyone imitating it: a pod without the sidecar is what we look for).
        .watches_stream(triggers.pods, |pod| triggers::server_of_pod(&pod))
        // A grant changing changes its server's emergency-access control.
        .reconcile_on(servers_to_evaluate_rx)
        // A namespace opting in (or out) changes its servers' audit-controls.
        .watches_stream(triggers.namespaces, move |ns| triggers::servers_in_namespace(&by_namespace.state(), &ns))
        // A new leader looks at everything once, from its warm caches.
        .reconcile_all_on(leadership.terms())
        .graceful_shutdown_on(signal.clone());
    let all_on_policy = caches.clone();
    let all_on_binding = caches.clone();
    let grant_controller = Controller::for_stream(grant_triggers, caches.grants.clone())
        .with_config(ControllerConfig::default().concurrency(args.concurrency).debounce(args.debounce))
        .reconcile_on(grants_to_judge_rx)
        .watches_stream(triggers.admission_policies, move |_| grants::every_grant(&all_on_policy))
        .watches_stream(triggers.admission_bindings, move |_| grants::every_grant(&all_on_binding))
        .reconcile_all_on(leadership.terms())
        .graceful_shutdown_on(signal.clone());

    let reconciled = Arc::clone(&ctx);
    let servers_done =
        controller.run(reconcile::reconcile, reconcile::error_policy, reconciled).for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "controller event");
            }
        });
    let judged = Arc::clone(&ctx);
    let grants_done =
        grant_controller.run(grants::reconcile, grants::error_policy, judged).for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "grant controller event");
            }
        });
    // Order of the stop: the controllers (no more writes), then the Lease
    // (released, so a standby takes over at once), then the health server.
    let controllers_stopped = Arc::new(tokio::sync::Notify::new());
    let election_stopped = Arc::new(tokio::sync::Notify::new());
    let listener = tokio::net::TcpListener::bind(args.health_listen).await?;
    let stop_health = Arc::clone(&election_stopped);
    let health_server = health::serve(listener, Arc::clone(&health), async move { stop_health.notified().await });
    let stop_election = Arc::clone(&controllers_stopped);
    let election = async move {
        if let Some(lease) = lease {
            info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "leader election");
            leader::run(lease_client, lease, leadership, stop_election.notified(), leader_gauge).await;
        } else {
            stop_election.notified().await;
        }
        election_stopped.notify_one();
    };
    let controllers = async move {
        tokio::join!(servers_done, grants_done);
        controllers_stopped.notify_one();
    };
    info!(listen = %args.health_listen, "mcp-warden operator starting");
    tokio::join!(controllers, election, health_server);
    // The verdict trail is sealed and what is left of it shipped.
    let shippers = match verdict_shipping {
        Some(shipping) => shipping.stop().await,
        None => Vec::new(),
    };
    if let Some(trail) = verdict_trail {
        trail.close().await;
    }
    crate::audit::trail_shipping::drain(shippers).await;
    info!("mcp-warden operator stopped");
    Ok(())
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
