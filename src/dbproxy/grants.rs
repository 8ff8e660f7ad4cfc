//! Per-call tokens: the password in the DSN a `tools/call` gets. A token
//! maps to one call's caller, tool, store and broker credential; it works
//! only while the call is open (and the credential unexpired), and every
//! connection opened with it is told to close when the call ends. Tokens are
//! kept only as their SHA-256, so a lookup compares digests, not secrets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::audit::record::Caller;
use crate::broker::issuer::Credential;

/// How long an ended call's token is remembered, so a late use is recorded
/// as "call ended" rather than "unknown token".
const TOMBSTONE_FOR: Duration = Duration::from_secs(600);
/// Most ended tokens remembered.
const MAX_TOMBSTONES: usize = 10_000;

/// What one token grants.
#[derive(Debug)]
pub struct CallGrant {
    /// The verified caller.
    pub caller: Caller,
    /// The tool called.
    pub tool: String,
    /// The call's correlation id.
    pub correlation: String,
    /// The PHIStore (the DSN's database name).
    pub store: String,
    /// The caller's credential for the store.
    pub credential: Credential,
    /// Whether the tool's policy allows COPY on this store.
    pub allow_copy: bool,
    /// When the credential expires, on this machine's clock.
    pub expires: Instant,
    /// The break-glass grant the call is allowed under.
    pub emergency_access: Option<String>,
}

/// Why a token does not open a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// Never issued here (or long forgotten).
    #[error("unknown token")]
    Unknown,
    /// Its call has ended.
    #[error("the call this token was issued for has ended")]
    CallEnded,
    /// Its credential has expired.
    #[error("the credential behind this token has expired")]
    Expired,
}

impl LookupError {
    /// The class named in records.
    pub fn class(self) -> &'static str {
        match self {
            LookupError::Unknown => "unknown_token",
            LookupError::CallEnded => "call_ended",
            LookupError::Expired => "credential_expired",
        }
    }
}

type Digest32 = [u8; 32];

struct Entry {
    grant: Arc<CallGrant>,
    ended: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<Digest32, Entry>,
    ended: HashMap<Digest32, Instant>,
}

/// The tokens of the calls in flight.
#[derive(Default)]
pub struct Grants {
    inner: Mutex<Inner>,
}

/// Held by the gateway for the life of a call; dropping it ends the call's
/// tokens and closes their connections.
pub struct CallTicket {
    grants: Weak<Grants>,
    digests: Vec<Digest32>,
}

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

impl Grants {
    /// A new, empty registry.
    pub fn new() -> Arc<Grants> {
        Arc::new(Grants::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-changed
        // (each change is one insert or remove), so a poisoned lock is used.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a token for `grant`, tied to `ticket`.
    pub fn issue(self: &Arc<Self>, grant: CallGrant, ticket: &mut CallTicket) -> Result<String, String> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| format!("no randomness for a token: {e}"))?;
        let token = hex::encode(secret);
        let key = digest(&token);
        let (ended, _) = watch::channel(false);
        self.lock().live.insert(key, Entry { grant: Arc::new(grant), ended });
        ticket.digests.push(key);
        Ok(token)
    }

    /// A ticket for a new call.
    pub fn ticket(self: &Arc<Self>) -> CallTicket {
        CallTicket { grants: Arc::downgrade(self), digests: Vec::new() }
    }

    /// The grant of `token` and a receiver told when its call ends.
    pub fn lookup(&self, token: &str) -> Result<(Arc<CallGrant>, watch::Receiver<bool>), LookupError> {
        let key = digest(token);
        let inner = self.lock();
        match inner.live.get(&key) {
            Some(entry) if entry.grant.expires <= Instant::now() => Err(LookupError::Expired),
            Some(entry) => Ok((Arc::clone(&entry.grant), entry.ended.subscribe())),
            None if inner.ended.contains_key(&key) => Err(LookupError::CallEnded),
            None => Err(LookupError::Unknown),
        }
    }

    /// Calls with live tokens.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }

    fn end(&self, digests: &[Digest32]) {
        let now = Instant::now();
        let mut inner = self.lock();
        for key in digests {
            if let Some(entry) = inner.live.remove(key) {
                let _ = entry.ended.send(true);
                inner.ended.insert(*key, now);
            }
        }
        inner.ended.retain(|_, at| now.duration_since(*at) < TOMBSTONE_FOR);
        if inner.ended.len() > MAX_TOMBSTONES {
            let mut oldest: Vec<(Digest32, Instant)> = inner.ended.iter().map(|(k, v)| (*k, *v)).collect();
            oldest.sort_by_key(|(_, at)| *at);
            let excess = inner.ended.len() - MAX_TOMBSTONES;
            for (key, _) in oldest.into_iter().take(excess) {
                inner.ended.remove(&key);
            }
        }
    }
}

