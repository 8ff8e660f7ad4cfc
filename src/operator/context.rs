//! What every reconcile shares: the client, the caches, what this process
//! wrote recently, whether it leads, settings, event recorder, JWKS source,
//! metrics and per-object backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::caches::Caches;
use super::jwks::JwksSource;
use super::recent::RecentWrites;
use crate::leader::Leadership;
use crate::render::Settings;

pub use crate::breakglass::DEFAULT_ADMISSION_POLICY as DEFAULT_EMERGENCY_POLICY;

/// Shared state of the controllers.
pub struct Context {
    /// The API client (its writes are fenced by leadership).
    pub client: Client,
    /// The watched objects; reconciles read here, never list.
    pub caches: Caches,
    /// Answers to this process's writes the caches may not show yet.
    pub recent: RecentWrites,
    /// Whether this process may write.
    pub leadership: Leadership,
    /// How objects are rendered.
    pub settings: Settings,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// Fetches `jwksUri` documents.
    pub jwks: Arc<dyn JwksSource>,
    /// The audit collector's per-server health, when one is configured.
    pub collector: Option<Arc<dyn super::collector::CollectorHealthSource>>,
    /// Where verdict changes are recorded, when configured.
    pub verdicts: Option<Arc<crate::audit::trail::Trail>>,
    /// Operator metrics.
    pub metrics: Metrics,
    /// Re-evaluation (and JWKS refresh) period of a healthy server.
    pub resync: Duration,
    /// Name of the break-glass ValidatingAdmissionPolicy and its binding.
    pub emergency_policy: String,
    /// Name of the ValidatingAdmissionPolicy (and binding) refusing server
    /// pods without their sidecar.
    pub server_pod_policy: String,
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context; metrics are registered in `registry`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        caches: Caches,
        leadership: Leadership,
        settings: Settings,
        jwks: Arc<dyn JwksSource>,
        registry: &mut Registry,
        resync: Duration,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter { controller: "mcp-warden-operator".into(), instance };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            caches,
            recent: RecentWrites::default(),
            leadership,
            settings,
            jwks,
            collector: None,
            verdicts: None,
            metrics: Metrics::register(registry),
            resync,
            emergency_policy: DEFAULT_EMERGENCY_POLICY.into(),
            server_pod_policy: crate::compliance::pod_admission::DEFAULT_SERVER_POD_POLICY.into(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The same context, requiring the break-glass admission policy
    /// `emergency` and observing the server-pod policy `server_pods`.
    pub fn with_admission_policies(mut self, emergency: &str, server_pods: &str) -> Self {
        self.emergency_policy = emergency.to_string();
        self.server_pod_policy = server_pods.to_string();
        self
    }

    /// The same context, reading the audit collector's health from `source`.
    pub fn with_collector(mut self, source: Arc<dyn super::collector::CollectorHealthSource>) -> Self {
        self.collector = Some(source);
        self
    }

    /// The same context, recording verdict changes in `trail`.
    pub fn with_verdict_trail(mut self, trail: Arc<crate::audit::trail::Trail>) -> Self {
        self.verdicts = Some(trail);
        self
    }

    /// Records a failure of `key` and returns how long to wait before the
    /// next attempt: 5 s, doubling, at most 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(5u64.saturating_mul(1 << (*n - 1).min(6))).min(Duration::from_secs(300))
    }

    /// Forgets the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Label of the error counter: a stable error class, never an object name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Error class.
    pub error: String,
}

/// Operator metrics. No label carries an object name, caller or value.
pub struct Metrics {
    /// Reconciliations started.
    pub reconciles: Counter,
    /// Failed reconciliations by error class.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconciliation duration, seconds.
    pub duration: Histogram,
    /// Objects created or updated.
    pub applied: Counter,
    /// Hand edits undone.
    pub drift_corrected: Counter,
    /// Owned objects deleted because the spec no longer needs them.
    pub orphans_deleted: Counter,
    /// Failed JWKS fetches.
    pub jwks_fetch_failures: Counter,
    /// 1 while this replica leads, else 0.
    pub leader: Gauge,
    /// Break-glass grants in force.
    pub emergency_grants_active: Gauge,
    /// Verdict changes that could not be recorded in the trail.
    pub verdict_records_failed: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            applied: Counter::default(),
            drift_corrected: Counter::default(),
            orphans_deleted: Counter::default(),
            jwks_fetch_failures: Counter::default(),
            leader: Gauge::default(),
            emergency_grants_active: Gauge::default(),
            verdict_records_failed: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("mcpwarden_operator");
        r.register("reconciles", "Reconciliations started", metrics.reconciles.clone());
        r.register("reconcile_failures", "Failed reconciliations by error class", metrics.failures.clone());
        r.register("reconcile_duration_seconds", "Reconciliation duration", metrics.duration.clone());
        r.register("objects_applied", "Owned objects created or updated", metrics.applied.clone());
        r.register("drift_corrected", "Owned objects restored after a hand edit", metrics.drift_corrected.clone());
        r.register("orphans_deleted", "Owned objects deleted as no longer needed", metrics.orphans_deleted.clone());
        r.register("jwks_fetch_failures", "Failed JWKS fetches", metrics.jwks_fetch_failures.clone());
        r.register("leader", "1 while this replica leads", metrics.leader.clone());
        r.register(
            "emergency_grants_active",
            "Break-glass grants (EmergencyAccess) in force",
            metrics.emergency_grants_active.clone(),
        );
        r.register(
            "verdict_records_failed",
            "Verdict changes that could not be recorded in the operator's trail",
            metrics.verdict_records_failed.clone(),
        );
        metrics
    }
}
