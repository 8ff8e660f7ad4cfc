//! The sidecar between real MCP peers from the official Rust SDK (`rmcp`):
//! an rmcp Streamable HTTP server behind it, rmcp clients in front, over
//! both transport generations (2025-11-25 with sessions, 2026-07-28
//! stateless with mirrored headers).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use mcp_warden::audit::record::{Decision, Kind, Record};
use mcp_warden::audit::segment;
use mcp_warden::audit::verify::{VerifyOptions, verify_dir};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{
    ClientLifecycleMode, ClientServiceExt, ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router,
};
use tokio_util::sync::CancellationToken;

/// What reached the MCP server.
type Calls = Arc<Mutex<Vec<String>>>;

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct Lookup {
    /// Medical record number.
    mrn: String,
}

#[derive(Clone)]
struct ClinicTools {
    calls: Calls,
}

#[tool_router]
impl ClinicTools {
    #[tool(description = "Look up a patient by MRN")]
    fn lookup_patient(&self, Parameters(Lookup { mrn }): Parameters<Lookup>) -> String {
        self.calls.lock().expect("calls").push("lookup_patient".into());
        format!("patient {mrn}")
    }

    #[tool(description = "Opening hours")]
    fn clinic_hours(&self) -> String {
        self.calls.lock().expect("calls").push("clinic_hours".into());
        "08:00-17:00".into()
    }

    #[tool(description = "Not declared in the MCPServer: nobody may see or call it")]
    fn undeclared_admin(&self) -> String {
        self.calls.lock().expect("calls").push("undeclared_admin".into());
        "admin".into()
    }
}

#[tool_handler]
impl ServerHandler for ClinicTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

async fn mcp_server(calls: Calls, ct: &CancellationToken) -> String {
    let service = StreamableHttpService::new(
        move || Ok(ClinicTools { calls: Arc::clone(&calls) }),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None).with_cancellation_token(ct.child_token()),
    );
    let url = serve(axum::Router::new().nest_service("/mcp", service)).await;
    format!("{url}/mcp")
}

/// rmcp's client transport to the sidecar, presenting `token`.
fn config(gateway: &str, token: &str) -> StreamableHttpClientTransportConfig {
    StreamableHttpClientTransportConfig::with_uri(format!("{gateway}/mcp")).auth_header(token.to_string())
}

fn records(dir: &std::path::Path) -> Vec<Record> {
    segment::list_segments(dir)
        .expect("segments")
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).expect("lines"))
        .map(|l| Record::parse_line(&l.bytes).expect("record"))
        .collect()
}

async fn tool_names(client: &rmcp::service::RunningService<rmcp::RoleClient, impl rmcp::ClientHandler>) -> Vec<String> {
    let mut names: Vec<String> =
        client.list_all_tools().await.expect("tools/list").into_iter().map(|t| t.name.to_string()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn rmcp_clients_through_the_sidecar_on_both_transport_generations() {
    // rmcp's reqwest is built without a provider of its own (one provider,
    // ring, in the whole build).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ct = CancellationToken::new();
    let calls: Calls = Arc::default();
    let upstream = mcp_server(Arc::clone(&calls), &ct).await;
    let harness = start_gateway(&upstream, 64 * 1024 * 1024).await;
    let front_desk = rs256(&claims("alice", &["front-desk"]));
    let billing = es256(&claims("bob", &["billing"]));

    // 2025-11-25: initialize, a session bound to its caller.
    let alice =
        ().serve(StreamableHttpClientTransport::from_config(config(&harness.url, &front_desk)))
            .await
            .expect("initialize through the sidecar");
    assert_eq!(tool_names(&alice).await, ["clinic_hours", "lookup_patient"]);
    let result = alice
        .call_tool(
            CallToolRequestParams::new("lookup_patient")
                .with_arguments(serde_json::json!({"mrn": "12345678"}).as_object().cloned().expect("object")),
        )
        .await
        .expect("allowed call");
    assert!(format!("{result:?}").contains("patient 12345678"));
    alice.cancel().await.expect("close");

    // 2026-07-28: stateless, Mcp-Method / Mcp-Name checked against the body.
    let bob = ()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_config(config(&harness.url, &billing)),
            ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] },
        )
        .await
        .expect("discover through the sidecar");
    assert_eq!(tool_names(&bob).await, ["clinic_hours"]);
    let hidden = bob.call_tool(CallToolRequestParams::new("lookup_patient")).await;
    let absent = bob.call_tool(CallToolRequestParams::new("no_such_tool")).await;
    let (hidden, absent) = (format!("{:?}", hidden.expect_err("hidden")), format!("{:?}", absent.expect_err("absent")));
    assert!(hidden.contains("Unknown tool"), "{hidden}");
    assert_eq!(
        hidden.replace("lookup_patient", "X"),
        absent.replace("no_such_tool", "X"),
        "a hidden tool looks absent"
    );
    let hours = bob.call_tool(CallToolRequestParams::new("clinic_hours")).await.expect("allowed");
    assert!(format!("{hours:?}").contains("08:00-17:00"));
    bob.cancel().await.expect("close");

    // The server received exactly the allowed calls.
    assert_eq!(*calls.lock().expect("calls"), ["lookup_patient", "clinic_hours"]);
    let all = records(harness.audit.path());
    let tool_calls: Vec<&Record> = all
        .iter()
        .filter(|r| r.event.kind == Kind::Decision && r.event.method.as_deref() == Some("tools/call"))
        .collect();
    assert_eq!(tool_calls.len(), 4);
    assert_eq!(tool_calls.iter().filter(|r| r.event.decision == Some(Decision::Deny)).count(), 2);
    assert!(verify_dir(harness.audit.path(), VerifyOptions::default()).passed());
    ct.cancel();
}
