//! The broker's work inside one PostgreSQL database, over its admin
//! connection: group roles and their grants, login roles, reaping,
//! revocation, and the checks of what the admin role may do and what
//! PUBLIC gives away.
//!
//! Every statement that names a role, table or column is built with
//! [`super::sql`]; every value that can be a bind parameter is one.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::grants::{self, ACTUAL_GRANTS_SQL, Grant};
use super::naming;
use super::sql::{TableName, ident, literal};
use crate::api::SslMode;
use crate::policy::CompiledStore;

/// How long a connection attempt to a store may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest the broker's DDL waits for a lock on a store's object (its
/// `lock_timeout`). A lock request waiting in PostgreSQL's queue blocks every
/// later request that conflicts with it: a trigger waiting for an
/// application's open write transaction would hold up all the application's
/// writes to that table. The broker gives up instead, reports it, and tries
/// again at its next pass.
pub const LOCK_TIMEOUT: &str = "5s";
/// How long the reaper waits for a terminated backend to exit.
const TERMINATE_WAIT_MS: i64 = 5000;

/// Why a store operation failed. Messages name roles, tables and columns
/// (never PHI) and never a password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached.
    #[error("store unreachable: {0}")]
    Unreachable(String),
    /// The admin credential was refused.
    #[error("the store refused the admin credential ({0})")]
    AdminRefused(String),
    /// The admin role may not do something the broker needs.
    #[error("the admin role lacks a privilege: {0}")]
    AdminPrivilege(String),
    /// The store's TLS settings cannot be honoured (a mode that does not
    /// verify the server, or an unusable CA bundle).
    #[error("TLS: {0}")]
    Tls(String),
    /// A group role's effective privileges differ from the policy.
    #[error("grants of {role} differ from the policy: {detail}")]
    GrantMismatch {
        /// The group role.
        role: String,
        /// The first difference found.
        detail: String,
    },
    /// The de-identified views cannot be served as classified.
    #[error("de-identification: {0}")]
    Deidentification(String),
    /// A warm login to be claimed is gone, or was changed behind the
    /// broker's back (it is no longer inert).
    #[error("warm login {0} is gone or no longer inert")]
    WarmLoginGone(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Sql(String),
}

impl StoreError {
    /// A stable label for metrics and API error classes.
    pub fn class(&self) -> &'static str {
        match self {
            StoreError::Unreachable(_) => "store_unreachable",
            StoreError::AdminRefused(_) => "admin_refused",
            StoreError::AdminPrivilege(_) => "admin_privilege",
            StoreError::Tls(_) => "tls",
            StoreError::GrantMismatch { .. } => "grant_mismatch",
            StoreError::Deidentification(_) => "deidentification",
            StoreError::WarmLoginGone(_) => "warm_login_gone",
            StoreError::Sql(_) => "sql",
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                StoreError::AdminRefused(c.code().to_string())
            }
            Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
                StoreError::AdminPrivilege(e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default())
            }
            // A data exception's message quotes the value it choked on
            // (`invalid input syntax for type integer: "E-100"`): a key or
            // other PHI. Its SQLSTATE alone goes into status and logs.
            Some(c) if c.code().starts_with("22") => StoreError::Sql(format!("data exception (SQLSTATE {})", c.code())),
            Some(_) => {
                StoreError::Sql(e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()))
            }
            None => {
                // The error's source says why (refused, timed out, the
                // certificate); it never holds the password.
                let mut message = e.to_string();
                if let Some(source) = std::error::Error::source(&e) {
                    message = format!("{message}: {source}");
                }
                if message.contains("TLS") { StoreError::Tls(message) } else { StoreError::Unreachable(message) }
            }
        }
    }
}

/// Where a store is and how the broker logs in.
#[derive(Clone)]
pub struct StoreAccess {
    /// Connection facts.
    pub store: CompiledStore,
    /// Admin role name.
    pub admin_user: String,
    /// Admin password.
    pub admin_password: String,
    /// PEM CA bundle for `verify-full` (system roots when absent).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for StoreAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreAccess")
            .field("store", &self.store)
            .field("admin_user", &self.admin_user)
            .finish_non_exhaustive()
    }
}

