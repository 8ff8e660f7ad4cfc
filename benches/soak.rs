//! The data path for a long while, with faults: the demo's stack (private
//! PostgreSQL with the clinic, OIDC issuer, broker, audit collector,
//! sidecar with its database proxy, an rmcp server) under a mixed load at
//! fixed rates, printing errors by class and each process's memory and
//! open files every report interval, and at the end whether every call is
//! on the collector's trail, whether any role outlived its lease and
//! whether the trail verifies. Prints; asserts nothing.
//!
//! ```text
//!   load (stateless 2026-07-28 requests, as real clients send them)
//!     hours     clinic_hours (no PHI), closed loop, 2 workers: as fast as the machine goes
//!     phi       lookup_patient (a fresh proxied connection as a per-call role), 5/s
//!     lists     tools/list, 1/s
//!     refusals  lookup_patient by a caller outside front-desk, 1/s (a refusal is the expected answer)
//!     expiring  clinic_hours, 1/s, with a token that expires at 1/3 of the run (401 expected after)
//!   (the other callers take new tokens every 20 minutes, as clients refresh theirs)
//!   faults (fraction of the run)        expected error classes while it lasts (+10 s)
//!     0.25 JWKS rotation (new key, new tokens; the broker's manifests rewritten)   401 on any class, phi refused
//!     0.45 collector restart                                                        none
//!     0.65 broker restart                                                           phi refused
//! ```
//!
//! `cargo bench --bench soak`; MCPW_SOAK_SECONDS (600), MCPW_SOAK_REPORT
//! (60, seconds between reports). The slope of RSS, of RssAnon (the
//! process's own memory; VmRSS also counts the binary's pages, which the
//! three processes of the one binary share) and of open files over the last
//! half of the reports is least squares over the samples, per minute.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcp_warden::demo::issuer::Issuer;
use mcp_warden::demo::stack::{Part, Stack};
use serde_json::{Value, json};
use support::{env_number, machine, status_kib};

/// How often the load's callers take new tokens (the issuer's last an
/// hour): a run longer than that would otherwise end in 401s.
const TOKEN_REFRESH: Duration = Duration::from_secs(20 * 60);

/// One call's fate.
struct Outcome {
    class: &'static str,
    at: Duration,
    correlation: Option<String>,
    /// `None` when answered as the class expects; the error class otherwise.
    error: Option<String>,
}

/// A fault's window and the load classes whose errors it explains.
struct Fault {
    name: &'static str,
    from: Duration,
    until: Duration,
    explains: fn(&'static str, &str) -> bool,
}

struct Soak {
    started: Instant,
    outcomes: Mutex<Vec<Outcome>>,
    faults: Mutex<Vec<Fault>>,
    tokens: Mutex<BTreeMap<&'static str, String>>,
    stop: AtomicBool,
    expiry: Duration,
}

impl Soak {
    fn token(&self, who: &'static str) -> String {
        self.tokens.lock().unwrap()[who].clone()
    }

    /// New tokens for the callers whose tokens are meant to stay valid, as
    /// clients refresh theirs (the issuer's last an hour; eve's is left to
    /// expire).
    fn refresh_tokens(&self, issuer: &Issuer) {
        let mut tokens = self.tokens.lock().unwrap();
        tokens.insert("dana", issuer.token("dana", &["front-desk"]).unwrap());
        tokens.insert("bob", issuer.token("bob", &["billing"]).unwrap());
    }

