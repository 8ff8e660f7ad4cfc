//! The operator binary against the stateful fake API server
//! (`tests/fake_apiserver`), which answers as the recorded real server did:
//! it becomes ready once its caches have synced, converges in a bounded
//! number of writes, then sends nothing; a hand edit is restored once; and
//! with two replicas one leads, hands over on SIGTERM or a crash, and a
//! leader that cannot renew stops writing before another starts.

mod common;
mod fake_apiserver;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Reap, free_port};
use fake_apiserver::{FakeApi, Fault, Request};
use serde_json::{Value, json};

const NS: &str = "clinic";
const LEASE: &str = "mcp-warden-operator";
const CLINIC: &str = include_str!("../examples/compliant/clinic.yaml");
const WAIT: Duration = Duration::from_secs(60);

/// The clinic example's PHIStore, `n` copies of its MCPServer (keys from a
/// ConfigMap, so nothing is fetched), and that ConfigMap.
fn world(n: usize) -> Vec<Value> {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(CLINIC)
        .map(|d| serde::Deserialize::deserialize(d).expect("example YAML"))
        .collect();
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "idp-keys", "namespace": NS},
               "data": {"jwks.json": include_str!("fixtures/test-jwks.json")}}),
        docs[0].clone(),
    ];
    for i in 0..n {
        out.push(server(&docs[1], &format!("s-{i:03}")));
    }
    out
}

fn server(template: &Value, name: &str) -> Value {
    let mut server = template.clone();
    server["metadata"]["name"] = json!(name);
    let oidc = server["spec"]["authentication"]["oidc"].as_object_mut().expect("oidc");
    oidc.remove("jwksUri");
    oidc.insert("jwksConfigMapRef".into(), json!({"name": "idp-keys"}));
    server
}

fn apply_all(fake: &FakeApi, objects: &[Value]) {
    for object in objects {
        fake.apply("kubectl", object).expect("apply");
    }
}

/// One operator process.
struct Operator {
    process: Reap,
    health: String,
}

impl Operator {
    fn start(dir: &Path, api: SocketAddr, identity: &str, extra: &[&str]) -> Self {
        let kubeconfig = FakeApi::kubeconfig(dir, api, identity);
        let port = free_port();
        let mut args = vec![
            "operator".to_string(),
            "--health-listen".into(),
            format!("127.0.0.1:{port}"),
            "--watch-namespace".into(),
            NS.into(),
            "--lease-namespace".into(),
            NS.into(),
            "--debounce".into(),
            "200ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the operator");
        Operator { process: Reap(child), health: format!("http://127.0.0.1:{port}") }
    }

    /// The sum of a counter family on /metrics, over the label sets whose
    /// text contains `filter`.
    async fn metric(&self, name: &str, filter: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.health)).await.expect("metrics").text().await.expect("text");
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn readyz(&self) -> Option<(u16, String)> {
        let response = reqwest::get(format!("{}/readyz", self.health)).await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.process.0.id() as i32, signal) };
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.0.try_wait().expect("wait") {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "the operator did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn eventually<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every server has a status for its generation, and every owned object
/// exists with the Deployment seen by its controller.
fn converged(fake: &FakeApi, n: usize) -> bool {
    let servers = fake.list("mcpservers", NS);
    servers.len() == n
        && servers.iter().all(|s| {
            let name = s["metadata"]["name"].as_str().unwrap_or_default();
            let observed = s.pointer("/status/observedGeneration") == s.pointer("/metadata/generation");
            let ready =
                s.pointer("/status/conditions/0/message").and_then(Value::as_str) == Some("0/2 replicas available");
            let audited = s["status"]["controls"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("all 2 pod(s) carry the auditing sidecar (2 Pending)"))
                })
            });
            observed && ready && audited && fake.get("networkpolicies", NS, &format!("{name}-egress")).is_some()
        })
}

fn holder(fake: &FakeApi) -> String {
    fake.get("leases", NS, LEASE)
        .and_then(|l| l.pointer("/spec/holderIdentity").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

/// Writes to the cluster's objects (Lease renewals and Events apart).
fn object_writes<'a>(requests: &'a [Request], identity: &str) -> Vec<&'a Request> {
    requests
        .iter()
        .filter(|r| r.identity == identity && r.is_write() && !r.is_event() && r.plural != "leases")
        .collect()
}

