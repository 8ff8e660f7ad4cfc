//! The credential broker against a real PostgreSQL (a private cluster the
//! harness starts): roles per caller and tool, exactly the granted columns,
//! refused escapes, expiry, reaping, revocation, policy changes, hostile
//! requests, the admin check and PUBLIC's privileges.

mod common;
mod pg;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{claims, now, rs256};
use mcp_warden::audit::record::{Kind, LeaseAction, Record};
use mcp_warden::audit::segment;
use mcp_warden::audit::verify::{VerifyOptions, verify_dir};
use mcp_warden::broker::api::{Callers, SidecarAuth, StaticCredential, router};
use mcp_warden::broker::client::{BrokerClient, ClientError};
use mcp_warden::broker::inventory::{Inventory, StoreRef};
use mcp_warden::broker::issuer::{Broker, Credential, CredentialRequest, Settings};
use mcp_warden::broker::lifecycle::Revocation;
use mcp_warden::broker::metrics::BrokerMetrics;
use mcp_warden::broker::trail::Trail;
use pg::Postgres;
use pg::clinic::{ADMIN_PASSWORD, SERVER, manifests, prepare_database, tls_material, with_tls};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

const SIDECAR_CREDENTIAL: &str = "sidecar-credential-for-tests-0123456789";
const REVOKER_CREDENTIAL: &str = "revoker-credential-for-tests-0123456789";

struct World {
    pg: Postgres,
    dir: tempfile::TempDir,
    broker: Arc<Broker>,
    client: BrokerClient,
    revoker: BrokerClient,
}

impl World {
    fn audit_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("audit")
    }

    fn manifest_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    async fn admin_db(&self) -> Client {
        self.pg.superuser("ehr").await
    }

    /// Rewrites the manifests and has the broker reload them.
    async fn reload(&self, text: &str) -> Vec<String> {
        std::fs::write(self.manifest_dir().join("clinic.yaml"), text).unwrap();
        self.broker.reload(Inventory::from_manifests(&self.manifest_dir()).unwrap()).await
    }

    async fn login(&self, credential: &Credential) -> Result<Client, tokio_postgres::Error> {
        self.pg.connect(&credential.database, &credential.role, &credential.password).await
    }

    fn lease_records(&self) -> Vec<Record> {
        records(&self.audit_dir()).into_iter().filter(|r| r.event.kind == Kind::Lease).collect()
    }
}

fn records(dir: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.unwrap();
        if entry.file_type().is_dir() {
            for (_, path) in segment::list_segments(entry.path()).unwrap_or_default() {
                out.extend(segment::read_lines(&path).unwrap().iter().map(|l| Record::parse_line(&l.bytes).unwrap()));
            }
        }
    }
    out
}

