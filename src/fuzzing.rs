//! Fuzz harness bodies: each takes the fuzzer's bytes, feeds a parser that
//! reads bytes from across a trust boundary, and panics only when a property
//! is broken. The `fuzz/` crate (its own workspace, nightly, `cargo fuzz`)
//! drives them; `tests/fuzz_corpus.rs` replays each target's committed
//! corpus through them on stable, so CI re-checks every input ever kept
//! (docs/fuzzing.md).
//!
//! | target | parser | property |
//! | --- | --- | --- |
//! | `dbproxy_first_packet` | a client's first packet (startup, SSL, GSS, cancel) | never panics |
//! | `statement_literals` | the statement normalizer | no literal's value survives, in every PostgreSQL literal form |
//! | `audit_record_line` | an audit record line (`audit verify`, the collector's intake) | never panics; what parses is canonical and round-trips |
//! | `gateway_messages` | a hostile `inputSchema`, SSE body and `Mcp-Param-*` header values | never panics; rewriting an SSE body without edits keeps its messages |
//! | `argument_rules` | an argument rule (`check`, the operator, the sidecar) and a caller's arguments | never panics or overflows a stack; a rule it accepts judges any arguments |
//! | `bearer_token` | a bearer token (the sidecar's and the broker's verifier) | no unsigned or forged token authenticates; hostile claims under a valid signature authenticate only when they are what the verifier requires |
//! | `gateway_authorization` | a JSON-RPC body (single or batch) from a caller | never panics; nothing is allowed that the policy does not allow this caller, arguments included; `_meta` carries only the verified caller |

// A harness reports a broken property by panicking (that is what the
// fuzzer catches), and its fixed inputs (the test issuer's key, the example
// policy) are part of the harness: failing to load them is a broken harness.
#![allow(clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use serde_json::Value;

/// A client's first packet, as the database proxy reads it from the MCP
/// server (the untrusted party).
pub fn dbproxy_first_packet(data: &[u8]) {
    let _ = crate::dbproxy::wire::parse_first_packet(data);
}

/// The canary planted in every literal of [`statement_literals`].
pub const CANARY: &str = "CANARYQX";
/// The numeric canary (a literal made of it must not survive either).
pub const NUMERIC_CANARY: &str = "7777777";

/// Fragments a statement is built from, chosen by the fuzzer's bytes: SQL
/// that opens nothing (no quote, no comment left open), and literals of
/// every PostgreSQL form, each holding a canary. Built this way the
/// fragments are literals to PostgreSQL too, so a canary in the output is
/// a value the trail would have kept.
const FRAGMENTS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "AND",
    "INSERT INTO t (a) VALUES",
    "COPY t FROM STDIN",
    "x",
    "patients.mrn",
    "\"quoted ident\"",
    "$1",
    "=",
    ",",
    "(",
    ")",
    ";",
    "::text",
    "||",
    "/* a comment */",
    "/* nested /* comment */ still */",
    "-- a line comment\n",
    // Literals, each holding a canary.
    "'CANARYQX'",
    "'it''s CANARYQX'",
    "E'CANARYQX\\'s'",
    "e'\\x41CANARYQX'",
    "$$CANARYQX$$",
    "$tag$ CANARYQX $ $tag$",
    "U&'CANARYQX\\0041'",
    "U&'CANARYQX!0041' UESCAPE '!'",
    "N'CANARYQX'",
    "date 'CANARYQX'",
    "interval 'CANARYQX'",
    "'CANARYQX'\n'continued CANARYQX'",
    "B'1010'",
    "X'CAFE'",
    "7777777",
    "7777777.5",
    ".7777777",
    "7777777e5",
    "1e7777777",
    "0x7777777",
];

