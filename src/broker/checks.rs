//! What the admin role may do, and what PUBLIC gives every role away.
//!
//! ```text
//!   admin role   CREATEROLE · pg_signal_backend · grant option on CONNECT,
//!                on USAGE of each schema and on each granted column
//!   PUBLIC       CONNECT/TEMPORARY/CREATE on the database · CREATE/USAGE on
//!                schemas · any table privilege · EXECUTE on functions
//!                (SECURITY DEFINER ones run with their owner's rights)
//! ```
//!
//! Every login role the broker issues is also PUBLIC, so what PUBLIC holds
//! widens every caller's reach beyond the tool's columns. The findings go
//! into the PHIStore's status; `revokePublicPrivileges` revokes them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::grants::Grant;
use super::sql::{TableName, ident};
use super::store::StoreError;
use crate::api::{FindingSeverity, PublicPrivilege};

/// What the admin role lacks (empty: everything the broker needs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AdminReport {
    /// Each missing capability, as a sentence naming the object.
    pub missing: Vec<String>,
    /// Capabilities held beyond the need (e.g. SUPERUSER).
    pub excess: Vec<String>,
}

/// Checks the admin role against every grant the broker will hand out on
/// this store.
pub async fn check_admin(client: &Client, needed: &BTreeSet<Grant>) -> Result<AdminReport, StoreError> {
    let mut report = AdminReport::default();
    let row = client
        .query_one(
            "SELECT r.rolsuper, r.rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'),
                    has_database_privilege(current_database(), 'CONNECT WITH GRANT OPTION')
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (superuser, createrole, signal, connect): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if superuser {
        report.excess.push("SUPERUSER: the broker needs CREATEROLE, not superuser".into());
    }
    if !createrole && !superuser {
        report.missing.push("CREATEROLE".into());
    }
    if !signal && !superuser {
        report.missing.push("membership in pg_signal_backend (to end expired sessions)".into());
    }
    if !connect {
        report.missing.push("CONNECT on the database WITH GRANT OPTION (or ownership of it)".into());
    }
    for grant in needed {
        match grant {
            Grant::Schema { schema, privilege } => {
                let row = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                                has_schema_privilege((SELECT oid FROM pg_namespace WHERE nspname = $1),
                                                     $2 || ' WITH GRANT OPTION')",
                        &[schema, privilege],
                    )
                    .await?;
                match (row.get::<_, bool>(0), row.get::<_, Option<bool>>(1)) {
                    (false, _) => report.missing.push(format!("schema {schema} does not exist")),
                    (true, Some(true)) => {}
                    _ => report.missing.push(format!("{privilege} on schema {schema} WITH GRANT OPTION")),
                }
            }
            Grant::Column { table, column, privilege } => {
                let row = client
                    .query_one(
                        "SELECT c.oid IS NOT NULL, a.attnum IS NOT NULL,
                                CASE WHEN a.attnum IS NULL THEN NULL
                                     ELSE has_column_privilege(c.oid, a.attnum, $4 || ' WITH GRANT OPTION') END
                           FROM (SELECT 1) one
                           LEFT JOIN (pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace)
                                  ON n.nspname = $1 AND c.relname = $2
                           LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped",
                        &[&table.schema, &table.table, column, privilege],
                    )
                    .await?;
                match (row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, Option<bool>>(2)) {
                    (false, _, _) => report.missing.push(format!("table {table} does not exist")),
                    (true, false, _) => report.missing.push(format!("column {table}.{column} does not exist")),
                    (true, true, Some(true)) => {}
                    _ => report.missing.push(format!("{privilege} on {table}.{column} WITH GRANT OPTION")),
                }
            }
            _ => {}
        }
    }
    report.missing.dedup();
    Ok(report)
}

