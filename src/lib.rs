//! mcp-warden: run MCP servers next to PHI and answer a HIPAA auditor.
//!
//! ```text
//!   api ─────────── MCPServer, PHIStore (CRDs)
//!    │
//!   manifest ────── read + admit manifests offline (schema + CEL)
//!    │
//!   policy ──────── CompiledPolicy: the one declaration, resolved
//!    │
//!   render ──────── owned objects (Deployment, Service, NetworkPolicies, …)
//!    │
//!   compliance ──── per-control HIPAA verdicts from rendered + observed state
//!    │
//!   check ───────── the GitOps gate          cli ─── subcommands
//! ```
//!
//! The programs, one module each: `operator` (the controller; `leader`
//! elects one writing replica), `sidecar` (MCP gateway + PostgreSQL proxy),
//! `broker` (per-caller database roles), `audit` (records, WAL, collector,
//! verify/query), `report` (the auditor's page), `demo` (the whole data path
//! on a laptop, on `local_postgres`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

pub mod access_review;
pub mod api;
pub mod audit;
pub mod bearer;
pub mod breakglass;
pub mod broker;
pub mod check;
pub mod cli;
pub mod compliance;
pub mod dbproxy;
pub mod deid;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fuzzing;
pub mod health;
pub mod http_server;
pub mod jwks;
pub mod jwt;
pub mod leader;
pub mod local_postgres;
pub mod manifest;
pub mod net;
pub mod operator;
pub mod policy;
pub mod render;
pub mod report;
pub mod sidecar;
pub mod sse;
pub mod tls_listener;
pub mod token_review;

#[cfg(test)]
pub(crate) mod fixtures;
