//! `mcp-warden audit-collector`: the audit trail outside every MCP pod.
//!
//! ```text
//!   sidecar shipper ──POST /v1/records (NDJSON of canonical records, one stream)──▶ api
//!                      sender authenticated ─▶ store: judged whole (canonical, chained,
//!                      resend = no-op, fork/rewrite refused) ─▶ append + fsync ─▶ {durableThrough}
//!                      gap / fork / rewrite / another sender's stream ─▶ incident record (DATA/incidents)
//! ```
//!
//! Senders are a static credential (laptops, tests) or, in a cluster,
//! sidecars and the broker known by TokenReview; the operator reads
//! per-server health (`GET /v1/health`) and reports present pods
//! (`POST /v1/pods`, so streams of deleted pods become incidents); streams
//! get Ed25519-signed checkpoints (`checkpoint.rs`).

mod recent;
pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::Args;
use serde_json::json;

use super::checkpoint::Signer;
use super::record::{Event, Incident, IncidentClass, Kind};
use super::wal::{Wal, WalConfig};
use crate::bearer::StaticCredential;
use crate::token_review::{COLLECTOR_AUDIENCE, TokenReviewer};
use store::{Refused, Storage};

/// Largest batch body accepted.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// `server` of the collector's own incident records.
pub const COLLECTOR_SERVER: &str = "mcp-warden/collector";
/// The sender name of the static credential.
pub const STATIC_SENDER: &str = "static";

/// `mcp-warden audit-collector` flags.
#[derive(Debug, Args)]
pub struct CollectorArgs {
    /// Where streams and incidents are stored.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The API's address and TLS.
    #[command(flatten)]
    pub api: crate::tls_listener::ApiListen,
    /// File holding the static credential senders present (>= 32 bytes;
    /// laptops, tests). Without it the collector runs in a cluster: senders
    /// are sidecars, known by their service-account tokens (TokenReview).
    #[arg(long)]
    pub sender_credential_file: Option<PathBuf>,
    /// File holding the static credential for `GET /v1/health` (laptops,
    /// tests). In a cluster, see --reader-service-account.
    #[arg(long)]
    pub reader_credential_file: Option<PathBuf>,
    /// In a cluster: the service account allowed to read `GET /v1/health`
    /// (the operator's), as `namespace:name`, with its token for the
    /// collector's audience.
    #[arg(long)]
    pub reader_service_account: Option<String>,
    /// In a cluster: the credential broker's service account, as
    /// `namespace:name`; it ships its lease trail for every MCPServer.
    #[arg(long)]
    pub broker_service_account: Option<String>,
    /// In a cluster: the operator's service account, as `namespace:name`;
    /// it ships its trail of verdict changes for every MCPServer.
    #[arg(long)]
    pub operator_service_account: Option<String>,
    /// File holding the Ed25519 seed (64 hex digits) that signs checkpoints
    /// (a Secret in a cluster). Without it no checkpoint is written.
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    /// How often each changed stream gets a signed checkpoint (Go duration).
    #[arg(long, default_value = "30s")]
    pub checkpoint_interval: String,
}

/// How senders prove who they are.
#[derive(Clone)]
pub enum Senders {
    /// One shared credential: sender "static", any stream.
    Static(StaticCredential),
    /// Sidecars' service-account tokens: the sender is their MCPServer, and
    /// only streams of that server are accepted from it. The control
    /// plane's accounts ship streams of any server.
    TokenReview(Arc<TokenReviewer>, ControlPlane),
}