/// Opens an admin connection. The connection task ends with the client.
pub async fn connect(access: &StoreAccess) -> Result<Client, StoreError> {
    let store = &access.store;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&store.host)
        .port(store.port)
        .dbname(&store.database)
        .user(&access.admin_user)
        .password(access.admin_password.as_bytes())
        .application_name("mcp-warden-broker")
        .options(format!("-c lock_timeout={LOCK_TIMEOUT}"))
        .connect_timeout(CONNECT_TIMEOUT);
    let client = match store.ssl_mode {
        SslMode::Disable => {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(log_end(connection));
            client
        }
        SslMode::VerifyFull => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(access.ca_pem.as_deref())?);
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(log_end(connection));
            client
        }
        other => {
            return Err(StoreError::Tls(format!(
                "sslMode {} does not verify the server, and the broker sends an admin credential only to a \
                 verified one: use verify-full (with caConfigMapRef for a private CA), or disable on a network \
                 you trust",
                other.as_str()
            )));
        }
    };
    let row = client.query_one("SHOW standard_conforming_strings", &[]).await?;
    if row.get::<_, String>(0) != "on" {
        return Err(StoreError::Sql("standard_conforming_strings is off; the broker refuses to build DDL".into()));
    }
    Ok(client)
}

async fn log_end<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "admin connection ended");
    }
}

