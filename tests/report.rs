//! `mcp-warden report` over a trail written by the real WAL: its numbers
//! are those `audit query` answers over the same records, the same input
//! gives the same bytes (and the printed SHA-256 is theirs), evidence text
//! is escaped, the HTML is well formed with its chart, and a headless
//! browser renders it to a page that is not blank.

use std::path::{Path, PathBuf};
use std::process::Command;

use mcp_warden::audit::record::{Caller, ControlVerdict, Decision, Event, Kind, Outcome, OutcomeStatus};
use mcp_warden::audit::wal::{Wal, WalConfig};
use mcp_warden::report::{Inputs, build};
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-warden");

fn caller(sub: &str) -> Option<Caller> {
    Some(Caller { sub: sub.into(), iss: "https://login.example.org".into(), groups: vec![] })
}

fn decision(sub: Option<&str>, tool: &str, phi: bool, decision: Decision, reason: Option<&str>) -> Event {
    Event {
        correlation: Some(uuid::Uuid::new_v4().simple().to_string()),
        caller: sub.and_then(caller),
        method: Some("tools/call".into()),
        tool: Some(tool.into()),
        phi: Some(phi),
        decision: Some(decision),
        reason: reason.map(String::from),
        ..Event::new(Kind::Decision)
    }
}

/// A sealed stream of a clinic's day: dana's PHI calls, bob's refusals,
/// an unauthenticated probe, a call under a grant, a hostile subject.
fn write_trail(dir: &Path) {
    let wal = Wal::open(WalConfig::new(dir.join("clinic/patient-lookup/p-1"), "clinic/patient-lookup")).unwrap();
    let mut events = Vec::new();
    for _ in 0..3 {
        let d = decision(Some("dana"), "lookup_patient", true, Decision::Allow, None);
        let outcome = Event {
            correlation: d.correlation.clone(),
            caller: d.caller.clone(),
            tool: d.tool.clone(),
            phi: Some(true),
            outcome: Some(Outcome { status: OutcomeStatus::Ok, http_status: Some(200), rpc_error: None, rows: None }),
            ..Event::new(Kind::Outcome)
        };
        events.extend([d, outcome]);
    }
    events.push(decision(Some("dana"), "clinic_hours", false, Decision::Allow, None));
    for _ in 0..2 {
        events.push(decision(Some("bob"), "lookup_patient", true, Decision::Deny, Some("tool not allowed for caller")));
    }
    let mut probe = decision(None, "lookup_patient", true, Decision::AuthnFailure, Some("invalid token: expired"));
    probe.tool = None;
    probe.phi = None;
    events.push(probe);
    let mut grant = decision(Some("erin"), "lookup_patient", true, Decision::Allow, None);
    grant.emergency_access = Some("ea-erin-1".into());
    events.push(grant);
    events.push(decision(Some("<img src=x onerror=alert(1)>"), "lookup_patient", true, Decision::Deny, Some("x")));
    for event in events {
        wal.append_blocking(event).unwrap();
    }
    wal.close_blocking().unwrap();
}

