//! Broker issuance latency against a real PostgreSQL (a private cluster
//! started like the tests do): a fresh role per new caller at 1 and 8
//! concurrent clients, a cached hit for a caller who already holds one, and
//! a shift change — 200 caller × tool pairs new to the broker arriving
//! within two seconds, served by 8 clients. Each with two brokers side by
//! side in one run: one making every role when asked ("cold"), one keeping
//! warm logins (`src/broker/warm.rs`). Also what one SCRAM verifier
//! (PBKDF2) costs, the database's share of a role (made, made warm,
//! claimed), and whether a grown catalog slows issuance. Prints p50/p99;
//! the numbers are recorded in docs/broker.md.
//!
//! `cargo bench --bench broker`

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/pg/mod.rs"]
mod pg;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_warden::broker::api::{Callers, SidecarAuth, StaticCredential, router};
use mcp_warden::broker::client::BrokerClient;
use mcp_warden::broker::inventory::Inventory;
use mcp_warden::broker::issuer::{Broker, CredentialRequest, Settings};
use mcp_warden::broker::metrics::BrokerMetrics;
use mcp_warden::broker::store;
use mcp_warden::broker::trail::Trail;
use pg::clinic::{ADMIN_PASSWORD, SERVER, manifests, prepare_database};
use prometheus_client::registry::Registry;

const CREDENTIAL: &str = "bench-sidecar-credential-0123456789abcdef";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:<34} n={:<5} p50={:>8.2?} p99={:>8.2?} mean={:>8.2?} max={:>8.2?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        mean,
        samples[samples.len() - 1]
    );
}

fn request(subject: &str) -> CredentialRequest {
    request_for(subject, "lookup_patient")
}

fn request_for(subject: &str, tool: &str) -> CredentialRequest {
    CredentialRequest {
        server: SERVER.into(),
        tool: tool.into(),
        store: "ehr".into(),
        caller_token: common::rs256(&common::claims(subject, &["clinicians"])),
        correlation: None,
    }
}

/// Serves `requests` with `clients` concurrent clients; request `i` arrives
/// at `i * spacing` after the start and is timed from its arrival, so time
/// spent queued for a free client counts. With no spacing it is a closed
/// loop: each request is timed from when a client takes it.
async fn open_loop(
    client: &BrokerClient,
    requests: Vec<CredentialRequest>,
    clients: usize,
    spacing: Duration,
) -> (Vec<Duration>, Duration) {
    let start = tokio::time::Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(requests.into_iter().enumerate().collect::<Vec<_>>().into_iter()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, queue) = (client.clone(), Arc::clone(&queue));
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let next = queue.lock().expect("queue").next();
                let Some((i, req)) = next else { break };
                // Without spacing every request is there at the start: a
                // closed loop, timed from when a client takes it.
                let arrival = if spacing.is_zero() { tokio::time::Instant::now() } else { start + spacing * i as u32 };
                tokio::time::sleep_until(arrival).await;
                let credential = client.credential(&req).await.expect("issued");
                assert!(!credential.reused, "a pair new to the broker gets a new role");
                samples.push(arrival.elapsed());
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("task"));
    }
    (samples, start.elapsed())
}

/// A login role of the database-only lines, in the group `bench_group`.
fn bench_login<'a>(role: &'a str, pair: &'a str, password: store::LoginPassword<'a>) -> store::NewLogin<'a> {
    store::NewLogin {
        group: "bench_group",
        role,
        pair,
        password,
        ttl: Duration::from_secs(600),
        connection_limit: 4,
        lease_id: "bench",
    }
}

/// One broker over the store, with its HTTP API.
struct Side {
    name: &'static str,
    broker: Arc<Broker>,
    client: BrokerClient,
}

