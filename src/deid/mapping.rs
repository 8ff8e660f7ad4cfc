//! The pseudonym mapping inside the store: random tokens, one per (scope,
//! epoch, entity key), kept where only the broker's admin role can read.
//!
//! ```text
//!   mcpw_deid.scopes        scope → current epoch
//!   mcpw_deid.map_<entity>  (scope, epoch, key) ↔ token    unique both ways, indexed both ways
//!   mcpw_deid.new_token(p)  p || '_' || 80 random bits (gen_random_uuid); takes no identifier
//!   trigger on the entity's key table: a new key gets its tokens in every scope at once
//! ```
//!
//! Tokens are random, not derived from the identifier (45 CFR 164.514(c)):
//! nothing in SQL text, settings or defaults can turn a real value into its
//! pseudonym, so there is no oracle to enumerate MRNs or birth dates with.
//! The trigger never fails the application's write: a row it could not map
//! is mapped by the broker's backfill at its next pass.

use crate::broker::sql::{TableName, ident, literal};

use super::MAP_SCHEMA;

/// Dollar-quote tag of the trigger function bodies.
const BODY_TAG: &str = "$mcpw_body$";

/// One entity as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityMap {
    /// Entity name (`patient`).
    pub entity: String,
    /// Pseudonym prefix (`pt`).
    pub prefix: String,
    /// The table holding the entity's key.
    pub key_table: TableName,
    /// The key column.
    pub key_column: String,
    /// The key's SQL type (`format_type` of the column).
    pub key_type: String,
}

/// A fresh token for `prefix` (an SQL expression): the prefix, `_` and 80
/// random bits as 20 hex digits — ten of the thirteen bytes of a version-4
/// UUID that carry neither its version nor its variant. One call of
/// `gen_random_uuid` per evaluation, so each row of a multi-row insert
/// draws its own. Written inline in the triggers: a call of a SQL function
/// with a pinned `search_path` is planned again on every row (≈0.1 ms of a
/// trigger-bearing insert), and a regular expression costs ≈27 µs.
pub fn token_sql(prefix: &str) -> String {
    format!(
        "{prefix} || '_' || encode(substring(overlay(uuid_send(gen_random_uuid()) placing ''::bytea from 7 for 3) \
         from 1 for 10), 'hex')"
    )
}

/// `"mcpw_deid"."<name>"`.
pub fn qualified(name: &str) -> String {
    format!("{}.{}", ident(MAP_SCHEMA), ident(name))
}

/// The mapping table of an entity.
pub fn map_table(entity: &str) -> String {
    qualified(&format!("map_{entity}"))
}

fn trigger_function(entity: &str) -> String {
    qualified(&format!("tokens_{entity}"))
}

/// Name of the token trigger on an entity's key table.
pub fn trigger_name(entity: &str) -> String {
    format!("mcpw_tokens_{entity}")
}

/// The schema, the scope registry and the token function: created once,
/// owned by the admin role, usable by nobody else.
pub fn base_ddl() -> Vec<String> {
    let schema = ident(MAP_SCHEMA);
    let new_token = qualified("new_token");
    vec![
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!("REVOKE ALL ON SCHEMA {schema} FROM PUBLIC"),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (scope text PRIMARY KEY, epoch integer NOT NULL DEFAULT 1, \
             since timestamptz NOT NULL DEFAULT now())",
            qualified("scopes")
        ),
        // Rotation: the epoch before the current one, and until when its
        // pseudonyms still resolve.
        format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS previous_epoch integer, \
             ADD COLUMN IF NOT EXISTS previous_until timestamptz",
            qualified("scopes")
        ),
        format!(
            "CREATE OR REPLACE FUNCTION {new_token}(prefix text) RETURNS text LANGUAGE sql VOLATILE \
             SET search_path = pg_catalog, pg_temp AS $$SELECT {}$$",
            token_sql("prefix")
        ),
        format!("REVOKE ALL ON FUNCTION {new_token}(text) FROM PUBLIC"),
        // Pseudonymized copies a trigger could not keep current.
        format!(
            "CREATE TABLE IF NOT EXISTS {} (shadow text PRIMARY KEY, since timestamptz NOT NULL DEFAULT now())",
            qualified(super::shadow::STALE_TABLE)
        ),
    ]
}

/// Starts a new epoch for a scope whose current one is older than its
/// lifetime (bind `$1` = scope, `$2` = grace in seconds, `$3` = lifetime in
/// seconds, both `float8`); returns the new epoch when it rotated. The
/// previous epoch's pseudonyms resolve until `now() + grace`.
pub fn rotate_sql() -> String {
    format!(
        "UPDATE {} SET previous_epoch = epoch, previous_until = now() + make_interval(secs => $2), \
         epoch = epoch + 1, since = now() \
         WHERE scope = $1 AND since <= now() - make_interval(secs => $3) RETURNING epoch",
        qualified("scopes")
    )
}

/// Registers a scope (bind `$1` = scope); a new scope starts at epoch 1.
pub fn register_scope_sql() -> String {
    format!("INSERT INTO {} (scope) VALUES ($1) ON CONFLICT DO NOTHING", qualified("scopes"))
}

