//! The write-ahead log: records are durable before the action they record
//! proceeds.
//!
//! ```text
//!   append(event) ─┐                               ┌─ Ok(Receipt{seq, hash})  → the action may proceed
//!   append(event) ─┼─▶ queue ─▶ writer thread ─────┼─ Err(WalError)          → the caller's failure policy
//!   append(event) ─┘            drain queue (group commit)
//!                               seal records (seq, prev, hash)
//!                               one write(), one fdatasync() for the group
//!                               on failure: cut the file back, roll the chain back
//!   defer(event)  ─▶ deferred queue ─▶ written with the next group, or alone
//!                    (no wake-up)       once it has waited `defer_window` at most
//! ```
//!
//! A deferred record (a call's outcome, written after its answer went out)
//! is not waited for: it joins the next group commit, so at one request at a
//! time a call costs one fsync instead of two, and it is never alone on disk
//! for longer than the window. Nothing reaches the file before its fsync
//! starts, so a reader of the segments (the shipper) never sees a record
//! that is not, or is not about to be, durable.
//!
//! One thread owns the files, so records are ordered and never interleaved;
//! concurrent callers share each fsync. A failed write leaves no partial
//! record (the segment is truncated back to its length before the batch);
//! a failed fsync poisons the log, because the kernel may have dropped the
//! unwritten pages: every later append fails until the log is reopened and
//! recovered from what is really on disk.
//!
//! On open, a torn tail (a record without its newline, from a crash during
//! a write) is cut off, and the restart is itself recorded with the size and
//! hash of what was cut.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::record::{Chain, Event, Kind, Record, RecordError, Restart, Sealed};
use super::segment::{self, Anchor, LOCK_FILE};

mod deferred;
use deferred::{DeferQueue, Pushed, Refused};

/// Settings of a WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalConfig {
    /// The directory (mounted by the writer's container only).
    pub dir: PathBuf,
    /// The MCPServer, `namespace/name`.
    pub server: String,
    /// The pod, if any.
    pub pod: Option<String>,
    /// A new segment is started once the active one reaches this size.
    pub segment_bytes: u64,
    /// Total size of all segments beyond which appends fail with
    /// [`WalError::Full`] (until segments are released).
    pub max_bytes: u64,
    /// Most appends committed by one write and one fsync.
    pub max_batch: usize,
    /// Appends that may wait for the writer.
    pub queue_depth: usize,
    /// How long an async append waits for its record to be durable.
    pub append_timeout: Duration,
    /// Longest a deferred record waits for a group to join before it is
    /// made durable on its own.
    pub defer_window: Duration,
}

impl WalConfig {
    /// Defaults for `dir`, written for `server`.
    pub fn new(dir: impl Into<PathBuf>, server: impl Into<String>) -> Self {
        WalConfig {
            dir: dir.into(),
            server: server.into(),
            pod: None,
            segment_bytes: 16 * 1024 * 1024,
            max_bytes: 768 * 1024 * 1024,
            max_batch: 1024,
            queue_depth: 8192,
            append_timeout: Duration::from_secs(5),
            defer_window: Duration::from_millis(10),
        }
    }
}

/// Proof that a record is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// Why the WAL could not make a record durable. The caller applies its
/// failure policy: `Closed` refuses the action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// The directory cannot be used.
    #[error("audit WAL directory {dir}: {message}")]
    Open {
        /// The directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
    /// Another writer holds the directory.
    #[error("audit WAL directory {0} is in use by another writer")]
    Locked(PathBuf),
    /// The directory holds something that cannot be resumed.
    #[error("audit WAL cannot be recovered: {0}")]
    Recover(String),
    /// The disk bound is reached.
    #[error("audit WAL is full: {used} of {limit} bytes in use; records must be shipped and released first")]
    Full {
        /// Bytes in use.
        used: u64,
        /// The bound.
        limit: u64,
    },
    /// Writing failed; nothing of the failed records remains on disk.
    #[error("audit WAL write failed ({kind:?}): {message}")]
    Write {
        /// The I/O error kind (e.g. `StorageFull`).
        kind: io::ErrorKind,
        /// The error.
        message: String,
    },
    /// An fsync failed (or a failed write could not be undone); the log
    /// refuses appends until it is reopened.
    #[error("audit WAL refuses appends until reopened: {0}")]
    Poisoned(String),
    /// The record itself is invalid.
    #[error("audit record refused: {0}")]
    Record(#[from] RecordError),
    /// No answer within the append timeout.
    #[error("audit WAL did not make the record durable within {0:?}")]
    Timeout(Duration),
    /// The WAL was closed.
    #[error("audit WAL is closed")]
    Closed,
}

impl WalError {
    fn io(dir: &Path, e: &io::Error) -> Self {
        WalError::Open { dir: dir.to_path_buf(), message: e.to_string() }
    }

    fn write(e: &io::Error) -> Self {
        WalError::Write { kind: e.kind(), message: e.to_string() }
    }
}

/// What `open` found and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The stream id.
    pub stream: String,
    /// The restart, when an existing stream was resumed.
    pub restart: Option<Restart>,
    /// The stream-start record written by `open`.
    pub start: Receipt,
}

