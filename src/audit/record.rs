//! The audit record: one versioned schema for every event mcp-warden
//! writes, its canonical bytes and its hash chain.
//!
//! ```text
//!   {"v":1,"stream":…,"seq":N,"time":…,"server":…,"pod":…,"prev":H(N-1),"event":{"kind":…},"hash":H(N)}
//!   H(N) = SHA-256 of the line's bytes up to (not including) `,"hash":…}`
//! ```
//!
//! A line is valid only in its canonical form: the bytes mcp-warden would
//! write for the parsed record, byte for byte. So a hash means one thing,
//! and any changed byte shows: in the record's own hash, or in the next
//! record's `prev`.
//!
//! Records never hold tool arguments or results (only a keyed HMAC of the
//! arguments), tokens or statement literals. See `docs/audit-format.md`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the record schema written by this build.
pub const SCHEMA_VERSION: u16 = 1;
/// `prev` of the first record of a stream.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Largest record line accepted (bytes, newline excluded).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u16,
    /// The stream (one writer's chain), e.g. `clinic/patient-lookup/<pod>/<uuid>`.
    pub stream: String,
    /// Position in the stream, from 1, without gaps.
    pub seq: u64,
    /// When the writer sequenced it (RFC 3339, UTC, microseconds).
    pub time: String,
    /// The MCPServer, `namespace/name`.
    pub server: String,
    /// The pod that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Hash of the previous record ([`GENESIS`] for the first).
    pub prev: String,
    /// What happened.
    pub event: Event,
    /// SHA-256 of the canonical bytes without this field.
    pub hash: String,
}

/// What happened. `kind` says which optional fields are required.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The kind of event.
    pub kind: Kind,
    /// Ties a decision to its outcome, leases and statements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<String>,
    /// The verified caller (never for an authentication failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
    /// JSON-RPC method, e.g. `tools/call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Tool, resource prefix or prompt concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Whether the tool touches PHI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phi: Option<bool>,
    /// The decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why (policy rule, failure class); never a token or an argument.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// HMAC-SHA256 of the canonical JSON arguments, keyed outside the MCP
    /// container; proves which arguments were used without storing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_hmac: Option<String>,
    /// How the action ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// How long it took, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// A database credential lease event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The PHIStore concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// A database statement with its literal values removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// An integrity incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<Incident>,
    /// A writer restart (on `stream-start` after the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// The break-glass grant (`EmergencyAccess` name) this was done under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency_access: Option<String>,
    /// A control's new verdict on the server (kind `verdict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlVerdict>,
    /// On the outcome of a `tools/list` answer: for each tool there that
    /// declares its arguments, how the `inputSchema` the server listed
    /// differs from the declaration (an empty list: they agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_drift: Option<SchemaDrift>,
}

/// Per tool, how its listed `inputSchema` differs from its declaration.
pub type SchemaDrift = std::collections::BTreeMap<String, Vec<String>>;

/// A control's verdict on an MCPServer, as the operator put it in status
/// when it changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlVerdict {
    /// The control's id, e.g. `audit-controls`.
    pub id: String,
    /// Its citation, e.g. `45 CFR 164.312(b)`.
    pub citation: String,
    /// `Pass`, `Fail` or `Unknown`.
    pub verdict: String,
    /// The evidence, as in status.
    pub message: String,
}

/// Event kinds (also the values of `audit query --kind`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A writer started (or restarted) the stream.
    #[default]
    StreamStart,
    /// An access decision, recorded before the action.
    Decision,
    /// How an allowed action ended.
    Outcome,
    /// A database credential was issued, revoked, expired or reaped.
    Lease,
    /// A database statement, audited at the proxy.
    Statement,
    /// Tampering or loss was detected.
    Incident,
    /// A control's verdict on a server changed (written by the operator).
    Verdict,
    /// The writer closed the stream cleanly.
    StreamEnd,
}

impl Kind {
    /// The kebab-case name used in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::StreamStart => "stream-start",
            Kind::Decision => "decision",
            Kind::Outcome => "outcome",
            Kind::Lease => "lease",
            Kind::Statement => "statement",
            Kind::Incident => "incident",
            Kind::Verdict => "verdict",
            Kind::StreamEnd => "stream-end",
        }
    }
}

