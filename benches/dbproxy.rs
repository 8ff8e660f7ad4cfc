//! The database proxy's cost, side by side in one run: `pgbench -S`
//! (select-only) straight to PostgreSQL and through the proxy, as the same
//! role, at 1 and 10 clients, with the simple and the extended protocol.
//! The proxy records every statement in its WAL, as in production. The
//! numbers are recorded in docs/db-proxy.md.
//!
//! `cargo bench --bench dbproxy` (set MCPW_BENCH_SECONDS to change the
//! 10-second runs)

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/pg/mod.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_warden::audit::record::Caller;
use mcp_warden::audit::wal::{Wal, WalConfig};
use mcp_warden::broker::issuer::Credential;
use mcp_warden::dbproxy::DbProxy;
use mcp_warden::dbproxy::grants::{CallGrant, Grants};

const ROLE_PASSWORD: &str = "bench-role-password-0123456789";

struct Target<'a> {
    name: &'a str,
    port: u16,
    user: &'a str,
    password: &'a str,
}

/// tps and average latency reported by one pgbench run.
fn pgbench(target: &Target<'_>, clients: u32, protocol: &str, seconds: u64) -> (f64, f64) {
    let out = std::process::Command::new(pg::bin_dir().join("pgbench"))
        .args(["-n", "-S", "-M", protocol, "-h", "127.0.0.1", "-d", "bench"])
        .args(["-p", &target.port.to_string(), "-U", target.user])
        .args(["-c", &clients.to_string(), "-j", &clients.min(2).to_string(), "-T", &seconds.to_string()])
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
    (field("tps"), field("latency average"))
}

fn main() {
    let seconds: u64 = std::env::var("MCPW_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let pg = pg::Postgres::start().await;
        let root = pg.superuser("postgres").await;
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
            expires: Instant::now() + Duration::from_secs(3600),
        };
        let token = grants.issue(grant, &mut ticket).expect("token");

        let direct = Target { name: "direct", port: pg.port, user: "bench_caller", password: ROLE_PASSWORD };
        let proxied = Target { name: "proxy", port: proxy_port, user: "mcp", password: &token };
        println!("pgbench -S, {seconds} s per run, scale 1 (tps; average latency)");
        println!(
            "{:<10} {:>8} {:>9} {:>14} {:>14} {:>9}",
            "protocol", "clients", "target", "tps", "latency ms", "vs direct"
        );
        for protocol in ["simple", "extended"] {
            for clients in [1, 10] {
                let mut base = None;
                for target in [&direct, &proxied] {
                    let (tps, latency) = tokio::task::block_in_place(|| pgbench(target, clients, protocol, seconds));
                    let ratio = base.map(|b: f64| format!("{:.0}%", 100.0 * tps / b)).unwrap_or_default();
                    base.get_or_insert(tps);
                    println!("{protocol:<10} {clients:>8} {:>9} {tps:>14.0} {latency:>14.3} {ratio:>9}", target.name);
                }
            }
        }
        drop(ticket);
        let records = mcp_warden::audit::segment::list_segments(audit.path()).expect("segments").len();
        println!("statement records written to {records} WAL segment(s)");
    });
}
