//! The reference PHI tools: the pattern a platform team copies. Each call
//! reads its database DSN from `_meta["io.mcpwarden/db"][<store>]` — put
//! there by the mcp-warden sidecar, pointing at the sidecar's database
//! proxy with a token valid for this call only — opens one connection, runs
//! its parameterised queries, and closes it before answering. The server
//! holds no database credential, keeps no pool (a pooled connection would
//! be closed by the proxy when its call ends), and never echoes a database
//! error's text (it can carry values): only its SQLSTATE.

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};

/// The `_meta` key the sidecar fills.
pub const META_DB: &str = "io.mcpwarden/db";

/// Arguments of `lookup_patient`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct Lookup {
    /// Medical record number.
    pub mrn: String,
}

/// Arguments of `record_note`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct Note {
    /// The patient's id.
    pub patient_id: i32,
    /// The note.
    pub body: String,
}

/// The tools, reading the store named `store` (the PHIStore's name).
#[derive(Clone)]
pub struct PhiTools {
    /// The PHIStore the tools read.
    pub store: String,
}

/// The DSN of `store` for this call, as the sidecar gave it.
pub fn dsn_for(ctx: &RequestContext<RoleServer>, store: &str) -> Result<String, ErrorData> {
    ctx.meta.get(META_DB).and_then(|db| db.get(store)).and_then(|dsn| dsn.as_str()).map(str::to_string).ok_or_else(
        || {
            ErrorData::internal_error(
                format!("no {META_DB} DSN for store {store}: this server runs behind the mcp-warden sidecar"),
                None,
            )
        },
    )
}

/// One connection for one call: opened here, closed when the client drops.
async fn connect(dsn: &str) -> Result<tokio_postgres::Client, CallToolResult> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.map_err(|e| refused(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A database error as the model sees it: the SQLSTATE only.
fn refused(e: &tokio_postgres::Error) -> CallToolResult {
    let code = e.code().map(|c| c.code().to_string()).unwrap_or_else(|| "connection".into());
    CallToolResult::error(vec![ContentBlock::text(format!("database refused the query (SQLSTATE {code})"))])
}

#[tool_router]
impl PhiTools {
    /// Name and date of birth for an MRN (identity check at check-in).
    #[tool(description = "Look up a patient's name and date of birth by MRN")]
    async fn lookup_patient(
        &self,
        Parameters(Lookup { mrn }): Parameters<Lookup>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let dsn = dsn_for(&ctx, &self.store)?;
        let client = match connect(&dsn).await {
            Ok(client) => client,
            Err(refusal) => return Ok(refusal),
        };
        let rows = match client.query("SELECT name, dob::text FROM clinical.patients WHERE mrn = $1", &[&mrn]).await {
            Ok(rows) => rows,
            Err(e) => return Ok(refused(&e)),
        };
        let found: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"name": r.get::<_, Option<String>>(0), "dob": r.get::<_, Option<String>>(1)}))
            .collect();
        Ok(CallToolResult::success(vec![ContentBlock::text(serde_json::Value::Array(found).to_string())]))
    }

    /// Records a visit note.
    #[tool(description = "Record a visit note for a patient")]
    async fn record_note(
        &self,
        Parameters(Note { patient_id, body }): Parameters<Note>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let dsn = dsn_for(&ctx, &self.store)?;
        let client = match connect(&dsn).await {
            Ok(client) => client,
            Err(refusal) => return Ok(refusal),
        };
        match client
            .execute("INSERT INTO clinical.notes (patient_id, body) VALUES ($1, $2)", &[&patient_id, &body])
            .await
        {
            Ok(n) => Ok(CallToolResult::success(vec![ContentBlock::text(format!("{n} note recorded"))])),
            Err(e) => Ok(refused(&e)),
        }
    }

    /// No PHI: needs no database.
    #[tool(description = "The clinic's opening hours")]
    async fn clinic_hours(&self) -> String {
        "08:00-17:00".into()
    }
}

#[tool_handler]
impl ServerHandler for PhiTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}
