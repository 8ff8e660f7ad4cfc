//! What this operator wrote that its caches may not show yet.
//!
//! ```text
//!   apply / status write / delete ─▶ RecentWrites ──┐
//!                                                    ├─ resolve ─▶ the newer of the two
//!   watch event ─▶ reflector cache ──────────────────┘
//! ```
//!
//! A reconcile reads the caches, but the watch event of its own last write
//! travels on another connection and may arrive after the next reconcile has
//! started; planning from the older cached object would write the same
//! object again. Every answer to a write carries the object and its new
//! resourceVersion; that answer serves until the cache holds that version
//! or a later one (client-go's mutation cache does the same). Comparing
//! resourceVersions as integers is what client-go's integer mutation cache
//! assumes; a version that is not an integer is never trusted over the
//! cache. Entries expire, so a lost event cannot hide the cluster for long.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long an answer may stand in for a cache that has not caught up.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// `(kind, namespace, name)`.
pub type Key = (String, String, String);

#[derive(Debug, Clone)]
enum Entry {
    Written { version: u64, object: Value, at: Instant },
    Deleted { version: Option<u64>, at: Instant },
}

impl Entry {
    fn at(&self) -> Instant {
        match self {
            Entry::Written { at, .. } | Entry::Deleted { at, .. } => *at,
        }
    }
}

/// The answers to this process's recent writes.
#[derive(Debug)]
pub struct RecentWrites {
    entries: Mutex<HashMap<Key, Entry>>,
    ttl: Duration,
}

impl Default for RecentWrites {
    fn default() -> Self {
        Self::with_ttl(DEFAULT_TTL)
    }
}

/// The resourceVersion of an object as an integer, when it is one.
pub fn version_of(object: &Value) -> Option<u64> {
    object.pointer("/metadata/resourceVersion")?.as_str()?.parse().ok()
}

impl RecentWrites {
    /// Entries serve for at most `ttl`.
    pub fn with_ttl(ttl: Duration) -> Self {
        RecentWrites { entries: Mutex::new(HashMap::new()), ttl }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the API server's answer to a write of `key`.
    pub fn written(&self, key: Key, answer: Value) {
        match version_of(&answer) {
            Some(version) => {
                self.lock().insert(key, Entry::Written { version, object: answer, at: Instant::now() });
            }
            None => {
                self.lock().remove(&key);
            }
        }
    }

    /// Remembers that `key` was deleted; `last` is the version it had.
    pub fn deleted(&self, key: Key, last: Option<u64>) {
        self.lock().insert(key, Entry::Deleted { version: last, at: Instant::now() });
    }

    /// The object as this process last knew it: the cache's, unless an
    /// answer to a write of ours is newer than the cache.
    pub fn resolve(&self, key: &Key, cached: Option<Value>) -> Option<Value> {
        self.resolve_at(key, cached, Instant::now())
    }

    fn resolve_at(&self, key: &Key, cached: Option<Value>, now: Instant) -> Option<Value> {
        let mut entries = self.lock();
        let Some(entry) = entries.get(key) else { return cached };
        if now.saturating_duration_since(entry.at()) > self.ttl {
            entries.remove(key);
            return cached;
        }
        let cached_version = cached.as_ref().map(version_of);
        match (entry, cached_version) {
            // The cache holds our write or something later.
            (Entry::Written { version, .. }, Some(Some(seen))) if seen >= *version => {
                entries.remove(key);
                cached
            }
            // A version we cannot order: the cache is the authority.
            (Entry::Written { .. }, Some(None)) => {
                entries.remove(key);
                cached
            }
            (Entry::Written { object, .. }, _) => Some(object.clone()),
            (Entry::Deleted { .. }, None) => {
                entries.remove(key);
                None
            }
            // Created again after our delete.
            (Entry::Deleted { version: Some(gone), .. }, Some(Some(seen))) if seen > *gone => {
                entries.remove(key);
                cached
            }
            (Entry::Deleted { .. }, Some(_)) => None,
        }
    }

    /// Entries held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> Key {
        ("Deployment".into(), "clinic".into(), "patient-lookup".into())
    }

    fn at(version: &str, image: &str) -> Value {
        json!({"metadata": {"resourceVersion": version}, "spec": {"image": image}})
    }

    #[test]
    fn an_answer_serves_until_the_cache_catches_up() {
        let recent = RecentWrites::default();
        recent.written(key(), at("12", "new"));
        // The cache still holds the version before our write, or nothing.
        assert_eq!(recent.resolve(&key(), Some(at("9", "old"))), Some(at("12", "new")));
        assert_eq!(recent.resolve(&key(), None), Some(at("12", "new")));
        // Our write arrived (or a later one): the cache rules again.
        assert_eq!(recent.resolve(&key(), Some(at("14", "edited"))), Some(at("14", "edited")));
        assert!(recent.is_empty());
        assert_eq!(recent.resolve(&key(), Some(at("9", "old"))), Some(at("9", "old")));
    }

    #[test]
    fn a_delete_hides_the_cached_object_until_it_is_gone_or_made_again() {
        let recent = RecentWrites::default();
        recent.deleted(key(), Some(20));
        assert_eq!(recent.resolve(&key(), Some(at("20", "x"))), None);
        assert_eq!(recent.resolve(&key(), Some(at("25", "y"))), Some(at("25", "y")), "created again");
        recent.deleted(key(), Some(20));
        assert_eq!(recent.resolve(&key(), None), None);
        assert!(recent.is_empty());
    }

    #[test]
    fn entries_expire_and_unorderable_versions_defer_to_the_cache() {
        let recent = RecentWrites::with_ttl(Duration::from_secs(1));
        recent.written(key(), at("12", "new"));
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(recent.resolve_at(&key(), Some(at("9", "old")), later), Some(at("9", "old")));
        recent.written(key(), at("12", "new"));
        assert_eq!(recent.resolve(&key(), Some(at("opaque", "c"))), Some(at("opaque", "c")));
        recent.written(key(), at("not-a-number", "x"));
        assert!(recent.is_empty());
    }
}
