//! Warm logins: roles made ahead of demand, so that an issuance does not pay
//! for PostgreSQL's own PBKDF2.
//!
//! ```text
//!   keep_warm ── pool below target? ──▶ verifier (PBKDF2, blocking thread) ──▶ CREATE ROLE mcpw_w_… NOLOGIN PASSWORD …
//!   issue ── take one ──▶ ALTER ROLE mcpw_w_… RENAME TO mcpw_u_…; LOGIN, VALID UNTIL, GRANT group, COMMENT lease
//!                         (pool empty, or that login gone or no longer inert: CREATE ROLE as before)
//!   reap ── warm logins of no live pool, older than ORPHAN_AFTER ──▶ DROP ROLE
//! ```
//!
//! PostgreSQL runs any SCRAM verifier it is given against the empty password
//! (`CREATE/ALTER ROLE … PASSWORD` refuses an empty one by trying it:
//! `plain_crypt_verify(…, "")`), i.e. 4,096 PBKDF2-SHA-256 rounds in the
//! backend — 8.9 of the 9.3 ms a role-creating transaction costs on the
//! bench machine. A warm login has paid that already: NOLOGIN, member of
//! nothing, its password known only to this process. Claiming one costs the
//! database about a millisecond (1.2 ms in `cargo bench --bench broker`), in the
//! transaction that holds the pair's advisory lock.
//!
//! A warm login can do nothing: it cannot log in, nobody is a member of it
//! (so nobody can `SET ROLE` to it), and it holds no privilege beyond
//! PUBLIC's. Those of a process that is gone are useless (their passwords
//! are lost): the reaper drops any warm login no live pool holds once it is
//! older than [`ORPHAN_AFTER`] (another broker's pool during a rollout is
//! younger than that or is refilled), and a clean shutdown drops its own.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::issuer::{Broker, StoreHandle};
use super::naming;
use super::store::{self, StoreError};

/// Warm logins not in this process's pool are dropped once this old (by the
/// database's clock).
pub const ORPHAN_AFTER: Duration = Duration::from_secs(600);

/// How often the pools are topped up when nothing asks (an issuance that
/// takes a warm login wakes the filler at once).
const REFILL_EVERY: Duration = Duration::from_secs(30);

const COMMENT_PREFIX: &str = "mcp-warden warm login; made ";

/// A warm login held by this process.
pub struct WarmLogin {
    /// Its current (warm) name.
    pub name: String,
    /// Its password (the verifier is in the catalog).
    pub password: String,
}

impl std::fmt::Debug for WarmLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmLogin").field("name", &self.name).finish_non_exhaustive()
    }
}

/// One store's warm logins.
#[derive(Debug)]
pub struct WarmPool {
    logins: Mutex<VecDeque<WarmLogin>>,
    target: usize,
}

impl WarmPool {
    /// A pool kept at `target` logins (0: none, every role is made cold).
    pub fn new(target: usize) -> WarmPool {
        WarmPool { logins: Mutex::new(VecDeque::new()), target }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<WarmLogin>> {
        self.logins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest warm login, if any.
    pub fn take(&self) -> Option<WarmLogin> {
        self.lock().pop_front()
    }

    /// Returns a login to the pool (made, or not claimed after all).
    pub(super) fn put(&self, login: WarmLogin) {
        self.lock().push_back(login);
    }

    /// How many logins it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn missing(&self) -> usize {
        self.target.saturating_sub(self.len())
    }

    fn holds(&self, name: &str) -> bool {
        self.lock().iter().any(|l| l.name == name)
    }

    fn drain(&self) -> Vec<WarmLogin> {
        self.lock().drain(..).collect()
    }
}

/// A role of the warm-login shape found in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmRole {
    /// Its name.
    pub name: String,
    /// Its comment (when it was made).
    pub comment: Option<String>,
    /// Whether it can log in (never, for a warm login; an anomaly).
    pub can_login: bool,
}

