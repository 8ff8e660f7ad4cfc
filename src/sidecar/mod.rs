//! `mcp-warden sidecar`: the auditing gateway in front of an MCP server.
//!
//! ```text
//!   client ──▶ :8443 gateway (authn → authz → audit → forward) ──▶ 127.0.0.1:<port> MCP server
//!              :9090 /healthz /readyz /metrics (never the public port)
//!   policy: --policy FILE (operator's ConfigMap, re-read when it changes) or --mcpserver FILE (manifests)
//!   keys:   --jwks-file FILE or --jwks-url URL       audit: --audit-dir DIR (the WAL)
//! ```

pub mod authn;
pub mod authz;
pub mod data_access;
pub mod emergency;
pub mod gateway;
pub mod messages;
pub mod metrics;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use prometheus_client::registry::Registry;

use crate::audit::args_hmac::ArgsKey;
use crate::audit::{Wal, WalConfig};
use crate::health::{self, Health};
use crate::jwt::{Authenticator, KeySource, Keys};
use crate::manifest;
use crate::policy::{self, CompiledPolicy, POLICY_FORMAT_VERSION};
use gateway::{Gateway, GatewayConfig};
use metrics::SidecarMetrics;

/// Serves the gateway on its public listener until `shutdown` resolves.
/// Nagle is off on every connection (`net`): streamed answers go out as
/// they are written; a request head must arrive within `http_server`'s
/// timeout, so silent connections do not pile up.
pub async fn serve_public(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    crate::http_server::serve(crate::net::no_delay(listener), router, shutdown).await
}

/// Flags of `mcp-warden sidecar`.
#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// Manifest file(s) holding the MCPServer (and its PHIStores); the
    /// policy is compiled from them. For laptops and tests.
    #[arg(long, required_unless_present = "policy", conflicts_with = "policy")]
    pub mcpserver: Vec<PathBuf>,
    /// The compiled policy (the operator's ConfigMap, mounted).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// The MCP server's endpoint, on loopback, e.g. http://127.0.0.1:8080/mcp.
    #[arg(long)]
    pub upstream: String,
    /// Public address (the only one the Service exposes).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// The issuer's JWKS as a file (reloaded when a token names an unknown key).
    #[arg(long, required_unless_present = "jwks_url", conflicts_with = "jwks_url")]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's JWKS URL (https, or http on loopback).
    #[arg(long)]
    pub jwks_url: Option<String>,
    /// Directory of the audit write-ahead log (mounted by the sidecar only).
    #[arg(long)]
    pub audit_dir: PathBuf,
    /// Key of the arguments' HMAC and of session binding (>= 32 bytes; a
    /// Secret mounted into the sidecar only).
    #[arg(long, env = "MCPW_ARGS_KEY_FILE")]
    pub args_key_file: PathBuf,
    /// Additional host names this server answers to (the audience's host and
    /// the Service's names are always allowed).
    #[arg(long = "allowed-host")]
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call (none by default).
    #[arg(long = "allowed-origin")]
    pub allowed_origins: Vec<String>,
    /// This pod's name, recorded in every audit record.
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Bound of the audit WAL on disk, in bytes.
    #[arg(long, default_value_t = 768 * 1024 * 1024)]
    pub audit_max_bytes: u64,
    /// The audit collector records are shipped to (e.g.
    /// `http://127.0.0.1:7443`); WAL segments are released once it holds
    /// them. Without it the trail stays in the WAL (until its bound).
    #[arg(long, requires = "collector_credential_file")]
    pub collector: Option<String>,
    /// File holding what is presented to the collector, re-read before
    /// every batch: a static credential, or (in a cluster) the projected
    /// service-account token for the audience `mcp-warden-collector`.
    #[arg(long)]
    pub collector_credential_file: Option<std::path::PathBuf>,
    /// PEM CA bundle trusted (besides the system roots) for the collector's
    /// and the broker's TLS certificates.
    #[arg(long)]
    pub warden_ca_file: Option<std::path::PathBuf>,
    /// The credential broker (e.g. `https://mcpw-broker.mcp-warden:8443`):
    /// tools with `dataAccess` get the caller's database credential from it.
    /// Without it, calls to such tools are refused.
    #[arg(long, requires = "broker_credential_file")]
    pub broker: Option<String>,
    /// File holding what is presented to the broker, re-read per request: a
    /// static credential, or (in a cluster) the projected service-account
    /// token for the audience `mcp-warden-broker`.
    #[arg(long)]
    pub broker_credential_file: Option<std::path::PathBuf>,
    /// Where the database proxy listens (loopback only: the MCP container
    /// shares the pod's network namespace, nothing else may reach it).
    #[arg(long, default_value = "127.0.0.1:15432")]
    pub db_proxy_listen: SocketAddr,
    /// Threads that serve calls (the audit log's writer has one of its
    /// own). The sidecar answers for one MCP server: a few threads keep a
    /// call's hops close together, where a pod without a CPU limit would
    /// otherwise get one thread per core of its node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,
}