/// Control-plane service accounts that ship streams of every MCPServer:
/// `(username, sender name)`, e.g. the broker's leases, the operator's
/// verdicts.
pub type ControlPlane = Vec<(String, &'static str)>;

/// The sender name of the operator.
pub const OPERATOR_SENDER: &str = "operator";

/// The sender name of the credential broker.
pub const BROKER_SENDER: &str = "broker";

impl Senders {
    /// The sender's name and the stream prefix it may write, or why not.
    async fn identify(&self, headers: &HeaderMap) -> Result<(String, Option<String>), String> {
        match self {
            Senders::Static(credential) => {
                if credential.admits(headers) {
                    Ok((STATIC_SENDER.to_string(), None))
                } else {
                    Err("a sender credential is required".into())
                }
            }
            Senders::TokenReview(reviewer, control_plane) => {
                let token = crate::bearer::bearer(headers).ok_or("a sidecar service-account token is required")?;
                let username = reviewer.username_of(token).await.map_err(|e| e.to_string())?;
                if let Some((_, sender)) = control_plane.iter().find(|(account, _)| *account == username) {
                    return Ok((sender.to_string(), None));
                }
                let server = crate::token_review::server_of_service_account(&username)
                    .ok_or_else(|| crate::token_review::ReviewError::NotASidecar.to_string())?;
                Ok((format!("mcpserver:{server}"), Some(format!("{server}/"))))
            }
        }
    }
}

/// Who may read per-server health.
#[derive(Clone)]
pub enum Readers {
    /// Nobody (the endpoint answers 401).
    None,
    /// A shared credential.
    Static(StaticCredential),
    /// One service account, by TokenReview (`system:serviceaccount:<ns>:<name>`).
    ServiceAccount(Arc<TokenReviewer>, String),
}

impl Readers {
    async fn admits(&self, headers: &HeaderMap) -> bool {
        match self {
            Readers::None => false,
            Readers::Static(credential) => credential.admits(headers),
            Readers::ServiceAccount(reviewer, username) => match crate::bearer::bearer(headers) {
                Some(token) => reviewer.username_of(token).await.is_ok_and(|u| u == *username),
                None => false,
            },
        }
    }
}

#[derive(Clone)]
struct AppState {
    storage: Arc<Mutex<Storage>>,
    intake: Intake,
    incidents: Arc<Wal>,
    senders: Senders,
    readers: Readers,
    abandon_grace: std::time::Duration,
}

/// Batches are judged and stored by one thread of their own. They wait for
/// the storage's lock anyway; one thread keeps their allocations in one of
/// glibc's per-thread arenas, where tokio's blocking threads, which come
/// and go, had left the free space of a catch-up's batches in several
/// (docs/soak.md).
#[derive(Clone)]
struct Intake {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

/// One batch for the intake thread, and where its outcome goes (`None`:
/// storing it panicked).
struct Job {
    sender: String,
    prefix: Option<String>,
    body: Bytes,
    done: tokio::sync::oneshot::Sender<Option<Result<store::Stored, Refused>>>,
}

/// Batches queued for the intake thread; senders beyond wait (each holds
/// at most one request in flight).
const INTAKE_QUEUE: usize = 16;

impl Intake {
    /// Starts the thread; it ends when the last handle is dropped.
    fn start(storage: Arc<Mutex<Storage>>) -> std::io::Result<Intake> {
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<Job>(INTAKE_QUEUE);
        std::thread::Builder::new().name("collector-intake".into()).spawn(move || {
            while let Some(job) = queue.blocking_recv() {
                let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let lines: Vec<&[u8]> = job.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
                    storage.lock().unwrap_or_else(|p| p.into_inner()).store(&job.sender, job.prefix.as_deref(), &lines)
                }));
                let _ = job.done.send(stored.ok());
            }
        })?;
        Ok(Intake { jobs })
    }

    /// Judges and stores one batch; `None` if the intake could not.
    async fn store(
        &self,
        sender: String,
        prefix: Option<String>,
        body: Bytes,
    ) -> Option<Result<store::Stored, Refused>> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.jobs.send(Job { sender, prefix, body, done }).await.ok()?;
        outcome.await.ok().flatten()
    }
}

/// The collector's router over opened storage (it starts the intake
/// thread: an error if the thread cannot be started).
pub fn router(
    storage: Arc<Mutex<Storage>>,
    incidents: Arc<Wal>,
    senders: Senders,
    readers: Readers,
) -> std::io::Result<Router> {
    router_with_grace(storage, incidents, senders, readers, ABANDON_GRACE)
}

/// [`router`] with another quiet period before a stream of a gone pod is
/// declared abandoned (tests).
pub fn router_with_grace(
    storage: Arc<Mutex<Storage>>,
    incidents: Arc<Wal>,
    senders: Senders,
    readers: Readers,
    abandon_grace: std::time::Duration,
) -> std::io::Result<Router> {
    let intake = Intake::start(Arc::clone(&storage))?;
    Ok(Router::new()
        .route("/v1/records", post(records))
        .route("/v1/health", axum::routing::get(health_of_servers))
        .route("/v1/pods", post(pods_present))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(AppState { storage, intake, incidents, senders, readers, abandon_grace }))
}

/// Per MCPServer: streams, open streams by pod with their last seq and
/// record time, incidents. For the operator's status.
async fn health_of_servers(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !state.readers.admits(&headers).await {
        return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a reader credential is required".into());
    }
    let health = state.storage.lock().unwrap_or_else(|p| p.into_inner()).health();
    (StatusCode::OK, axum::Json(json!({ "servers": health }))).into_response()
}

/// How long a stream of a pod the operator no longer lists may stay quiet
/// before it is declared ended without its stream-end.
pub const ABANDON_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

/// What the operator reports: the pods of one MCPServer that still exist.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsPresent {
    server: String,
    present: Vec<String>,
}

