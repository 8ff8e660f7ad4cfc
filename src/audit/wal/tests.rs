//! The WAL in one process: ordering, restarts, torn tails, the disk bound,
//! rotation and release. Crashes, full disks and unwritable directories are
//! exercised against real processes in `tests/audit_wal.rs`.

use std::sync::Arc;

use super::*;
use crate::audit::record::{Caller, Decision};
use crate::audit::verify::{VerifyOptions, verify_dir};

fn config(dir: &Path) -> WalConfig {
    WalConfig { pod: Some("p-1".into()), ..WalConfig::new(dir, "clinic/patient-lookup") }
}

fn decision(n: usize) -> Event {
    Event {
        correlation: Some(format!("c-{n}")),
        caller: Some(Caller { sub: "alice".into(), iss: "https://login.example.org".into(), groups: vec![] }),
        method: Some("tools/call".into()),
        tool: Some("lookup_patient".into()),
        decision: Some(Decision::Allow),
        ..Event::new(Kind::Decision)
    }
}

fn records(dir: &Path) -> Vec<Record> {
    segment::list_segments(dir)
        .expect("segments")
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).expect("lines"))
        .map(|l| Record::parse_line(&l.bytes).expect("valid record"))
        .collect()
}

#[track_caller]
fn assert_verifies(dir: &Path, sealed: bool) {
    let report = verify_dir(dir, VerifyOptions { require_sealed: sealed, ..Default::default() });
    assert!(report.passed(), "{report:#?}");
}

#[test]
fn a_stream_starts_appends_and_ends_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    assert_eq!(wal.opened().start.seq, 1);
    assert!(wal.opened().restart.is_none());
    assert!(wal.opened().stream.starts_with("clinic/patient-lookup/p-1/"));
    for n in 0..10 {
        assert_eq!(wal.append_blocking(decision(n)).expect("append").seq, n as u64 + 2);
    }
    let end = wal.close_blocking().expect("close");
    assert_eq!(end.seq, 12);
    let all = records(dir.path());
    assert_eq!(all.len(), 12);
    assert_eq!(all[0].event.kind, Kind::StreamStart);
    assert_eq!(all[11].event.kind, Kind::StreamEnd);
    assert_eq!(all[11].hash, end.hash);
    assert_eq!(all[5].pod.as_deref(), Some("p-1"));
    assert_verifies(dir.path(), true);
}

#[test]
fn a_reopened_stream_continues_and_records_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Wal::open(config(dir.path())).expect("open");
    let stream = first.opened().stream.clone();
    first.append_blocking(decision(0)).expect("append");
    first.close_blocking().expect("close");
    let again = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(again.opened().stream, stream);
    assert_eq!(again.opened().restart, Some(Restart { previous_seq: 3, torn_bytes: 0, torn_sha256: None }));
    assert_eq!(again.opened().start.seq, 4);
    again.close_blocking().expect("close");
    let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.streams[0].restarts, 1);
}

#[test]
fn a_torn_tail_is_cut_and_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    wal.append_blocking(decision(0)).expect("append");
    drop(wal.close_blocking());
    let (_, active) = segment::list_segments(dir.path()).expect("segments").pop().expect("one segment");
    let torn = br#"{"v":1,"stream":"clinic/patient-lookup/p-1/x","seq":4,"ti"#;
    OpenOptions::new().append(true).open(&active).and_then(|mut f| f.write_all(torn)).expect("tear");
    assert!(!verify_dir(dir.path(), VerifyOptions::default()).passed(), "a torn tail fails verification");

    let wal = Wal::open(config(dir.path())).expect("recover");
    let restart = wal.opened().restart.clone().expect("restart");
    assert_eq!(restart.previous_seq, 3);
    assert_eq!(restart.torn_bytes, torn.len() as u64);
    assert_eq!(restart.torn_sha256, Some(hex::encode(Sha256::digest(torn))));
    wal.append_blocking(decision(1)).expect("append after recovery");
    wal.close_blocking().expect("close");
    assert_verifies(dir.path(), true);
}

