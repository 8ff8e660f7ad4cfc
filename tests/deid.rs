//! De-identification enforced by a real PostgreSQL 15: the broker builds
//! the mapping, trigger and views; per-call roles of de-identified tools
//! get pseudonyms whatever SQL they send, and nothing else.
//!
//! The role a test logs in as is exactly what a compromised MCP server holds
//! during a call (its per-call DSN reaches the store through the proxy with
//! this role). Every value and every error message such a session sees is
//! searched for the seeded real identifiers.

mod common;
mod pg;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{AUDIENCE, ISSUER, claims, rs256};
use mcp_warden::broker::inventory::Inventory;
use mcp_warden::broker::issuer::{Broker, Credential, CredentialRequest, Settings};
use mcp_warden::broker::metrics::BrokerMetrics;
use mcp_warden::broker::trail::Trail;
use pg::Postgres;
use pg::clinic::{ADMIN_PASSWORD, prepare_database, secret_and_keys};
use prometheus_client::registry::Registry;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Real values seeded into the store; none may reach a de-identified tool.
const REAL: [&str; 16] = [
    "MRN-0001",
    "Joe Doe",
    "123-45-6789",
    "1970-01-01",
    "MRN-0002",
    "Ada Quill",
    "987-65-4321",
    "1920-05-05",
    "MRN-0003",
    "Bo Vance",
    "111-22-3333",
    "ZZ-X1",
    "94110",
    "03601",
    "complained",
    "2024-03-04",
];

const EXTRA_SCHEMA: &str = "
SET ROLE ehr_owner;
ALTER TABLE clinical.patients ADD COLUMN zip text;
UPDATE clinical.patients SET zip = '94110' WHERE id = 1;
INSERT INTO clinical.patients (id, mrn, name, dob, ssn, diagnosis, zip) VALUES
  (2, 'MRN-0002', 'Ada Quill', '1920-05-05', '987-65-4321', 'asthma', '03601'),
  (3, 'MRN-0003', 'Bo Vance', 'infinity', '111-22-3333', 'flu', 'ZZ-X1');
CREATE TABLE clinical.visits (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, patient_id int, visit_date date,
                              admitted text, note text);
INSERT INTO clinical.visits (patient_id, visit_date, admitted, note) VALUES
  (1, '2024-03-04', '2024-03-04', 'Joe Doe complained of fever'),
  (1, '2025-01-10', 'not-a-date', 'follow-up'),
  (2, '2023-07-01', '2023-07-01T09:00', 'Ada Quill, routine');
RESET ROLE;
GRANT SELECT ON clinical.visits TO warden_admin;
GRANT TRIGGER ON clinical.patients TO warden_admin;
GRANT CREATE ON DATABASE ehr TO warden_admin;
ANALYZE clinical.patients;
ANALYZE clinical.visits;
";

fn manifests(port: u16) -> String {
    let server = |name: &str, scope: Option<&str>, tools: &str| {
        let scope = scope.map(|s| format!("\n  pseudonymScope: {s}")).unwrap_or_default();
        format!(
            r#"---
apiVersion: mcpwarden.io/v1alpha1
kind: MCPServer
metadata: {{name: {name}, namespace: clinic}}
spec:
  image: registry.example/phi-tools:1.4{scope}
  authentication:
    oidc: {{issuer: "{ISSUER}", audience: "{AUDIENCE}", jwksConfigMapRef: {{name: idp-jwks}}}}
  tools:{tools}
"#
        )
    };
    let tool = |name: &str, table: &str, columns: &str| {
        format!(
            r#"
    - name: {name}
      phi: true
      purpose: de-identification test
      allowedCallers: {{groups: [front-desk]}}
      dataAccess:
        - store: ehr
          tables: [{{name: {table}, columns: [{columns}], privileges: [SELECT]}}]"#
        )
    };
    format!(
        r#"{keys}apiVersion: mcpwarden.io/v1alpha1
kind: PHIStore
metadata: {{name: ehr, namespace: clinic}}
spec:
  postgres: {{host: 127.0.0.1, port: {port}, database: ehr, adminSecretRef: {{name: ehr-db-admin}}, sslMode: disable}}
  endpoints: {{ipBlocks: [{{cidr: 127.0.0.1/32}}], ports: [{port}]}}
  deidentification:
    entities: [{{name: patient, prefix: pt, key: {{table: clinical.patients, column: id}}}}]
    tables:
      - name: clinical.patients
        columns:
          - {{name: id, class: Identifier, entity: patient}}
          - {{name: mrn, class: Identifier, entity: patient, keyColumn: id}}
          - {{name: name, class: Identifier, entity: patient, keyColumn: id}}
          - {{name: ssn, class: Identifier, entity: patient, keyColumn: id}}
          - {{name: dob, class: Quasi, generalize: BirthYear}}
          - {{name: zip, class: Quasi, generalize: Zip3}}
          - {{name: diagnosis, class: Clear}}
      - name: clinical.visits
        columns:
          - {{name: patient_id, class: Identifier, entity: patient}}
          - {{name: visit_date, class: Quasi, generalize: Year}}
          - {{name: admitted, class: Quasi, generalize: Year}}
          - {{name: note, class: FreeText}}
    rotation: {{every: 1h, grace: 1h}}
{lookup}{billing}{research}"#,
        lookup = server(
            "patient-lookup",
            None,
            &(tool("find_patient", "clinical.patients", "id, mrn, dob, zip, diagnosis")
                + &tool("patient_visits", "clinical.visits", "patient_id, visit_date, admitted"))
        ),
        billing = server("billing", Some("patient_lookup"), &tool("billing_lookup", "clinical.patients", "id")),
        research = server("research", None, &tool("cohort", "clinical.patients", "id, dob")),
        keys = secret_and_keys(ADMIN_PASSWORD),
    )
}

struct World {
    pg: Postgres,
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
}

/// PostgreSQL with the clinic and the extra schema, not yet seen by a broker.
async fn store() -> Postgres {
    let pg = Postgres::start().await;
    prepare_database(&pg).await;
    pg.superuser("ehr").await.batch_execute(EXTRA_SCHEMA).await.unwrap();
    pg
}