async fn world_with(settings: Settings, hook: impl AsyncFnOnce(&Postgres)) -> World {
    let broker_settings_warm = settings.warm_logins;
    let pg = Postgres::start().await;
    prepare_database(&pg).await;
    hook(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    std::fs::write(
        dir.path().join("manifests/clinic.yaml"),
        manifests(pg.port, &["id", "mrn", "name"], true, ADMIN_PASSWORD),
    )
    .unwrap();
    let inventory = Inventory::from_manifests(&dir.path().join("manifests")).unwrap();
    let trail = Trail::new(dir.path().join("audit"), Some("broker-0".into()), mcp_warden::broker::trail::BROKER_STREAM)
        .unwrap();
    let broker = Arc::new(Broker::new(inventory, trail, settings, BrokerMetrics::register(&mut Registry::default())));
    let problems = broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(broker.warm_up().await, broker_settings_warm);
    let callers = Callers {
        sidecar: SidecarAuth::Static(StaticCredential::new(SIDECAR_CREDENTIAL).unwrap()),
        revoker: Some(StaticCredential::new(REVOKER_CREDENTIAL).unwrap()),
        reidentifier: Default::default(),
    };
    let base = common::serve(router(Arc::clone(&broker), callers)).await;
    World {
        pg,
        dir,
        broker,
        client: BrokerClient::new(&base, SIDECAR_CREDENTIAL).unwrap(),
        revoker: BrokerClient::new(&base, REVOKER_CREDENTIAL).unwrap(),
    }
}

async fn world() -> World {
    // Two warm logins: the first two roles of a test are claimed warm, the
    // rest made cold, so both paths meet every assertion.
    world_with(Settings { warm_logins: 2, ..Default::default() }, async |_| {}).await
}

fn request(tool: &str, token: &str) -> CredentialRequest {
    CredentialRequest {
        server: SERVER.into(),
        tool: tool.into(),
        store: "ehr".into(),
        caller_token: token.into(),
        correlation: Some("corr-1".into()),
    }
}

fn token(sub: &str, groups: &[&str]) -> String {
    rs256(&claims(sub, groups))
}

fn code(e: &tokio_postgres::Error) -> Option<SqlState> {
    e.code().cloned()
}

/// Role names with a prefix (`_` is escaped for LIKE).
async fn role_names(db: &Client, prefix: &str) -> BTreeSet<String> {
    let pattern = format!("{}%", prefix.replace('_', "\\_"));
    db.query("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1", &[&pattern])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

async fn login_role_names(db: &Client) -> BTreeSet<String> {
    role_names(db, "mcpw_u_").await
}

/// The session is gone: its next query fails.
async fn assert_terminated(session: &Client) {
    let mut ended = false;
    for _ in 0..50 {
        if session.simple_query("SELECT 1").await.is_err() {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the session was not terminated");
}

#[tokio::test]
async fn two_callers_get_two_roles_that_reach_exactly_the_granted_columns() {
    let w = world().await;
    let alice = w.client.credential(&request("lookup_patient", &token("alice", &["front-desk"]))).await.unwrap();
    let bob = w.client.credential(&request("lookup_patient", &token("bob", &["front-desk"]))).await.unwrap();
    assert_ne!(alice.role, bob.role);
    assert!(!alice.reused && !bob.reused);
    let admin = w.admin_db().await;
    assert_eq!(login_role_names(&admin).await, BTreeSet::from([alice.role.clone(), bob.role.clone()]));

    // What the catalog says of the role: expiry by the database clock,
    // connection limit, comment = lease id only, one membership.
    let row = admin
        .query_one(
            "SELECT r.rolcanlogin, r.rolconnlimit, extract(epoch FROM r.rolvaliduntil - now())::float8,
                    shobj_description(r.oid, 'pg_authid'),
                    array(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid),
                    r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
               FROM pg_roles r WHERE r.rolname = $1",
            &[&alice.role],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), 4);
    let remaining: f64 = row.get(2);
    assert!((880.0..=900.5).contains(&remaining), "VALID UNTIL is 15m from the database's now: {remaining}");
    assert_eq!(row.get::<_, Option<String>>(3), Some(alice.lease_id.clone()));
    let groups: Vec<String> = row.get(4);
    assert_eq!(groups.len(), 1);
    assert!(groups[0].starts_with("mcpw_g_"));
    assert!(!row.get::<_, bool>(5), "no attribute beyond LOGIN");
    let group = groups[0].clone();

    let session = w.login(&alice).await.expect("alice logs in");
    let rows = session.query("SELECT id, mrn, name FROM clinical.patients", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(2), "Joe Doe");
    let denied = [
        "SELECT ssn FROM clinical.patients",
        "SELECT * FROM clinical.patients",
        "SELECT count(diagnosis) FROM clinical.patients",
        "SELECT patient_id FROM clinical.billing",
        "SELECT body FROM clinical.notes",
        "INSERT INTO clinical.patients (id, mrn) VALUES (2, 'x')",
        "UPDATE clinical.patients SET name = 'x'",
        "DELETE FROM clinical.patients",
        "COMMIT; INSERT INTO clinical.notes (patient_id, body) VALUES (1, 'x')",
        "WITH x AS (INSERT INTO clinical.notes (patient_id, body) VALUES (1, 'x') RETURNING id) SELECT * FROM x",
        "WITH x AS (UPDATE clinical.patients SET mrn = 'y' RETURNING id) SELECT * FROM x",
        "SET ROLE warden_admin",
        "SET ROLE postgres",
        "SET ROLE ehr_owner",
        "SET SESSION AUTHORIZATION postgres",
        "CREATE ROLE sneaky LOGIN",
        "GRANT SELECT (ssn) ON clinical.patients TO PUBLIC",
    ];
    for sql in denied {
        let err = session.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {err}");
        let _ = session.batch_execute("ROLLBACK").await;
    }
    let err = session.batch_execute(&format!("SET ROLE \"{}\"", bob.role)).await.expect_err("other caller's role");
    assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE));
    // Its own group is the only other role it can become, and that holds no more.
    session.batch_execute(&format!("SET ROLE \"{group}\"")).await.expect("own group");
    let err = session.batch_execute("SELECT ssn FROM clinical.patients").await.expect_err("group has no more");
    assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE));
    session.batch_execute("RESET ROLE").await.unwrap();

    // The group role cannot log in.
    let login_as_group = w.pg.connect("ehr", &group, "anything").await.expect_err("group login");
    assert!(
        login_as_group
            .code()
            .is_some_and(|c| *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    assert!(
        !admin
            .query_one("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", &[&group])
            .await
            .unwrap()
            .get::<_, bool>(0)
    );

    // The INSERT tool gets its own role, which may insert those columns only.
    let note = w.client.credential(&request("record_note", &token("carol", &["clinicians"]))).await.unwrap();
    let writer = w.login(&note).await.unwrap();
    writer.batch_execute("INSERT INTO clinical.notes (patient_id, body) VALUES (1, 'seen')").await.expect("insert");
    for sql in [
        "INSERT INTO clinical.notes (patient_id, body, author) VALUES (1, 'x', 'me')",
        "SELECT body FROM clinical.notes",
        "INSERT INTO clinical.notes (patient_id, body) VALUES (1, 'x') RETURNING body",
        "SELECT mrn FROM clinical.patients",
    ] {
        let err = writer.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {err}");
    }

    // Never the password in the server log (every statement is logged there).
    let log = w.pg.log();
    assert!(log.contains("CREATE ROLE"), "statement logging is on");
    for secret in [&alice.password, &bob.password, &note.password] {
        assert!(!log.contains(secret.as_str()), "a password reached the server log");
    }
    assert!(log.contains("SCRAM-SHA-256$"), "only the verifier is sent");

    // The trail: one issued record per role, tied to its caller; it verifies.
    let leases = w.lease_records();
    let issued: Vec<&Record> =
        leases.iter().filter(|r| r.event.lease.as_ref().unwrap().action == LeaseAction::Issued).collect();
    assert_eq!(issued.len(), 3);
    let of_alice = issued.iter().find(|r| r.event.caller.as_ref().unwrap().sub == "alice").unwrap();
    assert_eq!(of_alice.event.lease.as_ref().unwrap().id, alice.lease_id);
    assert_eq!(of_alice.event.lease.as_ref().unwrap().role.as_deref(), Some(alice.role.as_str()));
    assert_eq!(of_alice.server, SERVER);
    assert_eq!(of_alice.event.correlation.as_deref(), Some("corr-1"));
    let text = records(&w.audit_dir()).iter().map(|r| String::from_utf8(r.to_line()).unwrap()).collect::<String>();
    for secret in [&alice.password, &bob.password] {
        assert!(!text.contains(secret.as_str()));
    }
    assert!(verify_dir(&w.audit_dir(), VerifyOptions::default()).problems.is_empty());
}

async fn warm_login_names(db: &Client) -> BTreeSet<String> {
    role_names(db, "mcpw_w_").await
}

/// A role of the warm-login shape, made by hand with a comment of the
/// broker's shape, `age_secs` old by the database's clock.
async fn plant_warm(admin: &Client, name: &str, age_secs: i64, login: bool) {
    let made: chrono::DateTime<chrono::Utc> =
        admin.query_one("SELECT now() - make_interval(secs => $1)", &[&(age_secs as f64)]).await.unwrap().get(0);
    let comment = mcp_warden::broker::warm::comment(made);
    let can = if login { "LOGIN" } else { "NOLOGIN" };
    admin.batch_execute(&format!("CREATE ROLE {name} {can}; COMMENT ON ROLE {name} IS '{comment}'")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_logins_are_inert_until_claimed_then_roles_are_made_cold_and_orphans_reaped() {
    let w = world().await;
    let admin = w.admin_db().await;
    let warm = warm_login_names(&admin).await;
    assert_eq!(warm.len(), 2);
    // Inert: no LOGIN, no membership either way, no attribute, a SCRAM
    // verifier already set (PostgreSQL's PBKDF2 is paid), the comment says
    // when it was made.
    for name in &warm {
        let row = admin
            .query_one(
                "SELECT r.rolcanlogin, r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls,
                        (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid OR m.roleid = r.oid),
                        a.rolpassword LIKE 'SCRAM-SHA-256$4096:%', shobj_description(r.oid, 'pg_authid')
                   FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid WHERE r.rolname = $1",
                &[name],
            )
            .await
            .unwrap();
        assert!(!row.get::<_, bool>(0) && !row.get::<_, bool>(1));
        assert_eq!(row.get::<_, i64>(2), 0);
        assert!(row.get::<_, bool>(3));
        let comment: String = row.get(4);
        assert!(mcp_warden::broker::warm::made(&comment).is_some(), "{comment}");
    }

    // Two callers claim the two warm logins; a third gets a role made cold.
    let callers = ["alice", "bob", "carol"];
    let mut credentials = Vec::new();
    for caller in callers {
        credentials
            .push(w.client.credential(&request("lookup_patient", &token(caller, &["front-desk"]))).await.unwrap());
    }
    assert!(warm_login_names(&admin).await.is_empty(), "both warm logins were claimed");
    assert_eq!(login_role_names(&admin).await, credentials.iter().map(|c| c.role.clone()).collect());
    for credential in &credentials {
        let session = w.login(credential).await.expect("a claimed or cold role logs in with its password");
        assert_eq!(session.query("SELECT mrn FROM clinical.patients", &[]).await.unwrap().len(), 1);
        let denied = session.simple_query("SELECT ssn FROM clinical.patients").await.unwrap_err();
        assert_eq!(code(&denied), Some(SqlState::INSUFFICIENT_PRIVILEGE));
        let (members, comment): (i64, Option<String>) = {
            let row = admin
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid), shobj_description(r.oid, 'pg_authid')
                       FROM pg_roles r WHERE r.rolname = $1",
                    &[&credential.role],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!((members, comment), (1, Some(credential.lease_id.clone())));
    }

    // Warm logins dropped behind the broker's back: the claim fails and the
    // role is made cold — the caller sees no difference.
    assert_eq!(w.broker.warm_up().await, 2);
    for name in warm_login_names(&admin).await {
        admin.batch_execute(&format!("DROP ROLE {name}")).await.unwrap();
    }
    let dave = w.client.credential(&request("lookup_patient", &token("dave", &["front-desk"]))).await.unwrap();
    w.login(&dave).await.expect("made cold after the failed claim");
    let dave2 = w.client.credential(&request("lookup_patient", &token("dave2", &["front-desk"]))).await.unwrap();
    w.login(&dave2).await.expect("the pool's other dropped login: made cold too");

    // A privilege granted to a warm login behind the broker's back never
    // comes along: that login is not claimed, the role is made cold and
    // reaches exactly its columns.
    assert_eq!(w.broker.warm_up().await, 2);
    for name in warm_login_names(&admin).await {
        admin.batch_execute(&format!("GRANT SELECT ON clinical.patients TO {name}")).await.unwrap();
    }
    let erin = w.client.credential(&request("lookup_patient", &token("erin", &["front-desk"]))).await.unwrap();
    let session = w.login(&erin).await.expect("made cold");
    let denied = session.simple_query("SELECT ssn FROM clinical.patients").await.unwrap_err();
    assert_eq!(code(&denied), Some(SqlState::INSUFFICIENT_PRIVILEGE), "the planted grant did not come along");
    for name in warm_login_names(&admin).await {
        admin.batch_execute(&format!("REVOKE ALL ON clinical.patients FROM {name}; DROP ROLE {name}")).await.unwrap();
    }
    // The pool still holds one login whose role is gone (claims take the
    // oldest): the next issuance finds it gone and is made cold too.
    let frank = w.client.credential(&request("lookup_patient", &token("frank", &["front-desk"]))).await.unwrap();
    w.login(&frank).await.expect("made cold");

    // Orphans: an old warm-shaped role and one that can log in are dropped;
    // a young one (another broker's, during a rollout) and this broker's
    // own are kept.
    assert_eq!(w.broker.warm_up().await, 2, "the pool's logins were all used up or gone");
    let own = warm_login_names(&admin).await;
    let (old, young, loginable) =
        ("mcpw_w_00000000000000000000000a", "mcpw_w_00000000000000000000000b", "mcpw_w_00000000000000000000000c");
    plant_warm(&admin, old, 3600, false).await;
    plant_warm(&admin, young, 5, false).await;
    plant_warm(&admin, loginable, 5, true).await;
    w.broker.reap().await;
    let mut kept = own.clone();
    kept.insert(young.to_string());
    assert_eq!(warm_login_names(&admin).await, kept);

    // A clean shutdown drops the broker's own warm logins, not others'.
    w.broker.close().await;
    assert_eq!(warm_login_names(&admin).await, BTreeSet::from([young.to_string()]));
}

#[tokio::test]
async fn fifty_concurrent_first_requests_create_one_role() {
    let w = world().await;
    let tok = token("dave", &["front-desk"]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = w.client.clone();
        let req = request("lookup_patient", &tok);
        tasks.push(tokio::spawn(async move { client.credential(&req).await }));
    }
    let mut roles = BTreeSet::new();
    let mut fresh = 0;
    for task in tasks {
        let credential = task.await.unwrap().expect("issued");
        roles.insert(credential.role.clone());
        fresh += usize::from(!credential.reused);
    }
    assert_eq!(roles.len(), 1, "one role for one pair");
    assert_eq!(fresh, 1);
    assert_eq!(login_role_names(&w.admin_db().await).await, roles);
    let actions: Vec<LeaseAction> = w.lease_records().iter().map(|r| r.event.lease.as_ref().unwrap().action).collect();
    assert_eq!(actions.iter().filter(|a| **a == LeaseAction::Issued).count(), 1);
    assert_eq!(actions.iter().filter(|a| **a == LeaseAction::Reused).count(), 49);
}

#[tokio::test]
async fn a_role_expires_at_its_ttl_and_the_reaper_ends_its_session() {
    let settings = Settings { max_ttl: Some(Duration::from_secs(2)), connection_limit: 4, ..Default::default() };
    let w = world_with(settings, async |_| {}).await;
    let credential = w.client.credential(&request("lookup_patient", &token("erin", &["front-desk"]))).await.unwrap();
    let session = w.login(&credential).await.unwrap();
    session.simple_query("SELECT mrn FROM clinical.patients").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    // Past VALID UNTIL no new login is possible, even before the reaper runs…
    let late = w.login(&credential).await.expect_err("expired");
    assert!(late.code().is_some());
    // …but an open session lives on until the reaper ends it.
    session.simple_query("SELECT 1").await.expect("still open before reaping");
    assert_eq!(w.broker.reap().await, 1);
    assert_terminated(&session).await;
    assert!(login_role_names(&w.admin_db().await).await.is_empty());
    let reaped: Vec<Record> = w
        .lease_records()
        .into_iter()
        .filter(|r| r.event.lease.as_ref().unwrap().action == LeaseAction::Reaped)
        .collect();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].event.lease.as_ref().unwrap().id, credential.lease_id);
    assert_eq!(reaped[0].server, SERVER, "the reap is in the server's own stream");
    assert!(reaped[0].event.reason.as_deref().unwrap().contains("1 session"));
    // A new request after expiry gets a new role, never the dead one.
    let next = w.client.credential(&request("lookup_patient", &token("erin", &["front-desk"]))).await.unwrap();
    assert_ne!(next.role, credential.role);
    assert!(!next.reused);
}

#[tokio::test]
async fn revocation_ends_open_sessions_immediately() {
    let w = world().await;
    let frank = w.client.credential(&request("lookup_patient", &token("frank", &["front-desk"]))).await.unwrap();
    let grace = w.client.credential(&request("lookup_patient", &token("grace", &["front-desk"]))).await.unwrap();
    let grace_note = w.client.credential(&request("record_note", &token("grace", &["clinicians"]))).await.unwrap();
    let frank_session = w.login(&frank).await.unwrap();
    let grace_session = w.login(&grace).await.unwrap();
    let note_session = w.login(&grace_note).await.unwrap();

    let revoked =
        w.revoker.revoke(&Revocation { lease_id: Some(frank.lease_id.clone()), ..Default::default() }).await.unwrap();
    assert_eq!(revoked, vec![frank.role.clone()]);
    assert_terminated(&frank_session).await;
    grace_session.simple_query("SELECT 1").await.expect("other callers untouched");
    // The revoked lease is not handed out again.
    let again = w.client.credential(&request("lookup_patient", &token("frank", &["front-desk"]))).await.unwrap();
    assert_ne!(again.role, frank.role);

    // By caller: every role of that caller on the server, across tools.
    let revoked = w
        .revoker
        .revoke(&Revocation {
            server: Some(SERVER.into()),
            subject: Some("grace".into()),
            reason: Some("account compromised".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        revoked.into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([grace.role.clone(), grace_note.role.clone()])
    );
    assert_terminated(&grace_session).await;
    assert_terminated(&note_session).await;
    let names = login_role_names(&w.admin_db().await).await;
    assert_eq!(names, BTreeSet::from([again.role.clone()]));
    let records = w.lease_records();
    let revocations: Vec<&Record> =
        records.iter().filter(|r| r.event.lease.as_ref().unwrap().action == LeaseAction::Revoked).collect();
    assert_eq!(revocations.len(), 3);
    assert!(revocations.iter().all(|r| r.server == SERVER));
    assert!(revocations.iter().any(|r| r.event.reason.as_deref().unwrap().contains("account compromised")));

    // Revocation needs the revoker's credential, not a sidecar's.
    let err = w.client.revoke(&Revocation { lease_id: Some(again.lease_id.clone()), ..Default::default() }).await;
    assert!(matches!(err, Err(ClientError::Refused { status: 401, .. })), "{err:?}");
    let err = w.revoker.revoke(&Revocation::default()).await;
    assert!(matches!(err, Err(ClientError::Refused { status: 400, .. })), "{err:?}");
}

#[tokio::test]
async fn policy_changes_reach_existing_roles_and_removed_tools_end() {
    let w = world().await;
    let hank = w.client.credential(&request("lookup_patient", &token("hank", &["front-desk"]))).await.unwrap();
    let note = w.client.credential(&request("record_note", &token("hank", &["clinicians"]))).await.unwrap();
    let session = w.login(&hank).await.unwrap();
    let note_session = w.login(&note).await.unwrap();
    session.simple_query("SELECT name FROM clinical.patients").await.unwrap();

    // `name` leaves the tool's columns, `dob` joins; record_note is removed.
    let problems = w.reload(&manifests(w.pg.port, &["id", "mrn", "dob"], false, ADMIN_PASSWORD)).await;
    assert!(problems.is_empty(), "{problems:?}");
    let err = session.simple_query("SELECT name FROM clinical.patients").await.expect_err("revoked column");
    assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE));
    session.simple_query("SELECT dob FROM clinical.patients").await.expect("granted column");
    assert_terminated(&note_session).await;
    let admin = w.admin_db().await;
    assert_eq!(login_role_names(&admin).await, BTreeSet::from([hank.role.clone()]));
    let groups: Vec<String> = admin
        .query("SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'mcpw\\_g\\_%'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(groups.len(), 1, "the removed tool's group role is dropped: {groups:?}");
    let ended = w
        .lease_records()
        .into_iter()
        .find(|r| {
            r.event.lease.as_ref().unwrap().role.as_deref() == Some(note.role.as_str())
                && r.event.lease.as_ref().unwrap().action == LeaseAction::Revoked
        })
        .expect("a revoked record for the removed tool's role");
    assert_eq!(ended.server, SERVER);
    assert_eq!(ended.event.tool.as_deref(), Some("record_note"));

    // Grants added by hand to a group role (here by the admin role itself,
    // the grantor the broker can undo) are found and revoked: a column…
    let group = &groups[0];
    let as_admin = w.pg.connect("ehr", "warden_admin", ADMIN_PASSWORD).await.unwrap();
    as_admin.batch_execute(&format!("GRANT SELECT (ssn) ON clinical.patients TO \"{group}\"")).await.unwrap();
    let problems = w.broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
    let err = session.simple_query("SELECT ssn FROM clinical.patients").await.expect_err("hand grant revoked");
    assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE));
    // …and a table-level grant, which covers every column.
    as_admin.batch_execute(&format!("GRANT SELECT ON clinical.patients TO \"{group}\"")).await.unwrap();
    let problems = w.broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
    let err = session.simple_query("SELECT ssn FROM clinical.patients").await.expect_err("table grant revoked");
    assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE));
    session.simple_query("SELECT mrn, dob FROM clinical.patients").await.expect("policy columns restored");

    // A grant by another grantor (the table owner, via a superuser) cannot
    // be revoked by the admin role: it is named, and the tool gets no new
    // role until it is gone.
    admin.batch_execute(&format!("GRANT SELECT (diagnosis) ON clinical.patients TO \"{group}\"")).await.unwrap();
    let problems = w.broker.sync().await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("SELECT on clinical.patients.diagnosis") && problems[0].contains("grantor"),
        "{problems:?}"
    );
    let refused = w.client.credential(&request("lookup_patient", &token("ivy", &["front-desk"]))).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused { status: 503, class, .. }) if class == "grant_mismatch"),
        "{refused:?}"
    );
    admin.batch_execute(&format!("REVOKE SELECT (diagnosis) ON clinical.patients FROM \"{group}\"")).await.unwrap();
    let problems = w.broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
    let ivy = w
        .client
        .credential(&request("lookup_patient", &token("ivy", &["front-desk"])))
        .await
        .expect("issued once in line");
    let ivy_session = w.login(&ivy).await.unwrap();

    // The MCPServer is deleted: every role of it ends, sessions included,
    // and its group roles are dropped.
    let full = manifests(w.pg.port, &["id", "mrn", "dob"], false, ADMIN_PASSWORD);
    let without_server = &full[..full.find("---\napiVersion: mcpwarden.io/v1alpha1\nkind: MCPServer").unwrap()];
    let problems = w.reload(without_server).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_terminated(&session).await;
    assert_terminated(&ivy_session).await;
    assert!(login_role_names(&admin).await.is_empty());
    let groups_left: i64 =
        admin.query_one("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'mcpw\\_g\\_%'", &[]).await.unwrap().get(0);
    assert_eq!(groups_left, 0);
}

