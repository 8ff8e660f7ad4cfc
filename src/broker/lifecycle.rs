//! Keeping stores in line, reaping, revoking — all stateless: what must
//! exist comes from the inventory, what does exist from `pg_roles`.
//!
//! ```text
//!   sync    per store: admin check ─ PUBLIC findings (revoked if asked) ─ group roles in line
//!           ─ group roles no policy wants: members ended, then dropped ─ status report
//!   reap    per store: login roles past VALID UNTIL ─ NOLOGIN ─ sessions terminated ─ DROP
//!   revoke  by lease id, by server, or by server and subject ─ the same three steps, now
//!   reload  grants in force before and not now (revoked, deleted, expired) ─ their beneficiaries' roles for their tools revoked
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::checks;
use super::deid::{self, WantedViews};
use super::inventory::{GroupSpec, Inventory};
use super::issuer::{Broker, BrokerError, StoreHandle, parse_server};
use super::naming;
use super::status::{StoreObservation, store_status};
use super::store::{self, LoginRole};
use super::trail::{LeaseFacts, lease_event};
use crate::audit::record::{LeaseAction, format_time};
use crate::breakglass::ActiveGrant;
use crate::policy::ServerRef;

/// What to revoke.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    /// One lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Every lease of this MCPServer (`namespace/name`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// …or only those of this caller (`sub`, with the server's issuer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Why, for the audit trail (a short operator note; no PHI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a group role came from.
#[derive(Debug, Clone)]
struct GroupOrigin {
    server: ServerRef,
    store: String,
    tool: String,
}

impl Broker {
    /// Installs a new inventory and brings the stores in line with it:
    /// roles of removed tools and servers end now.
    pub async fn reload(&self, inventory: Inventory) -> Vec<String> {
        let previous = self.install(inventory);
        let ended = self.end_grants(&previous).await;
        if !ended.is_empty() {
            tracing::info!(roles = ended.len(), "roles of ended emergency access revoked");
        }
        self.sync_with(Some(&previous)).await
    }

    /// Brings every store in line with the inventory; returns the problems
    /// found (also in the status reports).
    pub async fn sync(&self) -> Vec<String> {
        self.sync_with(None).await
    }

    async fn sync_with(&self, previous: Option<&Inventory>) -> Vec<String> {
        let inventory = self.inventory();
        let wanted = inventory.groups();
        let views = inventory.views();
        // Origins of every group any inventory knows, so records of roles
        // ended because their server went away still name it.
        let mut origins = origins_of(&inventory);
        if let Some(previous) = previous {
            for (group, origin) in origins_of(previous) {
                origins.entry(group).or_insert(origin);
            }
        }
        let all_wanted: BTreeSet<&String> = wanted.values().flat_map(|g| g.keys()).collect();
        let mut problems = Vec::new();
        let mut reports = BTreeMap::new();
        for (key, entry) in &inventory.stores {
            let observation = match entry {
                Err(reason) => StoreObservation::unusable(reason.clone()),
                Ok(entry) => match self.store(key) {
                    Ok(handle) => {
                        let groups = wanted.get(key).cloned().unwrap_or_default();
                        let views = views.get(key).cloned().unwrap_or_default();
                        self.sync_store(&handle, entry.revoke_public, &groups, &views, &all_wanted, &origins).await
                    }
                    Err(e) => StoreObservation::unusable(e.to_string()),
                },
            };
            problems.extend(observation.problems().into_iter().map(|p| format!("PHIStore {key}: {p}")));
            let previous_status = self.reports.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
            let generation = inventory.generations.get(key).copied().flatten();
            reports.insert(key.clone(), store_status(&observation, previous_status.as_ref(), generation, jiff_now()));
        }
        *self.reports.write().unwrap_or_else(|p| p.into_inner()) = reports;
        // Stores whose mappings must agree (a shared linkage id), once each
        // store's own mapping is in line.
        problems.extend(self.reconcile_linkages().await);
        for problem in &problems {
            tracing::warn!(problem = %problem, "store not in line");
        }
        problems
    }

