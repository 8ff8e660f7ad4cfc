//! `mcp-warden sidecar`: the auditing gateway in front of an MCP server.
pub mod authn;
pub mod authz;
