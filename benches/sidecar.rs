//! Sidecar benchmark: what MCP clients see, direct and through the sidecar,
//! side by side in one run.
//!
//! ```text
//!   oha (a real HTTP load generator) ─┬─────────────────────────────▶ rmcp server (tool `add`, SSE answers)
//!                                     └─▶ mcp-warden sidecar ────────▶ the same server
//! ```
//!
//! Requests are what the MCP specification asks of a client: `POST` with
//! `Accept: application/json, text/event-stream`, `MCP-Protocol-Version`,
//! and per generation either a session from `initialize` (2025-11-25) or
//! the stateless form with `Mcp-Method` / `Mcp-Name` (2026-07-28). Rounds
//! alternate direct and sidecar; medians over rounds and their spread are
//! printed, with the sidecar's CPU per call (utime + stime over the calls)
//! and peak RSS (VmHWM). Prints numbers; asserts nothing.
//!
//! `cargo bench --bench sidecar`. oha is taken from `MCPW_OHA`, `PATH`, or
//! installed once into `target/bench-tools` (`cargo install oha --locked`).
//! MCPW_BENCH_ROUNDS (5), MCPW_BENCH_REQUESTS_C1 (2000),
//! MCPW_BENCH_REQUESTS_C32 (20000).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::free_port;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use serde_json::{Value, json};
use support::{cpu_us, env_number, median, spread, status_kib};

const JWKS: &str = include_str!("../tests/fixtures/test-jwks.json");
const RSA_KEY: &[u8] = include_bytes!("../tests/fixtures/test-rsa.pem");
const CLINIC: &str = include_str!("../examples/compliant/clinic.yaml");

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct Sum {
    a: i64,
    b: i64,
}

#[derive(Clone)]
struct Arithmetic;

#[tool_router]
impl Arithmetic {
    #[tool(description = "Adds two integers")]
    fn add(&self, Parameters(Sum { a, b }): Parameters<Sum>) -> String {
        (a + b).to_string()
    }
}

#[tool_handler]
impl ServerHandler for Arithmetic {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// oha: `MCPW_OHA`, on PATH, or installed into target/bench-tools.
fn oha() -> PathBuf {
    if let Ok(path) = std::env::var("MCPW_OHA") {
        return PathBuf::from(path);
    }
    if Command::new("oha").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return PathBuf::from("oha");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")));
    let root = Path::new(&target).join("bench-tools");
    let bin = root.join("bin/oha");
    if !bin.exists() {
        eprintln!("installing oha into {} (cargo install oha --locked; once)", root.display());
        let status = Command::new(env!("CARGO"))
            .args(["install", "oha", "--locked", "--root"])
            .arg(&root)
            .status()
            .expect("cargo install oha");
        assert!(status.success(), "oha could not be installed; set MCPW_OHA to an oha binary");
    }
    bin
}

async fn upstream() -> String {
    let service = StreamableHttpService::new(
        || Ok(Arithmetic),
        std::sync::Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // The server's listener sets TCP_NODELAY, as a tuned MCP server would.
        axum::serve(mcp_warden::net::no_delay(listener), axum::Router::new().nest_service("/mcp", service)).await
    });
    format!("http://{addr}/mcp")
}

/// The clinic example with a non-PHI tool `add` any caller may use; with
/// `ruled`, `add` declares its two integer arguments and has two argument
/// rules, one reading the arguments and one the caller's claims.
fn manifest(dir: &Path, ruled: bool) -> PathBuf {
    let mut docs: Vec<Value> = serde_yaml::Deserializer::from_str(CLINIC)
        .map(|d| serde::Deserialize::deserialize(d).expect("example YAML"))
        .collect();
    let mut add = json!({
        "name": "add", "phi": false, "allowedCallers": {"anyAuthenticated": true},
        "dataAccess": [], "noDataAccessReason": "arithmetic"
    });
    if ruled {
        add["arguments"] = json!([
            {"name": "a", "type": "integer", "required": true, "minimum": -1000000, "maximum": 1000000},
            {"name": "b", "type": "integer", "required": true, "minimum": -1000000, "maximum": 1000000}
        ]);
        add["argumentRules"] = json!([
            {"rule": "args.a + args.b <= 1000", "message": "small sums only"},
            {"rule": "caller.claims.department == 'front-desk' || 'front-desk' in caller.groups", "message": "front desk only"}
        ]);
        docs[1]["spec"]["authentication"]["oidc"]["ruleClaims"] = json!(["department"]);
    }
    docs[1]["spec"]["tools"].as_array_mut().expect("tools").push(add);
    let text: String = docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("yaml"))).collect();
    let path = dir.join(if ruled { "bench-ruled.yaml" } else { "bench.yaml" });
    std::fs::write(&path, text).expect("manifest");
    path
}