/// The rustls configuration of `verify-full`: the certificate chain to the
/// given CA bundle (or the system's roots), and the host name.
pub fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::Tls(format!("the CA bundle is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(StoreError::Tls("the CA bundle holds no certificate".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| StoreError::Tls(format!("unusable CA certificate: {e}")))?;
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                // A system root this rustls cannot parse is skipped, as every
                // rustls client does; the others still verify.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(StoreError::Tls("no system CA roots found; set caConfigMapRef".into()));
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Makes `group` a NOLOGIN role holding exactly `desired`, then proves it.
pub async fn sync_group(client: &mut Client, group: &str, desired: &BTreeSet<Grant>) -> Result<(), StoreError> {
    let database = current_database(client).await?;
    let existing = client.query_opt("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", &[&group]).await?;
    match existing {
        None => {
            // The comment scopes garbage collection to this database (roles
            // are cluster-wide); it names no tool or caller.
            let created = client
                .batch_execute(&format!(
                    "CREATE ROLE {g} NOLOGIN NOINHERIT; COMMENT ON ROLE {g} IS {c}",
                    g = ident(group),
                    c = literal(&group_comment(&database)),
                ))
                .await;
            // A concurrent broker may have created it first.
            if let Err(e) = created
                && e.code() != Some(&SqlState::DUPLICATE_OBJECT)
            {
                return Err(e.into());
            }
        }
        Some(row) if row.get::<_, bool>(0) => {
            client.batch_execute(&format!("ALTER ROLE {} NOLOGIN", ident(group))).await?;
        }
        Some(_) => {}
    }
    // A table-level revoke also drops that table's column grants, which the
    // next round restores; a round that changes nothing means the admin
    // role may not revoke what is left (another grantor's grants: PostgreSQL
    // revokes only the current role's own, with a warning).
    let mut previous: Option<Vec<String>> = None;
    for _ in 0..4 {
        let actual = actual_grants(client, group).await?;
        let statements = grants::diff(group, &database, desired, &actual);
        if statements.is_empty() {
            return verify_group(client, group, desired).await;
        }
        if previous.as_ref() == Some(&statements) {
            let extras: Vec<String> = actual.difference(desired).map(describe).collect();
            let missing: Vec<String> = desired.difference(&actual).map(describe).collect();
            let mut detail = String::new();
            if !extras.is_empty() {
                detail.push_str(&format!(
                    "holds {} granted by a role the admin role does not act for; revoke as the grantor or table owner",
                    extras.join(", ")
                ));
            }
            if !missing.is_empty() {
                detail.push_str(&format!(
                    "{}cannot be granted {}",
                    if detail.is_empty() { "" } else { "; " },
                    missing.join(", ")
                ));
            }
            return Err(StoreError::GrantMismatch { role: group.to_string(), detail });
        }
        let tx = client.transaction().await?;
        for statement in &statements {
            tx.batch_execute(statement).await?;
        }
        tx.commit().await?;
        previous = Some(statements);
    }
    Err(StoreError::GrantMismatch { role: group.to_string(), detail: "grants did not settle".into() })
}

/// A grant in words, for messages.
fn describe(grant: &Grant) -> String {
    match grant {
        Grant::Database(p) => format!("{p} on the database"),
        Grant::Schema { schema, privilege } => format!("{privilege} on schema {schema}"),
        Grant::Relation { table, privilege, .. } => format!("{privilege} on all of {table}"),
        Grant::Column { table, column, privilege } => format!("{privilege} on {table}.{column}"),
        Grant::Function { signature, privilege } => format!("{privilege} on function {signature}"),
        Grant::Membership(role) => format!("membership in {role}"),
    }
}

/// The role's direct grants, from the catalog.
pub async fn actual_grants(client: &Client, role: &str) -> Result<BTreeSet<Grant>, StoreError> {
    let rows = client.query(ACTUAL_GRANTS_SQL, &[&role]).await?;
    let mut out = BTreeSet::new();
    for row in rows {
        let field = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
        if let Some(grant) = grants::from_row(&field(0), &field(1), &field(2), &field(3), &field(4)) {
            out.insert(grant);
        }
    }
    Ok(out)
}

/// Proves the group's effective reach (own grants, PUBLIC's, memberships')
/// with `has_column_privilege`/`has_table_privilege`: each named column has
/// exactly its named privileges, no table-level privilege anywhere, no
/// other table reachable.
pub async fn verify_group(client: &Client, group: &str, desired: &BTreeSet<Grant>) -> Result<(), StoreError> {
    let mismatch = |detail: String| StoreError::GrantMismatch { role: group.to_string(), detail };
    let mut tables: BTreeSet<&TableName> = BTreeSet::new();
    for grant in desired {
        if let Grant::Column { table, .. } = grant {
            tables.insert(table);
        }
    }
    for table in &tables {
        let rows = client
            .query(
                "SELECT a.attname::text,
                        has_column_privilege($1, c.oid, a.attnum, 'SELECT'),
                        has_column_privilege($1, c.oid, a.attnum, 'INSERT'),
                        has_column_privilege($1, c.oid, a.attnum, 'UPDATE'),
                        has_column_privilege($1, c.oid, a.attnum, 'REFERENCES')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE n.nspname = $2 AND c.relname = $3",
                &[&group, &table.schema, &table.table],
            )
            .await?;
        if rows.is_empty() {
            return Err(mismatch(format!("table {table} does not exist")));
        }
        let mut seen = BTreeSet::new();
        for row in &rows {
            let column: String = row.get(0);
            for (i, privilege) in ["SELECT", "INSERT", "UPDATE", "REFERENCES"].iter().enumerate() {
                let has: bool = row.get(i + 1);
                let want = desired.contains(&Grant::Column {
                    table: (*table).clone(),
                    column: column.clone(),
                    privilege: privilege.to_string(),
                });
                if has != want {
                    let verb = if has { "holds" } else { "lacks" };
                    return Err(mismatch(format!(
                        "{verb} {privilege} on {table}.{column} (a column of the tool's own table: PUBLIC's \
                         privileges there are refused too)"
                    )));
                }
            }
            seen.insert(column);
        }
        for grant in desired {
            if let Grant::Column { table: t, column, .. } = grant
                && t == *table
                && !seen.contains(column)
            {
                return Err(mismatch(format!("column {table}.{column} does not exist")));
            }
        }
        let whole: bool = client
            .query_one(
                "SELECT has_table_privilege($1, format('%I.%I', $2::text, $3::text),
                        'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')",
                &[&group, &table.schema, &table.table],
            )
            .await?
            .get(0);
        if whole {
            return Err(mismatch(format!("holds a table-level privilege on {table} (covering every column)")));
        }
    }
    let others = client
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
                AND (has_any_column_privilege($1, c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
                     OR has_table_privilege($1, c.oid, 'DELETE, TRUNCATE, TRIGGER'))
                -- Reach every role has through PUBLIC is a store finding
                -- (status.publicPrivileges), not this group's.
                AND NOT (has_any_column_privilege('public', c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
                         OR has_table_privilege('public', c.oid, 'DELETE, TRUNCATE, TRIGGER'))",
            &[&group],
        )
        .await?;
    for row in others {
        let table = TableName { schema: row.get(0), table: row.get(1) };
        if !tables.contains(&table) {
            return Err(mismatch(format!("can reach {table}, which the policy does not name")));
        }
    }
    Ok(())
}

/// What a login role was created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedLogin {
    /// Expiry, by the database's clock.
    pub valid_until: DateTime<Utc>,
    /// The database's clock when the role was created.
    pub db_now: DateTime<Utc>,
}

/// A LOGIN role to create (no `Debug`: it holds a verifier).
#[derive(Clone, Copy)]
pub struct NewLogin<'a> {
    /// The group role it is a member of (and nothing else).
    pub group: &'a str,
    /// Its name.
    pub role: &'a str,
    /// The name prefix shared by every role of its caller × tool pair.
    pub pair: &'a str,
    /// Where its password comes from.
    pub password: LoginPassword<'a>,
    /// Its lifetime, from the database's clock.
    pub ttl: Duration,
    /// `CONNECTION LIMIT`.
    pub connection_limit: u32,
    /// The lease id, as its comment.
    pub lease_id: &'a str,
}