#[tokio::test]
async fn readiness_waits_for_every_cache_then_turns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    fake.set_latency(Duration::from_millis(1), Duration::from_millis(5));
    apply_all(&fake, &world(2));
    // The first LIST of pods is slow: every other cache syncs before it.
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let once = std::sync::Arc::clone(&slow);
    fake.add_fault(Box::new(move |r: &Request| {
        (r.verb == "list" && r.plural == "pods" && once.swap(false, std::sync::atomic::Ordering::SeqCst))
            .then_some(Fault::Delay(Duration::from_secs(2)))
    }));
    let api = fake.listen("solo").await;
    let operator = Operator::start(dir.path(), api, "solo", &["--leader-election=false"]);
    let (code, why) = loop {
        if let Some(answer) = operator.readyz().await {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 503, "not ready before the pods are listed");
    assert!(why.contains("Pod"), "{why}");
    let started = Instant::now();
    loop {
        if operator.readyz().await.is_some_and(|(code, _)| code == 200) {
            break;
        }
        assert!(started.elapsed() < WAIT, "the operator did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("convergence", WAIT, || converged(&fake, 2).then_some(())).await;
}

fn grant_state(fake: &FakeApi) -> Option<String> {
    fake.get("emergencyaccesses", NS, "ea-1")?.pointer("/status/state").and_then(Value::as_str).map(str::to_string)
}

fn emergency_control(fake: &FakeApi) -> Option<(String, String)> {
    let server = fake.get("mcpservers", NS, "s-000")?;
    let control = server["status"]["controls"].as_array()?.iter().find(|c| c["id"] == "emergency-access")?.clone();
    Some((control["verdict"].as_str()?.to_string(), control["message"].as_str()?.to_string()))
}

#[tokio::test]
async fn a_grant_is_judged_approved_revoked_and_its_server_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    apply_all(&fake, &world(1));
    apply_all(&fake, &common::chart::emergency_admission_policy("mcp-warden"));
    let api = fake.listen("solo").await;
    let audit = dir.path().join("verdicts");
    let audit_flag = audit.display().to_string();
    let mut operator =
        Operator::start(dir.path(), api, "solo", &["--leader-election=false", "--audit-dir", &audit_flag]);
    eventually("convergence", WAIT, || converged(&fake, 1).then_some(())).await;
    let (verdict, message) = emergency_control(&fake).expect("the control");
    assert_eq!(verdict, "Pass", "{message}");
    assert!(message.contains("no emergency access is in force"), "{message}");

    // The fake admits what the API server's policy would (tests/breakglass_policy.rs
    // and e2e check the policy itself): a grant, then an approver's update.
    let grant = json!({
        "apiVersion": "mcpwarden.io/v1alpha1", "kind": "EmergencyAccess",
        "metadata": {"name": "ea-1", "namespace": NS},
        "spec": {"server": "s-000", "requester": "oidc:nurse-joy", "beneficiary": "er-agent",
                 "tools": ["lookup_patient"], "reason": "unconscious patient", "duration": "1h"}
    });
    fake.apply("kubectl", &grant).expect("grant");
    eventually("a pending grant", WAIT, || (grant_state(&fake)? == "Pending").then_some(())).await;
    let approval = json!({"spec": {"approval": {"approver": "oidc:dr-house"}}});
    fake.merge_patch("kubectl", "emergencyaccesses", NS, "ea-1", &approval).expect("approve");
    eventually("an active grant", WAIT, || (grant_state(&fake)? == "Active").then_some(())).await;
    let stored = fake.get("emergencyaccesses", NS, "ea-1").expect("grant");
    assert!(stored.pointer("/status/approvedAt").is_some() && stored.pointer("/status/expiresAt").is_some());
    let message = eventually("the server naming it", WAIT, || {
        let (verdict, message) = emergency_control(&fake)?;
        (verdict == "Pass" && message.contains("ea-1 (er-agent → lookup_patient")).then_some(message)
    })
    .await;
    assert!(message.contains("approved by oidc:dr-house"), "{message}");
    assert_eq!(operator.metric("mcpwarden_operator_emergency_grants_active", "").await, 1.0);

    fake.merge_patch("kubectl", "emergencyaccesses", NS, "ea-1", &json!({"spec": {"revoked": true}})).expect("revoke");
    eventually("a revoked grant", WAIT, || (grant_state(&fake)? == "Revoked").then_some(())).await;
    eventually("the server no longer naming it", WAIT, || {
        emergency_control(&fake)?.1.contains("no emergency access is in force").then_some(())
    })
    .await;
    assert_eq!(operator.metric("mcpwarden_operator_emergency_grants_active", "").await, 0.0);
    let events: Vec<String> = fake
        .list("events", NS)
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .filter(|r| r.starts_with("EmergencyAccess"))
        .collect();
    for reason in ["EmergencyAccessPending", "EmergencyAccessActive", "EmergencyAccessRevoked"] {
        assert_eq!(
            events.iter().filter(|r| *r == reason).count(),
            2,
            "{reason} on the grant and its server: {events:?}"
        );
    }

    // The operator's trail of verdicts: every control once at the first
    // status, then only changes of verdict; its last word on each control is
    // what status says; sealed at SIGTERM.
    let controls: Vec<(String, String)> = fake.get("mcpservers", NS, "s-000").expect("server")["status"]["controls"]
        .as_array()
        .expect("controls")
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c["verdict"].as_str().unwrap().to_string()))
        .collect();
    operator.signal(libc::SIGTERM);
    assert!(operator.wait_exit().success());
    let stream = audit.join(NS).join("s-000");
    let report = mcp_warden::audit::verify::verify_dir(
        &stream,
        mcp_warden::audit::verify::VerifyOptions { require_sealed: true, ..Default::default() },
    );
    assert!(report.passed(), "{report:?}");
    let records = mcp_warden::audit::query::read_records(&stream).records;
    let verdicts: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.event.kind == mcp_warden::audit::Kind::Verdict)
        .map(|r| {
            assert_eq!(r.server, format!("{NS}/s-000"));
            let c = r.event.control.as_ref().expect("control");
            (c.id.clone(), c.verdict.clone())
        })
        .collect();
    for (id, verdict) in &controls {
        let history: Vec<&String> = verdicts.iter().filter(|(c, _)| c == id).map(|(_, v)| v).collect();
        assert!(!history.is_empty(), "{id} never recorded: {verdicts:?}");
        assert_eq!(history.last(), Some(&verdict), "{id}: the trail's last verdict is status's");
        assert!(history.windows(2).all(|w| w[0] != w[1]), "{id}: a verdict recorded twice in a row: {history:?}");
    }
}

