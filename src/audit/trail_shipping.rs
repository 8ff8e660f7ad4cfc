//! A control-plane trail (`audit::trail`: the broker's, the operator's)
//! leaves its pod too: every WAL the trail opens (one per MCPServer, plus
//! the writer's own) is shipped to the audit collector by its own shipper,
//! with the sidecar's loop (`audit::ship`): in order, segments released
//! after the collector's fsync'd acknowledgement, backoff on failure; at
//! shutdown the streams are sealed and the rest drained.
//!
//! ```text
//!   every second: trail.wals() ─ new dir? ─▶ spawn ship_loop(Shipper(dir), wal)
//!   shutdown:     stop loops ─▶ trail sealed (broker.close) ─▶ drain each shipper (bounded)
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::audit::ship::{self, Shipper};
use crate::audit::trail::Trail;
use crate::bearer::ClientCredential;

/// How often the trail is checked for newly opened WALs.
const DISCOVER_EVERY: Duration = Duration::from_secs(1);

/// Where the trail is shipped to.
#[derive(Clone)]
pub struct Destination {
    /// The collector's base URL.
    pub url: String,
    /// What the writer presents (its projected token for the collector's
    /// audience, re-read per batch).
    pub credential: ClientCredential,
    /// The HTTP client (trusting the warden CA).
    pub http: reqwest::Client,
}

type Loop = (JoinHandle<Shipper>, Arc<Notify>);

/// The running shippers of a trail.
pub struct TrailShipping {
    supervisor: JoinHandle<HashMap<PathBuf, Loop>>,
    stop: Arc<Notify>,
}

impl TrailShipping {
    /// Starts shipping every WAL of the trail `owner` holds (`trail` finds
    /// it there) to `to`; ends when the owner is gone or on `stop`.
    pub fn start<T: Send + Sync + 'static>(owner: &Arc<T>, trail: fn(&T) -> &Trail, to: Destination) -> TrailShipping {
        let stop = Arc::new(Notify::new());
        let supervisor = tokio::spawn(supervise(Arc::downgrade(owner), trail, to, Arc::clone(&stop)));
        TrailShipping { supervisor, stop }
    }

    /// Stops the loops (releasing their WAL handles) and returns the
    /// shippers, to drain once the trail is sealed.
    pub async fn stop(self) -> Vec<Shipper> {
        self.stop.notify_one();
        let loops = self.supervisor.await.unwrap_or_default();
        let mut shippers = Vec::new();
        for (_, (task, stop)) in loops {
            stop.notify_one();
            if let Ok(shipper) = task.await {
                shippers.push(shipper);
            }
        }
        shippers
    }
}

async fn supervise<T>(
    owner: Weak<T>,
    trail: fn(&T) -> &Trail,
    to: Destination,
    stop: Arc<Notify>,
) -> HashMap<PathBuf, Loop> {
    let mut loops: HashMap<PathBuf, Loop> = HashMap::new();
    loop {
        let Some(owner) = owner.upgrade() else { return loops };
        for (dir, wal) in trail(&owner).wals() {
            if loops.contains_key(&dir) {
                continue;
            }
            let shipper = Shipper::with_client(dir.clone(), &to.url, to.credential.clone(), to.http.clone());
            let stop_loop = Arc::new(Notify::new());
            let task = tokio::spawn(ship::ship_loop(shipper, wal, Arc::clone(&stop_loop)));
            tracing::info!(dir = %dir.display(), "shipping a trail stream to the collector");
            loops.insert(dir, (task, stop_loop));
        }
        drop(owner);
        tokio::select! {
            _ = stop.notified() => return loops,
            _ = tokio::time::sleep(DISCOVER_EVERY) => {}
        }
    }
}

/// After the trail is sealed: ships what is left of every stream, within
/// the shared bound.
pub async fn drain(shippers: Vec<Shipper>) {
    let all = futures::future::join_all(shippers.into_iter().map(ship::drain));
    let _ = tokio::time::timeout(ship::DRAIN + Duration::from_secs(1), all).await;
}