impl Drop for CallTicket {
    fn drop(&mut self) {
        if let Some(grants) = self.grants.upgrade() {
            grants.end(&self.digests);
        }
    }
}

/// Turns an RFC 3339 expiry (by the database's clock) into an instant on
/// this machine's clock; an unreadable or past one is "now".
pub fn local_expiry(valid_until: &str) -> Instant {
    let now = Instant::now();
    match chrono::DateTime::parse_from_rfc3339(valid_until) {
        Ok(at) => {
            let left = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
            now + left.to_std().unwrap_or(Duration::ZERO)
        }
        Err(_) => now,
    }
}

/// The proxy's cancel keys: what it handed each client instead of the
/// server's, and where the real one goes.
#[derive(Default)]
pub struct CancelKeys {
    keys: Mutex<HashMap<i32, CancelEntry>>,
}

/// The secret handed to the client, the grant, and the server's key.
type CancelEntry = (i32, Arc<CallGrant>, (i32, i32));

impl CancelKeys {
    /// Registers a connection's server key; returns the key for the client.
    pub fn register(&self, grant: Arc<CallGrant>, server_key: (i32, i32)) -> Result<(i32, i32), String> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut random = [0u8; 8];
            getrandom::fill(&mut random).map_err(|e| format!("no randomness for a cancel key: {e}"))?;
            let pid = i32::from_be_bytes([random[0] & 0x7f, random[1], random[2], random[3]]);
            let secret = i32::from_be_bytes([random[4], random[5], random[6], random[7]]);
            if pid != 0 && !keys.contains_key(&pid) {
                keys.insert(pid, (secret, grant, server_key));
                return Ok((pid, secret));
            }
        }
    }

    /// Forgets a connection's key.
    pub fn remove(&self, pid: i32) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
    }

    /// The grant and server key behind a client's key, if it is one the
    /// proxy handed out (the secret compared in constant time).
    pub fn resolve(&self, pid: i32, secret: i32) -> Option<(Arc<CallGrant>, (i32, i32))> {
        use subtle::ConstantTimeEq;
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let (expected, grant, server_key) = keys.get(&pid)?;
        let same: bool = expected.to_be_bytes().ct_eq(&secret.to_be_bytes()).into();
        same.then(|| (Arc::clone(grant), *server_key))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn grant(store: &str, expires: Instant) -> CallGrant {
        CallGrant {
            caller: Caller { sub: "alice".into(), iss: "https://idp".into(), groups: vec![] },
            tool: "lookup".into(),
            correlation: "c1".into(),
            store: store.into(),
            credential: Credential {
                lease_id: "l".into(),
                role: "r".into(),
                password: "p".into(),
                valid_until: "2099-01-01T00:00:00Z".into(),
                host: "127.0.0.1".into(),
                port: 1,
                database: "d".into(),
                ssl_mode: "disable".into(),
                ca_pem: None,
                reused: false,
            },
            allow_copy: false,
            emergency_access: None,
            expires,
        }
    }

    #[tokio::test]
    async fn a_token_lives_exactly_as_long_as_its_call() {
        let grants = Grants::new();
        let mut ticket = grants.ticket();
        let token = grants.issue(grant("ehr", Instant::now() + Duration::from_secs(60)), &mut ticket).unwrap();
        assert_eq!(token.len(), 64);
        let (found, mut ended) = grants.lookup(&token).unwrap();
        assert_eq!(found.store, "ehr");
        assert_eq!(grants.lookup("not-a-token").unwrap_err(), LookupError::Unknown);
        drop(ticket);
        ended.changed().await.unwrap();
        assert!(*ended.borrow());
        assert_eq!(grants.lookup(&token).unwrap_err(), LookupError::CallEnded);
        assert_eq!(grants.live(), 0);
    }

    #[test]
    fn an_expired_credential_opens_nothing() {
        let grants = Grants::new();
        let mut ticket = grants.ticket();
        let token = grants.issue(grant("ehr", Instant::now()), &mut ticket).unwrap();
        assert_eq!(grants.lookup(&token).unwrap_err(), LookupError::Expired);
    }

    #[test]
    fn cancel_keys_need_the_secret() {
        let keys = CancelKeys::default();
        let g = Arc::new(grant("ehr", Instant::now()));
        let (pid, secret) = keys.register(g, (42, 7)).unwrap();
        assert_eq!(keys.resolve(pid, secret).unwrap().1, (42, 7));
        assert!(keys.resolve(pid, secret.wrapping_add(1)).is_none());
        assert!(keys.resolve(pid.wrapping_add(1), secret).is_none());
        keys.remove(pid);
        assert!(keys.resolve(pid, secret).is_none());
    }

    #[test]
    fn expiry_is_read_from_the_database_clock() {
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339();
        let left = local_expiry(&soon).saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(25) && left <= Duration::from_secs(30));
        assert!(local_expiry("garbage") <= Instant::now());
    }
}