#[tokio::test]
async fn a_converged_world_costs_no_request_and_a_hand_edit_is_restored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    fake.set_latency(Duration::from_millis(1), Duration::from_millis(5));
    let n = 5;
    apply_all(&fake, &world(n));
    let api = fake.listen("solo").await;
    let operator = Operator::start(dir.path(), api, "solo", &["--leader-election=false", "--resync-seconds", "1"]);
    eventually("convergence", WAIT, || converged(&fake, n).then_some(())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let requests = fake.requests();
    // The operator's own count of what it sent agrees with the server's.
    let mut sent = 0.0;
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        sent += operator.metric("mcpwarden_operator_api_requests_total", &format!("method=\"{method}\"")).await;
    }
    let served = requests.iter().filter(|r| r.identity == "solo" && r.is_write()).count();
    assert_eq!(sent as usize, served, "the operator's write counter matches what the server saw");
    let writes = object_writes(&requests, "solo");
    let per_server = writes.len() as f64 / n as f64;
    eprintln!("writes to converge: {} ({per_server:.1} per server)", writes.len());
    // Six owned objects (keys from the user's ConfigMap: no jwks copy), the
    // finalizer and the status: no object written twice. One more status
    // write per server is allowed when the Deployment controller's answer
    // comes after the status pass (a slow machine); the benchmark reports
    // the exact count.
    let owned: Vec<_> = writes.iter().filter(|r| !r.path.contains("/mcpservers/")).collect();
    assert_eq!(
        owned.len(),
        n * 6,
        "each owned object applied once: {:#?}",
        owned.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    assert!(writes.len() <= n * (6 + 3), "{:#?}", writes.iter().map(|r| &r.path).collect::<Vec<_>>());

    // Steady state, with a resync every second: nothing at all.
    let mark = fake.requests().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later: Vec<Request> = fake.requests().into_iter().skip(mark).filter(|r| r.identity == "solo").collect();
    let reads: Vec<_> = later.iter().filter(|r| !r.is_write() && r.verb != "watch").collect();
    assert!(later.iter().all(|r| !r.is_write()), "writes in steady state: {later:#?}");
    assert!(reads.is_empty(), "reads in steady state: {reads:#?}");

    // kubectl edit of the policy ConfigMap (as recorded): restored once.
    let mark = fake.requests().len();
    fake.merge_patch("kubectl-edit", "configmaps", NS, "s-001-policy", &json!({"data": {"policy.json": "{}"}}))
        .expect("edit");
    eventually("the edit undone", WAIT, || {
        let cm = fake.get("configmaps", NS, "s-001-policy")?;
        (cm["data"]["policy.json"] != "{}").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<Request> = fake.requests().into_iter().skip(mark).filter(|r| r.identity == "solo").collect();
    let restores: Vec<_> = after.iter().filter(|r| r.is_write() && !r.is_event()).map(|r| r.path.clone()).collect();
    assert_eq!(restores, [format!("/api/v1/namespaces/{NS}/configmaps/s-001-policy")]);
    let events: Vec<Value> = fake.list("events", NS);
    let drift: Vec<_> = events.iter().filter(|e| e["reason"] == "DriftCorrected").collect();
    assert_eq!(drift.len(), 1, "one Warning event: {drift:#?}");
    assert_eq!(drift[0]["type"], "Warning");
    assert!(drift[0]["note"].as_str().is_some_and(|n| n.contains("data.policy.json")), "{}", drift[0]["note"]);
}

const FAST_LEASE: [&str; 6] =
    ["--lease-duration", "4s", "--lease-renew-deadline", "2500ms", "--lease-retry-period", "500ms"];

#[tokio::test]
async fn a_standby_takes_over_on_sigterm_without_waiting_and_writes_nothing_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    fake.set_latency(Duration::from_millis(1), Duration::from_millis(3));
    apply_all(&fake, &world(3));
    let api_a = fake.listen("a").await;
    let api_b = fake.listen("b").await;
    // A long lease: a takeover within it proves the lease was released.
    let slow_lease = ["--lease-duration", "20s", "--lease-renew-deadline", "10s", "--lease-retry-period", "500ms"];
    let mut a = Operator::start(dir.path(), api_a, "a", &slow_lease);
    eventually("a leads", WAIT, || holder(&fake).starts_with("a_").then_some(())).await;
    let b = Operator::start(dir.path(), api_b, "b", &slow_lease);
    eventually("convergence", WAIT, || converged(&fake, 3).then_some(())).await;
    let started = Instant::now();
    loop {
        if b.readyz().await.is_some_and(|(code, _)| code == 200) {
            break;
        }
        assert!(started.elapsed() < WAIT, "the standby did not report ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(object_writes(&fake.requests(), "b").is_empty(), "a standby writes nothing");

    let mark = fake.requests().len();
    a.signal(libc::SIGTERM);
    let released = Instant::now();
    eventually("b leads", Duration::from_secs(10), || holder(&fake).starts_with("b_").then_some(())).await;
    let took = released.elapsed();
    eprintln!("failover on SIGTERM: {took:?}");
    assert!(took < Duration::from_secs(5), "a released the lease: {took:?}");
    assert!(a.wait_exit().success(), "a stops cleanly");
    // b reconciles every server from its warm caches: the world is unchanged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<Request> = fake.requests().into_iter().skip(mark).collect();
    assert!(object_writes(&after, "b").is_empty(), "failover writes nothing: {:#?}", object_writes(&after, "b"));
}

#[tokio::test]
async fn after_a_crash_the_standby_leads_within_the_lease_duration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    apply_all(&fake, &world(1));
    let api_a = fake.listen("a").await;
    let api_b = fake.listen("b").await;
    let mut a = Operator::start(dir.path(), api_a, "a", &FAST_LEASE);
    eventually("a leads", WAIT, || holder(&fake).starts_with("a_").then_some(())).await;
    let _b = Operator::start(dir.path(), api_b, "b", &FAST_LEASE);
    eventually("convergence", WAIT, || converged(&fake, 1).then_some(())).await;
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    a.wait_exit();
    eventually("b leads", Duration::from_secs(15), || holder(&fake).starts_with("b_").then_some(())).await;
    let took = killed.elapsed();
    eprintln!("failover after a crash: {took:?} (lease 4s)");
    assert!(took >= Duration::from_secs(3), "b waited for the lease to expire: {took:?}");
    // A new server is reconciled by the new leader.
    apply_all(&fake, &[server(&world(1)[2], "after-crash")]);
    eventually("the new server reconciled by b", WAIT, || fake.get("deployments", NS, "after-crash").map(|_| ())).await;
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_writing_before_the_next_one_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fake = FakeApi::start(Duration::from_millis(20));
    fake.set_latency(Duration::from_millis(1), Duration::from_millis(3));
    apply_all(&fake, &world(1));
    let api_a = fake.listen("a").await;
    let api_b = fake.listen("b").await;
    let _a = Operator::start(dir.path(), api_a, "a", &FAST_LEASE);
    eventually("a leads", WAIT, || holder(&fake).starts_with("a_").then_some(())).await;
    let _b = Operator::start(dir.path(), api_b, "b", &FAST_LEASE);
    eventually("convergence", WAIT, || converged(&fake, 1).then_some(())).await;

    // a's renewals fail from now on; everything else it sends still works.
    fake.add_fault(Box::new(|r: &Request| {
        (r.identity == "a" && r.plural == "leases" && r.method == "PUT").then_some(Fault::Fail(500))
    }));
    // Keep giving the leader work: a new MCPServer every 250 ms.
    let template = world(1)[2].clone();
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut i = 0;
    while Instant::now() < deadline && !holder(&fake).starts_with("b_") {
        apply_all(&fake, &[server(&template, &format!("w-{i:03}"))]);
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(holder(&fake).starts_with("b_"), "b took over");
    for _ in 0..8 {
        apply_all(&fake, &[server(&template, &format!("w-{i:03}"))]);
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let requests = fake.requests();
    let first_b = object_writes(&requests, "b").first().map(|r| r.at).expect("b wrote after taking over");
    let late_a: Vec<_> = object_writes(&requests, "a").into_iter().filter(|r| r.at >= first_b).collect();
    assert!(late_a.is_empty(), "the old leader wrote after the new one's first write: {late_a:#?}");
    let last_a = object_writes(&requests, "a").last().map(|r| r.at).expect("a wrote while leading");
    eprintln!("fencing gap: a's last write {last_a:?}, b's first {first_b:?}");
    // Every server made during the handover is reconciled in the end.
    let made = i;
    eventually("every new server reconciled", WAIT, || {
        (0..made).all(|j| fake.get("deployments", NS, &format!("w-{j:03}")).is_some()).then_some(())
    })
    .await;
}

/// Serves the fake API server for a while, for running the e2e suite
/// against it by hand (not a test of the product):
/// `MCPW_FAKE_KUBECONFIG=/tmp/fake.kubeconfig cargo test --test operator -- --ignored serve_the_fake --nocapture`,
/// then `KUBECONFIG=/tmp/fake.kubeconfig cargo test --test e2e -- --ignored --test-threads=1`.
#[tokio::test]
#[ignore = "a tool: serves the fake API server for a manual e2e run"]
async fn serve_the_fake_api_server_for_e2e() {
    let Ok(path) = std::env::var("MCPW_FAKE_KUBECONFIG") else {
        eprintln!("set MCPW_FAKE_KUBECONFIG to the kubeconfig path to write");
        return;
    };
    let mut fake = FakeApi::start(Duration::from_millis(20));
    fake.set_latency(Duration::from_millis(1), Duration::from_millis(3));
    let addr = fake.listen("e2e").await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(FakeApi::kubeconfig(dir.path(), addr, "e2e"), &path).expect("kubeconfig");
    eprintln!("fake API server at http://{addr}; kubeconfig {path}");
    let minutes = std::env::var("MCPW_FAKE_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(15);
    tokio::time::sleep(Duration::from_secs(60 * minutes)).await;
}
