//! The broker's audit trail (`audit::trail`): one WAL per MCPServer it
//! issues for, so a server's leases sit beside its decisions; events of no
//! known server (roles of a deleted server reaped after a restart) go to the
//! broker's own stream, `--audit-dir DIR/_broker/`. A record is durable
//! before the credential it describes is returned.

use crate::audit::record::{Caller as AuditCaller, Event, Kind, Lease, LeaseAction};
use crate::audit::trail::OwnStream;
pub use crate::audit::trail::Trail;

/// `server` of records no MCPServer owns.
pub const BROKER_SERVER: &str = "mcp-warden/broker";

/// The broker's own stream.
pub const BROKER_STREAM: OwnStream = OwnStream { server: BROKER_SERVER, dir: "_broker" };

/// What a lease record says.
pub struct LeaseFacts<'a> {
    /// What happened.
    pub action: LeaseAction,
    /// The lease id.
    pub lease: &'a str,
    /// The role.
    pub role: &'a str,
    /// Expiry (RFC 3339), when known.
    pub valid_until: Option<String>,
    /// The PHIStore name.
    pub store: Option<&'a str>,
    /// The tool.
    pub tool: Option<&'a str>,
    /// The caller, when known.
    pub caller: Option<AuditCaller>,
    /// The sidecar's correlation id, when given.
    pub correlation: Option<&'a str>,
    /// Why (revocations and reaps).
    pub reason: Option<String>,
}

/// The lease event.
pub fn lease_event(facts: LeaseFacts<'_>) -> Event {
    let mut event = Event::new(Kind::Lease);
    event.lease = Some(Lease {
        id: facts.lease.to_string(),
        action: facts.action,
        role: Some(facts.role.to_string()),
        valid_until: facts.valid_until,
    });
    event.store = facts.store.map(str::to_string);
    event.tool = facts.tool.map(str::to_string);
    event.caller = facts.caller;
    event.correlation = facts.correlation.map(str::to_string);
    event.reason = facts.reason;
    event
}