/// The identity behind a call, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    /// `sub`.
    pub sub: String,
    /// `iss`.
    pub iss: String,
    /// Groups from the groups claim, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// An access decision (also the values of `audit query --decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Permitted by policy.
    Allow,
    /// Refused by policy.
    Deny,
    /// No valid token.
    AuthnFailure,
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// Broad result.
    pub status: OutcomeStatus,
    /// HTTP status returned to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// JSON-RPC error code, when the server answered with an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_error: Option<i64>,
    /// Rows returned or affected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

/// Broad result of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeStatus {
    /// Completed.
    Ok,
    /// Completed with an error.
    Error,
    /// Refused after the decision (e.g. the database refused).
    Refused,
    /// Cancelled by the caller or cut short.
    Cancelled,
}

/// A database credential lease event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Opaque lease id (also the database role's comment).
    pub id: String,
    /// What happened to it.
    pub action: LeaseAction,
    /// The database role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// When it expires (RFC 3339, by the database's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
}

/// Lease lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseAction {
    /// A role was created and handed out.
    Issued,
    /// A cached, unexpired role was handed out again.
    Reused,
    /// Revoked on demand; sessions terminated.
    Revoked,
    /// Reached its expiry.
    Expired,
    /// Found expired by the reaper and dropped.
    Reaped,
}

/// An integrity incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incident {
    /// What was detected.
    pub class: IncidentClass,
    /// The stream it concerns.
    pub stream: String,
    /// Where it was detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// What was observed.
    pub detail: String,
}

/// Classes of integrity incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IncidentClass {
    /// Records missing.
    Gap,
    /// Two different records for one position.
    Fork,
    /// A stored record changed.
    Rewrite,
    /// A record sent again as new.
    Replay,
    /// A stream ended without its stream-end record.
    Unsealed,
    /// Anything else.
    Other,
}

/// What a restarting writer found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// Last durable record before the restart.
    pub previous_seq: u64,
    /// Bytes of an unfinished record discarded from the tail.
    pub torn_bytes: u64,
    /// SHA-256 of those bytes (evidence, without keeping them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn_sha256: Option<String>,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not parseable as a record. Only the position and class of the JSON
    /// error are kept: the parser's message may quote field values.
    #[error("not a valid record (JSON {class} error at column {column})")]
    Malformed {
        /// serde_json's error class.
        class: &'static str,
        /// Column of the error.
        column: usize,
    },
    /// Parseable, but not the canonical bytes of that record.
    #[error("not in canonical form: the bytes differ from the record's canonical encoding")]
    NotCanonical,
    /// The record's own hash does not match its bytes.
    #[error("record hash does not match its contents")]
    HashMismatch,
    /// Written by an unknown schema version.
    #[error("schema version {0} is not supported (this build reads {SCHEMA_VERSION})")]
    UnsupportedVersion(u16),
    /// A required field is missing or a value is malformed.
    #[error("schema: {0}")]
    Schema(String),
    /// Longer than [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
}

impl Event {
    /// An empty event of a kind; set the fields the kind requires.
    pub fn new(kind: Kind) -> Self {
        Event { kind, ..Event::default() }
    }