/// Runs the sidecar as a process: on its own runtime of
/// `--worker-threads` threads, logging, until it stops.
pub fn serve(args: SidecarArgs) -> std::process::ExitCode {
    let workers = usize::from(args.worker_threads);
    crate::cli::serve_on(Some(workers), run(args))
}

/// Reads a compiled policy file.
pub fn read_policy_file(path: &std::path::Path) -> anyhow::Result<CompiledPolicy> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let policy: CompiledPolicy =
        serde_json::from_str(&text).with_context(|| format!("{} is not a compiled policy", path.display()))?;
    anyhow::ensure!(
        policy.format_version == POLICY_FORMAT_VERSION,
        "{} has policy format {}; this sidecar reads {POLICY_FORMAT_VERSION}",
        path.display(),
        policy.format_version
    );
    policy.check_argument_rules().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(policy)
}

/// Re-reads `path` every `interval` and puts a changed policy in force. A
/// policy that does not parse, or is for another server, is refused and the
/// one in force stays (and it is logged). Stops when the gateway is gone.
pub async fn watch_policy(path: PathBuf, gateway: std::sync::Weak<Gateway>, interval: std::time::Duration) {
    use sha2::{Digest, Sha256};
    let digest = |bytes: &[u8]| Sha256::digest(bytes).to_vec();
    // Compared with what is in force, not with the file at start: a change
    // that lands before the first look is not missed.
    let mut last = Vec::new();
    loop {
        tokio::time::sleep(interval).await;
        let Some(gateway) = gateway.upgrade() else { return };
        // The kubelet swaps a mounted ConfigMap atomically; a read sees the
        // old or the new file, never half of one.
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let current = digest(&bytes);
        if current == last {
            continue;
        }
        last = current;
        let next = match read_policy_file(&path) {
            Ok(next) if next == *gateway.policy() => continue,
            other => other,
        };
        match next.map_err(|e| e.to_string()).and_then(|p| gateway.replace_policy(p)) {
            Ok(()) => tracing::info!(policy = %path.display(), "policy reloaded"),
            Err(e) => {
                tracing::error!(policy = %path.display(), error = %e, "policy change refused; the previous policy stays in force")
            }
        }
    }
}

/// Loads the compiled policy from `--policy` or compiles it from
/// `--mcpserver` manifests.
pub fn load_policy(args: &SidecarArgs) -> anyhow::Result<CompiledPolicy> {
    if let Some(path) = &args.policy {
        return read_policy_file(path);
    }
    let (set, errors) = manifest::load_paths(&args.mcpserver);
    if !errors.is_empty() {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("invalid manifests:\n{}", text.join("\n"));
    }
    let [server] = set.servers.as_slice() else {
        anyhow::bail!("--mcpserver must name exactly one MCPServer; found {}", set.servers.len());
    };
    let namespace = policy::namespace_of(&server.object);
    let stores = set
        .stores
        .iter()
        .filter(|s| policy::namespace_of(&s.object) == namespace)
        .map(|s| (kube::ResourceExt::name_any(&s.object), s.object.clone()))
        .collect();
    Ok(policy::compile(&server.object, &stores)?)
}

