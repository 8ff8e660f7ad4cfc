//! The WAL against real faults, in real processes: a writer SIGKILLed again
//! and again while it appends; a file-size limit standing in for a full
//! disk; a directory the writer may no longer write.
//!
//! The writer is this test binary re-executed (`wal_child`, ignored unless
//! run on purpose) so it is a separate process that can be killed, limited
//! or run as another user. It speaks a line protocol on stdout:
//! `OPEN <stream> <seq> <torn>` / `OPENERR <msg>`, `ACK <seq> <hash>`,
//! `ERR <kind> <msg>`, `CLOSED <seq>`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_warden::audit::record::{Caller, Decision, Event, Kind, Record};
use mcp_warden::audit::segment;
use mcp_warden::audit::verify::{VerifyOptions, verify_dir};
use mcp_warden::audit::{Wal, WalConfig, WalError};

const SERVER: &str = "clinic/patient-lookup";
/// Upper bound on any one child, so a hang fails instead of blocking CI.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

fn event(n: u64) -> Event {
    Event {
        correlation: Some(format!("c-{n}")),
        caller: Some(Caller { sub: "alice".into(), iss: "https://login.example.org".into(), groups: vec![] }),
        method: Some("tools/call".into()),
        tool: Some("lookup_patient".into()),
        decision: Some(Decision::Allow),
        ..Event::new(Kind::Decision)
    }
}