/// The sidecar binary the pod runs (`mcp-warden-sidecar`, this build), or
/// with `MCPW_BENCH_SIDECAR=all-in-one` the `mcp-warden sidecar`
/// subcommand of the binary that holds every subcommand (to compare their
/// RSS), or with `MCPW_BENCH_SIDECAR=<path>` a sidecar binary built
/// elsewhere — the image's static musl build:
/// `cargo build --release --no-default-features --target x86_64-unknown-linux-musl --bin mcp-warden-sidecar`.
/// Returns the command and how the table names it.
fn sidecar_command() -> (Command, String) {
    match std::env::var("MCPW_BENCH_SIDECAR") {
        Ok(choice) if choice == "all-in-one" => {
            let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-warden"));
            command.arg("sidecar");
            (command, "mcp-warden sidecar".into())
        }
        Ok(path) if !path.is_empty() => (Command::new(&path), path),
        _ => (Command::new(env!("CARGO_BIN_EXE_mcp-warden-sidecar")), "mcp-warden-sidecar".into()),
    }
}

/// A sidecar in front of `upstream`, ready: its process, MCP URL and pid.
async fn start_sidecar(dir: &Path, manifest: &Path, upstream: &str, audit: &str) -> (Child, String, u32) {
    let (port, metrics_port) = (free_port(), free_port());
    let sidecar = Child(
        sidecar_command()
            .0
            .arg("--mcpserver")
            .arg(manifest)
            .args(["--upstream", upstream, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}"), "--jwks-file"])
            .arg(dir.join("jwks.json"))
            .arg("--audit-dir")
            .arg(dir.join(audit))
            .arg("--args-key-file")
            .arg(dir.join("audit.key"))
            .args(["--allowed-host", "127.0.0.1"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the sidecar"),
    );
    let http = reqwest::Client::new();
    let ready = Instant::now();
    while http
        .get(format!("http://127.0.0.1:{metrics_port}/readyz"))
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(ready.elapsed() < Duration::from_secs(30), "the sidecar did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = sidecar.0.id();
    (sidecar, format!("http://127.0.0.1:{port}/mcp"), pid)
}

fn token() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({"iss": "https://login.example.org", "aud": "https://patient-lookup.clinic.example/mcp",
        "sub": "alice", "exp": now + 3600, "groups": ["front-desk"], "department": "front-desk", "scope": "mcp:tools"});
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-rsa".into());
    encode(&header, &claims, &EncodingKey::from_rsa_pem(RSA_KEY).expect("key")).expect("sign")
}

const ACCEPT: &str = "application/json, text/event-stream";

/// A 2025-11-25 session at `url`: initialize, then initialized.
async fn session(url: &str, bearer: Option<&str>) -> String {
    let http = reqwest::Client::new();
    let with_auth = |r: reqwest::RequestBuilder| match bearer {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}});
    let response = with_auth(http.post(url).header("accept", ACCEPT).json(&init)).send().await.expect("initialize");
    assert!(response.status().is_success(), "initialize: {}", response.status());
    let id = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).expect("a session id").to_string();
    response.bytes().await.expect("initialize answer");
    let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let response = with_auth(
        http.post(url)
            .header("accept", ACCEPT)
            .header("mcp-session-id", &id)
            .header("mcp-protocol-version", "2025-11-25")
            .json(&done),
    )
    .send()
    .await
    .expect("initialized");
    assert!(response.status().is_success(), "initialized: {}", response.status());
    id
}

/// What one oha run measured.
struct Run {
    p50: f64,
    p99: f64,
    rps: f64,
    cpu_us_per_call: Option<f64>,
    switches_per_call: Option<f64>,
}

/// One way of calling: the body and headers a client of one protocol
/// generation sends.
struct Call {
    body: String,
    headers: Vec<(String, String)>,
}

impl Call {
    /// 2026-07-28: no session; `Mcp-Method`/`Mcp-Name` mirror the body and
    /// every request carries its client context in `_meta` (SEP-2575).
    fn stateless(bearer: Option<&str>) -> Call {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "add", "arguments": {"a": 2, "b": 3},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
        let mut headers = vec![
            ("mcp-protocol-version".to_string(), "2026-07-28".to_string()),
            ("mcp-method".to_string(), "tools/call".to_string()),
            ("mcp-name".to_string(), "add".to_string()),
        ];
        headers.extend(bearer.map(|t| ("authorization".to_string(), format!("Bearer {t}"))));
        Call { body: body.to_string(), headers }
    }

    /// 2025-11-25: a session from `initialize`.
    fn in_session(session: &str, bearer: Option<&str>) -> Call {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 2, "b": 3}}});
        let mut headers = vec![
            ("mcp-protocol-version".to_string(), "2025-11-25".to_string()),
            ("mcp-session-id".to_string(), session.to_string()),
        ];
        headers.extend(bearer.map(|t| ("authorization".to_string(), format!("Bearer {t}"))));
        Call { body: body.to_string(), headers }
    }
}

