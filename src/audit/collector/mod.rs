//! `mcp-warden audit-collector`: the audit trail outside every MCP pod.
//!
//! ```text
//!   sidecar shipper ──POST /v1/records (NDJSON of canonical records, one stream)──▶ api
//!                      sender authenticated ─▶ store: judged whole (canonical, chained,
//!                      resend = no-op, fork/rewrite refused) ─▶ append + fsync ─▶ {durableThrough}
//!                      gap / fork / rewrite / another sender's stream ─▶ incident record (DATA/incidents)
//! ```
//!
//! This slice runs outside a cluster with a static sender credential. Still
//! to come (issue #7): TokenReview-bound senders, signed checkpoints,
//! per-server health for the operator.

pub mod store;

use std::net::SocketAddr;
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
use crate::health;
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
    /// Address of the API (plain HTTP: loopback only in this build).
    #[arg(long)]
    pub listen: SocketAddr,
    /// File holding the credential senders present (>= 32 bytes).
    #[arg(long)]
    pub sender_credential_file: PathBuf,
    /// File holding the Ed25519 seed (64 hex digits) that signs checkpoints
    /// (a Secret in a cluster). Without it no checkpoint is written.
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    /// How often each changed stream gets a signed checkpoint (Go duration).
    #[arg(long, default_value = "30s")]
    pub checkpoint_interval: String,
}

#[derive(Clone)]
struct AppState {
    storage: Arc<Mutex<Storage>>,
    incidents: Arc<Wal>,
    credential: StaticCredential,
}

/// The collector's router over opened storage.
pub fn router(storage: Arc<Mutex<Storage>>, incidents: Arc<Wal>, credential: StaticCredential) -> Router {
    Router::new()
        .route("/v1/records", post(records))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(AppState { storage, incidents, credential })
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
    let mut event = Event::new(Kind::Incident);
    event.incident = Some(Incident { class, stream: stream.to_string(), seq, detail });
    if let Err(e) = state.incidents.append(event).await {
        tracing::error!(error = %e, "an integrity incident could not be recorded");
    }
    tracing::warn!(?class, %stream, ?seq, "integrity incident");
}

async fn records(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.credential.admits(&headers) {
        return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a sender credential is required".into());
    }
    let storage = Arc::clone(&state.storage);
    let sender = STATIC_SENDER.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let lines: Vec<&[u8]> = body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        storage.lock().unwrap_or_else(|p| p.into_inner()).store(&sender, &lines)
    })
    .await;
    let result = match result {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
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
            incident(&state, IncidentClass::Other, &stream, None, "a batch from another sender".into()).await;
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
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "--listen {}: this build serves the collector over plain HTTP, so on loopback only",
        args.listen
    );
    let text = std::fs::read_to_string(&args.sender_credential_file)
        .with_context(|| format!("--sender-credential-file: cannot read {}", args.sender_credential_file.display()))?;
    let credential = StaticCredential::new(&text).map_err(|e| anyhow::anyhow!("--sender-credential-file: {e}"))?;
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
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, data = %args.data_dir.display(), "audit collector serving");
    let checkpoints = signer.as_ref().map(|signer| {
        tracing::info!(public_key = %signer.public_hex(), "signing checkpoints");
        let (storage, signer) = (Arc::clone(&storage), Arc::clone(signer));
        tokio::spawn(async move {
            let mut signed = std::collections::HashMap::new();
            loop {
                tokio::time::sleep(interval).await;
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
    let app = router(Arc::clone(&storage), Arc::clone(&incidents), credential);
    axum::serve(listener, app).with_graceful_shutdown(health::shutdown_signal()).await?;
    if let Some(task) = checkpoints {
        task.abort();
    }
    if let Some(signer) = &signer {
        // A last checkpoint covers everything received before shutdown.
        checkpoint_changed(&storage, signer, &mut std::collections::HashMap::new())?;
    }
    match Arc::try_unwrap(incidents) {
        Ok(wal) => {
            wal.close().await?;
        }
        Err(_) => tracing::warn!("incident stream still in use at shutdown"),
    }
    Ok(())
}
