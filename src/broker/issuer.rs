//! Issuing, reusing, revoking and reaping login roles.
//!
//! ```text
//!   request ─ server known? ─ tool known? ─ tool reads this store? ─ caller token verified here?
//!           ─ caller admitted to the tool (or under a break-glass grant in force, the role ending with it)?
//!           ─ pair slot (one per caller × tool × store [× grant], locked)
//!               ├─ cached and far from expiry ─▶ record `reused` ─▶ credential
//!               └─ else: group role in line ─▶ CREATE ROLE … IN ROLE group ─▶ record `issued` ─▶ credential
//!                                                                  (record failed ─▶ role ended, error)
//! ```
//!
//! The pair slot is an async mutex, so concurrent first requests for one
//! pair create one role. Nothing here is needed after a restart: expired
//! roles are found in `pg_roles` by their name shape.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::grants::Grant;
use super::inventory::{Inventory, StoreEntry, StoreRef};
use super::metrics::BrokerMetrics;
use super::naming::{self, RandomError};
use super::store::{self, LoginPassword, StoreAccess, StoreError};
use super::trail::{LeaseFacts, Trail, lease_event};
use super::warm::WarmPool;
use crate::api::PHIStoreStatus;
use crate::audit::record::{Caller as AuditCaller, Decision, Event, Kind, LeaseAction, format_time};
use crate::audit::wal::WalError;
use crate::jwt::{Authenticator, KeySource, Keys};
use crate::policy::ServerRef;

/// Operational settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A cap on every lease's lifetime, below the policy's own
    /// `credentials.ttl` (which the CRD caps at 1h).
    pub max_ttl: Option<Duration>,
    /// `CONNECTION LIMIT` of each login role.
    pub connection_limit: u32,
    /// Warm logins kept per store (`super::warm`); 0 makes every role cold.
    pub warm_logins: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_ttl: None, connection_limit: 4, warm_logins: 0 }
    }
}

/// A cached lease is handed out again only while at least this share of
/// its lifetime remains; after that a new role is issued.
const REUSE_WHILE_REMAINING: f64 = 1.0 / 3.0;

/// What a sidecar asks for.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialRequest {
    /// The MCPServer, `namespace/name`.
    pub server: String,
    /// The tool being called.
    pub tool: String,
    /// The PHIStore (by name, in the server's namespace).
    pub store: String,
    /// The caller's bearer token, as the sidecar received it: the broker
    /// verifies it itself.
    pub caller_token: String,
    /// The sidecar's correlation id of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<String>,
}

impl std::fmt::Debug for CredentialRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRequest")
            .field("server", &self.server)
            .field("tool", &self.tool)
            .field("store", &self.store)
            .field("correlation", &self.correlation)
            .finish_non_exhaustive()
    }
}

