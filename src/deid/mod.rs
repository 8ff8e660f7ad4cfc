//! De-identification enforced by the database: what a de-identified tool
//! may read, and the SQL that serves it pseudonyms instead of identifiers.
//!
//! ```text
//!   PHIStore.deidentification ─┐
//!   tool grants (base tables) ─┼─ classification::tool_view_grants() ─▶ grants on deid_<scope>.<table>
//!   pseudonym scope ───────────┘        (pure; unclassified column → refused)
//!
//!   broker, per store:  mapping::ddl()  schema mcpw_deid · scopes · map_<entity> (random tokens,
//!                                       indexed both ways) · token trigger on each entity's key table
//!                       views::plan()   what deid_<scope>.<table> serves: identifiers → the entity's
//!                                       token, quasi-identifiers generalized, free text left out
//!                       shadow::shadow() the table's pseudonymized copy kept by triggers, and the view
//!                                       over it (views::view() joins the mapping where there is none)
//! ```
//!
//! The per-call role holds column grants on the views only — never on a
//! base table — so whatever SQL a compromised MCP server sends, PostgreSQL
//! evaluates it over pseudonyms. The views call no function a caller could
//! use as an oracle (only built-in, total expressions), and the mapping
//! table is readable by its owner alone. docs/deidentification.md argues the
//! threat model point by point.

pub mod classification;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod mapping;
pub mod scan;
pub mod shadow;
pub mod views;

/// Schema of the mapping tables, the scope registry and the token trigger
/// functions. Owned by the broker's admin role; no other role holds any
/// privilege in it.
pub const MAP_SCHEMA: &str = "mcpw_deid";

/// Prefix of the schemas holding one scope's views.
pub const VIEW_SCHEMA_PREFIX: &str = "deid_";

/// The schema of a scope's views: `deid_<scope>`.
pub fn view_schema(scope: &str) -> String {
    format!("{VIEW_SCHEMA_PREFIX}{scope}")
}

/// A server's scope when it declares none: its name, `-` as `_` (a DNS
/// label becomes a plain SQL identifier).
pub fn default_scope(server_name: &str) -> String {
    server_name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_name_plain_schemas() {
        assert_eq!(default_scope("patient-lookup"), "patient_lookup");
        assert_eq!(view_schema("patient_lookup"), "deid_patient_lookup");
        // A 52-character server name still gives a schema name under 63.
        assert!(view_schema(&default_scope(&"a".repeat(52))).len() <= 63);
    }
}
