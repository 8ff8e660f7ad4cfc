//! Names the broker gives database roles, and the secrets it mints.
//!
//! ```text
//!   group role  mcpw_g_<24 hex>             = SHA-256(namespace, server, store, tool)
//!   login role  mcpw_u_<20 hex>_<24 hex>    = HMAC(store naming key; server, store, tool, iss, sub) _ lease id
//!   warm login  mcpw_w_<24 hex>             = random; renamed to a login role when issued (`warm`)
//! ```
//!
//! Both shapes are fixed-length (31 and 52 bytes, under PostgreSQL's 63) and
//! carry no readable caller or tool name: `pg_roles` is readable by every
//! role of the cluster. The caller part is keyed, so a database user who can
//! guess a subject cannot confirm it from a role name; the key is derived
//! from the store's admin credential, which only the broker holds. The lease
//! id is random and is also the role's comment; the audit trail maps it to
//! the caller.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::policy::ServerRef;

/// Prefix of every group role the broker manages.
pub const GROUP_PREFIX: &str = "mcpw_g_";
/// Prefix of every login role the broker issues.
pub const LOGIN_PREFIX: &str = "mcpw_u_";
/// Prefix of a warm login: a role made ahead of demand, not yet issued.
pub const WARM_PREFIX: &str = "mcpw_w_";
/// Hex digits of a lease id.
pub const LEASE_ID_HEX: usize = 24;
/// Hex digits of the caller-pair part of a login role name.
const PAIR_HEX: usize = 20;
/// Hex digits of a group role's hash.
const GROUP_HEX: usize = 24;

/// The key that makes login role names unguessable, per store.
#[derive(Clone)]
pub struct NamingKey([u8; 32]);

impl NamingKey {
    /// Derives the key from the store's admin credential.
    pub fn derive(admin_user: &str, admin_password: &str) -> NamingKey {
        let mut digest = Sha256::new();
        digest.update(b"mcp-warden/role-names/v1\0");
        digest.update(admin_user.as_bytes());
        digest.update(b"\0");
        digest.update(admin_password.as_bytes());
        NamingKey(digest.finalize().into())
    }
}

impl std::fmt::Debug for NamingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamingKey(..)")
    }
}

