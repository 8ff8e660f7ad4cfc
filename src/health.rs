//! `/healthz`, `/readyz` and `/metrics` on their own port, for the
//! operator and the sidecar alike (never on a public port).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Readiness: Ok, or why not.
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the probes report.
pub struct Health {
    /// Decides `/readyz`.
    pub ready: ReadinessCheck,
    /// The metrics registry.
    pub registry: Registry,
}

impl Health {
    /// Health whose readiness follows a flag.
    pub fn with_flag(flag: Arc<AtomicBool>, registry: Registry) -> Self {
        Health {
            ready: Box::new(
                move || if flag.load(Ordering::Relaxed) { Ok(()) } else { Err("caches not synced".into()) },
            ),
            registry,
        }
    }
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    crate::http_server::serve(crate::net::no_delay(listener), app, shutdown).await
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match (health.ready)() {
        Ok(()) => (StatusCode::OK, "ready".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &health.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new()),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{addr}{path}")).await.expect("request");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("mcpwarden_operator_reconciles", "Reconciliations started", counter.clone());
        counter.inc();
        let flag = Arc::new(AtomicBool::new(false));
        let health = Arc::new(Health::with_flag(Arc::clone(&flag), registry));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = Arc::clone(&stop);
        let server = tokio::spawn(serve(listener, Arc::clone(&health), async move { stopped.notified().await }));
        assert_eq!(get(addr, "/healthz").await, (200, "ok".into()));
        assert_eq!(get(addr, "/readyz").await.0, 503);
        flag.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(text.contains("mcpwarden_operator_reconciles_total 1"), "{text}");
        stop.notify_one();
        server.await.expect("task");
    }
}
