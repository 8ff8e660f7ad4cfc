//! The sidecar gateway over real sockets: real RS256/ES256 JWTs, a JWKS
//! served over HTTP, the real WAL, and an upstream MCP endpoint that
//! records exactly what reaches it.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use futures::StreamExt;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use mcp_warden::audit::record::{Decision, Kind, OutcomeStatus, Record};
use mcp_warden::audit::segment;
use mcp_warden::audit::verify::{VerifyOptions, verify_dir};
use mcp_warden::sidecar::gateway::Gateway;
use serde_json::{Value, json};

/// What the upstream MCP endpoint received.
#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The exact bytes the endpoint answers `clinic_hours` with.
fn raw_hours(id: &Value) -> String {
    format!(
        "{{ \"result\": {{\"content\": [{{\"type\": \"text\", \"text\": \"ok\"}}]}},  \"jsonrpc\": \"2.0\", \"id\": {id} }}"
    )
}

/// The result the minimal MCP endpoint gives a request.
fn answer(request: &Value) -> Value {
    match request["method"].as_str() {
        Some("tools/list") => json!({"tools": [
            {"name": "lookup_patient", "inputSchema": {"type": "object", "properties": {"mrn": {"type": "string", "x-mcp-header": "Mrn"}}}},
            {"name": "clinic_hours", "inputSchema": {"type": "object"}},
            {"name": "undeclared_admin_tool", "inputSchema": {"type": "object"}}
        ]}),
        // `plant` makes the tool answer with that text (the scanner tests).
        Some("tools/call") => match request["params"]["arguments"]["plant"].as_str() {
            Some(planted) => json!({"content": [{"type": "text", "text": planted}]}),
            None => json!({"content": [{"type": "text", "text": "ok"}]}),
        },
        _ => json!({}),
    }
}

/// A list answer shaped to slip past a filter that reads it otherwise than
/// a client does; every one lists `undeclared_admin_tool`.
fn hostile_list(mode: &str, id: &Value) -> ([(&'static str, &'static str); 1], String) {
    let list = json!({"jsonrpc": "2.0", "id": id, "result": answer(&json!({"method": "tools/list"}))}).to_string();
    // A lone surrogate escape: serde_json refuses it, JSON.parse takes it.
    let surrogate = list.replacen("\"inputSchema\"", "\"description\":\"\\ud800\",\"inputSchema\"", 1);
    match mode {
        "surrogate-json" => ([("content-type", "application/json")], surrogate),
        "surrogate-sse" => ([("content-type", "text/event-stream")], format!("data: {surrogate}\n\n")),
        "crlf-sse" => ([("content-type", "text/event-stream")], format!("event: message\r\ndata: {list}\r\n\r\n")),
        "cr-sse" => ([("content-type", "text/event-stream")], format!("data: {list}\r\rdata: {list}\r\r")),
        "unended-sse" => ([("content-type", "text/event-stream")], format!("data: {list}\n")),
        "array-sse" => ([("content-type", "text/event-stream")], format!("data: [{list}]\n\n")),
        "array-json" => ([("content-type", "application/json")], format!("[{list}]")),
        _ => ([("content-type", "text/plain")], list),
    }
}

/// Lets the slow SSE answer's second event go.
static SLOW_SSE_RELEASE: std::sync::LazyLock<tokio::sync::Notify> = std::sync::LazyLock::new(tokio::sync::Notify::new);

/// An SSE answer written in two parts, as a long tool's is: a progress
/// event now, the result once the test releases it.
fn slow_sse(id: &Value) -> ([(&'static str, &'static str); 1], axum::body::Body) {
    let progress =
        json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}});
    let result = json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "ok"}]}});
    let events = futures::stream::once(async move { Ok::<_, std::io::Error>(format!("data: {progress}\n\n")) }).chain(
        futures::stream::once(async move {
            SLOW_SSE_RELEASE.notified().await;
            Ok(format!("data: {result}\n\n"))
        }),
    );
    ([("content-type", "text/event-stream")], axum::body::Body::from_stream(events))
}

/// A minimal MCP endpoint: answers by method, records everything.
async fn upstream(log: Log) -> String {
    let app = Router::new().route(
        "/mcp",
        post(move |headers: HeaderMap, body: Bytes| {
            let log = Arc::clone(&log);
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if let Value::Array(items) = &body {
                    // A batch: answer each element.
                    let answers: Vec<Value> = items
                        .iter()
                        .map(|item| {
                            log.lock().expect("log").push(Seen { headers: headers.clone(), body: item.clone() });
                            json!({"jsonrpc": "2.0", "id": item["id"], "result": answer(item)})
                        })
                        .collect();
                    return ([("content-type", "application/json")], Value::Array(answers).to_string()).into_response();
                }
                log.lock().expect("log").push(Seen { headers: headers.clone(), body: body.clone() });
                let id = body["id"].clone();
                if let Some(mode) = headers.get("x-test-hostile-list").and_then(|v| v.to_str().ok()) {
                    return hostile_list(mode, &id).into_response();
                }
                if headers.get("x-test-made-up-tools").is_some() {
                    // A thousand names never listed before, in every answer.
                    let mut list = answer(&body);
                    let tools = list["tools"].as_array_mut().expect("tools");
                    for i in 0..1000 {
                        tools.push(json!({"name": format!("made-up-{id}-{i}"), "inputSchema": {"type": "object"}}));
                    }
                    let reply = json!({"jsonrpc": "2.0", "id": id, "result": list});
                    return ([("content-type", "application/json")], reply.to_string()).into_response();
                }
                if headers.get("x-test-slow-sse").is_some() {
                    return slow_sse(&body["id"]).into_response();
                }
                if body["params"]["name"] == "clinic_hours" && headers.get("x-test-sse").is_none() {
                    // Hand-written bytes, to show they come back untouched.
                    return ([("content-type", "application/json")], raw_hours(&id)).into_response();
                }
                let result = answer(&body);
                let reply = json!({"jsonrpc": "2.0", "id": id, "result": result});
                let mut response = if headers.get("x-test-sse").is_some() {
                    let sse = format!("event: message\ndata: {}\n\n", reply);
                    ([("content-type", "text/event-stream")], sse).into_response()
                } else {
                    ([("content-type", "application/json")], reply.to_string()).into_response()
                };
                if body["method"] == "initialize" {
                    response.headers_mut().insert("mcp-session-id", "upstream-session-1".parse().expect("header"));
                }
                response
            }
        }),
    );
    serve(app).await
}

struct Sidecar {
    url: String,
    log: Log,
    gateway: Arc<Gateway>,
    audit: tempfile::TempDir,
    http: reqwest::Client,
}

async fn sidecar_with(wal_bytes: u64) -> Sidecar {
    let log: Log = Arc::default();
    let upstream_base = upstream(Arc::clone(&log)).await;
    let Harness { url, gateway, audit } = start_gateway(&format!("{upstream_base}/mcp"), wal_bytes).await;
    Sidecar { url, log, gateway, audit, http: reqwest::Client::new() }
}

async fn sidecar() -> Sidecar {
    sidecar_with(64 * 1024 * 1024).await
}

