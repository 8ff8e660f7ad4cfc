//! Break-glass grants for the gateway. The sidecar has no API access, and
//! its policy ConfigMap reaches pods late (and is hashed into the pod
//! template), so grants come from the broker, which watches them and judges
//! them again: asked per caller when a decision needs them, cached for a
//! few seconds, never used past their end.
//!
//! ```text
//!   decision needs grants? (the server has a procedure; tools/list, or a
//!   tools/call of a procedure tool the policy does not open to the caller)
//!     └─ cache (≤ 5 s per subject) ─ miss ─▶ broker POST /v1/emergency-grants
//!   → the grants whose end is still ahead, for this caller only
//! ```
//!
//! A broker that cannot be asked means no grant (fail closed); nothing of
//! the caller is logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::breakglass::{self, ActiveGrant};
use crate::broker::client::BrokerClient;
use crate::policy::{Caller, CompiledPolicy};

/// How long a caller's grants are reused before the broker is asked again.
pub const CACHE_FOR: Duration = Duration::from_secs(5);

/// Subjects cached at most; beyond, stale entries are dropped.
const MAX_CACHED: usize = 4096;

/// The grants source of one sidecar.
pub struct EmergencyGrants {
    broker: BrokerClient,
    cache: Mutex<HashMap<String, (Instant, Vec<ActiveGrant>)>>,
}

/// Whether deciding this message may depend on a grant.
pub fn needs_grants(policy: &CompiledPolicy, caller: &Caller, method: Option<&str>, params: Option<&Value>) -> bool {
    if policy.emergency_tools.is_empty() {
        return false;
    }
    match method {
        Some("tools/list") => true,
        Some("tools/call") => {
            let name = params.and_then(|p| p.get("name")).and_then(Value::as_str).unwrap_or_default();
            policy.emergency_tools.contains(name)
                && (policy.break_glass_only(name) || policy.tools.get(name).is_some_and(|t| !t.callers.admits(caller)))
        }
        _ => false,
    }
}

impl EmergencyGrants {
    /// Grants asked of `broker`.
    pub fn new(broker: BrokerClient) -> Self {
        EmergencyGrants { broker, cache: Mutex::new(HashMap::new()) }
    }

    /// The grants of `server` in force now for `subject`.
    pub async fn of(&self, server: &str, subject: &str) -> Vec<ActiveGrant> {
        let now = Instant::now();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subject)
            .filter(|(at, _)| now.duration_since(*at) < CACHE_FOR)
            .map(|(_, grants)| grants.clone());
        let grants = match cached {
            Some(grants) => grants,
            None => match self.broker.emergency_grants(server, subject).await {
                Ok(grants) => {
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if cache.len() >= MAX_CACHED {
                        cache.retain(|_, (at, _)| now.duration_since(*at) < CACHE_FOR);
                    }
                    cache.insert(subject.to_string(), (now, grants.clone()));
                    grants
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the broker could not say which emergency grants are in force; none is honoured");
                    Vec::new()
                }
            },
        };
        let now = breakglass::now();
        grants.into_iter().filter(|g| g.beneficiary == subject && now < g.expires_at.0).collect()
    }
}