/// What the admin role lacks to serve de-identified views: CREATE on the
/// database while a schema is missing (`mcpw_deid`, `deid_<scope>`), SELECT
/// on every classified column a view reads (views read as their owner), and
/// TRIGGER on each entity's key table (new keys get their tokens at once).
pub async fn check_deid_admin(
    client: &Client,
    deid: Option<&crate::api::Deidentification>,
    views: &crate::broker::deid::WantedViews,
) -> Result<Vec<String>, StoreError> {
    let mut missing = Vec::new();
    let Some(deid) = deid.filter(|_| !views.is_empty()) else { return Ok(missing) };
    let mut schemas = vec![crate::deid::MAP_SCHEMA.to_string()];
    schemas.extend(views.keys().map(|s| crate::deid::view_schema(s)));
    let row = client.query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[]).await?;
    if !row.get::<_, bool>(0) {
        for schema in schemas {
            let exists =
                client.query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema]).await?;
            if !exists.get::<_, bool>(0) {
                missing.push(format!("CREATE on the database (to create schema {schema})"));
                break;
            }
        }
    }
    let tables: BTreeSet<&String> = views.values().flatten().collect();
    for name in tables {
        let Some(table) = crate::deid::classification::table(deid, name) else { continue };
        let Some(parsed) = TableName::parse(name) else { continue };
        for column in table.columns.iter().filter(|c| c.class != crate::api::ColumnClass::FreeText) {
            let row = client
                .query_one(
                    "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL
                            WHEN NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1)
                                             AND attname = $2 AND NOT attisdropped) THEN NULL
                            ELSE has_column_privilege(to_regclass($1), $2, 'SELECT') END",
                    &[&parsed.quoted(), &column.name],
                )
                .await?;
            match row.get::<_, Option<bool>>(0) {
                Some(true) => {}
                Some(false) => {
                    missing.push(format!("SELECT on {name}.{} (read by the de-identified view)", column.name))
                }
                None => missing.push(format!("column {name}.{} does not exist", column.name)),
            }
        }
    }
    let used = crate::broker::deid::entities_used(deid, views);
    for entity in deid.entities.iter().filter(|e| used.contains(&e.name)) {
        let Some(parsed) = TableName::parse(&entity.key.table) else { continue };
        let row = client
            .query_one(
                "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE has_table_privilege(to_regclass($1), 'TRIGGER') END",
                &[&parsed.quoted()],
            )
            .await?;
        match row.get::<_, Option<bool>>(0) {
            Some(true) => {}
            Some(false) => missing.push(format!(
                "TRIGGER on {} (new {} keys get their pseudonyms at once)",
                entity.key.table, entity.name
            )),
            None => missing.push(format!("table {} does not exist", entity.key.table)),
        }
    }
    missing.dedup();
    Ok(missing)
}

/// The statement that revokes a finding from PUBLIC.
pub fn revoke_sql(finding: &PublicPrivilege) -> String {
    match finding.kind.as_str() {
        "database" => format!("REVOKE {} ON DATABASE {} FROM PUBLIC", finding.privilege, ident(&finding.object)),
        "schema" => format!("REVOKE {} ON SCHEMA {} FROM PUBLIC", finding.privilege, ident(&finding.object)),
        "table" => match TableName::parse(&finding.object) {
            Some(t) => format!("REVOKE ALL ON TABLE {} FROM PUBLIC", t.quoted()),
            None => format!("REVOKE ALL ON TABLE {} FROM PUBLIC", ident(&finding.object)),
        },
        // regprocedure text is already quoted where it needs to be.
        _ => format!("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC", finding.object),
    }
}

