//! The collector's storage: one directory per stream, in the WAL's own
//! segment format (so `audit verify` reads it), append-only, fsync'd
//! before a batch is acknowledged, idempotent by (stream, seq, hash).
//!
//! ```text
//!   DATA/streams/<sha256(stream)[..32]>/stream.json   {stream, sender}
//!                                      /anchor.json   when the stream arrived after seq 1 (a gap, on record)
//!                                      /seg-*.jsonl   canonical lines, verified as they arrive
//!   DATA/incidents/                                    the collector's own WAL of incident records
//! ```
//!
//! A batch is judged whole before anything is written: every line must be
//! a canonical record of the batch's stream; records already stored must
//! be byte-identical (a resend); new records must continue the chain. A
//! fork or rewrite refuses the batch and is an incident; a gap (records
//! that never arrived) is an incident and the rest is stored, so the loss
//! is on the record and `verify` fails at it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::record::{IncidentClass, Record, SCHEMA_VERSION};
use crate::audit::segment::{self, Anchor};

use super::recent::{self, Known, RecentHashes};

/// A new segment is started past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Who sent a stream, as the collector authenticated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StreamMeta {
    stream: String,
    sender: String,
}

/// Where a stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The stream.
    pub stream: String,
    /// Who sends it.
    pub sender: String,
    /// Its last stored seq.
    pub seq: u64,
    /// That record's hash.
    pub hash: String,
    /// Its directory.
    pub dir: PathBuf,
}

/// What a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stream.
    pub stream: String,
    /// Everything up to this seq is durable at the collector.
    pub durable_through: u64,
    /// Records newly written.
    pub written: usize,
    /// Records that were already stored (resends).
    pub duplicates: usize,
    /// Incidents the batch raised (recorded by the caller).
    pub incidents: Vec<(IncidentClass, u64, String)>,
}

/// Why a batch was refused. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a batch of valid records of one stream.
    #[error("invalid batch: {0}")]
    Invalid(String),
    /// The stream belongs to another sender.
    #[error("stream {stream} belongs to another sender")]
    NotYourStream {
        /// The stream.
        stream: String,
    },
    /// A record contradicts what is stored (fork or rewrite).
    #[error("{class:?} in stream {stream} at seq {seq}: {detail}")]
    Integrity {
        /// What kind.
        class: IncidentClass,
        /// The stream.
        stream: String,
        /// Where.
        seq: u64,
        /// What was seen.
        detail: String,
    },
    /// Storage failed (disk full, …); retry later.
    #[error("storage failed: {0}")]
    Storage(String),
}

struct StreamState {
    dir: PathBuf,
    meta: StreamMeta,
    last_seq: u64,
    last_hash: String,
    /// The newest stored positions' hashes, for checking resends.
    recent: RecentHashes,
    active: Option<(PathBuf, u64)>,
    /// From the last stored record: its MCPServer, pod and time.
    server: String,
    pod: Option<String>,
    last_time: Option<String>,
    sealed: bool,
    /// Found ended without its stream-end (its pod gone): an incident was
    /// raised, and a marker file keeps that across restarts.
    abandoned: bool,
    /// Use made under break-glass grants, by grant name.
    grants: BTreeMap<String, GrantUse>,
    /// Tools whose listed inputSchema differed from their declaration in
    /// the newest list that showed them (a tool that agrees again leaves).
    schema_drift: BTreeMap<String, Vec<String>>,
}

/// Marker file of an abandoned stream, in its directory.
const ABANDONED_MARKER: &str = "abandoned";

/// A stream found ended without its stream-end record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    /// The stream.
    pub stream: String,
    /// Its pod.
    pub pod: Option<String>,
    /// The last record stored of it.
    pub last_seq: u64,
}

impl StreamState {
    /// Keeps a stored record's hash for checking resends, in a bounded
    /// window (on open as while running: a stream of millions of records
    /// must not be held in memory); a sealed stream keeps only its tail.
    fn remember(&mut self, seq: u64, hash: &str) {
        if self.sealed {
            self.recent.push(seq, hash, recent::SEALED_WINDOW);
            self.recent.shrink_to(recent::SEALED_WINDOW);
        } else {
            self.recent.push(seq, hash, recent::OPEN_WINDOW);
        }
    }

