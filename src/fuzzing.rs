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
    let rewritten = crate::sidecar::messages::rewrite_sse(&text, |_| {});
    let messages = |body: &str| -> Vec<Value> {
        body.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim_start()).ok())
            .filter(Value::is_object)
            .collect()
    };
    assert_eq!(messages(&rewritten), messages(&text), "rewriting an SSE body changed its messages");
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
    fn a_short_first_packet_is_an_error_not_a_panic() {
        for len in 0..8 {
            dbproxy_first_packet(&vec![0u8; len]);
        }
    }
}