    /// Checks the fields the kind requires.
    pub fn check(&self) -> Result<(), RecordError> {
        let need = |present: bool, field: &str| {
            if present { Ok(()) } else { Err(RecordError::Schema(format!("{} requires {field}", self.kind.as_str()))) }
        };
        match self.kind {
            Kind::StreamStart | Kind::StreamEnd => Ok(()),
            Kind::Decision => {
                need(self.method.is_some(), "method")?;
                let decision = self.decision.ok_or_else(|| RecordError::Schema("decision requires decision".into()))?;
                // A refusal can come before the caller is known (Host,
                // Origin, authentication); an allow never can.
                if decision == Decision::Allow {
                    need(self.caller.is_some(), "caller")?;
                }
                if decision != Decision::Allow {
                    need(self.reason.is_some(), "reason")?;
                }
                Ok(())
            }
            Kind::Outcome => {
                need(self.correlation.is_some(), "correlation")?;
                need(self.outcome.is_some(), "outcome")
            }
            Kind::Lease => need(self.lease.is_some(), "lease"),
            Kind::Statement => {
                need(self.correlation.is_some(), "correlation")?;
                need(self.store.is_some(), "store")?;
                need(self.statement.is_some(), "statement")?;
                need(self.outcome.is_some(), "outcome")
            }
            Kind::Incident => need(self.incident.is_some(), "incident"),
            Kind::Verdict => need(self.control.is_some(), "control"),
        }?;
        if let Some(h) = &self.args_hmac {
            check_hex(h, "event.args_hmac")?;
        }
        Ok(())
    }
}

/// The fields that are hashed: everything but `hash`, in wire order.
#[derive(Serialize)]
struct Body<'a> {
    v: u16,
    stream: &'a str,
    seq: u64,
    time: &'a str,
    server: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    prev: &'a str,
    event: &'a Event,
}

impl Record {
    fn body(&self) -> Body<'_> {
        Body {
            v: self.v,
            stream: &self.stream,
            seq: self.seq,
            time: &self.time,
            server: &self.server,
            pod: self.pod.as_deref(),
            prev: &self.prev,
            event: &self.event,
        }
    }

    /// Canonical bytes of everything but the hash, and their SHA-256.
    fn body_and_hash(&self) -> (Vec<u8>, String) {
        // Serializing plain structs to a Vec cannot fail.
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let hash = hex::encode(Sha256::digest(&body));
        (body, hash)
    }

    /// The canonical line (without its newline), given the body bytes.
    fn line_from(body: &[u8], hash: &str) -> Vec<u8> {
        let mut line = Vec::with_capacity(body.len() + 80);
        line.extend_from_slice(body.strip_suffix(b"}").unwrap_or(body));
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\"}");
        line
    }

    /// The record's canonical line, without its newline.
    pub fn to_line(&self) -> Vec<u8> {
        let (body, _) = self.body_and_hash();
        Self::line_from(&body, &self.hash)
    }

    /// Parses one line (without its newline) and checks that it is a
    /// canonical, self-consistent record of a supported schema.
    pub fn parse_line(line: &[u8]) -> Result<Record, RecordError> {
        if line.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(line.len()));
        }
        let record: Record = serde_json::from_slice(line).map_err(|e| RecordError::Malformed {
            class: match e.classify() {
                serde_json::error::Category::Io => "io",
                serde_json::error::Category::Syntax => "syntax",
                serde_json::error::Category::Data => "data",
                serde_json::error::Category::Eof => "truncation",
            },
            column: e.column(),
        })?;
        if record.v != SCHEMA_VERSION {
            return Err(RecordError::UnsupportedVersion(record.v));
        }
        let (body, hash) = record.body_and_hash();
        if Self::line_from(&body, &record.hash) != line {
            return Err(RecordError::NotCanonical);
        }
        if hash != record.hash {
            return Err(RecordError::HashMismatch);
        }
        record.check_fields()?;
        Ok(record)
    }

    fn check_fields(&self) -> Result<(), RecordError> {
        if self.seq == 0 {
            return Err(RecordError::Schema("seq starts at 1".into()));
        }
        if self.stream.is_empty() || self.server.is_empty() {
            return Err(RecordError::Schema("stream and server must not be empty".into()));
        }
        check_hex(&self.prev, "prev")?;
        check_hex(&self.hash, "hash")?;
        DateTime::parse_from_rfc3339(&self.time).map_err(|_| RecordError::Schema("time is not RFC 3339".into()))?;
        self.event.check()
    }

    /// The record's time.
    pub fn timestamp(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.time).ok().map(|t| t.with_timezone(&Utc))
    }
}

fn check_hex(value: &str, field: &str) -> Result<(), RecordError> {
    let ok = value.len() == 64 && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok { Ok(()) } else { Err(RecordError::Schema(format!("{field} is not a lowercase hex SHA-256"))) }
}

