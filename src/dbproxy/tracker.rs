//! Which statement each server answer belongs to: a pure state machine fed
//! the client's and the server's messages in order, producing one finished
//! statement per simple query or per extended-protocol Execute, with its
//! rows, outcome and duration. It also says what the proxy must refuse.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres_protocol::message::backend::Message;

use super::normalize::normalize;
use super::wire::{Frame, WireError, cstring};

/// How a statement ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Completed.
    Ok,
    /// The server returned an error with this SQLSTATE.
    Failed(String),
    /// The proxy refused it, for this reason; it never reached the server.
    Refused(&'static str),
    /// Not executed (skipped after an earlier error, or the connection
    /// ended first), for this reason.
    NotRun(&'static str),
}

/// A statement, finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Text with literals removed.
    pub statement: String,
    /// Rows returned or affected.
    pub rows: u64,
    /// How it ended.
    pub ending: Ending,
    /// From sending to its answer.
    pub duration: Duration,
}

/// What to do with a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum FrontAction {
    /// Send it to the server.
    Forward,
    /// Answer the client with these bytes instead; the statement is
    /// recorded as refused.
    Answer(Vec<Bytes>),
    /// Refused, and the connection ends for this reason (the statement is
    /// recorded as refused; [`refusal_notice`] says what the client is told).
    Close(&'static str),
}

/// What to do with a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum BackAction {
    /// Send it to the client.
    Forward,
    /// End the connection: the server started something the policy refuses.
    Close(&'static str),
}

struct Pending {
    statement: String,
    simple: bool,
    started: Instant,
    rows_seen: u64,
    rows_tagged: u64,
    error: Option<String>,
}

/// The statement state of one proxied connection.
pub struct Tracker {
    allow_copy: bool,
    pending: VecDeque<Pending>,
    prepared: Named,
    portals: Named,
    status: u8,
    /// Normalized texts of recently parsed statements: a client re-parsing
    /// the same text (the extended protocol's unnamed statement) is not
    /// tokenized again.
    seen: HashMap<String, Arc<str>>,
}

/// Most texts kept in [`Tracker::seen`] before it starts over.
const SEEN_TEXTS: usize = 256;
/// Longest query remembered there (a message may hold 16 MiB: 256 of those
/// would be 4 GiB of the sidecar's memory).
const SEEN_QUERY_BYTES: usize = 16 * 1024;
/// Most prepared statements and portals a connection may keep open
/// together. PostgreSQL sets no limit, and the texts are kept here for the
/// records of their executions; without one, an MCP server preparing names
/// without end would grow the sidecar — the pod's auditor — instead of its
/// own container. Drivers' statement caches keep a few hundred.
pub const MAX_KEPT_NAMES: usize = 10_000;
/// Most bytes of names and texts those may hold (counted per name, though a
/// portal shares its statement's text): two statements of the largest
/// message the proxy reads.
pub const MAX_KEPT_BYTES: usize = 2 * super::wire::MAX_MESSAGE_BYTES;
/// Why a connection ends when it keeps more than that.
pub const TOO_MANY_KEPT: &str = "too_many_prepared_statements";

/// Prepared statements or portals by name, with the bytes they hold.
#[derive(Default)]
struct Named {
    texts: HashMap<String, Arc<str>>,
    bytes: usize,
}

impl Named {
    fn text(&self, name: &str) -> Arc<str> {
        self.texts.get(name).cloned().unwrap_or_else(|| UNKNOWN_STATEMENT.into())
    }

    fn insert(&mut self, name: String, text: Arc<str>) {
        let name_bytes = name.len();
        self.bytes += name_bytes + text.len();
        if let Some(old) = self.texts.insert(name, text) {
            // Replaced: one key (equal to `name`) stays, the old text goes.
            self.bytes -= name_bytes + old.len();
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some((name, text)) = self.texts.remove_entry(name) {
            self.bytes -= name.len() + text.len();
        }
    }
}

impl Tracker {
    /// A tracker for a connection whose policy does (or does not) allow COPY.
    pub fn new(allow_copy: bool) -> Self {
        Tracker {
            allow_copy,
            pending: VecDeque::new(),
            prepared: Named::default(),
            portals: Named::default(),
            status: b'I',
            seen: HashMap::new(),
        }
    }

