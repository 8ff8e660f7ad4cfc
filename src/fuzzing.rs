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
//! | `collector_batches` | batches of record lines from senders (the collector's intake), genuine, resent, reordered, tampered or from the wrong sender | never panics; what is acknowledged is the genuine chain and verifies; durable positions never go back |
//! | `broker_bodies` | a body posted to the broker's API (credential, grants, revocation and re-identification requests) | never panics; a refusal names where the body is malformed, never what it holds; a parsed credential request's server and correlation are judged without panicking |
//! | `dbproxy_conversation` | the tagged messages of a proxied connection, both ways (the MCP server's and PostgreSQL's) | never panics; every statement sent is finished exactly once; COPY (when not allowed), fast-path calls and `standard_conforming_strings` off never pass |

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
    // PostgreSQL 16's other integer forms (found by the PostgreSQL oracle,
    // tests/normalizer_oracle.rs: the tokenizer cut `0o…` into 0 and a word).
    "0o7777777",
    "1_7777777",
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

/// A body posted to the broker's API: byte 0 picks the request type, the
/// rest is the body. A refusal's message has one fixed shape (where, never
/// what: a body can carry a caller's token).
pub fn broker_bodies(data: &[u8]) {
    use crate::broker::api::{GrantsRequest, parse_json};
    use crate::broker::issuer::CredentialRequest;
    use crate::broker::lifecycle::Revocation;
    use crate::broker::reidentify::ReidentifyRequest;
    let Some((&kind, body)) = data.split_first() else { return };
    let refusal = match kind % 4 {
        0 => parse_json::<CredentialRequest>(body, "credential request")
            .map(|r| {
                let _ = crate::broker::issuer::parse_server(&r.server);
            })
            .err(),
        1 => parse_json::<GrantsRequest>(body, "grants request").err(),
        2 => parse_json::<Revocation>(body, "revocation").err(),
        _ => parse_json::<ReidentifyRequest>(body, "re-identification").err(),
    };
    if let Some(message) = refusal {
        assert!(REFUSAL_SHAPE.is_match(&message), "a refusal says more than where: {message:?}");
    }
}

static REFUSAL_SHAPE: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"^not a valid [a-z -]+ \((Syntax|Data|Eof|Io) error at line \d+ column \d+\)$").expect("regex")
});

/// Two streams' genuine records (a stream-start and eleven lease records
/// each), as canonical lines.
static STREAMS: LazyLock<[Vec<Vec<u8>>; 2]> = LazyLock::new(|| {
    use crate::audit::record::{Chain, Event, Kind, Lease, LeaseAction};
    let chain = |stream: &str| {
        let mut chain = Chain::new(format!("clinic/{stream}/pod-0/s1"), format!("clinic/{stream}"), None);
        let at = chrono::DateTime::from_timestamp(1_790_000_000, 0).expect("time");
        (0..12)
            .map(|i| {
                let event = if i == 0 {
                    Event::new(Kind::StreamStart)
                } else {
                    let mut e = Event::new(Kind::Lease);
                    e.lease =
                        Some(Lease { id: format!("l{i}"), action: LeaseAction::Issued, role: None, valid_until: None });
                    e
                };
                chain.seal(event, at).expect("seal").record.to_line()
            })
            .collect::<Vec<_>>()
    };
    [chain("a"), chain("b")]
});

/// Batches of record lines, as senders post them to the collector: input
/// in 3-byte steps — selector (bit 0: stream; bit 1: posted by the other
/// stream's sender; bit 2: one line tampered with, at the byte the third
/// byte names), first record, count (≤ 8). The stored trail must hold the
/// genuine records and nothing else: every acknowledged position is the
/// genuine chain's, no acknowledged position ever goes back, and unless a
/// gap was reported the storage verifies.
pub fn collector_batches(data: &[u8]) {
    store_batches(data);
}