    fn note(&mut self, record: &Record) {
        self.server.clone_from(&record.server);
        self.pod.clone_from(&record.pod);
        self.last_time = Some(record.time.clone());
        self.sealed = record.event.kind == crate::audit::record::Kind::StreamEnd;
        if let Some(grant) = &record.event.emergency_access
            && is_use(&record.event)
        {
            self.grants.entry(grant.clone()).or_default().note(&record.time);
        }
        for (tool, findings) in record.event.schema_drift.iter().flatten() {
            if findings.is_empty() {
                self.schema_drift.remove(tool);
            } else {
                self.schema_drift.insert(tool.clone(), findings.clone());
            }
        }
    }
}

/// A record that is a use of access: an allowed decision, or a credential
/// issued or reused (outcomes and statements follow a decision).
fn is_use(event: &crate::audit::record::Event) -> bool {
    use crate::audit::record::{Decision, Kind, LeaseAction};
    match event.kind {
        Kind::Decision => event.decision == Some(Decision::Allow),
        Kind::Lease => {
            event.lease.as_ref().is_some_and(|l| matches!(l.action, LeaseAction::Issued | LeaseAction::Reused))
        }
        _ => false,
    }
}

/// What was done under one break-glass grant: when first and last, how
/// often (allowed decisions and credentials issued or reused).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantUse {
    /// Time of the first use (RFC 3339, as recorded).
    pub first: String,
    /// Time of the last use.
    pub last: String,
    /// Uses.
    pub uses: u64,
}

impl GrantUse {
    fn note(&mut self, time: &str) {
        if self.uses == 0 || time < self.first.as_str() {
            self.first = time.to_string();
        }
        if time > self.last.as_str() {
            self.last = time.to_string();
        }
        self.uses += 1;
    }

    fn merge(&mut self, other: &GrantUse) {
        if self.uses == 0 || (other.uses > 0 && other.first < self.first) {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
        self.uses += other.uses;
    }
}

/// What the collector can say about one MCPServer's streams.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerHealth {
    /// Streams received.
    pub streams: u32,
    /// Streams still open (no stream-end yet), by pod.
    pub open_streams: BTreeMap<String, StreamHealth>,
    /// Integrity incidents raised on its streams.
    pub open_incidents: u32,
    /// Use made under break-glass grants, by grant name (every stream of
    /// the server: sidecars' and the broker's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub emergency_use: BTreeMap<String, GrantUse>,
    /// Tools whose listed inputSchema differs from their declared
    /// arguments, as the newest list of each open stream showed them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schema_drift: BTreeMap<String, Vec<String>>,
}

/// One open stream.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamHealth {
    /// Last stored sequence number.
    pub last_seq: u64,
    /// Time of the last stored record.
    pub last_record_time: Option<String>,
}

/// Every stream the collector holds.
pub struct Storage {
    root: PathBuf,
    streams: HashMap<String, StreamState>,
    incidents: HashMap<String, u32>,
    /// The bytes of the batch being appended, kept for the next batch.
    append_buffer: Vec<u8>,
}

/// The append buffer is kept up to this capacity (a shipper's batch is at
/// most 1 MiB); a larger batch's buffer is let go after its append.
const APPEND_BUFFER_KEPT: usize = 2 * 1024 * 1024;

impl From<std::io::Error> for Refused {
    fn from(e: std::io::Error) -> Refused {
        io(e)
    }
}

fn io(e: impl std::fmt::Display) -> Refused {
    Refused::Storage(e.to_string())
}

/// Appends `bytes` to the segment at `path` (`len` bytes long) and makes
/// them durable; on failure cuts the segment back to `len`, so no partial
/// record stays.
fn append_durably(path: &Path, len: u64, bytes: &[u8]) -> Result<(), Refused> {
    let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
    if let Err(e) = file.write_all(bytes).and_then(|_| file.sync_data()) {
        let _ = file.set_len(len);
        return Err(io(e));
    }
    Ok(())
}