    /// Statements sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// A client message, before it is forwarded. Finished statements (a
    /// refusal) are pushed to `done`.
    pub fn client(&mut self, frame: &Frame, now: Instant, done: &mut Vec<Finished>) -> Result<FrontAction, WireError> {
        let mut body = frame.body();
        match frame.tag {
            b'Q' => {
                let normalized = normalize(&cstring(&mut body)?);
                // Answered here only when nothing is in flight: an answer
                // must not overtake the server's to earlier messages. With
                // statements in flight the server's CopyResponse ends the
                // connection instead (see `server`).
                if normalized.copy && !self.allow_copy && self.pending.is_empty() {
                    done.push(refused(normalized.text, COPY_NOT_ALLOWED));
                    return Ok(FrontAction::Answer(vec![
                        super::wire::backend::error("ERROR", "42501", COPY_REFUSED),
                        super::wire::backend::ready_for_query(self.status),
                    ]));
                }
                self.pending.push_back(Pending::new(normalized.text, true, now));
            }
            b'P' => {
                let name = cstring(&mut body)?;
                let query = cstring(&mut body)?;
                let text = match self.seen.get(&query) {
                    Some(text) => Arc::clone(text),
                    None => {
                        let text: Arc<str> = normalize(&query).text.into();
                        if query.len() <= SEEN_QUERY_BYTES {
                            if self.seen.len() >= SEEN_TEXTS {
                                self.seen.clear();
                            }
                            self.seen.insert(query, Arc::clone(&text));
                        }
                        text
                    }
                };
                self.prepared.insert(name, Arc::clone(&text));
                if self.keeps_too_much() {
                    done.push(refused(text.to_string(), TOO_MANY_KEPT));
                    return Ok(FrontAction::Close(TOO_MANY_KEPT));
                }
            }
            b'B' => {
                let portal = cstring(&mut body)?;
                let statement = cstring(&mut body)?;
                let text = self.prepared.text(&statement);
                self.portals.insert(portal, Arc::clone(&text));
                if self.keeps_too_much() {
                    done.push(refused(text.to_string(), TOO_MANY_KEPT));
                    return Ok(FrontAction::Close(TOO_MANY_KEPT));
                }
            }
            b'E' => {
                let portal = cstring(&mut body)?;
                self.pending.push_back(Pending::new(self.portals.text(&portal).to_string(), false, now));
            }
            b'C' => {
                let kind = body.first().copied().ok_or(WireError::Malformed("close"))?;
                let name = cstring(&mut &body[1..])?;
                match kind {
                    b'S' => self.prepared.remove(&name),
                    _ => self.portals.remove(&name),
                };
            }
            // The fast-path function call bypasses statements altogether.
            b'F' if !self.pending.is_empty() => {
                done.push(refused("<function call>".into(), "function_call_not_allowed"));
                return Err(WireError::Malformed("a fast-path function call while statements are in flight"));
            }
            b'F' => {
                done.push(refused("<function call>".into(), "function_call_not_allowed"));
                return Ok(FrontAction::Answer(vec![
                    super::wire::backend::error("ERROR", "42501", "the fast-path function call is not allowed"),
                    super::wire::backend::ready_for_query(self.status),
                ]));
            }
            _ => {}
        }
        Ok(FrontAction::Forward)
    }