/// How many distinct records `audit query` answers with these flags, not
/// counting the outcomes it joins to the decisions it selected (unless
/// outcomes are asked for).
fn query_count(dir: &Path, flags: &[&str]) -> usize {
    let out = Command::new(BIN).args(["audit", "query"]).arg(dir).args(flags).args(["-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let outcomes_asked = flags.windows(2).any(|w| w == ["--kind", "outcome"]);
    let mut seen = std::collections::BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if record["event"]["kind"] == "outcome" && !outcomes_asked {
            continue;
        }
        seen.insert((record["stream"].to_string(), record["seq"].to_string()));
    }
    seen.len()
}

#[test]
fn the_numbers_are_those_of_audit_query_over_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    write_trail(dir.path());
    let report = build(&Inputs { storage: dir.path().to_path_buf(), ..Default::default() });
    assert!(report.trail.passed, "{:?}", report.trail);
    assert!(!report.phi_access.is_empty());
    for access in &report.phi_access {
        let base = ["--caller", access.caller.as_str(), "--tool", access.tool.as_str(), "--phi"];
        let allowed = query_count(dir.path(), &[&base[..], &["--decision", "allow"]].concat());
        let refused = query_count(dir.path(), &[&base[..], &["--decision", "deny"]].concat())
            + query_count(dir.path(), &[&base[..], &["--decision", "authn-failure"]].concat());
        assert_eq!((access.allowed, access.refused), (allowed, refused), "{access:?}");
    }
    let dana = report.phi_access.iter().find(|a| a.caller == "dana").unwrap();
    assert_eq!((dana.tool.as_str(), dana.allowed, dana.refused), ("lookup_patient", 3, 0));
    let denies: usize = report.refusals.iter().filter(|r| r.decision == "deny").map(|r| r.count).sum();
    assert_eq!(denies, query_count(dir.path(), &["--decision", "deny"]));
    let failures: usize = report.refusals.iter().filter(|r| r.decision == "authn-failure").map(|r| r.count).sum();
    assert_eq!(failures, query_count(dir.path(), &["--decision", "authn-failure"]));
    let day_total: usize = report.days.iter().map(|d| d.allowed + d.refused).sum();
    assert_eq!(day_total, query_count(dir.path(), &["--phi", "--kind", "decision"]));
    assert_eq!(report.emergency.len(), 1);
    let grant = &report.emergency[0];
    assert_eq!((grant.grant.as_str(), grant.callers.as_slice()), ("ea-erin-1", &["erin".to_string()][..]));
    assert_eq!(
        grant.records,
        query_count(
            dir.path(),
            &[
                "--emergency",
                "ea-erin-1",
                "--kind",
                "decision",
                "--kind",
                "outcome",
                "--kind",
                "lease",
                "--kind",
                "statement"
            ]
        )
    );
    // No key, no manifests: said, not glossed over.
    assert!(report.limits.iter().any(|l| l.contains("No checkpoint key")));
    assert!(report.limits.iter().any(|l| l.contains("No manifests")));
}

fn verdict(id: &str, verdict: &str) -> Event {
    Event {
        control: Some(ControlVerdict {
            id: id.into(),
            citation: "45 CFR 164.312(c)(1)".into(),
            verdict: verdict.into(),
            message: format!("{id} is {verdict}"),
        }),
        ..Event::new(Kind::Verdict)
    }
}

