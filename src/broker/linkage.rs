//! Pseudonyms that agree across stores: entities keyed by a shared linkage
//! id (an enterprise patient index), in stores of one namespace, seen by one
//! pseudonym scope, get the same token for the same id.
//!
//! ```text
//!   group (namespace, scope, linkage) = every store whose wanted views in that scope use an
//!                                       entity with that linkage
//!   each pass: read each member's mapping (current epoch) ─ plan() ─ write the differences
//!     a key known to one member only: its token is copied to the others
//!     a key with different tokens:    the smallest token wins everywhere (a pseudonym changes once)
//! ```
//!
//! Tokens stay random (the first member to see a key draws it); the broker
//! only copies them. Members must rotate together: different epochs are a
//! problem named in the report, and nothing is copied. A key first written
//! in a member gets its local token at once (the trigger) and the agreed one
//! at the next pass.

use std::collections::BTreeMap;

use super::inventory::{Inventory, StoreRef};
use super::issuer::Broker;
use super::store::StoreError;
use crate::deid::mapping::{self, MAP_KEY_TYPE_SQL, map_table};

/// A linkage group: (namespace, scope, linkage) → members (store, entity).
pub type Groups = BTreeMap<(String, String, String), Vec<(StoreRef, String)>>;

/// The writes each member needs so that all agree: per member, key →
/// token. Pure.
pub fn plan(members: &[BTreeMap<String, String>]) -> Vec<BTreeMap<String, String>> {
    let mut agreed: BTreeMap<&str, &str> = BTreeMap::new();
    for member in members {
        for (key, token) in member {
            agreed.entry(key.as_str()).and_modify(|t| *t = (*t).min(token.as_str())).or_insert(token.as_str());
        }
    }
    members
        .iter()
        .map(|member| {
            agreed
                .iter()
                .filter(|(key, token)| member.get(**key).map(String::as_str) != Some(**token))
                .map(|(key, token)| (key.to_string(), token.to_string()))
                .collect()
        })
        .collect()
}

/// The linkage groups of an inventory with more than one member.
pub fn groups(inventory: &Inventory) -> Groups {
    let mut out: Groups = BTreeMap::new();
    for (key, deid, scope, _) in inventory.deidentified_uses() {
        for entity in &deid.entities {
            let Some(linkage) = &entity.linkage else { continue };
            let members = out.entry((key.namespace.clone(), scope.clone(), linkage.clone())).or_default();
            let member = (key.clone(), entity.name.clone());
            if !members.contains(&member) {
                members.push(member);
            }
        }
    }
    out.retain(|_, members| members.len() > 1);
    out
}

/// What one member holds: its epoch, key type and key → token.
struct Member {
    epoch: i32,
    key_type: String,
    tokens: BTreeMap<String, String>,
}

impl Broker {
    /// Makes every linkage group agree; returns the problems found.
    pub async fn reconcile_linkages(&self) -> Vec<String> {
        let inventory = self.inventory();
        let mut problems = Vec::new();
        for ((namespace, scope, linkage), members) in groups(&inventory) {
            if let Err(e) = self.reconcile(scope.as_str(), &members).await {
                problems.push(format!("linkage {linkage} of scope {scope} in namespace {namespace}: {e}"));
            }
        }
        problems
    }

    async fn reconcile(&self, scope: &str, members: &[(StoreRef, String)]) -> Result<usize, StoreError> {
        let mut read = Vec::new();
        for (store, entity) in members {
            read.push(self.read_member(store, entity, scope).await?);
        }
        if read.iter().any(|m| m.key_type != read[0].key_type) {
            let types: Vec<String> =
                members.iter().zip(&read).map(|((s, _), m)| format!("{s}: {}", m.key_type)).collect();
            return Err(StoreError::Deidentification(format!(
                "the linked keys have different types ({}): a shared id has one type everywhere",
                types.join(", ")
            )));
        }
        if read.iter().any(|m| m.epoch != read[0].epoch) {
            let epochs: Vec<String> =
                members.iter().zip(&read).map(|((s, _), m)| format!("{s}: {}", m.epoch)).collect();
            return Err(StoreError::Deidentification(format!(
                "the scope's epochs differ ({}): give the stores the same rotation and rotate them together",
                epochs.join(", ")
            )));
        }
        let writes = plan(&read.iter().map(|m| m.tokens.clone()).collect::<Vec<_>>());
        let mut written = 0;
        for (((store, entity), member), writes) in members.iter().zip(&read).zip(writes) {
            if writes.is_empty() {
                continue;
            }
            let handle = self.store(store).map_err(|e| StoreError::Unreachable(e.to_string()))?;
            let mut guard = handle.client().await?;
            let client = guard.as_mut().ok_or_else(|| StoreError::Unreachable("no connection".into()))?;
            let sql = format!(
                "INSERT INTO {map} (scope, epoch, key, token) VALUES ($1, $2, CAST($3::text AS {key_type}), $4)
                 ON CONFLICT (scope, epoch, key) DO UPDATE SET token = EXCLUDED.token",
                map = map_table(entity),
                key_type = member.key_type,
            );
            let tx = client.transaction().await?;
            let statement = tx.prepare(&sql).await?;
            for (key, token) in &writes {
                tx.execute(&statement, &[&scope, &member.epoch, key, token]).await?;
            }
            tx.commit().await?;
            written += writes.len();
        }
        Ok(written)
    }

    async fn read_member(&self, store: &StoreRef, entity: &str, scope: &str) -> Result<Member, StoreError> {
        let handle = self.store(store).map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let mut guard = handle.client().await?;
        let client = guard.as_mut().ok_or_else(|| StoreError::Unreachable("no connection".into()))?;
        let epoch: i32 = client
            .query_opt(&format!("SELECT epoch FROM {} WHERE scope = $1", mapping::qualified("scopes")), &[&scope])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Deidentification(format!("scope {scope} is not registered in {store}")))?;
        let key_type: String = client
            .query_opt(MAP_KEY_TYPE_SQL, &[&entity])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Deidentification(format!("{store} has no mapping for {entity}")))?;
        let rows = client
            .query(
                &format!("SELECT key::text, token FROM {} WHERE scope = $1 AND epoch = $2", map_table(entity)),
                &[&scope, &epoch],
            )
            .await?;
        Ok(Member { epoch, key_type, tokens: rows.into_iter().map(|r| (r.get(0), r.get(1))).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, t)| (k.to_string(), t.to_string())).collect()
    }

    #[test]
    fn keys_known_to_one_member_are_copied_and_the_smallest_token_wins() {
        let a = map(&[("E1", "pt_b"), ("E2", "pt_x")]);
        let b = map(&[("E1", "pt_a"), ("E3", "pt_y")]);
        let writes = plan(&[a, b]);
        assert_eq!(writes[0], map(&[("E1", "pt_a"), ("E3", "pt_y")]));
        assert_eq!(writes[1], map(&[("E2", "pt_x")]));
    }

    #[test]
    fn members_that_agree_need_nothing() {
        let a = map(&[("E1", "pt_a")]);
        assert!(plan(&[a.clone(), a]).iter().all(BTreeMap::is_empty));
        assert!(plan(&[]).is_empty());
    }
}