type Reply<T> = oneshot::Sender<Result<T, WalError>>;

enum Command {
    // Boxed: events are large and most commands are appends.
    Append {
        event: Box<Event>,
        reply: Reply<Receipt>,
    },
    /// The deferred queue needs the writer (see `deferred`).
    Wake,
    Release {
        through: u64,
        reply: Reply<u64>,
    },
    Close {
        reply: Reply<Receipt>,
    },
}

/// A handle to an open WAL; cheap to share behind an `Arc`.
pub struct Wal {
    tx: mpsc::Sender<Command>,
    deferred: Arc<DeferQueue>,
    poisoned: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    opened: Opened,
    append_timeout: Duration,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("stream", &self.opened.stream).finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (creating or recovering) the WAL in `config.dir` and makes its
    /// stream-start record durable before returning.
    pub fn open(config: WalConfig) -> Result<Wal, WalError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| WalError::io(&config.dir, &e))?;
        let lock = lock_dir(&config.dir)?;
        let (mut writer, restart) = Writer::recover_or_create(&config, lock)?;
        let poisoned = Arc::clone(&writer.poison_flag);
        let deferred = Arc::clone(&writer.deferred);
        let start = writer.commit_one(Event { restart: restart.clone(), ..Event::new(Kind::StreamStart) })?;
        let opened = Opened { stream: writer.chain.stream().to_string(), restart, start };
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let thread = std::thread::Builder::new()
            .name("audit-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| WalError::io(&config.dir, &e))?;
        Ok(Wal {
            tx,
            deferred,
            poisoned,
            thread: Mutex::new(Some(thread)),
            opened,
            append_timeout: config.append_timeout,
        })
    }

    /// What `open` found and wrote.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Whether the writer refuses appends until reopened (a failed fsync).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed)
    }

    /// Appends a record and waits until it is durable (or fails, or the
    /// append timeout passes).
    pub async fn append(&self, event: Event) -> Result<Receipt, WalError> {
        let (reply, rx) = oneshot::channel();
        let wait = async {
            self.tx.send(Command::Append { event: Box::new(event), reply }).await.map_err(|_| WalError::Closed)?;
            rx.await.map_err(|_| WalError::Closed)?
        };
        tokio::time::timeout(self.append_timeout, wait).await.map_err(|_| WalError::Timeout(self.append_timeout))?
    }

    /// Queues a record that need not be durable before the caller goes on
    /// (the outcome of a call whose answer is already sent). It is made
    /// durable with the next append's group, or on its own after at most
    /// `defer_window`. Its write shares the fate of that group: a failure
    /// shows on the appends written with it and, for a failed fsync, in
    /// [`Wal::is_poisoned`]. Waits only while the queue is full.
    pub async fn defer(&self, event: Event) -> Result<(), WalError> {
        match self.deferred.push(event, self.append_timeout).await {
            Ok(pushed) => self.wake_for(pushed),
            Err((Refused::Full, _)) => Err(WalError::Timeout(self.append_timeout)),
            Err((Refused::Closed, _)) => Err(WalError::Closed),
        }
    }

    fn wake_for(&self, pushed: Pushed) -> Result<(), WalError> {
        if pushed == Pushed::Wake {
            // A full channel holds commands the writer will wake for anyway.
            if let Err(mpsc::error::TrySendError::Closed(_)) = self.tx.try_send(Command::Wake) {
                return Err(WalError::Closed);
            }
        }
        Ok(())
    }

    /// [`Wal::defer`] without waiting: hands the event back when the queue
    /// is full (or the WAL closed), for callers that cannot await (a
    /// response body's `Drop`).
    pub fn try_defer(&self, event: Event) -> Result<(), Box<Event>> {
        match self.deferred.try_push(event) {
            // Queued: if the writer is gone, close or the next open reports it.
            Ok(pushed) => {
                let _ = self.wake_for(pushed);
                Ok(())
            }
            Err((_, event)) => Err(event),
        }
    }

    /// [`Wal::append`] for threads outside an async runtime (no timeout).
    pub fn append_blocking(&self, event: Event) -> Result<Receipt, WalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(Command::Append { event: Box::new(event), reply }).map_err(|_| WalError::Closed)?;
        rx.blocking_recv().map_err(|_| WalError::Closed)?
    }

    /// Deletes the segments whose records all have `seq <= through` (never
    /// the active one), after anchoring the stream at the last deleted
    /// record. Returns the bytes freed.
    pub async fn release_through(&self, through: u64) -> Result<u64, WalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Release { through, reply }).await.map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// [`Wal::release_through`] outside an async runtime.
    pub fn release_through_blocking(&self, through: u64) -> Result<u64, WalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(Command::Release { through, reply }).map_err(|_| WalError::Closed)?;
        rx.blocking_recv().map_err(|_| WalError::Closed)?
    }

    /// Writes the stream-end record, stops the writer and releases the
    /// directory.
    pub async fn close(self) -> Result<Receipt, WalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Close { reply }).await.map_err(|_| WalError::Closed)?;
        let result = rx.await.map_err(|_| WalError::Closed)?;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // The writer has answered Close and is returning; joining only
            // waits for its files to be dropped (and the lock released).
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }

    /// Closes a shared WAL once every other handle is gone. Handles held by
    /// tasks that are finishing (connection tasks just after a server
    /// stops) get two seconds; after that the stream is left unsealed, with
    /// a warning, and the next open records a restart. `Ok(None)` then.
    pub async fn close_shared(mut wal: Arc<Wal>) -> Result<Option<Receipt>, WalError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match Arc::try_unwrap(wal) {
                Ok(sole) => return sole.close().await.map(Some),
                Err(shared) if tokio::time::Instant::now() < deadline => {
                    wal = shared;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => {
                    tracing::warn!(
                        "audit WAL still in use at shutdown; left unsealed, the next start records a restart"
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// [`Wal::close`] outside an async runtime.
    pub fn close_blocking(self) -> Result<Receipt, WalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(Command::Close { reply }).map_err(|_| WalError::Closed)?;
        let result = rx.blocking_recv().map_err(|_| WalError::Closed)?;
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
        result
    }
}

/// Takes the directory's writer lock, so two writers never share a chain.
fn lock_dir(dir: &Path) -> Result<File, WalError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| WalError::io(dir, &e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(WalError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(WalError::io(dir, &e)),
    }
}

struct Pending {
    event: Event,
    /// None for a deferred record: nobody waits for it.
    reply: Option<Reply<Receipt>>,
}

/// Answers a waiting appender, if any.
fn answer(reply: Option<Reply<Receipt>>, result: Result<Receipt, WalError>) {
    if let Some(reply) = reply {
        let _ = reply.send(result);
    }
}

/// The state owned by the writer thread.
struct Writer {
    dir: PathBuf,
    chain: Chain,
    active: File,
    active_len: u64,
    /// First sequence numbers of the segments on disk, active one last.
    segments: Vec<(u64, PathBuf)>,
    total_bytes: u64,
    segment_bytes: u64,
    max_bytes: u64,
    max_batch: usize,
    poisoned: Option<String>,
    poison_flag: Arc<AtomicBool>,
    /// Deferred records waiting for a group (shared with the handles).
    deferred: Arc<DeferQueue>,
    defer_window: Duration,
    _lock: File,
}

/// The last valid record of a segment, and where it ends.
struct Tail {
    record: Record,
    end: u64,
}

fn last_valid_record(content: &[u8]) -> Option<Tail> {
    segment::split_lines(content).into_iter().rev().filter(|l| l.complete).find_map(|line| {
        Record::parse_line(&line.bytes)
            .ok()
            .map(|record| Tail { record, end: line.offset + line.bytes.len() as u64 + 1 })
    })
}

fn open_append(path: &Path, create_new: bool) -> io::Result<File> {
    OpenOptions::new().append(true).create_new(create_new).open(path)
}

impl Writer {
    /// Finds the chain's head on disk (cutting off a torn tail), or starts a
    /// new stream.
    fn recover_or_create(config: &WalConfig, lock: File) -> Result<(Writer, Option<Restart>), WalError> {
        let dir = &config.dir;
        let io_err = |e: io::Error| WalError::io(dir, &e);
        let mut segments = segment::list_segments(dir).map_err(io_err)?;
        let anchor = segment::read_anchor(dir).map_err(io_err)?;
        let mut torn = Vec::new();
        let mut head: Option<Record> = None;
        // Walk back from the newest segment to the last valid record;
        // everything after it is an unfinished write.
        while let Some((first_seq, path)) = segments.last().cloned() {
            let content = std::fs::read(&path).map_err(io_err)?;
            match last_valid_record(&content) {
                Some(tail) => {
                    let end = usize::try_from(tail.end).unwrap_or(content.len());
                    if end < content.len() {
                        torn.splice(0..0, content[end..].iter().copied());
                        cut(&path, tail.end).map_err(io_err)?;
                    }
                    head = Some(tail.record);
                    break;
                }
                None => {
                    torn.splice(0..0, content.iter().copied());
                    std::fs::remove_file(&path).map_err(io_err)?;
                    segments.pop();
                    tracing::warn!(segment = first_seq, "audit WAL: removed a segment holding no complete record");
                }
            }
        }
        let restart = |previous_seq: u64| Restart {
            previous_seq,
            torn_bytes: torn.len() as u64,
            torn_sha256: (!torn.is_empty()).then(|| hex::encode(Sha256::digest(&torn))),
        };
        let (chain, restart) = match (head, anchor) {
            (Some(record), _) => {
                if record.server != config.server {
                    return Err(WalError::Recover(format!(
                        "{} holds the stream of server {}, not {}",
                        dir.display(),
                        record.server,
                        config.server
                    )));
                }
                let previous = record.seq;
                let chain = Chain::resume(record.stream, record.server, config.pod.clone(), record.seq, record.hash);
                (chain, Some(restart(previous)))
            }
            (None, Some(anchor)) => {
                let chain =
                    Chain::resume(anchor.stream, config.server.clone(), config.pod.clone(), anchor.seq, anchor.hash);
                (chain, Some(restart(anchor.seq)))
            }
            (None, None) => {
                let pod = config.pod.as_deref().unwrap_or("local");
                let stream = format!("{}/{pod}/{}", config.server, uuid::Uuid::new_v4().simple());
                let chain = Chain::new(stream, config.server.clone(), config.pod.clone());
                // A tail torn before any record became durable is still reported.
                (chain, (!torn.is_empty()).then(|| restart(0)))
            }
        };
        if segments.is_empty() {
            let path = dir.join(segment::segment_name(chain.next_seq()));
            open_append(&path, true).map_err(io_err)?;
            segment::sync_dir(dir).map_err(io_err)?;
            segments.push((chain.next_seq(), path));
        }
        let Some((_, active_path)) = segments.last().cloned() else {
            return Err(WalError::Recover("no active segment".into()));
        };
        let active = open_append(&active_path, false).map_err(io_err)?;
        let active_len = active.metadata().map_err(io_err)?.len();
        let mut total_bytes = 0;
        for (_, path) in &segments {
            total_bytes += std::fs::metadata(path).map_err(io_err)?.len();
        }
        let writer = Writer {
            dir: dir.clone(),
            chain,
            active,
            active_len,
            segments,
            total_bytes,
            segment_bytes: config.segment_bytes.max(1),
            max_bytes: config.max_bytes,
            max_batch: config.max_batch.max(1),
            poisoned: None,
            poison_flag: Arc::new(AtomicBool::new(false)),
            deferred: Arc::new(DeferQueue::new(config.queue_depth, config.max_batch.max(1))),
            defer_window: config.defer_window,
            _lock: lock,
        };
        Ok((writer, restart))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // A clock for the deferred records' deadline; the thread's blocking
        // I/O runs on nothing else.
        let clock = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(clock) => clock,
            Err(e) => {
                self.poison(format!("the writer's clock could not start: {e}"));
                return;
            }
        };
        // Armed since its last commit: the writer waits at most a window
        // for a command, so a record deferred meanwhile needs no wake-up.
        let mut armed: Option<std::time::Instant> = None;
        loop {
            let deadline = match (self.deferred.since(), armed) {
                (Some(since), Some(armed)) => Some(since.min(armed) + self.defer_window),
                (Some(from), None) | (None, Some(from)) => Some(from + self.defer_window),
                (None, None) => None,
            };
            let first = match deadline {
                None => rx.blocking_recv(),
                Some(deadline) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    match clock.block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await }) {
                        Ok(command) => command,
                        Err(_elapsed) if self.deferred.park() => {
                            armed = None;
                            continue;
                        }
                        Err(_elapsed) => {
                            self.commit(Vec::new());
                            armed = Some(self.arm());
                            continue;
                        }
                    }
                }
            };
            let Some(first) = first else { break };
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append { event, reply } => batch.push(Pending { event: *event, reply: Some(reply) }),
                    Command::Wake => {}
                    Command::Release { through, reply } => {
                        self.commit_all(std::mem::take(&mut batch));
                        let _ = reply.send(self.release_through(through));
                    }
                    Command::Close { reply } => {
                        // Closed first: a record deferred from now on is
                        // refused, never left behind in the queue.
                        self.deferred.close();
                        self.commit_all(std::mem::take(&mut batch));
                        let _ = reply.send(self.commit_one(Event::new(Kind::StreamEnd)));
                        return;
                    }
                }
                if batch.len() < self.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            // A steady stream of deferred records alone still gets its
            // fsync once the oldest has waited the window.
            let overdue = self.deferred.since().is_some_and(|since| since.elapsed() >= self.defer_window);
            if !batch.is_empty() {
                self.commit_all(batch);
                armed = Some(self.arm());
            } else if overdue || self.deferred.len() >= self.max_batch {
                self.commit(batch);
                armed = Some(self.arm());
            }
        }
        // Every handle dropped without close: what is deferred is written,
        // then the writer stops as a crash would, with no stream-end; the
        // next open records the restart.
        self.deferred.close();
        self.commit_all(Vec::new());
    }

    /// Starts a window in which a deferred record is taken without a
    /// wake-up; returns when it started.
    fn arm(&self) -> std::time::Instant {
        self.deferred.arm();
        std::time::Instant::now()
    }

    /// Commits `batch` after every deferred record, however many batches
    /// that takes.
    fn commit_all(&mut self, batch: Vec<Pending>) {
        while self.deferred.len() > self.max_batch {
            self.commit(Vec::new());
        }
        self.commit(batch);
    }

    fn commit_one(&mut self, event: Event) -> Result<Receipt, WalError> {
        let (reply, mut rx) = oneshot::channel();
        self.commit(vec![Pending { event, reply: Some(reply) }]);
        rx.try_recv().map_err(|_| WalError::Closed)?
    }

    /// Makes a group of records durable with one write and one fsync: the
    /// deferred records waiting first, in the order they came, then `batch`.
    fn commit(&mut self, batch: Vec<Pending>) {
        let deferred = self.deferred.take().into_iter().map(|event| Pending { event, reply: None });
        let batch: Vec<Pending> = deferred.chain(batch).collect();
        if batch.is_empty() {
            return;
        }
        if let Some(reason) = &self.poisoned {
            for pending in batch {
                answer(pending.reply, Err(WalError::Poisoned(reason.clone())));
            }
            return;
        }
        if let Err(e) = self.rotate_if_full() {
            for pending in batch {
                answer(pending.reply, Err(e.clone()));
            }
            return;
        }
        let before = self.chain.clone();
        let now = Utc::now();
        let mut buf = Vec::new();
        let mut accepted: Vec<(Option<Reply<Receipt>>, Receipt)> = Vec::new();
        for Pending { event, reply } in batch {
            let sealed: Sealed = match self.chain.prepare(event, now) {
                Ok(sealed) => sealed,
                Err(e) => {
                    answer(reply, Err(WalError::Record(e)));
                    continue;
                }
            };
            let used = self.total_bytes + buf.len() as u64;
            if used + sealed.line.len() as u64 > self.max_bytes {
                answer(reply, Err(WalError::Full { used, limit: self.max_bytes }));
                continue;
            }
            self.chain.commit(&sealed);
            buf.extend_from_slice(&sealed.line);
            accepted.push((reply, Receipt { seq: sealed.record.seq, hash: sealed.record.hash }));
        }
        if accepted.is_empty() {
            return;
        }
        match self.write_durably(&buf) {
            Ok(()) => {
                self.active_len += buf.len() as u64;
                self.total_bytes += buf.len() as u64;
                for (reply, receipt) in accepted {
                    answer(reply, Ok(receipt));
                }
            }
            Err(e) => {
                self.chain = before;
                tracing::error!(error = %e, records = accepted.len(), "audit WAL: records not made durable");
                for (reply, _) in accepted {
                    answer(reply, Err(e.clone()));
                }
            }
        }
    }

    fn write_durably(&mut self, buf: &[u8]) -> Result<(), WalError> {
        let before = self.active_len;
        if let Err(e) = self.active.write_all(buf) {
            self.undo(before);
            return Err(WalError::write(&e));
        }
        if let Err(e) = self.active.sync_data() {
            // After a failed fsync the page cache cannot be trusted: cut the
            // batch and refuse everything until the log is recovered.
            self.undo(before);
            let reason = format!("fsync failed: {e}");
            self.poison(reason.clone());
            return Err(WalError::Poisoned(reason));
        }
        Ok(())
    }

    /// Cuts the active segment back to `len`, so a failed batch leaves no
    /// partial record.
    fn undo(&mut self, len: u64) {
        if let Err(e) = self.active.set_len(len).and_then(|()| self.active.sync_all()) {
            self.poison(format!("a partially written batch could not be removed: {e}"));
        }
    }

    fn poison(&mut self, reason: String) {
        tracing::error!(reason = %reason, "audit WAL poisoned: refusing appends until reopened");
        self.poisoned = Some(reason);
        self.poison_flag.store(true, Ordering::Relaxed);
    }

    fn rotate_if_full(&mut self) -> Result<(), WalError> {
        if self.active_len < self.segment_bytes {
            return Ok(());
        }
        let first = self.chain.next_seq();
        let path = self.dir.join(segment::segment_name(first));
        let file = open_append(&path, true).map_err(|e| WalError::write(&e))?;
        segment::sync_dir(&self.dir).map_err(|e| WalError::write(&e))?;
        self.active = file;
        self.active_len = 0;
        self.segments.push((first, path));
        Ok(())
    }

    fn release_through(&mut self, through: u64) -> Result<u64, WalError> {
        // A segment's last record is the one before the next segment's first.
        let removable = self.segments.windows(2).take_while(|w| w[1].0 - 1 <= through).count();
        if removable == 0 {
            return Ok(0);
        }
        let (boundary_first, boundary_path) = self.segments[removable].clone();
        let hash = match segment::read_lines(&boundary_path).map_err(|e| WalError::write(&e))?.first() {
            Some(line) => Record::parse_line(&line.bytes)?.prev,
            // The boundary is the fresh, still empty active segment.
            None => self.chain.head_hash().to_string(),
        };
        let anchor = Anchor { stream: self.chain.stream().to_string(), seq: boundary_first - 1, hash };
        segment::write_anchor(&self.dir, &anchor).map_err(|e| WalError::write(&e))?;
        let mut freed = 0;
        for (_, path) in self.segments.drain(..removable) {
            freed += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path).map_err(|e| WalError::write(&e))?;
        }
        segment::sync_dir(&self.dir).map_err(|e| WalError::write(&e))?;
        self.total_bytes = self.total_bytes.saturating_sub(freed);
        Ok(freed)
    }
}

fn cut(path: &Path, len: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