/// Fields joined with NUL so no two tuples hash alike.
fn joined(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// The NOLOGIN role holding one tool's grants on one store.
pub fn group_role(server: &ServerRef, store: &str, tool: &str) -> String {
    let digest = Sha256::digest(joined(&["group", &server.namespace, &server.name, store, tool]));
    format!("{GROUP_PREFIX}{}", &hex::encode(digest)[..GROUP_HEX])
}

/// The name prefix shared by every login role of one (caller, tool) pair.
pub fn pair_prefix(
    key: &NamingKey,
    server: &ServerRef,
    store: &str,
    tool: &str,
    issuer: &str,
    subject: &str,
) -> String {
    let data = joined(&["login", &server.namespace, &server.name, store, tool, issuer, subject]);
    let tag: Vec<u8> = match <Hmac<Sha256> as Mac>::new_from_slice(&key.0) {
        Ok(mut mac) => {
            mac.update(&data);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => Sha256::new().chain_update(key.0).chain_update(&data).finalize().to_vec(),
    };
    format!("{LOGIN_PREFIX}{}_", &hex::encode(tag)[..PAIR_HEX])
}

/// A login role's name: the pair prefix and the lease id.
pub fn login_role(pair_prefix: &str, lease_id: &str) -> String {
    format!("{pair_prefix}{lease_id}")
}

/// Whether a name has the login-role shape (and nothing that needs quoting).
pub fn is_login_role(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(LOGIN_PREFIX) else { return false };
    let Some((pair, lease)) = rest.split_once('_') else { return false };
    pair.len() == PAIR_HEX && lease.len() == LEASE_ID_HEX && is_lower_hex(pair) && is_lower_hex(lease)
}

/// A fresh warm login's name (random: it names nobody until issued).
pub fn warm_role() -> Result<String, RandomError> {
    Ok(format!("{WARM_PREFIX}{}", new_lease_id()?))
}

/// Whether a name has the warm-login shape.
pub fn is_warm_role(name: &str) -> bool {
    name.strip_prefix(WARM_PREFIX).is_some_and(|h| h.len() == LEASE_ID_HEX && is_lower_hex(h))
}

/// Whether a name has the group-role shape.
pub fn is_group_role(name: &str) -> bool {
    name.strip_prefix(GROUP_PREFIX).is_some_and(|h| h.len() == GROUP_HEX && is_lower_hex(h))
}

/// The lease id inside a login role name.
pub fn lease_of(login_role: &str) -> Option<&str> {
    is_login_role(login_role).then(|| &login_role[login_role.len() - LEASE_ID_HEX..])
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why the system's random source failed.
#[derive(Debug, thiserror::Error)]
#[error("the system random source failed: {0}")]
pub struct RandomError(String);

fn random<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| RandomError(e.to_string()))?;
    Ok(bytes)
}

/// A fresh random lease id (96 bits, hex).
pub fn new_lease_id() -> Result<String, RandomError> {
    Ok(hex::encode(random::<{ LEASE_ID_HEX / 2 }>()?))
}

/// A fresh password: 256 random bits, base64url. Sent to PostgreSQL only as
/// a SCRAM verifier; returned to the sidecar once.
pub fn new_password() -> Result<String, RandomError> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerRef {
        ServerRef { namespace: "clinic".into(), name: "patient-lookup".into() }
    }

    #[test]
    fn names_fit_postgres_and_have_fixed_shapes() {
        let key = NamingKey::derive("warden_admin", "pw");
        let group = group_role(&server(), "ehr", "lookup_patient");
        assert!(is_group_role(&group), "{group}");
        assert_eq!(group.len(), 31);
        let long = "x".repeat(300);
        let prefix = pair_prefix(&key, &server(), &long, &long, &long, &long);
        let lease = new_lease_id().unwrap();
        let role = login_role(&prefix, &lease);
        assert!(is_login_role(&role), "{role}");
        assert_eq!(role.len(), 52);
        assert!(role.len() <= 63);
        assert_eq!(lease_of(&role), Some(lease.as_str()));
        assert!(!is_login_role(&group) && !is_group_role(&role));
    }

    #[test]
    fn names_are_deterministic_and_distinct_per_pair() {
        let key = NamingKey::derive("warden_admin", "pw");
        let a = pair_prefix(&key, &server(), "ehr", "lookup", "https://idp", "alice");
        assert_eq!(a, pair_prefix(&key, &server(), "ehr", "lookup", "https://idp", "alice"));
        assert_ne!(a, pair_prefix(&key, &server(), "ehr", "lookup", "https://idp", "bob"));
        assert_ne!(a, pair_prefix(&key, &server(), "ehr", "other", "https://idp", "alice"));
        assert_ne!(a, pair_prefix(&key, &server(), "ehr", "lookup", "https://other-idp", "alice"));
        // Field boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(
            pair_prefix(&key, &server(), "ab", "c", "i", "s"),
            pair_prefix(&key, &server(), "a", "bc", "i", "s")
        );
        assert_ne!(group_role(&server(), "ehr", "a"), group_role(&server(), "ehr", "b"));
    }

    #[test]
    fn caller_part_is_keyed() {
        let one = NamingKey::derive("warden_admin", "pw-1");
        let two = NamingKey::derive("warden_admin", "pw-2");
        assert_ne!(
            pair_prefix(&one, &server(), "ehr", "lookup", "https://idp", "alice"),
            pair_prefix(&two, &server(), "ehr", "lookup", "https://idp", "alice")
        );
        assert_eq!(format!("{one:?}"), "NamingKey(..)");
    }

    #[test]
    fn names_carry_no_caller_or_tool_text() {
        let key = NamingKey::derive("warden_admin", "pw");
        let role = login_role(&pair_prefix(&key, &server(), "ehr", "lookup", "https://idp", "alice"), "00");
        for needle in ["alice", "lookup", "ehr", "clinic"] {
            assert!(!role.contains(needle));
        }
    }

    #[test]
    fn warm_names_are_random_and_distinct_from_issued_ones() {
        let (one, two) = (warm_role().unwrap(), warm_role().unwrap());
        assert_ne!(one, two);
        assert!(is_warm_role(&one) && one.len() <= 63, "{one}");
        assert!(!is_login_role(&one) && !is_group_role(&one));
        assert!(!is_warm_role("mcpw_w_") && !is_warm_role(&one.to_uppercase()) && !is_warm_role(&format!("{one}0")));
        let issued = login_role(&pair_prefix(&NamingKey::derive("a", "b"), &server(), "s", "t", "i", "x"), "00");
        assert!(!is_warm_role(&issued));
    }

    #[test]
    fn shapes_refuse_lookalikes() {
        assert!(!is_login_role("mcpw_u_"));
        assert!(!is_login_role("mcpw_u_ABCDEF0123456789abcd_0123456789abcdef01234567"));
        assert!(!is_login_role("postgres"));
        assert!(!is_group_role("mcpw_g_short"));
        assert_eq!(lease_of("mcpw_g_0123"), None);
    }

    #[test]
    fn secrets_are_fresh() {
        assert_ne!(new_lease_id().unwrap(), new_lease_id().unwrap());
        let password = new_password().unwrap();
        assert_eq!(password.len(), 43);
        assert_ne!(password, new_password().unwrap());
    }
}
