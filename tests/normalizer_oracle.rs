//! PostgreSQL 15 as the oracle for what the statement normalizer must
//! remove. The fuzz target `statement_literals` plants canaries in
//! fragments that are literals by construction; here the seed corpus
//! (tests/fixtures/literal_seeds.sql) is run on a private PostgreSQL with
//! `pg_stat_statements`, whose normalized text replaces every constant the
//! server's own parser found with `$n`. A marker PostgreSQL replaced is a
//! value; the normalizer must not keep it. Markers in comments PostgreSQL
//! keeps (they are not constants), and the normalizer must drop them (free
//! text). The seeds themselves are checked too: a marker written as a
//! literal that PostgreSQL does not call one fails the test, so the corpus
//! cannot claim a form it does not hold.

mod common;
mod pg;

use std::collections::BTreeSet;

use mcp_warden::dbproxy::normalize::normalize;
use pg::Postgres;
use regex::Regex;

/// What a seed block claims of its markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// In constants: PostgreSQL replaces them, the normalizer removes them.
    Literal,
    /// In comments: PostgreSQL keeps them, the normalizer drops them.
    Comment,
    /// Names to PostgreSQL 15: it keeps them; the normalizer may do either.
    Name,
    /// In a statement PostgreSQL 15 refuses; the normalizer removes them
    /// (a refused statement is recorded too).
    Refused,
}

#[derive(Debug)]
struct Seed {
    claim: Claim,
    what: String,
    sql: String,
}

/// The seed file's blocks: a header line (`-- literal: …`, `-- comment: …`,
/// `-- name: …`, `-- refused: …`) and the SQL up to the next header. Lines before the first
/// header are the file's own comments.
fn parse_seeds(text: &str) -> Vec<Seed> {
    let mut seeds: Vec<Seed> = Vec::new();
    for line in text.lines() {
        let header = [
            ("-- literal: ", Claim::Literal),
            ("-- comment: ", Claim::Comment),
            ("-- name: ", Claim::Name),
            ("-- refused: ", Claim::Refused),
        ]
        .into_iter()
        .find_map(|(prefix, claim)| line.strip_prefix(prefix).map(|what| (claim, what)));
        match (header, seeds.last_mut()) {
            (Some((claim, what)), _) => seeds.push(Seed { claim, what: what.to_string(), sql: String::new() }),
            (None, Some(seed)) => {
                seed.sql.push_str(line);
                seed.sql.push('\n');
            }
            (None, None) => {}
        }
    }
    for seed in &mut seeds {
        seed.sql = seed.sql.trim().to_string();
    }
    seeds
}

/// The markers a text holds (see the seed file's header).
fn markers(text: &str) -> Vec<String> {
    let marker = Regex::new(r"7331(?:-\d\d-\d\d|\d\d)|1110010100111").expect("marker pattern");
    marker.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

const TABLES: &str =
    "CREATE TABLE patients (id int PRIMARY KEY, mrn text, name text, dob date, note text, score numeric)";

#[test]
fn the_seed_file_parses_into_blocks_with_unique_markers() {
    let seeds = parse_seeds(include_str!("fixtures/literal_seeds.sql"));
    assert!(seeds.len() >= 25, "{} seeds", seeds.len());
    for claim in [Claim::Literal, Claim::Comment, Claim::Name, Claim::Refused] {
        assert!(seeds.iter().any(|s| s.claim == claim), "no {claim:?} seed");
    }
    for seed in &seeds {
        let found = markers(&seed.sql);
        assert!(!found.is_empty(), "seed {:?} has no marker", seed.what);
        let unique: BTreeSet<&String> = found.iter().collect();
        assert_eq!(unique.len(), found.len(), "seed {:?} repeats a marker", seed.what);
    }
}

#[tokio::test]
async fn every_constant_postgres_finds_in_the_seed_corpus_is_removed_by_the_normalizer() {
    let pg = Postgres::start_with_settings(&[
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track_utility=off",
    ])
    .await;
    let root = pg.superuser("postgres").await;
    root.batch_execute("CREATE DATABASE oracle").await.expect("database");
    root.batch_execute("CREATE EXTENSION pg_stat_statements").await.expect(
        "pg_stat_statements (PostgreSQL's contrib, in Debian's postgresql package) is needed as the oracle here",
    );
    let oracle = pg.superuser("oracle").await;
    oracle.batch_execute(TABLES).await.expect("tables");

    let seeds = parse_seeds(include_str!("fixtures/literal_seeds.sql"));
    let mut failures = Vec::new();
    for seed in &seeds {
        root.batch_execute("SELECT pg_stat_statements_reset()").await.expect("reset");
        oracle.batch_execute("BEGIN").await.expect("begin");
        let ran = oracle.simple_query(&seed.sql).await;
        oracle.batch_execute("ROLLBACK").await.expect("rollback");
        let ours = normalize(&seed.sql).text;
        match (ran, seed.claim) {
            (Err(_), Claim::Refused) => {
                let kept: Vec<String> = markers(&seed.sql).into_iter().filter(|m| ours.contains(m)).collect();
                if !kept.is_empty() {
                    failures.push(format!("{:?}: the normalizer kept {kept:?}: {ours:?}", seed.what));
                }
                continue;
            }
            (Ok(_), Claim::Refused) => {
                failures.push(format!("{:?}: PostgreSQL ran a seed said to be refused", seed.what));
                continue;
            }
            (Err(e), _) => {
                let why = e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_string());
                failures.push(format!("{:?}: PostgreSQL refused the seed: {why}", seed.what));
                continue;
            }
            (Ok(_), _) => {}
        }
        let judged: Vec<String> = root
            .query(
                "SELECT query FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'oracle') ORDER BY query",
                &[],
            )
            .await
            .expect("pg_stat_statements")
            .iter()
            .map(|row| row.get(0))
            .collect();
        if judged.is_empty() {
            failures.push(format!("{:?}: PostgreSQL recorded no statement", seed.what));
            continue;
        }
        let postgres_kept = judged.join("\n");
        for marker in markers(&seed.sql) {
            let kept_by_postgres = postgres_kept.contains(&marker);
            let kept_by_us = ours.contains(&marker);
            let wrong = match seed.claim {
                Claim::Literal if kept_by_postgres => {
                    Some(format!("PostgreSQL does not call {marker} a constant (its text: {postgres_kept:?})"))
                }
                Claim::Literal | Claim::Comment if kept_by_us => {
                    Some(format!("the normalizer kept {marker}: {ours:?} (PostgreSQL: {postgres_kept:?})"))
                }
                Claim::Comment | Claim::Name if !kept_by_postgres => {
                    Some(format!("PostgreSQL took {marker} for a constant (its text: {postgres_kept:?})"))
                }
                _ => None,
            };
            if let Some(wrong) = wrong {
                failures.push(format!("{:?}: {wrong}", seed.what));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} seeds:\n{}", failures.len(), seeds.len(), failures.join("\n"));
}
