//! The broker's audit trail: one WAL per MCPServer it issues for, so a
//! server's leases sit beside its decisions; events of no known server
//! (roles of a deleted server reaped after a restart) go to the broker's
//! own stream.
//!
//! ```text
//!   --audit-dir DIR/<namespace>/<server>/   lease records of that server (server = namespace/name)
//!   --audit-dir DIR/_broker/                the rest (server = "mcp-warden/broker")
//! ```
//!
//! A record is durable before the credential it describes is returned.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::audit::record::{Caller as AuditCaller, Event, Kind, Lease, LeaseAction};
use crate::audit::wal::{Wal, WalConfig, WalError};
use crate::policy::ServerRef;

/// `server` of records no MCPServer owns.
pub const BROKER_SERVER: &str = "mcp-warden/broker";
/// Directory of those records.
const BROKER_DIR: &str = "_broker";

/// The WALs, opened on first use.
pub struct Trail {
    root: PathBuf,
    pod: Option<String>,
    wals: Mutex<HashMap<String, (PathBuf, Arc<Wal>)>>,
}

impl Trail {
    /// A trail under `root`, written by `pod`.
    pub fn new(root: PathBuf, pod: Option<String>) -> Result<Trail, WalError> {
        std::fs::create_dir_all(&root).map_err(|e| WalError::Open { dir: root.clone(), message: e.to_string() })?;
        let trail = Trail { root, pod, wals: Mutex::new(HashMap::new()) };
        // Opening the broker's own stream at start proves the directory works.
        trail.wal(None)?;
        Ok(trail)
    }

    fn wal(&self, server: Option<&ServerRef>) -> Result<Arc<Wal>, WalError> {
        let (key, dir) = match server {
            Some(s) => (s.to_string(), self.root.join(&s.namespace).join(&s.name)),
            None => (BROKER_SERVER.to_string(), self.root.join(BROKER_DIR)),
        };
        let mut wals = self.wals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, wal)) = wals.get(&key) {
            return Ok(Arc::clone(wal));
        }
        std::fs::create_dir_all(&dir).map_err(|e| WalError::Open { dir: dir.clone(), message: e.to_string() })?;
        let mut config = WalConfig::new(dir.clone(), key.clone());
        config.pod = self.pod.clone();
        let wal = Arc::new(Wal::open(config)?);
        wals.insert(key, (dir, Arc::clone(&wal)));
        Ok(wal)
    }

    /// The open WALs and their directories (for shipping).
    pub fn wals(&self) -> Vec<(PathBuf, Arc<Wal>)> {
        let wals = self.wals.lock().unwrap_or_else(|p| p.into_inner());
        wals.values().map(|(dir, wal)| (dir.clone(), Arc::clone(wal))).collect()
    }

    /// Makes one event durable in the server's stream (or the broker's).
    pub async fn record(&self, server: Option<&ServerRef>, event: Event) -> Result<(), WalError> {
        let wal = self.wal(server)?;
        wal.append(event).await.map(|_| ())
    }

    /// Closes every stream with its stream-end record.
    pub async fn close(&self) {
        let wals: Vec<Arc<Wal>> =
            self.wals.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, (_, w))| w).collect();
        for wal in wals {
            if let Err(e) = Wal::close_shared(wal).await {
                tracing::warn!(error = %e, "closing an audit stream failed");
            }
        }
    }
}

/// What a lease record says.
pub struct LeaseFacts<'a> {
    /// What happened.
    pub action: LeaseAction,
    /// The lease id.
    pub lease: &'a str,
    /// The role.
    pub role: &'a str,
    /// Expiry (RFC 3339), when known.
    pub valid_until: Option<String>,
    /// The PHIStore name.
    pub store: Option<&'a str>,
    /// The tool.
    pub tool: Option<&'a str>,
    /// The caller, when known.
    pub caller: Option<AuditCaller>,
    /// The sidecar's correlation id, when given.
    pub correlation: Option<&'a str>,
    /// Why (revocations and reaps).
    pub reason: Option<String>,
}

/// The lease event.
pub fn lease_event(facts: LeaseFacts<'_>) -> Event {
    let mut event = Event::new(Kind::Lease);
    event.lease = Some(Lease {
        id: facts.lease.to_string(),
        action: facts.action,
        role: Some(facts.role.to_string()),
        valid_until: facts.valid_until,
    });
    event.store = facts.store.map(str::to_string);
    event.tool = facts.tool.map(str::to_string);
    event.caller = facts.caller;
    event.correlation = facts.correlation.map(str::to_string);
    event.reason = facts.reason;
    event
}