/// The statement normalizer: a statement assembled from [`FRAGMENTS`] by
/// the fuzzer's bytes (space-separated, so no fragment runs into another)
/// must come out with no canary.
pub fn statement_literals(data: &[u8]) {
    let statement: Vec<&str> = data.iter().map(|b| FRAGMENTS[usize::from(*b) % FRAGMENTS.len()]).collect();
    let statement = statement.join(" ");
    let normalized = crate::dbproxy::normalize::normalize(&statement);
    assert!(
        !normalized.text.contains(CANARY) && !normalized.text.contains(NUMERIC_CANARY),
        "a literal survived normalization: {statement:?} -> {:?}",
        normalized.text
    );
}

/// An audit record line: whatever parses is canonical, and its line is
/// exactly the input.
pub fn audit_record_line(data: &[u8]) {
    if let Ok(record) = crate::audit::record::Record::parse_line(data) {
        assert_eq!(record.to_line(), data, "a parsed record's line differs from its input");
        let again = crate::audit::record::Record::parse_line(&record.to_line());
        assert!(again.is_ok_and(|r| r == record), "a record does not parse back to itself");
    }
}

/// What an MCP server (or a client) can make the gateway parse: a tool's
/// `inputSchema` (the mirrored-parameter cache), an SSE body (rewritten
/// for list filtering), `Mcp-Param-*` header values.
pub fn gateway_messages(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(schema) = serde_json::from_slice::<Value>(data) {
        let mirrored = crate::sidecar::messages::mirrored_params(&schema);
        let _ = crate::sidecar::messages::check_param_headers(
            &axum::http::HeaderMap::new(),
            &mirrored,
            schema.get("properties"),
        );
    }
    let _ = crate::sidecar::messages::decode_header_value(&text);
    // Rewriting without edits keeps every message an SSE body carries.
    let (rewritten, _) = crate::sidecar::messages::rewrite_sse(&text, |_| {});
    assert_eq!(sse_messages(&rewritten), sse_messages(&text), "rewriting an SSE body changed its messages");
    // And what a client reads of the rewritten body is only such messages:
    // nothing the gateway could not read (and so could not have filtered).
    assert_eq!(sse_data_events(&rewritten), sse_messages(&rewritten).len(), "an unreadable event passed");
}

/// The JSON objects a client following the SSE specification reads from a
/// body: an event's `data` lines joined with newlines, dispatched at a
/// blank line; comments and other fields ignored; an event the body does
/// not end with a blank line is never dispatched.
fn sse_messages(body: &str) -> Vec<Value> {
    sse_events(body).0.iter().filter_map(|d| serde_json::from_str::<Value>(d).ok()).filter(Value::is_object).collect()
}

/// How many data-bearing events a client dispatches from a body, counting
/// also an event the body leaves open with data in it (a lenient client
/// might dispatch it at the end).
fn sse_data_events(body: &str) -> usize {
    let (dispatched, open) = sse_events(body);
    dispatched.len() + usize::from(open)
}

