//! Operator benchmark: the release binary against the stateful fake API
//! server (`tests/fake_apiserver`) holding 1,000 MCPServers, every request
//! delayed 1–5 ms as a real server's round trip would be.
//!
//! Prints: time until every server has a status for its generation, reads
//! and writes per server to converge (Events and Lease renewals apart), the
//! requests of a steady state with a resync every 10 s, and the operator's
//! peak RSS (VmHWM). Asserts nothing.
//!
//! `cargo bench --bench operator` (MCPW_BENCH_SERVERS, default 1000;
//! MCPW_BENCH_STEADY_SECONDS, default 30; MCPW_BENCH_OPERATOR_LOG=FILE and
//! MCPW_BENCH_RUST_LOG to keep the operator's log; MCPW_BENCH_WRAPPER to
//! run it under a profiler).

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApi, Request};
use serde_json::{Value, json};
use support::{env_number, status_kib};

const NS: &str = "clinic";
const CLINIC: &str = include_str!("../examples/compliant/clinic.yaml");

fn world(n: u64) -> Vec<Value> {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(CLINIC)
        .map(|d| serde::Deserialize::deserialize(d).expect("example YAML"))
        .collect();
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "idp-keys", "namespace": NS},
               "data": {"jwks.json": include_str!("../tests/fixtures/test-jwks.json")}}),
        docs[0].clone(),
    ];
    for i in 0..n {
        let mut server = docs[1].clone();
        server["metadata"]["name"] = json!(format!("s-{i:04}"));
        let oidc = server["spec"]["authentication"]["oidc"].as_object_mut().expect("oidc");
        oidc.remove("jwksUri");
        oidc.insert("jwksConfigMapRef".into(), json!({"name": "idp-keys"}));
        out.push(server);
    }
    out
}

fn reconciled(fake: &FakeApi) -> usize {
    let kind = fake_apiserver::kinds::by_plural("mcpwarden.io", "mcpservers").expect("kind");
    fake.shared
        .core
        .scan(&kind, NS, &Default::default(), |s| {
            let observed = s.pointer("/status/observedGeneration");
            (observed.is_some() && observed == s.pointer("/metadata/generation")).then_some(())
        })
        .len()
}

struct Counts {
    reads: usize,
    watches: usize,
    writes: usize,
    events: usize,
    lease: usize,
}

fn count(requests: &[Request]) -> Counts {
    let ours: Vec<&Request> = requests.iter().filter(|r| r.identity == "operator").collect();
    Counts {
        reads: ours.iter().filter(|r| !r.is_write() && r.verb != "watch" && r.plural != "leases").count(),
        watches: ours.iter().filter(|r| r.verb == "watch").count(),
        writes: ours.iter().filter(|r| r.is_write() && !r.is_event() && r.plural != "leases").count(),
        events: ours.iter().filter(|r| r.is_event()).count(),
        lease: ours.iter().filter(|r| r.plural == "leases").count(),
    }
}

#[tokio::main]
async fn main() {
    let n = env_number("MCPW_BENCH_SERVERS", 1000u64);
    let steady = Duration::from_secs(env_number("MCPW_BENCH_STEADY_SECONDS", 30u64));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    for object in world(n) {
        fake.apply("kubectl", &object).expect("apply");
    }
    fake.set_latency(Duration::from_millis(1), Duration::from_millis(5));
    let addr = fake.listen("operator").await;
    let kubeconfig = FakeApi::kubeconfig(dir.path(), addr, "operator");
    let health = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    // MCPW_BENCH_WRAPPER runs the operator under a profiler, e.g.
    // "valgrind --tool=massif --massif-out-file=/tmp/massif.out".
    let wrapper: Vec<String> =
        std::env::var("MCPW_BENCH_WRAPPER").unwrap_or_default().split_whitespace().map(str::to_string).collect();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_mcp-warden"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_mcp-warden")),
    };
    let mut child = command
        .args(["operator", "--health-listen", &health.to_string(), "--watch-namespace", NS, "--lease-namespace", NS])
        .args(["--resync-seconds", "10"])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "bench")
        .env("RUST_LOG", std::env::var("MCPW_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(match std::env::var("MCPW_BENCH_OPERATOR_LOG") {
            Ok(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
            Err(_) => Stdio::null(),
        })
        .spawn()
        .expect("start the operator");
    let pid = child.id();
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let done = reconciled(&fake);
        if done as u64 == n {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!("  {:>5.1}s: {done}/{n} reconciled", started.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(900) {
            eprintln!("gave up after 15 min: {done}/{n}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge_time = started.elapsed();
    // Let the stragglers (a second status after the Deployment controller's
    // answer, pods) settle before counting what convergence cost.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let converged = count(&fake.requests());
    let mark = fake.requests().len();
    tokio::time::sleep(steady).await;
    let steady_requests: Vec<Request> = fake.requests().into_iter().skip(mark).collect();
    let quiet = count(&steady_requests);
    let rss = status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss_now = status_kib(pid, "VmRSS:").unwrap_or(0);
    // SIGTERM: the operator stops as it would in a cluster (and a profiler
    // wrapping it writes its report).
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let stop = Instant::now();
    while child.try_wait().ok().flatten().is_none() && stop.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();

    let per = |x: usize| x as f64 / n as f64;
    println!("operator benchmark: {n} MCPServers, fake API server with 1-5 ms per request, resync 10 s");
    println!("  {}", support::machine());
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!("| time until every server reconciled | {:.1} s | <= 60 s |", converge_time.as_secs_f64());
    println!(
        "| writes to converge, per server | {:.2} | <= 6 owned + 2 (finalizer, status) = 8 |",
        per(converged.writes)
    );
    println!("| reads (GET/LIST) to converge, per server | {:.3} | - |", per(converged.reads));
    println!("| watches opened | {} | one per kind |", converged.watches);
    println!("| events, per server | {:.2} | counted apart |", per(converged.events));
    println!("| writes in {} s of steady state | {} | 0 |", steady.as_secs(), quiet.writes);
    println!("| reads in {} s of steady state | {} | small, fixed |", steady.as_secs(), quiet.reads);
    println!("| lease requests in {} s of steady state | {} | renewals |", steady.as_secs(), quiet.lease);
    println!("| peak RSS (VmHWM) | {:.1} MiB | <= 64 MiB |", rss as f64 / 1024.0);
    println!("| RSS at the end of the steady state (VmRSS) | {:.1} MiB | - |", rss_now as f64 / 1024.0);
}