/// What the broker returns: a login role and where to use it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    /// Opaque lease id (the role's comment; in the audit trail).
    pub lease_id: String,
    /// The role to log in as.
    pub role: String,
    /// Its password.
    pub password: String,
    /// Expiry by the database's clock (RFC 3339).
    pub valid_until: String,
    /// Host of the store.
    pub host: String,
    /// Port of the store.
    pub port: u16,
    /// Database.
    pub database: String,
    /// libpq sslmode to use.
    pub ssl_mode: String,
    /// PEM CA bundle to verify the store with (`verify-full`); the system
    /// roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Whether this lease was handed out before.
    pub reused: bool,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("lease_id", &self.lease_id)
            .field("role", &self.role)
            .field("valid_until", &self.valid_until)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused. Messages never hold a token or password.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request itself is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No such MCPServer.
    #[error("unknown MCPServer {0}")]
    UnknownServer(String),
    /// The MCPServer exists but cannot be served (its policy is broken).
    #[error("MCPServer {server} cannot be served: {reason}")]
    ServerUnusable {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// The tool is not in the server's policy.
    #[error("tool {tool:?} is not in the policy of {server}")]
    UnknownTool {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
    },
    /// The tool declares no access to this store.
    #[error("tool {tool:?} declares no access to PHIStore {store:?}")]
    NoStoreAccess {
        /// The tool.
        tool: String,
        /// The store.
        store: String,
    },
    /// The caller's token did not verify here.
    #[error("caller token refused: {0}")]
    CallerNotVerified(String),
    /// The caller may not use the tool.
    #[error("the caller is not allowed to use tool {0:?}")]
    CallerNotAllowed(String),
    /// The store cannot be used (no admin Secret, unreachable, …).
    #[error("PHIStore {store}: {reason}")]
    StoreUnavailable {
        /// The store.
        store: String,
        /// Why.
        reason: String,
    },
    /// A database operation failed.
    #[error("PHIStore {store}: {source}")]
    Store {
        /// The store.
        store: String,
        /// The failure.
        source: StoreError,
    },
    /// The audit record could not be made durable; nothing was handed out.
    #[error("audit trail unavailable, no credential issued: {0}")]
    Audit(#[from] WalError),
    /// The random source failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// What was asked for does not exist (e.g. a pseudonym).
    #[error("not found: {0}")]
    NotFound(String),
    /// The person may not do this (an access review said no).
    #[error("not authorized: {0}")]
    NotAuthorized(String),
}

impl BrokerError {
    /// HTTP status of the refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            BrokerError::InvalidRequest(_) => 400,
            BrokerError::UnknownServer(_) | BrokerError::UnknownTool { .. } | BrokerError::NotFound(_) => 404,
            BrokerError::NoStoreAccess { .. }
            | BrokerError::NotAuthorized(_)
            | BrokerError::CallerNotVerified(_)
            | BrokerError::CallerNotAllowed(_) => 403,
            BrokerError::ServerUnusable { .. }
            | BrokerError::StoreUnavailable { .. }
            | BrokerError::Store { .. }
            | BrokerError::Audit(_) => 503,
            BrokerError::Random(_) => 500,
        }
    }

    /// Stable class (API error code and metric label).
    pub fn class(&self) -> &'static str {
        match self {
            BrokerError::InvalidRequest(_) => "invalid_request",
            BrokerError::UnknownServer(_) => "unknown_server",
            BrokerError::ServerUnusable { .. } => "server_unusable",
            BrokerError::UnknownTool { .. } => "unknown_tool",
            BrokerError::NoStoreAccess { .. } => "no_store_access",
            BrokerError::CallerNotVerified(_) => "caller_not_verified",
            BrokerError::CallerNotAllowed(_) => "caller_not_allowed",
            BrokerError::StoreUnavailable { .. } => "store_unavailable",
            BrokerError::Store { source, .. } => source.class(),
            BrokerError::Audit(_) => "audit_unavailable",
            BrokerError::Random(_) => "random",
            BrokerError::NotFound(_) => "not_found",
            BrokerError::NotAuthorized(_) => "not_authorized",
        }
    }
}

/// How far a request got, for its refusal record.
#[derive(Default)]
struct Seen {
    server: Option<ServerRef>,
    tool_known: bool,
    store_known: bool,
    unauthenticated: bool,
    caller: Option<AuditCaller>,
    /// The break-glass grant the request is served under.
    grant: Option<String>,
}

/// Identifies a pair slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PairKey {
    server: ServerRef,
    store: String,
    tool: String,
    issuer: String,
    subject: String,
    /// Leases under a grant are never mixed with others (they end with it).
    grant: Option<String>,
}

/// A lease handed out and still usable.
#[derive(Clone)]
struct Cached {
    credential: Credential,
    /// Local deadline for reuse (monotonic clock).
    reuse_until: Instant,
}

/// Admin connections kept per store. Fresh issuances to one store run on
/// up to this many connections at once (opened as concurrency needs them).
pub const ADMIN_CONNECTIONS: usize = 4;

/// One store: a small pool of admin connections and what was proven of it.
pub(super) struct StoreHandle {
    pub(super) entry: StoreEntry,
    conns: Vec<tokio::sync::Mutex<Option<Client>>>,
    next: std::sync::atomic::AtomicUsize,
    /// Held while group roles' grants are checked or changed: grant DDL on
    /// one group from two connections at once would race.
    pub(super) group_ddl: tokio::sync::Mutex<()>,
    /// Group roles proven to hold exactly these grants.
    synced: Mutex<HashMap<String, BTreeSet<Grant>>>,
    /// Whether this handle's first de-identification pass (which maps every
    /// existing key) has run.
    pub(super) deid_backfilled: std::sync::atomic::AtomicBool,
    /// Roles made ahead of demand.
    pub(super) warm: WarmPool,
}

