//! The database proxy's cost, side by side in one run: `pgbench -S`
//! (select-only) straight to PostgreSQL, through PgBouncer in session mode
//! (what a team would otherwise put in front of a database), and through
//! the proxy, as the same role, at 1 and 10 clients, with the simple and
//! the extended protocol. Rounds alternate the order of the three; medians
//! and their spread are printed. The proxy records every statement in its
//! WAL, as in production. The numbers are recorded in docs/db-proxy.md.
//!
//! `cargo bench --bench dbproxy`. PgBouncer is taken from `PATH` or
//! /usr/sbin; without it (`apt-get install pgbouncer`) its column is
//! skipped with a message. MCPW_BENCH_SECONDS (5) per run,
//! MCPW_BENCH_ROUNDS (3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/pg/mod.rs"]
mod pg;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_warden::audit::record::Caller;
use mcp_warden::audit::wal::{Wal, WalConfig};
use mcp_warden::broker::issuer::Credential;
use mcp_warden::dbproxy::DbProxy;
use mcp_warden::dbproxy::grants::{CallGrant, Grants};
use support::{cpu_us, env_number, median, spread};

const ROLE_PASSWORD: &str = "bench-role-password-0123456789";

struct Target<'a> {
    name: &'a str,
    /// The process relaying, if any.
    middle: Option<u32>,
    port: u16,
    user: &'a str,
    password: &'a str,
}

/// What one pgbench run reported, and the CPU the middle process spent.
struct Run {
    tps: f64,
    /// CPU µs per transaction of the process between pgbench and
    /// PostgreSQL (PgBouncer, or this bench's process, which runs nothing
    /// but the proxy meanwhile); none for direct runs.
    cpu_per_tx: Option<f64>,
}

/// tps and transactions of one pgbench run.
fn pgbench(target: &Target<'_>, clients: u32, protocol: &str, seconds: u64) -> (f64, f64) {
    let out = std::process::Command::new(pg::bin_dir().join("pgbench"))
        .args(["-n", "-S", "-M", protocol, "-h", "127.0.0.1"])
        .args(["-p", &target.port.to_string(), "-U", target.user])
        .args(["-c", &clients.to_string(), "-j", &clients.min(2).to_string(), "-T", &seconds.to_string()])
        // The database by position: pgbench's `-d` is `--debug`, which
        // prints every message and made the client the bottleneck.
        .arg("bench")
        .env("PGPASSWORD", target.password)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no '{prefix}' in pgbench output: {text}"))
    };
    // "number of transactions actually processed: 36000" (a colon, no '=').
    let transactions = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench output: {text}"));
    (field("tps"), transactions)
}

/// One pgbench run, with the CPU of the target's relaying process over it.
fn measured(target: &Target<'_>, clients: u32, protocol: &str, seconds: u64) -> Run {
    let middle = target.middle;
    let before = middle.map(cpu_us);
    let (tps, transactions) = pgbench(target, clients, protocol, seconds);
    let cpu_per_tx = middle.zip(before).map(|(pid, before)| (cpu_us(pid) - before) as f64 / transactions.max(1.0));
    Run { tps, cpu_per_tx }
}

/// A PgBouncer in session mode in front of `pg_port`, run unprivileged in
/// a temporary directory; stopped when dropped.
struct Bouncer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> Option<std::path::PathBuf> {
    let on_path = std::process::Command::new("pgbouncer").arg("--version").output().is_ok_and(|o| o.status.success());
    if on_path {
        return Some("pgbouncer".into());
    }
    let sbin = std::path::PathBuf::from("/usr/sbin/pgbouncer");
    sbin.exists().then_some(sbin)
}