#[tokio::test]
async fn hostile_and_faulty_requests_are_refused_and_leave_no_role() {
    let w = world().await;
    let good = token("ivan", &["front-desk"]);
    let refused = |result: Result<Credential, ClientError>| match result {
        Err(ClientError::Refused { status, class, message }) => (status, class, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let mut cases: Vec<(CredentialRequest, u16, &str)> = Vec::new();
    let mut unknown_server = request("lookup_patient", &good);
    unknown_server.server = "clinic/nope".into();
    cases.push((unknown_server, 404, "unknown_server"));
    cases.push((request("drop_tables", &good), 404, "unknown_tool"));
    cases.push((request("clinic_hours", &good), 403, "no_store_access"));
    let mut other_store = request("lookup_patient", &good);
    other_store.store = "billing".into();
    cases.push((other_store, 403, "no_store_access"));
    cases.push((request("lookup_patient", &token("ivan", &["visitors"])), 403, "caller_not_allowed"));
    cases.push((request("record_note", &good), 403, "caller_not_allowed"));
    let mut expired = claims("ivan", &["front-desk"]);
    expired["exp"] = json!(now() - 3600);
    cases.push((request("lookup_patient", &rs256(&expired)), 403, "caller_not_verified"));
    let mut wrong_aud = claims("ivan", &["front-desk"]);
    wrong_aud["aud"] = json!("https://other.example/mcp");
    cases.push((request("lookup_patient", &rs256(&wrong_aud)), 403, "caller_not_verified"));
    let mut wrong_iss = claims("ivan", &["front-desk"]);
    wrong_iss["iss"] = json!("https://evil.example");
    cases.push((request("lookup_patient", &rs256(&wrong_iss)), 403, "caller_not_verified"));
    use base64::Engine;
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims("ivan", &["front-desk"])));
    cases.push((request("lookup_patient", &alg_none), 403, "caller_not_verified"));
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = b64(&claims("ivan", &["front-desk", "clinicians"]));
    cases.push((request("lookup_patient", &parts.join(".")), 403, "caller_not_verified"));
    cases.push((request("lookup_patient", "not-a-token"), 403, "caller_not_verified"));
    let mut free_text = request("lookup_patient", &good);
    free_text.correlation = Some("patient Joe Doe, MRN-0001".into());
    cases.push((free_text, 400, "invalid_request"));
    for (req, status, class) in cases {
        let (got_status, got_class, message) = refused(w.client.credential(&req).await);
        assert_eq!((got_status, got_class.as_str()), (status, class), "{req:?}: {message}");
        assert!(!message.contains(&req.caller_token) || req.caller_token.is_empty(), "no token in a message");
    }

    // The sidecar credential is required.
    let stranger = BrokerClient::new(&w.client_base(), "wrong-credential-wrong-credential-0000").unwrap();
    let (status, _, _) = refused(stranger.credential(&request("lookup_patient", &good)).await);
    assert_eq!(status, 401);

    // Malformed and oversized bodies: refused without echoing them.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/credentials", w.client_base());
    let garbage = format!("{{\"server\": \"{SERVER}\", \"callerToken\": \"{good}\", \"extra\": 1}}");
    let response = http
        .post(&url)
        .bearer_auth(SIDECAR_CREDENTIAL)
        .header("content-type", "application/json")
        .body(garbage)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body = response.text().await.unwrap();
    assert!(!body.contains(&good), "the token is not echoed: {body}");
    let big = format!("{{\"callerToken\": \"{}\"}}", "a".repeat(200_000));
    let response = http
        .post(&url)
        .bearer_auth(SIDECAR_CREDENTIAL)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let response = http.post(&url).bearer_auth(SIDECAR_CREDENTIAL).body("x").send().await.unwrap();
    assert_eq!(response.status(), 415);

    let admin = w.admin_db().await;
    assert!(login_role_names(&admin).await.is_empty(), "no refused request created a role");
    // Refusals of known servers are in the trail, by class.
    let denials: Vec<Record> = records(&w.audit_dir()).into_iter().filter(|r| r.event.kind == Kind::Decision).collect();
    for class in ["caller_not_allowed", "caller_not_verified", "unknown_tool", "no_store_access", "invalid_request"] {
        let expected = class != "invalid_request";
        let found = denials.iter().any(|r| r.event.reason.as_deref() == Some(class));
        assert_eq!(found, expected, "refusal {class} on the record: {expected}");
    }
    let unknown = denials.iter().find(|r| r.event.reason.as_deref() == Some("unknown_tool")).unwrap();
    assert_eq!(unknown.event.tool, None, "a tool name the policy does not know is not written down");
    let trail_text =
        records(&w.audit_dir()).iter().map(|r| String::from_utf8(r.to_line()).unwrap()).collect::<String>();
    assert!(!trail_text.contains("drop_tables") && !trail_text.contains("billing\""), "made-up names stay out");

    // Wrong admin secret: refused by the store, nothing created.
    w.reload(&manifests(w.pg.port, &["id", "mrn", "name"], true, "wrong-admin-password")).await;
    let (status, class, message) = refused(w.client.credential(&request("lookup_patient", &good)).await);
    assert_eq!((status, class.as_str()), (503, "admin_refused"), "{message}");
    assert!(!message.contains("wrong-admin-password"));
    let report = w.broker.reports().remove(&StoreRef { namespace: "clinic".into(), name: "ehr".into() }).unwrap();
    let ready = report.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
    assert!(!ready.message.contains("wrong-admin-password"));

    // Store unreachable: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    w.reload(&manifests(closed, &["id", "mrn", "name"], true, ADMIN_PASSWORD)).await;
    let (status, class, _) = refused(w.client.credential(&request("lookup_patient", &good)).await);
    assert_eq!((status, class.as_str()), (503, "store_unreachable"));
    assert!(login_role_names(&admin).await.is_empty());
    let faults: Vec<String> = records(&w.audit_dir())
        .into_iter()
        .filter(|r| r.event.kind == Kind::Decision)
        .filter_map(|r| r.event.reason)
        .collect();
    assert!(
        faults.iter().any(|r| r == "admin_refused") && faults.iter().any(|r| r == "store_unreachable"),
        "{faults:?}"
    );
}

