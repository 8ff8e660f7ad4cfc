//! A reference MCP server whose PHI tools query PostgreSQL through the
//! per-call DSN the mcp-warden sidecar gives each `tools/call` (see
//! `tools.rs` and docs/db-proxy.md). Run it behind the sidecar:
//!
//! ```text
//! cargo run --example phi-server -- --listen 127.0.0.1:8080 --store ehr --views deid_patient_lookup
//! ```

mod tools;

use std::sync::Arc;

use clap::Parser;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

#[derive(Parser)]
struct Args {
    /// Where to serve MCP (Streamable HTTP at /mcp). Only the sidecar, in
    /// the same pod, should reach it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// The PHIStore the tools read (the key in `_meta["io.mcpwarden/db"]`).
    #[arg(long, default_value = "ehr")]
    store: String,
    /// The schema of the server's de-identified views: `deid_` and its
    /// pseudonym scope (by default the MCPServer's name, `-` as `_`).
    #[arg(long, default_value = "deid_patient_lookup")]
    views: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (store, views) = (args.store.clone(), args.views.clone());
    let service = StreamableHttpService::new(
        move || Ok(tools::PhiTools { store: store.clone(), views: views.clone() }),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("phi-server: MCP at http://{}/mcp, store {}", listener.local_addr()?, args.store);
    // Nagle off: a streamed (SSE) answer must not wait for the client's
    // delayed ACK, 40 ms on Linux, on every call.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, axum::Router::new().nest_service("/mcp", service)).await?;
    Ok(())
}
