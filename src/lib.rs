//! mcp-warden: run MCP servers next to PHI and answer a HIPAA auditor.
pub mod api;
pub mod manifest;