/// Formats a time the way records carry it.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A record ready to be written: the record and its line with newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The record.
    pub record: Record,
    /// Its canonical line followed by `\n`.
    pub line: Vec<u8>,
}

/// The sequencer of one stream: assigns `seq`, `prev` and `hash`.
///
/// `prepare` does not advance the chain and `commit` does, so a writer can
/// refuse a prepared record (no space, failed write) without a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    stream: String,
    server: String,
    pod: Option<String>,
    next_seq: u64,
    prev: String,
}

impl Chain {
    /// A new stream.
    pub fn new(stream: String, server: String, pod: Option<String>) -> Self {
        Chain { stream, server, pod, next_seq: 1, prev: GENESIS.to_string() }
    }

    /// Continues a stream after the record `last_seq` with hash `last_hash`.
    pub fn resume(stream: String, server: String, pod: Option<String>, last_seq: u64, last_hash: String) -> Self {
        Chain { stream, server, pod, next_seq: last_seq + 1, prev: last_hash }
    }

    /// The stream id.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hash of the last record (or [`GENESIS`]).
    pub fn head_hash(&self) -> &str {
        &self.prev
    }

    /// Builds the next record without advancing the chain.
    pub fn prepare(&self, event: Event, time: DateTime<Utc>) -> Result<Sealed, RecordError> {
        event.check()?;
        let mut record = Record {
            v: SCHEMA_VERSION,
            stream: self.stream.clone(),
            seq: self.next_seq,
            time: format_time(time),
            server: self.server.clone(),
            pod: self.pod.clone(),
            prev: self.prev.clone(),
            event,
            hash: String::new(),
        };
        let (body, hash) = record.body_and_hash();
        let mut line = Record::line_from(&body, &hash);
        if line.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(line.len()));
        }
        record.hash = hash;
        line.push(b'\n');
        Ok(Sealed { record, line })
    }

    /// Advances the chain past a prepared record. Records must be committed
    /// in the order they were prepared.
    pub fn commit(&mut self, sealed: &Sealed) {
        self.next_seq = sealed.record.seq + 1;
        self.prev = sealed.record.hash.clone();
    }

    /// `prepare` then `commit`.
    pub fn seal(&mut self, event: Event, time: DateTime<Utc>) -> Result<Sealed, RecordError> {
        let sealed = self.prepare(event, time)?;
        self.commit(&sealed);
        Ok(sealed)
    }
}

