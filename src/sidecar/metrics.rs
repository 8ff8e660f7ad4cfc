//! Sidecar metrics. Labels are fixed verdict and outcome classes: never a
//! caller, a tool name, an argument or a header value.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of the decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// allow, deny, authn_failure, insufficient_scope, refused_audit, origin.
    pub verdict: String,
}

/// Label of the withheld-answers counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatternLabels {
    /// The identifier pattern's name (from the policy: `ssn`, `mrn`, …).
    pub pattern: String,
}

/// Counters and histograms of the gateway.
#[derive(Clone)]
pub struct SidecarMetrics {
    decisions: Family<VerdictLabels, Counter>,
    withheld: Family<PatternLabels, Counter>,
    wal_append_seconds: Histogram,
    wal_failures: Counter,
    authn_unrecorded: Counter,
    list_entries_hidden: Counter,
    tools_drifted: Gauge,
    last_append_ok: Arc<AtomicBool>,
}

impl SidecarMetrics {
    /// Registers the metrics under `mcpwarden_sidecar_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = SidecarMetrics {
            decisions: Family::default(),
            withheld: Family::default(),
            // Fine where an fsync lands (0.1-0.3 ms on a local disk), so a
            // slower disk shows before it costs a millisecond.
            wal_append_seconds: Histogram::new([
                0.0001, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
            wal_failures: Counter::default(),
            authn_unrecorded: Counter::default(),
            list_entries_hidden: Counter::default(),
            tools_drifted: Gauge::default(),
            last_append_ok: Arc::new(AtomicBool::new(true)),
        };
        let r = registry.sub_registry_with_prefix("mcpwarden_sidecar");
        r.register("decisions", "Requests by verdict", metrics.decisions.clone());
        r.register(
            "answers_withheld",
            "Answers of de-identified tools withheld because they held an identifier shape, by pattern",
            metrics.withheld.clone(),
        );
        r.register("wal_append_seconds", "Time to make an audit record durable", metrics.wal_append_seconds.clone());
        r.register("wal_failures", "Audit records that could not be made durable", metrics.wal_failures.clone());
        r.register(
            "authn_failures_unrecorded",
            "Refusals of unauthenticated requests over the recording rate limit (counted, not recorded)",
            metrics.authn_unrecorded.clone(),
        );
        r.register(
            "list_entries_hidden",
            "List entries removed because the caller may not use them",
            metrics.list_entries_hidden.clone(),
        );
        r.register(
            "tools_schema_drifted",
            "Tools whose listed inputSchema differs from their declared arguments (last list seen)",
            metrics.tools_drifted.clone(),
        );
        metrics
    }

    /// Sets how many tools' listed schemas differ from their declarations.
    pub fn tools_drifted(&self, tools: usize) {
        self.tools_drifted.set(i64::try_from(tools).unwrap_or(i64::MAX));
    }

    /// Counts a decision (a verdict written in the code: labels never carry
    /// request text).
    pub fn decision(&self, verdict: &'static str) {
        self.decisions.get_or_create(&VerdictLabels { verdict: verdict.to_string() }).inc();
    }

    /// Records a WAL append.
    pub fn wal_append(&self, took: Duration, ok: bool) {
        self.wal_append_seconds.observe(took.as_secs_f64());
        if !ok {
            self.wal_failures.inc();
        }
        self.last_append_ok.store(ok, Ordering::Relaxed);
    }

    /// Whether the last append succeeded.
    pub fn last_append_ok(&self) -> bool {
        self.last_append_ok.load(Ordering::Relaxed)
    }

    /// Counts an authentication failure that was not recorded.
    pub fn authn_unrecorded(&self) {
        self.authn_unrecorded.inc();
    }

    /// Counts hidden list entries.
    pub fn filtered(&self, removed: usize) {
        self.list_entries_hidden.inc_by(removed as u64);
    }

    /// Counts an answer withheld by the identifier scan.
    pub fn withheld(&self, pattern: &str) {
        self.withheld.get_or_create(&PatternLabels { pattern: pattern.to_string() }).inc();
    }

    /// The count of answers withheld for a pattern (tests).
    pub fn withheld_for(&self, pattern: &str) -> u64 {
        self.withheld.get_or_create(&PatternLabels { pattern: pattern.to_string() }).get()
    }

    /// The count for a verdict (tests and readiness).
    pub fn decisions_for(&self, verdict: &str) -> u64 {
        self.decisions.get_or_create(&VerdictLabels { verdict: verdict.to_string() }).get()
    }
}
