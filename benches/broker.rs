//! Broker issuance latency against a real PostgreSQL (a private cluster
//! started like the tests do): a fresh role per new caller, and a cached
//! hit for a caller who already holds one. Prints p50/p99; the numbers are
//! recorded in docs/broker.md.
//!
//! `cargo bench --bench broker`

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/pg/mod.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_warden::broker::api::{Callers, SidecarAuth, StaticCredential, router};
use mcp_warden::broker::client::BrokerClient;
use mcp_warden::broker::inventory::Inventory;
use mcp_warden::broker::issuer::{Broker, CredentialRequest, Settings};
use mcp_warden::broker::metrics::BrokerMetrics;
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
    CredentialRequest {
        server: SERVER.into(),
        tool: "lookup_patient".into(),
        store: "ehr".into(),
        caller_token: common::rs256(&common::claims(subject, &["front-desk"])),
        correlation: None,
    }
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
        let inventory = Inventory::from_manifests(&dir.path().join("manifests")).expect("inventory");
        let trail = Trail::new(dir.path().join("audit"), None).expect("trail");
        let settings = Settings { max_ttl: None, connection_limit: 4 };
        let broker =
            Arc::new(Broker::new(inventory, trail, settings, BrokerMetrics::register(&mut Registry::default())));
        assert!(broker.sync().await.is_empty());
        let callers = Callers {
            sidecar: SidecarAuth::Static(StaticCredential::new(CREDENTIAL).expect("credential")),
            revoker: None,
        };
        let base = common::serve(router(Arc::clone(&broker), callers)).await;
        let client = BrokerClient::new(&base, CREDENTIAL).expect("client");

        // Tokens are signed before timing: signing is the IdP's cost, not ours.
        let fresh: Vec<CredentialRequest> = (0..400).map(|i| request(&format!("caller-{i}"))).collect();
        let mut samples = Vec::new();
        for req in &fresh {
            let started = Instant::now();
            let credential = client.credential(req).await.expect("issued");
            samples.push(started.elapsed());
            assert!(!credential.reused);
        }
        report("fresh issuance (sequential)", samples);

        let hit = request("caller-0");
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let started = Instant::now();
            let credential = client.credential(&hit).await.expect("reused");
            samples.push(started.elapsed());
            assert!(credential.reused);
        }
        report("cached hit (sequential)", samples);

        let burst: Vec<CredentialRequest> = (0..400).map(|i| request(&format!("burst-{i}"))).collect();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for chunk in burst.chunks(50) {
            let client = client.clone();
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                for req in chunk {
                    let t = Instant::now();
                    client.credential(&req).await.expect("issued");
                    samples.push(t.elapsed());
                }
                samples
            }));
        }
        let mut samples = Vec::new();
        for task in tasks {
            samples.extend(task.await.expect("task"));
        }
        let took = started.elapsed();
        report("fresh issuance (8 clients)", samples);
        println!("{:<34} {:.0} roles/s", "fresh issuance throughput", 400.0 / took.as_secs_f64());
        broker.close().await;
    });
}