/// The entity's mapping table, its trigger function and the trigger.
/// Errors when a column name would break out of the function body.
pub fn entity_ddl(map: &EntityMap) -> Result<Vec<String>, String> {
    let table = map_table(&map.entity);
    let key = ident(&map.key_column);
    let body = format!(
        "BEGIN
  IF NEW.{key} IS NOT NULL THEN
    INSERT INTO {table} (scope, epoch, key, token)
    SELECT s.scope, s.epoch, NEW.{key}, {token} FROM {scopes} s
    ON CONFLICT DO NOTHING;
  END IF;
  RETURN NULL;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'mcp-warden: no pseudonym yet for a new {entity} key (SQLSTATE %)', SQLSTATE;
  RETURN NULL;
END",
        token = token_sql(&literal(&map.prefix)),
        scopes = qualified("scopes"),
        entity = map.entity,
    );
    if body.contains(BODY_TAG) {
        return Err(format!("column name {:?} cannot be used in a trigger body", map.key_column));
    }
    let function = trigger_function(&map.entity);
    Ok(vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (scope text COLLATE \"C\" NOT NULL, epoch integer NOT NULL, \
             key {key_type} NOT NULL, token text COLLATE \"C\" NOT NULL UNIQUE, \
             PRIMARY KEY (scope, epoch, key) INCLUDE (token))",
            key_type = map.key_type
        ),
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
             SET search_path = pg_catalog, pg_temp AS {BODY_TAG}{body}{BODY_TAG}"
        ),
        format!("REVOKE ALL ON FUNCTION {function}() FROM PUBLIC"),
        format!(
            "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OF {key} ON {} FOR EACH ROW EXECUTE FUNCTION {function}()",
            ident(&trigger_name(&map.entity)),
            map.key_table.quoted()
        ),
    ])
}

/// Gives every key of the entity's table a token in every scope that lacks
/// one (rows written while the trigger was missing, new scopes).
pub fn backfill_sql(map: &EntityMap) -> String {
    let table = map_table(&map.entity);
    let key = ident(&map.key_column);
    format!(
        "INSERT INTO {table} (scope, epoch, key, token)
SELECT s.scope, s.epoch, t.key, {new_token}({prefix})
  FROM (SELECT DISTINCT {key} AS key FROM {source} WHERE {key} IS NOT NULL) t CROSS JOIN {scopes} s
 WHERE NOT EXISTS (SELECT 1 FROM {table} m WHERE m.scope = s.scope AND m.epoch = s.epoch AND m.key = t.key)
ON CONFLICT DO NOTHING",
        new_token = qualified("new_token"),
        prefix = literal(&map.prefix),
        source = map.key_table.quoted(),
        scopes = qualified("scopes"),
    )
}

/// The key type an existing mapping table holds (bind `$1` = entity), to
/// refuse a key whose type changed under existing pseudonyms.
pub const MAP_KEY_TYPE_SQL: &str = "
SELECT format_type(a.atttypid, a.atttypmod)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'mcpw_deid' AND c.relname = 'map_' || $1 AND a.attname = 'key' AND NOT a.attisdropped";

#[cfg(test)]
mod tests {
    use super::*;

    fn patient() -> EntityMap {
        EntityMap {
            entity: "patient".into(),
            prefix: "pt".into(),
            key_table: TableName::parse("clinical.patients").unwrap(),
            key_column: "id".into(),
            key_type: "integer".into(),
        }
    }

    #[test]
    fn the_token_function_takes_no_identifier_and_nobody_may_call_it() {
        let ddl = base_ddl().join(";\n");
        assert!(ddl.contains("new_token\"(prefix text)"), "{ddl}");
        assert!(ddl.contains("gen_random_uuid()"));
        assert!(ddl.contains("REVOKE ALL ON FUNCTION \"mcpw_deid\".\"new_token\"(text) FROM PUBLIC"));
        assert!(ddl.contains("REVOKE ALL ON SCHEMA \"mcpw_deid\" FROM PUBLIC"));
    }

    #[test]
    fn entity_ddl_maps_keys_in_every_scope_and_never_fails_the_write() {
        let ddl = entity_ddl(&patient()).unwrap();
        assert!(ddl[0].contains("key integer NOT NULL") && ddl[0].contains("token text COLLATE \"C\" NOT NULL UNIQUE"));
        assert!(ddl[1].contains("SECURITY DEFINER SET search_path = pg_catalog, pg_temp"));
        assert!(ddl[1].contains("EXCEPTION WHEN OTHERS"));
        assert!(!ddl[1].contains("SQLERRM"), "error text may hold a value");
        assert_eq!(ddl[2], "REVOKE ALL ON FUNCTION \"mcpw_deid\".\"tokens_patient\"() FROM PUBLIC");
        assert!(ddl[3].contains("AFTER INSERT OR UPDATE OF \"id\" ON \"clinical\".\"patients\""));
    }

    #[test]
    fn a_column_name_cannot_close_the_function_body() {
        let mut hostile = patient();
        hostile.key_column = "x$mcpw_body$".into();
        assert!(entity_ddl(&hostile).is_err());
    }

    #[test]
    fn backfill_fills_only_missing_tokens() {
        let sql = backfill_sql(&patient());
        assert!(sql.contains("SELECT DISTINCT \"id\" AS key FROM \"clinical\".\"patients\""), "{sql}");
        assert!(sql.contains("NOT EXISTS"));
        assert!(sql.contains("'pt'"));
    }
}
