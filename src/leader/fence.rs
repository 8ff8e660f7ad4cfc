//! The write fence: a tower layer under the operator's API client that
//! refuses every request other than a read while this process does not
//! hold the lease with time to spare, and counts what the operator asks of
//! the API server (by method only: no object name is a label).
//!
//! ```text
//!   reconcile ─▶ kube::Client ─▶ Fenced ─┬─ GET, or leader ─▶ API server
//!                                        └─ write, not leader ─▶ Err(NotLeader)
//! ```
//!
//! The check is made when the request is dispatched, so a reconcile that
//! started while leading cannot write after leadership lapsed; reconcile
//! also checks at its start, and this layer is what makes that hold for
//! every write path (applies, status, finalizers, events) at once.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Method, Request};
use tower::{BoxError, Layer, Service};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Leadership;

/// A write refused because this process does not lead.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: writes are fenced until this process holds the lease")]
pub struct NotLeader;

/// Label of the request counter: the HTTP method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// GET, POST, PUT, PATCH, DELETE.
    pub method: String,
}

/// Requests sent to the API server, and writes the fence refused.
#[derive(Clone, Default)]
pub struct RequestCounts {
    /// Sent, by method (watches and lists are GETs).
    pub sent: Family<MethodLabel, Counter>,
    /// Writes refused because this process did not lead.
    pub fenced: Counter,
}

impl RequestCounts {
    /// Counters registered under `mcpwarden_operator_api_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let counts = RequestCounts::default();
        let r = registry.sub_registry_with_prefix("mcpwarden_operator_api");
        r.register("requests", "Requests sent to the Kubernetes API server, by method", counts.sent.clone());
        r.register("writes_fenced", "Writes refused because this replica did not lead", counts.fenced.clone());
        counts
    }
}

/// Adds the fence to a service stack.
#[derive(Clone)]
pub struct FenceLayer {
    leadership: Leadership,
    counts: RequestCounts,
}

impl FenceLayer {
    /// A fence following `leadership`, counting into `counts`.
    pub fn new(leadership: Leadership, counts: RequestCounts) -> Self {
        FenceLayer { leadership, counts }
    }
}

impl<S> Layer<S> for FenceLayer {
    type Service = Fenced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fenced { inner, leadership: self.leadership.clone(), counts: self.counts.clone() }
    }
}

/// A service whose writes pass only while leading.
#[derive(Clone)]
pub struct Fenced<S> {
    inner: S,
    leadership: Leadership,
    counts: RequestCounts,
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

impl<S, B> Service<Request<B>> for Fenced<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !is_read(request.method()) && !self.leadership.is_leader() {
            self.counts.fenced.inc();
            return Box::pin(async { Err(Box::new(NotLeader) as BoxError) });
        }
        self.counts.sent.get_or_create(&MethodLabel { method: request.method().as_str().to_string() }).inc();
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tower::ServiceExt;

    async fn send(
        service: &mut Fenced<tower::util::BoxCloneService<Request<()>, u16, BoxError>>,
        method: Method,
    ) -> Result<u16, String> {
        let request = Request::builder().method(method).body(()).expect("request");
        service.ready().await.map_err(|e| e.to_string())?.call(request).await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn writes_pass_only_while_leading_and_reads_always() {
        let inner =
            tower::util::BoxCloneService::new(tower::service_fn(|_: Request<()>| async { Ok::<_, BoxError>(200u16) }));
        let leadership = Leadership::elected();
        let counts = RequestCounts::default();
        let mut fenced = FenceLayer::new(leadership.clone(), counts.clone()).layer(inner);
        assert_eq!(send(&mut fenced, Method::GET).await, Ok(200));
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let refused = send(&mut fenced, method).await.expect_err("fenced");
            assert!(refused.contains("not the leader"), "{refused}");
        }
        leadership.lead_until(Instant::now() + Duration::from_secs(5));
        assert_eq!(send(&mut fenced, Method::PATCH).await, Ok(200));
        leadership.lead_until(Instant::now());
        assert!(send(&mut fenced, Method::PATCH).await.is_err(), "a lapsed deadline fences");
        assert_eq!(counts.fenced.get(), 5);
        assert_eq!(counts.sent.get_or_create(&MethodLabel { method: "GET".into() }).get(), 1);
        assert_eq!(counts.sent.get_or_create(&MethodLabel { method: "PATCH".into() }).get(), 1);
    }
}
