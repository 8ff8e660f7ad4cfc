//! What a tool's group role must hold, what it holds, and the SQL between.
//!
//! ```text
//!   policy (tool × store) ─ desired() ─┐
//!                                      ├─ diff() ─▶ REVOKE … (extras first) ─▶ GRANT … (missing)
//!   catalog (aclexplode)  ─ actual ────┘
//! ```
//!
//! The group role holds exactly: CONNECT on the database, USAGE on each
//! schema of a named table, and the named privileges on the named columns.
//! Anything else it holds — a table-level grant (which covers every column),
//! another table, a function, a role membership — is an extra and revoked.

use std::collections::{BTreeMap, BTreeSet};

use super::sql::{TableName, ident};
use crate::policy::CompiledTableGrant;

/// One privilege a role holds directly (not through PUBLIC or a membership).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grant {
    /// On the current database (`CONNECT`, `TEMPORARY`, `CREATE`).
    Database(String),
    /// On a schema (`USAGE`, `CREATE`).
    Schema {
        /// Schema name.
        schema: String,
        /// Privilege.
        privilege: String,
    },
    /// On a whole table, view or sequence: covers every column.
    Relation {
        /// The relation.
        table: TableName,
        /// `true` for a sequence (revoked `ON SEQUENCE`).
        sequence: bool,
        /// Privilege.
        privilege: String,
    },
    /// On one column.
    Column {
        /// The table.
        table: TableName,
        /// The column.
        column: String,
        /// Privilege.
        privilege: String,
    },
    /// EXECUTE on a function, by its `regprocedure` text (already quoted).
    Function {
        /// `schema.name(argtypes)`.
        signature: String,
        /// Privilege.
        privilege: String,
    },
    /// Membership in another role.
    Membership(String),
}

/// The grants a tool's group role must hold on one store. Errors name a
/// table the policy spells without a schema (the CRD refuses those; a
/// compiled policy from elsewhere might not).
pub fn desired(tables: &[CompiledTableGrant]) -> Result<BTreeSet<Grant>, String> {
    let mut grants = BTreeSet::from([Grant::Database("CONNECT".into())]);
    for grant in tables {
        let table =
            TableName::parse(&grant.table).ok_or_else(|| format!("table {:?} is not schema-qualified", grant.table))?;
        grants.insert(Grant::Schema { schema: table.schema.clone(), privilege: "USAGE".into() });
        for column in &grant.columns {
            for privilege in &grant.privileges {
                grants.insert(Grant::Column {
                    table: table.clone(),
                    column: column.clone(),
                    privilege: privilege.as_sql().into(),
                });
            }
        }
    }
    Ok(grants)
}

/// The statements that turn `actual` into `desired` for `role` on
/// `database`: revocations first (a table-level revoke also drops that
/// table's column grants, which the grants then restore).
pub fn diff(role: &str, database: &str, desired: &BTreeSet<Grant>, actual: &BTreeSet<Grant>) -> Vec<String> {
    let role = ident(role);
    let mut statements: Vec<String> =
        actual.difference(desired).map(|extra| revoke_sql(extra, &role, database)).collect();
    // Missing column grants, one statement per (table, privilege).
    let mut columns: BTreeMap<(&TableName, &str), Vec<&str>> = BTreeMap::new();
    for missing in desired.difference(actual) {
        match missing {
            Grant::Column { table, column, privilege } => {
                columns.entry((table, privilege.as_str())).or_default().push(column);
            }
            other => statements.push(grant_sql(other, &role, database)),
        }
    }
    for ((table, privilege), cols) in columns {
        let list = cols.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        statements.push(format!("GRANT {privilege} ({list}) ON TABLE {} TO {role}", table.quoted()));
    }
    statements
}

fn grant_sql(grant: &Grant, role: &str, database: &str) -> String {
    match grant {
        Grant::Database(p) => format!("GRANT {p} ON DATABASE {} TO {role}", ident(database)),
        Grant::Schema { schema, privilege } => format!("GRANT {privilege} ON SCHEMA {} TO {role}", ident(schema)),
        Grant::Relation { table, sequence, privilege } => {
            format!("GRANT {privilege} ON {} {} TO {role}", relation_keyword(*sequence), table.quoted())
        }
        Grant::Column { table, column, privilege } => {
            format!("GRANT {privilege} ({}) ON TABLE {} TO {role}", ident(column), table.quoted())
        }
        Grant::Function { signature, privilege } => format!("GRANT {privilege} ON FUNCTION {signature} TO {role}"),
        Grant::Membership(other) => format!("GRANT {} TO {role}", ident(other)),
    }
}

