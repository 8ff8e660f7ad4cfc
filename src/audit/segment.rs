//! Segment files and the anchor, as laid out on disk. Shared by the WAL
//! writer and the verifier.
//!
//! ```text
//!   DIR/
//!     .lock                           held (flock) by the one writer
//!     anchor.json                     {stream, seq, hash} of the last record released
//!     seg-00000000000000000001.jsonl  records 1..k, one canonical JSON line each
//!     seg-0000000000000000000k+1.jsonl
//! ```

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File holding the writer's lock.
pub const LOCK_FILE: &str = ".lock";
/// File anchoring a stream whose first segments were released.
pub const ANCHOR_FILE: &str = "anchor.json";
const PREFIX: &str = "seg-";
const SUFFIX: &str = ".jsonl";

/// File name of the segment whose first record is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{SUFFIX}")
}

/// The first sequence number a segment file name declares.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether a file name looks like a segment (well-formed or not).
pub fn looks_like_segment(name: &str) -> bool {
    name.starts_with(PREFIX) && name.ends_with(SUFFIX)
}

/// The segments of a directory, by first sequence number.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push((seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// One line of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the segment.
    pub number: usize,
    /// Byte offset of its start.
    pub offset: u64,
    /// Its bytes, without the newline.
    pub bytes: Vec<u8>,
    /// Whether a newline ends it (the last line of a torn write has none).
    pub complete: bool,
}

/// Splits segment contents into lines.
pub fn split_lines(content: &[u8]) -> Vec<Line> {
    let mut lines = Vec::new();
    // Reading from memory cannot fail.
    let _ = each_line_in::<io::Error>(content, |line| {
        lines.push(line.to_line());
        Ok(())
    });
    lines
}

/// The lines of segment contents already in memory, one at a time, as
/// [`split_lines`] splits them, without copying them out.
pub fn each_line_in<E: From<io::Error>>(content: &[u8], f: impl FnMut(LineRef<'_>) -> Result<(), E>) -> Result<(), E> {
    each_line(content, f)
}

/// Reads and splits a segment.
pub fn read_lines(path: &Path) -> io::Result<Vec<Line>> {
    Ok(split_lines(&std::fs::read(path)?))
}

/// One line of a segment, borrowed while it is read (see [`for_each_line`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRef<'a> {
    /// 1-based line number in the segment.
    pub number: usize,
    /// Byte offset of its start.
    pub offset: u64,
    /// Its bytes, without the newline.
    pub bytes: &'a [u8],
    /// Whether a newline ends it (the last line of a torn write has none).
    pub complete: bool,
}

impl LineRef<'_> {
    /// The line, owned.
    pub fn to_line(&self) -> Line {
        Line { number: self.number, offset: self.offset, bytes: self.bytes.to_vec(), complete: self.complete }
    }
}

/// Reads a segment line by line, holding one line at a time: a process
/// that stays up (the collector opening gigabytes of stored segments)
/// keeps no segment-sized peak. The lines are those of [`split_lines`].
pub fn for_each_line<E: From<io::Error>>(path: &Path, f: impl FnMut(LineRef<'_>) -> Result<(), E>) -> Result<(), E> {
    each_line(BufReader::with_capacity(64 * 1024, File::open(path)?), f)
}

/// The one splitter: lines end at a newline; a last line without one is
/// incomplete (a torn write).
fn each_line<R: BufRead, E: From<io::Error>>(
    mut reader: R,
    mut f: impl FnMut(LineRef<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut buf = Vec::new();
    let (mut number, mut offset) = (0usize, 0u64);
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf)?;
        if read == 0 {
            return Ok(());
        }
        let complete = buf.last() == Some(&b'\n');
        let bytes = if complete { &buf[..buf.len() - 1] } else { &buf[..] };
        number += 1;
        f(LineRef { number, offset, bytes, complete })?;
        offset += read as u64;
    }
}

/// Where a stream continues after its first segments were released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The stream.
    pub stream: String,
    /// Last released record.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// Reads the anchor, if any.
pub fn read_anchor(dir: &Path) -> io::Result<Option<Anchor>> {
    match std::fs::read(dir.join(ANCHOR_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{ANCHOR_FILE}: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the anchor atomically and durably (temp file, fsync, rename,
/// fsync of the directory).
pub fn write_anchor(dir: &Path, anchor: &Anchor) -> io::Result<()> {
    let tmp = dir.join(format!("{ANCHOR_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(anchor).map_err(io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(ANCHOR_FILE))?;
    sync_dir(dir)
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort() {
        assert_eq!(segment_name(1), "seg-00000000000000000001.jsonl");
        assert_eq!(parse_segment_name(&segment_name(123_456)), Some(123_456));
        assert_eq!(parse_segment_name("seg-1.jsonl"), None);
        assert_eq!(parse_segment_name("seg-0000000000000000000x.jsonl"), None);
        assert!(segment_name(9) < segment_name(10));
    }

    #[test]
    fn lines_mark_a_torn_tail() {
        let lines = split_lines(b"a\nbc\nde");
        assert_eq!(lines.len(), 3);
        assert_eq!((lines[1].offset, lines[1].bytes.as_slice(), lines[1].complete), (2, &b"bc"[..], true));
        assert_eq!((lines[2].number, lines[2].complete), (3, false));
        assert!(split_lines(b"").is_empty());
        assert_eq!(split_lines(b"\n")[0].bytes, b"");
    }

    #[test]
    fn reading_a_file_line_by_line_loses_nothing_across_its_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let long = vec![b'x'; 200_000];
        let contents: [&[u8]; 6] = [b"", b"\n", b"a\nbc\nde", b"a\n\n\nb\n", &long, b"{\"seq\":1}\n{\"seq\":2"];
        for content in contents {
            let path = dir.path().join("seg");
            std::fs::write(&path, content).unwrap();
            let mut read = Vec::new();
            for_each_line(&path, |l| {
                read.push(l.to_line());
                Ok::<(), io::Error>(())
            })
            .unwrap();
            assert_eq!(read, split_lines(content), "{:?}", String::from_utf8_lossy(&content[..content.len().min(40)]));
        }
    }
}
