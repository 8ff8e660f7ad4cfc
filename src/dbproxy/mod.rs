//! The sidecar's PostgreSQL proxy: the MCP server queries PHI as the caller
//! without ever holding a database credential.
//!
//! ```text
//! tools/call ─▶ gateway ─ broker: caller's credential ─▶ Grants: per-call token
//!                  │                                          │
//!                  └─ _meta io.mcpwarden/db {store: postgres://mcp:<token>@127.0.0.1:P/store}
//! MCP server ─ DSN ─▶ proxy (127.0.0.1) ─ token → grant ─▶ store, as the caller's role (TLS, SCRAM)
//!                       │  every statement: literals removed, rows, outcome, duration ─▶ WAL
//!                       └─ call ends / credential expires ─▶ both connections closed
//! ```
//!
//! Modules: `wire` (framing, bounds, the few messages written here),
//! `normalize` (literal removal), `tracker` (which answer belongs to which
//! statement; what is refused), `grants` (tokens and cancel keys),
//! `upstream` (TLS + SCRAM login as the caller), `cut` (the call's end and
//! the credential's expiry, which cut a connection wherever it waits),
//! `session` (one client connection, start to end).

mod cut;
pub mod grants;
pub mod metrics;
pub mod normalize;
pub mod session;
pub mod tracker;
pub mod upstream;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::audit::budget::RefusalBudget;
use crate::audit::record::{Decision, Event, Kind};
use crate::audit::wal::Wal;
use grants::{CancelKeys, Grants};
use metrics::ProxyMetrics;

/// User name in the DSNs (the token is what authenticates).
pub const DSN_USER: &str = "mcp";
/// Method name of the proxy's connection decisions in the trail.
pub const CONNECT_METHOD: &str = "postgres/connect";

/// The proxy of one sidecar.
pub struct DbProxy {
    grants: Arc<Grants>,
    cancel_keys: CancelKeys,
    wal: Arc<Wal>,
    refusals: Mutex<RefusalBudget>,
    metrics: ProxyMetrics,
}

impl DbProxy {
    /// A proxy resolving tokens in `grants` and recording into `wal`.
    pub fn new(grants: Arc<Grants>, wal: Arc<Wal>, metrics: ProxyMetrics) -> Arc<DbProxy> {
        Arc::new(DbProxy { grants, cancel_keys: CancelKeys::default(), wal, refusals: Mutex::default(), metrics })
    }

    /// The DSN a call's MCP server gets for `store`.
    pub fn dsn(listen: SocketAddr, token: &str, store: &str) -> String {
        format!("postgres://{DSN_USER}:{token}@{listen}/{store}?sslmode=disable")
    }

    /// Serves connections until `shutdown` completes; open sessions end
    /// with their calls.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        crate::net::set_no_delay(&socket);
                        tokio::spawn(session::run(Arc::clone(&self), socket));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "database proxy accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Records a refused connection: `decision` says whether the client
    /// failed to authenticate or was denied; `event` carries what is known
    /// of the call. Refusals without a known call are rate-limited.
    async fn record_refusal(&self, decision: Decision, reason: String, mut event: Event) {
        if event.correlation.is_none() {
            let allowed = self.refusals.lock().map(|mut b| b.take()).unwrap_or(false);
            if !allowed {
                self.metrics.refusal_unrecorded();
                return;
            }
        }
        event.kind = Kind::Decision;
        event.method = Some(CONNECT_METHOD.into());
        event.decision = Some(decision);
        event.reason = Some(reason);
        if let Err(e) = self.wal.append(event).await {
            tracing::error!(error = %e, "could not record a refused database connection");
        }
    }
}