/// The password of a login role to create.
#[derive(Clone, Copy)]
pub enum LoginPassword<'a> {
    /// A new role with this SCRAM-SHA-256 verifier (never the password).
    Verifier(&'a str),
    /// A warm login (`super::warm`), renamed: its verifier is set already.
    Warm(&'a str),
}

/// Creates a LOGIN role in `group` only, with a SCRAM verifier (never the
/// password), an expiry from the database's clock, a connection limit and
/// the lease id as its comment — in one transaction, so a failure leaves
/// nothing behind. The transaction holds an advisory lock on the role's
/// name prefix (its caller × tool pair), so two brokers (a rollout's old
/// and new pod) never create roles for one pair at the same moment.
///
/// From a warm login the role is the same in the catalog (attributes,
/// verifier, expiry, one membership, comment); only its OID is older. A
/// warm login that is gone, or is no longer inert (LOGIN, an attribute, a
/// membership, an object or privilege of its own), is not claimed
/// ([`StoreError::WarmLoginGone`]) and the transaction leaves it as it was.
pub async fn create_login(client: &mut Client, login: &NewLogin<'_>) -> Result<CreatedLogin, StoreError> {
    let secs = login.ttl.as_secs_f64();
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT now(), now() + make_interval(secs => $1), pg_advisory_xact_lock(hashtextextended($2, 0))",
            &[&secs, &login.pair],
        )
        .await?;
    let db_now: DateTime<Utc> = row.get(0);
    let valid_until: DateTime<Utc> = row.get(1);
    let until = valid_until.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    let (role, limit, until, group, lease) =
        (ident(login.role), login.connection_limit, literal(&until), ident(login.group), literal(login.lease_id));
    let statements = match login.password {
        LoginPassword::Verifier(verifier) => format!(
            "CREATE ROLE {role} LOGIN {ATTRIBUTES} CONNECTION LIMIT {limit} PASSWORD {verifier} \
             VALID UNTIL {until} IN ROLE {group}; COMMENT ON ROLE {role} IS {lease}",
            verifier = literal(verifier),
        ),
        LoginPassword::Warm(warm) => {
            // Still inert, as it was made: no LOGIN, no attribute, no
            // membership either way, and nothing in any database depends on
            // it (no object it owns, no privilege granted to it) — else a
            // grant made to it behind the broker's back would come along.
            let still_warm = tx
                .query_opt(
                    "SELECT 1 FROM pg_roles r
                      WHERE r.rolname = $1 AND NOT (r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb
                                                    OR r.rolreplication OR r.rolbypassrls)
                        AND NOT EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid OR m.roleid = r.oid)
                        AND NOT EXISTS (SELECT 1 FROM pg_shdepend d
                                         WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid)",
                    &[&warm],
                )
                .await?
                .is_some();
            if !naming::is_warm_role(warm) || !still_warm {
                return Err(StoreError::WarmLoginGone(warm.to_string()));
            }
            format!(
                "ALTER ROLE {warm} RENAME TO {role}; \
                 ALTER ROLE {role} LOGIN CONNECTION LIMIT {limit} VALID UNTIL {until}; \
                 GRANT {group} TO {role}; COMMENT ON ROLE {role} IS {lease}",
                warm = ident(warm),
            )
        }
    };
    tx.batch_execute(&statements).await?;
    tx.commit().await?;
    Ok(CreatedLogin { valid_until, db_now })
}