#[test]
fn a_segment_of_garbage_at_the_tail_is_removed_and_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    wal.close_blocking().expect("close");
    let garbage = dir.path().join(segment::segment_name(3));
    std::fs::write(&garbage, b"\0\0\0\0").expect("garbage");
    let wal = Wal::open(config(dir.path())).expect("recover");
    assert_eq!(wal.opened().restart.as_ref().map(|r| r.torn_bytes), Some(4));
    assert!(!garbage.exists());
    wal.close_blocking().expect("close");
    assert_verifies(dir.path(), true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_contiguous_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(config(dir.path())).expect("open"));
    let mut tasks = Vec::new();
    for t in 0..32 {
        let wal = Arc::clone(&wal);
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..25 {
                seqs.push(wal.append(decision(t * 100 + n)).await.expect("append").seq);
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.extend(task.await.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=801).collect::<Vec<u64>>());
    Arc::try_unwrap(wal).expect("sole owner").close().await.expect("close");
    assert_verifies(dir.path(), true);
}

#[test]
fn the_disk_bound_refuses_appends_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig { max_bytes: 2_000, ..config(dir.path()) }).expect("open");
    let mut refused = None;
    for n in 0..100 {
        match wal.append_blocking(decision(n)) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(matches!(refused, Some(WalError::Full { limit: 2_000, .. })), "{refused:?}");
    let size: u64 = segment::list_segments(dir.path())
        .expect("segments")
        .iter()
        .map(|(_, p)| std::fs::metadata(p).expect("m").len())
        .sum();
    assert!(size <= 2_000, "{size} bytes on disk");
    let before = records(dir.path()).len();
    assert!(wal.append_blocking(decision(999)).is_err(), "still full");
    assert_eq!(records(dir.path()).len(), before, "a refused record leaves nothing behind");
    drop(wal);
    assert_verifies(dir.path(), false);
}

#[test]
fn segments_rotate_and_release_keeps_the_chain_verifiable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig { segment_bytes: 1_000, max_bytes: 6_000, ..config(dir.path()) }).expect("open");
    let mut last = 0;
    let mut full = false;
    for n in 0..200 {
        match wal.append_blocking(decision(n)) {
            Ok(r) => last = r.seq,
            Err(WalError::Full { .. }) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full, "the bound is reached");
    let segments = segment::list_segments(dir.path()).expect("segments");
    assert!(segments.len() > 3, "{segments:?}");
    for (first, path) in &segments {
        let first_line = segment::read_lines(path).expect("lines");
        if let Some(line) = first_line.first() {
            assert_eq!(Record::parse_line(&line.bytes).expect("record").seq, *first, "segment named by its first seq");
        }
    }
    assert_verifies(dir.path(), false);

    // Shipping acknowledged everything up to `last - 5`: older segments go.
    let freed = wal.release_through_blocking(last - 5).expect("release");
    assert!(freed > 0);
    let anchor = segment::read_anchor(dir.path()).expect("anchor").expect("written");
    let remaining = segment::list_segments(dir.path()).expect("segments");
    assert_eq!(remaining[0].0, anchor.seq + 1);
    assert!(anchor.seq <= last - 5);
    wal.append_blocking(decision(1_000)).expect("room again after release");
    wal.close_blocking().expect("close");
    let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.streams[0].anchored_after, Some(anchor.seq));

    // A stream resumed from what survived the release.
    let again = Wal::open(config(dir.path())).expect("reopen after release");
    assert!(again.opened().start.seq > anchor.seq);
    again.close_blocking().expect("close");
    assert_verifies(dir.path(), true);
}

#[test]
fn one_writer_per_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Wal::open(config(dir.path())).expect("open");
    assert_eq!(Wal::open(config(dir.path())).expect_err("second writer"), WalError::Locked(dir.path().to_path_buf()));
}

