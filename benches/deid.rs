//! What de-identification costs in the database: the same queries as a
//! tool's per-call role would run them, on the table with plain column
//! grants (an `Identified` tool) and on the de-identified view (pseudonyms
//! joined from the mapping, a generalized birth year), side by side in one
//! run with `pgbench`, alternating the order; medians and their spread.
//!
//! Queries: a point lookup by the patient's key (a pseudonym on the view,
//! the real id on the table) and a 50-row list by a clear column (every
//! row with its pseudonym). 10,000 patients. The target (#15): the
//! de-identified path at most 20% slower. The view reads the table's
//! pseudonymized copy, kept by triggers; what those cost the application's
//! writes is the last line: an insert into a copy of the table without
//! triggers against one into the classified table.
//!
//! `cargo bench --bench deid`; MCPW_BENCH_SECONDS (5) per run,
//! MCPW_BENCH_ROUNDS (3); MCPW_BENCH_EXPLAIN=1 prints the view queries'
//! plans first.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/pg/mod.rs"]
mod pg;
mod support;

use std::sync::Arc;

use mcp_warden::broker::inventory::Inventory;
use mcp_warden::broker::issuer::{Broker, CredentialRequest, Settings};
use mcp_warden::broker::metrics::BrokerMetrics;
use mcp_warden::broker::trail::Trail;
use prometheus_client::registry::Registry;
use support::{env_number, machine, median, spread};

const PATIENTS: u32 = 10_000;

const TOOLS: &str = r#"
    - name: plain
      phi: true
      purpose: benchmark, table with column grants
      allowedCallers: {groups: [front-desk]}
      output: Identified
      identifiedReason: the baseline of the de-identification benchmark
      dataAccess:
        - store: ehr
          tables: [{name: clinical.patients, columns: [id, dob, diagnosis], privileges: [SELECT]}]
    - name: deid
      phi: true
      purpose: benchmark, de-identified view
      allowedCallers: {groups: [front-desk]}
      dataAccess:
        - store: ehr
          tables: [{name: clinical.patients, columns: [id, dob, diagnosis], privileges: [SELECT]}]"#;

/// tps of one pgbench run of `script` as `user`.
fn pgbench(port: u16, (user, password): (&str, &str), script: &std::path::Path, clients: u32, seconds: u64) -> f64 {
    let out = std::process::Command::new(pg::bin_dir().join("pgbench"))
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", user, "-f"])
        .arg(script)
        .args(["-c", &clients.to_string(), "-j", &clients.min(2).to_string(), "-T", &seconds.to_string()])
        // The database by position: pgbench's `-d` is `--debug`.
        .arg("ehr")
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
}

