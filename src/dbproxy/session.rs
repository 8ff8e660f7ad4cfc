//! One client connection: first packet (SSL/GSS refused, cancel routed),
//! startup, the token as password, login upstream as the caller, then the
//! relay with every statement recorded, until either side closes, the call
//! ends or the credential expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use super::DbProxy;
use super::cut::{Cause, Cut, FAREWELL_WAIT};
use super::grants::{CallGrant, LookupError};
use super::tracker::{BackAction, Ending, Finished, FrontAction, Tracker};
use super::upstream::{self, Io};
use super::wire::{self, FirstPacket, FrameReader, WireError, backend};
use crate::audit::record::{Decision, Event, Kind, Lease, LeaseAction, Outcome, OutcomeStatus};

/// How long a client may take from connecting to sending its password.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest password message accepted (a token is 64 characters).
const MAX_PASSWORD_BYTES: usize = 1024;

/// Why a connection was refused before the relay.
struct Refused {
    decision: Decision,
    class: &'static str,
    /// Told to the client (written here; never echoes client bytes).
    message: String,
    sqlstate: &'static str,
    grant: Option<Arc<CallGrant>>,
}

impl Refused {
    fn new(decision: Decision, class: &'static str, sqlstate: &'static str, message: impl Into<String>) -> Self {
        Refused { decision, class, message: message.into(), sqlstate, grant: None }
    }

    fn wire(e: WireError) -> Self {
        let class = e.class();
        let message = match &e {
            WireError::TooLarge(_) => "startup packet too large".to_string(),
            WireError::Malformed(what) => format!("invalid startup packet: {what}"),
            WireError::Io(_) => "connection lost during startup".to_string(),
        };
        Refused::new(Decision::Deny, class, "08P01", message)
    }
}

/// Serves one client connection to its end.
pub async fn run(proxy: Arc<DbProxy>, mut socket: TcpStream) {
    let started = tokio::time::timeout(STARTUP_TIMEOUT, startup(&proxy, &mut socket)).await;
    let (grant, ended, leftover) = match started {
        Ok(Ok(Some(ok))) => ok,
        // A cancel request, served.
        Ok(Ok(None)) => return,
        Ok(Err(refused)) => return refuse(&proxy, socket, refused).await,
        Err(_) => {
            let refused = Refused::new(Decision::Deny, "startup_timeout", "08P01", "startup took too long");
            return refuse(&proxy, socket, refused).await;
        }
    };
    let up = match upstream::connect(&grant.credential, &grant.correlation).await {
        Ok(up) => up,
        Err(e) => {
            tracing::warn!(error = %e, store = %grant.store, "database proxy could not log in as the caller");
            let mut refused = Refused::new(
                Decision::Deny,
                "store_login_failed",
                "08006",
                "the store could not be reached as the caller; see the sidecar log",
            );
            refused.grant = Some(grant);
            return refuse(&proxy, socket, refused).await;
        }
    };
    relay(proxy, socket, grant, ended, up, leftover).await;
}

/// A started session: its grant, the call-ended signal, and client bytes
/// read after the password (normally none).
type Started = Option<(Arc<CallGrant>, tokio::sync::watch::Receiver<bool>, BytesMut)>;