fn rpc(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

impl Sidecar {
    async fn post(&self, token: Option<&str>, body: &Value, extra: &[(&str, &str)]) -> (StatusCode, HeaderMap, Value) {
        let mut request =
            self.http.post(format!("{}/mcp", self.url)).header("accept", "application/json, text/event-stream");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        let response = request.json(body).send().await.expect("request");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let value = if headers
            .get("content-type")
            .is_some_and(|c| c.to_str().unwrap_or_default().starts_with("text/event-stream"))
        {
            text.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null)
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        (status, headers, value)
    }

    fn upstream_calls(&self, tool: &str) -> usize {
        self.log.lock().expect("log").iter().filter(|s| s.body["params"]["name"] == tool).count()
    }

    fn records(&self) -> Vec<Record> {
        segment::list_segments(self.audit.path())
            .expect("segments")
            .iter()
            .flat_map(|(_, p)| segment::read_lines(p).expect("lines"))
            .map(|l| Record::parse_line(&l.bytes).expect("record"))
            .collect()
    }
}

fn tool_names(result: &Value) -> Vec<String> {
    result["result"]["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn callers_in_different_groups_see_and_call_different_tools() {
    let s = sidecar().await;
    let front_desk = rs256(&claims("alice", &["front-desk"]));
    let billing = es256(&claims("bob", &["billing"]));
    let list = rpc(1, "tools/list", json!({}));
    let (status, _, alice_tools) = s.post(Some(&front_desk), &list, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tool_names(&alice_tools), ["lookup_patient", "clinic_hours"]);
    let (_, _, bob_tools) = s.post(Some(&billing), &list, &[]).await;
    assert_eq!(tool_names(&bob_tools), ["clinic_hours"]);
    assert_eq!(bob_tools["result"]["cacheScope"], "private");
    // The same filtering on an SSE response.
    let (_, headers, bob_sse) = s.post(Some(&billing), &list, &[("x-test-sse", "1")]).await;
    assert!(headers["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"));
    assert_eq!(tool_names(&bob_sse), ["clinic_hours"]);

    // A hidden tool is refused with the error of a nonexistent one; the
    // server never receives it.
    let call = |tool: &str| rpc(7, "tools/call", json!({"name": tool, "arguments": {"mrn": "12345678"}}));
    let (status, _, hidden) = s.post(Some(&billing), &call("lookup_patient"), &[]).await;
    let (_, _, absent) = s.post(Some(&billing), &call("no_such_tool"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hidden["error"]["code"], -32602);
    assert_eq!(hidden["error"]["message"], "Unknown tool: lookup_patient");
    assert_eq!(absent["error"]["message"], "Unknown tool: no_such_tool");
    assert_eq!(s.upstream_calls("lookup_patient"), 0);
    let (_, _, allowed) = s.post(Some(&front_desk), &call("lookup_patient"), &[]).await;
    assert_eq!(allowed["result"]["content"][0]["text"], "ok");
    // Unfiltered answers pass through byte for byte (key order included).
    let raw = s
        .http
        .post(format!("{}/mcp", s.url))
        .bearer_auth(&front_desk)
        .json(&call("clinic_hours"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert_eq!(raw, raw_hours(&json!(7)));
    assert_eq!(s.upstream_calls("lookup_patient"), 1);
    // The PHI tool got a per-call DSN to the proxy for its store, and
    // nothing else about the database; the tool without dataAccess none.
    let seen = s.log.lock().expect("log").clone();
    let meta = |tool: &str| {
        seen.iter().find(|x| x.body["params"]["name"] == tool).expect("seen").body["params"]["_meta"].clone()
    };
    let db = meta("lookup_patient")["io.mcpwarden/db"].clone();
    let dsn = db["ehr"].as_str().expect("a DSN for ehr");
    assert!(dsn.starts_with("postgres://mcp:") && dsn.ends_with("@127.0.0.1:9/ehr?sslmode=disable"), "{dsn}");
    assert_eq!(db.as_object().map(|o| o.len()), Some(1));
    assert!(
        !dsn.contains("never-used") && !dsn.contains("mcpw_u_fake"),
        "the role's password and name stay in the sidecar"
    );
    assert!(meta("clinic_hours").get("io.mcpwarden/db").is_none());
}

#[tokio::test]
async fn the_server_gets_the_verified_caller_and_never_the_token() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let body = rpc(
        3,
        "tools/call",
        json!({
            "name": "clinic_hours",
            "arguments": {},
            "_meta": {"io.mcpwarden/caller": {"sub": "admin"}, "io.mcpwarden/db": {"ehr": "postgres://x"}, "progressToken": 1}
        }),
    );
    let (_, answer_headers, _) = s.post(Some(&token), &body, &[("cookie", "session=abc")]).await;
    let seen = s.log.lock().expect("log").last().cloned().expect("forwarded");
    assert!(seen.headers.get("authorization").is_none(), "token forwarded");
    assert!(seen.headers.get("cookie").is_none());
    let meta = &seen.body["params"]["_meta"];
    assert_eq!(meta["io.mcpwarden/caller"]["sub"], "alice");
    assert_eq!(meta["io.mcpwarden/caller"]["groups"], json!(["front-desk"]));
    assert!(meta.get("io.mcpwarden/db").is_none());
    assert_eq!(meta["progressToken"], 1);
    // The answer names the call's correlation id, the one its records carry.
    let correlation = meta["io.mcpwarden/correlation"].as_str().expect("correlation").to_string();
    assert_eq!(answer_headers["mcp-warden-correlation"].to_str().unwrap(), correlation);
    let records = s.records();
    assert!(
        records.iter().any(|r| r.event.kind == Kind::Decision && r.event.correlation.as_deref() == Some(&correlation))
    );
}

#[tokio::test]
async fn a_grant_from_the_broker_opens_its_tool_to_its_beneficiary_on_the_record() {
    let s = sidecar().await;
    let er_doc = rs256(&claims("er-doc", &[]));
    let stranger = rs256(&claims("stranger", &[]));
    let list = rpc(1, "tools/list", json!({}));
    let (_, _, listed) = s.post(Some(&er_doc), &list, &[]).await;
    assert_eq!(tool_names(&listed), ["lookup_patient", "clinic_hours"], "the granted tool is listed");
    let (_, _, listed) = s.post(Some(&stranger), &list, &[]).await;
    assert_eq!(tool_names(&listed), ["clinic_hours"]);
    let call = rpc(2, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": "12345678"}}));
    let (_, _, refused) = s.post(Some(&stranger), &call, &[]).await;
    assert_eq!(refused["error"]["message"], "Unknown tool: lookup_patient");
    let (_, _, answered) = s.post(Some(&er_doc), &call, &[]).await;
    assert_eq!(answered["result"]["content"][0]["text"], "ok");
    assert_eq!(s.upstream_calls("lookup_patient"), 1, "only the beneficiary's call reached the server");
    // Its decision and its outcome name the grant; nothing else does.
    let records = s.records();
    let under: Vec<&Record> = records.iter().filter(|r| r.event.emergency_access.is_some()).collect();
    let kinds: Vec<Kind> = under.iter().map(|r| r.event.kind).collect();
    assert_eq!(kinds, [Kind::Decision, Kind::Outcome], "{under:?}");
    assert!(under.iter().all(|r| r.event.emergency_access.as_deref() == Some(common::FAKE_GRANT)));
    assert_eq!(under[0].event.correlation, under[1].event.correlation);
    assert_eq!(under[0].event.caller.as_ref().map(|c| c.sub.as_str()), Some("er-doc"));
}

#[tokio::test]
async fn every_call_has_one_decision_and_one_outcome_before_and_after() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    for id in 0..5 {
        let call =
            rpc(id, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": format!("1234567{id}")}}));
        s.post(Some(&token), &call, &[]).await;
    }
    let records = s.records();
    let decisions: Vec<&Record> = records.iter().filter(|r| r.event.kind == Kind::Decision).collect();
    let outcomes: Vec<&Record> = records.iter().filter(|r| r.event.kind == Kind::Outcome).collect();
    assert_eq!(decisions.len(), 5);
    assert_eq!(outcomes.len(), 5);
    for d in &decisions {
        assert_eq!(d.event.decision, Some(Decision::Allow));
        assert_eq!(d.event.phi, Some(true));
        assert_eq!(d.event.caller.as_ref().map(|c| c.sub.as_str()), Some("alice"));
        assert!(d.event.args_hmac.as_ref().is_some_and(|h| h.len() == 64));
        let outcome = outcomes.iter().find(|o| o.event.correlation == d.event.correlation).expect("outcome");
        assert!(outcome.seq > d.seq, "the decision precedes its outcome");
    }
    let text: String = segment::list_segments(s.audit.path())
        .expect("segments")
        .iter()
        .map(|(_, p)| std::fs::read_to_string(p).expect("read"))
        .collect();
    assert!(!text.contains("12345670") && !text.contains(&token[..20]), "arguments or token in the trail");
    assert!(verify_dir(s.audit.path(), VerifyOptions::default()).passed());
}

#[tokio::test]
async fn hostile_requests_get_the_right_status_and_leave_a_record() {
    let s = sidecar().await;
    let good = rs256(&claims("alice", &["front-desk"]));
    let list = rpc(1, "tools/list", json!({}));
    let expired = rs256(&{
        let mut c = claims("alice", &["front-desk"]);
        c["exp"] = json!(now() - 600);
        c
    });
    let early = rs256(&{
        let mut c = claims("alice", &["front-desk"]);
        c["nbf"] = json!(now() + 600);
        c
    });
    let wrong_iss = rs256(&{
        let mut c = claims("alice", &[]);
        c["iss"] = json!("https://evil.example");
        c
    });
    let wrong_aud = rs256(&{
        let mut c = claims("alice", &[]);
        c["aud"] = json!("https://other.example/mcp");
        c
    });
    let unknown_kid = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rotated-away".into());
        encode(&header, &claims("alice", &[]), &EncodingKey::from_rsa_pem(RSA_KEY).expect("key")).expect("sign")
    };
    let alg_none = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","kid":"test-rsa"}"#),
            b64.encode(claims("alice", &[]).to_string())
        )
    };
    let hs256 = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("test-rsa".into());
        encode(&header, &claims("alice", &[]), &EncodingKey::from_secret(RSA_PUBLIC)).expect("sign")
    };
    for (token, why) in [
        (None, "no token"),
        (Some(expired), "expired"),
        (Some(early), "not yet valid"),
        (Some(wrong_iss), "wrong issuer"),
        (Some(wrong_aud), "wrong audience"),
        (Some(unknown_kid), "unknown signing key"),
        (Some(alg_none), "unsupported algorithm"),
        (Some(hs256), "algorithm does not match the key"),
    ] {
        let (status, headers, body) = s.post(token.as_deref(), &list, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}");
        let challenge = headers["www-authenticate"].to_str().expect("ascii");
        assert!(
            challenge.contains(
                r#"resource_metadata="https://patient-lookup.clinic.example/.well-known/oauth-protected-resource/mcp""#
            ),
            "{challenge}"
        );
        assert_eq!(challenge.contains("invalid_token"), token.is_some(), "{why}: {challenge}");
        assert!(body["error"]["message"].as_str().is_some(), "{why}");
    }
    // Token in the query string.
    let response = s
        .http
        .post(format!("{}/mcp?access_token={good}", s.url))
        .bearer_auth(&good)
        .json(&list)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 400);

    // Transport and body abuse, authenticated.
    let stateless =
        [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "clinic_hours")];
    let call = rpc(2, "tools/call", json!({"name": "lookup_patient"}));
    let (status, _, body) = s.post(Some(&good), &call, &stateless).await;
    assert_eq!((status, body["error"]["code"].as_i64()), (StatusCode::BAD_REQUEST, Some(-32020)));
    let raw = |body: &'static str| {
        s.http
            .post(format!("{}/mcp", s.url))
            .bearer_auth(&good)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = raw("{not json").await.expect("send");
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(response.json::<Value>().await.expect("json")["error"]["code"], -32700);
    assert_eq!(raw(r#"{"id":1,"method":"tools/list"}"#).await.expect("send").status().as_u16(), 400);
    let huge = vec![b'x'; 10 * 1024 * 1024];
    let response = s
        .http
        .post(format!("{}/mcp", s.url))
        .bearer_auth(&good)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 413);
    let (status, _, _) =
        s.post(Some(&good), &json!([rpc(1, "ping", json!({}))]), &[("mcp-protocol-version", "2025-11-25")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "batches exist only in 2025-03-26");

    // Sessions are bound to their caller.
    let (_, headers, _) =
        s.post(Some(&good), &rpc(9, "initialize", json!({})), &[("mcp-protocol-version", "2025-11-25")]).await;
    let session = headers["mcp-session-id"].to_str().expect("session").to_string();
    assert!(session.starts_with("upstream-session-1."), "{session}");
    let bob = rs256(&claims("bob", &["front-desk"]));
    let (status, _, _) =
        s.post(Some(&bob), &list, &[("mcp-protocol-version", "2025-11-25"), ("mcp-session-id", &session)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another caller's session");
    let (status, _, _) =
        s.post(Some(&good), &list, &[("mcp-protocol-version", "2025-11-25"), ("mcp-session-id", &session)]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = s.log.lock().expect("log").last().cloned().expect("forwarded");
    assert_eq!(seen.headers["mcp-session-id"], "upstream-session-1", "the server sees its own id");

    // Host and Origin (DNS rebinding).
    let response = s
        .http
        .post(format!("{}/mcp", s.url))
        .bearer_auth(&good)
        .header("origin", "https://evil.example")
        .json(&list)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 403);
    let response = s
        .http
        .post(format!("{}/mcp", s.url))
        .bearer_auth(&good)
        .header("host", "evil.example")
        .json(&list)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 403);

    // Every refusal left a decision record, Host and Origin ones included.
    let records = s.records();
    for why in ["origin not allowed", "host not allowed"] {
        assert!(records.iter().any(|r| r.event.reason.as_deref() == Some(why)), "no record of: {why}");
    }
    let refusals = records
        .iter()
        .filter(|r| matches!(r.event.decision, Some(Decision::AuthnFailure) | Some(Decision::Deny)))
        .count();
    // 8 bad tokens, 1 query-string token, 5 transport/body refusals, 1 foreign
    // session, 1 Origin, 1 Host.
    let expected = 17;
    assert!(refusals >= expected, "{refusals} refusal records");
    assert!(verify_dir(s.audit.path(), VerifyOptions::default()).passed());
    let forwarded_hidden = s.upstream_calls("lookup_patient");
    assert_eq!(forwarded_hidden, 0, "nothing refused reached the server");
}

#[tokio::test]
async fn a_phi_call_is_refused_when_its_record_cannot_be_written() {
    // A WAL bound small enough to fill after a few records.
    let s = sidecar_with(4 * 1024).await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let call = rpc(1, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": "12345678"}}));
    let mut refused = None;
    for _ in 0..40 {
        let (status, _, body) = s.post(Some(&token), &call, &[]).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(body);
            break;
        }
    }
    let body = refused.expect("the WAL filled and the call was refused");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("audit trail cannot record"));
    assert!(s.gateway.metrics.decisions_for("refused_audit") >= 1);
    assert!(s.gateway.readiness().is_err(), "readiness reports it");
    let forwarded = s.upstream_calls("lookup_patient");
    let allowed_records = s.records().iter().filter(|r| r.event.decision == Some(Decision::Allow)).count();
    assert_eq!(forwarded, allowed_records, "every forwarded call has its decision record");
}

#[tokio::test]
async fn protected_resource_metadata_is_served_at_both_well_known_urls() {
    let s = sidecar().await;
    for path in ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"] {
        let response = s.http.get(format!("{}{path}", s.url)).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["resource"], AUDIENCE);
        assert_eq!(body["authorization_servers"], json!([ISSUER]));
        assert_eq!(body["scopes_supported"], json!(["mcp:tools"]));
    }
}

