//! Broker metrics. Labels are fixed result classes: never a caller, a
//! role, a tool or a store name.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of the request counter and latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `issued`, `reused`, or an error class.
    pub result: String,
}

/// Counters and histograms of the broker.
#[derive(Clone)]
pub struct BrokerMetrics {
    requests: Family<ResultLabels, Counter>,
    latency: Family<ResultLabels, Histogram, fn() -> Histogram>,
    /// Roles dropped by the reaper.
    pub reaped: Counter,
    /// Roles ended by revocation (on demand or policy removal).
    pub revoked: Counter,
    /// Warm logins held, over every store.
    pub warm_logins: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
}

impl BrokerMetrics {
    /// Registers the metrics under `mcpwarden_broker_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = BrokerMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            reaped: Counter::default(),
            revoked: Counter::default(),
            warm_logins: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("mcpwarden_broker");
        r.register("credential_requests", "Credential requests by result", metrics.requests.clone());
        r.register("credential_seconds", "Time to answer a credential request", metrics.latency.clone());
        r.register("roles_reaped", "Expired login roles dropped by the reaper", metrics.reaped.clone());
        r.register("roles_revoked", "Login roles ended by revocation", metrics.revoked.clone());
        r.register("warm_logins", "Roles made ahead of demand, not yet issued", metrics.warm_logins.clone());
        metrics
    }

    /// Counts one request: `Ok(reused)` or the error class.
    pub fn issue(&self, took: Duration, result: Result<bool, &'static str>) {
        let result = match result {
            Ok(true) => "reused",
            Ok(false) => "issued",
            Err(class) => class,
        };
        let labels = ResultLabels { result: result.to_string() };
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(took.as_secs_f64());
    }
}
