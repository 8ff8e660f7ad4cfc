//! The reference PHI tools: the pattern a platform team copies. Each call
//! reads its database DSN from `_meta["io.mcpwarden/db"][<store>]` — put
//! there by the mcp-warden sidecar, pointing at the sidecar's database
//! proxy with a token valid for this call only — opens one connection, runs
//! its parameterised queries, and closes it before answering. The server
//! holds no database credential, keeps no pool (a pooled connection would
//! be closed by the proxy when its call ends), and never echoes a database
//! error's text (it can carry values): only its SQLSTATE.
//!
//! The tools are de-identified (docs/deidentification.md): they read the
//! views of their scope's schema (`deid_<scope>`), where a patient is a
//! pseudonym such as `pt_7f3a9c…`, a birth date is a year and free text is
//! absent. They take pseudonyms and return pseudonyms: the database finds
//! the rows, and no real identifier crosses MCP in either direction.

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};

/// The `_meta` key the sidecar fills.
pub const META_DB: &str = "io.mcpwarden/db";

/// Arguments of `find_patients`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct Find {
    /// A diagnosis, e.g. `influenza`.
    pub diagnosis: String,
}

/// Arguments of `lookup_patient`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct Lookup {
    /// The patient's pseudonym, as `find_patients` returned it.
    pub patient: String,
}

/// The tools, reading the store named `store` (the PHIStore's name).
#[derive(Clone)]
pub struct PhiTools {
    /// The PHIStore the tools read.
    pub store: String,
    /// The schema of this server's de-identified views (`deid_<scope>`).
    pub views: String,
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

/// Rows as the model sees them: pseudonym, birth year, diagnosis.
fn patients(rows: &[tokio_postgres::Row]) -> CallToolResult {
    let found: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "patient": r.get::<_, Option<String>>(0),
                "birthYear": r.get::<_, Option<String>>(1),
                "diagnosis": r.get::<_, Option<String>>(2),
            })
        })
        .collect();
    CallToolResult::success(vec![ContentBlock::text(serde_json::Value::Array(found).to_string())])
}

impl PhiTools {
    /// Runs one de-identified query over this call's DSN.
    async fn query(
        &self,
        ctx: &RequestContext<RoleServer>,
        sql: &str,
        param: &str,
    ) -> Result<CallToolResult, ErrorData> {
        let dsn = dsn_for(ctx, &self.store)?;
        let client = match connect(&dsn).await {
            Ok(client) => client,
            Err(refusal) => return Ok(refusal),
        };
        // The view schema comes from configuration, never from a caller.
        let sql = sql.replace("{views}", &self.views);
        Ok(match client.query(&sql, &[&param]).await {
            Ok(rows) => patients(&rows),
            Err(e) => refused(&e),
        })
    }
}

#[tool_router]
impl PhiTools {
    /// Pseudonyms and birth years of the patients with a diagnosis.
    #[tool(description = "Find patients with a diagnosis; returns pseudonyms and birth years")]
    async fn find_patients(
        &self,
        Parameters(Find { diagnosis }): Parameters<Find>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.query(&ctx, "SELECT id, dob, diagnosis FROM {views}.patients WHERE diagnosis = $1 ORDER BY id", &diagnosis)
            .await
    }

    /// One patient, by pseudonym.
    #[tool(description = "Look up a patient by pseudonym: birth year and diagnosis")]
    async fn lookup_patient(
        &self,
        Parameters(Lookup { patient }): Parameters<Lookup>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        // A pseudonym of the previous epoch (after a rotation) still finds
        // its patient during the grace period, through the aliases.
        let sql = "SELECT id, dob, diagnosis FROM {views}.patients \
                   WHERE id = coalesce((SELECT current FROM {views}.pseudonym_aliases WHERE previous = $1), $1)";
        self.query(&ctx, sql, &patient).await
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
