//! A small stateful Kubernetes API server for tests and benchmarks, made to
//! behave like the real one did in `tests/k8s-recordings/` (test support
//! only; nothing here ships in the product).
//!
//! ```text
//!   operator process ─ KUBECONFIG ─▶ listener (one per identity) ─ latency ─ faults ─┐
//!   test (FakeApi::apply / update / delete, as "kubectl") ───────────────────────────┤
//!                                                                                   ▼
//!        core: objects + resourceVersions, SSA with managedFields, updates moving ownership,
//!              finalizers, 409/410/404/422 Status bodies, watch log with selector transitions
//!        controllers: the Deployment controller (status, Pending pods), garbage collection
//! ```
//!
//! Every request is logged with the identity of the listener it came in on,
//! so a test can count the reads and writes of each process.

#![allow(dead_code)]

pub mod controllers;
pub mod core;
pub mod fields;
pub mod http;
pub mod kinds;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use self::core::{ApiError, Core};
use self::kinds::Kind;

/// One request as the fake served it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Since the fake started.
    pub at: Duration,
    /// The listener's identity.
    pub identity: String,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// list, watch, get, create, update, patch, delete, other.
    pub verb: &'static str,
    /// The resource (plural), or "".
    pub plural: String,
    /// HTTP status answered.
    pub status: u16,
}

impl Request {
    /// Whether it changes state (POST, PUT, PATCH, DELETE).
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    /// Whether it is an Event (counted apart from the other writes).
    pub fn is_event(&self) -> bool {
        self.plural == "events"
    }
}

/// What a fault does to a request.
pub enum Fault {
    /// Answer with this status (a Status body).
    Fail(u16),
    /// Hold the request this long first.
    Delay(Duration),
}

/// Decides a fault for a request, or None.
pub type FaultRule = Box<dyn Fn(&Request) -> Option<Fault> + Send + Sync>;

/// What the listeners share.
pub struct Shared {
    /// The storage.
    pub core: Arc<Core>,
    started: Instant,
    latency: Mutex<(Duration, Duration)>,
    faults: Mutex<Vec<FaultRule>>,
    log: Mutex<Vec<Request>>,
    seed: Mutex<u64>,
}

impl Shared {
    fn delay(&self) -> Duration {
        let (min, max) = *self.latency.lock().unwrap_or_else(|p| p.into_inner());
        if max <= min {
            return min;
        }
        let mut seed = self.seed.lock().unwrap_or_else(|p| p.into_inner());
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let span = (max - min).as_micros() as u64;
        min + Duration::from_micros(*seed % span.max(1))
    }

    fn fault(&self, request: &Request) -> Option<Fault> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).iter().find_map(|rule| rule(request))
    }

    fn record(&self, request: Request) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(request);
    }
}

/// The fake API server.
pub struct FakeApi {
    /// What the listeners share.
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FakeApi {
    /// An empty fake with the Deployment controller and garbage collector
    /// running (they react within `controller_delay`).
    pub fn start(controller_delay: Duration) -> Self {
        let shared = Arc::new(Shared {
            core: Arc::new(Core::new()),
            started: Instant::now(),
            latency: Mutex::new((Duration::ZERO, Duration::ZERO)),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            seed: Mutex::new(0x9E37_79B9_7F4A_7C15),
        });
        let tasks = vec![
            tokio::spawn(controllers::deployments(Arc::clone(&shared.core), controller_delay)),
            tokio::spawn(controllers::garbage_collector(Arc::clone(&shared.core))),
        ];
        FakeApi { shared, tasks }
    }

    /// Every request waits a uniform time in `[min, max]` before it is
    /// served: a zero-latency mock hides what a real server's round trips cost.
    pub fn set_latency(&self, min: Duration, max: Duration) {
        *self.shared.latency.lock().unwrap_or_else(|p| p.into_inner()) = (min, max);
    }

    /// Adds a fault rule (the first that answers wins).
    pub fn add_fault(&self, rule: FaultRule) {
        self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()).push(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Serves on a new loopback port; requests there are logged as
    /// `identity`.
    pub async fn listen(&mut self, identity: &str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = http::router(Arc::clone(&self.shared), identity.to_string());
        self.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        addr
    }

    /// Writes a kubeconfig for `addr` into `dir` and returns its path.
    pub fn kubeconfig(dir: &Path, addr: SocketAddr, identity: &str) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{identity}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\nusers:\n- name: {identity}\n  user:\n    token: {identity}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: {identity}\n    namespace: default\ncurrent-context: fake\n"
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Time since the fake started (the scale of [`Request::at`]).
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    fn kind(plural: &str) -> Kind {
        kinds::KINDS.iter().copied().find(|k| k.plural == plural).unwrap_or_else(|| panic!("unknown resource {plural}"))
    }

    /// Server-side apply of `object` by `manager` (as `kubectl apply
    /// --server-side` would, forcing conflicts).
    pub fn apply(&self, manager: &str, object: &Value) -> Result<Value, ApiError> {
        let kind = kinds::KINDS
            .iter()
            .copied()
            .find(|k| object["kind"] == k.kind)
            .unwrap_or_else(|| panic!("unknown kind {}", object["kind"]));
        let namespace = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        let name = object.pointer("/metadata/name").and_then(Value::as_str).expect("name");
        self.shared.core.apply(&kind, namespace, name, object.clone(), manager, true, None).map(|(_, o)| o)
    }

    /// A merge patch by `manager` (as `kubectl edit` or `kubectl patch`).
    pub fn merge_patch(
        &self,
        manager: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let patch = patch.clone();
        self.shared.core.update(&Self::kind(plural), namespace, name, manager, None, move |live| {
            let mut next = live.clone();
            json_patch::merge(&mut next, &patch);
            Ok(next)
        })
    }

    /// GET.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared.core.get(&Self::kind(plural), namespace, name).ok()
    }

    /// Every object of `plural` in `namespace`.
    pub fn list(&self, plural: &str, namespace: &str) -> Vec<Value> {
        self.shared.core.list(&Self::kind(plural), Some(namespace), &core::Selector::default()).0
    }

    /// DELETE.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.shared.core.delete(&Self::kind(plural), namespace, name)
    }
}
