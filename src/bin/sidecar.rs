//! `mcp-warden-sidecar`: the auditing gateway alone, with the flags of
//! `mcp-warden sidecar`. The pod runs this binary: it links only the
//! sidecar's code, so far fewer executable pages are resident in every
//! server pod than with the one binary that holds every subcommand.

use clap::Parser;

/// The auditing gateway in front of one MCP server.
#[derive(Debug, Parser)]
#[command(name = "mcp-warden-sidecar", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    args: mcp_warden::sidecar::SidecarArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    mcp_warden::sidecar::serve(cli.args)
}
