//! The `mcp-warden` binary as a pipeline runs it: `crd`, `render` and
//! `check` against the committed examples and against broken input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn warden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
        .args(args)
        .current_dir(root())
        .env_remove("MCPW_SIDECAR_IMAGE")
        .env_remove("MCPW_WARDEN_NAMESPACE")
        .output()
        .expect("mcp-warden runs")
}

/// The (only) segment file of a WAL directory.
fn first_segment(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("segment")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {dir}");
    files
}

/// The control an example targets, from its `# fails: <control>` header.
fn targeted_control(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("example");
    text.lines()
        .find_map(|l| l.strip_prefix("# fails: "))
        .unwrap_or_else(|| panic!("{} has no '# fails:' header", path.display()))
        .trim()
        .to_string()
}

fn check_json(path: &str) -> (i32, Value) {
    let out = warden(&["check", "--output", "json", path]);
    let json: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", stdout(&out)));
    (out.status.code().unwrap_or(-1), json)
}

#[test]
fn crd_prints_the_committed_crds() {
    let out = warden(&["crd"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let committed = std::fs::read_to_string(root().join("crds/mcpwarden.io.yaml")).expect("committed CRDs");
    assert_eq!(stdout(&out), committed, "crds/ is stale: cargo run -- crd > crds/mcpwarden.io.yaml");
}

#[test]
fn the_compliant_example_passes_and_strict_fails_on_unknown() {
    let out = warden(&["check", "examples/compliant"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("MCPServer clinic/patient-lookup"), "{text}");
    assert!(text.contains("Compliant: Unknown"), "{text}");
    assert!(!text.contains(" Fail "), "{text}");
    let strict = warden(&["check", "--strict", "examples/compliant"]);
    assert_eq!(strict.status.code(), Some(1), "{}", stdout(&strict));
}

#[test]
fn each_noncompliant_example_fails_exactly_the_control_it_targets() {
    for file in yaml_files("examples/noncompliant") {
        let target = targeted_control(&file);
        let (code, json) = check_json(file.to_str().expect("utf-8 path"));
        assert_eq!(code, 1, "{}: {json:#}", file.display());
        assert_eq!(json["result"], "fail");
        let controls = json["servers"][0]["controls"].as_array().expect("controls");
        let failing: Vec<&str> =
            controls.iter().filter(|c| c["verdict"] == "Fail").map(|c| c["id"].as_str().unwrap_or_default()).collect();
        assert_eq!(failing, [target.as_str()], "{}", file.display());
        let message =
            controls.iter().find(|c| c["id"] == target.as_str()).map(|c| c["message"].to_string()).unwrap_or_default();
        assert!(message.len() > 40, "{}: the message should say what to fix: {message}", file.display());
        assert_eq!(json["servers"][0]["compliant"], "Fail");
    }
}

#[test]
fn no_secret_value_from_an_example_reaches_the_output() {
    let out = warden(&["check", "examples/noncompliant/password-in-env.yaml"]);
    assert!(!stdout(&out).contains("not-a-real-password"));
    let out = warden(&["check", "-o", "json", "examples/noncompliant/password-in-env.yaml"]);
    assert!(!stdout(&out).contains("not-a-real-password"));
}

#[test]
fn invalid_examples_are_refused_naming_file_and_field() {
    let expected = [
        (
            "phi-tool-open-to-anyone.yaml",
            "spec.tools[0].allowedCallers.anyAuthenticated: anyAuthenticated is refused on a PHI tool",
        ),
        ("star-column.yaml", "spec.tools[0].dataAccess[0].tables[0].columns: '*' is refused"),
        ("unknown-field.yaml", "spec.tools[0].allowedCaller: unknown field"),
        ("looping-argument-rule.yaml", "spec.tools[0].argumentRules[0].rule: uses a comprehension"),
        (
            "unnamed-claim-rule.yaml",
            "spec.tools[0].argumentRules[0].rule: reads caller.claims.department, a claim authentication.oidc.ruleClaims does not name",
        ),
    ];
    assert_eq!(yaml_files("examples/invalid").len(), expected.len(), "every invalid example is covered here");
    for (file, needle) in expected {
        let path = format!("examples/invalid/{file}");
        let out = warden(&["check", &path]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(text.contains(&format!("ERROR {path} (document 1)")), "{text}");
        assert!(text.contains(needle), "{text}");
    }
}

#[test]
fn all_examples_at_once() {
    let out = warden(&["check", "examples/compliant", "examples/noncompliant"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let servers = yaml_files("examples/noncompliant").len() + 1;
    assert!(
        text.contains(&format!("{servers} MCPServer(s): 0 compliant, {} failing, 1 unknown", servers - 1)),
        "{text}"
    );
}

#[test]
fn garbage_and_missing_input_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "apiVersion: mcpwarden.io/v1alpha1\nkind: MCPServer\nspec: [unclosed\n").expect("write");
    let out = warden(&["check", garbage.to_str().expect("path")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("garbage.yaml") && text.contains("not valid YAML"), "{text}");

    let not_object = dir.path().join("list.yaml");
    std::fs::write(&not_object, "- just\n- a list\n").expect("write");
    let text = stdout(&warden(&["check", not_object.to_str().expect("path")]));
    assert!(text.contains("list.yaml") && text.contains("apiVersion and kind are required"), "{text}");

    let wrong_version = dir.path().join("v2.yaml");
    std::fs::write(&wrong_version, "apiVersion: mcpwarden.io/v2\nkind: MCPServer\nmetadata: {name: x}\n")
        .expect("write");
    let text = stdout(&warden(&["check", wrong_version.to_str().expect("path")]));
    assert!(text.contains("unsupported version \"mcpwarden.io/v2\""), "{text}");

    let missing = dir.path().join("nope.yaml");
    let out = warden(&["check", missing.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("no such file or directory"));

    let empty = tempfile::tempdir().expect("tempdir");
    let out = warden(&["check", empty.path().to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("no MCPServer found"), "{}", stdout(&out));
}

#[test]
fn duplicates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["a.yaml", "b.yaml"] {
        std::fs::copy(root().join("examples/compliant/clinic.yaml"), dir.path().join(name)).expect("copy");
    }
    let out = warden(&["check", dir.path().to_str().expect("path")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("b.yaml") && text.contains("already declared"), "{text}");
}

#[test]
fn json_output_is_complete() {
    let (code, json) = check_json("examples/compliant");
    assert_eq!(code, 0);
    assert_eq!(json["result"], "pass");
    assert_eq!(json["strict"], false);
    let server = &json["servers"][0];
    assert_eq!(server["namespace"], "clinic");
    assert_eq!(server["name"], "patient-lookup");
    assert_eq!(server["origin"]["file"], "examples/compliant/clinic.yaml");
    assert_eq!(server["controls"].as_array().map(Vec::len), Some(10));
    assert_eq!(server["counts"]["phiTools"], 1);
    assert_eq!(server["counts"]["tools"], 2);
    for c in server["controls"].as_array().into_iter().flatten() {
        assert!(c["citation"].as_str().is_some_and(|s| s.starts_with("45 CFR")));
        assert!(["Pass", "Fail", "Unknown"].contains(&c["verdict"].as_str().unwrap_or_default()));
    }
}

#[test]
fn render_prints_every_owned_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).expect("write");
    let out = warden(&[
        "render",
        "-f",
        "examples/compliant",
        "--jwks-file",
        jwks.to_str().expect("path"),
        "--sidecar-image",
        "registry.example/mcp-warden:test",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&stdout(&out))
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect();
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| (d["kind"].as_str().unwrap_or_default(), d["metadata"]["name"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("ServiceAccount", "patient-lookup-mcpw"),
            ("ConfigMap", "patient-lookup-policy"),
            ("ConfigMap", "patient-lookup-jwks"),
            ("NetworkPolicy", "patient-lookup-ingress"),
            ("NetworkPolicy", "patient-lookup-egress"),
            ("Service", "patient-lookup"),
            ("Deployment", "patient-lookup"),
        ]
    );
    assert_eq!(docs[2]["data"]["jwks.json"], r#"{"keys":[]}"#);
    assert_eq!(docs[6]["spec"]["template"]["spec"]["initContainers"][0]["image"], "registry.example/mcp-warden:test");
}

#[test]
fn render_refuses_what_it_cannot_render_whole() {
    let out = warden(&["render", "-f", "examples/noncompliant/missing-phistore.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).is_empty(), "nothing partial is printed");
    assert!(stderr(&out).contains(r#"uses PHIStore "ehr", which does not exist"#), "{}", stderr(&out));
    let out = warden(&["render", "-f", "examples/invalid/star-column.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("'*' is refused"));
}

#[test]
fn audit_verify_passes_an_intact_trail_and_names_the_first_break() {
    use mcp_warden::audit::record::{Event, Kind};
    use mcp_warden::audit::{Wal, WalConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig::new(dir.path(), "clinic/patient-lookup")).expect("open");
    for n in 0..5 {
        let event = Event {
            lease: Some(mcp_warden::audit::record::Lease {
                id: format!("l-{n}"),
                action: mcp_warden::audit::record::LeaseAction::Issued,
                role: None,
                valid_until: None,
            }),
            ..Event::new(Kind::Lease)
        };
        wal.append_blocking(event).expect("append");
    }
    wal.close_blocking().expect("close");
    let path = dir.path().to_str().expect("path");

    let out = warden(&["audit", "verify", "--sealed", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("PASS: 1 stream(s), 7 record(s) verified"), "{}", stdout(&out));
    assert!(stdout(&out).contains("sealed"));

    // Change one character of record 4.
    let segment = first_segment(dir.path());
    let text = std::fs::read_to_string(&segment).expect("read");
    std::fs::write(&segment, text.replacen("l-2", "l-9", 1)).expect("tamper");
    let out = warden(&["audit", "verify", path]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("line 4 (expected seq 4): record hash does not match its contents"), "{text}");

    let out = warden(&["audit", "verify", "-o", "json", path]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["result"], "FAIL");
    assert_eq!(json["streams"][0]["break"]["expected_seq"], 4);
    assert_eq!(json["streams"][0]["records"], 3);

    let out = warden(&["audit", "verify", dir.path().join("missing").to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn the_rendered_sidecar_arguments_are_the_sidecars_own_flags() {
    let out = warden(&[
        "render",
        "-f",
        "examples/compliant",
        "--broker-url",
        "https://mcpw-broker.mcp-warden.svc:8443",
        "--collector-url",
        "https://mcpw-collector.mcp-warden.svc:8443",
    ]);
    assert!(out.status.success());
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&stdout(&out))
        .map(|d| serde::Deserialize::deserialize(d).expect("doc"))
        .collect();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("deployment");
    let sidecar = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().expect("a list").iter().map(|a| a.as_str().expect("string").to_string()).collect()
    };
    // The image's sidecar-only binary, which this build makes too.
    assert_eq!(strings(&sidecar["command"]), ["/usr/local/bin/mcp-warden-sidecar"]);
    let args = strings(&sidecar["args"]);
    // clap rejects an unknown flag before it gets to --help.
    let parsed = Command::new(env!("CARGO_BIN_EXE_mcp-warden-sidecar"))
        .args(&args)
        .arg("--help")
        .output()
        .expect("mcp-warden-sidecar runs");
    assert!(parsed.status.success(), "{}", stderr(&parsed));
    // The same flags as `mcp-warden sidecar`.
    let mut as_subcommand = vec!["sidecar"];
    as_subcommand.extend(args.iter().map(String::as_str));
    as_subcommand.push("--help");
    let parsed = warden(&as_subcommand);
    assert!(parsed.status.success(), "{}", stderr(&parsed));
    for flag in
        ["--broker", "--broker-credential-file", "--db-proxy-listen", "--collector", "--collector-credential-file"]
    {
        assert!(args.iter().any(|a| a == flag), "{flag} missing from {args:?}");
    }
}

#[test]
fn the_broker_refuses_unsafe_or_incomplete_settings_before_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit");
    let audit = audit.to_str().expect("utf8");
    let examples = root().join("examples/compliant");
    let examples = examples.to_str().expect("utf8");
    let long = "x".repeat(40);
    // Plain HTTP off loopback: it returns credentials.
    let out = warden(&[
        "broker",
        "--manifests",
        examples,
        "--listen",
        "0.0.0.0:0",
        "--sidecar-credential",
        &long,
        "--audit-dir",
        audit,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-cert-file"), "{}", stderr(&out));
    // A short static credential.
    let out = warden(&[
        "broker",
        "--manifests",
        examples,
        "--listen",
        "127.0.0.1:0",
        "--sidecar-credential",
        "short",
        "--audit-dir",
        audit,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("at least 32 bytes"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("short\""), "the credential is not echoed: {}", stderr(&out));
    // --manifests without a sidecar credential.
    let out = warden(&["broker", "--manifests", examples, "--listen", "127.0.0.1:0", "--audit-dir", audit]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--sidecar-credential"), "{}", stderr(&out));
    // A static credential in cluster mode means nothing and is refused.
    let out = warden(&["broker", "--listen", "127.0.0.1:0", "--sidecar-credential", &long, "--audit-dir", audit]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("service-account tokens"), "{}", stderr(&out));
    // Invalid manifests are named.
    let bad = root().join("examples/invalid");
    let out = warden(&[
        "broker",
        "--manifests",
        bad.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
        "--sidecar-credential",
        &long,
        "--audit-dir",
        audit,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid manifests"), "{}", stderr(&out));
}

#[test]
fn audit_query_answers_who_touched_what_and_says_what_it_could_not_read() {
    use mcp_warden::audit::record::{Caller, Decision, Event, Kind, Outcome, OutcomeStatus};
    use mcp_warden::audit::{Wal, WalConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(WalConfig::new(dir.path(), "clinic/patient-lookup")).expect("open");
    let call = |sub: &str, tool: &str, phi: bool, decision: Decision, correlation: &str| {
        let mut e = Event::new(Kind::Decision);
        e.caller = Some(Caller { sub: sub.into(), iss: "https://login.example.org".into(), groups: vec![] });
        e.method = Some("tools/call".into());
        e.tool = Some(tool.into());
        e.phi = Some(phi);
        e.decision = Some(decision);
        e.reason = (decision != Decision::Allow).then(|| "not in allowedCallers".to_string());
        e.correlation = Some(correlation.into());
        e
    };
    let done = |correlation: &str| {
        let mut e = Event::new(Kind::Outcome);
        e.correlation = Some(correlation.into());
        e.outcome = Some(Outcome { status: OutcomeStatus::Ok, http_status: Some(200), rpc_error: None, rows: None });
        e
    };
    for event in [
        call("alice", "lookup_patient", true, Decision::Allow, "c1"),
        done("c1"),
        call("bob", "lookup_patient", true, Decision::Deny, "c2"),
        call("alice", "clinic_hours", false, Decision::Allow, "c3"),
        done("c3"),
    ] {
        wal.append_blocking(event).expect("append");
    }
    wal.close_blocking().expect("close");
    let path = dir.path().to_str().expect("path");

    let out = warden(&["audit", "query", path, "--caller", "alice", "--phi", "--since", "1h"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("lookup_patient") && text.contains("ok 200") && text.contains("1 record(s)"), "{text}");
    assert!(!text.contains("clinic_hours"), "{text}");

    let out = warden(&["audit", "query", path, "--decision", "deny", "-o", "json"]);
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["event"]["caller"]["sub"], "bob");

    let out = warden(&["audit", "query", path, "--since", "last week"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--since"), "{}", stderr(&out));

    // A damaged line is named, the rest still answered, and the exit says so.
    let segment = first_segment(dir.path());
    let text = std::fs::read_to_string(&segment).expect("read");
    std::fs::write(&segment, text.replacen("\"bob\"", "\"eve\"", 1)).expect("tamper");
    let out = warden(&["audit", "query", path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 4") && stderr(&out).contains("audit verify"), "{}", stderr(&out));
    assert!(stdout(&out).contains("alice"));
}

#[test]
fn reidentify_needs_its_arguments_and_says_when_the_broker_cannot_be_asked() {
    let base = ["reidentify", "pt_0a1b2c3d4e5f60718293", "--store", "clinic/ehr", "--broker", "http://127.0.0.1:1"];
    let missing_reason = warden(&[&base[..], &["--credential-file", "Cargo.toml"]].concat());
    assert_eq!(missing_reason.status.code(), Some(2), "{}", stderr(&missing_reason));
    assert!(stderr(&missing_reason).contains("--reason"));
    let no_file = warden(&[&base[..], &["--reason", "INC-1", "--credential-file", "/nonexistent/cred"]].concat());
    assert_eq!(no_file.status.code(), Some(2));
    assert!(stderr(&no_file).contains("/nonexistent/cred"), "{}", stderr(&no_file));
    let unreachable = warden(&[&base[..], &["--reason", "INC-1", "--credential-file", "Cargo.toml"]].concat());
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(stderr(&unreachable).contains("could not be asked"), "{}", stderr(&unreachable));
    assert!(!stderr(&unreachable).contains("[package]"), "the credential stays out of messages");
}

#[test]
fn check_refuses_an_emergency_grant_its_procedure_would_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clinic = std::fs::read_to_string(root().join("examples/compliant/clinic.yaml")).expect("example");
    let procedure = "  emergencyAccess:\n    approvers: {users: [\"oidc:dr-house\"]}\n    maxDuration: 2h\n    tools: [lookup_patient]\n    kubernetesUsernamePrefix: \"oidc:\"\n";
    let with_procedure =
        clinic.replacen("  credentials: {ttl: 15m}\n", &format!("  credentials: {{ttl: 15m}}\n{procedure}"), 1);
    assert_ne!(with_procedure, clinic, "the example changed shape");
    let grant = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: mcpwarden.io/v1alpha1\nkind: EmergencyAccess\nmetadata: {{name: {name}, namespace: clinic}}\nspec:\n  server: patient-lookup\n  requester: \"oidc:nurse-joy\"\n  beneficiary: er-agent\n  tools: [lookup_patient]\n  reason: unconscious patient\n{extra}"
        )
    };
    let path = dir.path().join("clinic.yaml");
    std::fs::write(&path, format!("{with_procedure}{}", grant("er-1", "  duration: 1h\n"))).expect("write");
    let ok = warden(&["check", path.to_str().expect("utf-8")]);
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    let bad = format!(
        "{with_procedure}{}{}",
        grant("too-long", "  duration: 3h\n"),
        grant("self-approved", "  duration: 1h\n  approval: {approver: \"oidc:nurse-joy\"}\n")
    );
    std::fs::write(&path, bad).expect("write");
    let out = warden(&["check", path.to_str().expect("utf-8")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("EmergencyAccess clinic/too-long") && text.contains("exceeds the procedure's maxDuration"),
        "{text}"
    );
    assert!(text.contains("EmergencyAccess clinic/self-approved") && text.contains("self-approval"), "{text}");
}
