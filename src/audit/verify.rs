//! Verification of stored audit streams: every chain in a WAL or storage
//! directory, down to the first break.
//!
//! A directory holding `seg-*.jsonl` files is one stream. For each, every
//! line must be a complete, canonical record with a valid own hash, of the
//! same stream, with `seq` one more than its predecessor's and `prev` equal
//! to its predecessor's hash; the first record is a `stream-start` at seq 1
//! (or follows the directory's anchor, when older segments were released).
//! A stream is *sealed* when it ends with `stream-end`; only a seal (or, in
//! a cluster, the collector's signed checkpoint) shows that nothing was cut
//! from the tail, so `require_sealed` turns an open tail into a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{GENESIS, Kind, Record};
use super::segment::{self, Anchor};

/// How strict to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Fail streams that do not end with a `stream-end` record.
    pub require_sealed: bool,
    /// The collector's checkpoint public key: every signed checkpoint must
    /// verify under it. Without it signatures are not checked (and the
    /// report says so); what a checkpoint states is checked either way.
    pub checkpoint_key: Option<[u8; 32]>,
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// The segment file.
    pub segment: PathBuf,
    /// 1-based line in it (0: the file as a whole).
    pub line: usize,
    /// The sequence number expected there.
    pub expected_seq: u64,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {} (expected seq {}): {}", self.segment.display(), self.line, self.expected_seq, self.reason)
    }
}

/// The verdict on one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamReport {
    /// Its directory.
    pub dir: PathBuf,
    /// Stream id (from its records or anchor).
    pub stream: Option<String>,
    /// Valid records before the first break.
    pub records: u64,
    /// First and last valid sequence numbers.
    pub first_seq: Option<u64>,
    /// Last valid sequence number.
    pub last_seq: Option<u64>,
    /// Time of the first valid record.
    pub first_time: Option<String>,
    /// Time of the last valid record.
    pub last_time: Option<String>,
    /// Records before this were released (the anchor's seq).
    pub anchored_after: Option<u64>,
    /// Writer restarts recorded.
    pub restarts: u64,
    /// Ends with `stream-end`.
    pub sealed: bool,
    /// Signed checkpoints verified under the trusted key.
    pub checkpoints: u64,
    /// Checkpoints whose signature was not checked (no key given).
    pub checkpoints_unchecked: u64,
    /// The first break, if any.
    #[serde(rename = "break")]
    pub broken: Option<Break>,
}

impl StreamReport {
    /// Whether the stream verified.
    pub fn passed(&self) -> bool {
        self.broken.is_none()
    }
}

/// The verdict on a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The directory verified.
    pub dir: PathBuf,
    /// One entry per stream directory found.
    pub streams: Vec<StreamReport>,
    /// Problems outside any stream (unreadable directory, no stream found).
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// PASS: at least one stream, no problem, no break.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && !self.streams.is_empty() && self.streams.iter().all(StreamReport::passed)
    }
}

