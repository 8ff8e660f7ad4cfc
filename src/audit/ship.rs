//! Shipping: records leave the WAL for the collector in order, in batches;
//! segments are released only after the collector says they are durable.
//!
//! ```text
//!   WAL dir ─ cursor (segment, byte offset) ─▶ complete lines with seq > shipped
//!           ─ POST /v1/records (NDJSON) ─▶ {durableThrough: N} ─▶ Wal::release_through(N)
//! ```
//!
//! Delivery is at-least-once: after a restart the cursor starts over at the
//! oldest segment left and the collector drops what it already holds.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::record::Record;
use super::segment;
use crate::bearer::ClientCredential;

/// Most bytes in one batch.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Why a round failed (the caller backs off and retries).
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// Reading the WAL failed.
    #[error("reading the WAL: {0}")]
    Read(String),
    /// The collector could not be reached.
    #[error("collector unreachable: {0}")]
    Unreachable(String),
    /// The collector refused the batch.
    #[error("collector refused the batch ({status} {class}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error class.
        class: String,
        /// Message.
        message: String,
    },
}

impl From<std::io::Error> for ShipError {
    fn from(e: std::io::Error) -> ShipError {
        ShipError::Read(e.to_string())
    }
}

/// What a round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// Records through this seq are durable at the collector.
    Through(u64),
    /// Nothing new to send.
    Idle,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ack {
    durable_through: u64,
}

#[derive(Deserialize)]
struct Refusal {
    error: String,
    message: String,
}

/// A position in the WAL: (first seq of the segment, byte offset of the
/// next unread line).
type Cursor = (u64, u64);

/// A batch to send: its NDJSON body, its last seq, the cursor after it.
struct Batch {
    body: bytes::Bytes,
    last: u64,
    cursor: Cursor,
}

/// Ships one WAL directory to one collector.
pub struct Shipper {
    dir: PathBuf,
    url: String,
    credential: ClientCredential,
    http: reqwest::Client,
    cursor: Option<Cursor>,
    shipped: u64,
}

impl Shipper {
    /// A shipper of `dir` to the collector at `base` (e.g.
    /// `http://127.0.0.1:7443`).
    pub fn new(dir: PathBuf, base: &str, credential: ClientCredential) -> Result<Shipper, ShipError> {
        let http = crate::bearer::api_client(None).map_err(ShipError::Unreachable)?;
        Ok(Shipper::with_client(dir, base, credential, http))
    }

    /// A shipper using `http` (e.g. one trusting the warden's CA).
    pub fn with_client(dir: PathBuf, base: &str, credential: ClientCredential, http: reqwest::Client) -> Shipper {
        Shipper {
            dir,
            url: format!("{}/v1/records", base.trim_end_matches('/')),
            credential,
            http,
            cursor: None,
            shipped: 0,
        }
    }

    /// The highest seq the collector acknowledged.
    pub fn shipped(&self) -> u64 {
        self.shipped
    }

    /// The next batch: complete lines after the cursor with seq > shipped,
    /// and the cursor after them.
    fn next_batch(&mut self) -> Result<Option<Batch>, ShipError> {
        let read = |e: std::io::Error| ShipError::Read(e.to_string());
        let segments = segment::list_segments(&self.dir).map_err(read)?;
        let mut index = match self.cursor {
            Some((first, _)) => segments.iter().position(|(s, _)| *s == first).unwrap_or(0),
            None => 0,
        };
        let mut offset = match self.cursor {
            Some((first, offset)) if segments.get(index).is_some_and(|(s, _)| *s == first) => offset,
            _ => 0,
        };
        while let Some((first, path)) = segments.get(index) {
            let mut file = std::fs::File::open(path).map_err(read)?;
            file.seek(SeekFrom::Start(offset)).map_err(read)?;
            let mut buffer = Vec::new();
            file.take(MAX_BATCH_BYTES as u64).read_to_end(&mut buffer).map_err(read)?;
            // Seqs are consecutive in a segment: what was shipped is a prefix,
            // and the batch is the complete lines after it, sent as read.
            let (mut fresh_from, mut last, mut consumed) = (None, None, 0u64);
            segment::each_line_in(&buffer, |line| {
                if !line.complete {
                    return Ok(());
                }
                let at = || format!("{} at byte {}", path.display(), offset + line.offset);
                consumed = line.offset + line.bytes.len() as u64 + 1;
                let record = Record::parse_line(line.bytes).map_err(|e| ShipError::Read(format!("{}: {e}", at())))?;
                match last {
                    // A WAL's records are consecutive; the collector would refuse the batch.
                    Some(before) if record.seq != before + 1 => {
                        return Err(ShipError::Read(format!("{}: seq {} follows seq {before}", at(), record.seq)));
                    }
                    Some(_) => last = Some(record.seq),
                    None if record.seq > self.shipped => {
                        fresh_from = Some(line.offset);
                        last = Some(record.seq);
                    }
                    None => {}
                }
                Ok(())
            })?;
            let cursor = (*first, offset + consumed);
            if let (Some(last), Some(from)) = (last, fresh_from) {
                let body = bytes::Bytes::from(buffer).slice(from as usize..consumed as usize);
                return Ok(Some(Batch { body, last, cursor }));
            }
            if consumed > 0 {
                // Only records already shipped: move past them.
                offset += consumed;
                self.cursor = Some(cursor);
                continue;
            }
            // Nothing complete here; a later segment means this one is done.
            if index + 1 < segments.len() {
                index += 1;
                offset = 0;
                continue;
            }
            self.cursor = Some(cursor);
            return Ok(None);
        }
        Ok(None)
    }