/// Chains for the audit modules' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A stream's first `n` lines (a stream-start, then leases), and its
    /// chain to go on with.
    pub(crate) fn chain_lines(n: u64) -> (Chain, Vec<Vec<u8>>) {
        let mut chain = Chain::new("clinic/lookup/pod/s1".into(), "clinic/lookup".into(), None);
        let lines = (0..n)
            .map(|i| {
                if i == 0 {
                    return chain.seal(Event::new(Kind::StreamStart), chrono::Utc::now()).unwrap().record.to_line();
                }
                let mut e = Event::new(Kind::Lease);
                e.lease =
                    Some(Lease { id: format!("l{i}"), action: LeaseAction::Issued, role: None, valid_until: None });
                chain.seal(e, chrono::Utc::now()).unwrap().record.to_line()
            })
            .collect();
        (chain, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Chain {
        Chain::new("clinic/patient-lookup/p-1/s".into(), "clinic/patient-lookup".into(), Some("p-1".into()))
    }

    fn decision() -> Event {
        Event {
            correlation: Some("c-1".into()),
            caller: Some(Caller {
                sub: "alice".into(),
                iss: "https://login.example.org".into(),
                groups: vec!["front-desk".into()],
            }),
            method: Some("tools/call".into()),
            tool: Some("lookup_patient".into()),
            phi: Some(true),
            decision: Some(Decision::Allow),
            args_hmac: Some("ab".repeat(32)),
            ..Event::new(Kind::Decision)
        }
    }

    #[test]
    fn a_sealed_line_parses_back_to_the_same_record() {
        let mut c = chain();
        let first = c.seal(Event::new(Kind::StreamStart), Utc::now()).expect("start");
        let second = c.seal(decision(), Utc::now()).expect("decision");
        assert_eq!(first.record.seq, 1);
        assert_eq!(first.record.prev, GENESIS);
        assert_eq!(second.record.prev, first.record.hash);
        let line = &second.line[..second.line.len() - 1];
        assert_eq!(Record::parse_line(line).expect("valid"), second.record);
        assert_eq!(second.record.to_line(), line);
        let text = String::from_utf8(line.to_vec()).expect("utf-8");
        assert!(
            text.starts_with(r#"{"v":1,"stream":"#)
                && text.ends_with(&format!(r#","hash":"{}"}}"#, second.record.hash))
        );
    }

    #[test]
    fn prepare_does_not_advance() {
        let c = chain();
        let a = c.prepare(Event::new(Kind::StreamStart), Utc::now()).expect("a");
        let b = c.prepare(Event::new(Kind::StreamStart), Utc::now()).expect("b");
        assert_eq!(a.record.seq, b.record.seq);
        assert_eq!(c.next_seq(), 1);
    }

    #[test]
    fn kinds_require_their_fields() {
        let mut c = chain();
        assert!(c.seal(Event::new(Kind::Decision), Utc::now()).is_err());
        let deny_without_reason = Event { decision: Some(Decision::Deny), reason: None, ..decision() };
        assert_eq!(
            c.seal(deny_without_reason, Utc::now()).expect_err("reason"),
            RecordError::Schema("decision requires reason".into())
        );
        let authn = Event {
            kind: Kind::Decision,
            method: Some("tools/call".into()),
            decision: Some(Decision::AuthnFailure),
            reason: Some("expired token".into()),
            ..Event::default()
        };
        assert!(c.seal(authn, Utc::now()).is_ok(), "an authentication failure has no caller");
        let allow_without_caller = Event { caller: None, ..decision() };
        assert_eq!(
            c.seal(allow_without_caller, Utc::now()).expect_err("caller"),
            RecordError::Schema("decision requires caller".into())
        );
        assert!(c.seal(Event::new(Kind::Outcome), Utc::now()).is_err());
        assert!(c.seal(Event { args_hmac: Some("not-hex".into()), ..decision() }, Utc::now()).is_err());
        assert_eq!(c.next_seq(), 2, "refused events do not advance the chain");
    }

    #[test]
    fn non_canonical_or_altered_lines_are_refused() {
        let sealed = chain().seal(decision(), Utc::now()).expect("sealed");
        let line = String::from_utf8(sealed.line[..sealed.line.len() - 1].to_vec()).expect("utf-8");
        let spaced = line.replacen(r#""v":1"#, r#""v": 1"#, 1);
        assert_eq!(Record::parse_line(spaced.as_bytes()), Err(RecordError::NotCanonical));
        let escaped = line.replacen("alice", r"\u0061lice", 1);
        assert_eq!(Record::parse_line(escaped.as_bytes()), Err(RecordError::NotCanonical));
        let altered = line.replacen("alice", "alicf", 1);
        assert_eq!(Record::parse_line(altered.as_bytes()), Err(RecordError::HashMismatch));
        let extra = line.replacen(r#""v":1,"#, r#""v":1,"x":2,"#, 1);
        assert!(matches!(Record::parse_line(extra.as_bytes()), Err(RecordError::Malformed { .. })));
        let v2 = line.replacen(r#""v":1"#, r#""v":2"#, 1);
        assert_eq!(Record::parse_line(v2.as_bytes()), Err(RecordError::UnsupportedVersion(2)));
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let err = Record::parse_line(br#"{"v":1,"stream":"x","seq":"patient-12345678"}"#).expect_err("bad");
        assert!(!err.to_string().contains("12345678"), "{err}");
    }

    #[test]
    fn oversized_records_are_refused() {
        let big = Event { reason: Some("x".repeat(MAX_RECORD_BYTES)), ..decision() };
        assert!(matches!(chain().seal(big, Utc::now()), Err(RecordError::TooLarge(_))));
    }
}
