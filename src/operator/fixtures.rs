//! A mock API server for controller tests (the kube-rs controller-rs idea):
//! each expected request is a chainable step that asserts method and path
//! (and lets the test inspect the body), answers as a real API server did,
//! and is recorded. After the reconcile, any further request fails the test.
//!
//! The answers and the cached objects come from `tests/k8s-recordings/`:
//! what a real kube-apiserver answered to this operator's requests, in its
//! shapes (LIST items of built-in kinds without apiVersion/kind, managed
//! fields per manager, defaults, Status bodies). The scenario is the
//! recorded one: MCPServer `patient-lookup` in namespace `rec-ssa`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::caches::fill;
use super::context::Context;
use super::jwks::{JwksError, JwksSource};
use crate::api::MCPServer;
use crate::leader::Leadership;
use crate::render::Settings;

pub const NS: &str = "rec-ssa";
pub const SERVICE_ACCOUNTS: &str = "/api/v1/namespaces/rec-ssa/serviceaccounts";
pub const CONFIG_MAPS: &str = "/api/v1/namespaces/rec-ssa/configmaps";
pub const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/namespaces/rec-ssa/networkpolicies";
pub const SERVICES: &str = "/api/v1/namespaces/rec-ssa/services";
pub const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/rec-ssa/deployments";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/rec-ssa/events";
pub const SERVER: &str = "/apis/mcpwarden.io/v1alpha1/namespaces/rec-ssa/mcpservers/patient-lookup";

/// The recorded owned objects: (file stem, collection, name), in apply order.
pub const OWNED: [(&str, &str, &str); 7] = [
    ("serviceaccount-patient-lookup-mcpw", SERVICE_ACCOUNTS, "patient-lookup-mcpw"),
    ("configmap-patient-lookup-policy", CONFIG_MAPS, "patient-lookup-policy"),
    ("configmap-patient-lookup-jwks", CONFIG_MAPS, "patient-lookup-jwks"),
    ("networkpolicy-patient-lookup-ingress", NETWORK_POLICIES, "patient-lookup-ingress"),
    ("networkpolicy-patient-lookup-egress", NETWORK_POLICIES, "patient-lookup-egress"),
    ("service-patient-lookup", SERVICES, "patient-lookup"),
    ("deployment-patient-lookup", DEPLOYMENTS, "patient-lookup"),
];