async fn startup(proxy: &DbProxy, socket: &mut TcpStream) -> Result<Started, Refused> {
    let mut ssl_refused = false;
    let mut gss_refused = false;
    let (minor, params) = loop {
        match wire::read_first_packet(socket).await.map_err(Refused::wire)? {
            // No TLS on loopback inside the pod; asking twice is a game.
            FirstPacket::Ssl if !ssl_refused => {
                ssl_refused = true;
                socket.write_all(b"N").await.map_err(|e| Refused::wire(e.into()))?;
            }
            FirstPacket::GssEnc if !gss_refused => {
                gss_refused = true;
                socket.write_all(b"N").await.map_err(|e| Refused::wire(e.into()))?;
            }
            FirstPacket::Ssl | FirstPacket::GssEnc => {
                return Err(Refused::new(
                    Decision::Deny,
                    "encryption_renegotiation",
                    "08P01",
                    "encryption asked twice",
                ));
            }
            FirstPacket::Cancel { pid, secret } => {
                return match proxy.cancel_keys.resolve(pid, secret) {
                    Some((grant, key)) => {
                        if let Err(e) = upstream::cancel(&grant.credential, key).await {
                            tracing::warn!(error = %e, "could not forward a cancel request");
                        }
                        Ok(None)
                    }
                    None => Err(Refused::new(Decision::Deny, "forged_cancel_key", "08P01", "unknown cancel key")),
                };
            }
            FirstPacket::Startup { minor, params } => break (minor, params),
        }
    };
    let param = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if param("replication").is_some() {
        return Err(Refused::new(Decision::Deny, "replication_refused", "28000", "replication is not served"));
    }
    let (Some(_user), Some(database)) = (param("user"), param("database")) else {
        return Err(Refused::new(Decision::Deny, "malformed_startup", "08P01", "user and database are required"));
    };
    let database = database.to_string();
    let unknown: Vec<String> = params.iter().filter(|(n, _)| n.starts_with("_pq_.")).map(|(n, _)| n.clone()).collect();
    if minor > 0 || !unknown.is_empty() {
        wire::send(socket, &backend::negotiate_protocol_version(&unknown))
            .await
            .map_err(|e| Refused::wire(e.into()))?;
    }
    wire::send(socket, &backend::cleartext_password_request()).await.map_err(|e| Refused::wire(e.into()))?;
    let (token, leftover) = read_password(socket).await?;
    let (grant, ended) = proxy.grants.lookup(&token).map_err(|e| {
        let class = e.class();
        let text = match e {
            LookupError::Unknown => "password authentication failed: not a token of a call in progress",
            LookupError::CallEnded => "password authentication failed: the call this token was issued for has ended",
            LookupError::Expired => "password authentication failed: the credential behind this token has expired",
        };
        Refused::new(Decision::AuthnFailure, class, "28P01", text)
    })?;
    if grant.store != database {
        let mut refused = Refused::new(
            Decision::Deny,
            "wrong_store",
            "28000",
            "this token was issued for another store; use the DSN given for this one",
        );
        refused.grant = Some(grant);
        return Err(refused);
    }
    Ok(Some((grant, ended, leftover)))
}

async fn read_password(socket: &mut TcpStream) -> Result<(String, BytesMut), Refused> {
    let mut reader = FrameReader::new(&mut *socket);
    let frame =
        reader.next().await.map_err(Refused::wire)?.ok_or_else(|| Refused::wire(WireError::Malformed("eof")))?;
    if frame.tag != b'p' {
        return Err(Refused::new(Decision::Deny, "malformed_startup", "08P01", "expected a password message"));
    }
    if frame.raw.len() > MAX_PASSWORD_BYTES {
        return Err(Refused::wire(WireError::TooLarge(frame.raw.len() as u64)));
    }
    let mut body = frame.body();
    let token = wire::cstring(&mut body).map_err(Refused::wire)?;
    Ok((token, reader.into_parts().1))
}

async fn refuse(proxy: &DbProxy, mut socket: TcpStream, refused: Refused) {
    proxy.metrics.connection(refused.class);
    // On the record before the client hears of it.
    let mut event = Event::new(Kind::Decision);
    if let Some(grant) = &refused.grant {
        event.correlation = Some(grant.correlation.clone());
        event.caller = Some(grant.caller.clone());
        event.tool = Some(grant.tool.clone());
        event.store = Some(grant.store.clone());
    }
    proxy.record_refusal(refused.decision, refused.class.to_string(), event).await;
    let _ = wire::send(&mut socket, &backend::error("FATAL", refused.sqlstate, &refused.message)).await;
    let _ = socket.shutdown().await;
}