fn child_config() -> Option<WalConfig> {
    let dir = std::env::var_os("MCPW_WAL_CHILD_DIR")?;
    let mut config = WalConfig::new(PathBuf::from(dir), SERVER);
    config.pod = Some("p-1".into());
    if let Some(bytes) = std::env::var("MCPW_WAL_SEGMENT_BYTES").ok().and_then(|b| b.parse().ok()) {
        config.segment_bytes = bytes;
    }
    Some(config)
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn report(result: Result<mcp_warden::audit::Receipt, WalError>) -> bool {
    match result {
        Ok(r) => {
            say(format!("ACK {} {}", r.seq, r.hash));
            true
        }
        Err(e) => {
            let kind = match &e {
                WalError::Write { kind, .. } => format!("{kind:?}"),
                other => format!("{:?}", std::mem::discriminant(other)),
            };
            say(format!("ERR {kind} {e}"));
            false
        }
    }
}

/// The writer process. Does nothing unless re-executed by a test below.
#[test]
#[ignore = "run as a child process by the other tests"]
fn wal_child() {
    let Some(config) = child_config() else { return };
    let wal = match Wal::open(config) {
        Ok(wal) => Arc::new(wal),
        Err(e) => {
            say(format!("OPENERR {e}"));
            return;
        }
    };
    let opened = wal.opened();
    let torn = opened.restart.as_ref().map_or(0, |r| r.torn_bytes);
    say(format!("OPEN {} {} {torn}", opened.stream, opened.start.seq));
    if std::env::var("MCPW_WAL_CHILD_MODE").as_deref() == Ok("load") {
        // Append from several threads until killed.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let wal = Arc::clone(&wal);
                std::thread::spawn(move || {
                    for n in 0.. {
                        if !report(wal.append_blocking(event(t * 1_000_000 + n))) {
                            return;
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        return;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        if let Some(n) = line.strip_prefix("append ").and_then(|n| n.parse::<u64>().ok()) {
            for i in 0..n {
                report(wal.append_blocking(event(i)));
            }
            say("DONE".into());
        } else if line == "close" {
            match Arc::try_unwrap(wal) {
                Ok(wal) => match wal.close_blocking() {
                    Ok(r) => say(format!("CLOSED {}", r.seq)),
                    Err(e) => say(format!("ERR close {e}")),
                },
                Err(_) => say("ERR close shared".into()),
            }
            return;
        }
    }
}

/// A running writer process and what it said.
struct Writer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    started: Instant,
}

struct Spawn<'a> {
    dir: &'a Path,
    mode: &'a str,
    segment_bytes: Option<u64>,
    file_size_limit: Option<u64>,
    as_nobody: bool,
}

impl Spawn<'_> {
    fn start(self) -> Writer {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", "wal_child", "--ignored", "--nocapture", "--test-threads=1", "-q"])
            .env("MCPW_WAL_CHILD_DIR", self.dir)
            .env("MCPW_WAL_CHILD_MODE", self.mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(bytes) = self.segment_bytes {
            cmd.env("MCPW_WAL_SEGMENT_BYTES", bytes.to_string());
        }
        if self.as_nobody && is_root() {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        if let Some(limit) = self.file_size_limit {
            // SAFETY: only async-signal-safe libc calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Past the limit, write() must fail with EFBIG rather than
                    // the process dying of SIGXFSZ.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn writer");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Writer { child, stdin, stdout, started: Instant::now() }
    }
}

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

impl Writer {
    /// The next complete protocol line, or None at end of output.
    fn next(&mut self) -> Option<String> {
        loop {
            assert!(self.started.elapsed() < CHILD_DEADLINE, "the writer process hung");
            let mut buf = Vec::new();
            let n = self.stdout.read_until(b'\n', &mut buf).expect("read child");
            if n == 0 || buf.last() != Some(&b'\n') {
                // End of output; a line cut by SIGKILL is not a statement.
                return None;
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            // ("OPEN" also matches "OPENERR".)
            if ["OPEN", "ACK", "ERR", "DONE", "CLOSED"].iter().any(|p| line.starts_with(p)) {
                return Some(line);
            }
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("send command");
        stdin.flush().expect("flush");
    }

    /// Lines up to and including `DONE`.
    fn until_done(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(line) = self.next() {
            if line == "DONE" {
                return lines;
            }
            lines.push(line);
        }
        panic!("writer ended before DONE: {lines:?}");
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        while self.next().is_some() {}
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "writer exited with {status}");
    }
}

fn acks(lines: &[String]) -> Vec<(u64, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("ACK ")?.split(' ');
            Some((parts.next()?.parse().ok()?, parts.next()?.to_string()))
        })
        .collect()
}

fn records_on_disk(dir: &Path) -> BTreeMap<u64, Record> {
    segment::list_segments(dir)
        .expect("segments")
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).expect("lines"))
        .filter(|l| l.complete)
        .map(|l| Record::parse_line(&l.bytes).expect("every complete line is a valid record"))
        .map(|r| (r.seq, r))
        .collect()
}

#[track_caller]
fn assert_acked_present(dir: &Path, acked: &[(u64, String)]) {
    let on_disk = records_on_disk(dir);
    for (seq, hash) in acked {
        let record = on_disk.get(seq).unwrap_or_else(|| panic!("acknowledged record {seq} is missing"));
        assert_eq!(&record.hash, hash, "acknowledged record {seq} changed");
    }
}

/// Recovers the directory in this process, seals it and verifies it.
fn recover_and_verify(dir: &Path) -> mcp_warden::audit::wal::Opened {
    let wal = Wal::open(WalConfig { pod: Some("p-1".into()), ..WalConfig::new(dir, SERVER) }).expect("recover");
    let opened = wal.opened().clone();
    wal.close_blocking().expect("close");
    let report = verify_dir(dir, VerifyOptions { require_sealed: true, ..Default::default() });
    assert!(report.passed(), "{}", report.to_table());
    opened
}

#[test]
fn sigkill_in_a_loop_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked = Vec::new();
    let rounds = 10;
    let mut torn_rounds = 0;
    for round in 0..rounds {
        let mut writer = Spawn {
            dir: dir.path(),
            mode: "load",
            segment_bytes: Some(8_192),
            file_size_limit: None,
            as_nobody: false,
        }
        .start();
        let open = writer.next().expect("OPEN line");
        assert!(open.starts_with("OPEN "), "{open}");
        if open.split(' ').nth(3).is_some_and(|t| t != "0") {
            torn_rounds += 1;
        }
        let mut lines = Vec::new();
        // Kill at a different point each round, mid-stream.
        let target = 30 + round * 37;
        while acks(&lines).len() < target {
            match writer.next() {
                Some(line) => lines.push(line),
                None => break,
            }
        }
        writer.child.kill().expect("SIGKILL");
        writer.child.wait().expect("reap");
        while let Some(line) = writer.next() {
            lines.push(line);
        }
        assert!(!lines.iter().any(|l| l.starts_with("ERR")), "{lines:?}");
        acked.extend(acks(&lines));
        assert_acked_present(dir.path(), &acked);
    }
    let opened = recover_and_verify(dir.path());
    assert_acked_present(dir.path(), &acked);
    let report = verify_dir(dir.path(), VerifyOptions { require_sealed: true, ..Default::default() });
    assert_eq!(report.streams.len(), 1, "one stream across every restart");
    assert_eq!(report.streams[0].restarts, rounds as u64, "every restart is recorded");
    assert!(opened.restart.is_some());
    assert!(acked.len() >= rounds * 30);
    // How often a kill landed mid-write varies; it is reported, not required.
    eprintln!("{} acknowledged records; {torn_rounds} restart(s) found a torn tail", acked.len());
}

#[test]
fn a_full_disk_fails_appends_promptly_and_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 16 * 1024;
    let mut writer = Spawn {
        dir: dir.path(),
        mode: "commands",
        segment_bytes: None,
        file_size_limit: Some(limit),
        as_nobody: false,
    }
    .start();
    assert!(writer.next().expect("OPEN").starts_with("OPEN "));
    writer.send("append 200");
    let lines = writer.until_done();
    let acked = acks(&lines);
    let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("ERR")).collect();
    assert!(!acked.is_empty(), "{lines:?}");
    assert!(!errors.is_empty(), "the limit was never reached: {lines:?}");
    assert!(errors[0].starts_with("ERR FileTooLarge"), "{}", errors[0]);
    // Once full, it stays refused, and every refusal is an answer, not a hang.
    assert_eq!(acked.len() + errors.len(), 200);
    let first_err = lines.iter().position(|l| l.starts_with("ERR")).expect("error");
    assert!(lines[first_err..].iter().all(|l| l.starts_with("ERR")), "no record after the first failure");
    writer.send("append 1");
    assert!(writer.until_done()[0].starts_with("ERR"));
    writer.finish();

    let size: u64 = segment::list_segments(dir.path())
        .expect("segments")
        .iter()
        .map(|(_, p)| std::fs::metadata(p).expect("meta").len())
        .sum();
    assert!(size <= limit, "{size}");
    let opened = recover_and_verify(dir.path());
    assert_eq!(opened.restart.expect("restart").torn_bytes, 0, "a failed append left bytes behind");
    assert_acked_present(dir.path(), &acked);
}