/// The attributes of every role the broker makes, besides LOGIN/NOLOGIN.
const ATTRIBUTES: &str = "INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS";

/// Makes a warm login: NOLOGIN, member of nothing, the verifier set (which
/// is where PostgreSQL spends its PBKDF2), the database's clock in its
/// comment. Returns that time.
pub async fn create_warm(client: &mut Client, role: &str, verifier: &str) -> Result<DateTime<Utc>, StoreError> {
    if !naming::is_warm_role(role) {
        return Err(StoreError::Sql(format!("refusing to make {role:?}: not a warm login name")));
    }
    let tx = client.transaction().await?;
    let made: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);
    tx.batch_execute(&format!(
        "CREATE ROLE {role} NOLOGIN {ATTRIBUTES} PASSWORD {verifier}; COMMENT ON ROLE {role} IS {comment}",
        role = ident(role),
        verifier = literal(verifier),
        comment = literal(&super::warm::comment(made)),
    ))
    .await?;
    tx.commit().await?;
    Ok(made)
}

/// Every role of the warm-login shape in the cluster, with the database's
/// clock.
pub async fn warm_roles(client: &Client) -> Result<(Vec<super::warm::WarmRole>, DateTime<Utc>), StoreError> {
    let rows = client
        .query(
            "SELECT r.rolname::text, shobj_description(r.oid, 'pg_authid'), r.rolcanlogin, now()
               FROM pg_roles r WHERE r.rolname LIKE 'mcpw\\_w\\_%' ORDER BY 1",
            &[],
        )
        .await?;
    let now = match rows.first() {
        Some(row) => row.get(3),
        None => client.query_one("SELECT now()", &[]).await?.get(0),
    };
    let roles = rows
        .into_iter()
        .map(|row| super::warm::WarmRole { name: row.get(0), comment: row.get(1), can_login: row.get(2) })
        .filter(|r| naming::is_warm_role(&r.name))
        .collect();
    Ok((roles, now))
}

/// Drops a warm login (it has no sessions: it never had LOGIN).
pub async fn drop_warm(client: &Client, role: &str) -> Result<(), StoreError> {
    if !naming::is_warm_role(role) {
        return Err(StoreError::Sql(format!("refusing to drop {role:?}: not a warm login")));
    }
    client.batch_execute(&format!("DROP ROLE IF EXISTS {}", ident(role))).await?;
    Ok(())
}

/// A login role found in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRole {
    /// Role name.
    pub name: String,
    /// Its comment (the lease id).
    pub lease: Option<String>,
    /// Expiry; `None` is an anomaly (the broker always sets one).
    pub valid_until: Option<DateTime<Utc>>,
    /// Whether it has expired by the database's clock (or has no expiry).
    pub expired: bool,
    /// The group roles it belongs to.
    pub groups: Vec<String>,
}