/// `POST /v1/pods` (readers only: the operator): streams of this server
/// whose pod is gone and that never sent their stream-end become
/// `unsealed` incidents — a pod deleted with an unshipped WAL is never a
/// silent gap.
async fn pods_present(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.readers.admits(&headers).await {
        return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a reader credential is required".into());
    }
    let report: PodsPresent = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(_) => return refuse(StatusCode::BAD_REQUEST, "malformed", "expected {server, present}".into()),
    };
    let present = report.present.into_iter().collect();
    let found = state.storage.lock().unwrap_or_else(|p| p.into_inner()).abandon_missing(
        &report.server,
        &present,
        chrono::Utc::now(),
        state.abandon_grace,
    );
    let found = match found {
        Ok(found) => found,
        Err(e) => return refuse(StatusCode::INSUFFICIENT_STORAGE, "storage", e.to_string()),
    };
    for a in &found {
        let pod = a.pod.as_deref().unwrap_or("an unknown pod");
        let detail = format!(
            "the stream of {pod} ended without its stream-end record: the pod is gone; records after seq {}              that were not shipped are lost",
            a.last_seq
        );
        incident(&state, IncidentClass::Unsealed, &a.stream, Some(a.last_seq), detail).await;
    }
    let streams: Vec<&str> = found.iter().map(|a| a.stream.as_str()).collect();
    (StatusCode::OK, axum::Json(json!({ "abandoned": streams }))).into_response()
}

/// Signs a checkpoint for every stream whose head moved since `signed`
/// says; returns how many were written.
pub fn checkpoint_changed(
    storage: &Mutex<Storage>,
    signer: &Signer,
    signed: &mut std::collections::HashMap<String, u64>,
) -> std::io::Result<usize> {
    let heads = storage.lock().unwrap_or_else(|p| p.into_inner()).heads();
    let time = super::record::format_time(chrono::Utc::now());
    let mut written = 0;
    for head in heads {
        if head.seq == 0 || signed.get(&head.stream) == Some(&head.seq) {
            continue;
        }
        let checkpoint = signer.sign(&head.stream, head.seq, &head.hash, &time);
        super::checkpoint::append(&head.dir, &checkpoint)?;
        signed.insert(head.stream, head.seq);
        written += 1;
    }
    Ok(written)
}

fn refuse(status: StatusCode, class: &str, message: String) -> Response {
    (status, axum::Json(json!({"error": class, "message": message}))).into_response()
}

async fn incident(state: &AppState, class: IncidentClass, stream: &str, seq: Option<u64>, detail: String) {
    state.storage.lock().unwrap_or_else(|p| p.into_inner()).note_incident(stream);
    let mut event = Event::new(Kind::Incident);
    event.incident = Some(Incident { class, stream: stream.to_string(), seq, detail });
    if let Err(e) = state.incidents.append(event).await {
        tracing::error!(error = %e, "an integrity incident could not be recorded");
    }
    tracing::warn!(?class, %stream, ?seq, "integrity incident");
}

async fn records(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (sender, prefix) = match state.senders.identify(&headers).await {
        Ok(identity) => identity,
        Err(why) => return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", why),
    };
    let Some(result) = state.intake.store(sender, prefix, body).await else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the batch could not be stored".into());
    };
    match result {
        Ok(stored) => {
            for (class, seq, detail) in &stored.incidents {
                incident(&state, *class, &stored.stream, Some(*seq), detail.clone()).await;
            }
            (
                StatusCode::OK,
                axum::Json(json!({
                    "durableThrough": stored.durable_through, "written": stored.written, "duplicates": stored.duplicates})),
            )
                .into_response()
        }
        Err(Refused::Invalid(why)) => refuse(StatusCode::BAD_REQUEST, "invalid_batch", why),
        Err(Refused::NotYourStream { stream }) => {
            let detail = "a batch from a sender this stream does not belong to".to_string();
            incident(&state, IncidentClass::Other, &stream, None, detail).await;
            refuse(StatusCode::FORBIDDEN, "not_your_stream", format!("stream {stream} belongs to another sender"))
        }
        Err(Refused::Integrity { class, stream, seq, detail }) => {
            incident(&state, class, &stream, Some(seq), detail.clone()).await;
            refuse(StatusCode::CONFLICT, "integrity", format!("{class:?} at seq {seq} of {stream}: {detail}"))
        }
        Err(Refused::Storage(why)) => refuse(StatusCode::INSUFFICIENT_STORAGE, "storage", why),
    }
}