/// A child process killed on drop, so a failing assertion never leaves it running.
/// The sidecar binary in front of `upstream_base`, files in `dir`, ready.
async fn spawn_sidecar(dir: &std::path::Path, upstream_base: &str, extra: &[String]) -> (Reap, u16, u16) {
    use std::process::{Command, Stdio};
    std::fs::write(dir.join("jwks.json"), JWKS).expect("jwks");
    std::fs::write(dir.join("clinic.yaml"), CLINIC).expect("clinic");
    std::fs::write(dir.join("audit.key"), "k".repeat(64)).expect("key");
    std::fs::write(dir.join("broker.cred"), FAKE_BROKER_CREDENTIAL).expect("broker credential");
    let broker = fake_broker().await;
    let (port, metrics_port) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
        .args(["sidecar", "--mcpserver"])
        .arg(dir.join("clinic.yaml"))
        .args(["--upstream", &format!("{upstream_base}/mcp"), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}"), "--jwks-file"])
        .arg(dir.join("jwks.json"))
        .arg("--audit-dir")
        .arg(dir.join("audit"))
        .arg("--args-key-file")
        .arg(dir.join("audit.key"))
        .args(["--allowed-host", "127.0.0.1", "--pod", "p-1"])
        .args(["--broker", &broker, "--db-proxy-listen", "127.0.0.1:0", "--broker-credential-file"])
        .arg(dir.join("broker.cred"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sidecar");
    let child = Reap(child);
    wait_ready(&format!("http://127.0.0.1:{metrics_port}/readyz")).await;
    (child, port, metrics_port)
}

async fn wait_ready(url: &str) {
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "never ready: {url}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the exit status (within 30 s).
async fn terminate(child: &mut Reap) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "the process did not stop within 30 s of SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The real binary: ready only once it can serve, metrics on the private
/// port only, and SIGTERM drains and seals the audit stream.
#[tokio::test]
async fn the_sidecar_process_serves_reports_and_shuts_down_cleanly() {
    let log: Log = Arc::default();
    let upstream_base = upstream(Arc::clone(&log)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, port, metrics_port) = spawn_sidecar(dir.path(), &upstream_base, &[]).await;
    let http = reqwest::Client::new();
    let token = rs256(&claims("alice", &["front-desk"]));
    let call = rpc(1, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": "12345678"}}));
    let response =
        http.post(format!("http://127.0.0.1:{port}/mcp")).bearer_auth(&token).json(&call).send().await.expect("call");
    assert_eq!(response.status().as_u16(), 200);
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains(r#"mcpwarden_sidecar_decisions_total{verdict="allow"} 1"#), "{metrics}");
    // The database proxy is up (with --broker) and reports on the same port.
    assert!(metrics.contains("mcpwarden_db_proxy_open_connections 0"), "{metrics}");
    assert!(!metrics.contains("alice") && !metrics.contains("lookup_patient"), "identities or tools in metric labels");
    // Metrics and health are not served on the public port.
    let public = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.expect("public");
    assert_eq!(public.status().as_u16(), 404);
    // SIGTERM: drain, seal the stream, exit 0.
    let status = terminate(&mut child).await;
    assert!(status.success(), "{status}");
    let report = verify_dir(&dir.path().join("audit"), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
    assert_eq!(report.streams[0].records, 4, "start, decision, outcome, end");
}

/// The collector binary on `port`, storing under `dir/collected`, accepting.
async fn spawn_collector(dir: &std::path::Path, port: u16) -> Reap {
    spawn_collector_limited(dir, port, None).await
}

/// Like [`spawn_collector`], with files limited to `max_file_bytes`
/// (RLIMIT_FSIZE): a full disk, as the process sees it.
async fn spawn_collector_limited(dir: &std::path::Path, port: u16, max_file_bytes: Option<u64>) -> Reap {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-warden"));
    if let Some(limit) = max_file_bytes {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A write past the limit fails with EFBIG instead of killing the process.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let child = command
        .args(["audit-collector", "--data-dir"])
        .arg(dir.join("collected"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--sender-credential-file"])
        .arg(dir.join("sender.cred"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the collector");
    let child = Reap(child);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return child;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the collector did not start");
}

/// The sidecar's flags to ship to the collector on `port` (credential in `dir`).
fn shipping_flags(dir: &std::path::Path, port: u16) -> Vec<String> {
    let cred = dir.join("sender.cred");
    if !cred.exists() {
        std::fs::write(&cred, "collector-sender-credential-0123456789").expect("cred");
    }
    vec![
        "--collector".into(),
        format!("http://127.0.0.1:{port}"),
        "--collector-credential-file".into(),
        cred.to_str().expect("utf8").into(),
    ]
}

/// Decisions and outcomes per correlation id in stored records.
fn calls_on_record(dir: &std::path::Path) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let mut decisions = HashMap::<String, usize>::new();
    let mut outcomes = HashMap::<String, usize>::new();
    for r in mcp_warden::audit::query::read_records(dir).records {
        let key = r.event.correlation.clone().unwrap_or_default();
        match r.event.kind {
            Kind::Decision => *decisions.entry(key).or_default() += 1,
            Kind::Outcome => *outcomes.entry(key).or_default() += 1,
            _ => {}
        }
    }
    (decisions, outcomes)
}

/// Real processes end to end: gateway → WAL → shipper → collector →
/// verify PASS, each call exactly one decision and one outcome, and the
/// WAL released behind the collector.
#[tokio::test]
async fn the_sidecar_ships_its_sealed_trail_to_a_collector_process() {
    let log: Log = Arc::default();
    let upstream_base = upstream(Arc::clone(&log)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let collector_port = free_port();
    let extra = shipping_flags(dir.path(), collector_port);
    let mut collector = spawn_collector(dir.path(), collector_port).await;
    let (mut sidecar, port, _) = spawn_sidecar(dir.path(), &upstream_base, &extra).await;
    let http = reqwest::Client::new();
    let token = rs256(&claims("alice", &["front-desk"]));
    let calls = 20;
    for i in 0..calls {
        let call = rpc(i, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": format!("{i:08}")}}));
        let response = http
            .post(format!("http://127.0.0.1:{port}/mcp"))
            .bearer_auth(&token)
            .json(&call)
            .send()
            .await
            .expect("call");
        assert_eq!(response.status().as_u16(), 200);
    }
    assert!(terminate(&mut sidecar).await.success());
    assert!(terminate(&mut collector).await.success());

    let collected = dir.path().join("collected/streams");
    let report = verify_dir(&collected, VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
    let (decisions, outcomes) = calls_on_record(&collected);
    assert_eq!(decisions.len(), calls as usize, "one decision per call");
    assert!(decisions.values().all(|n| *n == 1), "no decision twice");
    assert!(outcomes.iter().all(|(k, n)| *n == 1 && decisions.contains_key(k)), "at most one outcome, matched");
    assert_eq!(outcomes.len(), calls as usize);
}

#[tokio::test]
async fn a_changed_policy_file_takes_effect_and_a_bad_one_is_refused() {
    let s = sidecar().await;
    let billing = rs256(&claims("bob", &["billing"]));
    let list = rpc(1, "tools/list", json!({}));
    let (_, _, before) = s.post(Some(&billing), &list, &[]).await;
    assert_eq!(tool_names(&before), ["clinic_hours"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.json");
    let mut policy = (*s.gateway.policy()).clone();
    std::fs::write(&file, serde_json::to_string(&policy).expect("json")).expect("write");
    tokio::spawn(mcp_warden::sidecar::watch_policy(
        file.clone(),
        Arc::downgrade(&s.gateway),
        std::time::Duration::from_millis(20),
    ));
    // Billing is granted lookup_patient.
    policy.tools.get_mut("lookup_patient").expect("tool").callers.groups.insert("billing".into());
    std::fs::write(&file, serde_json::to_string(&policy).expect("json")).expect("write");
    let started = std::time::Instant::now();
    loop {
        let (_, _, after) = s.post(Some(&billing), &list, &[]).await;
        if tool_names(&after) == ["lookup_patient", "clinic_hours"] {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the new policy never took effect");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A policy for another server is refused; the current one stays.
    let mut foreign = policy.clone();
    foreign.server.name = "other".into();
    foreign.tools.clear();
    std::fs::write(&file, serde_json::to_string(&foreign).expect("json")).expect("write");
    std::fs::write(dir.path().join("garbage"), "x").expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (_, _, still) = s.post(Some(&billing), &list, &[]).await;
    assert_eq!(tool_names(&still), ["lookup_patient", "clinic_hours"]);
    std::fs::write(&file, "{not json").expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(s.gateway.policy().server.name, "patient-lookup");
}

#[tokio::test]
async fn a_server_listing_new_names_in_every_answer_does_not_grow_the_sidecar() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    for id in 0..20 {
        let (status, _, body) =
            s.post(Some(&token), &rpc(id, "tools/list", json!({})), &[("x-test-made-up-tools", "1")]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(!tool_names(&body["result"]).iter().any(|n| n.starts_with("made-up")), "an undeclared tool was listed");
    }
    // 20,000 names listed; only the declared tools the server listed are kept.
    assert_eq!(s.gateway.remembered_tools(), 2);
}

#[tokio::test]
async fn mirrored_parameter_headers_must_match_the_arguments() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    // The sidecar learns the tool's x-mcp-header annotations from tools/list.
    s.post(Some(&token), &rpc(1, "tools/list", json!({})), &[]).await;
    let call = rpc(2, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": "12345678"}}));
    let base = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "lookup_patient")];
    let with = |mrn: &'static str| {
        let mut h: Vec<(&str, &str)> = base.to_vec();
        h.push(("mcp-param-mrn", mrn));
        h
    };
    let (status, _, body) = s.post(Some(&token), &call, &with("87654321")).await;
    assert_eq!((status, body["error"]["code"].as_i64()), (StatusCode::BAD_REQUEST, Some(-32020)));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("87654321") && !message.contains("12345678"), "a header value leaked: {message}");
    let (status, _, _) = s.post(Some(&token), &call, &base).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the mirrored header is required");
    let (status, _, body) = s.post(Some(&token), &call, &with("12345678")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(s.upstream_calls("lookup_patient"), 1, "only the consistent call reached the server");
}

#[tokio::test]
async fn a_2025_03_26_batch_is_authorized_element_by_element() {
    let s = sidecar().await;
    let billing = rs256(&claims("bob", &["billing"]));
    let batch = json!([
        rpc(1, "tools/list", json!({})),
        rpc(2, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": "12345678"}})),
        rpc(3, "tools/call", json!({"name": "clinic_hours", "arguments": {}})),
        {"jsonrpc": "2.0", "method": "notifications/initialized"}
    ]);
    let (status, _, body) = s.post(Some(&billing), &batch, &[("mcp-protocol-version", "2025-03-26")]).await;
    assert_eq!(status, StatusCode::OK);
    let answers = body.as_array().expect("a batch answer");
    let by_id = |id: u64| {
        answers.iter().find(|a| a["id"] == id).cloned().unwrap_or_else(|| panic!("no answer for {id}: {body}"))
    };
    assert_eq!(tool_names(&by_id(1)), ["clinic_hours"], "the list inside a batch is filtered too");
    assert_eq!(by_id(2)["error"]["message"], "Unknown tool: lookup_patient");
    assert_eq!(by_id(3)["result"]["content"][0]["text"], "ok");
    assert_eq!(s.upstream_calls("lookup_patient"), 0, "the refused element never reached the server");
    assert_eq!(s.upstream_calls("clinic_hours"), 1);
    let decisions = s.records().into_iter().filter(|r| r.event.kind == Kind::Decision).count();
    assert_eq!(decisions, 4, "one decision per element");
    // All refused: answered here, nothing forwarded.
    let before = s.log.lock().expect("log").len();
    let refused = json!([rpc(5, "tools/call", json!({"name": "lookup_patient"})), rpc(6, "admin/shutdown", json!({}))]);
    let (status, _, body) = s.post(Some(&billing), &refused, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(2));
    assert_eq!(s.log.lock().expect("log").len(), before);
}

#[tokio::test]
async fn names_a_client_makes_up_reach_the_trail_only_as_keyed_hmacs() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    // Attacker-chosen text in the places the policy does not know.
    s.post(Some(&token), &rpc(1, "tools/call", json!({"name": "patient-98765432"})), &[]).await;
    s.post(Some(&token), &rpc(2, "ehr/98765432", json!({})), &[]).await;
    s.post(Some(&token), &rpc(3, "prompts/get", json!({"name": "98765432"})), &[]).await;
    let trail: String = segment::list_segments(s.audit.path())
        .expect("segments")
        .iter()
        .map(|(_, p)| std::fs::read_to_string(p).expect("read"))
        .collect();
    assert!(!trail.contains("98765432"), "client text reached the trail");
    let denials: Vec<Record> = s.records().into_iter().filter(|r| r.event.decision == Some(Decision::Deny)).collect();
    assert_eq!(denials.len(), 3);
    assert!(denials[0].event.tool.as_deref().is_some_and(|t| t.starts_with("hmac:")));
    assert!(denials[1].event.method.as_deref().is_some_and(|m| m.starts_with("hmac:")));
    assert!(denials[2].event.tool.as_deref().is_some_and(|t| t.starts_with("hmac:")));
    // A policy tool's name is recorded as it is.
    let billing = rs256(&claims("bob", &["billing"]));
    s.post(Some(&billing), &rpc(4, "tools/call", json!({"name": "lookup_patient"})), &[]).await;
    let hidden = s.records().into_iter().rfind(|r| r.event.decision == Some(Decision::Deny)).expect("record");
    assert_eq!(hidden.event.tool.as_deref(), Some("lookup_patient"));
}

#[tokio::test]
async fn an_unreachable_server_still_closes_every_forwarded_call_with_an_outcome() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let h = start_gateway(&format!("http://127.0.0.1:{port}/mcp"), 64 * 1024 * 1024).await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let http = reqwest::Client::new();
    let single = rpc(1, "tools/call", json!({"name": "clinic_hours"}));
    let batch = json!([rpc(2, "tools/call", json!({"name": "clinic_hours"})), rpc(3, "ping", json!({}))]);
    for body in [single, batch] {
        let response = http.post(format!("{}/mcp", h.url)).bearer_auth(&token).json(&body).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 502);
    }
    let read = || -> Vec<Record> {
        segment::list_segments(h.audit.path())
            .expect("segments")
            .iter()
            .flat_map(|(_, p)| segment::read_lines(p).expect("lines"))
            .map(|l| Record::parse_line(&l.bytes).expect("record"))
            .collect()
    };
    // Outcome records are deferred: they join the next group commit, or
    // are written on their own within the WAL's defer window.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut records = read();
    while records.iter().filter(|r| r.event.kind == Kind::Outcome).count() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        records = read();
    }
    let allowed: Vec<&Record> = records.iter().filter(|r| r.event.decision == Some(Decision::Allow)).collect();
    assert_eq!(allowed.len(), 3);
    for decision in allowed {
        let outcome = records
            .iter()
            .find(|r| r.event.kind == Kind::Outcome && r.event.correlation == decision.event.correlation)
            .unwrap_or_else(|| panic!("no outcome for {:?}", decision.event.correlation));
        assert_eq!(outcome.event.outcome.as_ref().and_then(|o| o.http_status), Some(502));
    }
}

/// An SSE answer still being written is relayed as it arrives: the client
/// reads the progress event while the MCP server has not finished (the
/// sidecar gives a whole answer one write, but never waits for one). An
/// answer already whole goes back whole. Both end Ok on the record.
#[tokio::test]
async fn an_sse_answer_still_being_written_is_relayed_as_it_arrives() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let call = rpc(3, "tools/call", json!({"name": "clinic_hours", "arguments": {}}));
    let mut response = s
        .http
        .post(format!("{}/mcp", s.url))
        .header("accept", "application/json, text/event-stream")
        .header("x-test-slow-sse", "1")
        .bearer_auth(&token)
        .json(&call)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), response.chunk())
        .await
        .expect("the progress event arrives while the server is still writing")
        .expect("read")
        .expect("a chunk");
    assert!(String::from_utf8_lossy(&first).contains("notifications/progress"));
    SLOW_SSE_RELEASE.notify_one();
    let rest = response.text().await.expect("the rest");
    assert!(rest.contains(r#""id":3"#), "{rest}");

    let (status, headers, whole) =
        s.post(Some(&token), &rpc(4, "tools/call", json!({"name": "clinic_hours"})), &[("x-test-sse", "1")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"));
    assert_eq!(whole["id"], 4);
    assert_eq!(whole["result"]["content"][0]["text"], "ok");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let outcomes = loop {
        let outcomes: Vec<Record> = s.records().into_iter().filter(|r| r.event.kind == Kind::Outcome).collect();
        if outcomes.len() >= 2 || std::time::Instant::now() > deadline {
            break outcomes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let statuses: Vec<_> = outcomes.iter().filter_map(|r| r.event.outcome.as_ref().map(|o| o.status)).collect();
    assert_eq!(statuses, [OutcomeStatus::Ok, OutcomeStatus::Ok]);
}

/// Faults with nothing lost: the collector SIGKILLed and restarted while
/// calls go on, then the sidecar SIGKILLed and restarted over the same WAL.
/// Every call is on the record exactly once at the collector, verifiably.
#[tokio::test]
async fn nothing_is_lost_when_the_collector_or_the_sidecar_is_killed() {
    let log: Log = Arc::default();
    let upstream_base = upstream(Arc::clone(&log)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let collector_port = free_port();
    let extra = shipping_flags(dir.path(), collector_port);
    let mut collector = spawn_collector(dir.path(), collector_port).await;
    let http = reqwest::Client::new();
    let token = rs256(&claims("alice", &["front-desk"]));
    let call = |port: u16, i: u64| {
        let body = rpc(i, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": format!("{i:08}")}}));
        http.post(format!("http://127.0.0.1:{port}/mcp")).bearer_auth(&token).json(&body).send()
    };
    let (mut sidecar, port, _) = spawn_sidecar(dir.path(), &upstream_base, &extra).await;
    let mut answered = 0;
    for i in 0..20 {
        if i == 8 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(collector.0.id() as i32, libc::SIGKILL) };
            let _ = collector.0.wait();
        }
        if i == 14 {
            collector = spawn_collector(dir.path(), collector_port).await;
        }
        // The WAL absorbs the outage: calls go on.
        assert_eq!(call(port, i).await.expect("call").status().as_u16(), 200);
        answered += 1;
    }
    // SIGKILL the sidecar (mid-shipping, whatever it was doing) and start it
    // again over the same WAL directory.
    unsafe { libc::kill(sidecar.0.id() as i32, libc::SIGKILL) };
    let _ = sidecar.0.wait();
    let (mut sidecar, port, _) = spawn_sidecar(dir.path(), &upstream_base, &extra).await;
    for i in 20..30 {
        assert_eq!(call(port, i).await.expect("call").status().as_u16(), 200);
        answered += 1;
    }
    assert!(terminate(&mut sidecar).await.success());
    assert!(terminate(&mut collector).await.success());

    let collected = dir.path().join("collected/streams");
    let report = verify_dir(&collected, VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
    assert_eq!(report.streams.len(), 1, "one stream, resumed across the restart");
    assert!(report.streams[0].restarts >= 1, "the restart is on the record");
    let (decisions, outcomes) = calls_on_record(&collected);
    assert_eq!(decisions.len(), answered, "every call on the record");
    assert!(decisions.values().all(|n| *n == 1), "none twice");
    assert!(outcomes.iter().all(|(k, n)| *n == 1 && decisions.contains_key(k)));
    assert_eq!(outcomes.len(), answered, "each answered call has its outcome");
}

/// The collector's disk fills: batches are refused with a clear error
/// (nothing partial stored), the sidecar keeps its WAL and backs off, and
/// once the collector has room again everything arrives, once.
#[tokio::test]
async fn a_full_collector_disk_loses_nothing() {
    let log: Log = Arc::default();
    let upstream_base = upstream(Arc::clone(&log)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let collector_port = free_port();
    let extra = shipping_flags(dir.path(), collector_port);
    // Room for a few records per file only.
    let mut collector = spawn_collector_limited(dir.path(), collector_port, Some(6 * 1024)).await;
    let (mut sidecar, port, _) = spawn_sidecar(dir.path(), &upstream_base, &extra).await;
    let http = reqwest::Client::new();
    let token = rs256(&claims("alice", &["front-desk"]));
    let calls = 30;
    for i in 0..calls {
        let body = rpc(i, "tools/call", json!({"name": "lookup_patient", "arguments": {"mrn": format!("{i:08}")}}));
        let r = http.post(format!("http://127.0.0.1:{port}/mcp")).bearer_auth(&token).json(&body).send().await;
        assert_eq!(r.expect("call").status().as_u16(), 200, "the WAL absorbs the collector's full disk");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let collected = dir.path().join("collected/streams");
    let partial = verify_dir(&collected, VerifyOptions::default());
    assert!(partial.passed(), "what was stored is whole: {}", partial.to_table());
    let (stored, _) = calls_on_record(&collected);
    assert!(stored.len() < calls as usize, "the limit was hit ({} of {calls} stored)", stored.len());
    // Room again: a collector without the limit over the same storage.
    assert!(terminate(&mut collector).await.success());
    let mut collector = spawn_collector(dir.path(), collector_port).await;
    assert!(terminate(&mut sidecar).await.success());
    assert!(terminate(&mut collector).await.success());
    let report = verify_dir(&collected, VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
    let (decisions, outcomes) = calls_on_record(&collected);
    assert_eq!(decisions.len(), calls as usize);
    assert!(decisions.values().all(|n| *n == 1) && outcomes.values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_de_identified_answer_holding_an_identifier_is_withheld_and_recorded_without_it() {
    let s = sidecar().await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let call = |id: u64, planted: &str| {
        rpc(id, "tools/call", json!({"name": "lookup_patient", "arguments": {"patient": "pt_0", "plant": planted}}))
    };
    // The example data passes: pseudonyms, years, diagnoses.
    let clean = r#"[{"patient": "pt_0a1b2c3d4e5f60718293", "birthYear": "1970", "diagnosis": "influenza"}]"#;
    let (_, _, passed) = s.post(Some(&token), &call(1, clean), &[]).await;
    assert_eq!(passed["result"]["content"][0]["text"], clean);
    // Planted identifiers, in JSON and in SSE, are withheld.
    let planted = [
        ("SSN 123-45-6789", "ssn", &[][..]),
        (r#"{"contact": "joe.doe@example.org"}"#, "email", &[][..]),
        ("seen on 2024-03-04", "fullDate", &[("x-test-sse", "1")][..]),
    ];
    for (i, (text, pattern, headers)) in planted.iter().enumerate() {
        let (status, _, answer) = s.post(Some(&token), &call(10 + i as u64, text), headers).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["error"]["code"], -32000, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("identifier shape ({pattern})")), "{message}");
        assert!(!answer.to_string().contains(text.split(' ').next_back().unwrap_or(text)), "{answer}");
        assert_eq!(s.gateway.metrics.withheld_for(pattern), 1);
    }
    // A batch: the element with the planted value is withheld, the other
    // passes.
    let batch = json!([call(20, "123-45-6789"), call(21, clean)]);
    let (_, _, answers) = s.post(Some(&token), &batch, &[]).await;
    let by_id = |id: u64| answers.as_array().unwrap().iter().find(|a| a["id"] == id).cloned().unwrap();
    assert!(by_id(20)["error"]["message"].as_str().unwrap_or_default().contains("(ssn)"));
    assert_eq!(by_id(21)["result"]["content"][0]["text"], clean);
    // On the record: refused, with the pattern and the place, never the
    // value. (The batch's outcomes are deferred: made durable within the
    // WAL's window.)
    let refused = |r: &&Record| {
        r.event.kind == Kind::Outcome && r.event.outcome.as_ref().is_some_and(|o| o.status == OutcomeStatus::Refused)
    };
    let mut trail = s.records();
    for _ in 0..100 {
        if trail.iter().filter(refused).count() == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        trail = s.records();
    }
    let withheld: Vec<_> = trail.iter().filter(refused).collect();
    assert_eq!(withheld.len(), 4, "{trail:#?}");
    let reasons: Vec<&str> = withheld.iter().filter_map(|r| r.event.reason.as_deref()).collect();
    assert!(reasons.contains(&"identifier_shape ssn at /result/content/0/text"), "{reasons:?}");
    assert!(reasons.contains(&"identifier_shape email at /result/content/0/text/~json/#0"), "{reasons:?}");
    let text = format!("{trail:?}");
    for value in ["123-45-6789", "joe.doe@example.org", "2024-03-04", "contact"] {
        assert!(!text.contains(value), "{value} reached the trail");
    }
}

#[tokio::test]
async fn a_batch_of_phi_calls_is_answered_only_once_its_outcomes_are_on_disk() {
    // A WAL that fills after a few records: every answer released before
    // that has its outcome record durable; after it, nothing is released.
    let s = sidecar_with(4 * 1024).await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let call = |id: u64| rpc(id, "tools/call", json!({"name": "lookup_patient", "arguments": {"patient": "pt_0"}}));
    let mut released = 0;
    let mut withheld = false;
    for round in 0..40u64 {
        let (status, _, body) = s.post(Some(&token), &json!([call(2 * round), call(2 * round + 1)]), &[]).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            withheld = true;
            continue;
        }
        let answers = body.as_array().cloned().unwrap_or_default();
        let results = answers.iter().filter(|a| a.get("result").is_some()).count();
        assert!(!withheld || results == 0, "a result was released after the trail failed: {body}");
        released += results;
    }
    assert!(released > 0 && s.gateway.readiness().is_err(), "the WAL filled after some answers");
    let outcomes = s
        .records()
        .iter()
        .filter(|r| {
            r.event.kind == Kind::Outcome && r.event.outcome.as_ref().is_some_and(|o| o.status == OutcomeStatus::Ok)
        })
        .count();
    assert!(outcomes >= released, "{released} results released, {outcomes} outcomes on disk");
}

/// `lookup_patient` declares one argument, `mrn` (a string of at most 8),
/// and a rule that it is eight digits.
fn with_argument_rules(s: &Sidecar) {
    let mut policy = (*s.gateway.policy()).clone();
    let tool = policy.tools.get_mut("lookup_patient").expect("tool");
    tool.arguments = Some(vec![mcp_warden::policy::arguments::CompiledArgument {
        name: "mrn".into(),
        kind: mcp_warden::api::ArgumentType::String,
        required: true,
        max_length: Some(8),
        minimum: None,
        maximum: None,
    }]);
    tool.argument_rules = vec![mcp_warden::api::ArgumentRule {
        rule: "args.mrn.matches('^[0-9]{8}$')".into(),
        message: "an MRN is eight digits".into(),
    }];
    s.gateway.replace_policy(policy).expect("a policy with argument rules");
}

#[tokio::test]
async fn argument_rules_refuse_calls_before_the_server_sees_them_on_every_transport() {
    let s = sidecar().await;
    with_argument_rules(&s);
    let alice = rs256(&claims("alice", &["front-desk"]));
    let call = |id: u64, args: Value| rpc(id, "tools/call", json!({"name": "lookup_patient", "arguments": args}));
    let (status, _, ok) = s.post(Some(&alice), &call(1, json!({"mrn": "12345678"})), &[]).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert!(ok.get("error").is_none(), "{ok}");
    assert_eq!(s.upstream_calls("lookup_patient"), 1);

    // 2025-11-25 (the harness's default), one message at a time.
    for (args, said) in [
        (json!({"mrn": "MRN-0047"}), "argument rule failed: an MRN is eight digits"),
        (json!({"mrn": "123456789"}), "argument mrn is longer than 8 characters"),
        (json!({"mrn": 12345678}), "argument mrn must be a string"),
        (json!({}), "argument mrn is required"),
        (json!({"mrn": "12345678", "sql": "SELECT ssn FROM patients"}), "an argument that is not declared"),
    ] {
        let (status, _, refused) = s.post(Some(&alice), &call(2, args.clone()), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(refused["error"]["code"], -32602, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(message, format!("Invalid arguments for tool lookup_patient: {said}"));
        assert!(!message.contains("MRN-0047") && !message.contains("sql"), "a value or made-up name echoed: {message}");
    }
    assert_eq!(s.upstream_calls("lookup_patient"), 1, "no refused call reached the server");

    // 2026-07-28, stateless, with its headers.
    let headers =
        [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "lookup_patient")];
    let (_, _, refused) = s.post(Some(&alice), &call(3, json!({"mrn": "MRN-0047"})), &headers).await;
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    // 2025-03-26 batches: element by element.
    let batch = json!([call(4, json!({"mrn": "87654321"})), call(5, json!({"mrn": "x"}))]);
    let (_, _, answers) = s.post(Some(&alice), &batch, &[("mcp-protocol-version", "2025-03-26")]).await;
    let by_id = |id: u64| answers.as_array().unwrap().iter().find(|a| a["id"] == id).cloned().unwrap_or_default();
    assert!(by_id(4).get("error").is_none(), "{answers}");
    assert_eq!(by_id(5)["error"]["code"], -32602, "{answers}");
    assert_eq!(s.upstream_calls("lookup_patient"), 2, "only the batch's good element reached the server");

    // Each refusal is a decision record naming the rule or argument, never a value.
    let denials: Vec<String> = s
        .records()
        .into_iter()
        .filter(|r| r.event.kind == Kind::Decision && r.event.decision == Some(Decision::Deny))
        .filter_map(|r| r.event.reason)
        .collect();
    assert!(denials.iter().any(|r| r == "argument rule 0 false: an MRN is eight digits"), "{denials:?}");
    assert!(denials.iter().any(|r| r == "arguments: not declared"), "{denials:?}");
    assert!(denials.iter().all(|r| !r.contains("MRN-0047") && !r.contains("SELECT")), "{denials:?}");

    // A policy whose rule the sidecar would not run is refused; the one in force stays.
    let mut looping = (*s.gateway.policy()).clone();
    looping.tools.get_mut("lookup_patient").unwrap().argument_rules[0].rule = "args.all(k, k == 'mrn')".into();
    assert!(s.gateway.replace_policy(looping).unwrap_err().contains("comprehension"));
    assert_eq!(s.gateway.policy().tools["lookup_patient"].argument_rules[0].rule, "args.mrn.matches('^[0-9]{8}$')");
}

#[tokio::test]
async fn argument_rules_judge_a_claim_the_policy_names_and_refuse_tokens_without_it() {
    let s = sidecar().await;
    let mut policy = (*s.gateway.policy()).clone();
    // A rule reading a claim the policy does not name is refused outright.
    let mut unnamed = policy.clone();
    unnamed.tools.get_mut("lookup_patient").expect("tool").argument_rules = vec![mcp_warden::api::ArgumentRule {
        rule: "caller.claims.department == args.department".into(),
        message: "own department only".into(),
    }];
    assert!(s.gateway.replace_policy(unnamed.clone()).unwrap_err().contains("ruleClaims does not name"));
    policy.authentication.rule_claims = ["department".to_string()].into();
    policy.tools.get_mut("lookup_patient").expect("tool").argument_rules =
        unnamed.tools["lookup_patient"].argument_rules.clone();
    s.gateway.replace_policy(policy).expect("the claim is named");

    let token = |department: Option<Value>| {
        let mut c = claims("dana", &["front-desk"]);
        if let Some(d) = department {
            c["department"] = d;
        }
        rs256(&c)
    };
    let call = |id: u64, department: &str| {
        rpc(
            id,
            "tools/call",
            json!({"name": "lookup_patient", "arguments": {"mrn": "12345678", "department": department}}),
        )
    };
    let cardiology = token(Some(json!("cardiology")));
    let (_, _, ok) = s.post(Some(&cardiology), &call(1, "cardiology"), &[]).await;
    assert!(ok.get("error").is_none(), "{ok}");
    let (_, _, other) = s.post(Some(&cardiology), &call(2, "oncology"), &[]).await;
    assert_eq!(
        other["error"]["message"],
        "Invalid arguments for tool lookup_patient: argument rule failed: own department only"
    );
    // A token without the claim, or with a value the verifier does not pass
    // to rules (an object), is refused: the rule reads what is absent.
    for absent in [token(None), token(Some(json!({"name": "cardiology"})))] {
        let (_, _, refused) = s.post(Some(&absent), &call(3, "cardiology"), &[]).await;
        assert_eq!(refused["error"]["code"], -32602, "{refused}");
    }
    assert_eq!(
        s.upstream_calls("lookup_patient"),
        1,
        "only the call from the tool's own department reached the server"
    );
    let reasons: Vec<String> = s.records().into_iter().filter_map(|r| r.event.reason).collect();
    assert!(reasons.iter().any(|r| r == "argument rule 0 false: own department only"), "{reasons:?}");
    assert!(
        reasons.iter().all(|r| !r.contains("oncology") && !r.contains("cardiology")),
        "a value in the trail: {reasons:?}"
    );
}

#[tokio::test]
async fn a_listed_schema_that_differs_from_the_declaration_is_on_the_list_outcome_for_every_transport() {
    let s = sidecar().await;
    let alice = rs256(&claims("alice", &["front-desk"]));
    let list = |id: u64| rpc(id, "tools/list", json!({}));
    // The declaration matches what the server lists (`mrn`, a string).
    with_argument_rules(&s);
    let (_, _, agreeing) = s.post(Some(&alice), &list(1), &[]).await;
    assert!(agreeing.get("error").is_none(), "{agreeing}");
    // The reviewed declaration says `patient`; the server lists `mrn`.
    let mut policy = (*s.gateway.policy()).clone();
    let tool = policy.tools.get_mut("lookup_patient").expect("tool");
    tool.arguments.as_mut().expect("declared")[0].name = "patient".into();
    tool.argument_rules.clear();
    s.gateway.replace_policy(policy).expect("policy");
    let (_, _, json_list) = s.post(Some(&alice), &list(2), &[]).await;
    assert_eq!(tool_names(&json_list), ["lookup_patient", "clinic_hours"], "the list itself is unchanged");
    s.post(Some(&alice), &list(3), &[("x-test-sse", "1")]).await;
    let batch = json!([list(4), rpc(5, "ping", json!({}))]);
    s.post(Some(&alice), &batch, &[("mcp-protocol-version", "2025-03-26")]).await;

    let drift_of = |records: &[Record]| -> Vec<Option<Vec<String>>> {
        records.iter().filter_map(|r| r.event.schema_drift.as_ref()).map(|d| d.get("lookup_patient").cloned()).collect()
    };
    let mut records = s.records();
    for _ in 0..100 {
        if drift_of(&records).len() == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        records = s.records();
    }
    let expected =
        vec!["takes undeclared argument(s) \"mrn\"".to_string(), "does not list declared argument \"patient\"".into()];
    assert_eq!(drift_of(&records), [Some(vec![]), Some(expected.clone()), Some(expected.clone()), Some(expected)]);
    assert!(
        records.iter().filter(|r| r.event.schema_drift.is_some()).all(|r| r.event.kind == Kind::Outcome),
        "drift is on list outcomes only"
    );
    // Tools without declared arguments are not compared.
    assert!(records.iter().filter_map(|r| r.event.schema_drift.as_ref()).all(|d| d.len() == 1), "{records:?}");
}

#[tokio::test]
async fn a_list_answer_the_gateway_cannot_read_as_a_client_would_is_withheld_not_passed_whole() {
    let s = sidecar().await;
    let alice = rs256(&claims("alice", &["front-desk"]));
    let list = rpc(1, "tools/list", json!({}));
    let raw = |mode: &'static str| {
        let request = s
            .http
            .post(format!("{}/mcp", s.url))
            .header("accept", "application/json, text/event-stream")
            .bearer_auth(&alice)
            .header("x-test-hostile-list", mode)
            .json(&list);
        async move {
            let response = request.send().await.expect("request");
            (response.status().as_u16(), response.text().await.expect("body"))
        }
    };
    for mode in ["surrogate-json", "surrogate-sse", "cr-sse", "unended-sse", "array-sse", "array-json", "text-plain"] {
        let (status, body) = raw(mode).await;
        assert!(!body.contains("undeclared_admin_tool"), "{mode}: the whole list passed ({status}): {body}");
    }
    // Read as clients read them, CRLF events are filtered like LF ones.
    let (status, body) = raw("crlf-sse").await;
    assert_eq!(status, 200);
    assert!(body.contains("lookup_patient") && !body.contains("undeclared_admin_tool"), "{body}");
    let (status, body) = raw("surrogate-json").await;
    assert_eq!(status, 502);
    assert!(body.contains("could not be read, so it was withheld"), "{body}");
    // Every answer that lost something is on the record as the gateway's
    // refusal (-32000), not as a clean list: all but the two CR/CRLF ones.
    let refused = |records: &[Record]| {
        records
            .iter()
            .filter(|r| r.event.kind == Kind::Outcome)
            .filter(|r| r.event.outcome.as_ref().is_some_and(|o| o.rpc_error == Some(-32000)))
            .count()
    };
    let mut records = s.records();
    for _ in 0..100 {
        if refused(&records) >= 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        records = s.records();
    }
    assert_eq!(refused(&records), 7);
}
