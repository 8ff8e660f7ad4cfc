//! Per-call database access for `tools/call`: for a tool with `dataAccess`,
//! the caller's credential for each store comes from the broker (which
//! re-verifies the caller's token and the policy), each gets a per-call
//! token at the database proxy, and the MCP server receives only DSNs to the
//! proxy in `_meta["io.mcpwarden/db"]`. The returned ticket ends the tokens
//! (and closes their connections) when the call ends.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::audit::record::Caller;
use crate::broker::client::{BrokerClient, ClientError};
use crate::broker::issuer::CredentialRequest;
use crate::dbproxy::DbProxy;
use crate::dbproxy::grants::{CallGrant, CallTicket, Grants, local_expiry};
use crate::policy::CompiledPolicy;

/// The `_meta` key of the DSN map.
pub const META_DB: &str = "io.mcpwarden/db";

/// Why a call's database access could not be set up. Messages are shown to
/// the MCP client: they name classes, never tokens.
#[derive(Debug, thiserror::Error)]
pub enum DataAccessError {
    /// The tool reads a PHIStore and the sidecar has no broker.
    #[error("this tool reads a PHIStore and the sidecar has no credential broker (--broker)")]
    NoBroker,
    /// The broker refused or could not be reached.
    #[error("no database credential for store {store}: {class}")]
    Broker {
        /// The store.
        store: String,
        /// The broker's error class (or `unreachable`).
        class: String,
    },
    /// No token could be made.
    #[error("no per-call token: {0}")]
    Token(String),
}

impl DataAccessError {
    /// The class named in records and metrics.
    pub fn class(&self) -> String {
        match self {
            DataAccessError::NoBroker => "no_broker".into(),
            DataAccessError::Broker { class, .. } => format!("broker_{class}"),
            DataAccessError::Token(_) => "token".into(),
        }
    }
}

/// The broker and the proxy of one sidecar.
pub struct DataAccess {
    broker: BrokerClient,
    grants: Arc<Grants>,
    proxy: SocketAddr,
}

/// What a call with database access holds.
pub struct CallAccess {
    /// Ends the call's tokens when dropped.
    pub ticket: CallTicket,
    /// The `_meta["io.mcpwarden/db"]` value: store → DSN.
    pub dsns: Map<String, Value>,
    /// For a de-identified tool: what its answer is searched for before it
    /// is released (set by the gateway from its policy).
    pub scan: Option<crate::sidecar::gateway::AnswerScan>,
}

impl DataAccess {
    /// The broker this sidecar asks.
    pub fn broker(&self) -> &BrokerClient {
        &self.broker
    }

    /// Database access through `broker`, with tokens in `grants` served by
    /// the proxy listening on `proxy`.
    pub fn new(broker: BrokerClient, grants: Arc<Grants>, proxy: SocketAddr) -> DataAccess {
        DataAccess { broker, grants, proxy }
    }

    /// Sets up the stores of `tool` for one call; `None` for a tool without
    /// data access. `emergency_access` names the break-glass grant the call
    /// is allowed under (its statement records carry it).
    pub async fn open(
        this: Option<&DataAccess>,
        policy: &CompiledPolicy,
        tool: &str,
        caller_token: &str,
        caller: &Caller,
        correlation: &str,
        emergency_access: Option<&str>,
    ) -> Result<Option<CallAccess>, DataAccessError> {
        let Some(compiled) = policy.tools.get(tool).filter(|t| !t.data_access.is_empty()) else {
            return Ok(None);
        };
        let this = this.ok_or(DataAccessError::NoBroker)?;
        let requests = compiled.data_access.keys().map(|store| {
            let request = CredentialRequest {
                server: policy.server.to_string(),
                tool: tool.to_string(),
                store: store.clone(),
                caller_token: caller_token.to_string(),
                correlation: Some(correlation.to_string()),
            };
            async move { (store.clone(), this.broker.credential(&request).await) }
        });
        let answers = futures::future::join_all(requests).await;
        let mut ticket = this.grants.ticket();
        let mut dsns = Map::new();
        for (store, answer) in answers {
            let credential = answer.map_err(|e| DataAccessError::Broker {
                store: store.clone(),
                class: match e {
                    ClientError::Transport(_) => "unreachable".into(),
                    ClientError::Refused { class, .. } => class,
                },
            })?;
            let grant = CallGrant {
                caller: caller.clone(),
                tool: tool.to_string(),
                correlation: correlation.to_string(),
                store: store.clone(),
                expires: local_expiry(&credential.valid_until),
                allow_copy: compiled.copy_stores.contains(&store),
                emergency_access: emergency_access.map(str::to_string),
                credential,
            };
            let token = this.grants.issue(grant, &mut ticket).map_err(DataAccessError::Token)?;
            dsns.insert(store.clone(), Value::String(DbProxy::dsn(this.proxy, &token, &store)));
        }
        Ok(Some(CallAccess { ticket, dsns, scan: None }))
    }
}