impl World {
    async fn new() -> World {
        let world = World::unsynced(store().await);
        let problems = world.broker.sync().await;
        assert!(problems.is_empty(), "{problems:?}");
        world
    }

    /// A broker over `pg` that has not made its first pass.
    fn unsynced(pg: Postgres) -> World {
        let dir = tempfile::tempdir().unwrap();
        let manifests_dir = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests_dir).unwrap();
        std::fs::write(manifests_dir.join("clinic.yaml"), manifests(pg.port)).unwrap();
        let inventory = Inventory::from_manifests(&manifests_dir).unwrap();
        for (server, entry) in &inventory.servers {
            assert!(entry.is_ok(), "{server}: {:?}", entry.as_ref().err());
        }
        let trail =
            Trail::new(dir.path().join("audit"), Some("broker-0".into()), mcp_warden::broker::trail::BROKER_STREAM)
                .unwrap();
        let settings = Settings { max_ttl: None, connection_limit: 4, ..Default::default() };
        let broker =
            Arc::new(Broker::new(inventory, trail, settings, BrokerMetrics::register(&mut Registry::default())));
        World { pg, _dir: dir, broker }
    }

    /// The session a compromised MCP server would hold during a call.
    async fn session(&self, server: &str, tool: &str) -> Client {
        let credential: Credential = self
            .broker
            .issue(&CredentialRequest {
                server: format!("clinic/{server}"),
                tool: tool.into(),
                store: "ehr".into(),
                caller_token: rs256(&claims("alice", &["front-desk"])),
                correlation: None,
            })
            .await
            .unwrap();
        self.pg.connect(&credential.database, &credential.role, &credential.password).await.unwrap()
    }
}

/// Everything a query shows its sender: every value, or the whole error.
async fn seen(session: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    match session.simple_query(sql).await {
        Ok(messages) => Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect()),
                _ => None,
            })
            .collect()),
        Err(e) => Err(match e.as_db_error() {
            Some(db) => format!("{} | {:?} | {:?} | {:?}", db.message(), db.detail(), db.hint(), db.where_()),
            None => e.to_string(),
        }),
    }
}

#[track_caller]
fn assert_no_real_value(sql: &str, text: &str) {
    for real in REAL {
        assert!(!text.contains(real), "{sql:?} showed the real value {real:?}: {text}");
    }
}

/// Runs `sql` and checks that neither its rows nor its error hold a real
/// value; returns the outcome for further checks.
async fn probe(session: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let outcome = seen(session, sql).await;
    assert_no_real_value(sql, &format!("{outcome:?}"));
    outcome
}

