//! The audit trail: one record format, written durably before the action
//! it records, hash-chained, verifiable offline.
//!
//! ```text
//!   sidecar / broker ── Event ──▶ Wal (group commit, fsync) ──▶ seg-*.jsonl
//!                                   │                              │
//!                                   └─ Receipt → action proceeds   └─ verify_dir → PASS / FAIL at (segment, line)
//! ```
//!
//! - [`record`]: the schema, canonical bytes, the chain.
//! - [`args_hmac`]: keyed HMAC of tool arguments (never the arguments).
//! - [`wal`]: the durable, bounded, crash-safe writer.
//! - [`verify`]: checking stored streams.
//! - [`segment`]: the files on disk.
//! - [`trail`], [`trail_shipping`]: a control-plane component's streams
//!   (one per MCPServer) and their shipping to the collector.

pub mod args_hmac;
pub mod budget;
pub mod checkpoint;
pub mod collector;
pub mod query;
pub mod record;
pub mod segment;
pub mod ship;
pub mod trail;
pub mod trail_shipping;
pub mod verify;
pub mod wal;

pub use record::{Caller, Decision, Event, Kind, Record};
pub use wal::{Receipt, Wal, WalConfig, WalError};