    /// Sends the next batch, if any.
    pub async fn ship_once(&mut self) -> Result<Shipped, ShipError> {
        let Some(Batch { body, last, cursor }) = self.next_batch()? else { return Ok(Shipped::Idle) };
        let credential = self.credential.current().map_err(ShipError::Read)?;
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&credential)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .map_err(|e| ShipError::Unreachable(e.without_url().to_string()))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| ShipError::Unreachable(e.to_string()))?;
        if !status.is_success() {
            let refusal: Refusal = serde_json::from_slice(&bytes)
                .unwrap_or(Refusal { error: "unknown".into(), message: String::from_utf8_lossy(&bytes).into() });
            return Err(ShipError::Refused { status: status.as_u16(), class: refusal.error, message: refusal.message });
        }
        let ack: Ack =
            serde_json::from_slice(&bytes).map_err(|e| ShipError::Unreachable(format!("bad answer: {e}")))?;
        if ack.durable_through < last {
            return Err(ShipError::Refused {
                status: status.as_u16(),
                class: "short_ack".into(),
                message: format!("acknowledged through {} of {last}", ack.durable_through),
            });
        }
        self.shipped = ack.durable_through;
        self.cursor = Some(cursor);
        Ok(Shipped::Through(ack.durable_through))
    }
}

/// Time a sealed stream gets to reach the collector at shutdown.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Ships until told to stop, then hands the shipper back (and with it the
/// last reference to the WAL it releases).
pub async fn ship_loop(
    mut shipper: Shipper,
    wal: std::sync::Arc<super::Wal>,
    stop: std::sync::Arc<tokio::sync::Notify>,
) -> Shipper {
    let mut backoff = std::time::Duration::from_millis(250);
    loop {
        let pause = match shipper.ship_once().await {
            Ok(Shipped::Through(through)) => {
                backoff = std::time::Duration::from_millis(250);
                if let Err(e) = wal.release_through(through).await {
                    tracing::warn!(error = %e, "releasing shipped WAL segments failed");
                }
                std::time::Duration::ZERO
            }
            Ok(Shipped::Idle) => std::time::Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "shipping to the collector failed");
                let pause = backoff;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                pause
            }
        };
        tokio::select! {
            _ = stop.notified() => return shipper,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// After the stream is sealed: ships what is left, within a bound.
pub async fn drain(mut shipper: Shipper) {
    let deadline = tokio::time::Instant::now() + DRAIN;
    while tokio::time::Instant::now() < deadline {
        match shipper.ship_once().await {
            Ok(Shipped::Idle) => {
                tracing::info!(through = shipper.shipped(), "audit stream shipped in full");
                return;
            }
            Ok(Shipped::Through(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final shipping failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
    tracing::error!(through = shipper.shipped(), "the audit stream was not shipped in full before shutdown");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::test_support::chain_lines;

    /// A WAL directory of one segment holding `content`, and a shipper of
    /// it that the collector has acknowledged through `shipped`.
    fn shipper_over(content: &[u8], shipped: u64) -> (tempfile::TempDir, Shipper) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(segment::segment_name(1)), content).unwrap();
        let mut shipper =
            Shipper::new(dir.path().into(), "http://127.0.0.1:9", ClientCredential::Fixed("c".into())).unwrap();
        shipper.shipped = shipped;
        (dir, shipper)
    }

    fn joined(lines: &[Vec<u8>]) -> Vec<u8> {
        lines.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect()
    }

    #[test]
    fn a_batch_is_the_complete_lines_after_what_was_shipped_as_written() {
        let (_, lines) = chain_lines(6);
        let mut content = joined(&lines);
        let complete = content.len() as u64;
        content.extend_from_slice(&lines[5][..40]); // a torn tail: not sent, not passed
        let (_dir, mut shipper) = shipper_over(&content, 2);
        let batch = shipper.next_batch().unwrap().expect("a batch");
        assert_eq!(batch.body, joined(&lines[2..]));
        assert_eq!((batch.last, batch.cursor.1), (6, complete));
    }

    #[test]
    fn only_shipped_records_move_the_cursor_without_a_batch() {
        let (_, lines) = chain_lines(3);
        let (_dir, mut shipper) = shipper_over(&joined(&lines), 3);
        assert!(shipper.next_batch().unwrap().is_none());
        assert_eq!(shipper.cursor.map(|c| c.1), Some(joined(&lines).len() as u64));
    }

    #[test]
    fn records_out_of_order_after_the_shipped_ones_are_an_error_not_a_batch() {
        let (_, lines) = chain_lines(4);
        let reordered = [lines[0].clone(), lines[2].clone(), lines[1].clone(), lines[3].clone()];
        let (_dir, mut shipper) = shipper_over(&joined(&reordered), 1);
        let error = shipper.next_batch().err().expect("refused").to_string();
        assert!(error.contains("seq 2 follows seq 3"), "{error}");
    }

    #[test]
    fn a_line_that_is_not_a_record_is_an_error_naming_where_not_what() {
        let (_, lines) = chain_lines(2);
        let mut content = joined(&lines);
        content.extend_from_slice(b"{\"patient\":\"Jane Roe\"}\n");
        let (_dir, mut shipper) = shipper_over(&content, 0);
        let error = shipper.next_batch().err().expect("refused").to_string();
        assert!(error.contains(&format!("at byte {}", joined(&lines).len())), "{error}");
        assert!(!error.contains("Jane"), "{error}");
    }
}