fn is_pseudonym(value: &str) -> bool {
    value.strip_prefix("pt_").is_some_and(|h| h.len() == 20 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The broker's pass puts triggers on classified tables. Waiting for an
/// application's open write transaction, its lock request would sit in
/// PostgreSQL's queue ahead of every later write to the table: the
/// hospital's application would stall behind the broker. It gives up after
/// its lock timeout instead, says so, and succeeds once the table is free.
#[tokio::test]
async fn a_busy_table_fails_the_brokers_pass_quickly_instead_of_stalling_the_application() {
    let world = World::unsynced(store().await);
    let application = world.pg.superuser("ehr").await;
    application.batch_execute("BEGIN; UPDATE clinical.patients SET diagnosis = diagnosis WHERE id = 2").await.unwrap();
    let another_writer = world.pg.superuser("ehr").await;

    let pass = tokio::spawn({
        let broker = Arc::clone(&world.broker);
        async move { broker.sync().await }
    });
    // While the broker waits for its lock, another write to the table waits
    // behind it: only as long as the broker's lock timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let write = tokio::time::timeout(
        Duration::from_secs(20),
        another_writer.batch_execute("UPDATE clinical.patients SET diagnosis = diagnosis WHERE id = 3"),
    )
    .await;
    assert!(write.is_ok(), "a write to the table stalled behind the broker's pass");
    write.unwrap().unwrap();
    let problems = tokio::time::timeout(Duration::from_secs(20), pass)
        .await
        .expect("the pass kept waiting for the application's lock")
        .unwrap();
    assert!(problems.iter().any(|p| p.contains("lock timeout")), "{problems:?}");

    application.batch_execute("COMMIT").await.unwrap();
    let problems = world.broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
}

#[tokio::test]
async fn a_compromised_server_gets_pseudonyms_or_refusals_whatever_sql_it_sends() {
    let w = World::new().await;
    let s = w.session("patient-lookup", "find_patient").await;
    let v = "deid_patient_lookup.patients";

    // The tool's own query: pseudonyms, generalized quasi-identifiers, clear values.
    let rows = probe(&s, &format!("SELECT id, mrn, dob, zip, diagnosis FROM {v} ORDER BY diagnosis")).await.unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let (id, mrn) = (row[0].as_deref().unwrap(), row[1].as_deref().unwrap());
        assert!(is_pseudonym(id), "{row:?}");
        assert_eq!(id, mrn, "an MRN is its patient's pseudonym");
    }
    let by_diagnosis = |d: &str| rows.iter().find(|r| r[4].as_deref() == Some(d)).unwrap().clone();
    // Ada, born 1920: 90 or older, year removed; ZIP 036xx is a small area.
    assert_eq!(by_diagnosis("asthma")[2..4], [Some("90+".into()), Some("000".into())]);
    // Joe: a year and the first three ZIP digits.
    assert_eq!(by_diagnosis("influenza")[2..4], [Some("1970".into()), Some("941".into())]);
    // Bo's malformed rows (infinite birth date, garbage ZIP) do not fail the view.
    assert_eq!(by_diagnosis("flu")[2..4], [None, None]);

    // Expressions over granted columns see only what the view serves.
    for sql in [
        format!("SELECT mrn || '', lower(mrn), upper(mrn), mrn::text, md5(mrn), length(mrn) FROM {v}"),
        format!("SELECT string_agg(mrn, ','), array_agg(dob), json_agg(zip) FROM {v}"),
        format!("SELECT (SELECT max(mrn) FROM {v} p2 WHERE p2.id = p.id) FROM {v} p"),
        format!("SELECT a.mrn, b.id FROM {v} a JOIN {v} b ON a.id = b.id"),
        format!("SELECT mrn FROM {v} WHERE mrn LIKE 'MRN-%'"),
        format!("SELECT to_json(array[id, mrn]) FROM {v}"),
        format!("SELECT id FROM {v} WHERE dob = '1970'"),
    ] {
        probe(&s, &sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // The filter on a real value finds nothing: the view holds none.
    assert!(probe(&s, &format!("SELECT id FROM {v} WHERE mrn = 'MRN-0001'")).await.unwrap().is_empty());

    // Refused outright: base tables, ungranted view columns, whole rows that
    // include them, other views, the mapping, the token function, writes.
    for sql in [
        "SELECT mrn FROM clinical.patients".to_string(),
        "SELECT count(*) FROM clinical.patients".to_string(),
        "SELECT * FROM clinical.patients".to_string(),
        "COPY clinical.patients TO STDOUT".to_string(),
        format!("SELECT name FROM {v}"),
        format!("SELECT ssn FROM {v}"),
        format!("SELECT row_to_json(p) FROM {v} p"),
        format!("SELECT p FROM {v} p"),
        format!("SELECT * FROM {v}"),
        "SELECT patient_id FROM deid_patient_lookup.visits".to_string(),
        "SELECT * FROM mcpw_deid.map_patient".to_string(),
        "SELECT mcpw_deid.new_token('pt')".to_string(),
        "SELECT * FROM mcpw_deid.scopes".to_string(),
        "SELECT id FROM deid_research.patients".to_string(),
        format!("INSERT INTO {v} (id) VALUES ('pt_x')"),
        format!("UPDATE {v} SET diagnosis = 'x'"),
        "SET ROLE ehr_owner".to_string(),
        "SET ROLE warden_admin".to_string(),
        "CREATE TABLE public.loot AS SELECT 1".to_string(),
    ] {
        let outcome = probe(&s, &sql).await;
        assert!(outcome.is_err(), "{sql} was not refused: {outcome:?}");
    }

    // A cast that fails echoes the pseudonym, never the real value.
    let err = probe(&s, &format!("SELECT mrn::int FROM {v}")).await.unwrap_err();
    assert!(err.contains("pt_"), "{err}");

    // COPY of the tool's own query: pseudonyms, like SELECT.
    let sql = format!("COPY (SELECT mrn, dob FROM {v}) TO STDOUT");
    let stream = s.copy_out(sql.as_str()).await.unwrap();
    let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    let copied = String::from_utf8(chunks.concat()).unwrap();
    assert_eq!(copied.lines().count(), 3);
    assert!(copied.lines().all(|l| l.starts_with("pt_")), "{copied}");
    assert_no_real_value(&sql, &copied);

    // pg_stats shows the columns the role may read: none of the tables'.
    let stats =
        probe(&s, "SELECT attname, most_common_vals::text FROM pg_stats WHERE schemaname IN ('clinical', 'mcpw_deid')")
            .await
            .unwrap();
    assert!(stats.is_empty(), "{stats:?}");
    let admin = w.pg.superuser("ehr").await;
    let visible = admin.query("SELECT 1 FROM pg_stats WHERE schemaname = 'clinical'", &[]).await.unwrap();
    assert!(!visible.is_empty(), "the tables have statistics to hide");

    // No privilege on any column of a base table, from any grant (PUBLIC's too).
    let held = probe(
        &s,
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          WHERE c.relnamespace IN ('clinical'::regnamespace, 'mcpw_deid'::regnamespace) AND a.attnum > 0
            AND has_column_privilege(c.oid, a.attnum, 'SELECT, INSERT, UPDATE, REFERENCES')",
    )
    .await
    .unwrap();
    assert!(held.is_empty(), "{held:?}");

    // What every role may read of the catalog holds no key, salt or value.
    for sql in [
        "SELECT prosrc FROM pg_proc WHERE pronamespace = 'mcpw_deid'::regnamespace",
        "SELECT pg_get_viewdef('deid_patient_lookup.patients'::regclass)",
        "EXPLAIN VERBOSE SELECT id, mrn, dob, zip FROM deid_patient_lookup.patients WHERE id = 'pt_0'",
        "SELECT rolname, rolconfig FROM pg_roles",
        "SELECT obj_description(oid, 'pg_class') FROM pg_class WHERE relnamespace = 'deid_patient_lookup'::regnamespace",
    ] {
        probe(&s, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // The view reads the table's pseudonymized copy (a trigger keeps it),
    // which callers hold no privilege on (the probe above covers mcpw_deid).
    let viewdef: String =
        admin.query_one("SELECT pg_get_viewdef('deid_patient_lookup.patients'::regclass)", &[]).await.unwrap().get(0);
    assert!(viewdef.contains("mcpw_deid.sh_") && !viewdef.contains("clinical."), "{viewdef}");
    // The functions the mapping and the copies use run as their owner only
    // where no caller can reach them: none has EXECUTE for PUBLIC, and the
    // triggers' search_path is pinned.
    let functions = admin
        .query(
            "SELECT proname::text, prosecdef, proconfig::text, has_function_privilege('public', oid, 'EXECUTE')
               FROM pg_proc WHERE pronamespace = 'mcpw_deid'::regnamespace ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert!(functions.len() >= 4, "the token function, the key trigger and a copy's two triggers: {}", functions.len());
    for f in &functions {
        let (name, definer, config, public): (String, bool, Option<String>, bool) =
            (f.get(0), f.get(1), f.get(2), f.get(3));
        assert!(!public, "{name} is executable by PUBLIC");
        assert!(config.unwrap_or_default().contains("search_path=pg_catalog, pg_temp"), "{name}");
        assert_eq!(definer, name == "tokens_patient" || name.starts_with("sh_"), "{name}");
    }
}

#[tokio::test]
async fn a_pseudonym_finds_its_patient_through_a_second_tool_and_scopes_agree_or_not() {
    let w = World::new().await;
    let lookup = w.session("patient-lookup", "find_patient").await;
    let joe =
        probe(&lookup, "SELECT id FROM deid_patient_lookup.patients WHERE diagnosis = 'influenza'").await.unwrap();
    let joe = joe[0][0].clone().unwrap();

    // The model passes the pseudonym back; the database finds the rows.
    let visits = w.session("patient-lookup", "patient_visits").await;
    let sql = format!(
        "SELECT patient_id, visit_date, admitted FROM deid_patient_lookup.visits WHERE patient_id = '{joe}' ORDER BY visit_date"
    );
    let rows = probe(&visits, &sql).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r[0].as_deref() == Some(joe.as_str())));
    // Dates are years; the malformed text date is nothing, not an error.
    assert_eq!(rows[0][1..], [Some("2024".into()), Some("2024".into())]);
    assert_eq!(rows[1][1..], [Some("2025".into()), None]);
    // The note is free text: not in the view at all.
    assert!(probe(&visits, "SELECT note FROM deid_patient_lookup.visits").await.is_err());

    // A server sharing the scope sees the same pseudonyms; another scope
    // sees unrelated ones.
    let all = |rows: Vec<Vec<Option<String>>>| rows.into_iter().map(|r| r[0].clone().unwrap()).collect::<BTreeSet<_>>();
    let ours = all(probe(&lookup, "SELECT id FROM deid_patient_lookup.patients").await.unwrap());
    let billing = w.session("billing", "billing_lookup").await;
    assert_eq!(all(probe(&billing, "SELECT id FROM deid_patient_lookup.patients").await.unwrap()), ours);
    let research = w.session("research", "cohort").await;
    let theirs = all(probe(&research, "SELECT id FROM deid_research.patients").await.unwrap());
    assert_eq!(theirs.len(), 3);
    assert!(ours.is_disjoint(&theirs), "scopes must not link: {ours:?} {theirs:?}");
    assert!(probe(&research, "SELECT id FROM deid_patient_lookup.patients").await.is_err());

    // Tokens are random, not derived: the mapping holds one per key and scope.
    let admin = w.pg.superuser("ehr").await;
    let row = admin
        .query_one("SELECT count(*), count(DISTINCT token), count(DISTINCT scope) FROM mcpw_deid.map_patient", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (6, 6, 2));
}

#[tokio::test]
async fn a_new_patient_has_a_pseudonym_at_once_and_a_steady_pass_changes_nothing() {
    let w = World::new().await;
    // The application's write (as the table owner) is not slowed by a
    // failure of ours and maps the new key in every scope at once.
    let owner = w.pg.superuser("ehr").await;
    owner
        .batch_execute(
            "SET ROLE ehr_owner; INSERT INTO clinical.patients (id, mrn, name, diagnosis) VALUES (4, 'MRN-0004', 'Cy Oak', 'gout'); RESET ROLE",
        )
        .await
        .unwrap();
    let s = w.session("patient-lookup", "find_patient").await;
    let rows = probe(&s, "SELECT id FROM deid_patient_lookup.patients WHERE diagnosis = 'gout'").await.unwrap();
    assert!(is_pseudonym(rows[0][0].as_deref().unwrap()), "{rows:?}");
    let research = w.session("research", "cohort").await;
    let rows = probe(&research, "SELECT id FROM deid_research.patients").await.unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r[0].as_deref().is_some_and(is_pseudonym)));

    // A second pass finds everything current: no view re-created (their
    // creation times stay), no problem reported.
    let stamp = "SELECT string_agg(c.oid::text || ':' || c.relname, ',' ORDER BY c.relname) FROM pg_class c
                  WHERE c.relnamespace IN ('deid_patient_lookup'::regnamespace, 'deid_research'::regnamespace)";
    let before: String = owner.query_one(stamp, &[]).await.unwrap().get(0);
    assert!(w.broker.sync().await.is_empty());
    let after: String = owner.query_one(stamp, &[]).await.unwrap().get(0);
    assert_eq!(before, after);
    let report = &w.broker.reports()
        [&mcp_warden::broker::inventory::StoreRef { namespace: "clinic".into(), name: "ehr".into() }];
    assert!(report.admin_missing.is_empty(), "{:?}", report.admin_missing);

    // Without TRIGGER on the key table the admin check says so.
    owner.batch_execute("REVOKE TRIGGER ON clinical.patients FROM warden_admin").await.unwrap();
    w.broker.sync().await;
    let report = &w.broker.reports()
        [&mcp_warden::broker::inventory::StoreRef { namespace: "clinic".into(), name: "ehr".into() }];
    assert!(
        report.admin_missing.iter().any(|m| m.starts_with("TRIGGER on clinical.patients")),
        "{:?}",
        report.admin_missing
    );
}

/// What `sql` returns to a de-identified session, as text.
async fn rows(session: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    probe(session, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test]
async fn the_pseudonymized_copy_follows_every_write_and_a_write_it_misses_is_rebuilt_not_lost() {
    let w = World::new().await;
    let owner = w.pg.superuser("ehr").await;
    let as_owner = async |sql: &str| {
        owner
            .batch_execute(&format!("SET ROLE ehr_owner; {sql}; RESET ROLE"))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    // visits gets a copy once the admin may put a trigger on it.
    owner.batch_execute("GRANT TRIGGER ON clinical.visits TO warden_admin").await.unwrap();
    assert!(w.broker.sync().await.is_empty());
    let copies: i64 = owner
        .query_one("SELECT count(*) FROM pg_class WHERE relnamespace = 'mcpw_deid'::regnamespace AND relname LIKE 'sh\\_%' AND relkind = 'r'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 3, "patients in two scopes, visits in one");
    let s = w.session("patient-lookup", "find_patient").await;
    let v = w.session("patient-lookup", "patient_visits").await;
    let token_of = async |diagnosis: &str| {
        rows(&s, &format!("SELECT id FROM deid_patient_lookup.patients WHERE diagnosis = '{diagnosis}'")).await
    };

    // Insert, update of a served column, of the key, delete, truncate.
    as_owner("INSERT INTO clinical.patients (id, mrn, name, dob, diagnosis) VALUES (40, 'MRN-0040', 'Di Ash', '1988-02-03', 'gout')").await;
    let gout = token_of("gout").await;
    assert_eq!(gout.len(), 1);
    assert!(is_pseudonym(gout[0][0].as_deref().unwrap()), "{gout:?}");
    as_owner("UPDATE clinical.patients SET diagnosis = 'migraine' WHERE id = 40").await;
    assert!(token_of("gout").await.is_empty());
    assert_eq!(token_of("migraine").await, gout, "the pseudonym stays with the patient");
    as_owner("UPDATE clinical.patients SET id = 41 WHERE id = 40").await;
    let moved = token_of("migraine").await;
    assert_eq!(moved.len(), 1);
    assert_ne!(moved, gout, "a new key is a new pseudonym");
    assert!(is_pseudonym(moved[0][0].as_deref().unwrap()));
    as_owner("DELETE FROM clinical.patients WHERE id = 41").await;
    assert!(token_of("migraine").await.is_empty());

    // A visit of a patient the key table does not hold still gets a token.
    as_owner("INSERT INTO clinical.visits (patient_id, visit_date, admitted, note) VALUES (777, '2019-05-06', 'x', 'Zed Null')").await;
    let visits =
        rows(&v, "SELECT patient_id, visit_date FROM deid_patient_lookup.visits WHERE visit_date = 2019").await;
    assert_eq!(visits.len(), 1, "{visits:?}");
    assert!(is_pseudonym(visits[0][0].as_deref().unwrap()), "{visits:?}");
    as_owner("TRUNCATE clinical.visits").await;
    assert!(rows(&v, "SELECT 1 FROM deid_patient_lookup.visits").await.is_empty());

    // A write the trigger cannot mirror does not fail the application's
    // write; the copy is marked stale and the next pass rebuilds it whole.
    let def: String =
        owner.query_one("SELECT pg_get_viewdef('deid_patient_lookup.patients'::regclass)", &[]).await.unwrap().get(0);
    let copy = def.split("mcpw_deid.").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    owner
        .batch_execute(&format!("ALTER TABLE mcpw_deid.{copy} ADD CONSTRAINT broken CHECK (false) NOT VALID"))
        .await
        .unwrap();
    as_owner("INSERT INTO clinical.patients (id, mrn, name, dob, diagnosis) VALUES (50, 'MRN-0050', 'Eli Fox', '1999-09-09', 'sprain')").await;
    assert!(token_of("sprain").await.is_empty(), "the copy missed it");
    let stale: i64 = owner.query_one("SELECT count(*) FROM mcpw_deid.shadow_stale", &[]).await.unwrap().get(0);
    assert_eq!(stale, 1);
    assert!(w.broker.sync().await.is_empty());
    let s = w.session("patient-lookup", "find_patient").await;
    let sprain = rows(&s, "SELECT id FROM deid_patient_lookup.patients WHERE diagnosis = 'sprain'").await;
    assert_eq!(sprain.len(), 1, "rebuilt, the row is there");
    assert!(is_pseudonym(sprain[0][0].as_deref().unwrap()));
    let stale: i64 = owner.query_one("SELECT count(*) FROM mcpw_deid.shadow_stale", &[]).await.unwrap().get(0);
    assert_eq!(stale, 0);

    // Without TRIGGER the view joins the mapping and the copy and its
    // triggers go.
    owner.batch_execute("REVOKE TRIGGER ON clinical.visits FROM warden_admin").await.unwrap();
    assert!(w.broker.sync().await.is_empty());
    let def: String =
        owner.query_one("SELECT pg_get_viewdef('deid_patient_lookup.visits'::regclass)", &[]).await.unwrap().get(0);
    assert!(def.contains("map_patient") && !def.contains("sh_"), "{def}");
    let triggers: i64 = owner
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'clinical.visits'::regclass AND tgname LIKE 'mcpw\\_sh\\_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0);
    let v = w.session("patient-lookup", "patient_visits").await;
    as_owner("INSERT INTO clinical.visits (patient_id, visit_date, admitted, note) VALUES (1, '2021-01-01', 'x', 'n')")
        .await;
    let joined = rows(&v, "SELECT patient_id FROM deid_patient_lookup.visits").await;
    assert_eq!(joined.len(), 1);
    assert!(is_pseudonym(joined[0][0].as_deref().unwrap()));
}

const REIDENTIFIER: &str = "reidentifier-credential-for-tests-0123456789";

/// A stand-in API server for people: `priya-token` is oidc:priya (in
/// privacy-office, allowed to `reidentify` clinic/ehr), `mallory-token` is
/// oidc:mallory (allowed nothing); anything else is not authenticated.
async fn fake_people_api() -> kube::Client {
    use axum::routing::post;
    use serde_json::json;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = axum::Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(|axum::Json(review): axum::Json<serde_json::Value>| async move {
                let status = match review["spec"]["token"].as_str() {
                    _ if review["spec"].get("audiences").is_some() => json!({"authenticated": false}),
                    Some("priya-token") => json!({"authenticated": true, "user": {"username": "oidc:priya", "groups": ["privacy-office"]}}),
                    Some("mallory-token") => json!({"authenticated": true, "user": {"username": "oidc:mallory", "groups": ["front-desk"]}}),
                    _ => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
                (axum::http::StatusCode::CREATED, axum::Json(json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status})))
            }),
        )
        .route(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            post(|axum::Json(review): axum::Json<serde_json::Value>| async move {
                let spec = &review["spec"];
                let wanted = json!({"group": "mcpwarden.io", "resource": "phistores", "verb": "reidentify", "namespace": "clinic", "name": "ehr"});
                let allowed = spec["user"] == "oidc:priya" && spec["resourceAttributes"] == wanted;
                (axum::http::StatusCode::CREATED, axum::Json(json!({
                    "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec, "status": {"allowed": allowed}})))
            }),
        );
    let base = common::serve(app).await;
    kube::Client::try_from(kube::Config::new(base.parse().unwrap())).unwrap()
}

fn reidentify_request(pseudonym: &str) -> mcp_warden::broker::reidentify::ReidentifyRequest {
    mcp_warden::broker::reidentify::ReidentifyRequest {
        store: "clinic/ehr".into(),
        pseudonym: pseudonym.into(),
        reason: "INC-4711: lab result to be sent to the right patient".into(),
    }
}

/// The broker's own stream (re-identifications belong to no server).
fn broker_decisions(dir: &std::path::Path) -> Vec<mcp_warden::audit::record::Record> {
    use mcp_warden::audit::{record, segment};
    segment::list_segments(&dir.join("audit/_broker"))
        .unwrap_or_default()
        .iter()
        .flat_map(|(_, p)| segment::read_lines(p).unwrap())
        .map(|l| record::Record::parse_line(&l.bytes).unwrap())
        .filter(|r| r.event.method.as_deref() == Some("reidentify"))
        .collect()
}

#[tokio::test]
async fn reidentification_is_out_of_band_authorized_and_on_the_record() {
    use mcp_warden::broker::api::{Callers, ReidentifierAuth, SidecarAuth, StaticCredential, router};
    use mcp_warden::broker::client::{BrokerClient, ClientError};
    let w = World::new().await;
    let lookup = w.session("patient-lookup", "find_patient").await;
    let joe =
        probe(&lookup, "SELECT id FROM deid_patient_lookup.patients WHERE diagnosis = 'influenza'").await.unwrap();
    let joe = joe[0][0].clone().unwrap();
    let sidecar = SidecarAuth::Static(StaticCredential::new("sidecar-credential-for-tests-0123456789").unwrap());

    // On a laptop: the reidentifier credential.
    let callers = Callers {
        sidecar: sidecar.clone(),
        revoker: None,
        reidentifier: ReidentifierAuth::Static(StaticCredential::new(REIDENTIFIER).unwrap()),
    };
    let base = common::serve(router(Arc::clone(&w.broker), callers)).await;
    let found = BrokerClient::new(&base, REIDENTIFIER).unwrap().reidentify(&reidentify_request(&joe)).await.unwrap();
    assert_eq!(
        (found.entity.as_str(), found.key.as_str(), found.scope.as_str(), found.epoch),
        ("patient", "1", "patient_lookup", 1)
    );
    // The wrong credential, a malformed or unknown pseudonym, no reason.
    let wrong = BrokerClient::new(&base, "not-the-reidentifier-credential-0123456789").unwrap();
    let refused = wrong.reidentify(&reidentify_request(&joe)).await.unwrap_err();
    assert!(matches!(refused, ClientError::Refused { status: 401, .. }), "{refused:?}");
    let client = BrokerClient::new(&base, REIDENTIFIER).unwrap();
    for (pseudonym, reason, status) in [
        ("MRN-0001", "why", 400),
        ("pt_ffffffffffffffffffff", "why", 404),
        ("xx_ffffffffffffffffffff", "why", 404),
        (joe.as_str(), "", 400),
        (joe.as_str(), "line\nbreak", 400),
    ] {
        let mut request = reidentify_request(pseudonym);
        request.reason = reason.into();
        match client.reidentify(&request).await {
            Err(ClientError::Refused { status: got, message, .. }) => {
                assert_eq!(got, status, "{pseudonym} {reason:?}: {message}");
                assert_no_real_value(pseudonym, &message);
            }
            other => panic!("{pseudonym} {reason:?}: {other:?}"),
        }
    }
    // A pseudonym of one scope is found with its scope; the real key is
    // never on the record, the act always is.
    let research = w.session("research", "cohort").await;
    let theirs = probe(&research, "SELECT id FROM deid_research.patients").await.unwrap()[0][0].clone().unwrap();
    let found = client.reidentify(&reidentify_request(&theirs)).await.unwrap();
    assert_eq!(found.scope, "research");

    // In a cluster: a person's token, TokenReview, SubjectAccessReview.
    let reviewer = Arc::new(mcp_warden::access_review::AccessReviewer::new(fake_people_api().await));
    let callers = Callers { sidecar, revoker: None, reidentifier: ReidentifierAuth::Cluster(reviewer) };
    let base = common::serve(router(Arc::clone(&w.broker), callers)).await;
    let priya = BrokerClient::new(&base, "priya-token").unwrap();
    assert_eq!(priya.reidentify(&reidentify_request(&joe)).await.unwrap().key, "1");
    let mallory = BrokerClient::new(&base, "mallory-token").unwrap();
    let refused = mallory.reidentify(&reidentify_request(&joe)).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { status: 403, class, .. } if class == "not_authorized"),
        "{refused:?}"
    );
    let nobody = BrokerClient::new(&base, "forged-token").unwrap();
    assert!(matches!(
        nobody.reidentify(&reidentify_request(&joe)).await,
        Err(ClientError::Refused { status: 401, .. })
    ));
    // Priya may re-identify clinic/ehr only.
    let mut elsewhere = reidentify_request(&joe);
    elsewhere.store = "billing/ehr".into();
    assert!(matches!(priya.reidentify(&elsewhere).await, Err(ClientError::Refused { status: 403, .. })));

    let decisions = broker_decisions(w._dir.path());
    let summary: Vec<(String, String, String)> = decisions
        .iter()
        .map(|r| {
            let e = &r.event;
            (
                e.caller.as_ref().unwrap().sub.clone(),
                format!("{:?}", e.decision.unwrap()),
                e.reason.clone().unwrap().split(':').next().unwrap().to_string(),
            )
        })
        .collect();
    let expected =
        |who: &str, decision: &str, verdict: &str| (who.to_string(), decision.to_string(), verdict.to_string());
    assert_eq!(
        summary,
        [
            expected("reidentifier-credential", "Allow", "allowed"),
            expected("reidentifier-credential", "Allow", "allowed"),
            expected("reidentifier-credential", "Deny", "refused, unknown prefix"),
            expected("reidentifier-credential", "Allow", "allowed"),
            expected("oidc:priya", "Allow", "allowed"),
            expected("oidc:mallory", "Deny", "refused, not authorized"),
            expected("oidc:priya", "Deny", "refused, not authorized"),
        ]
    );
    for record in &decisions {
        let reason = record.event.reason.as_deref().unwrap();
        assert!(
            reason.ends_with("INC-4711: lab result to be sent to the right patient") || reason.ends_with(": why"),
            "{reason}"
        );
        assert_eq!(record.event.phi, Some(true));
        assert_no_real_value("the trail", &format!("{:?}", record.event));
    }
    // The record says exactly who, what and why: the answer (the real key)
    // has no place in it.
    let first = &decisions[0].event;
    assert_eq!(
        first.reason.as_deref(),
        Some(format!("allowed: pseudonym {joe}: INC-4711: lab result to be sent to the right patient").as_str())
    );
    assert_eq!(
        (first.store.as_deref(), first.tool.as_deref(), first.statement.as_deref()),
        (Some("clinic/ehr"), None, None)
    );
}

#[tokio::test]
async fn rotation_gives_new_pseudonyms_and_the_previous_resolve_for_the_grace_period() {
    let w = World::new().await;
    let admin = w.pg.superuser("ehr").await;
    let joe_in = async |session: &Client, views: &str| -> String {
        let sql = format!("SELECT id FROM {views}.patients WHERE diagnosis = 'influenza'");
        probe(session, &sql).await.unwrap()[0][0].clone().unwrap()
    };
    let before = joe_in(&w.session("patient-lookup", "find_patient").await, "deid_patient_lookup").await;
    let research_before = w.session("research", "cohort").await;
    let research_ids = probe(&research_before, "SELECT id FROM deid_research.patients ORDER BY id").await.unwrap();
    // Nothing is due yet: a pass changes no pseudonym.
    assert!(w.broker.sync().await.is_empty());
    assert_eq!(joe_in(&w.session("patient-lookup", "find_patient").await, "deid_patient_lookup").await, before);

    // One scope's epoch is older than `every`: the next pass rotates it.
    admin
        .batch_execute("UPDATE mcpw_deid.scopes SET since = now() - interval '2 hours' WHERE scope = 'patient_lookup'")
        .await
        .unwrap();
    assert!(w.broker.sync().await.is_empty());
    let s = w.session("patient-lookup", "find_patient").await;
    let after = joe_in(&s, "deid_patient_lookup").await;
    assert!(is_pseudonym(&after) && after != before, "{before} {after}");
    // The old pseudonym finds nothing in the view, but resolves through the
    // aliases while the grace period lasts.
    assert!(
        probe(&s, &format!("SELECT 1 FROM deid_patient_lookup.patients WHERE id = '{before}'"))
            .await
            .unwrap()
            .is_empty()
    );
    let alias =
        format!("SELECT entity, current FROM deid_patient_lookup.pseudonym_aliases WHERE previous = '{before}'");
    assert_eq!(probe(&s, &alias).await.unwrap(), [[Some("patient".to_string()), Some(after.clone())]]);
    // The other scope did not rotate.
    let research = w.session("research", "cohort").await;
    assert_eq!(probe(&research, "SELECT id FROM deid_research.patients ORDER BY id").await.unwrap(), research_ids);
    // Re-identification still knows the old pseudonym (the mapping keeps
    // every epoch for it), with its epoch.
    let who =
        mcp_warden::broker::reidentify::Requester { name: "privacy".into(), issuer: "test".into(), groups: vec![] };
    let old = w.broker.reidentify(&reidentify_request(&before), &who, true).await.unwrap();
    let new = w.broker.reidentify(&reidentify_request(&after), &who, true).await.unwrap();
    assert_eq!((old.key.as_str(), old.epoch, new.key.as_str(), new.epoch), ("1", 1, "1", 2));
    // A second pass does not rotate again.
    assert!(w.broker.sync().await.is_empty());
    assert_eq!(joe_in(&w.session("patient-lookup", "find_patient").await, "deid_patient_lookup").await, after);

    // After the grace period the old pseudonym resolves no more.
    admin
        .batch_execute(
            "UPDATE mcpw_deid.scopes SET previous_until = now() - interval '1 second' WHERE scope = 'patient_lookup'",
        )
        .await
        .unwrap();
    assert!(probe(&s, &alias).await.unwrap().is_empty());
}

/// Two systems of one hospital: the EHR and the lab, each its own database,
/// both knowing patients by the enterprise patient index (EMPI).
fn linkage_manifests(port: u16) -> String {
    let store = |name: &str, database: &str, table: &str, clear: &str| {
        format!(
            r#"apiVersion: mcpwarden.io/v1alpha1
kind: PHIStore
metadata: {{name: {name}, namespace: clinic}}
spec:
  postgres: {{host: 127.0.0.1, port: {port}, database: {database}, adminSecretRef: {{name: ehr-db-admin}}, sslMode: disable}}
  endpoints: {{ipBlocks: [{{cidr: 127.0.0.1/32}}], ports: [{port}]}}
  deidentification:
    entities: [{{name: patient, prefix: pt, key: {{table: {table}, column: empi}}, linkage: empi}}]
    tables:
      - name: {table}
        columns: [{{name: empi, class: Identifier, entity: patient}}, {{name: {clear}, class: Clear}}]
---
"#
        )
    };
    format!(
        r#"{keys}{ehr}{lab}apiVersion: mcpwarden.io/v1alpha1
kind: MCPServer
metadata: {{name: care, namespace: clinic}}
spec:
  image: registry.example/phi-tools:1.4
  authentication:
    oidc: {{issuer: "{ISSUER}", audience: "{AUDIENCE}", jwksConfigMapRef: {{name: idp-jwks}}}}
  tools:
    - name: diagnoses
      phi: true
      purpose: linkage test
      allowedCallers: {{groups: [front-desk]}}
      dataAccess: [{{store: ehr, tables: [{{name: clinical.patients, columns: [empi, diagnosis], privileges: [SELECT]}}]}}]
    - name: results
      phi: true
      purpose: linkage test
      allowedCallers: {{groups: [front-desk]}}
      dataAccess: [{{store: lab, tables: [{{name: lab.results, columns: [empi, test], privileges: [SELECT]}}]}}]
"#,
        ehr = store("ehr", "ehr", "clinical.patients", "diagnosis"),
        lab = store("lab", "lab", "lab.results", "test"),
        keys = secret_and_keys(ADMIN_PASSWORD),
    )
}

#[tokio::test]
async fn stores_sharing_a_linkage_id_agree_on_pseudonyms_in_one_scope() {
    let pg = Postgres::start().await;
    prepare_database(&pg).await;
    let ehr = pg.superuser("ehr").await;
    ehr.batch_execute(
        "SET ROLE ehr_owner;
         ALTER TABLE clinical.patients ADD COLUMN empi text;
         UPDATE clinical.patients SET empi = 'E-100' WHERE id = 1;
         INSERT INTO clinical.patients (id, mrn, name, diagnosis, empi) VALUES (2, 'MRN-0002', 'Ada Quill', 'asthma', 'E-200');
         RESET ROLE;",
    )
    .await
    .unwrap();
    let root = pg.superuser("postgres").await;
    root.batch_execute("CREATE DATABASE lab OWNER ehr_owner").await.unwrap();
    let lab = pg.superuser("lab").await;
    lab.batch_execute(
        "GRANT CONNECT, CREATE ON DATABASE lab TO warden_admin WITH GRANT OPTION;
         CREATE SCHEMA lab AUTHORIZATION ehr_owner;
         SET ROLE ehr_owner;
         CREATE TABLE lab.results (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, empi text, test text, value text);
         INSERT INTO lab.results (empi, test, value) VALUES ('E-100', 'hba1c', '6.1'), ('E-100', 'ldl', '130'), ('E-300', 'tsh', '2.0');
         RESET ROLE;
         GRANT USAGE ON SCHEMA lab TO warden_admin WITH GRANT OPTION;
         GRANT SELECT, TRIGGER ON lab.results TO warden_admin;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests_dir).unwrap();
    std::fs::write(manifests_dir.join("care.yaml"), linkage_manifests(pg.port)).unwrap();
    let inventory = Inventory::from_manifests(&manifests_dir).unwrap();
    let trail = Trail::new(dir.path().join("audit"), None, mcp_warden::broker::trail::BROKER_STREAM).unwrap();
    let settings = Settings { max_ttl: None, connection_limit: 4, ..Default::default() };
    let broker = Arc::new(Broker::new(inventory, trail, settings, BrokerMetrics::register(&mut Registry::default())));
    let problems = broker.sync().await;
    assert!(problems.is_empty(), "{problems:?}");
    let session = async |tool: &str, store: &str, database: &str| {
        let credential = broker
            .issue(&CredentialRequest {
                server: "clinic/care".into(),
                tool: tool.into(),
                store: store.into(),
                caller_token: rs256(&claims("alice", &["front-desk"])),
                correlation: None,
            })
            .await
            .unwrap();
        pg.connect(database, &credential.role, &credential.password).await.unwrap()
    };
    let ehr_session = session("diagnoses", "ehr", "ehr").await;
    let lab_session = session("results", "lab", "lab").await;
    let joe = probe(&ehr_session, "SELECT empi FROM deid_care.patients WHERE diagnosis = 'influenza'").await.unwrap()
        [0][0]
        .clone()
        .unwrap();
    // The lab's results of the same EMPI carry the same pseudonym: the
    // model can join what two systems say about one patient.
    let results = probe(&lab_session, "SELECT empi, test FROM deid_care.results ORDER BY test").await.unwrap();
    let of_joe: Vec<&str> =
        results.iter().filter(|r| r[0].as_deref() == Some(joe.as_str())).map(|r| r[1].as_deref().unwrap()).collect();
    assert_eq!(of_joe, ["hba1c", "ldl"], "{results:?}");
    for row in &results {
        assert!(row[0].as_deref().is_some_and(is_pseudonym), "{row:?}");
    }

    // A result written for a patient the EHR knows: the lab draws a local
    // token at once, and the next pass makes it the EHR's.
    lab.batch_execute(
        "SET ROLE ehr_owner; INSERT INTO lab.results (empi, test, value) VALUES ('E-200', 'fev1', '80%'); RESET ROLE",
    )
    .await
    .unwrap();
    assert!(broker.sync().await.is_empty());
    let ada = probe(&ehr_session, "SELECT empi FROM deid_care.patients WHERE diagnosis = 'asthma'").await.unwrap()[0]
        [0]
    .clone()
    .unwrap();
    let fev1 = probe(&lab_session, "SELECT empi FROM deid_care.results WHERE test = 'fev1'").await.unwrap();
    assert_eq!(fev1[0][0].as_deref(), Some(ada.as_str()));
    // Both mappings hold the same pairs now, and a further pass writes
    // nothing (the tokens stay).
    let pairs = async |client: &Client| -> BTreeSet<(String, String)> {
        client
            .query("SELECT key, token FROM mcpw_deid.map_patient WHERE scope = 'care'", &[])
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let (in_ehr, in_lab) = (pairs(&ehr).await, pairs(&lab).await);
    assert_eq!(in_ehr, in_lab);
    assert_eq!(in_ehr.len(), 3, "E-100, E-200 and E-300: {in_ehr:?}");
    assert!(broker.sync().await.is_empty());
    assert_eq!(pairs(&ehr).await, in_ehr);
    // A database error that quotes a value (a key that does not cast) is
    // reported by its SQLSTATE only: store errors reach status and logs.
    let error = ehr.query("SELECT CAST('E-100' AS integer)", &[]).await.unwrap_err();
    let quoted = error.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(quoted.contains("E-100"), "PostgreSQL quotes the value: {quoted}");
    let reported = mcp_warden::broker::store::StoreError::from(error).to_string();
    assert!(!reported.contains("E-100") && reported.contains("22P02"), "{reported}");
    broker.close().await;
}
