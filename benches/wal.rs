//! WAL benchmark: durable records per second and append latency (p50, p99)
//! for 1, 8 and 64 concurrent writers, each append waiting for its fsync.
//!
//! `cargo bench --bench wal` (set `MCPW_BENCH_DIR` to measure a particular
//! file system; the default is the system temp directory). Prints numbers;
//! asserts nothing about speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_warden::audit::record::{Caller, Decision, Event, Kind};
use mcp_warden::audit::{Wal, WalConfig};

fn event(n: u64) -> Event {
    Event {
        correlation: Some(format!("bench-{n}")),
        caller: Some(Caller {
            sub: "alice@example.org".into(),
            iss: "https://login.example.org".into(),
            groups: vec!["front-desk".into()],
        }),
        method: Some("tools/call".into()),
        tool: Some("lookup_patient".into()),
        phi: Some(true),
        decision: Some(Decision::Allow),
        args_hmac: Some("5f".repeat(32)),
        ..Event::new(Kind::Decision)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let base = std::env::var_os("MCPW_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let duration =
        Duration::from_millis(std::env::var("MCPW_BENCH_MILLIS").ok().and_then(|m| m.parse().ok()).unwrap_or(3_000));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "audit WAL: durable appends (one fdatasync per group commit), {:?} per row, dir {}",
        duration,
        base.display()
    );
    println!("{:>8}  {:>12}  {:>10}  {:>10}  {:>10}  {:>12}", "writers", "records/s", "p50", "p99", "max", "records");
    for writers in [1usize, 8, 64] {
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path(), "bench/server")).expect("open"));
        let started = Instant::now();
        let latencies = runtime.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..writers {
                let wal = Arc::clone(&wal);
                tasks.push(tokio::spawn(async move {
                    let mut own = Vec::new();
                    let mut n = 0u64;
                    while started.elapsed() < duration {
                        let t = Instant::now();
                        wal.append(event(w as u64 * 1_000_000_000 + n)).await.expect("append");
                        own.push(t.elapsed());
                        n += 1;
                    }
                    own
                }));
            }
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.expect("task"));
            }
            all
        });
        let elapsed = started.elapsed();
        let mut sorted = latencies;
        sorted.sort_unstable();
        println!(
            "{:>8}  {:>12.0}  {:>10.2?}  {:>10.2?}  {:>10.2?}  {:>12}",
            writers,
            sorted.len() as f64 / elapsed.as_secs_f64(),
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            sorted.last().copied().unwrap_or_default(),
            sorted.len()
        );
        if let Ok(wal) = Arc::try_unwrap(wal) {
            let _ = wal.close_blocking();
        }
    }
}