/// Why the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientClosed,
    ServerClosed,
    CallEnded,
    CredentialExpired,
    Refused(&'static str),
    ClientProtocol(&'static str),
    ServerProtocol,
    AuditUnavailable,
}

impl From<Cause> for End {
    fn from(cause: Cause) -> Self {
        match cause {
            Cause::CallEnded => End::CallEnded,
            Cause::CredentialExpired => End::CredentialExpired,
        }
    }
}

impl End {
    fn class(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ServerClosed => "store_closed",
            End::CallEnded => "call_ended",
            End::CredentialExpired => "credential_expired",
            End::Refused(reason) => reason,
            End::ClientProtocol(class) => class,
            End::ServerProtocol => "store_protocol_error",
            End::AuditUnavailable => "audit_unavailable",
        }
    }

    /// What the client is told, if anything.
    fn notice(self) -> Option<(&'static str, &'static str)> {
        match self {
            End::CallEnded => Some(("57P01", "the call this connection was opened for has ended")),
            End::CredentialExpired => Some(("57P01", "the caller's database credential has expired")),
            End::Refused(reason) => Some(super::tracker::refusal_notice(reason)),
            End::ClientProtocol("oversized_message") => Some(("54000", "message too large for the proxy")),
            End::ClientProtocol(_) => Some(("08P01", "invalid message")),
            End::ServerProtocol => Some(("08006", "the store sent an unreadable message")),
            End::AuditUnavailable => Some(("58000", "the audit trail cannot record statements; connection closed")),
            End::ClientClosed | End::ServerClosed => None,
        }
    }
}

async fn relay(
    proxy: Arc<DbProxy>,
    socket: TcpStream,
    grant: Arc<CallGrant>,
    ended: tokio::sync::watch::Receiver<bool>,
    up: upstream::Upstream,
    leftover: BytesMut,
) {
    let (client_read, mut client_write) = socket.into_split();
    let (server_read, mut server_write) = tokio::io::split(up.io);
    let mut from_client = FrameReader::with_buffer(client_read, leftover);
    let mut from_server = FrameReader::with_buffer(server_read, up.leftover);
    // The greeting, with the proxy's cancel key in place of the server's.
    let mut out = BytesMut::new();
    out.extend_from_slice(&backend::authentication_ok());
    let mut our_key = None;
    for frame in &up.greeting {
        if frame.tag == b'K' {
            if let Some(server_key) = up.key
                && let Ok(key) = proxy.cancel_keys.register(Arc::clone(&grant), server_key)
            {
                out.extend_from_slice(&backend::backend_key_data(key.0, key.1));
                our_key = Some(key.0);
            }
        } else {
            out.extend_from_slice(&frame.raw);
        }
    }
    proxy.metrics.connection("accepted");
    proxy.metrics.relaying(true);
    let mut tracker = Tracker::new(grant.allow_copy);
    let mut done = Vec::new();
    // One timer for the connection, not one registered per message.
    let mut cut = Cut::new(ended, grant.expires);
    let end = match cut.unless(client_write.write_all(&out)).await {
        Err(cause) => cause.into(),
        Ok(Err(_)) => End::ClientClosed,
        Ok(Ok(())) => loop {
            // Reads wait here; writes wait inside the steps, each also cut
            // by the call's end and the credential's expiry.
            let step = tokio::select! {
                frame = from_client.next() => {
                    let mut out = Out { proxy: &proxy, grant: &grant, client: &mut client_write, cut: &mut cut };
                    client_step(frame, &mut from_client, &mut tracker, &mut done, &mut server_write, &mut out).await
                }
                frame = from_server.next() => {
                    let mut out = Out { proxy: &proxy, grant: &grant, client: &mut client_write, cut: &mut cut };
                    server_step(frame, &mut from_server, &mut tracker, &mut done, &mut out).await
                }
                cause = cut.wait() => Err(cause.into()),
            };
            if record_statements(&proxy, &grant, &mut done).await.is_err() {
                break End::AuditUnavailable;
            }
            if let Err(end) = step {
                break end;
            }
        },
    };
    if let End::ClientProtocol(class) = end {
        proxy.record_refusal(Decision::Deny, class.to_string(), call_event(&grant, Kind::Decision)).await;
    }
    // A peer that stopped reading gets no notice and no clean shutdown.
    if let Some((code, text)) = end.notice() {
        let notice = backend::error("FATAL", code, text);
        let _ = tokio::time::timeout(FAREWELL_WAIT, wire::send(&mut client_write, &notice)).await;
    }
    let _ = tokio::time::timeout(FAREWELL_WAIT, client_write.shutdown()).await;
    let _ = tokio::time::timeout(FAREWELL_WAIT, server_write.shutdown()).await;
    if let Some(pid) = our_key {
        proxy.cancel_keys.remove(pid);
    }
    tracker.end(Instant::now(), end.class(), &mut done);
    let _ = record_statements(&proxy, &grant, &mut done).await;
    if end == End::CredentialExpired {
        let mut event = call_event(&grant, Kind::Lease);
        event.lease = Some(Lease {
            id: grant.credential.lease_id.clone(),
            action: LeaseAction::Expired,
            role: None,
            valid_until: Some(grant.credential.valid_until.clone()),
        });
        event.reason = Some("connection closed at the credential's expiry".into());
        let _ = proxy.wal.append(event).await;
    }
    proxy.metrics.relaying(false);
    tracing::debug!(end = end.class(), store = %grant.store, "database proxy connection closed");
}