impl World {
    fn client_base(&self) -> String {
        self.client.base().to_string()
    }
}

#[tokio::test]
async fn admin_gaps_and_public_privileges_are_reported_and_revoked_on_request() {
    // A SECURITY DEFINER function PUBLIC may execute, and a table PUBLIC may read.
    let w = world_with(Settings { max_ttl: None, connection_limit: 4, ..Default::default() }, async |pg: &Postgres| {
        let ehr = pg.superuser("ehr").await;
        ehr.batch_execute(
            "SET ROLE ehr_owner;
             CREATE FUNCTION clinical.all_ssns() RETURNS SETOF text LANGUAGE sql SECURITY DEFINER
               AS 'SELECT ssn FROM clinical.patients';
             CREATE TABLE clinical.lookup_codes (code text);
             GRANT SELECT ON clinical.lookup_codes TO PUBLIC;
             RESET ROLE;",
        )
        .await
        .unwrap();
    })
    .await;
    let key = StoreRef { namespace: "clinic".into(), name: "ehr".into() };
    let report = w.broker.reports().remove(&key).unwrap();
    let condition = |type_: &str| report.conditions.iter().find(|c| c.type_ == type_).unwrap().clone();
    assert_eq!(condition("Ready").status, "True", "{:?}", condition("Ready"));
    assert_eq!(condition("AdminPrivileges").status, "True", "{:?}", condition("AdminPrivileges"));
    assert_eq!(condition("PublicPrivileges").status, "False");
    let found: BTreeSet<(String, String)> =
        report.public_privileges.iter().map(|f| (f.kind.clone(), f.object.clone())).collect();
    assert!(found.contains(&("security definer function".into(), "clinical.all_ssns()".into())), "{found:?}");
    assert!(found.contains(&("table".into(), "clinical.lookup_codes".into())), "{found:?}");
    assert!(found.contains(&("database".into(), "ehr".into())), "{found:?}");

    // An issued role inherits what PUBLIC holds: the function leaks every SSN.
    let caller = w.client.credential(&request("lookup_patient", &token("judy", &["front-desk"]))).await.unwrap();
    let session = w.login(&caller).await.unwrap();
    session.simple_query("SELECT clinical.all_ssns()").await.expect("PUBLIC's EXECUTE widens reach");

    // Hardening: the admin role acts for the owner, and the PHIStore asks.
    let admin = w.admin_db().await;
    admin.batch_execute("GRANT ehr_owner TO warden_admin").await.unwrap();
    let text = manifests(w.pg.port, &["id", "mrn", "name"], true, ADMIN_PASSWORD)
        .replace("sslMode: disable}", "sslMode: disable, revokePublicPrivileges: true}");
    assert!(text.contains("revokePublicPrivileges"));
    let problems = w.reload(&text).await;
    assert!(problems.is_empty(), "{problems:?}");
    let report = w.broker.reports().remove(&key).unwrap();
    assert!(report.public_privileges.is_empty(), "{:?}", report.public_privileges);
    let public = report.conditions.iter().find(|c| c.type_ == "PublicPrivileges").unwrap();
    assert_eq!((public.status.as_str(), public.reason.as_str()), ("True", "Revoked"));
    let err = session.simple_query("SELECT clinical.all_ssns()").await.expect_err("EXECUTE revoked");
    assert_eq!(code(&err), Some(SqlState::INSUFFICIENT_PRIVILEGE));
    // PUBLIC lost CONNECT; issued roles keep it through their group.
    let fresh = w.client.credential(&request("lookup_patient", &token("ken", &["front-desk"]))).await.unwrap();
    w.login(&fresh)
        .await
        .expect("CONNECT through the group role")
        .simple_query("SELECT mrn FROM clinical.patients")
        .await
        .unwrap();

    // An admin role without CREATEROLE or grant options is named in status.
    admin
        .batch_execute(
            "REVOKE ehr_owner FROM warden_admin;
             ALTER ROLE warden_admin NOCREATEROLE;
             REVOKE SELECT ON clinical.patients FROM warden_admin CASCADE;",
        )
        .await
        .unwrap();
    let problems = w.broker.sync().await;
    assert!(!problems.is_empty());
    let report = w.broker.reports().remove(&key).unwrap();
    assert!(report.admin_missing.contains(&"CREATEROLE".to_string()), "{:?}", report.admin_missing);
    assert!(
        report.admin_missing.iter().any(|m| m.contains("SELECT on clinical.patients.mrn")),
        "{:?}",
        report.admin_missing
    );
    let condition = report.conditions.iter().find(|c| c.type_ == "AdminPrivileges").unwrap();
    assert_eq!(condition.status, "False");
}