/// Runs the collector until SIGTERM/SIGINT.
pub async fn run(args: CollectorArgs) -> anyhow::Result<()> {
    let bound = args.api.bind("collector").await?;
    let senders = match &args.sender_credential_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--sender-credential-file: cannot read {}", file.display()))?;
            Senders::Static(StaticCredential::new(&text).map_err(|e| anyhow::anyhow!("--sender-credential-file: {e}"))?)
        }
        None => {
            let client =
                kube::Client::try_default().await.context("no cluster to run in (or pass --sender-credential-file)")?;
            let mut control_plane = ControlPlane::new();
            for (flag, account, sender) in [
                ("broker-service-account", &args.broker_service_account, BROKER_SENDER),
                ("operator-service-account", &args.operator_service_account, OPERATOR_SENDER),
            ] {
                if let Some(account) = account {
                    let (ns, name) =
                        account.split_once(':').ok_or_else(|| anyhow::anyhow!("--{flag} must be namespace:name"))?;
                    control_plane.push((format!("system:serviceaccount:{ns}:{name}"), sender));
                }
            }
            Senders::TokenReview(Arc::new(TokenReviewer::new(client, COLLECTOR_AUDIENCE)), control_plane)
        }
    };
    let readers = match (&args.reader_credential_file, &args.reader_service_account, &senders) {
        (Some(file), _, _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--reader-credential-file: cannot read {}", file.display()))?;
            Readers::Static(StaticCredential::new(&text).map_err(|e| anyhow::anyhow!("--reader-credential-file: {e}"))?)
        }
        (None, Some(account), Senders::TokenReview(reviewer, _)) => {
            let (ns, name) = account
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--reader-service-account must be namespace:name"))?;
            Readers::ServiceAccount(Arc::clone(reviewer), format!("system:serviceaccount:{ns}:{name}"))
        }
        (None, Some(_), Senders::Static(_)) => {
            anyhow::bail!("--reader-service-account needs cluster mode (no --sender-credential-file)")
        }
        (None, None, _) => Readers::None,
    };
    let storage = Storage::open(&args.data_dir).map_err(|e| anyhow::anyhow!("{}: {e}", args.data_dir.display()))?;
    let storage = Arc::new(Mutex::new(storage));
    let interval = crate::policy::parse_go_duration(&args.checkpoint_interval)
        .map_err(|e| anyhow::anyhow!("--checkpoint-interval: {e}"))?;
    let signer = match &args.signing_key_file {
        Some(path) => Some(Arc::new(Signer::from_file(path).map_err(|e| anyhow::anyhow!("--signing-key-file: {e}"))?)),
        None => {
            tracing::warn!(
                "no --signing-key-file: no signed checkpoints; a cut tail of an open stream is not provable"
            );
            None
        }
    };
    let incidents_dir = args.data_dir.join("incidents");
    std::fs::create_dir_all(&incidents_dir)?;
    let incidents = Arc::new(Wal::open(WalConfig::new(&incidents_dir, COLLECTOR_SERVER))?);
    tracing::info!(listen = %args.api.listen, tls = bound.is_tls(), data = %args.data_dir.display(), "audit collector serving");
    // At shutdown the checkpoint loop finishes the round it is in (its
    // blocking write cannot be aborted) before the last checkpoint is made.
    let stopping = tokio_util::sync::CancellationToken::new();
    let checkpoints = signer.as_ref().map(|signer| {
        tracing::info!(public_key = %signer.public_hex(), "signing checkpoints");
        let (storage, signer) = (Arc::clone(&storage), Arc::clone(signer));
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let mut signed = std::collections::HashMap::new();
            loop {
                if stopping.run_until_cancelled(tokio::time::sleep(interval)).await.is_none() {
                    return;
                }
                let (s, g) = (Arc::clone(&storage), Arc::clone(&signer));
                let mut map = std::mem::take(&mut signed);
                let result = tokio::task::spawn_blocking(move || {
                    let r = checkpoint_changed(&s, &g, &mut map);
                    (r, map)
                })
                .await;
                match result {
                    Ok((Ok(_), map)) => signed = map,
                    Ok((Err(e), map)) => {
                        signed = map;
                        tracing::error!(error = %e, "writing a checkpoint failed; retried next round");
                    }
                    Err(e) => tracing::error!(error = %e, "checkpoint task failed"),
                }
            }
        })
    });
    let app = router(Arc::clone(&storage), Arc::clone(&incidents), senders, readers)
        .context("starting the collector's intake thread")?;
    bound.serve(app).await?;
    stopping.cancel();
    if let Some(task) = checkpoints {
        let _ = task.await;
    }
    if let Some(signer) = &signer {
        // A last checkpoint covers everything received before shutdown.
        checkpoint_changed(&storage, signer, &mut std::collections::HashMap::new())?;
    }
    Wal::close_shared(incidents).await?;
    Ok(())
}