    /// A server message, before it is forwarded.
    pub fn server(&mut self, frame: &Frame, now: Instant, done: &mut Vec<Finished>) -> Result<BackAction, WireError> {
        match frame.tag {
            b'D' => {
                if let Some(p) = self.pending.front_mut() {
                    p.rows_seen += 1;
                }
            }
            b'C' => {
                let tag = match parse(frame)? {
                    Message::CommandComplete(body) => body.tag().map_err(|_| WireError::Malformed("tag"))?.to_string(),
                    _ => return Err(WireError::Malformed("command complete")),
                };
                let rows = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                if let Some(p) = self.pending.front_mut() {
                    p.rows_tagged += rows;
                    if !p.simple {
                        let p = self.pending.pop_front().map(|p| p.finish(now));
                        done.extend(p);
                    }
                }
            }
            b'I' | b's' if self.pending.front().is_some_and(|p| !p.simple) => {
                done.extend(self.pending.pop_front().map(|p| p.finish(now)));
            }
            b'E' => {
                let code = match parse(frame)? {
                    Message::ErrorResponse(body) => {
                        let mut code = String::from("XX000");
                        let mut fields = body.fields();
                        while let Ok(Some(field)) = fallible_iterator::FallibleIterator::next(&mut fields) {
                            if field.type_() == b'C' {
                                code = String::from_utf8_lossy(field.value_bytes()).into_owned();
                            }
                        }
                        code
                    }
                    _ => return Err(WireError::Malformed("error response")),
                };
                if let Some(p) = self.pending.front_mut() {
                    p.error = Some(code);
                    if !p.simple {
                        done.extend(self.pending.pop_front().map(|p| p.finish(now)));
                    }
                }
            }
            b'Z' => {
                self.status = frame.body().first().copied().unwrap_or(b'I');
                while let Some(p) = self.pending.pop_front() {
                    if p.simple {
                        done.push(p.finish(now));
                        // A simple query ends at its own ReadyForQuery.
                        break;
                    }
                    done.push(p.not_run(now, "skipped_after_error"));
                }
            }
            b'S' if backslash_literals(frame) => {
                // The texts kept of the statements in flight were read as
                // if a literal could not hold `\'`; under this setting the
                // server reads them otherwise, and what looked like words
                // may be a literal's value. Their records keep no text.
                while let Some(mut p) = self.pending.pop_front() {
                    p.statement = REDACTED_BACKSLASH_LITERALS.into();
                    let mut f = p.finish(now);
                    f.ending = Ending::Refused(BACKSLASH_LITERALS);
                    done.push(f);
                }
                return Ok(BackAction::Close(BACKSLASH_LITERALS));
            }
            b'G' | b'H' | b'W' if !self.allow_copy => {
                if let Some(p) = self.pending.pop_front() {
                    let mut f = p.finish(now);
                    f.ending = Ending::Refused(COPY_NOT_ALLOWED);
                    done.push(f);
                }
                return Ok(BackAction::Close(COPY_NOT_ALLOWED));
            }
            _ => {}
        }
        Ok(BackAction::Forward)
    }

    /// Whether the prepared statements and portals kept exceed what one
    /// connection may keep.
    fn keeps_too_much(&self) -> bool {
        self.prepared.texts.len() + self.portals.texts.len() > MAX_KEPT_NAMES
            || self.prepared.bytes + self.portals.bytes > MAX_KEPT_BYTES
    }