    async fn sync_store(
        &self,
        handle: &StoreHandle,
        revoke_public: bool,
        groups: &BTreeMap<String, GroupSpec>,
        views: &WantedViews,
        all_wanted: &BTreeSet<&String>,
        origins: &HashMap<String, GroupOrigin>,
    ) -> StoreObservation {
        let mut observation = StoreObservation::default();
        let mut guard = match handle.client().await {
            Ok(guard) => guard,
            Err(e) => {
                observation.reach = Err(e.to_string());
                return observation;
            }
        };
        let Some(client) = guard.as_mut() else {
            observation.reach = Err("no connection".into());
            return observation;
        };
        // Group grants change only under this lock (issuance syncs a
        // group it finds out of date on another admin connection).
        let _ddl = handle.group_ddl.lock().await;
        // The views first: the group roles' grants name them.
        let first = !handle.deid_backfilled.load(std::sync::atomic::Ordering::Relaxed);
        let classification = handle.entry.deidentification.as_ref();
        match deid::ensure(client, classification, views, first).await {
            Ok(pass) => {
                handle.deid_backfilled.store(true, std::sync::atomic::Ordering::Relaxed);
                if !pass.rotated.is_empty() {
                    tracing::info!(scopes = ?pass.rotated, "pseudonyms rotated: a new epoch, the previous in its grace period");
                }
                if !pass.shadows_built.is_empty() || !pass.shadows_dropped.is_empty() {
                    tracing::info!(built = ?pass.shadows_built, dropped = ?pass.shadows_dropped, "pseudonymized copies changed");
                }
                if !pass.views_written.is_empty() || !pass.views_dropped.is_empty() {
                    // Re-created views lost their grants: groups are re-proven below.
                    tracing::info!(written = ?pass.views_written, dropped = ?pass.views_dropped, "de-identified views changed");
                }
            }
            Err(e) => observation.errors.push(format!("de-identified views: {e}")),
        }
        let needed: BTreeSet<_> = groups.values().flat_map(|g| g.grants.iter().cloned()).collect();
        match checks::check_admin(client, &needed).await {
            Ok(mut report) => {
                match checks::check_deid_admin(client, classification, views).await {
                    Ok(missing) => report.missing.extend(missing),
                    Err(e) => observation.errors.push(format!("admin check (de-identification): {e}")),
                }
                observation.admin = Some(report);
            }
            Err(e) => observation.errors.push(format!("admin check: {e}")),
        }
        match checks::public_findings(client).await {
            Ok(findings) if revoke_public && !findings.is_empty() => {
                observation.errors.extend(checks::revoke_public(client, &findings).await);
                observation.hardening_requested = true;
                match checks::public_findings(client).await {
                    Ok(left) => observation.public = Some(left),
                    Err(e) => observation.errors.push(format!("PUBLIC privileges: {e}")),
                }
            }
            Ok(findings) => {
                observation.hardening_requested = revoke_public;
                observation.public = Some(findings);
            }
            Err(e) => observation.errors.push(format!("PUBLIC privileges: {e}")),
        }
        for (group, spec) in groups {
            match store::sync_group(client, group, &spec.grants).await {
                Ok(()) => handle.mark_synced(group, Some(&spec.grants)),
                Err(e) => {
                    handle.mark_synced(group, None);
                    observation.errors.push(format!("tool {:?} of {}: {e}", spec.tool, spec.server));
                }
            }
        }
        // Group roles of this database that no policy wants any more.
        let existing = match store::group_roles(client).await {
            Ok(existing) => existing,
            Err(e) => {
                observation.errors.push(format!("listing group roles: {e}"));
                return observation;
            }
        };
        let stale: Vec<String> = existing.into_iter().filter(|g| !all_wanted.contains(g)).collect();
        if !stale.is_empty() {
            match store::login_roles(client).await {
                Ok(logins) => {
                    for group in &stale {
                        let origin = origins.get(group);
                        let members = logins.iter().filter(|l| l.groups.contains(group));
                        let mut ok = true;
                        for member in members {
                            let reason = "its tool or MCPServer was removed from the policy";
                            if let Err(e) =
                                self.end_and_record(client, member, origin, LeaseAction::Revoked, reason).await
                            {
                                observation.errors.push(format!("ending a role of a removed tool: {e}"));
                                ok = false;
                            }
                        }
                        if ok && let Err(e) = store::drop_group(client, group).await {
                            observation.errors.push(format!("dropping group role {group}: {e}"));
                        }
                        handle.mark_synced(group, None);
                    }
                }
                Err(e) => observation.errors.push(format!("listing login roles: {e}")),
            }
        }
        observation
    }