/// Kills the sidecar however the bench ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One call made with curl, to show what a failing run was answered.
fn sample(url: &str, call: &Call) -> String {
    let mut command = Command::new("curl");
    command.args([
        "-s",
        "-i",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        &format!("accept: {ACCEPT}"),
        "-d",
        &call.body,
    ]);
    for (name, value) in &call.headers {
        command.args(["-H", &format!("{name}: {value}")]);
    }
    command
        .arg(url)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(curl: {e})"))
}

fn drive(oha: &Path, url: &str, call: &Call, requests: usize, concurrency: usize, sidecar: Option<u32>) -> Run {
    let mut command = Command::new(oha);
    command.args([
        "-n",
        &requests.to_string(),
        "-c",
        &concurrency.to_string(),
        "-m",
        "POST",
        "--no-tui",
        "--output-format",
        "json",
    ]);
    command.args(["-H", "content-type: application/json", "-H", &format!("accept: {ACCEPT}"), "-d", &call.body]);
    for (name, value) in &call.headers {
        command.args(["-H", &format!("{name}: {value}")]);
    }
    command.arg(url).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let cpu_before = sidecar.map(cpu_us);
    let switches_before = sidecar.map(support::context_switches);
    let output = command.output().expect("run oha");
    let cpu = sidecar.zip(cpu_before).map(|(pid, before)| (cpu_us(pid) - before) as f64 / requests as f64);
    let switches = sidecar
        .zip(switches_before)
        .map(|(pid, before)| support::context_switches(pid).saturating_sub(before) as f64 / requests as f64);
    let report: Value = serde_json::from_slice(&output.stdout).expect("oha's JSON report");
    let codes = &report["statusCodeDistribution"];
    let all_ok = codes.as_object().is_some_and(|c| c.len() == 1 && c.contains_key("200"))
        && report["errorDistribution"].as_object().is_none_or(|e| e.is_empty());
    assert!(
        all_ok,
        "{url}: not every call answered 200: {codes} {}; one answer: {}",
        report["errorDistribution"],
        sample(url, call)
    );
    Run {
        p50: report["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1000.0,
        p99: report["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1000.0,
        rps: report["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        cpu_us_per_call: cpu,
        switches_per_call: switches,
    }
}

fn main() {
    let rounds = env_number("MCPW_BENCH_ROUNDS", 5usize);
    let counts = [
        (1usize, env_number("MCPW_BENCH_REQUESTS_C1", 2000usize)),
        (32usize, env_number("MCPW_BENCH_REQUESTS_C32", 20000usize)),
    ];
    let oha = oha();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let upstream = upstream().await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), JWKS).expect("jwks");
        std::fs::write(dir.path().join("audit.key"), "k".repeat(64)).expect("key");
        let (sidecar, through, pid) = start_sidecar(dir.path(), &manifest(dir.path(), false), &upstream, "audit").await;
        let token = token();
        let direct_session = session(&upstream, None).await;
        let sidecar_session = session(&through, Some(&token)).await;
        // Both paths, both generations: (name, concurrencies, direct call,
        // call through the sidecar). oha sends one body on every connection:
        // concurrent requests with one id in one session are not a valid
        // client (JSON-RPC ids are unique while in flight, and the server
        // answers only one of them), so the session form runs at c=1.
        let generations = [
            ("2026-07-28 stateless", &counts[..], Call::stateless(None), Call::stateless(Some(&token))),
            ("2025-11-25 session", &counts[..1], Call::in_session(&direct_session, None), Call::in_session(&sidecar_session, Some(&token))),
        ];
        // Warm both paths.
        for (_, _, direct, proxied) in &generations {
            drive(&oha, &upstream, direct, 200, 1, None);
            drive(&oha, &through, proxied, 200, 1, None);
        }
        println!("sidecar benchmark: tools/call `add` (non-PHI; JWT check, policy, durable decision record), oha, rmcp server with SSE answers");
        println!("  {}  rounds {rounds}, direct and sidecar alternating", support::machine());
        println!("| generation | c | direct p50 / p99 ms | sidecar p50 / p99 ms | added p50 ms (spread) | added p99 ms (spread) | direct req/s | sidecar req/s | ratio | sidecar CPU µs/call | sidecar switches/call |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for (name, concurrencies, direct_call, sidecar_call) in &generations {
            for &(concurrency, requests) in *concurrencies {
                let (mut direct, mut proxied) = (Vec::new(), Vec::new());
                for round in 0..rounds {
                    // Alternate which path goes first.
                    if round % 2 == 0 {
                        direct.push(drive(&oha, &upstream, direct_call, requests, concurrency, None));
                        proxied.push(drive(&oha, &through, sidecar_call, requests, concurrency, Some(pid)));
                    } else {
                        proxied.push(drive(&oha, &through, sidecar_call, requests, concurrency, Some(pid)));
                        direct.push(drive(&oha, &upstream, direct_call, requests, concurrency, None));
                    }
                }
                let added_p50: Vec<f64> = direct.iter().zip(&proxied).map(|(d, s)| s.p50 - d.p50).collect();
                let added_p99: Vec<f64> = direct.iter().zip(&proxied).map(|(d, s)| s.p99 - d.p99).collect();
                let ratios: Vec<f64> = direct.iter().zip(&proxied).map(|(d, s)| s.rps / d.rps).collect();
                let cpu = median(&proxied.iter().filter_map(|r| r.cpu_us_per_call).collect::<Vec<_>>());
                let switches = median(&proxied.iter().filter_map(|r| r.switches_per_call).collect::<Vec<_>>());
                println!(
                    "| {name} | {concurrency} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} ({}) | {:.2} ({}) | {:.0} | {:.0} | {:.2}× ({}) | {cpu:.0} | {switches:.1} |",
                    median(&direct.iter().map(|r| r.p50).collect::<Vec<_>>()),
                    median(&direct.iter().map(|r| r.p99).collect::<Vec<_>>()),
                    median(&proxied.iter().map(|r| r.p50).collect::<Vec<_>>()),
                    median(&proxied.iter().map(|r| r.p99).collect::<Vec<_>>()),
                    median(&added_p50),
                    spread(&added_p50, 2),
                    median(&added_p99),
                    spread(&added_p99, 2),
                    median(&direct.iter().map(|r| r.rps).collect::<Vec<_>>()),
                    median(&proxied.iter().map(|r| r.rps).collect::<Vec<_>>()),
                    median(&ratios),
                    spread(&ratios, 2),
                );
            }
        }
        let rss = status_kib(pid, "VmHWM:").unwrap_or(0);
        let binary = sidecar_command().1;
        println!("sidecar ({binary}) peak RSS (VmHWM) over the run: {:.1} MiB", rss as f64 / 1024.0);

        // The cost of argument rules, on its own line: the same call through
        // a second sidecar whose `add` declares its arguments and has two
        // rules (one over the arguments, one over the caller's claims).
        let (ruled, through_ruled, ruled_pid) =
            start_sidecar(dir.path(), &manifest(dir.path(), true), &upstream, "audit-ruled").await;
        let (plain_call, ruled_call) = (Call::stateless(Some(&token)), Call::stateless(Some(&token)));
        // The rules pass for this call: what is measured is a call answered,
        // not a refusal (which oha would also count as a 200).
        let answer = sample(&through_ruled, &ruled_call);
        assert!(answer.contains("\"result\"") && !answer.contains("\"error\""), "the ruled call was not answered: {answer}");
        drive(&oha, &through_ruled, &ruled_call, 200, 1, None);
        let requests = counts[0].1;
        let (mut plain, mut with_rules) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                plain.push(drive(&oha, &through, &plain_call, requests, 1, Some(pid)));
                with_rules.push(drive(&oha, &through_ruled, &ruled_call, requests, 1, Some(ruled_pid)));
            } else {
                with_rules.push(drive(&oha, &through_ruled, &ruled_call, requests, 1, Some(ruled_pid)));
                plain.push(drive(&oha, &through, &plain_call, requests, 1, Some(pid)));
            }
        }
        let added: Vec<f64> = plain.iter().zip(&with_rules).map(|(p, r)| r.p50 - p.p50).collect();
        let cpu = |runs: &[Run]| median(&runs.iter().filter_map(|r| r.cpu_us_per_call).collect::<Vec<_>>());
        println!();
        println!("argument rules, 2026-07-28 stateless, c=1: `add` with 2 declared integer arguments and 2 rules vs none (rounds alternating)");
        println!("| sidecar p50 / p99 ms | with rules p50 / p99 ms | rules' added p50 ms (spread) | CPU µs/call without / with |");
        println!("|---|---|---|---|");
        println!(
            "| {:.3} / {:.3} | {:.3} / {:.3} | {:.3} ({}) | {:.0} / {:.0} |",
            median(&plain.iter().map(|r| r.p50).collect::<Vec<_>>()),
            median(&plain.iter().map(|r| r.p99).collect::<Vec<_>>()),
            median(&with_rules.iter().map(|r| r.p50).collect::<Vec<_>>()),
            median(&with_rules.iter().map(|r| r.p99).collect::<Vec<_>>()),
            median(&added),
            spread(&added, 3),
            cpu(&plain),
            cpu(&with_rules),
        );
        drop(ruled);
        drop(sidecar);
    });
}
