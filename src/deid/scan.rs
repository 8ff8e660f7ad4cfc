//! The second line: what a de-identified tool answers is searched for
//! identifier shapes before it is released. The database already serves
//! such tools pseudonyms only; this catches a server that reaches PHI some
//! other way (a file, a cache, another service) or a classification
//! mistake. A hit withholds the answer — the record names the pattern and
//! the field, never the value.
//!
//! ```text
//!   answer (JSON or SSE) ─ walk every string (a string holding JSON is walked as JSON)
//!                        ─ Safe Harbor shapes + the store's own (MRN format, …), minus per-field allowances
//!                        ─▶ None (release) | Finding { pattern, path } (withhold)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Shapes of Safe Harbor identifiers (164.514(b)(2)(i)) the sidecar always
/// looks for: SSNs, phone numbers, e-mail addresses, full dates.
pub const SAFE_HARBOR: [(&str, &str); 5] = [
    ("ssn", r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b"),
    ("phone", r"(?:\([0-9]{3}\)\s?|\b[0-9]{3}[-.\s])[0-9]{3}[-.\s][0-9]{4}\b"),
    ("email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    ("fullDate", r"\b(?:1[89]|20)[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])\b"),
    ("usDate", r"\b(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12][0-9]|3[01])/(?:1[89]|20)[0-9]{2}\b"),
];

/// Compiled-regex size cap for a declared pattern (the `regex` crate runs
/// in linear time; this bounds its memory).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How deep a result is walked; deeper answers are withheld (a hostile
/// server could nest to exhaust the walk).
const MAX_DEPTH: usize = 64;

/// What the policy says to scan for one tool: declared patterns by name and
/// per-pattern field allowances (the Safe Harbor shapes are implied).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScanRules {
    /// Declared patterns: name → expression.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub patterns: BTreeMap<String, String>,
    /// Pattern name → object keys it skips.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allow: BTreeMap<String, BTreeSet<String>>,
}

/// A hit: which shape, where (a JSON pointer; `~json` marks a string that
/// held JSON). Never the value, and no key the MCP server chose unless it
/// is known not to be data: keys of MCP's own message structure, the tool's
/// column names and the fields named in allowances are shown; any other key
/// appears as `#<its position>` (a key can be an identifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The pattern's name.
    pub pattern: String,
    /// Where in the answer.
    pub path: String,
}

struct Pattern {
    name: String,
    regex: Regex,
    allow: BTreeSet<String>,
}

/// Keys of MCP messages and tool results, shown in a finding's path.
const STRUCTURE: [&str; 16] = [
    "jsonrpc",
    "id",
    "result",
    "error",
    "content",
    "type",
    "text",
    "structuredContent",
    "data",
    "resource",
    "uri",
    "mimeType",
    "isError",
    "_meta",
    "message",
    "params",
];

/// The compiled scanner of one tool.
pub struct Scanner {
    patterns: Vec<Pattern>,
    shown: BTreeSet<String>,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.patterns.iter().map(|p| &p.name)).finish()
    }
}

impl Scanner {
    /// Compiles the Safe Harbor shapes and `rules`; errors name a pattern
    /// that does not compile, reuses a built-in name, or an allowance for a
    /// pattern that does not exist.
    pub fn new(rules: &ScanRules) -> Result<Scanner, String> {
        Scanner::showing(rules, std::iter::empty())
    }

