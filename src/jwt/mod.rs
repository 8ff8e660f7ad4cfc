//! JWT verification against an issuer's JWKS, shared by the sidecar (every
//! request's bearer token) and the broker (the caller's token a sidecar
//! forwards with a credential request).
//!
//! A token must be signed by a key of the issuer's JWKS with that key's own
//! algorithm (no `none`, no HMAC with a public key), issued by the
//! configured issuer, for the server's resource URI (`aud`, RFC 8707),
//! within `nbf`/`exp` (30 s leeway), and carry every required scope. No part
//! of a token appears in a log, a record or an error message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Validation, decode, decode_header};
use serde_json::{Map, Value};

use crate::jwks::{VerificationKey, verification_keys};
use crate::policy::{Caller, CompiledAuthentication};

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Least time between two key reloads triggered by unknown `kid`s.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// Why a request is not authenticated. Reasons are classes, never token
/// contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No `Authorization` header.
    #[error("no bearer token")]
    Missing,
    /// A token in the query string (forbidden by the MCP authorization spec).
    #[error("access tokens must not be sent in the query string")]
    TokenInQuery,
    /// The token is unacceptable.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// Valid, but without every required scope.
    #[error("insufficient scope")]
    InsufficientScope(Vec<String>),
}

impl AuthnError {
    /// The audit reason class.
    pub fn reason(&self) -> String {
        match self {
            AuthnError::Missing => "no token".into(),
            AuthnError::TokenInQuery => "token in query string".into(),
            AuthnError::Invalid(why) => format!("invalid token: {why}"),
            AuthnError::InsufficientScope(_) => "insufficient scope".into(),
        }
    }
}

/// Where the JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file (the operator's ConfigMap, mounted).
    File(PathBuf),
    /// A URL (https, or http on loopback for laptops and tests).
    Url(String),
    /// A JWKS document held in memory (the broker's copy of a ConfigMap or
    /// Secret); reloading re-reads the same text.
    Inline {
        /// Where the text came from, for messages.
        origin: String,
        /// The JWKS document.
        text: String,
    },
}

/// The current keys, reloaded (rate-limited) when a token names an unknown
/// `kid`, so issuer key rotation needs no restart.
pub struct Keys {
    source: KeySource,
    current: RwLock<Arc<Vec<VerificationKey>>>,
    last_reload: Mutex<Option<Instant>>,
    http: reqwest::Client,
}

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Reading or fetching failed.
    #[error("cannot load the JWKS from {source_name}: {message}")]
    Load {
        /// The file or URL.
        source_name: String,
        /// Why.
        message: String,
    },
    /// A JWKS URL that is neither https nor loopback http.
    #[error("JWKS URL must be https (or http on 127.0.0.1/localhost): {0}")]
    InsecureUrl(String),
}

impl Keys {
    /// Loads the keys once; fails if they cannot be loaded.
    pub async fn load(source: KeySource) -> Result<Self, KeysError> {
        if let KeySource::Url(url) = &source
            && !(url.starts_with("https://")
                || url.starts_with("http://127.0.0.1")
                || url.starts_with("http://localhost")
                || url.starts_with("http://[::1]"))
        {
            return Err(KeysError::InsecureUrl(url.clone()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| KeysError::Load { source_name: "HTTP client".into(), message: e.to_string() })?;
        let keys = Keys { source, current: RwLock::new(Arc::new(Vec::new())), last_reload: Mutex::new(None), http };
        let loaded = keys.fetch().await?;
        *keys.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(keys)
    }

    async fn fetch(&self) -> Result<Vec<VerificationKey>, KeysError> {
        let (name, text) = match &self.source {
            KeySource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| KeysError::Load { source_name: path.display().to_string(), message: e.to_string() })?;
                (path.display().to_string(), text)
            }
            KeySource::Url(url) => {
                let load = |message: String| KeysError::Load { source_name: url.clone(), message };
                let response = self.http.get(url).send().await.map_err(|e| load(e.to_string()))?;
                if !response.status().is_success() {
                    return Err(load(format!("HTTP {}", response.status().as_u16())));
                }
                (url.clone(), response.text().await.map_err(|e| load(e.to_string()))?)
            }
            KeySource::Inline { origin, text } => (origin.clone(), text.clone()),
        };
        verification_keys(&text).map_err(|e| KeysError::Load { source_name: name, message: e.to_string() })
    }

    fn snapshot(&self) -> Arc<Vec<VerificationKey>> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reloads if the last reload is old enough; returns whether it did.
    pub async fn reload_if_due(&self) -> bool {
        {
            let mut last = self.last_reload.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RELOAD_INTERVAL) {
                return false;
            }
            *last = Some(Instant::now());
        }
        match self.fetch().await {
            Ok(keys) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS reload failed; keeping the current keys");
                false
            }
        }
    }

    /// Number of keys loaded.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// Whether no key is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most tokens remembered as verified.
pub const CACHE_CAPACITY: usize = 10_000;

/// A verified token: who it is, until when.
#[derive(Clone)]
struct Verified {
    caller: Caller,
    expires: u64,
}

/// Verifies bearer tokens for one MCP server.
///
/// A token that verified is remembered (by its SHA-256, never the token)
/// until its `exp`, so a caller's next requests skip the signature check;
/// the memory is dropped when the keys are reloaded or the settings change.
pub struct Authenticator {
    keys: Keys,
    settings: RwLock<CompiledAuthentication>,
    verified: Mutex<std::collections::HashMap<[u8; 32], Verified>>,
    key_generation: std::sync::atomic::AtomicU64,
    full_checks: std::sync::atomic::AtomicU64,
}