impl StoreHandle {
    fn new(entry: StoreEntry, warm_logins: usize) -> Self {
        StoreHandle {
            warm: WarmPool::new(warm_logins),
            entry,
            conns: (0..ADMIN_CONNECTIONS).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
            group_ddl: tokio::sync::Mutex::new(()),
            synced: Mutex::new(HashMap::new()),
            deid_backfilled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// An admin connection: the first idle one, else the next in turn once
    /// it is free; opened if needed. A burst opens more connections; one
    /// request at a time keeps using the first.
    pub(super) async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, StoreError> {
        let mut guard = match self.conns.iter().find_map(|c| c.try_lock().ok()) {
            Some(idle) => idle,
            None => {
                let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
                self.conns[turn].lock().await
            }
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(store::connect(&self.entry.access).await?);
        }
        Ok(guard)
    }

    pub(super) fn is_synced(&self, group: &str, grants: &BTreeSet<Grant>) -> bool {
        self.synced.lock().unwrap_or_else(|p| p.into_inner()).get(group) == Some(grants)
    }

    pub(super) fn mark_synced(&self, group: &str, grants: Option<&BTreeSet<Grant>>) {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        match grants {
            Some(g) => synced.insert(group.to_string(), g.clone()),
            None => synced.remove(group),
        };
    }
}

/// The broker: inventory, stores, pair slots and the trail.
pub struct Broker {
    pub(super) inventory: RwLock<Arc<Inventory>>,
    authenticators: Mutex<HashMap<ServerRef, (KeySource, Arc<Authenticator>)>>,
    pub(super) stores: Mutex<HashMap<StoreRef, Arc<StoreHandle>>>,
    slots: Mutex<HashMap<PairKey, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
    /// Roles revoked or reaped recently, never to be handed out again.
    ended: Mutex<HashMap<String, Instant>>,
    pub(super) trail: Trail,
    pub(super) settings: Settings,
    pub(super) metrics: BrokerMetrics,
    pub(super) reports: RwLock<BTreeMap<StoreRef, PHIStoreStatus>>,
    /// Woken when an issuance took a warm login.
    pub(super) warm_wanted: Arc<tokio::sync::Notify>,
}

impl Broker {
    /// The broker's audit trail.
    pub fn trail(&self) -> &Trail {
        &self.trail
    }

    /// A broker over an inventory (call [`Broker::sync`] before serving).
    pub fn new(inventory: Inventory, trail: Trail, settings: Settings, metrics: BrokerMetrics) -> Broker {
        let broker = Broker {
            inventory: RwLock::new(Arc::new(Inventory::default())),
            authenticators: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
            trail,
            settings,
            metrics,
            reports: RwLock::new(BTreeMap::new()),
            warm_wanted: Arc::new(tokio::sync::Notify::new()),
        };
        broker.install(inventory);
        broker
    }

    /// The inventory in force.
    pub fn inventory(&self) -> Arc<Inventory> {
        Arc::clone(&self.inventory.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the inventory; returns the previous one. Store handles whose
    /// connection facts or credential changed are replaced.
    pub(super) fn install(&self, inventory: Inventory) -> Arc<Inventory> {
        {
            let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
            stores.retain(|key, handle| {
                matches!(inventory.stores.get(key), Some(Ok(e)) if same_access(&e.access, &handle.entry.access))
            });
            for (key, entry) in &inventory.stores {
                if let Ok(entry) = entry
                    && !stores.contains_key(key)
                {
                    stores.insert(key.clone(), Arc::new(StoreHandle::new(entry.clone(), self.settings.warm_logins)));
                }
            }
        }
        let new = Arc::new(inventory);
        std::mem::replace(&mut *self.inventory.write().unwrap_or_else(|p| p.into_inner()), new)
    }

    /// Every store handle.
    pub(super) fn handles(&self) -> Vec<Arc<StoreHandle>> {
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub(super) fn store(&self, key: &StoreRef) -> Result<Arc<StoreHandle>, BrokerError> {
        if let Some(handle) = self.stores.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            return Ok(Arc::clone(handle));
        }
        let reason = match self.inventory().stores.get(key) {
            Some(Err(reason)) => reason.clone(),
            _ => "no such PHIStore".to_string(),
        };
        Err(BrokerError::StoreUnavailable { store: key.to_string(), reason })
    }

    async fn authenticator(
        &self,
        server: &ServerRef,
        keys: &KeySource,
        settings: &crate::policy::CompiledAuthentication,
    ) -> Result<Arc<Authenticator>, BrokerError> {
        if let Some((source, auth)) = self.authenticators.lock().unwrap_or_else(|p| p.into_inner()).get(server)
            && source == keys
        {
            if auth.settings() != *settings {
                auth.set_settings(settings.clone());
            }
            return Ok(Arc::clone(auth));
        }
        let loaded = Keys::load(keys.clone())
            .await
            .map_err(|e| BrokerError::ServerUnusable { server: server.to_string(), reason: e.to_string() })?;
        let auth = Arc::new(Authenticator::new(loaded, settings.clone()));
        self.authenticators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server.clone(), (keys.clone(), Arc::clone(&auth)));
        Ok(auth)
    }

    /// Serves one credential request (see the module diagram). Every
    /// refusal for a known server is a decision record in its stream; if
    /// that record cannot be written, the answer is the audit failure.
    pub async fn issue(&self, request: &CredentialRequest) -> Result<Credential, BrokerError> {
        let started = Instant::now();
        let mut seen = Seen::default();
        let mut result = self.issue_inner(request, &mut seen).await;
        if let (Err(refusal), Some(server)) = (&result, &seen.server)
            && !matches!(refusal, BrokerError::Audit(_))
            && let Err(e) = self.record_refusal(server, request, &seen, refusal).await
        {
            result = Err(e.into());
        }
        self.metrics.issue(started.elapsed(), result.as_ref().map(|c| c.reused).map_err(BrokerError::class));
        result
    }

    async fn issue_inner(&self, request: &CredentialRequest, seen: &mut Seen) -> Result<Credential, BrokerError> {
        // The correlation id goes into the trail verbatim: an id, not text.
        if request.correlation.as_ref().is_some_and(|c| !is_correlation_id(c)) {
            return Err(BrokerError::InvalidRequest(
                "correlation must be 1-128 characters of A-Z a-z 0-9 - _ . :".into(),
            ));
        }
        let inventory = self.inventory();
        let server = parse_server(&request.server).ok_or_else(|| BrokerError::UnknownServer(request.server.clone()))?;
        let entry = match inventory.servers.get(&server) {
            None => return Err(BrokerError::UnknownServer(request.server.clone())),
            Some(Err(reason)) => {
                return Err(BrokerError::ServerUnusable { server: request.server.clone(), reason: reason.clone() });
            }
            Some(Ok(entry)) => entry,
        };
        seen.server = Some(server.clone());
        let policy = &entry.policy;
        let tool = policy
            .tools
            .get(&request.tool)
            .ok_or_else(|| BrokerError::UnknownTool { server: request.server.clone(), tool: request.tool.clone() })?;
        seen.tool_known = true;
        let Some(tables) = tool.data_access.get(&request.store) else {
            return Err(BrokerError::NoStoreAccess { tool: request.tool.clone(), store: request.store.clone() });
        };
        seen.store_known = true;
        let authenticator = self.authenticator(&server, &entry.keys, &policy.authentication).await?;
        let caller = authenticator.verify(&request.caller_token).await.map_err(|e| {
            seen.unauthenticated = true;
            BrokerError::CallerNotVerified(e.reason())
        })?;
        let audit_caller = AuditCaller {
            sub: caller.subject.clone(),
            iss: policy.authentication.issuer.clone(),
            groups: caller.groups.iter().cloned().collect(),
        };
        seen.caller = Some(audit_caller.clone());
        // Break-glass: a caller the policy does not admit may use the tool
        // under a grant in force for exactly this subject and tool.
        // An Identified tool in the procedure is served under a grant only.
        let grant = if tool.callers.admits(&caller) && !policy.break_glass_only(&request.tool) {
            None
        } else {
            let grant = inventory.grant_for(&server, &caller.subject, &request.tool);
            Some(grant.ok_or_else(|| BrokerError::CallerNotAllowed(request.tool.clone()))?.clone())
        };
        seen.grant = grant.as_ref().map(|g| g.name.clone());
        let store_key = StoreRef { namespace: server.namespace.clone(), name: request.store.clone() };
        let handle = self.store(&store_key)?;
        let grants = super::grants::desired(tables)
            .map_err(|reason| BrokerError::ServerUnusable { server: request.server.clone(), reason })?;
        let ttl = self.ttl(policy.credential_ttl_seconds);
        // Under a grant the role ends no later than the grant.
        let ttl = match &grant {
            Some(g) => {
                let left = g.expires_at.0.duration_since(crate::breakglass::now());
                let left = Duration::try_from(left).unwrap_or_default();
                if left < Duration::from_secs(1) {
                    return Err(BrokerError::CallerNotAllowed(request.tool.clone()));
                }
                ttl.min(left)
            }
            None => ttl,
        };
        let key = PairKey {
            server: server.clone(),
            store: request.store.clone(),
            tool: request.tool.clone(),
            issuer: policy.authentication.issuer.clone(),
            subject: caller.subject.clone(),
            grant: seen.grant.clone(),
        };
        let slot = self.slot(&key);
        let mut cached = slot.lock().await;
        if let Some(hit) = cached.as_ref()
            && Instant::now() < hit.reuse_until
            && !self.ended.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&hit.credential.role)
        {
            let mut credential = hit.credential.clone();
            credential.reused = true;
            let mut event = lease_event(LeaseFacts {
                action: LeaseAction::Reused,
                lease: &credential.lease_id,
                role: &credential.role,
                valid_until: Some(credential.valid_until.clone()),
                store: Some(&request.store),
                tool: Some(&request.tool),
                caller: Some(audit_caller),
                correlation: request.correlation.as_deref(),
                reason: None,
            });
            event.emergency_access = seen.grant.clone();
            self.trail.record(Some(&server), event).await?;
            return Ok(credential);
        }
        let group = naming::group_role(&server, &request.store, &request.tool);
        let lease_id = naming::new_lease_id()?;
        let password = naming::new_password()?;
        let prefix = naming::pair_prefix(
            &handle.entry.naming,
            &server,
            &request.store,
            &request.tool,
            &policy.authentication.issuer,
            &caller.subject,
        );
        let role = naming::login_role(&prefix, &lease_id);
        let store_error = |source| BrokerError::Store { store: store_key.to_string(), source };
        let login = store::NewLogin {
            group: &group,
            role: &role,
            pair: &prefix,
            password: LoginPassword::Verifier(""),
            ttl,
            connection_limit: self.settings.connection_limit,
            lease_id: &lease_id,
        };
        let warm = handle.warm.take();
        if warm.is_some() {
            self.warm_wanted.notify_one();
        }
        let claimed = match warm {
            Some(warm) => match create_login(
                &handle,
                &grants,
                &store::NewLogin { password: LoginPassword::Warm(&warm.name), ..login },
            )
            .await
            {
                Ok(created) => Some((created, warm.password)),
                Err(e @ StoreError::WarmLoginGone(_)) => {
                    tracing::warn!(error = %e, "a warm login could not be claimed; making the role cold");
                    None
                }
                // Not the warm login's fault: it stays in the pool.
                Err(e) => {
                    handle.warm.put(warm);
                    return Err(store_error(e));
                }
            },
            None => None,
        };
        let (created, password) = match claimed {
            Some(claimed) => claimed,
            None => {
                let verifier = verifier(&password).await.map_err(store_error)?;
                let cold = store::NewLogin { password: LoginPassword::Verifier(&verifier), ..login };
                let created = create_login(&handle, &grants, &cold).await.map_err(store_error)?;
                (created, password)
            }
        };
        let valid_until = format_time(created.valid_until);
        let mut event = lease_event(LeaseFacts {
            action: LeaseAction::Issued,
            lease: &lease_id,
            role: &role,
            valid_until: Some(valid_until.clone()),
            store: Some(&request.store),
            tool: Some(&request.tool),
            caller: Some(audit_caller),
            correlation: request.correlation.as_deref(),
            reason: None,
        });
        event.emergency_access = seen.grant.clone();
        if let Err(e) = self.trail.record(Some(&server), event).await {
            // Unrecorded, so never handed out.
            if let Ok(guard) = handle.client().await
                && let Some(client) = guard.as_ref()
                && let Err(end) = store::end_login(client, &role).await
            {
                tracing::error!(error = %end, "could not end an unrecorded role; the reaper drops it at its expiry");
            }
            return Err(e.into());
        }
        let store = &handle.entry.access.store;
        let credential = Credential {
            lease_id,
            role,
            password,
            valid_until,
            host: store.host.clone(),
            port: store.port,
            database: store.database.clone(),
            ssl_mode: store.ssl_mode.as_str().to_string(),
            ca_pem: handle.entry.access.ca_pem.clone(),
            reused: false,
        };
        *cached = Some(Cached { credential: credential.clone(), reuse_until: reuse_deadline(&created, ttl) });
        Ok(credential)
    }

    fn ttl(&self, policy_seconds: u64) -> Duration {
        let ttl = Duration::from_secs(policy_seconds);
        self.settings.max_ttl.map_or(ttl, |cap| ttl.min(cap))
    }

    fn slot(&self, key: &PairKey) -> Arc<tokio::sync::Mutex<Option<Cached>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(slots.entry(key.clone()).or_default())
    }

    /// Forgets cached leases whose role is in `roles` (revoked or reaped),
    /// and slots nobody uses whose lease is past reuse. A slot busy with a
    /// request right now keeps its entry, so ended roles are also remembered
    /// and never handed out again (checked at reuse).
    pub(super) fn forget(&self, roles: &BTreeSet<String>) {
        let now = Instant::now();
        {
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            // Longer than any lease can live (the CRD caps TTLs at 1h).
            ended.retain(|_, at| now.duration_since(*at) < Duration::from_secs(2 * 3600));
            ended.extend(roles.iter().map(|r| (r.clone(), now)));
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            let Ok(mut cached) = slot.try_lock() else { return true };
            if cached.as_ref().is_some_and(|c| roles.contains(&c.credential.role)) {
                *cached = None;
            }
            let live = cached.as_ref().is_some_and(|c| now < c.reuse_until);
            drop(cached);
            live || Arc::strong_count(slot) > 1
        });
    }