fn revoke_sql(grant: &Grant, role: &str, database: &str) -> String {
    match grant {
        Grant::Database(p) => format!("REVOKE {p} ON DATABASE {} FROM {role}", ident(database)),
        Grant::Schema { schema, privilege } => format!("REVOKE {privilege} ON SCHEMA {} FROM {role}", ident(schema)),
        Grant::Relation { table, sequence, privilege } => {
            format!("REVOKE {privilege} ON {} {} FROM {role}", relation_keyword(*sequence), table.quoted())
        }
        Grant::Column { table, column, privilege } => {
            format!("REVOKE {privilege} ({}) ON TABLE {} FROM {role}", ident(column), table.quoted())
        }
        Grant::Function { signature, privilege } => format!("REVOKE {privilege} ON FUNCTION {signature} FROM {role}"),
        Grant::Membership(other) => format!("REVOKE {} FROM {role}", ident(other)),
    }
}

fn relation_keyword(sequence: bool) -> &'static str {
    if sequence { "SEQUENCE" } else { "TABLE" }
}

/// Reads a role's direct grants from the catalog. Columns of each row:
/// kind, first name, second name, third name, privilege.
pub const ACTUAL_GRANTS_SQL: &str = "
WITH r AS (SELECT oid FROM pg_roles WHERE rolname = $1)
SELECT 'database', '', '', '', x.privilege_type
  FROM pg_database d, aclexplode(d.datacl) x, r
 WHERE d.datname = current_database() AND x.grantee = r.oid
UNION ALL
SELECT 'schema', n.nspname, '', '', x.privilege_type
  FROM pg_namespace n, aclexplode(n.nspacl) x, r
 WHERE x.grantee = r.oid
UNION ALL
SELECT CASE WHEN c.relkind = 'S' THEN 'sequence' ELSE 'relation' END, n.nspname, c.relname, '', x.privilege_type
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) x, r
 WHERE x.grantee = r.oid
UNION ALL
SELECT 'column', n.nspname, c.relname, a.attname, x.privilege_type
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace,
       aclexplode(a.attacl) x, r
 WHERE a.attnum > 0 AND NOT a.attisdropped AND x.grantee = r.oid
UNION ALL
SELECT 'function', p.oid::regprocedure::text, '', '', x.privilege_type
  FROM pg_proc p, aclexplode(p.proacl) x, r
 WHERE x.grantee = r.oid
UNION ALL
SELECT 'membership', g.rolname, '', '', 'MEMBER'
  FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid, r
 WHERE m.member = r.oid";