impl Authenticator {
    /// An authenticator for the policy's issuer, audience and scopes.
    pub fn new(keys: Keys, settings: CompiledAuthentication) -> Self {
        Authenticator {
            keys,
            settings: RwLock::new(settings),
            verified: Mutex::new(std::collections::HashMap::new()),
            key_generation: std::sync::atomic::AtomicU64::new(0),
            full_checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many tokens were checked in full (signature and claims).
    pub fn full_checks(&self) -> u64 {
        self.full_checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn forget_verified(&self) {
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The settings in force.
    pub fn settings(&self) -> CompiledAuthentication {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the settings (a reloaded policy).
    pub fn set_settings(&self, settings: CompiledAuthentication) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
        self.forget_verified();
    }

    /// Verifies one token (or finds it verified and unexpired).
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthnError> {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.verified.lock().unwrap_or_else(|p| p.into_inner()).get(&digest).cloned()
            && now < hit.expires
        {
            return Ok(hit.caller);
        }
        let generation = self.key_generation.load(std::sync::atomic::Ordering::Relaxed);
        let (caller, expires) = self.verify_signed(token).await?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        // Not remembered if the keys changed while it was being checked.
        if generation == self.key_generation.load(std::sync::atomic::Ordering::Relaxed) {
            if verified.len() >= CACHE_CAPACITY {
                verified.clear();
            }
            verified.insert(digest, Verified { caller: caller.clone(), expires });
        }
        Ok(caller)
    }

    /// The full check: signature, claims, scopes. Returns the caller and `exp`.
    async fn verify_signed(&self, token: &str) -> Result<(Caller, u64), AuthnError> {
        self.full_checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if declared_alg(token).is_some_and(|alg| alg.eq_ignore_ascii_case("none")) {
            return Err(AuthnError::Invalid("unsupported algorithm"));
        }
        let header = decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName => AuthnError::Invalid("unsupported algorithm"),
            _ => AuthnError::Invalid("malformed"),
        })?;
        let mut keys = self.keys.snapshot();
        if find_key(&keys, header.kid.as_deref()).is_none() && self.keys.reload_if_due().await {
            self.key_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.forget_verified();
            keys = self.keys.snapshot();
        }
        let key = find_key(&keys, header.kid.as_deref()).ok_or(AuthnError::Invalid("unknown signing key"))?;
        if header.alg != key.algorithm {
            return Err(AuthnError::Invalid("algorithm does not match the key"));
        }
        let settings = self.settings();
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = decode::<Map<String, Value>>(token, &key.key, &validation).map_err(|e| {
            AuthnError::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not yet valid",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::InvalidAlgorithm => "algorithm does not match the key",
                ErrorKind::MissingRequiredClaim(_) => "missing claim",
                _ => "malformed",
            })
        })?;
        let claims = data.claims;
        let sub = claims.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty());
        let subject = sub.ok_or(AuthnError::Invalid("missing claim"))?.to_string();
        let scopes =
            strings(claims.get("scope")).into_iter().chain(strings(claims.get("scp"))).collect::<BTreeSet<_>>();
        let missing: Vec<String> = settings.required_scopes.iter().filter(|s| !scopes.contains(*s)).cloned().collect();
        if !missing.is_empty() {
            return Err(AuthnError::InsufficientScope(settings.required_scopes.iter().cloned().collect()));
        }
        // Groups are names, not a space-delimited list like `scope`: a
        // group "Front Desk" must not make its members "Front" and "Desk".
        let groups = match claims.get(&settings.groups_claim) {
            Some(Value::String(group)) => vec![group.clone()],
            other => strings(other),
        };
        let expires = claims.get("exp").and_then(Value::as_u64).ok_or(AuthnError::Invalid("missing claim"))?;
        let mut caller = Caller::new(subject, groups);
        caller.claims = rule_claims(&claims, &settings.rule_claims);
        Ok((caller, expires))
    }
}

/// Longest claim string argument rules see, in bytes.
const MAX_RULE_CLAIM_BYTES: usize = 256;
/// Most strings in a list claim argument rules see.
const MAX_RULE_CLAIM_ITEMS: usize = 64;

/// The claims the policy names for argument rules, each with a usable
/// value: a string, number, boolean or list of strings, within bounds. Any
/// other value is left out, so a rule reading it refuses the call (fail
/// closed) rather than judge a truncated value.
fn rule_claims(claims: &Map<String, Value>, named: &BTreeSet<String>) -> BTreeMap<String, Value> {
    let short = |v: &Value| v.as_str().is_some_and(|s| s.len() <= MAX_RULE_CLAIM_BYTES);
    named
        .iter()
        .filter_map(|name| {
            let value = claims.get(name)?;
            let usable = match value {
                Value::String(_) => short(value),
                Value::Number(_) | Value::Bool(_) => true,
                Value::Array(items) => items.len() <= MAX_RULE_CLAIM_ITEMS && items.iter().all(short),
                Value::Null | Value::Object(_) => false,
            };
            usable.then(|| (name.clone(), value.clone()))
        })
        .collect()
}

/// The `alg` a token's header declares, read before any library parsing so
/// an unsigned token is named for what it is.
fn declared_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let segment = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()?;
    let header: Value = serde_json::from_slice(&bytes).ok()?;
    header.get("alg")?.as_str().map(str::to_string)
}

fn find_key<'a>(keys: &'a [VerificationKey], kid: Option<&str>) -> Option<&'a VerificationKey> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
        // Without a kid, only an unambiguous key set will do.
        None if keys.len() == 1 => keys.first(),
        None => None,
    }
}

/// A claim as a list of strings: an array of strings, or a space-separated
/// string (the `scope` convention).
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