impl Storage {
    /// Opens (or creates) the storage under `root/streams`, loading each
    /// stream's head from disk.
    pub fn open(root: &Path) -> Result<Storage, Refused> {
        let dir = root.join("streams");
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut streams = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Ok(bytes) = std::fs::read(path.join("stream.json")) else { continue };
            let meta: StreamMeta = serde_json::from_slice(&bytes).map_err(io)?;
            let mut state = StreamState {
                dir: path.clone(),
                meta: meta.clone(),
                last_seq: 0,
                last_hash: crate::audit::record::GENESIS.to_string(),
                recent: RecentHashes::default(),
                active: None,
                server: String::new(),
                pod: None,
                last_time: None,
                sealed: false,
                abandoned: path.join(ABANDONED_MARKER).exists(),
                grants: BTreeMap::new(),
                schema_drift: BTreeMap::new(),
            };
            if let Some(anchor) = segment::read_anchor(&path).map_err(io)? {
                state.last_seq = anchor.seq;
                state.last_hash = anchor.hash;
            }
            let segments = segment::list_segments(&path).map_err(io)?;
            let last_segment = segments.last().map(|(_, p)| p.clone());
            for (_, seg) in segments {
                // Line by line: a segment is 16 MiB, a stream thousands of them.
                let mut torn = None;
                segment::for_each_line(&seg, |line| {
                    if !line.complete {
                        torn = Some(line.offset);
                        return Ok(());
                    }
                    let record = Record::parse_line(line.bytes)
                        .map_err(|e| Refused::Storage(format!("{} line {}: {e}", seg.display(), line.number)))?;
                    state.last_seq = record.seq;
                    state.last_hash = record.hash.clone();
                    state.note(&record);
                    state.remember(record.seq, &record.hash);
                    Ok::<(), Refused>(())
                })?;
                // An unfinished line (a crash mid-append) was never
                // acknowledged: cut it, the sender sends it again.
                if let Some(offset) = torn
                    && Some(&seg) == last_segment.as_ref()
                {
                    let file = OpenOptions::new().write(true).open(&seg).map_err(io)?;
                    file.set_len(offset).and_then(|_| file.sync_all()).map_err(io)?;
                }
                let len = std::fs::metadata(&seg).map_err(io)?.len();
                state.active = Some((seg, len));
            }
            streams.insert(meta.stream.clone(), state);
        }
        let mut incidents = HashMap::new();
        for record in crate::audit::query::read_records(&root.join("incidents")).records {
            if let Some(incident) = record.event.incident {
                *incidents.entry(incident.stream).or_insert(0) += 1;
            }
        }
        Ok(Storage { root: root.to_path_buf(), streams, incidents, append_buffer: Vec::new() })
    }

    /// Counts an incident against a stream.
    pub fn note_incident(&mut self, stream: &str) {
        *self.incidents.entry(stream.to_string()).or_insert(0) += 1;
    }

    /// Per MCPServer: streams, open streams by pod, incidents.
    pub fn health(&self) -> BTreeMap<String, ServerHealth> {
        let mut out: BTreeMap<String, ServerHealth> = BTreeMap::new();
        for state in self.streams.values().filter(|s| !s.server.is_empty()) {
            let entry = out.entry(state.server.clone()).or_default();
            entry.streams += 1;
            entry.open_incidents += self.incidents.get(&state.meta.stream).copied().unwrap_or(0);
            for (grant, used) in &state.grants {
                entry.emergency_use.entry(grant.clone()).or_default().merge(used);
            }
            if !state.sealed && !state.abandoned {
                for (tool, findings) in &state.schema_drift {
                    entry.schema_drift.entry(tool.clone()).or_insert_with(|| findings.clone());
                }
                let pod = state.pod.clone().unwrap_or_else(|| state.meta.stream.clone());
                let health = StreamHealth { last_seq: state.last_seq, last_record_time: state.last_time.clone() };
                // A pod whose writer restarted into a new stream: the newest counts.
                let newer = out
                    .get(&state.server)
                    .and_then(|e| e.open_streams.get(&pod))
                    .is_none_or(|h| h.last_record_time <= health.last_record_time);
                if newer && let Some(entry) = out.get_mut(&state.server) {
                    entry.open_streams.insert(pod, health);
                }
            }
        }
        out
    }

    /// The head of each stream, by stream name.
    pub fn heads(&self) -> Vec<Head> {
        let mut heads: Vec<Head> = self
            .streams
            .values()
            .map(|s| Head {
                stream: s.meta.stream.clone(),
                sender: s.meta.sender.clone(),
                seq: s.last_seq,
                hash: s.last_hash.clone(),
                dir: s.dir.clone(),
            })
            .collect();
        heads.sort_by(|a, b| a.stream.cmp(&b.stream));
        heads
    }

    /// Judges and stores one batch of canonical lines from `sender`, who
    /// may write only streams starting with `prefix` (when given).
    pub fn store(&mut self, sender: &str, prefix: Option<&str>, lines: &[&[u8]]) -> Result<Stored, Refused> {
        let mut records = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            let record = Record::parse_line(line).map_err(|e| Refused::Invalid(format!("line {}: {e}", i + 1)))?;
            if record.v != SCHEMA_VERSION {
                return Err(Refused::Invalid(format!("line {}: schema version {}", i + 1, record.v)));
            }
            records.push(record);
        }
        let Some(first) = records.first() else { return Err(Refused::Invalid("empty batch".into())) };
        let stream = first.stream.clone();
        if records.iter().any(|r| r.stream != stream) {
            return Err(Refused::Invalid("a batch carries one stream".into()));
        }
        if prefix.is_some_and(|p| !stream.starts_with(p)) {
            return Err(Refused::NotYourStream { stream });
        }
        if records.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
            return Err(Refused::Invalid("records of a batch must be consecutive".into()));
        }
        if !self.streams.contains_key(&stream) {
            self.create(&stream, sender)?;
        }
        let state = self.streams.get_mut(&stream).ok_or_else(|| io("stream vanished"))?;
        if state.meta.sender != sender {
            return Err(Refused::NotYourStream { stream });
        }
        let integrity = |class, seq, detail: String| Refused::Integrity { class, stream: stream.clone(), seq, detail };
        let mut stored = Stored {
            stream: stream.clone(),
            durable_through: state.last_seq,
            written: 0,
            duplicates: 0,
            incidents: Vec::new(),
        };
        // The batch's seqs are consecutive: what is already stored comes first.
        let stored_already = records.iter().take_while(|r| r.seq <= state.last_seq).count();
        let (resent, fresh) = records.split_at(stored_already);
        for record in resent {
            match state.recent.check(record.seq, &record.hash) {
                Known::Same => stored.duplicates += 1,
                Known::Different => {
                    let kept = state.recent.hex(record.seq).unwrap_or_default();
                    return Err(integrity(
                        IncidentClass::Fork,
                        record.seq,
                        format!("a different record for a stored position (stored {kept}, sent {})", record.hash),
                    ));
                }
                // Older than what is kept in memory, or before an anchor.
                Known::Unknown => stored.duplicates += 1,
            }
        }
        let Some(next) = fresh.first() else { return Ok(stored) };
        if next.seq == 1 && next.event.kind != crate::audit::record::Kind::StreamStart {
            return Err(Refused::Invalid("a stream must begin with a stream-start record".into()));
        }
        if let Some(pair) = fresh.windows(2).find(|w| w[1].prev != w[0].hash) {
            return Err(integrity(
                IncidentClass::Rewrite,
                pair[1].seq,
                "the batch's own chain is broken (prev does not match the record before)".into(),
            ));
        }
        let expected = state.last_seq + 1;
        if next.seq > expected {
            let detail = format!("records {expected}..{} never arrived", next.seq - 1);
            stored.incidents.push((IncidentClass::Gap, expected, detail));
            if state.last_seq == 0 {
                // A stream first seen after its start: anchor it where it begins.
                let anchor = Anchor { stream: stream.clone(), seq: next.seq - 1, hash: next.prev.clone() };
                segment::write_anchor(&state.dir, &anchor).map_err(io)?;
            }
        } else if next.prev != state.last_hash {
            return Err(integrity(
                IncidentClass::Rewrite,
                next.seq,
                format!("prev {} does not continue the stored chain (head {})", next.prev, state.last_hash),
            ));
        }
        // Append, fsync, then advance: a failure leaves nothing acknowledged.
        // Each line parsed as canonical (it is its record's `to_line`), so
        // the lines are written as received, through one buffer kept across
        // batches: no record serialized again, no buffer grown per batch.
        let bytes = &mut self.append_buffer;
        bytes.clear();
        for line in &lines[stored_already..] {
            bytes.extend_from_slice(line);
            bytes.push(b'\n');
        }
        let (path, len) = match &state.active {
            Some((path, len)) if *len < SEGMENT_BYTES => (path.clone(), *len),
            _ => (state.dir.join(segment::segment_name(next.seq)), 0),
        };
        let added = bytes.len() as u64;
        let appended = append_durably(&path, len, bytes);
        // A large batch's buffer is let go whether or not it was stored.
        if bytes.capacity() > APPEND_BUFFER_KEPT {
            *bytes = Vec::new();
        }
        appended?;
        if len == 0 {
            segment::sync_dir(&state.dir).map_err(io)?;
        }
        state.active = Some((path, len + added));
        for record in fresh {
            state.last_seq = record.seq;
            state.last_hash = record.hash.clone();
            state.note(record);
            state.remember(record.seq, &record.hash);
        }
        stored.written = fresh.len();
        stored.durable_through = state.last_seq;
        Ok(stored)
    }

    fn create(&mut self, stream: &str, sender: &str) -> Result<(), Refused> {
        let name = hex::encode(Sha256::digest(stream.as_bytes()));
        let dir = self.root.join("streams").join(&name[..32]);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let meta = StreamMeta { stream: stream.to_string(), sender: sender.to_string() };
        let mut file = File::create(dir.join("stream.json")).map_err(io)?;
        file.write_all(&serde_json::to_vec(&meta).map_err(io)?).and_then(|_| file.sync_all()).map_err(io)?;
        segment::sync_dir(&dir).map_err(io)?;
        self.streams.insert(
            stream.to_string(),
            StreamState {
                dir,
                meta,
                last_seq: 0,
                last_hash: crate::audit::record::GENESIS.to_string(),
                recent: RecentHashes::default(),
                active: None,
                server: String::new(),
                pod: None,
                last_time: None,
                sealed: false,
                abandoned: false,
                grants: BTreeMap::new(),
                schema_drift: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// The open streams of `server` whose pod is no longer among `present`
    /// and whose last record is older than `grace` (a pod just started may
    /// not be listed yet; one still draining is listed): each is marked
    /// abandoned — durably, so it is reported once — and returned, for an
    /// `unsealed` incident. Records after its last stored one, if there
    /// were any, are lost with the pod.
    pub fn abandon_missing(
        &mut self,
        server: &str,
        present: &std::collections::BTreeSet<String>,
        now: chrono::DateTime<chrono::Utc>,
        grace: std::time::Duration,
    ) -> Result<Vec<Abandoned>, Refused> {
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let mut found = Vec::new();
        for state in self.streams.values_mut() {
            // The broker's streams are not any pod of this server's.
            if state.server != server || state.sealed || state.abandoned || state.meta.sender == super::BROKER_SENDER {
                continue;
            }
            if state.pod.as_ref().is_some_and(|pod| present.contains(pod)) {
                continue;
            }
            let quiet = state
                .last_time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_none_or(|t| now - t.with_timezone(&chrono::Utc) > grace);
            if !quiet {
                continue;
            }
            let marker = state.dir.join(ABANDONED_MARKER);
            let file = std::fs::File::create(&marker).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Ok(dir) = std::fs::File::open(&state.dir) {
                let _ = dir.sync_all();
            }
            state.abandoned = true;
            found.push(Abandoned {
                stream: state.meta.stream.clone(),
                pod: state.pod.clone(),
                last_seq: state.last_seq,
            });
        }
        found.sort_by(|a, b| a.stream.cmp(&b.stream));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::test_support::chain_lines;
    use crate::audit::record::{Chain, Event, Kind};
    use crate::audit::verify::{VerifyOptions, verify_dir};

    fn lines(n: u64) -> Vec<Vec<u8>> {
        chain_lines(n).1
    }

    fn refs(lines: &[Vec<u8>]) -> Vec<&[u8]> {
        lines.iter().map(|l| l.as_slice()).collect()
    }

    #[test]
    fn batches_are_stored_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(10);
        let mut storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.store("a", None, &refs(&all[..4])).unwrap().durable_through, 4);
        // A resend overlapping the stored part is idempotent.
        let again = storage.store("a", None, &refs(&all[2..7])).unwrap();
        assert_eq!((again.duplicates, again.written, again.durable_through), (2, 3, 7));
        drop(storage);
        let mut storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.store("a", None, &refs(&all[5..10])).unwrap().durable_through, 10);
        assert!(verify_dir(dir.path(), VerifyOptions::default()).passed());
        let health = storage.health();
        let server = &health["clinic/lookup"];
        assert_eq!(server.streams, 1);
        assert_eq!(server.open_streams.len(), 1);
        assert_eq!(server.open_streams.values().next().unwrap().last_seq, 10);
        assert_eq!(server.open_incidents, 0);
    }

    #[test]
    fn a_large_batch_lets_its_buffer_go_even_when_its_append_fails() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(12_001);
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&all[..1])).unwrap();
        // The active segment becomes a directory: the next append fails.
        let (path, _) = storage.streams.values().next().unwrap().active.clone().unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let batch = refs(&all[1..]);
        assert!(batch.iter().map(|l| l.len() + 1).sum::<usize>() > APPEND_BUFFER_KEPT);
        assert!(storage.store("a", None, &batch).is_err());
        assert_eq!(storage.append_buffer.capacity(), 0, "a failed batch's buffer was kept");
    }

    #[test]
    fn a_fork_just_past_a_full_window_is_still_caught() {
        // The window used to be cleared whole when full: the position
        // stored just before that was then unchecked.
        let dir = tempfile::tempdir().unwrap();
        let n = recent::OPEN_WINDOW + 1;
        let all = lines(n as u64);
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&all)).unwrap();
        let other = lines(n as u64);
        for seq in [n - 1, n - recent::OPEN_WINDOW + 1] {
            let forked = storage.store("a", None, &refs(&other[seq - 1..seq]));
            assert!(forked.is_err(), "a rewritten record {seq} was accepted");
        }
    }

    #[test]
    fn a_sealed_stream_keeps_only_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut chain, mut all) = chain_lines(1000);
        all.push(chain.seal(Event::new(Kind::StreamEnd), chrono::Utc::now()).unwrap().record.to_line());
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&all)).unwrap();
        for storage in [storage, Storage::open(dir.path()).unwrap()] {
            let state = &storage.streams["clinic/lookup/pod/s1"];
            assert!(state.sealed);
            assert_eq!(state.recent.len(), recent::SEALED_WINDOW);
        }
        let mut storage = Storage::open(dir.path()).unwrap();
        // The sender retrying its last batch: a duplicate.
        assert_eq!(storage.store("a", None, &refs(&all[995..])).unwrap().duplicates, 6);
    }

    #[test]
    fn reopening_a_long_stream_keeps_a_bounded_window_of_hashes_and_still_catches_a_fork() {
        // The soak bench found a restarted collector holding every stored
        // record's hash (31 → 70 MiB over 150,000 records).
        let dir = tempfile::tempdir().unwrap();
        let n = recent::OPEN_WINDOW as u64 + 100;
        let all = lines(n + 1);
        let mut storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.store("a", None, &refs(&all[..n as usize])).unwrap().durable_through, n);
        drop(storage);
        let mut storage = Storage::open(dir.path()).unwrap();
        let kept = storage.streams.values().map(|s| s.recent.len()).max().unwrap();
        assert!(kept <= recent::OPEN_WINDOW, "{kept} hashes kept");
        // The newest records are still checked: a resend is a duplicate, a
        // different record for a stored position is a fork.
        let again = storage.store("a", None, &refs(&all[n as usize - 1..n as usize])).unwrap();
        assert_eq!(again.duplicates, 1);
        let other = lines(n);
        let forked = storage.store("a", None, &refs(&other[n as usize - 1..n as usize]));
        assert!(forked.is_err(), "a rewritten last record was accepted");
        assert_eq!(storage.store("a", None, &refs(&all[n as usize..])).unwrap().durable_through, n + 1);
    }

    #[test]
    fn use_under_each_grant_is_summed_per_server_and_survives_a_reopen() {
        use crate::audit::record::Decision;
        let dir = tempfile::tempdir().unwrap();
        let at = |s: i64| chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let mut chain = Chain::new("clinic/lookup/pod/s1".into(), "clinic/lookup".into(), None);
        let mut lines = vec![chain.seal(Event::new(Kind::StreamStart), at(0)).unwrap().record.to_line()];
        let mut seal = |decision: Option<Decision>, kind: Kind, grant: Option<&str>, second: i64| {
            let mut e = Event::new(kind);
            e.decision = decision;
            e.method = Some("tools/call".into());
            e.caller =
                Some(crate::audit::record::Caller { sub: "er-doc".into(), iss: "https://idp".into(), groups: vec![] });
            e.reason = (decision == Some(Decision::Deny)).then(|| "tool not allowed for caller".into());
            e.correlation = Some(format!("c{second}"));
            if kind == Kind::Outcome {
                e.method = None;
                e.outcome = Some(crate::audit::record::Outcome {
                    status: crate::audit::record::OutcomeStatus::Ok,
                    http_status: Some(200),
                    rpc_error: None,
                    rows: None,
                });
            }
            e.emergency_access = grant.map(str::to_string);
            lines.push(chain.seal(e, at(second)).unwrap().record.to_line());
        };
        seal(Some(Decision::Allow), Kind::Decision, Some("ea-1"), 10);
        seal(None, Kind::Outcome, Some("ea-1"), 11); // follows a use; not one
        seal(Some(Decision::Deny), Kind::Decision, Some("ea-1"), 12); // refused; not a use
        seal(Some(Decision::Allow), Kind::Decision, None, 13);
        seal(Some(Decision::Allow), Kind::Decision, Some("ea-1"), 20);
        seal(Some(Decision::Allow), Kind::Decision, Some("ea-2"), 30);
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&lines)).unwrap();
        let expected = |storage: &Storage| {
            let use_ = &storage.health()["clinic/lookup"].emergency_use;
            assert_eq!(use_.len(), 2);
            assert_eq!(use_["ea-1"].uses, 2);
            assert_eq!(
                (use_["ea-1"].first.as_str(), use_["ea-1"].last.as_str()),
                ("2027-01-15T08:00:10.000000Z", "2027-01-15T08:00:20.000000Z")
            );
            assert_eq!(use_["ea-2"].uses, 1);
        };
        expected(&storage);
        drop(storage);
        expected(&Storage::open(dir.path()).unwrap());
    }

    #[test]
    fn schema_drift_is_what_the_newest_list_showed_per_tool_while_the_stream_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let at = |s: i64| chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let mut chain = Chain::new("clinic/lookup/pod/s1".into(), "clinic/lookup".into(), None);
        let mut lines = vec![chain.seal(Event::new(Kind::StreamStart), at(0)).unwrap().record.to_line()];
        let mut list_outcome = |drift: &[(&str, &[&str])], second: i64| {
            let mut e = Event::new(Kind::Outcome);
            e.correlation = Some(format!("c{second}"));
            e.outcome = Some(crate::audit::record::Outcome {
                status: crate::audit::record::OutcomeStatus::Ok,
                http_status: Some(200),
                rpc_error: None,
                rows: None,
            });
            e.schema_drift = Some(
                drift.iter().map(|(tool, f)| (tool.to_string(), f.iter().map(|x| x.to_string()).collect())).collect(),
            );
            chain.seal(e, at(second)).unwrap().record.to_line()
        };
        let grew: &[&str] = &["takes undeclared argument(s) \"sql\""];
        lines.push(list_outcome(&[("lookup", grew), ("hours", &[])], 1));
        // A later page lists another tool only: lookup's drift stands.
        lines.push(list_outcome(&[("visits", &["does not list declared argument \"patient\""])], 2));
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&lines)).unwrap();
        let drift = |storage: &Storage| storage.health()["clinic/lookup"].schema_drift.clone();
        assert_eq!(drift(&storage).keys().collect::<Vec<_>>(), ["lookup", "visits"]);
        assert_eq!(drift(&storage)["lookup"], grew);
        drop(storage);
        let mut storage = Storage::open(dir.path()).unwrap();
        assert_eq!(drift(&storage).len(), 2, "read back from disk");
        // The server is fixed: the next list agrees for lookup.
        let fixed = list_outcome(&[("lookup", &[])], 3);
        storage.store("a", None, &refs(&[fixed])).unwrap();
        assert_eq!(drift(&storage).keys().collect::<Vec<_>>(), ["visits"]);
        // A sealed stream (its pod gone) no longer speaks for the server.
        let end = chain.seal(Event::new(Kind::StreamEnd), at(4)).unwrap().record.to_line();
        storage.store("a", None, &refs(&[end])).unwrap();
        assert!(drift(&storage).is_empty());
    }

    #[test]
    fn another_sender_forks_and_rewrites_are_refused_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(5);
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&all[..3])).unwrap();
        assert!(matches!(storage.store("b", None, &refs(&all[3..])), Err(Refused::NotYourStream { .. })));
        // A different record 3 (a fork): same seq, other hash.
        let other = lines(3);
        let mut forked = other[2].clone();
        let text = String::from_utf8(forked.clone()).unwrap().replace("\"l2\"", "\"lX\"");
        forked = text.into_bytes();
        assert!(
            matches!(storage.store("a", None, &[&forked]), Err(Refused::Invalid(_))),
            "a tampered line is not canonical"
        );
        let mut foreign = Chain::new("clinic/lookup/pod/s1".into(), "clinic/lookup".into(), Some("x".into()));
        let fake: Vec<Vec<u8>> = (0..4)
            .map(|_| foreign.seal(Event::new(Kind::StreamStart), chrono::Utc::now()).unwrap().record.to_line())
            .collect();
        assert!(matches!(
            storage.store("a", None, &[&fake[2]]),
            Err(Refused::Integrity { class: IncidentClass::Fork, .. })
        ));
        assert!(matches!(
            storage.store("a", None, &[&fake[3]]),
            Err(Refused::Integrity { class: IncidentClass::Rewrite, .. })
        ));
        assert!(matches!(storage.store("a", None, &[b"not json".as_slice()]), Err(Refused::Invalid(_))));
        assert_eq!(storage.heads()[0].seq, 3, "nothing of a refused batch was written");
        assert!(verify_dir(dir.path(), VerifyOptions::default()).passed());
    }

    #[test]
    fn an_unacknowledged_torn_tail_is_cut_on_open_and_the_resend_lands() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(6);
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&all[..4])).unwrap();
        let stream_dir = storage.heads()[0].dir.clone();
        drop(storage);
        let (_, seg) = segment::list_segments(&stream_dir).unwrap().pop().unwrap();
        let mut file = OpenOptions::new().append(true).open(&seg).unwrap();
        file.write_all(&all[4][..20]).unwrap();
        drop(file);
        let mut storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.store("a", None, &refs(&all[4..])).unwrap().durable_through, 6);
        assert!(verify_dir(dir.path(), VerifyOptions::default()).passed());
    }

    #[test]
    fn a_gap_is_an_incident_and_verify_fails_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(8);
        let mut storage = Storage::open(dir.path()).unwrap();
        storage.store("a", None, &refs(&all[..3])).unwrap();
        let stored = storage.store("a", None, &refs(&all[5..])).unwrap();
        assert_eq!(stored.incidents.len(), 1);
        assert_eq!(stored.incidents[0].0, IncidentClass::Gap);
        assert_eq!(stored.incidents[0].1, 4);
        assert!(!verify_dir(dir.path(), VerifyOptions::default()).passed());
    }
}
