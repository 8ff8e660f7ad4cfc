//! `mcp-warden demo`: the whole data path on a laptop, played as scenes.
//!
//! ```text
//!   demo ── stack ── PostgreSQL (private cluster, the clinic)      local_postgres
//!     │       ├───── OIDC issuer, MCP server (in process)          issuer, server
//!     │       └───── collector, broker, sidecar (this binary's subcommands)
//!     ├── scenes ── each: heading, evidence, assertions             scenes, show
//!     └── --keep ── leaves it running, prints commands to explore it
//! ```
//!
//! Exit 0 only when every assertion held; 1 when one did not; 2 when the
//! demo could not start (e.g. no PostgreSQL server binaries).

pub mod clinic;
pub mod issuer;
mod scenes;
pub mod server;
pub mod show;
pub mod stack;

use std::process::ExitCode;
use std::time::Instant;

use show::Show;
use stack::Stack;

/// Flags of `mcp-warden demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Leave everything running after the scenes, print the commands to
    /// explore it (curl with a token, psql, audit query), stop on Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the demo; stops every part on return, Ctrl-C or SIGTERM.
pub async fn run(args: DemoArgs) -> ExitCode {
    let started = Instant::now();
    let played = tokio::select! {
        played = play(!args.keep) => played,
        _ = crate::health::shutdown_signal() => {
            println!("\ninterrupted: stopping every part");
            return ExitCode::from(130);
        }
    };
    let (stack, show) = match played {
        Ok(played) => played,
        Err(e) => {
            eprintln!("mcp-warden demo: cannot start: {e:#}");
            return ExitCode::from(2);
        }
    };
    println!(
        "\n{} assertions held, {} failed; {:.1} s",
        show.held,
        show.failures.len(),
        started.elapsed().as_secs_f32()
    );
    for failure in &show.failures {
        println!("   ✗ {failure}");
    }
    if args.keep {
        explore(&stack);
        crate::health::shutdown_signal().await;
        println!("stopping every part");
    }
    drop(stack);
    if show.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Starts the stack and plays the scenes (with `finish`, the shift's end).
async fn play(finish: bool) -> anyhow::Result<(Stack, Show)> {
    let started = Instant::now();
    let show = Show::default();
    println!("mcp-warden demo: a clinic's MCP server behind the sidecar, on this machine");
    let starting = Stack::start(|part| {
        if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            println!("   starting {part}");
        }
    });
    let mut stack = show.waiting("starting", starting).await?;
    println!(
        "   PostgreSQL on 127.0.0.1:{}, the sidecar at {}, the broker, the audit collector, an OIDC issuer and an rmcp server; up in {:.1} s",
        stack.at.pg_port,
        stack.at.mcp,
        started.elapsed().as_secs_f32()
    );
    let mut demo = scenes::Demo::new(&mut stack, show);
    demo.play(finish).await;
    let show = demo.into_show();
    Ok((stack, show))
}

/// `--keep`: how to look around.
fn explore(stack: &Stack) {
    let dir = stack.dir.path();
    let mut tokens = Vec::new();
    for (sub, groups) in scenes::CALLERS {
        let file = dir.join(format!("{sub}.token"));
        if let Ok(token) = stack.issuer.token(sub, groups) {
            let _ = std::fs::write(&file, token);
            tokens.push(format!("{} ({})", file.display(), groups.join(",")));
        }
    }
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "mcp-warden".into());
    println!("\nStill running (Ctrl-C stops everything and removes {}):", dir.display());
    println!("  tokens (1 h): {}", tokens.join(", "));
    println!(
        "  curl -s {mcp} -H \"Authorization: Bearer $(cat {dir}/dana.token)\" \\\n    -H 'Accept: application/json, text/event-stream' -H 'Content-Type: application/json' \\\n    -H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' -H 'Mcp-Name: clinician_patients' \\\n    -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"clinician_patients\",\"arguments\":{{\"clinician\":\"dr-okafor\"}},\"_meta\":{{\"io.modelcontextprotocol/protocolVersion\":\"2026-07-28\",\"io.modelcontextprotocol/clientCapabilities\":{{}}}}}}}}'",
        mcp = stack.at.mcp,
        dir = dir.display()
    );
    // The superuser's password goes into a pgpass file, not onto the screen.
    let pgpass = dir.join("pgpass");
    let line = format!("127.0.0.1:{}:*:postgres:{}\n", stack.at.pg_port, crate::local_postgres::SUPERUSER_PASSWORD);
    let written = {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&pgpass)
            .and_then(|mut f| f.write_all(line.as_bytes()))
    };
    if written.is_ok() {
        println!(
            "  PGPASSFILE={} psql -h 127.0.0.1 -p {} -U postgres ehr -c \"SELECT usename, state, query FROM pg_stat_activity WHERE usename LIKE 'mcpw%'\"",
            pgpass.display(),
            stack.at.pg_port
        );
    }
    println!("  {exe} audit query {} --phi", stack.storage().display());
    println!("  {exe} audit verify {} --checkpoint-key {}", stack.storage().display(), stack.checkpoint_key);
    println!("  {exe} check {}", stack.server_manifest().display());
    println!("  the auditor's report: {}", stack.report_file().display());
    println!(
        "  logs: {}, {}, {}",
        stack.sidecar.log_path().display(),
        stack.broker.log_path().display(),
        stack.collector.log_path().display()
    );
}
