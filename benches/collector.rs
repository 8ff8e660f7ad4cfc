//! Shipping throughput and delay: records appended to a real WAL (fsync'd),
//! shipped by the real shipper to a real collector (fsync'd) on loopback.
//! Prints durable records/s at the collector and the append-to-collector
//! delay (p50/p99); the catch-up after a collector outage (a backlog of
//! `MCPW_BENCH_BACKLOG` records, 200,000, already in the WAL, shipped in full
//! batches: what the collector's intake does per record); then the cost of a
//! collector restart: a storage of
//! `MCPW_BENCH_STORED` records (1,000,000) opened by a fresh process, its
//! time and peak and resident memory. The numbers are recorded in
//! docs/audit-format.md.
//!
//! `cargo bench --bench collector`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcp_warden::audit::collector::{self, store::Storage};
use mcp_warden::audit::record::{Event, Kind, Lease, LeaseAction};
use mcp_warden::audit::ship::{Shipped, Shipper};
use mcp_warden::audit::{Wal, WalConfig};
use mcp_warden::bearer::ClientCredential;
use mcp_warden::bearer::StaticCredential;

const CREDENTIAL: &str = "bench-collector-credential-0123456789";

fn lease(n: u64) -> Event {
    let mut e = Event::new(Kind::Lease);
    e.lease = Some(Lease { id: format!("lease-{n:012}"), action: LeaseAction::Issued, role: None, valid_until: None });
    e
}

/// Child mode: open the storage at this path, print what it cost.
const OPEN_ONLY: &str = "MCPW_BENCH_OPEN_STORAGE";

/// A field of this process's `/proc` status, in KiB.
fn own_kib(field: &str) -> u64 {
    support::status_kib(std::process::id(), field).unwrap_or(0)
}