/// The data of every event a client following the SSE specification
/// dispatches from a body, and whether data is left in an open event.
/// Written apart from the gateway's reader, as its oracle.
fn sse_events(body: &str) -> (Vec<String>, bool) {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    let mut pieces: Vec<&str> = body.split("\r\n").flat_map(|l| l.split(['\r', '\n'])).collect();
    // What follows the last line end is no line yet.
    let tail = pieces.pop().unwrap_or("");
    let is_data = |line: &str| line.split_once(':').map_or(line, |(field, _)| field) == "data";
    for line in pieces {
        if line.is_empty() {
            events.extend(data.take());
            continue;
        }
        if is_data(line) {
            let value = line.split_once(':').map_or("", |(_, v)| v);
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(buffer) => {
                    buffer.push('\n');
                    buffer.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
    }
    let open = data.is_some() || is_data(tail);
    (events, open)
}

/// An argument rule from a manifest (anyone who may create an MCPServer
/// writes it) and a call's arguments (any caller sends them): bytes up to
/// the first NUL are the rule, the rest the arguments' JSON. A rule the
/// policy accepts must judge any arguments, and neither may crash the
/// process (a stack overflow aborts: the fuzzer sees it).
pub fn argument_rules(data: &[u8]) {
    use crate::policy::arguments::{check, validate_rule};
    let (rule, rest) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(rule) = std::str::from_utf8(rule) else { return };
    let claims = ["department".to_string(), "wards".to_string()].into();
    if validate_rule(rule, &claims).is_err() {
        return;
    }
    let arguments: Option<Value> = serde_json::from_slice(rest).ok();
    let rules = [crate::api::ArgumentRule { rule: rule.to_string(), message: "m".into() }];
    let mut caller = crate::policy::Caller::new("fuzz", ["front-desk"]);
    caller.claims.insert("department".into(), Value::from("cardiology"));
    caller.claims.insert("wards".into(), serde_json::json!(["3a", "3b"]));
    let _ = check(None, &rules, &caller, arguments.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fragment_alone_and_together_keeps_no_canary() {
        for i in 0..FRAGMENTS.len() {
            statement_literals(&[i as u8]);
        }
        statement_literals(&(0..FRAGMENTS.len() as u8).collect::<Vec<_>>());
    }

    #[test]
    fn the_token_harness_reaches_its_property_checks() {
        // Valid claims under the test key authenticate, so the harness's
        // checks run on what the fuzzer makes of them.
        let (runtime, verifier) = &*VERIFIER;
        let claims = serde_json::json!({"iss": test_issuer::ISSUER, "aud": test_issuer::AUDIENCE, "sub": "dana",
            "exp": jsonwebtoken::get_current_timestamp() + 600, "scope": test_issuer::SCOPE, "department": "x"});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("test-ec256".into());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(test_issuer::EC_KEY).expect("key");
        let token = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
        let caller = runtime.block_on(verifier.verify(&token)).expect("the test issuer's token");
        assert_eq!(caller.claims.get("department"), Some(&Value::from("x")));
        let mut data = vec![0u8];
        data.extend(claims.to_string().bytes());
        bearer_token(&data);
        // The same token presented as it is (odd mode) is signed: the
        // harness's raw mode must only ever see unsigned or forged ones.
        assert!(runtime.block_on(verifier.verify(&token.replace('.', ".x"))).is_err());
    }

    #[test]
    fn the_authorization_harness_sees_allowed_and_refused_calls() {
        use crate::sidecar::authz::{Decision, decide};
        let (policy, callers) = &*CLINIC;
        let params = serde_json::json!({"name": "lookup_patient", "arguments": {"patient": "pt_1", "limit": 5}});
        let verdict = |caller| matches!(decide(policy, caller, Some("tools/call"), Some(&params)), Decision::Allow(_));
        assert!(verdict(&callers[0]), "the front desk may look a patient up");
        assert!(!verdict(&callers[1]) && !verdict(&callers[2]), "others may not");
        let pseudonym_only = serde_json::json!({"name": "lookup_patient", "arguments": {"patient": "MRN-1"}});
        assert!(!matches!(decide(policy, &callers[0], Some("tools/call"), Some(&pseudonym_only)), Decision::Allow(_)));
    }

    #[test]
    fn a_short_first_packet_is_an_error_not_a_panic() {
        for len in 0..8 {
            dbproxy_first_packet(&vec![0u8; len]);
        }
    }
}

/// The test issuer's settings and keys (the committed test fixtures: a
/// public, test-only key pair).
mod test_issuer {
    pub const ISSUER: &str = "https://login.example.org";
    pub const AUDIENCE: &str = "https://patient-lookup.clinic.example/mcp";
    pub const SCOPE: &str = "mcp:tools";
    pub const JWKS: &str = include_str!("../tests/fixtures/test-jwks.json");
    pub const EC_KEY: &[u8] = include_bytes!("../tests/fixtures/test-ec256.pem");
}

/// A verifier as the sidecar runs one, on a runtime of its own.
static VERIFIER: LazyLock<(tokio::runtime::Runtime, crate::jwt::Authenticator)> = LazyLock::new(|| {
    use crate::jwt::{Authenticator, KeySource, Keys};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let source = KeySource::Inline { origin: "fuzz".into(), text: test_issuer::JWKS.into() };
    let keys = runtime.block_on(Keys::load(source)).expect("the test JWKS loads");
    let settings = crate::policy::CompiledAuthentication {
        issuer: test_issuer::ISSUER.into(),
        audience: test_issuer::AUDIENCE.into(),
        groups_claim: "groups".into(),
        required_scopes: [test_issuer::SCOPE.to_string()].into(),
        rule_claims: ["department".to_string(), "wards".to_string()].into(),
    };
    (runtime, Authenticator::new(keys, settings))
});

/// A bearer token, in two modes by the first byte. Odd: the rest is the
/// token as a caller sends it, and none may authenticate — nothing here can
/// sign with the issuer's key, so an `Ok` is a forgery or an unsigned token
/// let through (`alg: none`, algorithm confusion, a kid trick). Even: the
/// rest is a token's claims, signed with the test issuer's key, and the
/// token authenticates only if the claims are what the verifier requires:
/// the issuer, this audience, an unexpired `exp`, a `sub` that becomes the
/// caller, the required scope; rules see only named claims.
pub fn bearer_token(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    let (runtime, verifier) = &*VERIFIER;
    if mode % 2 == 1 {
        let Ok(token) = std::str::from_utf8(rest) else { return };
        assert!(runtime.block_on(verifier.verify(token)).is_err(), "a token nobody signed authenticated");
        return;
    }
    let Ok(claims) = serde_json::from_slice::<Value>(rest) else { return };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("test-ec256".into());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(test_issuer::EC_KEY).expect("the test key");
    let Ok(token) = jsonwebtoken::encode(&header, &claims, &key) else { return };
    let Ok(caller) = runtime.block_on(verifier.verify(&token)) else { return };
    assert_eq!(claims["iss"], test_issuer::ISSUER, "a token of another issuer authenticated");
    let audience = &claims["aud"];
    assert!(
        audience == test_issuer::AUDIENCE
            || audience.as_array().is_some_and(|a| a.iter().any(|x| x == test_issuer::AUDIENCE)),
        "a token for another audience authenticated: {audience}"
    );
    let now = jsonwebtoken::get_current_timestamp();
    let exp = claims["exp"].as_u64();
    assert!(exp.is_some_and(|exp| exp + crate::jwt::LEEWAY_SECS >= now), "an expired token authenticated: {exp:?}");
    assert_eq!(claims["sub"].as_str(), Some(caller.subject.as_str()), "the caller is not the token's subject");
    assert!(!caller.subject.is_empty(), "an empty subject authenticated");
    let has_scope = |v: &Value| match v {
        Value::String(text) => text.split_whitespace().any(|s| s == test_issuer::SCOPE),
        Value::Array(items) => items.iter().any(|s| s == test_issuer::SCOPE),
        _ => false,
    };
    assert!(has_scope(&claims["scope"]) || has_scope(&claims["scp"]), "a token without the required scope");
    for (name, value) in &caller.claims {
        assert!(name == "department" || name == "wards", "rules see a claim nobody named: {name}");
        assert_eq!(&claims[name.as_str()], value, "rules see a claim other than the token's");
    }
}

/// The clinic example's policy, with declared arguments and a rule on its
/// PHI tool, and three callers: the tool's group, another, none.
static CLINIC: LazyLock<(crate::policy::CompiledPolicy, [crate::policy::Caller; 3])> = LazyLock::new(|| {
    use serde_json::json;
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(include_str!("../examples/compliant/clinic.yaml"))
        .map(|d| serde::Deserialize::deserialize(d).expect("the example is YAML"))
        .collect();
    let mut server = docs[1].clone();
    server["spec"]["authentication"]["oidc"]["ruleClaims"] = json!(["department"]);
    server["spec"]["tools"][0]["arguments"] = json!([
        {"name": "patient", "type": "string", "required": true, "maxLength": 40},
        {"name": "limit", "type": "integer", "minimum": 1, "maximum": 50}
    ]);
    server["spec"]["tools"][0]["argumentRules"] = json!([
        {"rule": "args.patient.startsWith('pt_')", "message": "patients by pseudonym"},
        {"rule": "!has(args.limit) || caller.claims.department == 'front-desk'", "message": "lists for the front desk"}
    ]);
    let server: crate::api::MCPServer = crate::manifest::admit(&server).expect("the fuzz server is admissible");
    let store: crate::api::PHIStore = crate::manifest::admit(&docs[0]).expect("the example store is admissible");
    let stores = std::collections::BTreeMap::from([("ehr".to_string(), store)]);
    let policy = crate::policy::compile(&server, &stores).expect("the fuzz policy compiles");
    let mut front_desk = crate::policy::Caller::new("dana", ["front-desk"]);
    front_desk.claims.insert("department".into(), Value::from("front-desk"));
    let callers =
        [front_desk, crate::policy::Caller::new("bob", ["billing"]), crate::policy::Caller::new("eve", [""; 0])];
    (policy, callers)
});

/// A JSON-RPC body (one message or a batch) from one of three callers,
/// picked by the first byte, as the gateway authorizes it: nothing is
/// allowed that the policy does not allow this caller — a tool call only
/// for an admitted caller and only with arguments its declaration and
/// rules accept — and after the `_meta` rewrite the server sees only the
/// verified caller under `io.mcpwarden/`.
pub fn gateway_authorization(data: &[u8]) {
    use crate::sidecar::authz::{self, Decision};
    let Some((pick, rest)) = data.split_first() else { return };
    let (policy, callers) = &*CLINIC;
    let caller = &callers[usize::from(*pick) % callers.len()];
    let Ok(body) = serde_json::from_slice::<Value>(rest) else { return };
    let messages = match body {
        Value::Array(items) => items,
        single => vec![single],
    };
    for message in messages.into_iter().take(64) {
        let method = message.get("method").and_then(Value::as_str);
        let params = message.get("params");
        let decision = authz::decide(policy, caller, method, params);
        let named = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_str);
        if let (Decision::Allow(_), Some(method)) = (&decision, method) {
            match method {
                "tools/call" => {
                    let name = named("name").unwrap_or_default();
                    let tool = policy.tools.get(name).expect("an allowed call names a tool of the policy");
                    assert!(tool.callers.admits(caller), "{} may not call {name}", caller.subject);
                    let arguments = params.and_then(|p| p.get("arguments"));
                    let judged = crate::policy::arguments::check(
                        tool.arguments.as_deref(),
                        &tool.argument_rules,
                        caller,
                        arguments,
                    );
                    assert!(judged.is_ok(), "allowed with arguments its rules refuse: {judged:?}");
                }
                "prompts/get" => {
                    let name = named("name").unwrap_or_default();
                    assert!(policy.prompts.get(name).is_some_and(|c| c.admits(caller)), "prompt {name} allowed");
                }
                "resources/read" => {
                    let uri = named("uri").unwrap_or_default();
                    let admitted = policy.resources.iter().find(|r| uri.starts_with(&r.uri_prefix));
                    assert!(admitted.is_some_and(|r| r.callers.admits(caller)), "resource allowed");
                }
                _ => {}
            }
        }
        if let Value::Object(mut object) = message {
            authz::rewrite_meta(&mut object, caller, test_issuer::ISSUER);
            if let Some(meta) = object.get("params").and_then(|p| p.get("_meta")).and_then(Value::as_object) {
                let ours: Vec<&String> = meta.keys().filter(|k| k.starts_with("io.mcpwarden/")).collect();
                assert_eq!(ours, ["io.mcpwarden/caller"], "a client-supplied io.mcpwarden key survived");
                assert_eq!(meta["io.mcpwarden/caller"]["sub"], caller.subject.as_str());
            }
        }
    }
}
