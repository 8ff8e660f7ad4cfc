//! `mcp-warden demo`, as a newcomer runs it: every scene plays, every
//! assertion holds, and nothing is left behind — no process, no temp dir.
#![cfg(feature = "demo")]

use std::path::PathBuf;
use std::process::Command;

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(text);
            }
        }
    }
    found
}

#[test]
fn the_demo_plays_every_scene_and_leaves_nothing_behind() {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-warden")).arg("demo").output().expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed ({:?}):\n{stdout}\n{stderr}", out.status);
    for heading in [
        "1. The front desk sees exactly its tools",
        "2. A PHI call is answered, with pseudonyms",
        "3. Another caller is refused",
        "4. During a call, the database sees a role issued for that caller and tool",
        "5. A compromised server's escapes are refused",
        "6. The trail outside the pod verifies",
        "7. The auditor's four questions",
        "8. Break-glass",
        "9. The shift ends",
        "10. The auditor's report",
    ] {
        assert!(stdout.contains(heading), "no scene {heading:?}:\n{stdout}");
    }
    assert!(stdout.contains(" held, 0 failed"), "{stdout}");
    assert!(!stdout.contains('✗'), "{stdout}");
    // The scene that cannot be played is said to be missing, not faked.
    assert!(stdout.contains(
        "Break-glass: an approved emergency grant opens a tool for one caller, for a bounded time — not yet"
    ));
    // No secret on the screen: the transcript names files, not tokens.
    assert!(!stdout.contains("eyJ"), "a token in the transcript:\n{stdout}");

    let dir: PathBuf = stdout
        .split_whitespace()
        .find_map(|w| w.find("/mcpw-demo-").map(|_| w))
        .map(|w| PathBuf::from(w.split("/collector").next().unwrap()))
        .expect("the transcript names the demo's directory");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    let left = processes_mentioning(dir.to_str().unwrap());
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn without_postgresql_the_demo_says_what_to_install() {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
        .arg("demo")
        .env("MCPW_PG_BIN", "/nonexistent/postgresql/bin")
        .output()
        .expect("run the demo");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apt-get install postgresql"), "{stderr}");
}