/// Host names a server answers to by default: its audience's host and its
/// Service's DNS names.
pub fn default_hosts(policy: &CompiledPolicy) -> Vec<String> {
    let mut hosts = Vec::new();
    if let Some(host) =
        reqwest::Url::parse(&policy.authentication.audience).ok().and_then(|u| u.host_str().map(str::to_string))
    {
        hosts.push(host);
    }
    let (name, ns) = (&policy.server.name, &policy.server.namespace);
    hosts.push(name.clone());
    if !ns.is_empty() {
        hosts.extend([format!("{name}.{ns}"), format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.cluster.local")]);
    }
    hosts
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains in-flight requests and
/// seals the audit stream.
pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let policy = Arc::new(load_policy(&args)?);
    let upstream =
        reqwest::Url::parse(&args.upstream).with_context(|| format!("--upstream {} is not a URL", args.upstream))?;
    let source = match (&args.jwks_file, &args.jwks_url) {
        (Some(file), _) => KeySource::File(file.clone()),
        (None, Some(url)) => KeySource::Url(url.clone()),
        (None, None) => anyhow::bail!("one of --jwks-file or --jwks-url is required"),
    };
    let keys = Keys::load(source).await?;
    let args_key = ArgsKey::from_file(&args.args_key_file)?;
    let mut wal_config = WalConfig::new(&args.audit_dir, policy.server.to_string());
    wal_config.pod = args.pod.clone();
    wal_config.max_bytes = args.audit_max_bytes;
    let wal = Arc::new(Wal::open(wal_config)?);
    let shipping = match (&args.collector, &args.collector_credential_file) {
        (Some(url), Some(file)) => {
            std::fs::metadata(file)
                .with_context(|| format!("--collector-credential-file: cannot read {}", file.display()))?;
            let credential = crate::bearer::ClientCredential::File(file.clone());
            let http = crate::bearer::api_client(args.warden_ca_file.as_deref()).map_err(anyhow::Error::msg)?;
            let shipper = crate::audit::ship::Shipper::with_client(args.audit_dir.clone(), url, credential, http);
            let stop = Arc::new(tokio::sync::Notify::new());
            let task = tokio::spawn(crate::audit::ship::ship_loop(shipper, Arc::clone(&wal), Arc::clone(&stop)));
            Some((task, stop))
        }
        _ => None,
    };
    let mut registry = Registry::default();
    let metrics = SidecarMetrics::register(&mut registry);
    let mut allowed_hosts = default_hosts(&policy);
    allowed_hosts.extend(args.allowed_hosts.iter().cloned());
    let config = GatewayConfig {
        upstream,
        allowed_hosts,
        allowed_origins: args.allowed_origins.clone(),
        max_body_bytes: args.max_body_bytes,
    };
    let authn = Authenticator::new(keys, policy.authentication.clone());
    let mut gateway = Gateway::new(Arc::clone(&policy), authn, Arc::clone(&wal), args_key, config, metrics)?;
    let db_proxy = match &args.broker {
        Some(url) => {
            let (data_access, proxy) = start_db_proxy(&args, url, Arc::clone(&wal), &mut registry).await?;
            gateway = gateway.with_data_access(data_access);
            Some(proxy)
        }
        None => {
            if policy.tools.values().any(|t| !t.data_access.is_empty()) {
                tracing::warn!("tools with dataAccess are refused: no --broker to get callers' credentials from");
            }
            None
        }
    };
    let gateway = Arc::new(gateway);
    // Weak: readiness must not keep the gateway (and its WAL) alive at shutdown.
    let ready_gateway = Arc::downgrade(&gateway);
    let health = Arc::new(Health {
        ready: Box::new(move || match ready_gateway.upgrade() {
            Some(gateway) => gateway.readiness(),
            None => Err("shutting down".into()),
        }),
        registry,
    });

    let public = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let private = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    tracing::info!(listen = %args.listen, metrics = %args.metrics_listen, server = %policy.server, stream = %wal.opened().stream, "sidecar serving");
    let stop_health = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::clone(&stop_health);
    let health_server = tokio::spawn(health::serve(private, health, async move { stop.notified().await }));
    if let Some(path) = &args.policy {
        tokio::spawn(watch_policy(path.clone(), Arc::downgrade(&gateway), std::time::Duration::from_secs(2)));
    }
    let stop_public = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::clone(&stop_public);
    let mut server =
        tokio::spawn(serve_public(public, Arc::clone(&gateway).router(), async move { stop.notified().await }));
    tokio::select! {
        _ = crate::health::shutdown_signal() => {}
        result = &mut server => {
            // The server stopped by itself: that is a failure, not a shutdown.
            result?;
            anyhow::bail!("the public listener stopped");
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    stop_public.notify_one();
    // In-flight calls get DRAIN to finish (inside Kubernetes' default 30 s
    // grace period); idle keep-alive connections do not hold the shutdown.
    if tokio::time::timeout(DRAIN, &mut server).await.is_err() {
        tracing::warn!(seconds = DRAIN.as_secs(), "requests still open after the drain period; closing them");
        server.abort();
    }
    drop(gateway);
    if let Some((task, stop)) = db_proxy {
        stop.notify_one();
        let _ = task.await;
    }
    tracing::info!("sealing the audit stream");
    let shipper = match shipping {
        Some((task, stop)) => {
            stop.notify_one();
            task.await.ok()
        }
        None => None,
    };
    if Wal::close_shared(wal).await?.is_some()
        && let Some(shipper) = shipper
    {
        crate::audit::ship::drain(shipper).await;
    }
    stop_health.notify_one();
    let _ = health_server.await;
    Ok(())
}

type Stoppable = (tokio::task::JoinHandle<()>, Arc<tokio::sync::Notify>);

/// Binds the database proxy (loopback only) and starts serving it.
async fn start_db_proxy(
    args: &SidecarArgs,
    broker_url: &str,
    wal: Arc<Wal>,
    registry: &mut Registry,
) -> anyhow::Result<(crate::sidecar::data_access::DataAccess, Stoppable)> {
    if !args.db_proxy_listen.ip().is_loopback() {
        anyhow::bail!("--db-proxy-listen {} is not a loopback address", args.db_proxy_listen);
    }
    let file = args.broker_credential_file.clone().context("--broker requires --broker-credential-file")?;
    std::fs::metadata(&file).with_context(|| format!("--broker-credential-file: cannot read {}", file.display()))?;
    let http = crate::bearer::api_client(args.warden_ca_file.as_deref()).map_err(anyhow::Error::msg)?;
    let broker =
        crate::broker::client::BrokerClient::from_parts(broker_url, crate::bearer::ClientCredential::File(file), http);
    let listener = tokio::net::TcpListener::bind(args.db_proxy_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.db_proxy_listen))?;
    let bound = listener.local_addr()?;
    let grants = crate::dbproxy::grants::Grants::new();
    let metrics = crate::dbproxy::metrics::ProxyMetrics::register(registry);
    let proxy = crate::dbproxy::DbProxy::new(Arc::clone(&grants), wal, metrics);
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::clone(&stop);
    let task = tokio::spawn(proxy.serve(listener, async move { stopped.notified().await }));
    tracing::info!(listen = %bound, broker = %broker_url, "database proxy serving");
    Ok((crate::sidecar::data_access::DataAccess::new(broker, grants, bound), (task, stop)))
}

/// Time in-flight requests get to finish after SIGTERM.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod args_tests {
    use clap::Parser;

    use super::SidecarArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: SidecarArgs,
    }

    fn parse(extra: &[&str]) -> Result<SidecarArgs, clap::Error> {
        let required = [
            "sidecar",
            "--mcpserver",
            "server.yaml",
            "--upstream",
            "http://127.0.0.1:8080/mcp",
            "--jwks-file",
            "jwks.json",
            "--audit-dir",
            "audit",
            "--args-key-file",
            "key",
        ];
        Cli::try_parse_from(required.iter().chain(extra)).map(|cli| cli.args)
    }

    #[test]
    fn worker_threads_default_to_two_whatever_the_node_and_stay_within_bounds() {
        assert_eq!(parse(&[]).expect("parses").worker_threads, 2);
        assert_eq!(parse(&["--worker-threads", "1"]).expect("parses").worker_threads, 1);
        for refused in ["0", "65", "-1", "two"] {
            let e = parse(&[&format!("--worker-threads={refused}")]).expect_err(refused);
            assert!(e.to_string().contains("--worker-threads"), "{e}");
        }
    }
}