/// The comment of a warm login made at `made` (the database's clock).
pub fn comment(made: DateTime<Utc>) -> String {
    format!("{COMMENT_PREFIX}{}", made.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// When a warm login was made, from its comment.
pub fn made(comment: &str) -> Option<DateTime<Utc>> {
    let text = comment.strip_prefix(COMMENT_PREFIX)?;
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

/// Whether the reaper drops a warm-shaped role no live pool of this process
/// holds: one that can log in (never made so by the broker) at once;
/// otherwise once older than [`ORPHAN_AFTER`], or when its age cannot be
/// read.
pub fn is_orphan(role: &WarmRole, now: DateTime<Utc>) -> bool {
    if role.can_login {
        return true;
    }
    match role.comment.as_deref().and_then(made) {
        Some(made) => (now - made).to_std().is_ok_and(|age| age >= ORPHAN_AFTER),
        None => true,
    }
}

impl Broker {
    /// Tops up every store's warm pool; returns how many logins were made.
    /// A store that cannot be reached is skipped (issuances there fail or
    /// are made cold anyway).
    pub async fn warm_up(&self) -> usize {
        let mut made = 0;
        for handle in self.handles() {
            for _ in 0..handle.warm.missing() {
                match make_one(&handle).await {
                    Ok(login) => {
                        handle.warm.put(login);
                        made += 1;
                    }
                    Err(e) => {
                        tracing::warn!(database = %handle.entry.access.store.database, error = %e, "cannot make a warm login");
                        break;
                    }
                }
            }
        }
        self.metrics.warm_logins.set(self.handles().iter().map(|h| h.warm.len() as i64).sum());
        made
    }

    /// Drops warm logins no pool of this process holds and that are older
    /// than [`ORPHAN_AFTER`] (or can log in); returns how many.
    pub(super) async fn reap_warm(&self, handle: &StoreHandle, client: &tokio_postgres::Client) -> usize {
        let (roles, now) = match store::warm_roles(client).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "reaper cannot list warm logins");
                return 0;
            }
        };
        let mut dropped = 0;
        for role in roles.iter().filter(|r| !handle.warm.holds(&r.name) && is_orphan(r, now)) {
            match store::drop_warm(client, &role.name).await {
                Ok(()) => dropped += 1,
                Err(e) => tracing::warn!(error = %e, "dropping a warm login failed; retried next round"),
            }
        }
        dropped
    }

    /// Drops this process's warm logins (at shutdown).
    pub(super) async fn drop_warm_pools(&self) {
        for handle in self.handles() {
            let logins = handle.warm.drain();
            if logins.is_empty() {
                continue;
            }
            let Ok(guard) = handle.client().await else { continue };
            let Some(client) = guard.as_ref() else { continue };
            for login in logins {
                if let Err(e) = store::drop_warm(client, &login.name).await {
                    tracing::warn!(error = %e, "a warm login outlives the broker; the next one's reaper drops it");
                }
            }
        }
        self.metrics.warm_logins.set(0);
    }
}

async fn make_one(handle: &StoreHandle) -> Result<WarmLogin, StoreError> {
    let random = |e: naming::RandomError| StoreError::Unreachable(e.to_string());
    let name = naming::warm_role().map_err(random)?;
    let password = naming::new_password().map_err(random)?;
    let verifier = super::issuer::verifier(&password).await?;
    let mut guard = handle.client().await?;
    let client = guard.as_mut().ok_or_else(|| StoreError::Unreachable("no connection".into()))?;
    let made = store::create_warm(client, &name, &verifier).await;
    if made.as_ref().is_err_and(|e| matches!(e, StoreError::Unreachable(_))) {
        *guard = None;
    }
    made?;
    Ok(WarmLogin { name, password })
}

/// Keeps the pools topped up until the broker is dropped: at once when an
/// issuance took a warm login, else every [`REFILL_EVERY`].
pub async fn keep_warm(broker: Weak<Broker>) {
    loop {
        let Some(strong) = broker.upgrade() else { return };
        strong.warm_up().await;
        let wanted = Arc::clone(&strong.warm_wanted);
        drop(strong);
        let _ = tokio::time::timeout(REFILL_EVERY, wanted.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(comment: Option<String>, can_login: bool) -> WarmRole {
        WarmRole { name: "mcpw_w_0123456789abcdef01234567".into(), comment, can_login }
    }

    #[test]
    fn comments_carry_the_time_they_were_made() {
        let at = DateTime::parse_from_rfc3339("2026-11-26T22:40:01.123456Z").unwrap().with_timezone(&Utc);
        assert_eq!(made(&comment(at)), Some(at));
        assert_eq!(made("mcp-warden warm login; made yesterday"), None);
        assert_eq!(made("0123456789abcdef01234567"), None, "a lease id is no warm comment");
    }

    #[test]
    fn orphans_are_old_unreadable_or_able_to_log_in() {
        let now = Utc::now();
        let young = comment(now - chrono::Duration::seconds(60));
        let old = comment(now - chrono::Duration::seconds(601));
        let future = comment(now + chrono::Duration::seconds(60));
        assert!(!is_orphan(&role(Some(young.clone()), false), now));
        assert!(!is_orphan(&role(Some(future), false), now), "a clock ahead is young, not old");
        assert!(is_orphan(&role(Some(old), false), now));
        assert!(is_orphan(&role(None, false), now));
        assert!(is_orphan(&role(Some("edited".into()), false), now));
        assert!(is_orphan(&role(Some(young), true), now), "a warm name that can log in is never ours");
    }

    #[test]
    fn the_pool_hands_out_oldest_first_and_never_shows_a_password() {
        let pool = WarmPool::new(2);
        assert_eq!(pool.missing(), 2);
        pool.put(WarmLogin { name: "a".into(), password: "secret-a".into() });
        pool.put(WarmLogin { name: "b".into(), password: "secret-b".into() });
        assert_eq!(pool.missing(), 0);
        assert!(pool.holds("b") && !pool.holds("c"));
        let first = pool.take().unwrap();
        assert_eq!(first.name, "a");
        assert!(!format!("{first:?} {pool:?}").contains("secret"));
        assert_eq!(pool.drain().len(), 1);
        assert!(pool.is_empty() && pool.take().is_none());
    }
}