async fn side(name: &'static str, dir: &std::path::Path, warm_logins: usize) -> Side {
    let inventory = Inventory::from_manifests(&dir.join("manifests")).expect("inventory");
    let trail =
        Trail::new(dir.join(format!("audit-{name}")), None, mcp_warden::broker::trail::BROKER_STREAM).expect("trail");
    let settings = Settings { warm_logins, ..Default::default() };
    let broker = Arc::new(Broker::new(inventory, trail, settings, BrokerMetrics::register(&mut Registry::default())));
    assert!(broker.sync().await.is_empty());
    let callers = Callers {
        sidecar: SidecarAuth::Static(StaticCredential::new(CREDENTIAL).expect("credential")),
        revoker: None,
        reidentifier: Default::default(),
    };
    let base = common::serve(router(Arc::clone(&broker), callers)).await;
    Side { name, broker, client: BrokerClient::new(&base, CREDENTIAL).expect("client") }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let pg = pg::Postgres::start().await;
        prepare_database(&pg).await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("manifests")).expect("dir");
        std::fs::write(
            dir.path().join("manifests/clinic.yaml"),
            manifests(pg.port, &["id", "mrn", "name"], true, ADMIN_PASSWORD),
        )
        .expect("manifests");
        // Two brokers over the same store, side by side in one run: one
        // makes every role when asked (cold), the other keeps warm logins
        // (the default, 32) topped up as it runs.
        let cold = side("cold", dir.path(), 0).await;
        let warm = side("warm", dir.path(), 32).await;
        let filler = tokio::spawn(mcp_warden::broker::warm::keep_warm(Arc::downgrade(&warm.broker)));
        let sides = [&cold, &warm];
        let settle = async || {
            // Each round starts from a full pool (a broker idle for a moment).
            warm.broker.warm_up().await;
        };
        println!("{}", support::machine());

        // Tokens are signed before timing: signing is the IdP's cost, not ours.
        for round in 0..2 {
            for side in sides {
                settle().await;
                let fresh: Vec<CredentialRequest> =
                    (0..100).map(|i| request(&format!("{}-{round}-seq-{i}", side.name))).collect();
                let (samples, _) = open_loop(&side.client, fresh, 1, Duration::ZERO).await;
                report(&format!("fresh issuance (sequential) {}", side.name), samples);
            }
        }

        let hit = request("cold-0-seq-0");
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let started = Instant::now();
            let credential = cold.client.credential(&hit).await.expect("reused");
            samples.push(started.elapsed());
            assert!(credential.reused);
        }
        report("cached hit (sequential)", samples);

        for side in sides {
            settle().await;
            let burst: Vec<CredentialRequest> =
                (0..400).map(|i| request(&format!("{}-burst-{i}", side.name))).collect();
            let (samples, took) = open_loop(&side.client, burst, 8, Duration::ZERO).await;
            report(&format!("fresh issuance (8 clients) {}", side.name), samples);
            println!(
                "{:<44} {:.0} roles/s",
                format!("fresh issuance throughput {}", side.name),
                400.0 / took.as_secs_f64()
            );
        }

        // A shift change: 100 clinicians, each calling both tools, arrive
        // over two seconds. Alternating rounds, each with new callers.
        for round in 0..3 {
            for side in sides {
                settle().await;
                let shift: Vec<CredentialRequest> = (0..100)
                    .flat_map(|i| {
                        ["lookup_patient", "record_note"]
                            .map(|tool| request_for(&format!("{}-{round}-shift-{i}", side.name), tool))
                    })
                    .collect();
                let (samples, took) = open_loop(&side.client, shift, 8, Duration::from_millis(10)).await;
                report(&format!("shift change (200 pairs in 2 s, 8 clients) {}", side.name), samples);
                println!("{:<44} {:.2?}", format!("shift change served in ({})", side.name), took);
            }
        }

        // The catalog has grown by a few thousand roles: the same
        // sequential issuance again shows what catalog churn costs.
        settle().await;
        let later: Vec<CredentialRequest> = (0..200).map(|i| request(&format!("later-{i}"))).collect();
        let (samples, _) = open_loop(&cold.client, later, 1, Duration::ZERO).await;
        report("fresh issuance, ~3,000 roles later, cold", samples);
        let verifiers = Instant::now();
        for i in 0..50 {
            std::hint::black_box(postgres_protocol::password::scram_sha_256(format!("password-{i}").as_bytes()));
        }
        println!("{:<44} {:.2?}", "one SCRAM verifier in Rust (PBKDF2, 4096)", verifiers.elapsed() / 50);
        println!("{:<44} {}", "admin connections per store", mcp_warden::broker::issuer::ADMIN_CONNECTIONS);
        // The database's own share: the role-creating transaction alone, on
        // 1 and on 4 connections at once; a warm login's claim; and the
        // PASSWORD clause by itself (PostgreSQL tries every verifier it is
        // given against the empty password: its own PBKDF2).
        let setup = pg.superuser("ehr").await;
        setup.batch_execute("CREATE ROLE bench_group NOLOGIN").await.expect("group");
        let verifier = postgres_protocol::password::scram_sha_256(b"bench-password");
        for connections in [1usize, 4] {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..connections {
                let mut admin = pg.superuser("ehr").await;
                let verifier = verifier.clone();
                tasks.push(tokio::spawn(async move {
                    let mut samples = Vec::new();
                    for i in 0..100 {
                        let role = format!("bench_login_{connections}_{c}_{i}");
                        let pair = format!("bench_pair_{c}_{i}");
                        let login = bench_login(&role, &pair, store::LoginPassword::Verifier(&verifier));
                        let t = Instant::now();
                        store::create_login(&mut admin, &login).await.expect("create");
                        samples.push(t.elapsed());
                    }
                    samples
                }));
            }
            let mut samples = Vec::new();
            for task in tasks {
                samples.extend(task.await.expect("task"));
            }
            let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
            report(&format!("CREATE ROLE transaction, {connections} conn"), samples);
            println!("{:<44} {rate:.0} roles/s", "");
        }
        let mut admin = pg.superuser("ehr").await;
        let mut claims = Vec::new();
        let mut passwords = Vec::new();
        for i in 0..100 {
            let warm_name = format!("mcpw_w_{i:024x}");
            let t = Instant::now();
            store::create_warm(&mut admin, &warm_name, &verifier).await.expect("warm");
            passwords.push(t.elapsed());
            let role = format!("bench_claimed_{i}");
            let pair = format!("bench_claim_{i}");
            let login = bench_login(&role, &pair, store::LoginPassword::Warm(&warm_name));
            let t = Instant::now();
            store::create_login(&mut admin, &login).await.expect("claim");
            claims.push(t.elapsed());
        }
        report("warm login made (CREATE … PASSWORD)", passwords);
        report("warm login claimed (rename, LOGIN, GRANT)", claims);
        filler.abort();
        for side in sides {
            side.broker.close().await;
        }
    });
}
