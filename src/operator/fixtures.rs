//! A mock API server for controller tests (the kube-rs controller-rs idea):
//! each expected request is a chainable step that asserts method and path
//! (and lets the test inspect the body), answers as the API server would,
//! and is recorded. After the reconcile, any further request fails the test.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::context::Context;
use super::jwks::{JwksError, JwksSource};
use crate::render::Settings;

pub const NS: &str = "clinic";
pub const STORES: &str = "/apis/mcpwarden.io/v1alpha1/namespaces/clinic/phistores";
pub const SERVICE_ACCOUNTS: &str = "/api/v1/namespaces/clinic/serviceaccounts";
pub const CONFIG_MAPS: &str = "/api/v1/namespaces/clinic/configmaps";
pub const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/namespaces/clinic/networkpolicies";
pub const SERVICES: &str = "/api/v1/namespaces/clinic/services";
pub const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/clinic/deployments";
pub const PODS: &str = "/api/v1/namespaces/clinic/pods";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/clinic/events";
pub const SERVER: &str = "/apis/mcpwarden.io/v1alpha1/namespaces/clinic/mcpservers/patient-lookup";

/// A JWKS source answering from memory.
pub struct FakeJwks(pub Result<String, JwksError>);

impl JwksSource for FakeJwks {
    fn fetch<'a>(&'a self, _uri: &'a str) -> BoxFuture<'a, Result<String, JwksError>> {
        let answer = self.0.clone();
        Box::pin(async move { answer })
    }
}

/// A valid public JWKS.
pub const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"k1","n":"AQAB","e":"AQAB"}]}"#;

/// A request as the mock API server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

type Answer = Box<dyn FnOnce(&Recorded) -> (StatusCode, Value) + Send>;

struct Step {
    method: Method,
    path: String,
    answer: Answer,
}

/// The expected requests of one scenario, in order.
pub struct Verifier {
    handle: Handle<Request<Body>, Response<Body>>,
    steps: Vec<Step>,
}

/// A client of a fresh mock API server, and the server's expectations.
pub fn mock_client() -> (Client, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, NS), Verifier { handle, steps: Vec::new() })
}

/// A collector health source answering from memory.
pub struct FakeCollector(pub Result<super::collector::Health, String>);

impl super::collector::CollectorHealthSource for FakeCollector {
    fn health(&self) -> BoxFuture<'_, Result<super::collector::Health, String>> {
        let answer = self.0.clone();
        Box::pin(async move { answer })
    }
}

/// A test context whose audit collector answers `health`.
pub fn context_with_collector(
    jwks: Result<String, JwksError>,
    health: Result<super::collector::Health, String>,
) -> (Arc<Context>, Verifier) {
    let (ctx, verifier) = context(jwks);
    let ctx = Arc::try_unwrap(ctx).unwrap_or_else(|_| unreachable!("a fresh context has one owner"));
    (Arc::new(ctx.with_collector(Arc::new(FakeCollector(health)))), verifier)
}

/// A test context over the mock API server.
pub fn context(jwks: Result<String, JwksError>) -> (Arc<Context>, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let mut registry = Registry::default();
    let ctx = Context::new(
        client,
        Settings::default(),
        Arc::new(FakeJwks(jwks)),
        &mut registry,
        Duration::from_secs(300),
        None,
    );
    (Arc::new(ctx), Verifier { handle, steps: Vec::new() })
}

fn list_of(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
}

