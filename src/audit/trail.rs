//! A control-plane component's audit trail: one WAL per MCPServer it acts
//! for, so a server's records from the broker (leases) or the operator
//! (verdicts) sit in streams of that server; records of no known server go
//! to the component's own stream.
//!
//! ```text
//!   ROOT/<namespace>/<server>/   records of that server (server = namespace/name)
//!   ROOT/<own dir>/              the rest (server = e.g. "mcp-warden/broker")
//! ```
//!
//! `record` returns once the record is durable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::audit::record::Event;
use crate::audit::wal::{Wal, WalConfig, WalError};
use crate::policy::ServerRef;

/// The writer's own stream: records of no MCPServer.
#[derive(Debug, Clone, Copy)]
pub struct OwnStream {
    /// Its `server` field, e.g. `mcp-warden/broker`.
    pub server: &'static str,
    /// Its directory under the root, e.g. `_broker`.
    pub dir: &'static str,
}

/// The WALs, opened on first use.
pub struct Trail {
    root: PathBuf,
    pod: Option<String>,
    own: OwnStream,
    wals: Mutex<HashMap<String, (PathBuf, Arc<Wal>)>>,
}

impl Trail {
    /// A trail under `root`, written by `pod`, with `own` for records of
    /// no server.
    pub fn new(root: PathBuf, pod: Option<String>, own: OwnStream) -> Result<Trail, WalError> {
        std::fs::create_dir_all(&root).map_err(|e| WalError::Open { dir: root.clone(), message: e.to_string() })?;
        let trail = Trail { root, pod, own, wals: Mutex::new(HashMap::new()) };
        // Opening the writer's own stream at start proves the directory works.
        trail.wal(None)?;
        Ok(trail)
    }

    fn wal(&self, server: Option<&ServerRef>) -> Result<Arc<Wal>, WalError> {
        let (key, dir) = match server {
            Some(s) => (s.to_string(), self.root.join(&s.namespace).join(&s.name)),
            None => (self.own.server.to_string(), self.root.join(self.own.dir)),
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

    /// Makes one event durable in the server's stream (or the writer's own).
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