/// One catalog row of [`ACTUAL_GRANTS_SQL`] as a [`Grant`]; `None` for a
/// kind this build does not know (reported by the caller).
pub fn from_row(kind: &str, first: &str, second: &str, third: &str, privilege: &str) -> Option<Grant> {
    let table = || TableName { schema: first.to_string(), table: second.to_string() };
    let privilege = privilege.to_string();
    Some(match kind {
        "database" => Grant::Database(privilege),
        "schema" => Grant::Schema { schema: first.to_string(), privilege },
        "relation" => Grant::Relation { table: table(), sequence: false, privilege },
        "sequence" => Grant::Relation { table: table(), sequence: true, privilege },
        "column" => Grant::Column { table: table(), column: third.to_string(), privilege },
        "function" => Grant::Function { signature: first.to_string(), privilege },
        "membership" => Grant::Membership(first.to_string()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Privilege;

    fn grant(table: &str, columns: &[&str], privileges: &[Privilege]) -> CompiledTableGrant {
        CompiledTableGrant {
            table: table.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            privileges: privileges.iter().copied().collect(),
        }
    }

    fn table(name: &str) -> TableName {
        TableName::parse(name).unwrap()
    }

    #[test]
    fn desired_is_connect_usage_and_columns() {
        let want = desired(&[grant("clinical.patients", &["mrn", "name"], &[Privilege::Select])]).unwrap();
        let col =
            |c: &str| Grant::Column { table: table("clinical.patients"), column: c.into(), privilege: "SELECT".into() };
        assert_eq!(
            want,
            BTreeSet::from([
                Grant::Database("CONNECT".into()),
                Grant::Schema { schema: "clinical".into(), privilege: "USAGE".into() },
                col("mrn"),
                col("name"),
            ])
        );
        assert!(desired(&[grant("patients", &["mrn"], &[Privilege::Select])]).is_err());
    }

    #[test]
    fn diff_from_nothing_grants_columns_in_one_statement_per_privilege() {
        let want =
            desired(&[grant("clinical.patients", &["mrn", "name"], &[Privilege::Select, Privilege::Update])]).unwrap();
        let sql = diff("mcpw_g_1", "ehr", &want, &BTreeSet::new());
        assert_eq!(
            sql,
            vec![
                "GRANT CONNECT ON DATABASE \"ehr\" TO \"mcpw_g_1\"",
                "GRANT USAGE ON SCHEMA \"clinical\" TO \"mcpw_g_1\"",
                "GRANT SELECT (\"mrn\", \"name\") ON TABLE \"clinical\".\"patients\" TO \"mcpw_g_1\"",
                "GRANT UPDATE (\"mrn\", \"name\") ON TABLE \"clinical\".\"patients\" TO \"mcpw_g_1\"",
            ]
        );
    }

    #[test]
    fn diff_revokes_every_extra_before_granting() {
        let want = desired(&[grant("clinical.patients", &["mrn"], &[Privilege::Select])]).unwrap();
        let mut have = want.clone();
        have.insert(Grant::Column {
            table: table("clinical.patients"),
            column: "ssn".into(),
            privilege: "SELECT".into(),
        });
        have.insert(Grant::Relation { table: table("clinical.notes"), sequence: false, privilege: "SELECT".into() });
        have.insert(Grant::Relation { table: table("clinical.ids"), sequence: true, privilege: "USAGE".into() });
        have.insert(Grant::Function { signature: "clinical.dump(integer)".into(), privilege: "EXECUTE".into() });
        have.insert(Grant::Membership("pg_read_all_data".into()));
        have.insert(Grant::Database("TEMPORARY".into()));
        have.remove(&Grant::Schema { schema: "clinical".into(), privilege: "USAGE".into() });
        let sql = diff("g", "ehr", &want, &have);
        assert_eq!(
            sql,
            vec![
                "REVOKE TEMPORARY ON DATABASE \"ehr\" FROM \"g\"",
                "REVOKE USAGE ON SEQUENCE \"clinical\".\"ids\" FROM \"g\"",
                "REVOKE SELECT ON TABLE \"clinical\".\"notes\" FROM \"g\"",
                "REVOKE SELECT (\"ssn\") ON TABLE \"clinical\".\"patients\" FROM \"g\"",
                "REVOKE EXECUTE ON FUNCTION clinical.dump(integer) FROM \"g\"",
                "REVOKE \"pg_read_all_data\" FROM \"g\"",
                "GRANT USAGE ON SCHEMA \"clinical\" TO \"g\"",
            ]
        );
        assert!(diff("g", "ehr", &want, &want).is_empty());
    }

    #[test]
    fn rows_map_to_grants() {
        assert_eq!(
            from_row("column", "clinical", "patients", "mrn", "SELECT"),
            Some(Grant::Column { table: table("clinical.patients"), column: "mrn".into(), privilege: "SELECT".into() })
        );
        assert_eq!(from_row("membership", "admins", "", "", "MEMBER"), Some(Grant::Membership("admins".into())));
        assert_eq!(from_row("largeobject", "1", "", "", "SELECT"), None);
    }

    #[test]
    fn hostile_names_stay_identifiers() {
        let want = desired(&[grant("clinical.patients", &["x\"); DROP TABLE y; --"], &[Privilege::Select])]).unwrap();
        let sql = diff("g", "ehr", &want, &BTreeSet::new());
        assert!(sql.iter().any(|s| s.contains("(\"x\"\"); DROP TABLE y; --\")")), "{sql:?}");
    }
}