fn kind_of(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

impl Verifier {
    /// Expects `method path` and answers with `answer(request)`.
    pub fn expect(
        mut self,
        method: Method,
        path: &str,
        answer: impl FnOnce(&Recorded) -> (StatusCode, Value) + Send + 'static,
    ) -> Self {
        self.steps.push(Step { method, path: path.to_string(), answer: Box::new(answer) });
        self
    }

    /// A list answered with `items`.
    pub fn list(self, path: &str, items: Vec<Value>) -> Self {
        self.expect(Method::GET, path, move |_| (StatusCode::OK, list_of(items)))
    }

    /// The five lists of owned objects: each kind of `existing`, and every
    /// NetworkPolicy of `existing` plus `foreign_policies`.
    pub fn owned_lists(self, existing: &[Value], foreign_policies: &[Value]) -> Self {
        let of = |kind: &str| existing.iter().filter(|v| kind_of(v) == kind).cloned().collect::<Vec<_>>();
        let mut policies = of("NetworkPolicy");
        policies.extend(foreign_policies.iter().cloned());
        self.list(SERVICE_ACCOUNTS, of("ServiceAccount"))
            .list(CONFIG_MAPS, of("ConfigMap"))
            .list(NETWORK_POLICIES, policies)
            .list(SERVICES, of("Service"))
            .list(DEPLOYMENTS, of("Deployment"))
    }

    /// A server-side apply of `name` at `collection`, answered with the
    /// applied object as the API server would store it.
    pub fn apply(self, collection: &str, name: &str) -> Self {
        self.expect(Method::PATCH, &format!("{collection}/{name}"), |req| {
            assert!(req.query.contains("fieldManager=mcp-warden"), "{}", req.query);
            assert!(req.query.contains("force=true"), "{}", req.query);
            (StatusCode::OK, stored(req.body.clone()))
        })
    }

    /// Server-side applies of every object the clinic server owns, in apply
    /// order.
    pub fn apply_all_owned(self) -> Self {
        self.apply(SERVICE_ACCOUNTS, "patient-lookup-mcpw")
            .apply(CONFIG_MAPS, "patient-lookup-policy")
            .apply(CONFIG_MAPS, "patient-lookup-jwks")
            .apply(NETWORK_POLICIES, "patient-lookup-ingress")
            .apply(NETWORK_POLICIES, "patient-lookup-egress")
            .apply(SERVICES, "patient-lookup")
            .apply(DEPLOYMENTS, "patient-lookup")
    }

    /// A deletion of `name` at `collection`.
    pub fn delete(self, collection: &str, name: &str) -> Self {
        self.expect(Method::DELETE, &format!("{collection}/{name}"), |_| {
            (StatusCode::OK, json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}))
        })
    }

    /// `n` events, answered by echoing them.
    pub fn events(mut self, n: usize) -> Self {
        for _ in 0..n {
            self = self.expect(Method::POST, EVENTS, |req| (StatusCode::OK, req.body.clone()));
        }
        self
    }

    /// The status patch, answered with `server` carrying that status.
    pub fn status_patch(self, server: Value) -> Self {
        self.expect(Method::PATCH, &format!("{SERVER}/status"), move |req| {
            assert!(req.query.contains("fieldManager=mcp-warden"), "{}", req.query);
            let mut answer = server;
            answer["status"] = req.body["status"].clone();
            (StatusCode::OK, answer)
        })
    }

    /// A failing request.
    pub fn fail(self, method: Method, path: &str, code: u16) -> Self {
        self.expect(method, path, move |_| {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "message": "injected failure", "reason": "InternalError", "metadata": {}}))
        })
    }

    /// Serves the steps in a task; the result is every request seen.
    pub fn run(self) -> tokio::task::JoinHandle<Vec<Recorded>> {
        let Verifier { mut handle, steps } = self;
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for (i, step) in steps.into_iter().enumerate() {
                let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                    .await
                    .unwrap_or_else(|_| panic!("step {i}: expected {} {}, but no request came", step.method, step.path))
                    .unwrap_or_else(|| panic!("step {i}: client gone before {} {}", step.method, step.path));
                let recorded = record(request).await;
                assert_eq!(
                    (&recorded.method, recorded.path.as_str()),
                    (&step.method, step.path.as_str()),
                    "step {i}: unexpected request (query {})",
                    recorded.query
                );
                let (status, body) = (step.answer)(&recorded);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
                    .expect("response");
                send.send_response(response);
                seen.push(recorded);
            }
            // Nothing more may be asked.
            if let Ok(Some((request, _))) =
                tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
            {
                panic!("unexpected extra request: {} {}", request.method(), request.uri());
            }
            seen
        })
    }
}

async fn record(request: Request<Body>) -> Recorded {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Recorded { method, path, query, body }
}

/// An applied object as the API server returns and later lists it.
pub fn stored(mut object: Value) -> Value {
    object["metadata"]["uid"] = json!("00000000-0000-4000-8000-00000000beef");
    object["metadata"]["resourceVersion"] = json!("2");
    object["metadata"]["generation"] = json!(1);
    object
}

/// Bodies of the applies among `seen`, as stored objects.
pub fn applied_objects(seen: &[Recorded]) -> Vec<Value> {
    seen.iter()
        .filter(|r| r.method == Method::PATCH && !r.path.ends_with("/status") && !r.path.contains("/mcpservers/"))
        .map(|r| stored(r.body.clone()))
        .collect()
}

/// The status written among `seen`.
pub fn written_status(seen: &[Recorded]) -> Option<Value> {
    seen.iter().find(|r| r.path.ends_with("/status")).map(|r| r.body["status"].clone())
}

/// The events' reasons among `seen`.
pub fn event_reasons(seen: &[Recorded]) -> Vec<String> {
    seen.iter()
        .filter(|r| r.path == EVENTS)
        .map(|r| r.body["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}
