//! Database proxy metrics. Labels are fixed classes (refusal classes,
//! statement outcomes): never a caller, a tool, a role, a store or SQL.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of the connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `accepted`, or the refusal class (`unknown_token`, `wrong_store`, …).
    pub result: String,
}

/// Label of the statement counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `error`, `refused`, `cancelled`.
    pub outcome: String,
}

/// Counters of one proxy.
#[derive(Clone, Default)]
pub struct ProxyMetrics {
    connections: Family<ResultLabels, Counter>,
    statements: Family<OutcomeLabels, Counter>,
    open: Gauge,
    refusals_unrecorded: Counter,
}

impl ProxyMetrics {
    /// Registers the metrics under `mcpwarden_db_proxy_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ProxyMetrics::default();
        let r = registry.sub_registry_with_prefix("mcpwarden_db_proxy");
        r.register("connections", "Client connections by result", metrics.connections.clone());
        r.register("statements", "Statements relayed, by outcome", metrics.statements.clone());
        r.register("open_connections", "Client connections being relayed", metrics.open.clone());
        r.register(
            "refusals_unrecorded",
            "Refused connections without a known call over the recording rate limit (counted, not recorded)",
            metrics.refusals_unrecorded.clone(),
        );
        metrics
    }

    /// Counts a connection's result (a class written in the code: labels
    /// never carry request text).
    pub fn connection(&self, result: &'static str) {
        self.connections.get_or_create(&ResultLabels { result: result.to_string() }).inc();
    }

    /// Counts a finished statement.
    pub fn statement(&self, outcome: &'static str) {
        self.statements.get_or_create(&OutcomeLabels { outcome: outcome.to_string() }).inc();
    }

    /// A relay started (`true`) or ended.
    pub fn relaying(&self, started: bool) {
        if started {
            self.open.inc();
        } else {
            self.open.dec();
        }
    }

    /// Counts a refusal that was not recorded.
    pub fn refusal_unrecorded(&self) {
        self.refusals_unrecorded.inc();
    }

    /// Connections being relayed now (tests).
    pub fn open_connections(&self) -> i64 {
        self.open.get()
    }

    /// The count for a connection result (tests).
    pub fn connections_for(&self, result: &str) -> u64 {
        self.connections.get_or_create(&ResultLabels { result: result.to_string() }).get()
    }
}