fn main() {
    let seconds = env_number("MCPW_BENCH_SECONDS", 5u64);
    let rounds = env_number("MCPW_BENCH_ROUNDS", 3usize);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let pg = pg::Postgres::start().await;
        pg.without_statement_log().await;
        pg::clinic::prepare_database(&pg).await;
        let ehr = pg.superuser("ehr").await;
        ehr.batch_execute(&format!(
            "SET ROLE ehr_owner;
             INSERT INTO clinical.patients (id, mrn, name, dob, ssn, diagnosis)
               SELECT g, 'MRN-' || lpad(g::text, 6, '0'), 'Patient ' || g, date '1930-01-01' + (g * 3),
                      lpad(g::text, 3, '0') || '-00-0000', 'dx' || (g % 20 + 1)
                 FROM generate_series(2, {PATIENTS}) g;
             RESET ROLE;
             ANALYZE clinical.patients;"
        ))
        .await
        .expect("patients");

        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("dir");
        let text = pg::clinic::server_manifests(pg.port, pg::clinic::ADMIN_PASSWORD, TOOLS);
        std::fs::write(manifests.join("clinic.yaml"), text).expect("manifest");
        let inventory = Inventory::from_manifests(&manifests).expect("inventory");
        let trail = Trail::new(dir.path().join("audit"), None, mcp_warden::broker::trail::BROKER_STREAM).expect("trail");
        let settings = Settings { max_ttl: None, connection_limit: 16, ..Default::default() };
        let broker = Arc::new(Broker::new(inventory, trail, settings, BrokerMetrics::register(&mut Registry::default())));
        assert!(broker.sync().await.is_empty());
        let issue = async |tool: &str| {
            broker
                .issue(&CredentialRequest {
                    server: pg::clinic::SERVER.into(),
                    tool: tool.into(),
                    store: "ehr".into(),
                    caller_token: common::rs256(&common::claims("bench", &["front-desk"])),
                    correlation: None,
                })
                .await
                .expect("credential")
        };
        let (plain, deid) = (issue("plain").await, issue("deid").await);
        // Which key to ask for comes from a side table both roles may read
        // (the benchmark's own; tools get pseudonyms from earlier answers).
        ehr.batch_execute(&format!(
            "CREATE SCHEMA bench;
             CREATE TABLE bench.keys (n int PRIMARY KEY, id int, token text);
             INSERT INTO bench.keys SELECT row_number() OVER (ORDER BY key), key, token
               FROM mcpw_deid.map_patient WHERE scope = '{scope}';
             GRANT USAGE ON SCHEMA bench TO \"{p}\", \"{d}\";
             GRANT SELECT ON bench.keys TO \"{p}\", \"{d}\";
             ANALYZE bench.keys;",
            scope = mcp_warden::deid::default_scope("patient-lookup"),
            p = plain.role,
            d = deid.role,
        ))
        .await
        .expect("keys");
        let views = pg::clinic::VIEWS;
        let scripts = [
            (
                "point lookup by key",
                format!("\\set n random(1, {PATIENTS})\nSELECT id, dob, diagnosis FROM clinical.patients WHERE id = (SELECT id FROM bench.keys WHERE n = :n);\n"),
                format!("\\set n random(1, {PATIENTS})\nSELECT id, dob, diagnosis FROM {views}.patients WHERE id = (SELECT token FROM bench.keys WHERE n = :n);\n"),
            ),
            (
                "50 rows by diagnosis",
                "\\set d random(1, 20)\nSELECT id, dob FROM clinical.patients WHERE diagnosis = 'dx' || :d LIMIT 50;\n".to_string(),
                format!("\\set d random(1, 20)\nSELECT id, dob FROM {views}.patients WHERE diagnosis = 'dx' || :d LIMIT 50;\n"),
            ),
        ];
        // The application's write, as the table's owner would make it.
        ehr.batch_execute(
            "CREATE SEQUENCE bench.ids START 1000000;
             CREATE TABLE bench.patients (LIKE clinical.patients INCLUDING ALL);",
        )
        .await
        .expect("write baseline");
        let insert = |table: &str| {
            format!(
                "INSERT INTO {table} (id, mrn, name, dob, ssn, diagnosis) \
                 VALUES (nextval('bench.ids'), 'MRN-x', 'Written Patient', '1980-01-01', '000-00-0000', 'written');\n"
            )
        };
        let superuser = ("postgres", pg::SUPERUSER_PASSWORD);
        if std::env::var_os("MCPW_BENCH_EXPLAIN").is_some() {
            let session = pg.connect("ehr", &deid.role, &deid.password).await.expect("login");
            for sql in [
                format!("EXPLAIN ANALYZE SELECT id, dob FROM {views}.patients WHERE diagnosis = 'dx3' LIMIT 50"),
                format!("EXPLAIN ANALYZE SELECT id, dob, diagnosis FROM {views}.patients WHERE id = (SELECT token FROM bench.keys WHERE n = 77)"),
            ] {
                for row in session.simple_query(&sql).await.expect("explain") {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = row {
                        println!("{}", r.get(0).unwrap_or_default());
                    }
                }
            }
        }
        println!("{}", machine());
        println!(
            "pgbench -M prepared, {PATIENTS} patients, {seconds} s per run, {rounds} rounds alternating the order; median tps (spread)"
        );
        println!("| query | clients | table, column grants | de-identified view | view ÷ table |");
        println!("|---|---|---|---|---|");
        for (name, table_sql, view_sql) in &scripts {
            let table_script = dir.path().join("table.sql");
            let view_script = dir.path().join("view.sql");
            std::fs::write(&table_script, table_sql).expect("script");
            std::fs::write(&view_script, view_sql).expect("script");
            for clients in [1, 10] {
                let mut tps = [Vec::new(), Vec::new()];
                for round in 0..rounds {
                    let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                    for i in order {
                        let (credential, script) = if i == 0 { (&plain, &table_script) } else { (&deid, &view_script) };
                        let user = (credential.role.as_str(), credential.password.as_str());
                        let run = tokio::task::block_in_place(|| pgbench(pg.port, user, script, clients, seconds));
                        tps[i].push(run);
                    }
                }
                let ratio = median(&tps[1]) / median(&tps[0]);
                println!(
                    "| {name} | {clients} | {:.0} ({}) | {:.0} ({}) | {ratio:.2}× |",
                    median(&tps[0]),
                    spread(&tps[0], 0),
                    median(&tps[1]),
                    spread(&tps[1], 0)
                );
            }
        }
        println!();
        println!("| the application's write | clients | table without triggers | classified table (token trigger + copy) | ratio |");
        println!("|---|---|---|---|---|");
        let plain_insert = dir.path().join("insert-plain.sql");
        let copied_insert = dir.path().join("insert-copied.sql");
        std::fs::write(&plain_insert, insert("bench.patients")).expect("script");
        std::fs::write(&copied_insert, insert("clinical.patients")).expect("script");
        for clients in [1, 10] {
            let mut tps = [Vec::new(), Vec::new()];
            for round in 0..rounds {
                let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let script = if i == 0 { &plain_insert } else { &copied_insert };
                    tps[i].push(tokio::task::block_in_place(|| pgbench(pg.port, superuser, script, clients, seconds)));
                }
            }
            println!(
                "| insert a patient | {clients} | {:.0} ({}) | {:.0} ({}) | {:.2}× |",
                median(&tps[0]),
                spread(&tps[0], 0),
                median(&tps[1]),
                spread(&tps[1], 0),
                median(&tps[1]) / median(&tps[0])
            );
        }
        broker.close().await;
    });
}