/// [`collector_batches`]'s body; returns the stored heads' positions.
fn store_batches(data: &[u8]) -> Vec<u64> {
    use crate::audit::collector::store::Storage;
    use crate::audit::verify::{VerifyOptions, verify_dir};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = Storage::open(dir.path()).expect("storage");
    let senders = ["sender-a", "sender-b"];
    let mut durable = [0u64; 2];
    let mut gap = false;
    for step in data.chunks_exact(3).take(16) {
        let (selector, first, count) = (step[0], usize::from(step[1]) % 12, usize::from(step[2]) % 8 + 1);
        let stream = usize::from(selector & 1);
        let sender = senders[stream ^ usize::from(selector >> 1 & 1)];
        let genuine = &STREAMS[stream];
        let mut lines: Vec<Vec<u8>> = genuine[first..(first + count).min(genuine.len())].to_vec();
        if selector & 4 != 0
            && let Some(line) = lines.last_mut()
        {
            let at = usize::from(step[2]) * 7 % line.len();
            line[at] ^= 1 + (selector >> 3);
        }
        let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
        if let Ok(stored) = storage.store(sender, None, &refs) {
            // A line's hash covers its stream: a tampered line never parses
            // into another stream.
            let index = STREAMS.iter().position(|s| stored.stream == stream_name(s));
            let index = index.expect("a stored stream is one of the two");
            assert!(stored.durable_through >= durable[index], "an acknowledged position went back");
            durable[index] = stored.durable_through;
            gap |= !stored.incidents.is_empty();
        }
    }
    let heads = storage.heads();
    for head in &heads {
        let genuine = STREAMS.iter().find(|s| head.stream == stream_name(s)).expect("a known stream");
        let record = crate::audit::record::Record::parse_line(&genuine[head.seq as usize - 1]).expect("genuine");
        assert_eq!(head.hash, record.hash, "the stored head is not the genuine chain's");
    }
    // (`audit verify` does not pass a directory with no stream in it.)
    if !gap && !heads.is_empty() {
        assert!(verify_dir(dir.path(), VerifyOptions::default()).passed(), "acknowledged records do not verify");
    }
    heads.iter().map(|h| h.seq).collect()
}

fn stream_name(lines: &[Vec<u8>]) -> String {
    crate::audit::record::Record::parse_line(&lines[0]).expect("genuine").stream
}

/// The client's tags the tracker reads, and others; the server's likewise.
const CLIENT_TAGS: &[u8] = b"QPBECFSHDXdcf";
const SERVER_TAGS: &[u8] = b"DCEIZsSGHWTn123KNtA";

/// A proxied connection's tagged messages, both ways, through the
/// statement tracker: the MCP server's (untrusted) and PostgreSQL's. Input:
/// byte 0 = COPY allowed (odd); then per message a selector byte (bit 7:
/// from the server; the rest picks the tag), a length byte and that many
/// body bytes. The connection ends, as the proxy ends it, at the first
/// message the tracker refuses to read or that closes it.
pub fn dbproxy_conversation(data: &[u8]) {
    converse(data);
}

/// [`dbproxy_conversation`]'s body; returns how many statements finished.
fn converse(data: &[u8]) -> usize {
    use crate::dbproxy::tracker::{BACKSLASH_LITERALS, BackAction, FrontAction, Tracker, backslash_literals};
    use crate::dbproxy::wire::Frame;
    let Some((&flags, mut rest)) = data.split_first() else { return 0 };
    let allow_copy = flags & 1 == 1;
    let mut tracker = Tracker::new(allow_copy);
    let now = std::time::Instant::now();
    let (mut done, mut statements) = (Vec::new(), 0usize);
    while let [selector, len, tail @ ..] = rest {
        let body = &tail[..usize::from(*len).min(tail.len())];
        rest = &tail[body.len()..];
        let from_server = selector & 0x80 != 0;
        let tags = if from_server { SERVER_TAGS } else { CLIENT_TAGS };
        let tag = tags[usize::from(selector & 0x7f) % tags.len()];
        let mut raw = vec![tag];
        raw.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        raw.extend_from_slice(body);
        let frame = Frame { tag, raw: raw.into() };
        let before = done.len();
        if from_server {
            match tracker.server(&frame, now, &mut done) {
                Ok(BackAction::Forward) => {
                    assert!(allow_copy || !matches!(tag, b'G' | b'H' | b'W'), "a COPY answer passed");
                    assert!(!backslash_literals(&frame), "standard_conforming_strings off passed");
                }
                Ok(BackAction::Close(reason)) => {
                    assert!(reason != BACKSLASH_LITERALS || backslash_literals(&frame));
                    break;
                }
                Err(_) => break,
            }
        } else {
            let started = matches!(tag, b'Q' | b'E');
            match tracker.client(&frame, now, &mut done) {
                Ok(FrontAction::Forward) => {
                    assert!(tag != b'F', "a fast-path call passed");
                    statements += usize::from(started);
                }
                Ok(FrontAction::Answer(_)) => statements += done.len() - before,
                Ok(FrontAction::Close(_)) | Err(_) => {
                    statements += done.len() - before;
                    break;
                }
            }
        }
        assert!(tracker.in_flight() <= statements, "more in flight than was sent");
    }
    tracker.end(now, "connection_ended", &mut done);
    assert_eq!(done.len(), statements, "a statement was lost or finished twice");
    statements
}