    /// [`Scanner::new`], also showing `keys` (the tool's column names) in
    /// findings' paths.
    pub fn showing(rules: &ScanRules, keys: impl IntoIterator<Item = String>) -> Result<Scanner, String> {
        let mut patterns = Vec::new();
        for (name, expression) in SAFE_HARBOR {
            patterns.push((name.to_string(), expression.to_string()));
        }
        for (name, expression) in &rules.patterns {
            if SAFE_HARBOR.iter().any(|(builtin, _)| builtin == name) {
                return Err(format!("identifier pattern {name:?} reuses a built-in pattern's name"));
            }
            patterns.push((name.clone(), expression.clone()));
        }
        for pattern in rules.allow.keys() {
            if !patterns.iter().any(|(name, _)| name == pattern) {
                return Err(format!("scanAllow names pattern {pattern:?}, which does not exist"));
            }
        }
        let compiled = patterns
            .into_iter()
            .map(|(name, expression)| {
                let regex = RegexBuilder::new(&expression)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("identifier pattern {name:?} does not compile: {e}"))?;
                let allow = rules.allow.get(&name).cloned().unwrap_or_default();
                Ok(Pattern { name, regex, allow })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut shown: BTreeSet<String> = STRUCTURE.iter().map(|k| k.to_string()).collect();
        shown.extend(keys);
        shown.extend(rules.allow.values().flatten().cloned());
        Ok(Scanner { patterns: compiled, shown })
    }

    /// Searches a JSON answer.
    pub fn scan_json(&self, value: &Value) -> Option<Finding> {
        self.walk(value, &mut String::new(), None, 0)
    }

    /// Searches an SSE answer: each event's `data` as JSON (or as text).
    pub fn scan_sse(&self, text: &str) -> Option<Finding> {
        // Read as the client reads it (`crate::sse`), and the event the body
        // leaves open too: a lenient client might dispatch it.
        let read = crate::sse::read(text);
        for (i, event) in read.events.iter().chain(std::iter::once(&read.unended)).enumerate() {
            let Some(joined) = event.data() else { continue };
            let mut path = format!("/event/{i}");
            let found = match serde_json::from_str::<Value>(&joined) {
                Ok(value) => self.walk(&value, &mut path, None, 0),
                Err(_) => self.text(&joined, &path, None),
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    fn walk(&self, value: &Value, path: &mut String, key: Option<&str>, depth: usize) -> Option<Finding> {
        if depth > MAX_DEPTH {
            return Some(Finding { pattern: "depth".into(), path: path.clone() });
        }
        let mark = path.len();
        let found = match value {
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(inner @ (Value::Object(_) | Value::Array(_))) => {
                    path.push_str("/~json");
                    self.walk(&inner, path, key, depth + 1)
                }
                _ => self.text(s, path, key),
            },
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                path.truncate(mark);
                path.push_str(&format!("/{i}"));
                self.walk(item, path, key, depth + 1)
            }),
            Value::Object(map) => map.iter().enumerate().find_map(|(i, (k, v))| {
                path.truncate(mark);
                path.push('/');
                if self.shown.contains(k) {
                    path.push_str(&escape(k));
                } else {
                    path.push_str(&format!("#{i}"));
                }
                // A key is searched as well: an identifier can be a key.
                self.text(k, path, None).or_else(|| self.walk(v, path, Some(k), depth + 1))
            }),
            _ => None,
        };
        path.truncate(mark);
        found
    }

    fn text(&self, text: &str, path: &str, key: Option<&str>) -> Option<Finding> {
        self.patterns
            .iter()
            .filter(|p| key.is_none_or(|k| !p.allow.contains(k)))
            .find(|p| p.regex.is_match(text))
            .map(|p| Finding { pattern: p.name.clone(), path: path.to_string() })
    }
}

/// A key as a JSON-pointer segment.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn scanner(rules: ScanRules) -> Scanner {
        Scanner::showing(&rules, ["note".to_string(), "who".into(), "seen".into(), "record".into(), "a".into()])
            .unwrap()
    }

    fn mrn_rules() -> ScanRules {
        ScanRules {
            patterns: BTreeMap::from([("mrn".into(), "MRN-[0-9]{4,}".into())]),
            allow: BTreeMap::from([("fullDate".into(), BTreeSet::from(["generatedAt".to_string()]))]),
        }
    }

    /// What the reference server answers: pseudonyms, years, diagnoses.
    fn example_answer() -> Value {
        let text = json!([{"patient": "pt_0a1b2c3d4e5f60718293", "birthYear": "1970", "diagnosis": "influenza"},
                          {"patient": "pt_9f8e7d6c5b4a39281706", "birthYear": "90+", "diagnosis": "asthma"}]);
        json!({"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": text.to_string()}]}})
    }

    #[test]
    fn the_example_data_passes() {
        assert_eq!(scanner(mrn_rules()).scan_json(&example_answer()), None);
    }

    #[test]
    fn planted_identifiers_are_found_with_their_place_but_not_their_value() {
        let s = scanner(mrn_rules());
        let cases = [
            (json!({"content": [{"type": "text", "text": "SSN 123-45-6789"}]}), "ssn", "/content/0/text"),
            (json!({"note": "call (555) 123-4567"}), "phone", "/note"),
            (json!({"note": "call 555.123.4567 now"}), "phone", "/note"),
            (json!({"who": "joe.doe@example.org"}), "email", "/who"),
            (json!({"seen": "2024-03-04"}), "fullDate", "/seen"),
            (json!({"seen": "3/4/2024"}), "usDate", "/seen"),
            (json!({"record": "MRN-0001"}), "mrn", "/record"),
            (json!({"text": "{\"a\": [\"MRN-0001\"]}"}), "mrn", "/text/~json/a/0"),
            (json!({"123-45-6789": true}), "ssn", "/#0"),
            (json!({"Joe Doe": {"x": "123-45-6789"}}), "ssn", "/#0/#0"),
        ];
        for (value, pattern, path) in cases {
            let found = s.scan_json(&value).unwrap_or_else(|| panic!("nothing found in {value}"));
            assert_eq!((found.pattern.as_str(), found.path.as_str()), (pattern, path), "{value}");
        }
    }

    #[test]
    fn allowances_apply_to_their_field_and_pattern_only() {
        let s = scanner(mrn_rules());
        assert_eq!(s.scan_json(&json!({"generatedAt": "2026-11-26"})), None);
        assert!(s.scan_json(&json!({"generatedAt": "123-45-6789"})).is_some(), "only fullDate is allowed there");
        assert!(s.scan_json(&json!({"visit": "2026-11-26"})).is_some());
    }

    #[test]
    fn pseudonyms_years_and_codes_are_not_identifiers() {
        let s = scanner(ScanRules::default());
        for text in ["pt_0a1b2c3d4e5f60718293", "1970", "90+", "941", "J10.1", "2024", "id 12345678", "v1.2.3"] {
            assert_eq!(s.scan_json(&json!({"x": text})), None, "{text}");
        }
    }

    #[test]
    fn sse_events_are_searched() {
        let s = scanner(ScanRules::default());
        let clean = format!("event: message\ndata: {}\n\n", example_answer());
        assert_eq!(s.scan_sse(&clean), None);
        let planted = "event: message\ndata: {\"result\": {\"content\": [{\"text\": \"123-45-6789\"}]}}\n\n";
        assert_eq!(s.scan_sse(planted).map(|f| f.pattern), Some("ssn".into()));
        assert_eq!(s.scan_sse("data: not json 123-45-6789\n\n").map(|f| f.pattern), Some("ssn".into()));
        // Every line end a client honours, and data the body leaves open.
        for body in [planted.replace('\n', "\r"), planted.replace('\n', "\r\n"), planted.trim_end().to_string()] {
            assert_eq!(s.scan_sse(&body).map(|f| f.pattern), Some("ssn".into()), "{body:?}");
        }
        let clean_cr = clean.replace('\n', "\r");
        assert_eq!(s.scan_sse(&clean_cr), None, "a clean answer stays clean whatever its line ends");
    }

    #[test]
    fn hostile_rules_and_answers_are_refused() {
        let bad = |patterns: &[(&str, &str)], allow: &[&str]| {
            Scanner::new(&ScanRules {
                patterns: patterns.iter().map(|(n, r)| (n.to_string(), r.to_string())).collect(),
                allow: allow.iter().map(|p| (p.to_string(), BTreeSet::from(["f".to_string()]))).collect(),
            })
            .unwrap_err()
        };
        assert!(bad(&[("mrn", "MRN-(")], &[]).contains("does not compile"));
        assert!(bad(&[("ssn", "x")], &[]).contains("built-in"));
        assert!(bad(&[], &["nope"]).contains("does not exist"));
        assert!(bad(&[("huge", "[a-z]{1000}{1000}")], &[]).contains("does not compile"));
        // Nesting deeper than the walk goes is withheld, not skipped.
        let mut deep = json!("x");
        for _ in 0..200 {
            deep = json!([deep]);
        }
        assert_eq!(scanner(ScanRules::default()).scan_json(&deep).map(|f| f.pattern), Some("depth".into()));
    }
}
