//! Re-identification, out of band: who a pseudonym is, for a person
//! allowed to know, with a reason, on the record — never through MCP.
//!
//! ```text
//!   mcp-warden reidentify ─ POST /v1/reidentifications {store, pseudonym, reason}
//!     laptop:  the reidentifier credential
//!     cluster: the person's Kubernetes token ─ TokenReview ─ SubjectAccessReview
//!              (verb reidentify, resource phistores/<store>, group mcpwarden.io)
//!   ─▶ decision record in the broker's stream (who, store, pseudonym, reason; never the real key)
//!   ─▶ mcpw_deid.map_<entity> WHERE token = $1 (admin connection) ─▶ {entity, key, scope, epoch}
//! ```
//!
//! The record is made durable before the answer: a re-identification that
//! is not on the record does not happen.

use serde::{Deserialize, Serialize};

use super::inventory::StoreRef;
use super::issuer::{Broker, BrokerError};
use crate::audit::record::{Caller, Decision, Event, Kind};
use crate::deid::mapping::map_table;

/// Longest accepted reason.
pub const MAX_REASON: usize = 512;

/// A re-identification request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReidentifyRequest {
    /// The PHIStore, `namespace/name`.
    pub store: String,
    /// The pseudonym, e.g. `pt_7f3a9c1e0b2d4f6a8c5e`.
    pub pseudonym: String,
    /// Why (recorded verbatim: an operator's justification, e.g. a ticket).
    pub reason: String,
}

/// Who a pseudonym is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reidentified {
    /// The entity (`patient`).
    pub entity: String,
    /// The real key, as text (the entity's key column, e.g. the patient id).
    pub key: String,
    /// The pseudonym scope it belongs to.
    pub scope: String,
    /// The scope's epoch it was issued in.
    pub epoch: i32,
}

/// The person asking, as the broker established it.
#[derive(Debug, Clone)]
pub struct Requester {
    /// Username (Kubernetes) or the static credential's name.
    pub name: String,
    /// Where the name comes from (`kubernetes`, `mcp-warden/static`).
    pub issuer: String,
    /// Groups, when known.
    pub groups: Vec<String>,
}

/// Whether `text` has the shape of a pseudonym: a prefix of 1-8 lower-case
/// letters, `_`, 20 lower-case hex digits.
pub fn is_pseudonym(text: &str) -> bool {
    let Some((prefix, hex)) = text.split_once('_') else { return false };
    (1..=8).contains(&prefix.len())
        && prefix.bytes().all(|b| b.is_ascii_lowercase())
        && hex.len() == 20
        && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `namespace/name`.
pub fn parse_store(text: &str) -> Option<StoreRef> {
    let (namespace, name) = text.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| StoreRef { namespace: namespace.into(), name: name.into() })
}

impl Broker {
    /// Resolves a pseudonym for `who`, recording the act first. `allowed`
    /// is the access review's verdict: a refusal is recorded too.
    pub async fn reidentify(
        &self,
        request: &ReidentifyRequest,
        who: &Requester,
        allowed: bool,
    ) -> Result<Reidentified, BrokerError> {
        let invalid = |m: &str| BrokerError::InvalidRequest(m.to_string());
        let store = parse_store(&request.store).ok_or_else(|| invalid("store must be namespace/name"))?;
        if !is_pseudonym(&request.pseudonym) {
            return Err(invalid("pseudonym must look like pt_ followed by 20 hex digits"));
        }
        let reason = request.reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(invalid("a reason of 1-512 printable characters is required"));
        }
        // A person refused by the access review is recorded and refused
        // before anything of the store is looked at.
        let handle = if allowed { Some(self.store(&store)?) } else { None };
        let prefix = request.pseudonym.split_once('_').map(|(p, _)| p).unwrap_or_default();
        let entity = handle
            .as_ref()
            .and_then(|h| h.entry.deidentification.as_ref())
            .and_then(|d| d.entities.iter().find(|e| e.prefix == prefix))
            .map(|e| e.name.clone());
        let verdict = if !allowed {
            "refused, not authorized"
        } else if entity.is_none() {
            "refused, unknown prefix"
        } else {
            "allowed"
        };
        let event = Event {
            caller: Some(Caller { sub: who.name.clone(), iss: who.issuer.clone(), groups: who.groups.clone() }),
            method: Some("reidentify".into()),
            store: Some(store.to_string()),
            phi: Some(true),
            decision: Some(if entity.is_some() { Decision::Allow } else { Decision::Deny }),
            reason: Some(format!("{verdict}: pseudonym {}: {reason}", request.pseudonym)),
            ..Event::new(Kind::Decision)
        };
        self.trail().record(None, event).await?;
        let (Some(handle), Some(entity)) = (handle, entity) else {
            return Err(if allowed {
                BrokerError::NotFound(format!("PHIStore {store} declares no entity with pseudonym prefix {prefix:?}"))
            } else {
                BrokerError::NotAuthorized(format!("{} may not reidentify pseudonyms of PHIStore {store}", who.name))
            });
        };
        let store_error = |source| BrokerError::Store { store: store.to_string(), source };
        let mut guard = handle.client().await.map_err(store_error)?;
        let client =
            guard.as_mut().ok_or_else(|| store_error(super::store::StoreError::Unreachable("no connection".into())))?;
        let sql = format!("SELECT scope, epoch, key::text FROM {} WHERE token = $1", map_table(&entity));
        let row = client
            .query_opt(&sql, &[&request.pseudonym])
            .await
            .map_err(|e| store_error(e.into()))?
            .ok_or_else(|| BrokerError::NotFound(format!("no {entity} has this pseudonym in PHIStore {store}")))?;
        Ok(Reidentified { entity, scope: row.get(0), epoch: row.get(1), key: row.get(2) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_have_one_shape() {
        assert!(is_pseudonym("pt_0a1b2c3d4e5f60718293"));
        for bad in [
            "pt_0a1b2c3d4e5f6071829",
            "pt_0a1b2c3d4e5f607182934",
            "PT_0a1b2c3d4e5f60718293",
            "pt_0A1B2C3D4E5F60718293",
            "pt-0a1b2c3d4e5f60718293",
            "_0a1b2c3d4e5f60718293",
            "toolongpx_0a1b2c3d4e5f60718293",
            "pt_0a1b2c3d4e5f6071829'",
            "MRN-0001",
        ] {
            assert!(!is_pseudonym(bad), "{bad}");
        }
    }

    #[test]
    fn stores_are_namespaced() {
        assert_eq!(parse_store("clinic/ehr"), Some(StoreRef { namespace: "clinic".into(), name: "ehr".into() }));
        for bad in ["ehr", "/ehr", "clinic/", "a/b/c"] {
            assert_eq!(parse_store(bad), None, "{bad}");
        }
    }
}