type ServerWrite = WriteHalf<Box<dyn Io>>;

/// The way back to the MCP server, and the connection's [`Cut`], which
/// every write here waits beside (a peer that stops reading cannot hold the
/// connection past its call). Finished statements' records are queued
/// in the WAL before the bytes that end them are written, so a record the
/// gateway makes durable after the call's answer (which the MCP server can
/// only write after reading these bytes) makes them durable too.
struct Out<'a> {
    proxy: &'a DbProxy,
    grant: &'a CallGrant,
    client: &'a mut OwnedWriteHalf,
    cut: &'a mut Cut,
}

impl Out<'_> {
    /// Records first (never cut: a record queued is a record kept), then
    /// the bytes, unless the connection is cut while they wait.
    async fn write(&mut self, bytes: &[u8], done: &mut Vec<Finished>) -> Result<(), End> {
        record_statements(self.proxy, self.grant, done).await.map_err(|()| End::AuditUnavailable)?;
        self.cut.unless(self.client.write_all(bytes)).await?.map_err(|_| End::ClientClosed)
    }

    /// Bytes to the server, unless the connection is cut while they wait.
    async fn flush_to_server(&mut self, server: &mut ServerWrite, bytes: &mut BytesMut) -> Result<(), End> {
        self.cut.unless(flush(server, bytes)).await?.map_err(|_| End::ServerClosed)
    }
}

/// One client message (and any others already buffered) to the server.
async fn client_step(
    frame: Result<Option<wire::Frame>, WireError>,
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tracker: &mut Tracker,
    done: &mut Vec<Finished>,
    server: &mut ServerWrite,
    client: &mut Out<'_>,
) -> Result<(), End> {
    let mut frame = match frame {
        Ok(Some(frame)) => frame,
        Ok(None) | Err(WireError::Io(_)) => return Err(End::ClientClosed),
        Err(e) => return Err(End::ClientProtocol(e.class())),
    };
    let mut to_server = BytesMut::new();
    loop {
        let terminate = frame.tag == b'X';
        match tracker.client(&frame, Instant::now(), done).map_err(|e| End::ClientProtocol(e.class()))? {
            FrontAction::Forward => to_server.extend_from_slice(&frame.raw),
            FrontAction::Answer(answers) => {
                client.flush_to_server(server, &mut to_server).await?;
                for answer in answers {
                    client.write(&answer, done).await?;
                }
            }
            FrontAction::Close(reason) => {
                client.flush_to_server(server, &mut to_server).await?;
                return Err(End::Refused(reason));
            }
        }
        if terminate {
            client.flush_to_server(server, &mut to_server).await?;
            return Err(End::ClientClosed);
        }
        match reader.buffered().map_err(|e| End::ClientProtocol(e.class()))? {
            Some(next) => frame = next,
            None => break,
        }
    }
    client.flush_to_server(server, &mut to_server).await
}