/// A recorded exchange's body.
pub fn recording(file: &str) -> Value {
    let path = format!("{}/tests/k8s-recordings/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    // The applied Deployment, what the server answered and stored: as
    // today's render makes it.
    if file.starts_with("01-apply/ssa-") && file.contains("deployment-") {
        with_sidecar_binary(&mut value);
    }
    value
}

/// The MCPServer as the real API server returned it (finalizer held, no
/// status written yet).
pub fn recorded_server() -> MCPServer {
    let mut server = recording("03-get/get-mcpserver-patient-lookup.json");
    server.as_object_mut().map(|o| o.remove("status"));
    serde_json::from_value(server).expect("the recorded MCPServer")
}

/// The PHIStore as the real API server returned it, with the
/// classification the recording predates: its MCPServer's PHI tool is
/// `Deidentified` (the default of `tools[].output`), which needs every
/// column it reads classified.
pub fn recorded_store() -> Value {
    let mut store = recording("03-get/get-phistore-ehr.json");
    store["spec"]["deidentification"] = json!({
        "entities": [{"name": "patient", "prefix": "pt", "key": {"table": "public.patients", "column": "id"}}],
        "tables": [{"name": "public.patients", "columns": [
            {"name": "id", "class": "Identifier", "entity": "patient"},
            {"name": "mrn", "class": "Identifier", "entity": "patient", "keyColumn": "id"},
            {"name": "given_name", "class": "Identifier", "entity": "patient", "keyColumn": "id"},
            {"name": "family_name", "class": "Identifier", "entity": "patient", "keyColumn": "id"},
            {"name": "birth_date", "class": "Quasi", "generalize": "BirthYear"}
        ]}]
    });
    store
}

/// The owned objects as the real API server stored them after the
/// operator's apply (the answers to the identical second apply).
pub fn stored_owned() -> Vec<Value> {
    OWNED.iter().map(|(stem, _, _)| recording(&format!("01-apply/ssa-again-{stem}.response.json"))).collect()
}

/// The one change `render` made since the recording, applied to the
/// recorded Deployment (request, answers, stored form) as the API server
/// treats today's apply: the
/// sidecar's `command` is the sidecar-only binary and its `args` lose the
/// `sidecar` subcommand; the operator's Apply entry owns `command` too
/// (after a server-side apply the manager owns every field it applied).
fn with_sidecar_binary(deployment: &mut Value) {
    use crate::render::names::{SIDECAR_COMMAND, SIDECAR_CONTAINER};
    let containers = deployment.pointer_mut("/spec/template/spec/initContainers").and_then(Value::as_array_mut);
    for container in containers.into_iter().flatten().filter(|c| c["name"] == SIDECAR_CONTAINER) {
        container["command"] = json!([SIDECAR_COMMAND]);
        if let Some(args) = container["args"].as_array_mut()
            && args.first().is_some_and(|a| a == "sidecar")
        {
            args.remove(0);
        }
    }
    let entries = deployment.pointer_mut("/metadata/managedFields").and_then(Value::as_array_mut);
    for entry in entries.into_iter().flatten().filter(|e| e["manager"] == "mcp-warden" && e["operation"] == "Apply") {
        let key = format!("k:{{\"name\":\"{SIDECAR_CONTAINER}\"}}");
        let owned =
            entry.pointer_mut("/fieldsV1/f:spec/f:template/f:spec/f:initContainers").and_then(|c| c.get_mut(&key));
        if let Some(Value::Object(fields)) = owned {
            fields.insert("f:command".into(), json!({}));
        }
    }
}

/// What the operator applied for each owned object, as recorded.
pub fn recorded_request(stem: &str) -> Value {
    recording(&format!("01-apply/ssa-{stem}.request.json"))
}

/// A JWKS source answering from memory.
pub struct FakeJwks(pub Result<String, JwksError>);

impl JwksSource for FakeJwks {
    fn fetch<'a>(&'a self, _uri: &'a str) -> BoxFuture<'a, Result<String, JwksError>> {
        let answer = self.0.clone();
        Box::pin(async move { answer })
    }
}

/// What the issuer's JWKS URI answered in the recorded world: nothing (the
/// recorded objects are `render`'s, made without fetching keys, so the
/// jwks ConfigMap carries no data).
pub fn recorded_jwks() -> Result<String, JwksError> {
    Err(JwksError::Fetch("the recording fetched no keys".into()))
}

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

/// A client of a fresh mock API server (default namespace `clinic`), and
/// the server's expectations: for tests of other API users (broker, token
/// review).
pub fn mock_client() -> (Client, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "clinic"), Verifier { handle, steps: Vec::new() })
}

/// A valid public JWKS.
pub const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"k1","n":"AQAB","e":"AQAB"}]}"#;

/// A collector health source answering from memory.
pub struct FakeCollector(pub Result<super::collector::Health, String>);

impl super::collector::CollectorHealthSource for FakeCollector {
    fn health(&self) -> BoxFuture<'_, Result<super::collector::Health, String>> {
        let answer = self.0.clone();
        Box::pin(async move { answer })
    }
}

/// What a scenario starts from.
pub struct World {
    /// Objects in the caches, any kind (routed by `kind`, then stored as a
    /// LIST would hand them over).
    pub cached: Vec<Value>,
    /// What the issuer's JWKS URI answers.
    pub jwks: Result<String, JwksError>,
    /// The audit collector's answer, if one is configured.
    pub collector: Option<Result<super::collector::Health, String>>,
    /// Whether this replica leads.
    pub leading: bool,
}

impl World {
    /// The recorded PHIStore cached, keys served, leading.
    pub fn new(cached: Vec<Value>) -> Self {
        let mut all = vec![recorded_store()];
        all.extend(cached);
        World { cached: all, jwks: recorded_jwks(), collector: None, leading: true }
    }

    /// A test context over a fresh mock API server.
    pub fn context(self) -> (Arc<Context>, Verifier) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NS);
        let mut registry = Registry::default();
        let leadership = if self.leading { Leadership::standalone() } else { Leadership::elected() };
        let mut ctx = Context::new(
            client,
            fill::caches(&self.cached),
            leadership,
            Settings::default(),
            Arc::new(FakeJwks(self.jwks)),
            &mut registry,
            Duration::from_secs(300),
            None,
        );
        if let Some(health) = self.collector {
            ctx = ctx.with_collector(Arc::new(FakeCollector(health)));
        }
        (Arc::new(ctx), Verifier { handle, steps: Vec::new() })
    }
}

