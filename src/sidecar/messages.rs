//! JSON-RPC and MCP transport details the gateway needs: error bodies,
//! header/body agreement (2026-07-28 request metadata), and rewriting list
//! results inside JSON or SSE bodies.

use axum::http::HeaderMap;
use base64::Engine;
use serde_json::{Value, json};

/// Protocol revision that introduced stateless requests and mirrored
/// `Mcp-*` headers.
pub const STATELESS_REVISION: &str = "2026-07-28";
/// Revision assumed when a client sends no `MCP-Protocol-Version`.
pub const DEFAULT_REVISION: &str = "2025-03-26";
/// JSON-RPC parse error.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC invalid request.
pub const INVALID_REQUEST: i64 = -32600;
/// MCP header/body mismatch.
pub const HEADER_MISMATCH: i64 = -32020;
/// Server error used for refusals of the gateway itself.
pub const GATEWAY_REFUSED: i64 = -32000;

/// A JSON-RPC error response (id null when unknown).
pub fn error_body(id: Option<&Value>, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "error": {"code": code, "message": message}})
}

/// The request's protocol revision.
pub fn revision(headers: &HeaderMap) -> String {
    headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| DEFAULT_REVISION.to_string())
}

/// Whether a revision uses request metadata headers (dates compare as text).
pub fn is_stateless(revision: &str) -> bool {
    revision >= STATELESS_REVISION
}

/// Decodes an `Mcp-Name`/`Mcp-Param-*` value (`=?base64?…?=` sentinel).
pub fn decode_header_value(value: &str) -> Option<String> {
    match value.strip_prefix("=?base64?").and_then(|v| v.strip_suffix("?=")) {
        Some(encoded) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(value.to_string()),
    }
}

/// Checks that `Mcp-Method` and `Mcp-Name` agree with the body (2026-07-28).
/// The error names the header, never its value: values can carry PHI.
pub fn check_mirrored_headers(headers: &HeaderMap, method: &str, params: Option<&Value>) -> Result<(), String> {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().map(str::to_string));
    match header("mcp-method") {
        None => return Err("Mcp-Method header is missing".into()),
        Some(Err(_)) => return Err("Mcp-Method header is not valid ASCII".into()),
        Some(Ok(m)) if m != method => return Err("Mcp-Method header does not match the body".into()),
        Some(Ok(_)) => {}
    }
    let named = match method {
        "tools/call" | "prompts/get" => params.and_then(|p| p.get("name")).and_then(Value::as_str),
        "resources/read" => params.and_then(|p| p.get("uri")).and_then(Value::as_str),
        _ => return Ok(()),
    };
    match (header("mcp-name"), named) {
        (None, _) => Err("Mcp-Name header is missing".into()),
        (Some(Err(_)), _) => Err("Mcp-Name header is not valid ASCII".into()),
        (Some(Ok(value)), Some(body)) => match decode_header_value(&value) {
            Some(decoded) if decoded == body => Ok(()),
            Some(_) => Err("Mcp-Name header does not match the body".into()),
            None => Err("Mcp-Name header has an invalid base64 value".into()),
        },
        (Some(Ok(_)), None) => Err("Mcp-Name header names something the body does not".into()),
    }
}

/// (lower-case header name, property path) of each mirrored parameter.
pub type MirroredParams = Vec<(String, Vec<String>)>;