/// Lists what PUBLIC holds outside the system schemas.
pub async fn public_findings(client: &Client) -> Result<Vec<PublicPrivilege>, StoreError> {
    let rows = client
        .query(
            "WITH user_ns AS (
                SELECT oid, nspname FROM pg_namespace
                 WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%')
             SELECT 'database', current_database()::text, p, p <> 'CONNECT'
               FROM unnest(ARRAY['CONNECT', 'TEMPORARY', 'CREATE']) p
              WHERE has_database_privilege('public', current_database(), p)
             UNION ALL
             SELECT 'schema', n.nspname::text, p, p = 'CREATE'
               FROM user_ns n, unnest(ARRAY['CREATE', 'USAGE']) p
              WHERE has_schema_privilege('public', n.oid, p)
             UNION ALL
             SELECT 'table', n.nspname || '.' || c.relname, 'table privileges', true
               FROM pg_class c JOIN user_ns n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
                AND (has_any_column_privilege('public', c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
                     OR has_table_privilege('public', c.oid, 'DELETE, TRUNCATE, TRIGGER'))
             UNION ALL
             SELECT CASE WHEN p.prosecdef THEN 'security definer function' ELSE 'function' END,
                    p.oid::regprocedure::text, 'EXECUTE', p.prosecdef
               FROM pg_proc p JOIN user_ns n ON n.oid = p.pronamespace
              WHERE has_function_privilege('public', p.oid, 'EXECUTE')
              ORDER BY 1, 2, 3",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| PublicPrivilege {
            kind: row.get(0),
            object: row.get(1),
            privilege: row.get(2),
            severity: if row.get::<_, bool>(3) { FindingSeverity::High } else { FindingSeverity::Medium },
        })
        .collect())
}

/// Revokes each finding from PUBLIC, acting as the object's owner when the
/// admin role is a member of it: PostgreSQL revokes only the grants of the
/// role a REVOKE runs as, and PUBLIC's defaults are the owner's grants (an
/// admin holding a grant option of its own would otherwise revoke nothing).
/// A statement that fails is reported; the findings are read again
/// afterwards, so what is left shows.
pub async fn revoke_public(client: &Client, findings: &[PublicPrivilege]) -> Vec<String> {
    let mut failures = Vec::new();
    for finding in findings {
        let revoke = revoke_sql(finding);
        let statement = match owner_to_act_as(client, finding).await {
            Ok(Some(owner)) => format!("SET ROLE {}; {revoke}; RESET ROLE", ident(&owner)),
            Ok(None) => revoke,
            Err(e) => {
                failures.push(format!("{} {}: {e}", finding.kind, finding.object));
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&statement).await {
            let _ = client.batch_execute("RESET ROLE").await;
            failures.push(format!("{} {}: {}", finding.kind, finding.object, StoreError::from(e)));
        }
    }
    failures
}

/// The owner of the finding's object, when it is not the admin role and the
/// admin role may act as it.
async fn owner_to_act_as(client: &Client, finding: &PublicPrivilege) -> Result<Option<String>, StoreError> {
    let owner_sql = match finding.kind.as_str() {
        "database" => "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
        "schema" => "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1",
        "table" => {
            "SELECT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE format('%s.%s', n.nspname, c.relname) = $1"
        }
        _ => "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE oid = $1::text::regprocedure",
    };
    let Some(row) = client.query_opt(owner_sql, &[&finding.object]).await? else { return Ok(None) };
    let owner: String = row.get(0);
    let row = client
        .query_one(
            "SELECT $1 <> current_user::text AND pg_has_role(current_user, $1::text::regrole, 'MEMBER')",
            &[&owner],
        )
        .await?;
    Ok(row.get::<_, bool>(0).then_some(owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(kind: &str, object: &str, privilege: &str) -> PublicPrivilege {
        PublicPrivilege {
            kind: kind.into(),
            object: object.into(),
            privilege: privilege.into(),
            severity: FindingSeverity::High,
        }
    }

    #[test]
    fn revocations_quote_names() {
        assert_eq!(
            revoke_sql(&finding("database", "ehr", "TEMPORARY")),
            "REVOKE TEMPORARY ON DATABASE \"ehr\" FROM PUBLIC"
        );
        assert_eq!(
            revoke_sql(&finding("schema", "public", "CREATE")),
            "REVOKE CREATE ON SCHEMA \"public\" FROM PUBLIC"
        );
        assert_eq!(
            revoke_sql(&finding("table", "clinical.notes", "table privileges")),
            "REVOKE ALL ON TABLE \"clinical\".\"notes\" FROM PUBLIC"
        );
        assert_eq!(
            revoke_sql(&finding("function", "clinical.dump(integer)", "EXECUTE")),
            "REVOKE EXECUTE ON FUNCTION clinical.dump(integer) FROM PUBLIC"
        );
    }
}