/// One server message (and any others already buffered) to the client.
async fn server_step(
    frame: Result<Option<wire::Frame>, WireError>,
    reader: &mut FrameReader<ReadHalf<Box<dyn Io>>>,
    tracker: &mut Tracker,
    done: &mut Vec<Finished>,
    client: &mut Out<'_>,
) -> Result<(), End> {
    let mut frame = match frame {
        Ok(Some(frame)) => frame,
        Ok(None) | Err(WireError::Io(_)) => return Err(End::ServerClosed),
        Err(_) => return Err(End::ServerProtocol),
    };
    let mut to_client = BytesMut::new();
    loop {
        match tracker.server(&frame, Instant::now(), done).map_err(|_| End::ServerProtocol)? {
            BackAction::Forward => to_client.extend_from_slice(&frame.raw),
            BackAction::Close(reason) => {
                client.write(&to_client, done).await?;
                return Err(End::Refused(reason));
            }
        }
        match reader.buffered().map_err(|_| End::ServerProtocol)? {
            Some(next) => frame = next,
            None => break,
        }
    }
    client.write(&to_client, done).await
}

async fn flush(server: &mut ServerWrite, bytes: &mut BytesMut) -> std::io::Result<()> {
    if !bytes.is_empty() {
        server.write_all(bytes).await?;
        server.flush().await?;
        bytes.clear();
    }
    Ok(())
}

fn call_event(grant: &CallGrant, kind: Kind) -> Event {
    Event {
        correlation: Some(grant.correlation.clone()),
        caller: Some(grant.caller.clone()),
        tool: Some(grant.tool.clone()),
        phi: Some(true),
        store: Some(grant.store.clone()),
        emergency_access: grant.emergency_access.clone(),
        ..Event::new(kind)
    }
}

/// Queues the finished statements' records in order, deferred: they need
/// no fsync of their own, because the gateway's durable outcome record,
/// queued after them, is what the call's answer waits for (and a failed
/// write of theirs fails that record too, so the answer is withheld). A WAL
/// that refuses to queue records ends the connection.
async fn record_statements(proxy: &DbProxy, grant: &CallGrant, done: &mut Vec<Finished>) -> Result<(), ()> {
    for finished in done.drain(..) {
        let mut event = call_event(grant, Kind::Statement);
        let (status, reason) = match &finished.ending {
            Ending::Ok => (OutcomeStatus::Ok, None),
            Ending::Failed(code) if code == "42501" => (OutcomeStatus::Refused, Some(format!("sqlstate {code}"))),
            Ending::Failed(code) => (OutcomeStatus::Error, Some(format!("sqlstate {code}"))),
            Ending::Refused(why) => (OutcomeStatus::Refused, Some((*why).to_string())),
            Ending::NotRun(why) => (OutcomeStatus::Cancelled, Some((*why).to_string())),
        };
        proxy.metrics.statement(match status {
            OutcomeStatus::Ok => "ok",
            OutcomeStatus::Error => "error",
            OutcomeStatus::Refused => "refused",
            OutcomeStatus::Cancelled => "cancelled",
        });
        event.statement = Some(finished.statement);
        event.outcome = Some(Outcome { status, http_status: None, rpc_error: None, rows: Some(finished.rows) });
        event.reason = reason;
        event.duration_us = Some(finished.duration.as_micros() as u64);
        proxy.wal.defer(event).await.map_err(|e| {
            tracing::error!(error = %e, "could not queue a statement record");
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_under_break_glass_names_its_grant() {
        let mut grant = crate::dbproxy::grants::tests::grant("ehr", std::time::Instant::now());
        assert_eq!(call_event(&grant, Kind::Statement).emergency_access, None);
        grant.emergency_access = Some("ea-1".into());
        let event = call_event(&grant, Kind::Statement);
        assert_eq!(
            (event.emergency_access.as_deref(), event.correlation.as_deref(), event.store.as_deref()),
            (Some("ea-1"), Some("c1"), Some("ehr"))
        );
    }
}
