//! The Kubernetes API of mcp-warden: group `mcpwarden.io`, version `v1alpha1`.
//!
//! ```text
//!   MCPServer ──tools[].dataAccess[].store──▶ PHIStore   (same namespace)
//!      │ spec: image, authn, tools/resources/prompts policy, ttl, audit, network
//!      └ status: conditions (Ready, Compliant), controls[] (HIPAA verdicts), counts
//! ```
//!
//! Everything the API server can check on its own is in the schema (bounds,
//! patterns, list-map keys, CEL rules); what needs other objects is judged by
//! [`crate::compliance`]. The same schema is what `mcp-warden check` enforces
//! offline (see [`crate::manifest`]).

mod crd;
mod deidentification;
mod emergency;
mod mcp_server;
mod phi_store;

pub use crd::{all_crds, crds_yaml};
pub use deidentification::*;
pub use emergency::*;
pub use mcp_server::*;
pub use phi_store::*;

/// API group of every mcp-warden kind.
pub const GROUP: &str = "mcpwarden.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as it appears in manifests.
pub const API_VERSION: &str = "mcpwarden.io/v1alpha1";

/// The sidecar's public MCP port (the only port the Service and the ingress
/// NetworkPolicy expose).
pub const SIDECAR_PUBLIC_PORT: i32 = 8443;
/// The sidecar's health and metrics port; never exposed by the Service.
pub const SIDECAR_METRICS_PORT: i32 = 9090;
/// The sidecar's PostgreSQL proxy, bound to 127.0.0.1 inside the pod.
pub const SIDECAR_PG_PROXY_PORT: i32 = 15432;

/// Longest accepted credential TTL, in seconds (the schema says `1h`).
pub const MAX_CREDENTIAL_TTL_SECS: u64 = 3600;

#[cfg(test)]
mod tests;