/// The broker as a process, as the README runs it.
struct BrokerProcess {
    child: std::process::Child,
    base: String,
}

impl BrokerProcess {
    async fn start(dir: &Path) -> BrokerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
            .args(["broker", "--manifests"])
            .arg(dir.join("manifests"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--sidecar-credential-file")
            .arg(dir.join("sidecar-credential"))
            .arg("--audit-dir")
            .arg(dir.join("audit"))
            .args(["--max-ttl", "3s", "--reap-interval", "1s", "--pod", "broker-0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the broker");
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{metrics}/readyz")).send().await
                && r.status() == 200
                && tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            {
                return BrokerProcess { child, base: format!("http://127.0.0.1:{port}") };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the broker did not become ready");
    }

    fn signal(&mut self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_broker_killed_mid_issue_leaves_no_role_past_its_ttl() {
    let pg = Postgres::start().await;
    prepare_database(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    std::fs::write(dir.path().join("manifests/clinic.yaml"), manifests(pg.port, &["id", "mrn"], true, ADMIN_PASSWORD))
        .unwrap();
    std::fs::write(dir.path().join("sidecar-credential"), SIDECAR_CREDENTIAL).unwrap();
    let admin = pg.superuser("ehr").await;

    let mut first = BrokerProcess::start(dir.path()).await;
    let client = BrokerClient::new(&first.base, SIDECAR_CREDENTIAL).unwrap();
    // One role issued and in use before the kill…
    let early = client.credential(&request("lookup_patient", &token("kim", &["front-desk"]))).await.unwrap();
    let session = pg.connect("ehr", &early.role, &early.password).await.unwrap();
    // …then a burst of first requests, killed while they are in flight.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        let req = request("lookup_patient", &token(&format!("burst-{i}"), &["front-desk"]));
        tasks.push(tokio::spawn(async move { client.credential(&req).await }));
    }
    for _ in 0..400 {
        if login_role_names(&admin).await.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.signal(libc::SIGKILL);
    let outcomes: Vec<bool> = futures_outcomes(tasks).await;
    let left = login_role_names(&admin).await;
    assert!(left.len() >= 2, "roles existed at the kill: {left:?}");
    assert!(outcomes.iter().any(|ok| !ok), "some requests were cut by the kill");

    // The restarted broker knows nothing of them, yet none outlives its TTL
    // and the open session is ended with its role.
    let second = BrokerProcess::start(dir.path()).await;
    let mut remaining = left.clone();
    for _ in 0..100 {
        remaining = login_role_names(&admin).await;
        if remaining.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(remaining.is_empty(), "roles outlived their TTL: {remaining:?}");
    assert_terminated(&session).await;
    let mut second = second;
    second.signal(libc::SIGTERM);

    // Both runs' trails verify; the restart is recorded in each stream it resumed.
    let report = verify_dir(&dir.path().join("audit"), VerifyOptions::default());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let reaped = records(&dir.path().join("audit"))
        .into_iter()
        .filter(|r| r.event.lease.as_ref().is_some_and(|l| l.action == LeaseAction::Reaped))
        .count();
    assert!(reaped >= left.len(), "every role of the killed run is reaped on the record ({reaped} < {})", left.len());
}

async fn futures_outcomes(tasks: Vec<tokio::task::JoinHandle<Result<Credential, ClientError>>>) -> Vec<bool> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap().is_ok());
    }
    out
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
/// The manifests with `sslMode` against `host`, trusting `ca`.
fn tls_manifests(port: u16, host: &str, ca: &str, ssl_mode: &str) -> String {
    with_tls(&manifests(port, &["id", "mrn"], false, ADMIN_PASSWORD), host, ca, ssl_mode)
}

#[tokio::test]
async fn tls_to_the_store_verifies_the_server_and_never_downgrades() {
    let (ca, server_tls) = tls_material(&["127.0.0.1", "ehr-db.clinic.svc"]);
    let (other_ca, _) = tls_material(&["127.0.0.1"]);
    let pg = Postgres::start_with(Some(&server_tls)).await;
    prepare_database(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests_dir).unwrap();
    let load = |text: String| {
        std::fs::write(manifests_dir.join("clinic.yaml"), text).unwrap();
        Inventory::from_manifests(&manifests_dir).unwrap()
    };
    let trail = Trail::new(dir.path().join("audit"), None, mcp_warden::broker::trail::BROKER_STREAM).unwrap();
    let settings = Settings { max_ttl: None, connection_limit: 4, ..Default::default() };
    let broker = Broker::new(
        load(tls_manifests(pg.port, "127.0.0.1", &ca, "verify-full")),
        trail,
        settings,
        BrokerMetrics::register(&mut Registry::default()),
    );
    let problems = broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
    let issued =
        broker.issue(&request("lookup_patient", &token("lena", &["front-desk"]))).await.expect("issued over TLS");
    let root = pg.superuser("ehr").await;
    let tls_backends: i64 = root
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'warden_admin' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tls_backends >= 1, "the admin connection is encrypted");
    assert!(issued.ssl_mode == "verify-full");

    // A server whose certificate does not chain to the configured CA, a
    // host name the certificate does not name, and modes that do not verify:
    // refused before any credential is sent, and nothing is created.
    for (text, class) in [
        (tls_manifests(pg.port, "127.0.0.1", &other_ca, "verify-full"), "tls"),
        (tls_manifests(pg.port, "localhost", &ca, "verify-full"), "tls"),
        (tls_manifests(pg.port, "127.0.0.1", &ca, "require"), "tls"),
        (tls_manifests(pg.port, "127.0.0.1", &ca, "verify-ca"), "tls"),
        (tls_manifests(pg.port, "127.0.0.1", &ca, "prefer"), "tls"),
    ] {
        let problems = broker.reload(load(text)).await;
        assert!(problems.iter().any(|p| p.contains("TLS")), "{problems:?}");
        let err = broker.issue(&request("lookup_patient", &token("mona", &["front-desk"]))).await.expect_err("refused");
        assert_eq!(err.class(), class, "{err}");
        assert!(!err.to_string().contains(ADMIN_PASSWORD));
    }
    let names = login_role_names(&root).await;
    assert_eq!(names, BTreeSet::from([issued.role.clone()]), "no role was created over an unverified connection");
    broker.close().await;
}

/// A stand-in for the API server's TokenReview endpoint: `sa:<ns>:<account>`
/// tokens authenticate as that service account for the broker's audience.
async fn fake_token_review_api() -> kube::Client {
    use axum::routing::post;
    // As `mcp-warden` does at start (both rustls providers are compiled into tests).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        post(|axum::Json(review): axum::Json<serde_json::Value>| async move {
            let token = review["spec"]["token"].as_str().unwrap_or_default().to_string();
            let audiences = review["spec"]["audiences"].clone();
            let status = match token.strip_prefix("sa:").and_then(|r| r.split_once(':')) {
                Some((ns, account)) if audiences == json!(["mcp-warden-broker"]) => json!({
                    "authenticated": true, "audiences": ["mcp-warden-broker"],
                    "user": {"username": format!("system:serviceaccount:{ns}:{account}")}}),
                _ => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            (axum::http::StatusCode::CREATED, axum::Json(json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status})))
        }),
    );
    let base = common::serve(app).await;
    let config = kube::Config::new(base.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn in_a_cluster_a_sidecar_gets_credentials_for_its_own_server_only() {
    let w = world().await;
    let reviewer = Arc::new(mcp_warden::broker::cluster::TokenReviewer::new(
        fake_token_review_api().await,
        mcp_warden::broker::cluster::BROKER_AUDIENCE,
    ));
    let callers =
        Callers { sidecar: SidecarAuth::TokenReview(reviewer), revoker: None, reidentifier: Default::default() };
    let base = common::serve(router(Arc::clone(&w.broker), callers)).await;
    let caller = token("nina", &["front-desk"]);

    let own = BrokerClient::new(&base, "sa:clinic:patient-lookup-mcpw").unwrap();
    let credential = own.credential(&request("lookup_patient", &caller)).await.expect("its own server");
    assert!(credential.role.starts_with("mcpw_u_"));

    let other = BrokerClient::new(&base, "sa:clinic:billing-mcpw").unwrap();
    let refused = other.credential(&request("lookup_patient", &caller)).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused { status: 403, class, .. }) if class == "wrong_server"),
        "{refused:?}"
    );
    let not_a_sidecar = BrokerClient::new(&base, "sa:clinic:default").unwrap();
    let refused = not_a_sidecar.credential(&request("lookup_patient", &caller)).await;
    assert!(matches!(&refused, Err(ClientError::Refused { status: 401, .. })), "{refused:?}");
    let forged = BrokerClient::new(&base, "forged-token").unwrap();
    let refused = forged.credential(&request("lookup_patient", &caller)).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused { status: 401, message, .. }) if !message.contains("forged-token")),
        "{refused:?}"
    );
    // The static credential means nothing in this mode.
    let stat = BrokerClient::new(&base, SIDECAR_CREDENTIAL).unwrap();
    assert!(matches!(
        stat.credential(&request("lookup_patient", &caller)).await,
        Err(ClientError::Refused { status: 401, .. })
    ));
}