/// An argument rule from a manifest (anyone who may create an MCPServer
/// writes it) and a call's arguments (any caller sends them): bytes up to
/// the first NUL are the rule, the rest the arguments' JSON. A rule the
/// policy accepts must judge any arguments, and neither may crash the
/// process (a stack overflow aborts: the fuzzer sees it) or panic the
/// interpreter (contained, so the call is refused, but still a defect).
pub fn argument_rules(data: &[u8]) {
    let before = crate::policy::contained::panics_contained();
    judge_rule(data);
    assert_eq!(crate::policy::contained::panics_contained(), before, "the rule interpreter panicked (contained)");
}

fn judge_rule(data: &[u8]) {
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

    fn message(selector: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![selector, body.len() as u8];
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_conversation_harness_counts_what_is_sent_and_refused() {
        let (query, complete, ready, fast_path) =
            (message(0x00, b"SELECT 1\0"), message(0x81, b"SELECT 1\0"), message(0x84, b"I"), message(0x05, b""));
        // A query answered, then a fast-path call refused: two finished.
        assert_eq!(converse(&[&[0u8][..], &query, &complete, &ready, &fast_path].concat()), 2);
        // A query whose connection ends unanswered still finishes, once.
        assert_eq!(converse(&[&[0u8][..], &query].concat()), 1);
        // standard_conforming_strings off ends the connection at once.
        let off = message(0x86, b"standard_conforming_strings\0off\0");
        assert_eq!(converse(&[&[0u8][..], &query, &off, &query].concat()), 1);
    }

    #[test]
    fn the_batch_harness_stores_genuine_batches_and_not_tampered_ones() {
        // Nothing sent, nothing stored.
        assert_eq!(store_batches(&[]), Vec::<u64>::new());
        // Records 1-8 of stream a, then 9-12.
        assert_eq!(store_batches(&[0, 0, 7, 0, 8, 3]), vec![12]);
        // The same with its last line tampered with: nothing of it stored.
        assert_eq!(store_batches(&[0, 0, 7, 4, 8, 3]), vec![8]);
        // Stream a's records 1-4 posted by b's sender first make the stream
        // b's sender's: a's own sender is then refused.
        assert_eq!(store_batches(&[2, 0, 3, 0, 4, 3]), vec![4]);
    }

    #[test]
    fn broker_refusals_name_where_never_what() {
        let token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.";
        let bodies = [
            format!("{{\"server\":\"a/b\",\"tool\":\"t\",\"store\":\"s\",\"callerToken\":\"{token}\",\"extra\":1}}"),
            format!("{{\"callerToken\":{token}}}"),
            format!("[\"{token}\"]"),
        ];
        for body in &bodies {
            let message = crate::broker::api::parse_json::<crate::broker::issuer::CredentialRequest>(
                body.as_bytes(),
                "credential request",
            )
            .unwrap_err();
            assert!(REFUSAL_SHAPE.is_match(&message) && !message.contains("eyJ"), "{message}");
            broker_bodies(&[&[0u8][..], body.as_bytes()].concat());
        }
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