    /// Ends one login role and records it; the record names the role's
    /// server when its group is known.
    async fn end_and_record(
        &self,
        client: &tokio_postgres::Client,
        role: &LoginRole,
        origin: Option<&GroupOrigin>,
        action: LeaseAction,
        reason: &str,
    ) -> Result<bool, BrokerError> {
        let store_label = origin.map(|o| o.store.clone()).unwrap_or_default();
        let ended = store::end_login(client, &role.name)
            .await
            .map_err(|source| BrokerError::Store { store: store_label, source })?;
        let Some(sessions) = ended else { return Ok(false) };
        let lease = naming::lease_of(&role.name).unwrap_or_default();
        let event = lease_event(LeaseFacts {
            action,
            lease,
            role: &role.name,
            valid_until: role.valid_until.map(format_time),
            store: origin.map(|o| o.store.as_str()),
            tool: origin.map(|o| o.tool.as_str()),
            caller: None,
            correlation: None,
            reason: Some(format!("{reason}; {sessions} session(s) terminated")),
        });
        let recorded = self.trail.record(origin.map(|o| &o.server), event).await;
        self.forget(&BTreeSet::from([role.name.clone()]));
        if let Err(e) = recorded {
            // The role is gone either way (the safe direction); what is lost is
            // its end on the trail, and no later pass can find it again.
            tracing::error!(error = %e, lease = %lease, "a lease was ended but its end could not be recorded");
            return Err(e.into());
        }
        match action {
            LeaseAction::Reaped => self.metrics.reaped.inc(),
            _ => self.metrics.revoked.inc(),
        };
        Ok(true)
    }

    /// Reaps every expired login role of every store. Returns how many
    /// were dropped.
    pub async fn reap(&self) -> usize {
        let inventory = self.inventory();
        let origins = origins_of(&inventory);
        let handles: Vec<Arc<StoreHandle>> =
            self.stores.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut reaped = 0;
        for handle in handles {
            let guard = match handle.client().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "reaper cannot reach a store");
                    continue;
                }
            };
            let Some(client) = guard.as_ref() else { continue };
            let roles = match store::login_roles(client).await {
                Ok(roles) => roles,
                Err(e) => {
                    tracing::warn!(error = %e, "reaper cannot list roles");
                    continue;
                }
            };
            let orphans = self.reap_warm(&handle, client).await;
            if orphans > 0 {
                tracing::info!(orphans, "warm logins no live broker holds were dropped");
            }
            for role in roles.iter().filter(|r| r.expired) {
                let origin = role.groups.iter().find_map(|g| origins.get(g));
                let reason = if role.valid_until.is_some() { "expired" } else { "no expiry set" };
                match self.end_and_record(client, role, origin, LeaseAction::Reaped, reason).await {
                    Ok(true) => reaped += 1,
                    Ok(false) => {}
                    // A store error leaves the role for the next round; a
                    // trail error after the drop is logged by end_and_record.
                    Err(e) => tracing::warn!(error = %e, "reaping a role failed"),
                }
            }
        }
        self.forget(&BTreeSet::new());
        reaped
    }

    /// Revokes leases now: roles made NOLOGIN, sessions terminated, roles
    /// dropped. Returns the roles ended.
    pub async fn revoke(&self, revocation: &Revocation) -> Result<Vec<String>, BrokerError> {
        let inventory = self.inventory();
        let selector = Selector::from(revocation, &inventory, self)?;
        let reason = match &revocation.reason {
            Some(r) => format!("revoked on demand: {}", r.chars().take(200).collect::<String>()),
            None => "revoked on demand".into(),
        };
        self.end_selected(&inventory, &selector, &reason).await
    }

    /// Ends the leases of break-glass grants in `previous` that are no
    /// longer in force (revoked, deleted, refused, expired): the roles of
    /// their beneficiaries for their tools, whatever they were issued under
    /// (one pair's roles share a name prefix).
    pub(super) async fn end_grants(&self, previous: &Inventory) -> Vec<String> {
        let inventory = self.inventory();
        let mut ended = Vec::new();
        for (server, grant) in grants_ended(previous, &inventory, crate::breakglass::now()) {
            let prefixes = self.grant_prefixes(previous, &server, &grant);
            let reason = format!("emergency access {} ended", grant.name);
            match self.end_selected(previous, &Selector::Prefixes(prefixes), &reason).await {
                Ok(roles) => ended.extend(roles),
                Err(e) => {
                    tracing::error!(error = %e, grant = %grant.name, "ending an emergency grant's roles failed; they end at their VALID UNTIL (the grant's end at the latest)")
                }
            }
        }
        ended
    }

    fn grant_prefixes(&self, inventory: &Inventory, server: &ServerRef, grant: &ActiveGrant) -> BTreeSet<String> {
        let Some(Ok(entry)) = inventory.servers.get(server) else { return BTreeSet::new() };
        let issuer = &entry.policy.authentication.issuer;
        let mut prefixes = BTreeSet::new();
        for tool in &grant.tools {
            let Some(compiled) = entry.policy.tools.get(tool) else { continue };
            for store in compiled.data_access.keys() {
                let key = super::inventory::StoreRef { namespace: server.namespace.clone(), name: store.clone() };
                if let Ok(handle) = self.store(&key) {
                    prefixes.insert(naming::pair_prefix(
                        &handle.entry.naming,
                        server,
                        store,
                        tool,
                        issuer,
                        &grant.beneficiary,
                    ));
                }
            }
        }
        prefixes
    }

    async fn end_selected(
        &self,
        inventory: &Inventory,
        selector: &Selector,
        reason: &str,
    ) -> Result<Vec<String>, BrokerError> {
        let origins = origins_of(inventory);
        let handles: Vec<Arc<StoreHandle>> =
            self.stores.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut ended = Vec::new();
        for handle in handles {
            let store_error = |source| BrokerError::Store { store: handle.entry.access.store.database.clone(), source };
            let guard = handle.client().await.map_err(store_error)?;
            let Some(client) = guard.as_ref() else { continue };
            let roles = store::login_roles(client).await.map_err(store_error)?;
            for role in roles.iter().filter(|r| selector.matches(r)) {
                let origin = role.groups.iter().find_map(|g| origins.get(g));
                if self.end_and_record(client, role, origin, LeaseAction::Revoked, reason).await? {
                    ended.push(role.name.clone());
                }
            }
        }
        Ok(ended)
    }
}