#[test]
fn a_directory_of_another_server_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    Wal::open(config(dir.path())).expect("open").close_blocking().expect("close");
    let other = WalConfig::new(dir.path(), "clinic/billing");
    assert!(matches!(Wal::open(other), Err(WalError::Recover(m)) if m.contains("clinic/patient-lookup")));
}

#[test]
fn an_invalid_event_is_refused_without_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    assert!(matches!(wal.append_blocking(Event::new(Kind::Outcome)), Err(WalError::Record(_))));
    assert_eq!(wal.append_blocking(decision(0)).expect("append").seq, 2);
    wal.close_blocking().expect("close");
    assert_verifies(dir.path(), true);
}

#[test]
fn appends_after_the_writer_stopped_report_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    // Stop the writer behind the handle's back, as a shutdown in progress would.
    let (reply, rx) = oneshot::channel();
    wal.tx.blocking_send(Command::Close { reply }).expect("send");
    rx.blocking_recv().expect("reply").expect("closed");
    assert_eq!(wal.append_blocking(decision(0)), Err(WalError::Closed));
}

#[tokio::test]
async fn a_deferred_record_is_durable_within_the_window_without_another_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let window = Duration::from_millis(50);
    let wal = Wal::open(WalConfig { defer_window: window, ..config(dir.path()) }).expect("open");
    wal.defer(decision(0)).await.expect("defer");
    // Held in memory, not on disk: a reader of the segments never sees a
    // record before its fsync.
    assert_eq!(records(dir.path()).len(), 1, "only the stream start is on disk yet");
    wait_for_records(dir.path(), 2).await;
    let all = records(dir.path());
    assert_eq!(all[1].event.correlation.as_deref(), Some("c-0"));
    wal.close().await.expect("close");
    assert_verifies(dir.path(), true);
}

/// Waits (up to 5 s) until `n` records are on disk.
async fn wait_for_records(dir: &Path, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while records(dir).len() < n {
        assert!(std::time::Instant::now() < deadline, "the deferred record was never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After a commit the writer is armed: a record deferred then wakes
/// nobody, and the writer's own window must take it. Once idle it parks,
/// and the next first record must wake it.
#[tokio::test]
async fn a_record_deferred_after_a_commit_or_after_idling_is_durable_without_another_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let window = Duration::from_millis(30);
    let wal = Wal::open(WalConfig { defer_window: window, ..config(dir.path()) }).expect("open");
    wal.append(decision(0)).await.expect("append");
    wal.defer(decision(1)).await.expect("defer right after a commit");
    wait_for_records(dir.path(), 3).await;
    tokio::time::sleep(window * 4).await;
    wal.defer(decision(2)).await.expect("defer to an idle writer");
    wait_for_records(dir.path(), 4).await;
    let all = records(dir.path());
    let correlations: Vec<_> = all.iter().filter_map(|r| r.event.correlation.as_deref()).collect();
    assert_eq!(correlations, ["c-0", "c-1", "c-2"]);
    wal.close().await.expect("close");
    assert_verifies(dir.path(), true);
}

#[tokio::test]
async fn a_deferred_record_joins_the_next_append_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A window far longer than the test: only the append can write it.
    let wal = Wal::open(WalConfig { defer_window: Duration::from_secs(60), ..config(dir.path()) }).expect("open");
    wal.defer(decision(0)).await.expect("defer");
    wal.defer(decision(1)).await.expect("defer");
    let receipt = wal.append(decision(2)).await.expect("append");
    assert_eq!(receipt.seq, 4, "the deferred records were sealed first, in the order they came");
    let all = records(dir.path());
    let correlations: Vec<_> = all.iter().skip(1).map(|r| r.event.correlation.clone().unwrap_or_default()).collect();
    assert_eq!(correlations, ["c-0", "c-1", "c-2"]);
    wal.close().await.expect("close");
    assert_verifies(dir.path(), true);
}

#[tokio::test]
async fn more_deferred_records_than_a_batch_are_all_sealed_before_the_append_that_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig { defer_window: Duration::from_secs(60), max_batch: 4, ..config(dir.path()) })
        .expect("open");
    for n in 0..11 {
        wal.defer(decision(n)).await.expect("defer");
    }
    let receipt = wal.append(decision(11)).await.expect("append");
    assert_eq!(receipt.seq, 13, "eleven deferred records, then the append");
    let all = records(dir.path());
    let correlations: Vec<_> = all.iter().skip(1).map(|r| r.event.correlation.clone().unwrap_or_default()).collect();
    assert_eq!(correlations, (0..12).map(|n| format!("c-{n}")).collect::<Vec<_>>());
    wal.close().await.expect("close");
    assert_verifies(dir.path(), true);
}

