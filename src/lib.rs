//! mcp-warden: run MCP servers next to PHI and answer a HIPAA auditor.
pub mod api;
pub mod manifest;
pub mod policy;
pub mod render;
pub mod compliance;