    /// The refusal as a decision record. Tool and store names go in only
    /// when the policy knows them: a name the sidecar made up could carry
    /// anything.
    async fn record_refusal(
        &self,
        server: &ServerRef,
        request: &CredentialRequest,
        seen: &Seen,
        refusal: &BrokerError,
    ) -> Result<(), WalError> {
        let mut event = Event::new(Kind::Decision);
        event.method = Some("broker/credentials".into());
        event.decision = Some(if seen.unauthenticated { Decision::AuthnFailure } else { Decision::Deny });
        event.reason = Some(refusal.class().into());
        event.caller = seen.caller.clone();
        event.tool = seen.tool_known.then(|| request.tool.clone());
        event.store = seen.store_known.then(|| request.store.clone());
        event.correlation = request.correlation.clone();
        self.trail.record(Some(server), event).await
    }

    /// Store status reports (admin check, PUBLIC findings), by store.
    pub fn reports(&self) -> BTreeMap<StoreRef, PHIStoreStatus> {
        self.reports.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops this process's warm logins and closes the audit streams.
    pub async fn close(&self) {
        self.drop_warm_pools().await;
        self.trail.close().await;
    }
}

/// The SCRAM-SHA-256 verifier of a password. 4096 PBKDF2 rounds are CPU
/// work: done on a blocking thread, before an admin connection is taken.
pub(super) async fn verifier(password: &str) -> Result<String, StoreError> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || postgres_protocol::password::scram_sha_256(password.as_bytes()))
        .await
        .map_err(|e| StoreError::Unreachable(format!("verifier task: {e}")))
}