/// `object` with `patch` merged in (RFC 7386), a new resourceVersion.
fn answered(mut object: Value, patch: &Value, version: &str) -> Value {
    json_patch::merge(&mut object, patch);
    object["metadata"]["resourceVersion"] = json!(version);
    object
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

    /// A server-side apply of the recorded object `stem` at `collection`,
    /// answered as the real API server answered it: the recorded creation
    /// (201) when the object is new, else the stored object with the applied
    /// fields.
    pub fn apply(self, collection: &str, name: &str, creates: bool) -> Self {
        let stem = OWNED.iter().find(|(_, c, n)| *c == collection && *n == name).map(|(s, _, _)| *s);
        let path = format!("{collection}/{name}");
        self.expect(Method::PATCH, &path, move |req| {
            assert!(req.query.contains("fieldManager=mcp-warden"), "{}", req.query);
            assert!(req.query.contains("force=true"), "{}", req.query);
            let stem = stem.expect("a recorded object");
            if creates {
                // The recorded creation, holding what this request sent
                // (the recorder's hash differs; keys, when fetched, are
                // data the recorder had not), owned as the server records.
                let created = recording(&format!("01-apply/ssa-{stem}.response.json"));
                let version = created["metadata"]["resourceVersion"].as_str().unwrap_or("1").to_string();
                let mut stored = answered(created, &req.body, &version);
                if let Some(data) = req.body.get("data").and_then(Value::as_object) {
                    let keys: serde_json::Map<String, Value> =
                        data.keys().map(|k| (format!("f:{k}"), json!({}))).collect();
                    if let Some(entry) = stored["metadata"]["managedFields"]
                        .as_array_mut()
                        .and_then(|m| m.iter_mut().find(|e| e["manager"] == "mcp-warden"))
                    {
                        entry["fieldsV1"]["f:data"] = Value::Object(keys);
                    }
                }
                (StatusCode::CREATED, stored)
            } else {
                let stored = recording(&format!("01-apply/ssa-again-{stem}.response.json"));
                (StatusCode::OK, answered(stored, &req.body, "99999"))
            }
        })
    }

    /// Server-side applies of every object the recorded server owns, each
    /// creating it.
    pub fn apply_all_owned(mut self) -> Self {
        for (_, collection, name) in OWNED {
            self = self.apply(collection, name, true);
        }
        self
    }

    /// A deletion of `name` at `collection` (no finalizer: a Status).
    pub fn delete(self, collection: &str, name: &str) -> Self {
        self.expect(Method::DELETE, &format!("{collection}/{name}"), |_| {
            (StatusCode::OK, recording("04-watch/d7-delete-deployment-no-finalizer.response.json"))
        })
    }

    /// `n` events, answered as the real server answered the operator's.
    pub fn events(mut self, n: usize) -> Self {
        for _ in 0..n {
            self = self.expect(Method::POST, EVENTS, |req| {
                assert!(req.body.get("eventTime").is_some(), "an event without eventTime is refused (422)");
                (
                    StatusCode::CREATED,
                    answered(recording("07-events/create-event-eventsv1.response.json"), &req.body, "9028"),
                )
            });
        }
        self
    }

    /// The status apply, answered with the whole server carrying it.
    pub fn status_patch(self, server: &MCPServer) -> Self {
        let server = serde_json::to_value(server).expect("server");
        self.expect(Method::PATCH, &format!("{SERVER}/status"), move |req| {
            assert!(req.query.contains("fieldManager=mcp-warden"), "{}", req.query);
            assert_eq!(req.body["kind"], "MCPServer", "a status apply names its kind");
            let mut answer = server;
            answer["status"] = req.body["status"].clone();
            answer["metadata"]["resourceVersion"] = json!("99999");
            (StatusCode::OK, answer)
        })
    }

    /// The finalizer JSON patch, answered with `server` after it.
    pub fn finalizer_patch(self, op: &'static str, answer: Value) -> Self {
        self.expect(Method::PATCH, SERVER, move |req| {
            assert!(req.query.is_empty() || !req.query.contains("fieldManager"), "{}", req.query);
            let ops = req.body.as_array().expect("a JSON patch");
            assert!(ops.iter().any(|o| o["op"] == op), "{ops:?}");
            (StatusCode::OK, answer)
        })
    }

    /// A failing request, with the real server's Status body.
    pub fn fail(self, method: Method, path: &str, code: u16) -> Self {
        self.expect(method, path, move |_| {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "injected failure", "reason": "InternalError", "code": code}))
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

/// Bodies of the owned-object applies among `seen`.
pub fn applied_objects(seen: &[Recorded]) -> Vec<Value> {
    seen.iter()
        .filter(|r| r.method == Method::PATCH && !r.path.ends_with("/status") && !r.path.contains("/mcpservers/"))
        .map(|r| r.body.clone())
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

/// Whether `seen` holds any write (anything but a GET).
pub fn writes(seen: &[Recorded]) -> Vec<String> {
    seen.iter().filter(|r| r.method != Method::GET).map(|r| format!("{} {}", r.method, r.path)).collect()
}