/// A client of the broker's API trusting only `ca`: does a credential
/// request succeed over TLS?
async fn tls_request_succeeds(port: u16, ca: &str) -> bool {
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let response = http
        .post(format!("https://127.0.0.1:{port}/v1/credentials"))
        .bearer_auth(SIDECAR_CREDENTIAL)
        .json(&request("lookup_patient", &token("olga", &["front-desk"])))
        .send()
        .await;
    match response {
        Ok(r) => {
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["cache-control"], "no-store");
            true
        }
        Err(_) => false,
    }
}

/// Replaces a mounted file the way the kubelet does: the new content
/// appears at once (rename), never half-written.
fn swap_file(path: &Path, content: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, content).unwrap();
    std::fs::rename(&next, path).unwrap();
}

#[tokio::test]
async fn the_api_is_served_over_tls_and_follows_a_renewed_certificate() {
    use mcp_warden::tls_listener::{ServingCertificate, TlsListener};
    let w = world().await;
    let (ca, first) = tls_material(&["127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    swap_file(&cert_file, &first.cert_pem);
    swap_file(&key_file, &first.key_pem);
    let certificate = ServingCertificate::load(&cert_file, &key_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = TlsListener::new(listener, certificate.server_config().unwrap()).unwrap();
    let callers = Callers {
        sidecar: SidecarAuth::Static(StaticCredential::new(SIDECAR_CREDENTIAL).unwrap()),
        revoker: None,
        reidentifier: Default::default(),
    };
    let app = router(Arc::clone(&w.broker), callers);
    tokio::spawn(async move { axum::serve(tls, app).await.unwrap() });
    // A silent client does not hold up the others.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(tls_request_succeeds(port, &ca).await, "TLS request");
    // Plain HTTP to the TLS port gets nothing.
    let plain = reqwest::Client::new().post(format!("http://127.0.0.1:{port}/v1/credentials")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    assert!(!certificate.reload().unwrap(), "unchanged files are not a renewal");

    // Renewals that cannot be used leave the certificate in force: a
    // half-written chain, a key of another certificate, an empty key.
    let (_, other) = tls_material(&["127.0.0.1"]);
    for (cert, key, expected) in [
        ("-----BEGIN CERTIFICATE-----\nMIIB", first.key_pem.as_str(), "tls.crt"),
        (other.cert_pem.as_str(), first.key_pem.as_str(), "do not match"),
        (first.cert_pem.as_str(), "", "no usable private key"),
    ] {
        swap_file(&cert_file, cert);
        swap_file(&key_file, key);
        let err = certificate.reload().expect_err("unusable renewal");
        assert!(err.to_string().contains(expected), "{err}");
        assert!(!err.to_string().contains("PRIVATE KEY"), "no key material in errors: {err}");
        assert!(tls_request_succeeds(port, &ca).await, "the previous certificate still serves");
    }

    // cert-manager renews under a new CA: picked up without a restart.
    certificate.keep_fresh(Duration::from_millis(100));
    let (new_ca, renewed) = tls_material(&["127.0.0.1"]);
    swap_file(&cert_file, &renewed.cert_pem);
    swap_file(&key_file, &renewed.key_pem);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !tls_request_succeeds(port, &new_ca).await {
        assert!(std::time::Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!tls_request_succeeds(port, &ca).await, "the old certificate is no longer served");
}

#[tokio::test]
async fn the_broker_ships_its_lease_trail_to_the_collector_and_seals_it() {
    use mcp_warden::audit::collector::{self, store::Storage};
    use mcp_warden::audit::trail_shipping::{Destination, TrailShipping, drain};
    use mcp_warden::audit::verify::{VerifyOptions, verify_dir};
    const SENDER: &str = "broker-sender-credential-0123456789abcdef";
    let w = world().await;
    let data = tempfile::tempdir().unwrap();
    let storage = Arc::new(std::sync::Mutex::new(Storage::open(data.path()).unwrap()));
    std::fs::create_dir_all(data.path().join("incidents")).unwrap();
    let incidents = Arc::new(
        mcp_warden::audit::Wal::open(mcp_warden::audit::WalConfig::new(
            data.path().join("incidents"),
            collector::COLLECTOR_SERVER,
        ))
        .unwrap(),
    );
    let app = collector::router(
        storage,
        incidents,
        collector::Senders::Static(StaticCredential::new(SENDER).unwrap()),
        collector::Readers::None,
    )
    .unwrap();
    let url = common::serve(app).await;
    let to = Destination {
        url,
        credential: mcp_warden::bearer::ClientCredential::Fixed(SENDER.into()),
        http: reqwest::Client::new(),
    };
    let shipping = TrailShipping::start(&w.broker, mcp_warden::broker::issuer::Broker::trail, to);
    let issued = w.client.credential(&request("lookup_patient", &token("alice", &["clinicians"]))).await.unwrap();
    // The lease record reaches the collector while the broker runs.
    let streams = data.path().join("streams");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let shipped = records(&streams);
        if shipped.iter().any(|r| r.event.lease.as_ref().is_some_and(|l| l.id == issued.lease_id)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the lease record never reached the collector");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shutdown: loops stopped, the trail sealed, the rest drained.
    let shippers = shipping.stop().await;
    w.broker.close().await;
    drain(shippers).await;
    let report = verify_dir(&streams, VerifyOptions { require_sealed: true, ..VerifyOptions::default() });
    assert!(report.passed(), "{report:?}");
    let shipped = records(&streams);
    let servers: BTreeSet<&str> = shipped.iter().map(|r| r.server.as_str()).collect();
    assert_eq!(servers, BTreeSet::from([SERVER, "mcp-warden/broker"]), "the server's stream and the broker's own");
    // Every record still in the broker's WAL (shipped segments are released)
    // is at the collector.
    let local: Vec<String> = records(&w.audit_dir()).iter().map(|r| r.hash.clone()).collect();
    let remote: BTreeSet<String> = shipped.iter().map(|r| r.hash.clone()).collect();
    assert!(local.iter().all(|h| remote.contains(h)), "a local record is missing at the collector");
}

/// The broker's clinic with a break-glass procedure opening `lookup_patient`
/// (identified output), the chart's admission policy in force for a day,
/// and `grants` (EmergencyAccess YAML documents).
fn with_break_glass(port: u16, admission: bool, grants: &[String]) -> String {
    let mut text = manifests(port, &["id", "mrn", "name"], true, ADMIN_PASSWORD);
    text.push_str(
        "  emergencyAccess:\n    approvers: {users: [\"oidc:dr-house\"]}\n    maxDuration: 2h\n    tools: [lookup_patient]\n    kubernetesUsernamePrefix: \"oidc:\"\n",
    );
    if admission {
        for mut object in common::chart::emergency_admission_policy("mcp-warden") {
            object["metadata"]["creationTimestamp"] = json!(ago(86_400));
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(&object).unwrap());
        }
    }
    for grant in grants {
        text.push_str("---\n");
        text.push_str(grant);
    }
    text
}

fn ago(seconds: i64) -> String {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(now - seconds).unwrap().to_string()
}

/// An approved grant, as the operator's status says: created `created` s
/// ago, approved `approved` s ago, for `duration`.
fn grant(name: &str, beneficiary: &str, identified: bool, created: i64, approved: i64, duration: &str) -> String {
    format!(
        r#"apiVersion: mcpwarden.io/v1alpha1
kind: EmergencyAccess
metadata: {{name: {name}, namespace: clinic, creationTimestamp: "{created}"}}
spec:
  server: patient-lookup
  requester: "oidc:nurse-joy"
  beneficiary: {beneficiary}
  tools: [lookup_patient]
  reason: unconscious patient, identity needed for transfusion history
  duration: {duration}
  identifiedOutput: {identified}
  approval: {{approver: "oidc:dr-house"}}
status: {{state: Active, approvedAt: "{approved}"}}
"#,
        created = ago(created),
        approved = ago(approved),
    )
}

#[tokio::test]
async fn a_grant_opens_exactly_its_tool_for_exactly_its_beneficiary_until_it_ends() {
    let w = world().await;
    let er_doc = token("er-doc", &[]);
    // Without a grant, er-doc (no group) is refused.
    let refused = w.client.credential(&request("lookup_patient", &er_doc)).await.unwrap_err();
    assert!(matches!(refused, ClientError::Refused { status: 403, ref class, .. } if class == "caller_not_allowed"));

    let ea = grant("ea-1", "er-doc", true, 300, 240, "1h");
    w.reload(&with_break_glass(w.pg.port, true, std::slice::from_ref(&ea))).await;
    // Identified and in the procedure: break-glass only, even for the front
    // desk its allowedCallers name.
    let front_desk = w.client.credential(&request("lookup_patient", &token("erin", &["front-desk"]))).await;
    assert!(matches!(front_desk, Err(ClientError::Refused { status: 403, .. })), "{front_desk:?}");
    assert_eq!(w.client.emergency_grants(SERVER, "er-doc").await.unwrap().len(), 1);
    assert!(w.client.emergency_grants(SERVER, "intruder").await.unwrap().is_empty());
    let credential = w.client.credential(&request("lookup_patient", &er_doc)).await.unwrap();
    // The role ends no later than the grant (approved 4 min ago, for 1h):
    // here its TTL (15m) comes first.
    let until: k8s_openapi::jiff::Timestamp = credential.valid_until.parse().unwrap();
    let grant_end = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(56 * 60 + 5);
    assert!(until <= grant_end, "{until} after the grant's end {grant_end}");
    let issued = w.lease_records().into_iter().last().unwrap();
    assert_eq!(issued.event.emergency_access.as_deref(), Some("ea-1"), "the lease record names the grant");

    // Not another tool, not another caller, not a forged subject's group.
    for (tool, who) in [("record_note", er_doc.clone()), ("lookup_patient", token("intruder", &[]))] {
        let refused = w.client.credential(&request(tool, &who)).await.unwrap_err();
        assert!(matches!(refused, ClientError::Refused { status: 403, .. }), "{tool}: {refused}");
    }

    // Revoked (gone from the grants in force): its open session ends now.
    let session = w.login(&credential).await.unwrap();
    session.simple_query("SELECT mrn FROM clinical.patients").await.unwrap();
    w.reload(&with_break_glass(w.pg.port, true, &[])).await;
    assert_terminated(&session).await;
    assert!(login_role_names(&w.admin_db().await).await.is_empty());
    let revoked = w.lease_records().into_iter().last().unwrap();
    assert_eq!(revoked.event.lease.as_ref().unwrap().action, LeaseAction::Revoked);
    assert!(revoked.event.reason.as_deref().unwrap().contains("emergency access ea-1 ended"));
    let refused = w.client.credential(&request("lookup_patient", &er_doc)).await.unwrap_err();
    assert!(matches!(refused, ClientError::Refused { status: 403, .. }));
}

#[tokio::test]
async fn a_grant_is_honoured_only_as_approved_bounded_and_checked_by_admission() {
    let w = world().await;
    let er_doc = token("er-doc", &[]);
    let cases = [
        // No admission policy in force: nobody checked who created it.
        (with_break_glass(w.pg.port, false, &[grant("ea-1", "er-doc", true, 300, 240, "1h")]), false, "no policy"),
        // An identified tool, under a grant (in force) that does not allow
        // identified output.
        (with_break_glass(w.pg.port, true, &[grant("ea-1", "er-doc", false, 300, 240, "1h")]), true, "identified"),
        // Longer than the procedure's maxDuration.
        (with_break_glass(w.pg.port, true, &[grant("ea-1", "er-doc", true, 300, 240, "3h")]), false, "too long"),
        // Its time is over.
        (with_break_glass(w.pg.port, true, &[grant("ea-1", "er-doc", true, 7300, 7200, "1h")]), false, "expired"),
        // Approved after the 15-minute window.
        (with_break_glass(w.pg.port, true, &[grant("ea-1", "er-doc", true, 1800, 60, "1h")]), false, "late"),
    ];
    for (manifests, in_force, case) in cases {
        w.reload(&manifests).await;
        let grants = w.client.emergency_grants(SERVER, "er-doc").await.unwrap();
        assert_eq!(grants.len(), usize::from(in_force), "{case}");
        let refused = w.client.credential(&request("lookup_patient", &er_doc)).await.unwrap_err();
        assert!(matches!(refused, ClientError::Refused { status: 403, .. }), "{case}: {refused}");
    }
}

#[tokio::test]
async fn a_grant_ending_ends_its_role_and_the_reaper_its_session() {
    let w = world().await;
    // Approved 59m57s ago for 1h: three seconds left.
    w.reload(&with_break_glass(w.pg.port, true, &[grant("ea-1", "er-doc", true, 3620, 3597, "1h")])).await;
    let credential = w.client.credential(&request("lookup_patient", &token("er-doc", &[]))).await.unwrap();
    let until: k8s_openapi::jiff::Timestamp = credential.valid_until.parse().unwrap();
    let left = until.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(left <= k8s_openapi::jiff::SignedDuration::from_secs(4), "VALID UNTIL {until} outlives the grant");
    let session = w.login(&credential).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert!(w.login(&credential).await.is_err(), "no login past the grant's end");
    // The reaper (every 15 s by default: the stated maximum lag) ends the session.
    assert_eq!(w.broker.reap().await, 1);
    assert_terminated(&session).await;
}
