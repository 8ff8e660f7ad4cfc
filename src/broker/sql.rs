//! SQL text the broker builds: quoted identifiers and literals.
//!
//! Role DDL (`CREATE ROLE`, `GRANT`, `COMMENT`) takes no bind parameters, so
//! every name and literal in it goes through these two functions. Names come
//! from admitted manifests (the CRD pattern allows `[A-Za-z0-9_$]` only), but
//! quoting does not rely on that.

/// A double-quoted SQL identifier: `"a""b"`. Quoting also keeps the case of
/// mixed-case names, which PostgreSQL would otherwise fold to lower case.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A single-quoted SQL literal, safe under `standard_conforming_strings`
/// (on since PostgreSQL 9.1; the broker checks it at connect). A NUL cannot
/// appear in a PostgreSQL string and is dropped.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\0', "").replace('\'', "''"))
}

/// A `schema.table` name as the policy declares it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub table: String,
}

impl TableName {
    /// Splits `schema.table`; `None` unless both parts are present.
    pub fn parse(qualified: &str) -> Option<TableName> {
        let (schema, table) = qualified.split_once('.')?;
        (!schema.is_empty() && !table.is_empty() && !table.contains('.'))
            .then(|| TableName { schema: schema.to_string(), table: table.to_string() })
    }

    /// `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.table))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_double_their_quotes() {
        assert_eq!(ident("patients"), "\"patients\"");
        assert_eq!(ident("Mixed"), "\"Mixed\"");
        assert_eq!(ident("a\"; DROP TABLE x; --"), "\"a\"\"; DROP TABLE x; --\"");
    }

    #[test]
    fn literals_double_their_quotes_and_drop_nul() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\0b"), "'ab'");
        assert_eq!(literal("x'); DROP ROLE admin; --"), "'x''); DROP ROLE admin; --'");
    }

    #[test]
    fn table_names_need_both_parts() {
        assert_eq!(
            TableName::parse("clinical.patients"),
            Some(TableName { schema: "clinical".into(), table: "patients".into() })
        );
        assert_eq!(TableName::parse("patients"), None);
        assert_eq!(TableName::parse(".patients"), None);
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse("clinical.patients").map(|t| t.quoted()), Some("\"clinical\".\"patients\"".into()));
    }
}