#[tokio::test]
async fn a_full_deferred_queue_refuses_after_the_timeout_and_hands_the_record_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig {
        defer_window: Duration::from_secs(60),
        queue_depth: 2,
        max_batch: 8,
        append_timeout: Duration::from_millis(50),
        ..config(dir.path())
    })
    .expect("open");
    wal.defer(decision(0)).await.expect("defer");
    wal.defer(decision(1)).await.expect("defer");
    assert_eq!(wal.defer(decision(2)).await, Err(WalError::Timeout(Duration::from_millis(50))));
    let back = wal.try_defer(decision(2)).expect_err("no room");
    assert_eq!(back.correlation.as_deref(), Some("c-2"));
    // An append takes the queue with it, and makes room.
    wal.append(decision(3)).await.expect("append");
    wal.defer(decision(2)).await.expect("room again");
    wal.close().await.expect("close");
    let correlations: Vec<_> = records(dir.path()).iter().filter_map(|r| r.event.correlation.clone()).collect();
    assert_eq!(correlations, ["c-0", "c-1", "c-3", "c-2"]);
    assert_verifies(dir.path(), true);
}

#[tokio::test]
async fn closing_writes_what_is_deferred_before_the_stream_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig { defer_window: Duration::from_secs(60), ..config(dir.path()) }).expect("open");
    assert!(wal.try_defer(decision(0)).is_ok());
    let end = wal.close().await.expect("close");
    let all = records(dir.path());
    assert_eq!(all.len(), 3);
    assert_eq!(all[1].event.correlation.as_deref(), Some("c-0"));
    assert_eq!(end.seq, 3);
    assert_verifies(dir.path(), true);
}

#[tokio::test]
async fn a_record_deferred_after_close_is_refused_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal =
        Arc::new(Wal::open(WalConfig { defer_window: Duration::from_secs(60), ..config(dir.path()) }).expect("open"));
    wal.defer(decision(0)).await.expect("defer");
    let (reply, rx) = oneshot::channel();
    wal.tx.send(Command::Close { reply }).await.expect("send");
    rx.await.expect("reply").expect("closed");
    assert_eq!(wal.defer(decision(1)).await, Err(WalError::Closed));
    assert!(wal.try_defer(decision(2)).is_err(), "handed back");
    let correlations: Vec<_> = records(dir.path()).iter().filter_map(|r| r.event.correlation.clone()).collect();
    assert_eq!(correlations, ["c-0"], "what was accepted is on disk, before the stream end");
}

#[tokio::test]
async fn a_full_log_refuses_what_was_deferred_and_what_follows() {
    // Room for the stream start only.
    let measure = tempfile::tempdir().expect("tempdir");
    Wal::open(config(measure.path())).expect("open");
    let start_bytes: u64 = segment::list_segments(measure.path())
        .expect("segments")
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = start_bytes + 10;
    let wal = Wal::open(WalConfig { defer_window: Duration::from_secs(60), max_bytes: limit, ..config(dir.path()) })
        .expect("open");
    wal.defer(decision(0)).await.expect("queued");
    // The disk bound refuses both the deferred record and the append that
    // carries it; neither reaches the file.
    assert!(matches!(wal.append(decision(1)).await, Err(WalError::Full { .. })));
    assert_eq!(records(dir.path()).len(), 1);
}
