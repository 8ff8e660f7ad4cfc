//! The `mcp-warden` binary: every subcommand is in the library.

fn main() -> std::process::ExitCode {
    mcp_warden::cli::main()
}