/// Parameters a tool mirrors into `Mcp-Param-*` headers: (lower-case header
/// name, property path), from `x-mcp-header` annotations reachable through
/// `properties` only, as the 2026-07-28 transport defines them.
pub fn mirrored_params(input_schema: &Value) -> MirroredParams {
    fn walk(schema: &Value, path: &mut Vec<String>, out: &mut MirroredParams) {
        let Some(properties) = schema.get("properties").and_then(Value::as_object) else { return };
        for (name, property) in properties {
            path.push(name.clone());
            if let Some(header) = property.get("x-mcp-header").and_then(Value::as_str) {
                out.push((format!("mcp-param-{}", header.to_ascii_lowercase()), path.clone()));
            }
            walk(property, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(input_schema, &mut Vec::new(), &mut out);
    out
}

/// Checks `Mcp-Param-*` headers against the arguments: a present value needs
/// its header, equal after decoding (integers compared as numbers); an
/// absent or null value must not have one. Errors name the header only.
pub fn check_param_headers(
    headers: &HeaderMap,
    mirrored: &[(String, Vec<String>)],
    arguments: Option<&Value>,
) -> Result<(), String> {
    for (header, path) in mirrored {
        let value = arguments.and_then(|a| path.iter().try_fold(a, |v, key| v.get(key))).filter(|v| !v.is_null());
        let presented = headers.get(header.as_str()).map(|h| h.to_str().ok().and_then(decode_header_value));
        match (value, presented) {
            (None, None) => {}
            (None, Some(_)) => return Err(format!("{header} header present but the argument is absent")),
            (Some(_), None) => return Err(format!("{header} header is missing")),
            (Some(_), Some(None)) => return Err(format!("{header} header has invalid characters")),
            (Some(v), Some(Some(text))) => {
                let same = match v {
                    Value::String(s) => *s == text,
                    Value::Bool(b) => text == if *b { "true" } else { "false" },
                    Value::Number(n) => text.parse::<f64>().ok() == n.as_f64(),
                    _ => false,
                };
                if !same {
                    return Err(format!("{header} header does not match the body"));
                }
            }
        }
    }
    Ok(())
}

/// Applies `edit` to every JSON-RPC response (a message with `result`) in
/// an SSE body, read as a client following the SSE specification reads it:
/// lines end at CRLF, LF or CR; an event's `data` lines are joined with
/// newlines; an event is dispatched at a blank line, never at the body's
/// end. What a client would read and this cannot vouch for is withheld
/// rather than passed on unfiltered — an event whose data is not one JSON
/// object (serde_json refuses some texts a browser's `JSON.parse` takes,
/// such as a lone surrogate escape; a batch array), and data left in an
/// event the body never ends (a lenient client might dispatch it). Other
/// events are kept as sent; line ends become LF. Returns the body and how
/// many events were withheld.
pub fn rewrite_sse(body: &str, mut edit: impl FnMut(&mut Value)) -> (String, usize) {
    let mut out = String::with_capacity(body.len());
    let read = crate::sse::read(body);
    let mut withheld = 0;
    for event in &read.events {
        if !rewrite_event(event, &mut edit, &mut out) {
            withheld += 1;
        }
    }
    if read.unended.data().is_some() {
        withheld += 1;
    }
    (out, withheld)
}

/// Said in place of an event that was withheld (a comment: clients ignore it).
const WITHHELD_EVENT: &str = ": withheld by mcp-warden: not one JSON-RPC message\n\n";

/// One dispatched event into `out`; false if it was withheld.
fn rewrite_event(event: &crate::sse::Event<'_>, edit: &mut impl FnMut(&mut Value), out: &mut String) -> bool {
    let keep = |out: &mut String, lines: &mut dyn Iterator<Item = &&str>| {
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
    };
    let Some(data) = event.data() else {
        keep(out, &mut event.lines.iter());
        out.push('\n');
        return true;
    };
    match serde_json::from_str::<Value>(&data) {
        Ok(mut message) if message.get("result").is_some() => {
            edit(&mut message);
            keep(out, &mut event.lines.iter().filter(|l| crate::sse::field(l).0 != "data"));
            out.push_str("data: ");
            out.push_str(&message.to_string());
            out.push_str("\n\n");
            true
        }
        Ok(message) if message.is_object() => {
            keep(out, &mut event.lines.iter());
            out.push('\n');
            true
        }
        _ => {
            out.push_str(WITHHELD_EVENT);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn mirrored_headers_must_agree_with_the_body() {
        let params = json!({"name": "lookup_patient"});
        let ok = headers(&[("mcp-method", "tools/call"), ("mcp-name", "lookup_patient")]);
        assert_eq!(check_mirrored_headers(&ok, "tools/call", Some(&params)), Ok(()));
        let encoded = headers(&[("mcp-method", "tools/call"), ("mcp-name", "=?base64?bG9va3VwX3BhdGllbnQ=?=")]);
        assert_eq!(check_mirrored_headers(&encoded, "tools/call", Some(&params)), Ok(()));
        let lying = headers(&[("mcp-method", "tools/call"), ("mcp-name", "clinic_hours")]);
        assert_eq!(
            check_mirrored_headers(&lying, "tools/call", Some(&params)),
            Err("Mcp-Name header does not match the body".into())
        );
        assert!(
            check_mirrored_headers(&headers(&[("mcp-method", "tools/list")]), "tools/call", Some(&params)).is_err()
        );
        assert!(check_mirrored_headers(&headers(&[]), "tools/list", None).is_err());
        assert!(
            check_mirrored_headers(&headers(&[("mcp-method", "tools/call")]), "tools/call", Some(&params)).is_err()
        );
        assert_eq!(check_mirrored_headers(&headers(&[("mcp-method", "tools/list")]), "tools/list", None), Ok(()));
    }

    #[test]
    fn param_headers_follow_the_tool_schema() {
        let schema = json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "limit": {"type": "integer", "x-mcp-header": "Limit"},
            "filter": {"type": "object", "properties": {"site": {"type": "string", "x-mcp-header": "Site"}}},
            "list": {"type": "array", "items": {"type": "string", "x-mcp-header": "Ignored"}},
            "query": {"type": "string"}
        }});
        let mut mirrored = mirrored_params(&schema);
        mirrored.sort();
        assert_eq!(
            mirrored,
            [
                ("mcp-param-limit".to_string(), vec!["limit".to_string()]),
                ("mcp-param-region".to_string(), vec!["region".to_string()]),
                ("mcp-param-site".to_string(), vec!["filter".to_string(), "site".to_string()]),
            ]
        );
        let args = json!({"region": "us-west1", "limit": 42, "filter": {"site": "Zürich"}, "query": "x"});
        let ok = headers(&[
            ("mcp-param-region", "us-west1"),
            ("mcp-param-limit", "42.0"),
            ("mcp-param-site", "=?base64?WsO8cmljaA==?="),
        ]);
        assert_eq!(check_param_headers(&ok, &mirrored, Some(&args)), Ok(()));
        let wrong = headers(&[
            ("mcp-param-region", "eu-west1"),
            ("mcp-param-limit", "42"),
            ("mcp-param-site", "=?base64?WsO8cmljaA==?="),
        ]);
        assert_eq!(
            check_param_headers(&wrong, &mirrored, Some(&args)),
            Err("mcp-param-region header does not match the body".into())
        );
        let missing = headers(&[("mcp-param-limit", "42"), ("mcp-param-site", "=?base64?WsO8cmljaA==?=")]);
        assert!(check_param_headers(&missing, &mirrored, Some(&args)).is_err());
        let extra = headers(&[("mcp-param-region", "us-west1")]);
        assert!(check_param_headers(&extra, &mirrored, Some(&json!({}))).is_err());
        assert_eq!(check_param_headers(&headers(&[]), &mirrored, Some(&json!({"region": null}))), Ok(()));
    }

    #[test]
    fn sse_results_are_rewritten_and_other_events_kept() {
        let body = "event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\nid: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\n\n";
        let (out, withheld) = rewrite_sse(body, |m| {
            if let Some(tools) = m.pointer_mut("/result/tools").and_then(Value::as_array_mut) {
                tools.retain(|t| t["name"] == "a");
            }
        });
        assert_eq!(withheld, 0);
        assert!(out.starts_with(
            "event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n"
        ));
        assert!(
            out.contains("id: 2\ndata: {\"id\":1,\"jsonrpc\":\"2.0\",\"result\":{\"tools\":[{\"name\":\"a\"}]}}\n\n")
                || out.contains("\"tools\":[{\"name\":\"a\"}]"),
            "{out}"
        );
        assert!(!out.contains("\"b\""));
    }

    fn keep_only_a(m: &mut Value) {
        if let Some(tools) = m.pointer_mut("/result/tools").and_then(Value::as_array_mut) {
            tools.retain(|t| t["name"] == "a");
        }
    }

    #[test]
    fn sse_events_are_read_as_clients_read_them_whatever_the_line_ends() {
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#;
        // CRLF and CR separate events for a client as LF does: each list
        // is filtered, none passes whole.
        for eol in ["\r\n", "\r", "\n"] {
            let body = format!("event: message{eol}data: {list}{eol}{eol}data: {list}{eol}{eol}");
            let (out, withheld) = rewrite_sse(&body, keep_only_a);
            assert_eq!(withheld, 0, "{eol:?}");
            assert_eq!(out.matches("\"name\":\"a\"").count(), 2, "{eol:?}: {out}");
            assert!(!out.contains("\"b\""), "{eol:?}: {out}");
        }
        // A message split over data lines is one message, filtered.
        let split = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\ndata: \"result\":{\"tools\":[{\"name\":\"b\"}]}}\n\n";
        let (out, _) = rewrite_sse(split, keep_only_a);
        assert!(!out.contains("\"b\""), "{out}");
    }

    #[test]
    fn what_cannot_be_vouched_for_is_withheld_not_passed_on() {
        // serde_json refuses a lone surrogate escape that JSON.parse takes:
        // the list inside would reach a browser unfiltered.
        let surrogate = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\",\"description\":\"\\ud800\"}]}}\n\n";
        let batch = "data: [{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\"}]}}]\n\n";
        let unended = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\"}]}}\n";
        for body in [surrogate, batch, unended] {
            let (out, withheld) = rewrite_sse(body, keep_only_a);
            assert_eq!(withheld, 1, "{body}");
            assert!(!out.contains("\"b\""), "{body} -> {out}");
        }
        // Comments, ids and retry hints without data pass as they are.
        let (out, withheld) = rewrite_sse(": ping\nretry: 100\n\n", keep_only_a);
        assert_eq!((out.as_str(), withheld), (": ping\nretry: 100\n\n", 0));
    }
}