    /// The connection ended: what was still in flight did not finish.
    pub fn end(&mut self, now: Instant, reason: &'static str, done: &mut Vec<Finished>) {
        while let Some(p) = self.pending.pop_front() {
            done.push(p.not_run(now, reason));
        }
    }
}

/// Why a COPY is refused (and its connection ends, when the server started it).
pub const COPY_NOT_ALLOWED: &str = "copy_not_allowed";
/// Told to a client whose statement holds a COPY.
pub const COPY_REFUSED: &str = "COPY is not allowed for this tool: its policy does not set allowCopy";

/// What a client is told (SQLSTATE, message) when the connection ends for
/// `reason`, one of the tracker's refusals ([`FrontAction::Close`],
/// [`BackAction::Close`]).
pub fn refusal_notice(reason: &str) -> (&'static str, &'static str) {
    match reason {
        BACKSLASH_LITERALS => (
            "0A000",
            "standard_conforming_strings off is not served: the proxy could not record statements without their values",
        ),
        TOO_MANY_KEPT => {
            ("54000", "too many prepared statements and portals open on this connection; close those no longer needed")
        }
        COPY_NOT_ALLOWED => ("42501", COPY_REFUSED),
        _ => ("42501", "refused by the proxy"),
    }
}
const UNKNOWN_STATEMENT: &str = "<unknown prepared statement>";

/// Why a connection ends when string literals start taking backslash
/// escapes.
pub const BACKSLASH_LITERALS: &str = "standard_conforming_strings_off";
/// The text recorded for statements in flight when that happens.
const REDACTED_BACKSLASH_LITERALS: &str = "<statement text withheld: standard_conforming_strings turned off>";

/// Whether a server message says string literals now take backslash
/// escapes (`standard_conforming_strings` off, reported by ParameterStatus
/// at login and whenever it changes). The statement normalizer reads
/// literals as PostgreSQL does only with it on: with it off,
/// `'x\' OR Joe \''` is one literal, and a normalizer reading `\'` as the
/// end of one would keep `Joe` — a value in the audit trail.
pub fn backslash_literals(frame: &Frame) -> bool {
    frame.tag == b'S'
        && matches!(parse(frame), Ok(Message::ParameterStatus(body))
            if body.name().is_ok_and(|n| n == "standard_conforming_strings")
                && body.value().is_ok_and(|v| v != "on"))
}

fn parse(frame: &Frame) -> Result<Message, WireError> {
    let mut buf = bytes::BytesMut::from(&frame.raw[..]);
    match Message::parse(&mut buf) {
        Ok(Some(message)) => Ok(message),
        _ => Err(WireError::Malformed("server message")),
    }
}

fn refused(statement: String, reason: &'static str) -> Finished {
    Finished { statement, rows: 0, ending: Ending::Refused(reason), duration: Duration::ZERO }
}

impl Pending {
    fn new(statement: String, simple: bool, started: Instant) -> Self {
        Pending { statement, simple, started, rows_seen: 0, rows_tagged: 0, error: None }
    }

    fn finish(self, now: Instant) -> Finished {
        let ending = match self.error {
            Some(code) => Ending::Failed(code),
            None => Ending::Ok,
        };
        Finished {
            statement: self.statement,
            rows: self.rows_tagged.max(self.rows_seen),
            ending,
            duration: now.saturating_duration_since(self.started),
        }
    }