#[test]
fn control_history_comes_from_the_operators_verdict_records() {
    let dir = tempfile::tempdir().unwrap();
    write_trail(dir.path());
    // The operator's stream of the same server: integrity Unknown, then
    // (inside the period) Fail, then Pass; audit-controls Pass throughout.
    let mut config = WalConfig::new(dir.path().join("clinic/patient-lookup/operator-0"), "clinic/patient-lookup");
    config.pod = Some("operator-0".into());
    let wal = Wal::open(config).unwrap();
    wal.append_blocking(verdict("integrity", "Unknown")).unwrap();
    wal.append_blocking(verdict("audit-controls", "Pass")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let since = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(20));
    wal.append_blocking(verdict("integrity", "Fail")).unwrap();
    wal.append_blocking(verdict("integrity", "Pass")).unwrap();
    wal.close_blocking().unwrap();

    // No manifests: the server and its controls come from the trail.
    let report = build(&Inputs { storage: dir.path().to_path_buf(), since: Some(since), ..Default::default() });
    assert_eq!(report.servers.len(), 1);
    let server = &report.servers[0];
    assert_eq!(server.server, "clinic/patient-lookup");
    assert!(server.assessed.contains("recorded in the trail"), "{}", server.assessed);
    let integrity = server.controls.iter().find(|c| c.id == "integrity").unwrap();
    assert_eq!(integrity.verdict, mcp_warden::api::Verdict::Pass, "the latest recorded verdict");
    let history = server.history.iter().find(|h| h.id == "integrity").unwrap();
    assert_eq!(history.at_start.as_deref(), Some("Unknown"));
    let changes: Vec<&str> = history.changes.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(changes, ["Fail", "Pass"]);
    let steady = server.history.iter().find(|h| h.id == "audit-controls").unwrap();
    assert_eq!((steady.at_start.as_deref(), steady.changes.len()), (Some("Pass"), 0));
    // The same records `audit query --kind verdict` answers.
    let recorded: usize = server.history.iter().map(|h| h.changes.len()).sum();
    let rfc = since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(recorded, query_count(dir.path(), &["--kind", "verdict", "--since", &rfc]));

    // With the manifests, the controls are assessed from them and the
    // history from the trail sits beside them in the page.
    let html = dir.path().join("r.html");
    let out = Command::new(BIN)
        .arg("report")
        .arg(dir.path())
        .args(["--manifests", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/compliant"), "--since", &rfc, "-o"])
        .arg(&html)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("Unknown at the start; Fail from "), "{page}");
}

fn report_html(dir: &Path, out: &Path) -> (String, String) {
    let output = Command::new(BIN)
        .arg("report")
        .arg(dir)
        .args(["--manifests", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/compliant"), "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    (std::fs::read_to_string(out).unwrap(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Tags balance (void elements aside): a cheap well-formedness check.
fn assert_balanced(html: &str) {
    let void = ["meta", "br", "hr", "img", "input", "link"];
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("a tag ends") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        let name: String = tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        if tag.starts_with('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.as_str()), "unbalanced </{name}>");
        } else if !tag.ends_with('/') && !void.contains(&name.as_str()) {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

#[test]
fn the_html_is_deterministic_escaped_well_formed_and_hashed() {
    let dir = tempfile::tempdir().unwrap();
    write_trail(dir.path());
    let (first, said) = report_html(dir.path(), &dir.path().join("a.html"));
    let (second, _) = report_html(dir.path(), &dir.path().join("b.html"));
    assert_eq!(first, second, "the same evidence gives the same bytes");
    let digest = hex::encode(sha2::Sha256::digest(first.as_bytes()));
    assert!(said.contains(&digest), "{said}");
    assert!(first.starts_with("<!DOCTYPE html>"));
    assert_balanced(&first);
    assert!(first.contains("<svg") && first.contains(r#"class="allowed""#));
    assert!(!first.contains("<img src=x"), "evidence text is escaped");
    assert!(first.contains("&lt;img src=x onerror=alert(1)&gt;"));
    for fetch in ["<script", "src=\"", "href=", "url(", "@import", "<link"] {
        assert!(!first.contains(fetch), "{fetch}: no script, no external asset");
    }
    // The controls of the example, with their citations.
    assert!(first.contains("clinic/patient-lookup") && first.contains("45 CFR 164.312(b)"));
    assert!(first.contains("emergency") && first.contains("ea-erin-1"));
}

/// Debian's Chromium, when installed (.ci/run installs it and sets
/// MCPW_REQUIRE_CHROMIUM, so CI never skips this).
fn chromium() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/chromium");
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("MCPW_REQUIRE_CHROMIUM").is_none(),
        "MCPW_REQUIRE_CHROMIUM is set but /usr/bin/chromium is missing"
    );
    eprintln!("SKIP: /usr/bin/chromium is not installed (apt-get install chromium; .ci/run does)");
    None
}

#[test]
fn a_headless_browser_renders_the_report_to_a_page_that_is_not_blank() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_trail(&dir.path().join("trail"));
    let html = dir.path().join("report.html");
    report_html(&dir.path().join("trail"), &html);
    let png = dir.path().join("report.png");
    let profile = dir.path().join("profile");
    let mut command = Command::new(browser);
    if unsafe { libc::geteuid() } == 0 {
        command.arg("--no-sandbox");
    }
    let out = command
        .args(["--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1000,4000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(png.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let bytes = &pixels[..info.buffer_size()];
    let channels = info.color_type.samples();
    let (mut dark, mut blue, total) = (0usize, 0usize, bytes.len() / channels);
    for px in bytes.chunks(channels) {
        let (r, g, b) = (px[0] as u32, px[1] as u32, px[2] as u32);
        if r + g + b < 200 {
            dark += 1; // text
        }
        if b > 150 && r < 80 {
            blue += 1; // the chart's bars
        }
    }
    assert!((info.width, info.height) == (1000, 4000), "{}x{}", info.width, info.height);
    assert!(dark * 200 > total, "almost no text on the page: {dark} of {total} pixels dark");
    assert!(blue > 50, "no chart bars on the page ({blue} blue pixels)");
}