/// A storage of `n` records of one stream, written in batches as a
/// sender's would be, then opened by a fresh process (this bench again).
fn reopen(n: u64) {
    let data = tempfile::tempdir().expect("tempdir");
    {
        let mut storage = Storage::open(data.path()).expect("storage");
        let mut chain =
            mcp_warden::audit::record::Chain::new("clinic/lookup/pod/s1".into(), "clinic/lookup".into(), None);
        let mut seq = 0;
        while seq < n {
            let lines: Vec<Vec<u8>> = (seq..(seq + 10_000).min(n))
                .map(|i| {
                    let event = if i == 0 { Event::new(Kind::StreamStart) } else { lease(i) };
                    chain.seal(event, chrono::Utc::now()).expect("seal").record.to_line()
                })
                .collect();
            seq += lines.len() as u64;
            let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
            storage.store("bench", None, &refs).expect("store");
        }
    }
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env(OPEN_ONLY, data.path())
        .output()
        .expect("the opening process");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn main() {
    if let Some(dir) = std::env::var_os(OPEN_ONLY) {
        let before = own_kib("VmRSS:");
        let started = Instant::now();
        let storage = Storage::open(std::path::Path::new(&dir)).expect("open");
        let took = started.elapsed();
        let stored: u64 = storage.heads().iter().map(|h| h.seq).sum();
        println!(
            "collector restart over {stored} stored records: open {took:.2?}, VmHWM {:.1} MiB, VmRSS {:.1} MiB (before opening {:.1})",
            own_kib("VmHWM:") as f64 / 1024.0,
            own_kib("VmRSS:") as f64 / 1024.0,
            before as f64 / 1024.0
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let wal_dir = tempfile::tempdir().expect("tempdir");
        let data = tempfile::tempdir().expect("tempdir");
        let base = serve_collector(data.path()).await;
        let wal = Arc::new(Wal::open(WalConfig::new(wal_dir.path(), "clinic/patient-lookup")).expect("wal"));

        let total: u64 = 20_000;
        let appended = Arc::new(Mutex::new(vec![None::<Instant>; total as usize + 2]));
        let acks = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
        let ship = {
            let (wal, acks) = (Arc::clone(&wal), Arc::clone(&acks));
            let mut shipper = Shipper::new(wal_dir.path().into(), &base, ClientCredential::Fixed(CREDENTIAL.into()))
                .expect("shipper");
            tokio::spawn(async move {
                loop {
                    match shipper.ship_once().await.expect("ship") {
                        Shipped::Through(through) => {
                            acks.lock().expect("acks").push((through, Instant::now()));
                            wal.release_through(through).await.expect("release");
                            if through > total {
                                return;
                            }
                        }
                        Shipped::Idle => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        };
        let started = Instant::now();
        let mut writers = Vec::new();
        for w in 0..16u64 {
            let (wal, appended) = (Arc::clone(&wal), Arc::clone(&appended));
            writers.push(tokio::spawn(async move {
                for n in (w..total).step_by(16) {
                    let receipt = wal.append(lease(n)).await.expect("append");
                    appended.lock().expect("appended")[receipt.seq as usize] = Some(Instant::now());
                }
            }));
        }
        for writer in writers {
            writer.await.expect("writer");
        }
        ship.await.expect("shipper task");
        let took = started.elapsed();
        let acks = acks.lock().expect("acks").clone();
        let appended = appended.lock().expect("appended").clone();
        let mut delays: Vec<Duration> = Vec::new();
        for (seq, at) in appended.iter().enumerate().skip(2) {
            let Some(at) = at else { continue };
            if let Some((_, acked)) = acks.iter().find(|(through, _)| *through >= seq as u64) {
                delays.push(acked.saturating_duration_since(*at));
            }
        }
        delays.sort();
        let pct = |p: f64| delays[((delays.len() - 1) as f64 * p) as usize];
        println!(
            "shipped {total} records in {took:.2?}: {:.0} durable records/s at the collector, {} batches",
            total as f64 / took.as_secs_f64(),
            acks.len()
        );
        println!(
            "append-to-collector delay: p50={:.2?} p99={:.2?} max={:.2?}",
            pct(0.5),
            pct(0.99),
            delays[delays.len() - 1]
        );
    });
    runtime.block_on(catch_up(env_number("MCPW_BENCH_BACKLOG", 200_000)));
    reopen(env_number("MCPW_BENCH_STORED", 1_000_000));
}

/// A collector over a fresh storage in `data`, served on loopback; its URL.
async fn serve_collector(data: &std::path::Path) -> String {
    std::fs::create_dir_all(data.join("incidents")).expect("dir");
    let storage = Arc::new(Mutex::new(Storage::open(data).expect("storage")));
    let incidents =
        Arc::new(Wal::open(WalConfig::new(data.join("incidents"), collector::COLLECTOR_SERVER)).expect("wal"));
    let app = collector::router(
        storage,
        incidents,
        collector::Senders::Static(StaticCredential::new(CREDENTIAL).expect("credential")),
        collector::Readers::None,
    )
    .expect("the collector's router");
    common::serve(app).await
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A backlog of `n` records waiting in a WAL (the collector was away),
/// shipped to a fresh collector until all are durable there.
async fn catch_up(n: u64) {
    let wal_dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(WalConfig::new(wal_dir.path(), "clinic/patient-lookup")).expect("wal"));
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let wal = Arc::clone(&wal);
        writers.push(tokio::spawn(async move {
            for i in (w..n).step_by(16) {
                wal.append(lease(i)).await.expect("append");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let base = serve_collector(data.path()).await;
    let mut shipper =
        Shipper::new(wal_dir.path().into(), &base, ClientCredential::Fixed(CREDENTIAL.into())).expect("shipper");
    let started = Instant::now();
    let mut batches = 0;
    // The stream-start record comes first: n leases are seqs 2..=n+1.
    while let Shipped::Through(through) = shipper.ship_once().await.expect("ship") {
        batches += 1;
        if through > n {
            break;
        }
    }
    let took = started.elapsed();
    println!(
        "catch-up: a backlog of {n} records shipped in {took:.2?}: {:.0} durable records/s at the collector, {batches} batches",
        n as f64 / took.as_secs_f64()
    );
}