fn start_pgbouncer(binary: &std::path::Path, pg_port: u16) -> Bouncer {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("mcpw-pgbouncer-").tempdir().expect("tempdir");
    let port = common::free_port();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(dir.path().join("userlist.txt"), format!("\"bench_caller\" \"{ROLE_PASSWORD}\"\n"))
        .expect("userlist");
    std::fs::write(
        dir.path().join("pgbouncer.ini"),
        format!(
            "[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=bench\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = session\n\
             max_client_conn = 100\ndefault_pool_size = 20\nlogfile = {}\npidfile = {}\n",
            path("userlist.txt"),
            path("pgbouncer.log"),
            path("pgbouncer.pid"),
        ),
    )
    .expect("config");
    if unsafe { libc::geteuid() } == 0 {
        for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
            std::os::unix::fs::chown(entry.path(), Some(pg::NOBODY), Some(pg::NOBODY)).expect("chown");
        }
        std::os::unix::fs::chown(dir.path(), Some(pg::NOBODY), Some(pg::NOBODY)).expect("chown");
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let child = pg::as_unprivileged(&mut std::process::Command::new(binary))
        .arg(path("pgbouncer.ini"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    let bouncer = Bouncer { child, port, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pgbouncer did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    bouncer
}

fn main() {
    let seconds = env_number("MCPW_BENCH_SECONDS", 5u64);
    let rounds = env_number("MCPW_BENCH_ROUNDS", 3usize);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let pg = pg::Postgres::start().await;
        let root = pg.superuser("postgres").await;
        pg.without_statement_log().await;
        root.batch_execute("CREATE DATABASE bench").await.expect("database");
        let init = std::process::Command::new(pg::bin_dir().join("pgbench"))
            .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "bench"])
            .env("PGPASSWORD", pg::SUPERUSER_PASSWORD)
            .output()
            .expect("pgbench -i");
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        let bench = pg.superuser("bench").await;
        bench
            .batch_execute(&format!(
                "CREATE ROLE bench_caller LOGIN PASSWORD '{ROLE_PASSWORD}';
                 GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO bench_caller;"
            ))
            .await
            .expect("role");

        let audit = tempfile::tempdir().expect("tempdir");
        let wal = Arc::new(Wal::open(WalConfig::new(audit.path(), "bench/proxy")).expect("wal"));
        let grants = Grants::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy_port = listener.local_addr().expect("addr").port();
        tokio::spawn(
            DbProxy::new(Arc::clone(&grants), Arc::clone(&wal), Default::default())
                .serve(listener, std::future::pending()),
        );
        let mut ticket = grants.ticket();
        let grant = CallGrant {
            caller: Caller { sub: "bench".into(), iss: "https://bench".into(), groups: vec![] },
            tool: "bench".into(),
            correlation: "bench".into(),
            store: "bench".into(),
            credential: Credential {
                lease_id: "bench".into(),
                role: "bench_caller".into(),
                password: ROLE_PASSWORD.into(),
                valid_until: "2999-01-01T00:00:00Z".into(),
                host: "127.0.0.1".into(),
                port: pg.port,
                database: "bench".into(),
                ssl_mode: "disable".into(),
                ca_pem: None,
                reused: false,
            },
            allow_copy: false,
            emergency_access: None,
            expires: Instant::now() + Duration::from_secs(3600),
        };
        let token = grants.issue(grant, &mut ticket).expect("token");

        let bouncer = pgbouncer_binary().map(|binary| start_pgbouncer(&binary, pg.port));
        if bouncer.is_none() {
            println!("PgBouncer not found (apt-get install pgbouncer): its column is skipped");
        }
        let mut targets =
            vec![Target { name: "direct", middle: None, port: pg.port, user: "bench_caller", password: ROLE_PASSWORD }];
        if let Some(bouncer) = &bouncer {
            targets.push(Target {
                name: "pgbouncer",
                middle: Some(bouncer.child.id()),
                port: bouncer.port,
                user: "bench_caller",
                password: ROLE_PASSWORD,
            });
        }
        targets.push(Target {
            name: "proxy",
            middle: Some(std::process::id()),
            port: proxy_port,
            user: "mcp",
            password: &token,
        });
        println!("{}", support::machine());
        println!(
            "pgbench -S, scale 1, {seconds} s per run, {rounds} rounds alternating the order; median tps (spread); \
             CPU µs per transaction of the relaying process"
        );
        let relays: Vec<&str> = targets.iter().filter(|t| t.middle.is_some()).map(|t| t.name).collect();
        println!(
            "| protocol | clients | {} | proxy ÷ direct | proxy ÷ pgbouncer | {} |",
            targets.iter().map(|t| t.name).collect::<Vec<_>>().join(" | "),
            relays.iter().map(|r| format!("{r} CPU µs/tx")).collect::<Vec<_>>().join(" | ")
        );
        println!("|---|---|{}---|---|{}", "---|".repeat(targets.len()), "---|".repeat(relays.len()));
        for protocol in ["simple", "extended"] {
            for clients in [1, 10] {
                let mut tps: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
                let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
                for round in 0..rounds {
                    let mut order: Vec<usize> = (0..targets.len()).collect();
                    order.rotate_left(round % targets.len());
                    for i in order {
                        let target = &targets[i];
                        let run = tokio::task::block_in_place(|| measured(target, clients, protocol, seconds));
                        tps[i].push(run.tps);
                        cpu[i].extend(run.cpu_per_tx);
                    }
                }
                let cpu_cells: Vec<String> = cpu
                    .iter()
                    .filter(|runs| !runs.is_empty())
                    .map(|runs| format!("{:.0} ({})", median(runs), spread(runs, 0)))
                    .collect();
                let cells: Vec<String> =
                    tps.iter().map(|runs| format!("{:.0} ({})", median(runs), spread(runs, 0))).collect();
                let proxy = median(&tps[targets.len() - 1]);
                let vs_direct = proxy / median(&tps[0]);
                let vs_bouncer =
                    if bouncer.is_some() { format!("{:.2}×", proxy / median(&tps[1])) } else { "–".into() };
                println!(
                    "| {protocol} | {clients} | {} | {vs_direct:.2}× | {vs_bouncer} | {} |",
                    cells.join(" | "),
                    cpu_cells.join(" | ")
                );
            }
        }
        drop(ticket);
        let records = mcp_warden::audit::segment::list_segments(audit.path()).expect("segments").len();
        println!("statement records written to {records} WAL segment(s)");
    });
}