/// Creates (or claims) a login role on one of the store's admin
/// connections, bringing its group's grants in line first if they are not
/// proven; a connection that broke is reopened next time.
async fn create_login(
    handle: &StoreHandle,
    grants: &BTreeSet<Grant>,
    login: &store::NewLogin<'_>,
) -> Result<store::CreatedLogin, StoreError> {
    let mut guard = handle.client().await?;
    let client = guard.as_mut().ok_or_else(|| StoreError::Unreachable("no connection".into()))?;
    if !handle.is_synced(login.group, grants) {
        let _ddl = handle.group_ddl.lock().await;
        if !handle.is_synced(login.group, grants) {
            store::sync_group(client, login.group, grants).await?;
            handle.mark_synced(login.group, Some(grants));
        }
    }
    let created = store::create_login(client, login).await;
    if created.as_ref().is_err_and(|e| matches!(e, StoreError::Unreachable(_))) {
        *guard = None;
    }
    created
}

/// 1-128 characters of `A-Z a-z 0-9 - _ . :`.
fn is_correlation_id(text: &str) -> bool {
    (1..=128).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn same_access(a: &StoreAccess, b: &StoreAccess) -> bool {
    a.store == b.store && a.admin_user == b.admin_user && a.admin_password == b.admin_password && a.ca_pem == b.ca_pem
}

/// Reuse stops when a third of the lifetime is left (by the local
/// monotonic clock, measured from the database's own `now()`).
fn reuse_deadline(created: &store::CreatedLogin, ttl: Duration) -> Instant {
    let lifetime = (created.valid_until - created.db_now).to_std().unwrap_or(ttl);
    Instant::now() + lifetime.mul_f64(1.0 - REUSE_WHILE_REMAINING)
}

/// `namespace/name` into a reference.
pub fn parse_server(text: &str) -> Option<ServerRef> {
    let (namespace, name) = text.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| ServerRef { namespace: namespace.to_string(), name: name.to_string() })
}