    fn expected(&self, class: &'static str, error: &str, at: Duration) -> bool {
        match class {
            // A refusal is a JSON-RPC error in a 200 answer; a 5xx is not one.
            "refusals" if error.starts_with("200 rpc") => return true,
            "expiring" if at >= self.expiry && error.starts_with("401") => return true,
            _ => {}
        }
        self.faults.lock().unwrap().iter().any(|f| at >= f.from && at <= f.until && (f.explains)(class, error))
    }
}

/// A JSON-RPC request as a 2026-07-28 client sends it.
async fn call(http: &reqwest::Client, url: &str, token: &str, method: &str, params: Value) -> (String, Option<String>) {
    let mut body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    body["params"]["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                     "io.modelcontextprotocol/clientCapabilities": {}});
    let mut request = http
        .post(url)
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(name) = params.get("name").and_then(Value::as_str) {
        request = request.header("mcp-name", name);
    }
    let response = match request.body(body.to_string()).send().await {
        Ok(r) => r,
        Err(e) => return (format!("transport: {}", e.without_url()), None),
    };
    let status = response.status().as_u16();
    let correlation = response.headers().get("mcp-warden-correlation").and_then(|v| v.to_str().ok()).map(String::from);
    let text = response.text().await.unwrap_or_default();
    // The answer: the JSON body, or the last `data:` of an SSE stream.
    let answer = serde_json::from_str::<Value>(&text).ok().or_else(|| {
        text.lines().rev().filter_map(|l| l.strip_prefix("data:")).find_map(|d| serde_json::from_str(d.trim()).ok())
    });
    let verdict = match answer {
        Some(a) if status == 200 && a.get("result").is_some() && a["result"]["isError"] != json!(true) => String::new(),
        Some(a) if a.get("error").is_some() => format!("{status} rpc {}", a["error"]["code"]),
        Some(_) if status == 200 => "200 tool error".to_string(),
        _ => format!("{status} no JSON-RPC answer"),
    };
    (verdict, correlation)
}

/// Runs `class` until the soak stops: closed loop when `every` is None.
fn load(
    soak: Arc<Soak>,
    url: String,
    class: &'static str,
    who: &'static str,
    every: Option<Duration>,
    method: &'static str,
    params: Value,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut tick = every.map(|e| {
            let mut t = tokio::time::interval(e);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        while !soak.stop.load(Ordering::Relaxed) {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            let (verdict, correlation) = call(&http, &url, &soak.token(who), method, params.clone()).await;
            let at = soak.started.elapsed();
            let error = match (class, verdict.is_empty()) {
                ("refusals", true) => Some("answered, not refused".to_string()),
                (_, true) => None,
                _ => Some(verdict),
            };
            soak.outcomes.lock().unwrap().push(Outcome { class, at, correlation, error });
        }
    })
}

/// One report's reading of one process.
struct Sample {
    minute: f64,
    rss_mib: f64,
    anon_mib: f64,
    fds: f64,
    pid: u32,
}

/// What one process holds: VmHWM, VmRSS and RssAnon (KiB), open files.
/// VmRSS also counts the binary's pages, shared by the three processes the
/// same binary runs as; RssAnon is the process's own (heap, stacks).
struct Held {
    hwm: u64,
    rss: u64,
    anon: u64,
    fds: usize,
}

fn process(pid: Option<u32>) -> Held {
    let Some(pid) = pid else { return Held { hwm: 0, rss: 0, anon: 0, fds: 0 } };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let kib = |field| status_kib(pid, field).unwrap_or(0);
    Held { hwm: kib("VmHWM:"), rss: kib("VmRSS:"), anon: kib("RssAnon:"), fds }
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

fn report(soak: &Soak, parts: &[(&str, Option<u32>)], samples: &mut BTreeMap<String, Vec<Sample>>) {
    let at = soak.started.elapsed();
    let outcomes = soak.outcomes.lock().unwrap();
    let mut table: BTreeMap<(&str, String), (u64, bool)> = BTreeMap::new();
    for o in outcomes.iter() {
        let key = (o.class, o.error.clone().unwrap_or_else(|| "ok".into()));
        let expected = o.error.as_ref().is_none_or(|e| soak.expected(o.class, e, o.at));
        let entry = table.entry(key).or_insert((0, true));
        entry.0 += 1;
        entry.1 &= expected;
    }
    println!("── {:>5.0} s ──", at.as_secs_f64());
    for ((class, what), (count, expected)) in &table {
        let mark = if what == "ok" {
            ""
        } else if *expected {
            " (expected)"
        } else {
            " UNEXPECTED"
        };
        println!("   {class:<9} {what:<28} {count:>8}{mark}");
    }
    for (name, pid) in parts {
        let held = process(*pid);
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "   {name:<9} VmHWM {:>7.1} MiB  VmRSS {:>7.1} MiB  RssAnon {:>7.1} MiB  fds {:>4}",
            mib(held.hwm),
            mib(held.rss),
            mib(held.anon),
            held.fds
        );
        if let Some(pid) = pid {
            let sample = Sample {
                minute: at.as_secs_f64() / 60.0,
                rss_mib: mib(held.rss),
                anon_mib: mib(held.anon),
                fds: held.fds as f64,
                pid: *pid,
            };
            samples.entry(name.to_string()).or_default().push(sample);
        }
    }
}

fn main() {
    let seconds = env_number("MCPW_SOAK_SECONDS", 600u64);
    let every = env_number("MCPW_SOAK_REPORT", 60u64);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let exe = Path::new(env!("CARGO_BIN_EXE_mcp-warden"));
        let mut stack = Stack::start_with(exe, |what| eprintln!("starting {what}")).await.expect("the stack");
        let url = stack.at.mcp.clone();
        let duration = Duration::from_secs(seconds);
        let issuer = Arc::clone(&stack.issuer);
        let tokens = BTreeMap::from([
            ("dana", issuer.token("dana", &["front-desk"]).unwrap()),
            ("bob", issuer.token("bob", &["billing"]).unwrap()),
            ("eve", issuer.token_for("eve", &["front-desk"], seconds / 3).unwrap()),
        ]);
        let soak = Arc::new(Soak {
            started: Instant::now(),
            outcomes: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            tokens: Mutex::new(tokens),
            stop: AtomicBool::new(false),
            expiry: Duration::from_secs(seconds / 3),
        });
        // A pseudonym to look up, as a model would get one.
        let http = reqwest::Client::new();
        let listed = http
            .post(&url)
            .bearer_auth(soak.token("dana"))
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "clinician_patients")
            .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "clinician_patients",
                "arguments": {"clinician": "dr-okafor"}, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}}).to_string())
            .send()
            .await
            .expect("first call")
            .text()
            .await
            .unwrap_or_default();
        let pseudonym = listed.find("pt_").map(|i| listed[i..i + 23].to_string()).expect("a pseudonym in the first answer");

        println!("{}", machine());
        println!("soak: {seconds} s, reports every {every} s; faults at 25% (JWKS rotation), 45% (collector restart), 65% (broker restart); eve's token expires at 33%");
        let phi = json!({"name": "lookup_patient", "arguments": {"patient": pseudonym}});
        let hours = json!({"name": "clinic_hours", "arguments": {}});
        let mut tasks = vec![
            load(Arc::clone(&soak), url.clone(), "hours", "dana", None, "tools/call", hours.clone()),
            load(Arc::clone(&soak), url.clone(), "hours", "dana", None, "tools/call", hours.clone()),
            load(Arc::clone(&soak), url.clone(), "phi", "dana", Some(Duration::from_millis(200)), "tools/call", phi.clone()),
            load(Arc::clone(&soak), url.clone(), "lists", "dana", Some(Duration::from_secs(1)), "tools/list", json!({})),
            load(Arc::clone(&soak), url.clone(), "refusals", "bob", Some(Duration::from_secs(1)), "tools/call", phi),
            load(Arc::clone(&soak), url.clone(), "expiring", "eve", Some(Duration::from_secs(1)), "tools/call", hours),
        ];

        let mut samples = BTreeMap::new();
        let mut faults_done = 0;
        let mut next_report = Duration::from_secs(every);
        let grace = Duration::from_secs(10);
        let mut refreshed = Duration::ZERO;
        while soak.started.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let at = soak.started.elapsed();
            if at - refreshed >= TOKEN_REFRESH {
                soak.refresh_tokens(&issuer);
                refreshed = at;
            }
            let fraction = at.as_secs_f64() / duration.as_secs_f64();
            if faults_done == 0 && fraction >= 0.25 {
                issuer.rotate().unwrap();
                stack.publish_jwks().expect("manifests");
                soak.refresh_tokens(&issuer);
                refreshed = at;
                let until = soak.started.elapsed() + grace;
                soak.faults.lock().unwrap().push(Fault {
                    name: "JWKS rotation",
                    from: at,
                    until,
                    explains: |class, error| error.starts_with("401") || class == "phi",
                });
                println!("   fault: JWKS rotation at {:.0} s", at.as_secs_f64());
                faults_done += 1;
            } else if faults_done == 1 && fraction >= 0.45 {
                let port = stack.collector_port;
                restart(&mut stack.collector, async || {
                    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
                })
                .await;
                let until = soak.started.elapsed() + grace;
                soak.faults.lock().unwrap().push(Fault { name: "collector restart", from: at, until, explains: |_, _| false });
                println!("   fault: collector restarted at {:.0} s", at.as_secs_f64());
                faults_done += 1;
            } else if faults_done == 2 && fraction >= 0.65 {
                let ready = stack.broker_ready.clone();
                restart(&mut stack.broker, async || {
                    reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success())
                })
                .await;
                let until = soak.started.elapsed() + grace;
                soak.faults.lock().unwrap().push(Fault {
                    name: "broker restart",
                    from: at,
                    until,
                    explains: |class, _| class == "phi",
                });
                println!("   fault: broker restarted at {:.0} s", at.as_secs_f64());
                faults_done += 1;
            }
            if at >= next_report {
                next_report += Duration::from_secs(every);
                let parts = [
                    ("sidecar", stack.sidecar.pid()),
                    ("broker", stack.broker.pid()),
                    ("collector", stack.collector.pid()),
                ];
                report(&soak, &parts, &mut samples);
            }
        }
        soak.stop.store(true, Ordering::Relaxed);
        for task in tasks.drain(..) {
            let _ = task.await;
        }
        let parts = [("sidecar", stack.sidecar.pid()), ("broker", stack.broker.pid()), ("collector", stack.collector.pid())];
        report(&soak, &parts, &mut samples);
        conclude(&soak, &mut stack, exe, &samples).await;
    });
}