/// The grants in force in `previous` that are not in `current` (by server
/// and name), or whose time is over at `now`.
pub fn grants_ended(
    previous: &Inventory,
    current: &Inventory,
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<(ServerRef, ActiveGrant)> {
    previous
        .grants
        .iter()
        .flat_map(|(server, grants)| grants.iter().map(move |g| (server, g)))
        .filter(|(server, grant)| {
            let still = current.grants.get(*server).is_some_and(|gs| gs.iter().any(|g| g == *grant));
            !still || now >= grant.expires_at.0
        })
        .map(|(server, grant)| (server.clone(), grant.clone()))
        .collect()
}

/// Which login roles a revocation selects.
enum Selector {
    Lease(String),
    Groups(BTreeSet<String>),
    Prefixes(BTreeSet<String>),
}

impl Selector {
    fn from(revocation: &Revocation, inventory: &Inventory, broker: &Broker) -> Result<Selector, BrokerError> {
        match (&revocation.lease_id, &revocation.server, &revocation.subject) {
            (Some(lease), None, None) => Ok(Selector::Lease(lease.clone())),
            (None, Some(server), subject) => {
                let server_ref = parse_server(server).ok_or_else(|| BrokerError::UnknownServer(server.clone()))?;
                let known = inventory.groups().into_iter().flat_map(|(store, groups)| {
                    groups.into_iter().filter(|(_, g)| g.server == server_ref).map(move |(n, g)| (store.clone(), n, g))
                });
                match subject {
                    None => Ok(Selector::Groups(known.map(|(_, name, _)| name).collect())),
                    Some(subject) => {
                        let Some(Ok(entry)) = inventory.servers.get(&server_ref) else {
                            return Err(BrokerError::UnknownServer(server.clone()));
                        };
                        let issuer = &entry.policy.authentication.issuer;
                        let mut prefixes = BTreeSet::new();
                        for (store, _, spec) in known {
                            let handle = broker.store(&store)?;
                            prefixes.insert(naming::pair_prefix(
                                &handle.entry.naming,
                                &server_ref,
                                &store.name,
                                &spec.tool,
                                issuer,
                                subject,
                            ));
                        }
                        Ok(Selector::Prefixes(prefixes))
                    }
                }
            }
            _ => Err(BrokerError::InvalidRequest(
                "a revocation names either leaseId, or server (and optionally subject)".into(),
            )),
        }
    }

    fn matches(&self, role: &LoginRole) -> bool {
        match self {
            Selector::Lease(lease) => naming::lease_of(&role.name) == Some(lease.as_str()),
            Selector::Groups(groups) => role.groups.iter().any(|g| groups.contains(g)),
            Selector::Prefixes(prefixes) => prefixes.iter().any(|p| role.name.starts_with(p.as_str())),
        }
    }
}

fn origins_of(inventory: &Inventory) -> HashMap<String, GroupOrigin> {
    inventory
        .groups()
        .into_iter()
        .flat_map(|(store, groups)| {
            groups.into_iter().map(move |(name, spec)| {
                (name, GroupOrigin { server: spec.server, store: store.name.clone(), tool: spec.tool })
            })
        })
        .collect()
}

fn jiff_now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}
