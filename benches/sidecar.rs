//! Sidecar benchmark: `tools/call` requests sent directly to an MCP
//! endpoint and through the `mcp-warden sidecar` process, in one run.
//! Prints added latency (p50, p99), throughput and the sidecar's peak RSS.
//!
//! `cargo bench --bench sidecar` (MCPW_BENCH_REQUESTS, MCPW_BENCH_CONCURRENCY
//! to change the load). Prints numbers; asserts nothing about speed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const JWKS: &str = include_str!("../tests/fixtures/test-jwks.json");
const RSA_KEY: &[u8] = include_bytes!("../tests/fixtures/test-rsa.pem");
const CLINIC: &str = include_str!("../examples/compliant/clinic.yaml");

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn upstream() -> String {
    let app = Router::new().route(
        "/mcp",
        post(|body: Bytes| async move {
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let reply = json!({"jsonrpc": "2.0", "id": request["id"], "result": {"content": [{"type": "text", "text": "patient found"}]}});
            ([("content-type", "application/json")], reply.to_string())
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    format!("http://{addr}/mcp")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

async fn drive(url: &str, token: Option<&str>, requests: usize, concurrency: usize) -> (Vec<Duration>, Duration) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().expect("client");
    let started = Instant::now();
    let per_task = requests / concurrency;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let client = client.clone();
        let url = url.to_string();
        let token = token.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for n in 0..per_task {
                let body = json!({"jsonrpc": "2.0", "id": t * per_task + n, "method": "tools/call",
                    "params": {"name": "lookup_patient", "arguments": {"mrn": format!("{:08}", n)}}});
                let mut request = client.post(&url).header("content-type", "application/json").body(body.to_string());
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                let t0 = Instant::now();
                let response = request.send().await.expect("send");
                assert!(response.status().is_success(), "status {}", response.status());
                response.bytes().await.expect("body");
                latencies.push(t0.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    all.sort_unstable();
    (all, started.elapsed())
}

fn main() {
    let requests = env_number("MCPW_BENCH_REQUESTS", 20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let upstream = upstream().await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), JWKS).expect("jwks");
        std::fs::write(dir.path().join("clinic.yaml"), CLINIC).expect("clinic");
        std::fs::write(dir.path().join("audit.key"), "k".repeat(64)).expect("key");
        let port = free_port();
        let metrics_port = free_port();
        let mut sidecar = Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
            .args(["sidecar", "--mcpserver"])
            .arg(dir.path().join("clinic.yaml"))
            .args(["--upstream", &upstream, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}"), "--jwks-file"])
            .arg(dir.path().join("jwks.json"))
            .arg("--audit-dir")
            .arg(dir.path().join("audit"))
            .arg("--args-key-file")
            .arg(dir.path().join("audit.key"))
            .args(["--allowed-host", "127.0.0.1"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the sidecar");
        let http = reqwest::Client::new();
        let ready = Instant::now();
        while http.get(format!("http://127.0.0.1:{metrics_port}/readyz")).send().await.map(|r| !r.status().is_success()).unwrap_or(true) {
            assert!(ready.elapsed() < Duration::from_secs(30), "the sidecar did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let claims = json!({"iss": "https://login.example.org", "aud": "https://patient-lookup.clinic.example/mcp",
            "sub": "alice", "exp": now + 3600, "groups": ["front-desk"], "scope": "mcp:tools"});
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("test-rsa".into());
        let token = encode(&header, &claims, &EncodingKey::from_rsa_pem(RSA_KEY).expect("key")).expect("sign");
        let through = format!("http://127.0.0.1:{port}/mcp");
        // Warm up both paths.
        drive(&upstream, None, 200, 4).await;
        drive(&through, Some(&token), 200, 4).await;
        println!("sidecar: tools/call of a PHI tool (JWT check, policy, durable decision + outcome records), {requests} requests per row");
        println!("{:>11}  {:>9}  {:>10}  {:>10}  {:>10}  {:>10}  {:>12}  {:>12}", "concurrency", "path", "p50", "p99", "added p50", "added p99", "requests/s", "sidecar RSS");
        for concurrency in [1usize, env_number("MCPW_BENCH_CONCURRENCY", 16)] {
            let (direct, direct_time) = drive(&upstream, None, requests, concurrency).await;
            let (proxied, proxied_time) = drive(&through, Some(&token), requests, concurrency).await;
            let rss = peak_rss_kib(sidecar.id()).map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "n/a".into());
            let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
            println!("{:>11}  {:>9}  {:>10.2?}  {:>10.2?}  {:>10}  {:>10}  {:>12.0}  {:>12}", concurrency, "direct", percentile(&direct, 0.5), percentile(&direct, 0.99), "-", "-", rate(direct.len(), direct_time), "-");
            println!(
                "{:>11}  {:>9}  {:>10.2?}  {:>10.2?}  {:>10.2?}  {:>10.2?}  {:>12.0}  {:>12}",
                concurrency,
                "sidecar",
                percentile(&proxied, 0.5),
                percentile(&proxied, 0.99),
                percentile(&proxied, 0.5).saturating_sub(percentile(&direct, 0.5)),
                percentile(&proxied, 0.99).saturating_sub(percentile(&direct, 0.99)),
                rate(proxied.len(), proxied_time),
                rss
            );
        }
        stop(&mut sidecar);
    });
}

fn stop(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}