#[test]
fn an_unwritable_directory_fails_promptly_and_leaves_nothing_half_written() {
    let base = tempfile::tempdir().expect("tempdir");
    set_mode(base.path(), 0o755);
    // A directory the writer cannot write at all: open fails.
    let locked_out = base.path().join("locked-out");
    std::fs::create_dir(&locked_out).expect("mkdir");
    if !is_root() {
        set_mode(&locked_out, 0o555);
    }
    let mut writer =
        Spawn { dir: &locked_out, mode: "commands", segment_bytes: None, file_size_limit: None, as_nobody: true }
            .start();
    let line = writer.next().expect("an answer, not a hang");
    assert!(line.starts_with("OPENERR") && line.contains("ermission denied"), "{line}");
    writer.finish();
    assert!(std::fs::read_dir(&locked_out).expect("list").next().is_none(), "nothing written");

    // A directory that becomes unwritable while the writer runs: the next
    // segment cannot be created.
    let wal_dir = base.path().join("wal");
    std::fs::create_dir(&wal_dir).expect("mkdir");
    if is_root() {
        chown_nobody(&wal_dir);
    }
    let mut writer =
        Spawn { dir: &wal_dir, mode: "commands", segment_bytes: Some(600), file_size_limit: None, as_nobody: true }
            .start();
    assert!(writer.next().expect("OPEN").starts_with("OPEN "));
    writer.send("append 1");
    let mut acked = acks(&writer.until_done());
    assert_eq!(acked.len(), 1);
    set_mode(&wal_dir, 0o555);
    writer.send("append 20");
    let lines = writer.until_done();
    acked.extend(acks(&lines));
    let first_err = lines.iter().position(|l| l.starts_with("ERR")).unwrap_or_else(|| panic!("no failure: {lines:?}"));
    assert!(lines[first_err].starts_with("ERR PermissionDenied"), "{}", lines[first_err]);
    assert!(lines[first_err..].iter().all(|l| l.starts_with("ERR")), "{lines:?}");
    writer.finish();
    set_mode(&wal_dir, 0o755);
    let opened = recover_and_verify(&wal_dir);
    assert_eq!(opened.restart.expect("restart").torn_bytes, 0, "a failed append left bytes behind");
    assert_acked_present(&wal_dir, &acked);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
}