/// Every login role of the broker's shape in the cluster.
pub async fn login_roles(client: &Client) -> Result<Vec<LoginRole>, StoreError> {
    let rows = client
        .query(
            "SELECT r.rolname::text, shobj_description(r.oid, 'pg_authid'), r.rolvaliduntil,
                    coalesce(r.rolvaliduntil <= now(), true),
                    coalesce(array(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                                    WHERE m.member = r.oid ORDER BY 1), '{}')
               FROM pg_roles r WHERE r.rolname LIKE 'mcpw\\_u\\_%' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| LoginRole {
            name: row.get(0),
            lease: row.get(1),
            valid_until: row.get(2),
            expired: row.get(3),
            groups: row.get(4),
        })
        .filter(|r| naming::is_login_role(&r.name))
        .collect())
}

/// The comment of a group role: which database its grants are in.
pub fn group_comment(database: &str) -> String {
    format!("mcp-warden group role; database {database}")
}

/// The broker's group roles whose grants are in the current database.
pub async fn group_roles(client: &Client) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query(
            "SELECT rolname::text FROM pg_roles
              WHERE rolname LIKE 'mcpw\\_g\\_%' AND shobj_description(oid, 'pg_authid') = $1",
            &[&group_comment(&current_database(client).await?)],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get::<_, String>(0)).filter(|n| naming::is_group_role(n)).collect())
}

async fn current_database(client: &Client) -> Result<String, StoreError> {
    Ok(client.query_one("SELECT current_database()", &[]).await?.get(0))
}

/// Ends a login role: NOLOGIN first (no new session can start), then its
/// sessions are terminated, then it is dropped. Returns the number of
/// sessions terminated, or `None` if the role was already gone.
pub async fn end_login(client: &Client, role: &str) -> Result<Option<u64>, StoreError> {
    if !naming::is_login_role(role) {
        return Err(StoreError::Sql(format!("refusing to end {role:?}: not a broker login role")));
    }
    let Some(row) = client.query_opt("SELECT oid FROM pg_roles WHERE rolname = $1", &[&role]).await? else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    if let Err(e) = client.batch_execute(&format!("ALTER ROLE {} NOLOGIN", ident(role))).await {
        if e.code() == Some(&SqlState::UNDEFINED_OBJECT) {
            return Ok(None);
        }
        return Err(e.into());
    }
    let mut terminated = terminate(client, oid).await?;
    match client.batch_execute(&format!("DROP ROLE IF EXISTS {}", ident(role))).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST) => {
            // It created objects (e.g. through PUBLIC's CREATE on a schema):
            // take them over with membership, drop them, then the role.
            client
                .batch_execute(&format!("GRANT {r} TO CURRENT_USER; DROP OWNED BY {r}; DROP ROLE {r}", r = ident(role)))
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    // A session that authenticated just before NOLOGIN but registered late.
    terminated += terminate(client, oid).await?;
    Ok(Some(terminated))
}

async fn terminate(client: &Client, oid: u32) -> Result<u64, StoreError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, $2)) FROM pg_stat_activity WHERE usesysid = $1",
            &[&oid, &TERMINATE_WAIT_MS],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Drops a group role that no policy wants any more. Its members must have
/// been ended first.
pub async fn drop_group(client: &Client, group: &str) -> Result<(), StoreError> {
    if !naming::is_group_role(group) {
        return Err(StoreError::Sql(format!("refusing to drop {group:?}: not a broker group role")));
    }
    let database = current_database(client).await?;
    let actual = actual_grants(client, group).await?;
    for statement in grants::diff(group, &database, &BTreeSet::new(), &actual) {
        client.batch_execute(&statement).await?;
    }
    client.batch_execute(&format!("DROP ROLE IF EXISTS {}", ident(group))).await?;
    Ok(())
}