impl VerifyReport {
    /// A readable report: one row per stream, then PASS or FAIL naming the
    /// stream and position of every break.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let name = |s: &StreamReport| s.stream.clone().unwrap_or_else(|| s.dir.display().to_string());
        let width = self.streams.iter().map(|s| name(s).len()).max().unwrap_or(0).max("STREAM".len());
        if !self.streams.is_empty() {
            let _ = writeln!(
                out,
                "{:width$}  {:>8}  {:>17}  {:27}  {:27}  {:6}  RESULT",
                "STREAM", "RECORDS", "SEQ", "FIRST", "LAST", "STATE"
            );
        }
        for s in &self.streams {
            let seq = match (s.first_seq, s.last_seq) {
                (Some(a), Some(b)) => format!("{a}-{b}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "{:width$}  {:>8}  {:>17}  {:27}  {:27}  {:6}  {}",
                name(s),
                s.records,
                seq,
                s.first_time.as_deref().unwrap_or("-"),
                s.last_time.as_deref().unwrap_or("-"),
                if s.sealed { "sealed" } else { "open" },
                if s.passed() { "PASS" } else { "FAIL" }
            );
        }
        for problem in &self.problems {
            let _ = writeln!(out, "FAIL: {problem}");
        }
        for s in self.streams.iter().filter(|s| !s.passed()) {
            if let Some(b) = &s.broken {
                let _ = writeln!(out, "FAIL: stream {}: {b}", name(s));
            }
        }
        if self.passed() {
            let records: u64 = self.streams.iter().map(|s| s.records).sum();
            let checkpoints: u64 = self.streams.iter().map(|s| s.checkpoints).sum();
            let unchecked: u64 = self.streams.iter().map(|s| s.checkpoints_unchecked).sum();
            let mut line = format!("PASS: {} stream(s), {records} record(s) verified", self.streams.len());
            if checkpoints > 0 {
                line.push_str(&format!(", {checkpoints} signed checkpoint(s) verified"));
            }
            if unchecked > 0 {
                line.push_str(&format!(
                    "; {unchecked} checkpoint signature(s) NOT checked (pass --checkpoint-key with the collector's public key)"
                ));
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// Verifies every stream under `dir`.
pub fn verify_dir(dir: &Path, options: VerifyOptions) -> VerifyReport {
    let mut report = VerifyReport { dir: dir.to_path_buf(), streams: Vec::new(), problems: Vec::new() };
    let mut stream_dirs: BTreeMap<PathBuf, ()> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        match entry {
            Ok(entry) if entry.file_type().is_file() => {
                let name = entry.file_name().to_string_lossy();
                if segment::looks_like_segment(&name) {
                    match segment::parse_segment_name(&name) {
                        Some(_) => {
                            if let Some(parent) = entry.path().parent() {
                                stream_dirs.insert(parent.to_path_buf(), ());
                            }
                        }
                        None => report.problems.push(format!("{}: not a valid segment name", entry.path().display())),
                    }
                }
            }
            Ok(_) => {}
            Err(e) => report.problems.push(format!("cannot read {}: {e}", e.path().unwrap_or(dir).display())),
        }
    }
    if stream_dirs.is_empty() && report.problems.is_empty() {
        report.problems.push(format!("no audit segments (seg-*.jsonl) found under {}", dir.display()));
    }
    for stream_dir in stream_dirs.into_keys() {
        report.streams.push(verify_stream(&stream_dir, options));
    }
    report
}

/// Verifies the one stream stored in `dir`.
pub fn verify_stream(dir: &Path, options: VerifyOptions) -> StreamReport {
    let mut report = StreamReport {
        dir: dir.to_path_buf(),
        stream: None,
        records: 0,
        first_seq: None,
        last_seq: None,
        first_time: None,
        last_time: None,
        anchored_after: None,
        restarts: 0,
        sealed: false,
        checkpoints: 0,
        checkpoints_unchecked: 0,
        broken: None,
    };
    let whole = |reason: String| Break { segment: dir.to_path_buf(), line: 0, expected_seq: 1, reason };
    let anchor = match segment::read_anchor(dir) {
        Ok(anchor) => anchor,
        Err(e) => {
            report.broken = Some(whole(format!("unreadable anchor: {e}")));
            return report;
        }
    };
    let segments = match segment::list_segments(dir) {
        Ok(segments) => segments,
        Err(e) => {
            report.broken = Some(whole(format!("cannot list segments: {e}")));
            return report;
        }
    };
    let mut walker = ChainWalker::new(anchor.as_ref());
    let mut hashes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    report.anchored_after = anchor.as_ref().map(|a| a.seq);
    report.stream = anchor.map(|a| a.stream);
    for (named_first, path) in &segments {
        let lines = match segment::read_lines(path) {
            Ok(lines) => lines,
            Err(e) => {
                report.broken = Some(Break {
                    segment: path.clone(),
                    line: 0,
                    expected_seq: walker.expected_seq,
                    reason: format!("unreadable: {e}"),
                });
                return report;
            }
        };
        if !lines.is_empty() && *named_first != walker.expected_seq {
            report.broken = Some(Break {
                segment: path.clone(),
                line: 0,
                expected_seq: walker.expected_seq,
                reason: format!(
                    "segment is named for seq {named_first} but the chain continues at seq {}",
                    walker.expected_seq
                ),
            });
            return report;
        }
        for line in lines {
            let expected_seq = walker.expected_seq;
            let at = |reason: String| Break { segment: path.clone(), line: line.number, expected_seq, reason };
            if !line.complete {
                report.broken = Some(at("record truncated: no line end".into()));
                return report;
            }
            let record = match Record::parse_line(&line.bytes) {
                Ok(record) => record,
                Err(e) => {
                    report.broken = Some(at(e.to_string()));
                    return report;
                }
            };
            if let Err(reason) = walker.accept(&record, report.stream.as_deref()) {
                report.broken = Some(at(reason));
                return report;
            }
            report.stream.get_or_insert_with(|| record.stream.clone());
            hashes.insert(record.seq, record.hash.clone());
            report.records += 1;
            report.first_seq.get_or_insert(record.seq);
            report.last_seq = Some(record.seq);
            report.first_time.get_or_insert_with(|| record.time.clone());
            report.last_time = Some(record.time.clone());
            if record.event.kind == Kind::StreamStart && record.event.restart.is_some() && record.seq > 1 {
                report.restarts += 1;
            }
        }
    }
    report.sealed = walker.last_kind == Some(Kind::StreamEnd);
    if let Err(reason) = check_checkpoints(dir, options, &hashes, &mut report) {
        let segment = dir.join(super::checkpoint::CHECKPOINT_FILE);
        report.broken = Some(Break { segment, line: 0, expected_seq: walker.expected_seq, reason });
        return report;
    }
    if options.require_sealed && !report.sealed {
        let segment = segments.last().map(|(_, p)| p.clone()).unwrap_or_else(|| dir.to_path_buf());
        report.broken = Some(Break {
            segment,
            line: 0,
            expected_seq: walker.expected_seq,
            reason: match report.last_seq {
                Some(seq) => format!(
                    "stream ends at seq {seq} without a stream-end record: its tail was cut, or its writer is still running"
                ),
                None => "stream holds no record".into(),
            },
        });
    }
    report
}

/// Checks the stream's signed checkpoints: each signature under the trusted
/// key (when given), and each stated head against the stored records — a
/// tail deleted or rewritten after a checkpoint fails here even though the
/// remaining chain is intact.
fn check_checkpoints(
    dir: &Path,
    options: VerifyOptions,
    hashes: &std::collections::HashMap<u64, String>,
    report: &mut StreamReport,
) -> Result<(), String> {
    use super::checkpoint;
    let checkpoints = checkpoint::read(dir)?;
    let key = options
        .checkpoint_key
        .map(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).map_err(|e| format!("checkpoint key: {e}")))
        .transpose()?;
    for cp in checkpoints {
        let at = |what: String| format!("checkpoint at seq {} signed {}: {what}", cp.seq, cp.time);
        match &key {
            Some(key) => checkpoint::check(&cp, key).map_err(at)?,
            None => report.checkpoints_unchecked += 1,
        }
        if report.stream.as_deref().is_some_and(|s| s != cp.stream) {
            return Err(at(format!("names stream {:?}", cp.stream)));
        }
        if report.anchored_after.is_some_and(|a| cp.seq <= a) {
            // Covers records released by the writer, not stored here.
        } else {
            match hashes.get(&cp.seq) {
                Some(hash) if *hash == cp.hash => {}
                Some(_) => return Err(at("the stored record at that seq is not the one signed".into())),
                None => {
                    let last = report.last_seq.map_or("none".to_string(), |s| s.to_string());
                    return Err(at(format!(
                        "records through that seq were signed but are gone (last stored seq {last})"
                    )));
                }
            }
        }
        if key.is_some() {
            report.checkpoints += 1;
        }
    }
    Ok(())
}

/// The rules between consecutive records.
struct ChainWalker {
    expected_seq: u64,
    expected_prev: String,
    last_kind: Option<Kind>,
}

impl ChainWalker {
    fn new(anchor: Option<&Anchor>) -> Self {
        match anchor {
            Some(a) => ChainWalker { expected_seq: a.seq + 1, expected_prev: a.hash.clone(), last_kind: None },
            None => ChainWalker { expected_seq: 1, expected_prev: GENESIS.to_string(), last_kind: None },
        }
    }

    fn accept(&mut self, record: &Record, stream: Option<&str>) -> Result<(), String> {
        if let Some(stream) = stream
            && record.stream != stream
        {
            return Err(format!("record of stream {:?} inside stream {stream:?}", record.stream));
        }
        if record.seq != self.expected_seq {
            return Err(if record.seq < self.expected_seq {
                format!("found seq {}: a duplicated or reordered record", record.seq)
            } else {
                format!("found seq {}: records {}..{} are missing", record.seq, self.expected_seq, record.seq - 1)
            });
        }
        if record.prev != self.expected_prev {
            return Err("prev does not match the previous record's hash: the chain was altered".into());
        }
        if record.seq == 1 && record.event.kind != Kind::StreamStart {
            return Err("a stream must begin with a stream-start record".into());
        }
        if self.last_kind == Some(Kind::StreamEnd)
            && !(record.event.kind == Kind::StreamStart && record.event.restart.is_some())
        {
            return Err("only a restart may follow a stream-end record".into());
        }
        self.expected_seq = record.seq + 1;
        self.expected_prev = record.hash.clone();
        self.last_kind = Some(record.event.kind);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