    fn not_run(self, now: Instant, reason: &'static str) -> Finished {
        let mut f = self.finish(now);
        if matches!(f.ending, Ending::Ok) {
            f.ending = Ending::NotRun(reason);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        Frame { tag, raw: b.freeze() }
    }

    fn error(code: &str) -> Frame {
        Frame { tag: b'E', raw: super::super::wire::backend::error("ERROR", code, "x") }
    }

    fn run(tracker: &mut Tracker, client: &[Frame], server: &[Frame]) -> Vec<Finished> {
        let mut done = Vec::new();
        let now = Instant::now();
        for f in client {
            tracker.client(f, now, &mut done).unwrap();
        }
        for f in server {
            tracker.server(f, now, &mut done).unwrap();
        }
        done
    }

    #[test]
    fn a_simple_query_is_one_statement_with_its_rows() {
        let mut t = Tracker::new(false);
        let done = run(
            &mut t,
            &[frame(b'Q', b"SELECT name FROM p WHERE mrn = '1'\0")],
            &[frame(b'T', b""), frame(b'D', b""), frame(b'D', b""), frame(b'C', b"SELECT 2\0"), frame(b'Z', b"I")],
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].statement, "SELECT name FROM p WHERE mrn = ?");
        assert_eq!(done[0].rows, 2);
        assert_eq!(done[0].ending, Ending::Ok);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn extended_pipelines_are_matched_in_order_and_skips_recorded() {
        let mut t = Tracker::new(false);
        let client = [
            frame(b'P', b"s1\0SELECT a FROM t WHERE id = $1\0\0\0"),
            frame(b'B', b"\0s1\0\0\0\0\0\0\0"),
            frame(b'E', b"\0\0\0\0\0"),
            frame(b'P', b"\0UPDATE t SET a = 'x'\0\0\0"),
            frame(b'B', b"\0\0\0\0\0\0\0\0"),
            frame(b'E', b"\0\0\0\0\0"),
            frame(b'S', b""),
        ];
        let server = [
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'D', b""),
            frame(b'C', b"SELECT 1\0"),
            frame(b'1', b""),
            frame(b'2', b""),
            error("42501"),
            frame(b'Z', b"I"),
        ];
        let done = run(&mut t, &client, &server);
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].statement, "SELECT a FROM t WHERE id = $1");
        assert_eq!((done[0].rows, &done[0].ending), (1, &Ending::Ok));
        assert_eq!(done[1].statement, "UPDATE t SET a = ?");
        assert_eq!(done[1].ending, Ending::Failed("42501".into()));