async fn restart(part: &mut Part, ready: impl AsyncFnMut() -> bool) {
    if let Err(e) = part.restart(ready).await {
        println!("   the {} did not come back: {e}", part.name);
    }
}

async fn conclude(soak: &Soak, stack: &mut Stack, exe: &Path, samples: &BTreeMap<String, Vec<Sample>>) {
    println!("── the end ──");
    for fault in soak.faults.lock().unwrap().iter() {
        println!("   {} at {:.0} s", fault.name, fault.from.as_secs_f64());
    }
    // Roles: none past its lease while the broker runs.
    let root = stack.pg.superuser("postgres").await.expect("superuser");
    let row = root
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE rolvaliduntil < now() - interval '10 seconds')
               FROM pg_roles WHERE rolname LIKE 'mcpw\\_u\\_%'",
            &[],
        )
        .await
        .expect("roles");
    let (roles, outlived): (i64, i64) = (row.get(0), row.get(1));
    println!("   caller roles in pg_roles: {roles}, past their lease by more than 10 s: {outlived}");

    // Drain: the sidecar and the broker stop, seal and ship their streams.
    let sidecar = stack.sidecar.stop();
    let broker = stack.broker.stop();
    println!("   sidecar stopped: {sidecar:?}; broker stopped: {broker:?}");
    let storage = stack.storage();
    let streams = storage.join("streams");
    let key = stack.checkpoint_key.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, verify) = loop {
        let out = std::process::Command::new(exe)
            .args(["audit", "verify"])
            .arg(&streams)
            .args(["--sealed", "--checkpoint-key", &key])
            .output()
            .expect("audit verify");
        let code = out.status.code().unwrap_or(-1);
        if code == 0 || Instant::now() > deadline {
            break (code, String::from_utf8_lossy(&out.stdout).into_owned());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("   audit verify --sealed of the collector's storage: exit {code}");
    for line in verify.lines().take(12) {
        println!("     {line}");
    }

    let bytes = |dir: &Path| -> u64 {
        walkdir::WalkDir::new(dir)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    println!(
        "   disk: collector storage {:.0} MiB, sidecar's audit dir {:.0} MiB",
        bytes(&storage) as f64 / 1048576.0,
        bytes(&stack.dir.path().join("sidecar-audit")) as f64 / 1048576.0
    );

    // Every call with a correlation id is on the collector's trail. The
    // trail is read a line at a time, only the calls' ids held: a two-hour
    // run stores tens of millions of records, and loading them all at once
    // ran this machine (24 GiB) out of memory.
    let outcomes = soak.outcomes.lock().unwrap();
    let mut unseen: std::collections::HashSet<&str> =
        outcomes.iter().filter_map(|o| o.correlation.as_deref()).collect();
    let with_id = outcomes.iter().filter(|o| o.correlation.is_some()).count();
    let mut unreadable = 0u64;
    for dir in walkdir::WalkDir::new(&storage).into_iter().filter_map(|e| e.ok()).filter(|e| e.file_type().is_dir()) {
        for (_, path) in mcp_warden::audit::segment::list_segments(dir.path()).unwrap_or_default() {
            let read = mcp_warden::audit::segment::for_each_line(&path, |line| {
                match mcp_warden::audit::record::Record::parse_line(line.bytes) {
                    Ok(record) => {
                        if let Some(id) = record.event.correlation.as_deref() {
                            unseen.remove(id);
                        }
                    }
                    Err(_) => unreadable += 1,
                }
                Ok::<(), std::io::Error>(())
            });
            if read.is_err() {
                unreadable += 1;
            }
        }
    }
    if unreadable > 0 {
        println!("   {unreadable} trail lines or segments could not be read");
    }
    let missing = unseen.len();
    let without_id = outcomes.len() - with_id;
    let unexpected =
        outcomes.iter().filter(|o| o.error.as_ref().is_some_and(|e| !soak.expected(o.class, e, o.at))).count();
    println!(
        "   calls: {} ({} without an answer naming its correlation id); on the collector's trail: {}; missing: {missing}",
        outcomes.len(),
        without_id,
        with_id - missing
    );
    println!("   unexpected errors: {unexpected}");
    // Flat after warm-up: the slope over the last half of the reports,
    // counting only the process running at the end (a restart starts over).
    for (name, series) in samples {
        let Some(last) = series.last() else { continue };
        let half: Vec<&Sample> = series.iter().skip(series.len() / 2).filter(|s| s.pid == last.pid).collect();
        let xs: Vec<f64> = half.iter().map(|s| s.minute).collect();
        let series_of = |f: fn(&Sample) -> f64| -> Vec<f64> { half.iter().map(|s| f(s)).collect() };
        let (rss, anon, fds) = (series_of(|s| s.rss_mib), series_of(|s| s.anon_mib), series_of(|s| s.fds));
        let ends = |ys: &[f64]| (ys.first().copied().unwrap_or(0.0), ys.last().copied().unwrap_or(0.0));
        let ((rss0, rss1), (anon0, anon1), (fds0, fds1)) = (ends(&rss), ends(&anon), ends(&fds));
        println!(
            "   {name:<9} last half ({} samples of one process): RSS {rss0:.1}→{rss1:.1} MiB, slope {:+.3} MiB/min; \
             RssAnon {anon0:.1}→{anon1:.1} MiB, slope {:+.3} MiB/min; fds {fds0:.0}→{fds1:.0}, slope {:+.2}/min",
            half.len(),
            slope(&xs, &rss),
            slope(&xs, &anon),
            slope(&xs, &fds)
        );
    }
}