        let done = run(
            &mut t,
            &[frame(b'B', b"\0s1\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0")],
            &[error("57014"), frame(b'Z', b"E")],
        );
        assert_eq!(done[0].ending, Ending::Failed("57014".into()));
        assert_eq!(done[1].ending, Ending::NotRun("skipped_after_error"));
    }

    #[test]
    fn copy_is_refused_before_and_after_it_reaches_the_server() {
        let mut t = Tracker::new(false);
        let mut done = Vec::new();
        let action = t.client(&frame(b'Q', b"COPY p TO STDOUT\0"), Instant::now(), &mut done).unwrap();
        assert!(matches!(action, FrontAction::Answer(ref a) if a.len() == 2));
        assert_eq!(done[0].ending, Ending::Refused("copy_not_allowed"));
        // Hidden from the text (a prepared statement named elsewhere): the
        // server's CopyOutResponse closes the connection.
        let done = run(&mut t, &[frame(b'E', b"\0\0\0\0\0")], &[]);
        assert!(done.is_empty());
        let mut done = Vec::new();
        assert_eq!(
            t.server(&frame(b'H', b"\0\0\0"), Instant::now(), &mut done).unwrap(),
            BackAction::Close("copy_not_allowed")
        );
        assert_eq!(done[0].ending, Ending::Refused("copy_not_allowed"));

        let mut allowed = Tracker::new(true);
        let done = run(&mut allowed, &[frame(b'Q', b"COPY p TO STDOUT\0")], &[frame(b'H', b"\0\0\0")]);
        assert!(done.is_empty());
    }

    #[test]
    fn with_statements_in_flight_nothing_is_answered_out_of_order() {
        let mut t = Tracker::new(false);
        let mut done = Vec::new();
        let now = Instant::now();
        assert_eq!(t.client(&frame(b'Q', b"SELECT 1\0"), now, &mut done).unwrap(), FrontAction::Forward);
        // A COPY behind it goes to the server; its CopyOutResponse closes.
        assert_eq!(t.client(&frame(b'Q', b"COPY p TO STDOUT\0"), now, &mut done).unwrap(), FrontAction::Forward);
        assert!(done.is_empty());
        // A fast-path call behind it ends the connection.
        assert!(t.client(&frame(b'F', b"\0\0\0\x01"), now, &mut done).is_err());
        assert_eq!(done[0].ending, Ending::Refused("function_call_not_allowed"));
    }

    #[test]
    fn function_calls_are_refused_and_malformed_messages_are_errors() {
        let mut t = Tracker::new(true);
        let mut done = Vec::new();
        assert!(matches!(
            t.client(&frame(b'F', b"\0\0\0\x01"), Instant::now(), &mut done).unwrap(),
            FrontAction::Answer(_)
        ));
        assert_eq!(done[0].ending, Ending::Refused("function_call_not_allowed"));
        assert!(t.client(&frame(b'Q', b"SELECT 1"), Instant::now(), &mut done).is_err());
        assert!(t.server(&frame(b'C', b"SELECT"), Instant::now(), &mut done).is_err());
    }

    #[test]
    fn literals_with_backslash_escapes_end_the_connection_and_withhold_texts_in_flight() {
        let mut tracker = Tracker::new(false);
        let sql = "SET standard_conforming_strings = off; SELECT 'x\\' OR Joe Doe \\''";
        let mut query = sql.as_bytes().to_vec();
        query.push(0);
        let mut done = Vec::new();
        let now = Instant::now();
        assert_eq!(tracker.client(&frame(b'Q', &query), now, &mut done).expect("query"), FrontAction::Forward);
        let status = |value: &str| frame(b'S', format!("standard_conforming_strings\0{value}\0").as_bytes());
        assert!(backslash_literals(&status("off")));
        assert!(!backslash_literals(&status("on")));
        assert!(!backslash_literals(&frame(b'S', b"application_name\0off\0")));
        assert_eq!(tracker.server(&frame(b'C', b"SET\0"), now, &mut done).expect("tag"), BackAction::Forward);
        let closed = tracker.server(&status("off"), now, &mut done).expect("status");
        assert_eq!(closed, BackAction::Close(BACKSLASH_LITERALS));
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].ending, Ending::Refused(BACKSLASH_LITERALS));
        assert!(!done[0].statement.contains("Joe") && !done[0].statement.contains("Doe"), "{done:?}");
        assert_eq!(tracker.in_flight(), 0);
        // Why: read as with the setting on, the value's words stay.
        assert_eq!(normalize("SELECT 'x\\' OR Joe Doe \\''").text, "SELECT ? OR Joe Doe ??");
    }

    fn parse(name: &str, query: &str) -> Frame {
        frame(b'P', format!("{name}\0{query}\0\0\0").as_bytes())
    }

    fn bind(portal: &str, statement: &str) -> Frame {
        frame(b'B', format!("{portal}\0{statement}\0\0\0\0\0\0\0").as_bytes())
    }

    fn close(kind: u8, name: &str) -> Frame {
        frame(b'C', format!("{}{name}\0", kind as char).as_bytes())
    }

    #[test]
    fn a_connection_keeping_too_many_prepared_statements_is_closed_and_recorded() {
        let mut t = Tracker::new(false);
        let (now, mut done) = (Instant::now(), Vec::new());
        for i in 0..MAX_KEPT_NAMES {
            let action = t.client(&parse(&format!("s{i}"), "SELECT a FROM t WHERE id = 7"), now, &mut done);
            assert_eq!(action.unwrap(), FrontAction::Forward, "statement {i}");
        }
        let last = t.client(&parse("one_more", "SELECT a FROM t WHERE id = 7"), now, &mut done).unwrap();
        assert_eq!(last, FrontAction::Close(TOO_MANY_KEPT));
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].statement.as_str(), &done[0].ending),
            ("SELECT a FROM t WHERE id = ?", &Ending::Refused(TOO_MANY_KEPT))
        );
        assert_eq!(refusal_notice(TOO_MANY_KEPT).0, "54000");

        // Portals count too.
        let mut t = Tracker::new(false);
        t.client(&parse("s", "SELECT 1"), now, &mut done).unwrap();
        let closed = (0..=MAX_KEPT_NAMES).position(|i| {
            t.client(&bind(&format!("p{i}"), "s"), now, &mut done).unwrap() == FrontAction::Close(TOO_MANY_KEPT)
        });
        assert_eq!(closed, Some(MAX_KEPT_NAMES - 1));
    }

    #[test]
    fn closed_and_replaced_statements_free_what_they_held() {
        let mut t = Tracker::new(false);
        let (now, mut done) = (Instant::now(), Vec::new());
        // Far more names than may be kept at once, each closed after use.
        for i in 0..3 * MAX_KEPT_NAMES {
            let name = format!("s{i}");
            for f in [parse(&name, "SELECT 1"), bind(&name, &name), close(b'P', &name), close(b'S', &name)] {
                assert_eq!(t.client(&f, now, &mut done).unwrap(), FrontAction::Forward, "name {i}");
            }
        }
        assert_eq!((t.prepared.bytes, t.portals.bytes), (0, 0));
        // A 1 MiB name, replaced 64 times: one kept.
        let name = "n".repeat(1024 * 1024);
        for _ in 0..64 {
            assert_eq!(t.client(&parse(&name, "SELECT 1"), now, &mut done).unwrap(), FrontAction::Forward);
        }
        assert_eq!(t.prepared.bytes, name.len() + "SELECT 1".len());
        assert!(done.is_empty());
    }

    #[test]
    fn the_bytes_kept_are_bounded_even_under_the_count() {
        let mut t = Tracker::new(false);
        let (now, mut done) = (Instant::now(), Vec::new());
        // Names of 1 MiB (the protocol bounds them only by the message).
        let name = |i: usize| format!("{i:08}{}", "n".repeat(1024 * 1024 - 8));
        let closed = (0..MAX_KEPT_NAMES).position(|i| {
            t.client(&parse(&name(i), "SELECT 1"), now, &mut done).unwrap() == FrontAction::Close(TOO_MANY_KEPT)
        });
        assert_eq!(closed, Some(MAX_KEPT_BYTES / (1024 * 1024 + "SELECT 1".len())));
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn only_short_queries_are_remembered_for_their_texts() {
        let mut t = Tracker::new(false);
        let (now, mut done) = (Instant::now(), Vec::new());
        let long = |i: usize| format!("SELECT {} FROM t{i}", vec!["a"; SEEN_QUERY_BYTES / 2].join(","));
        for i in 0..2 * SEEN_TEXTS {
            let mut queries = vec![format!("SELECT a FROM t WHERE id = {i}")];
            if i % 64 == 0 {
                queries.push(long(i));
            }
            for query in queries {
                assert_eq!(t.client(&parse("", &query), now, &mut done).unwrap(), FrontAction::Forward);
            }
        }
        assert!(!t.seen.is_empty() && t.seen.len() <= SEEN_TEXTS);
        assert!(t.seen.keys().all(|query| query.len() <= SEEN_QUERY_BYTES));
        // A long query's text is computed each time, the same.
        t.client(&parse("", &long(7)), now, &mut done).unwrap();
        assert_eq!(t.prepared.text("").as_ref(), normalize(&long(7)).text);
    }

    #[test]
    fn each_refusal_tells_the_client_its_own_reason() {
        assert_eq!(refusal_notice(COPY_NOT_ALLOWED), ("42501", COPY_REFUSED));
        let (code, text) = refusal_notice(BACKSLASH_LITERALS);
        assert_eq!(code, "0A000");
        assert!(text.contains("standard_conforming_strings") && !text.contains("COPY"), "{text}");
        assert!(refusal_notice(TOO_MANY_KEPT).1.contains("prepared statements"));
    }

    #[test]
    fn in_flight_statements_end_with_the_connection() {
        let mut t = Tracker::new(false);
        run(&mut t, &[frame(b'Q', b"SELECT pg_sleep(10)\0")], &[]);
        let mut done = Vec::new();
        t.end(Instant::now(), "call_ended", &mut done);
        assert_eq!(done[0].ending, Ending::NotRun("call_ended"));
    }
}
