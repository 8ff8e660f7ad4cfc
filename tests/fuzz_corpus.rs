//! Every input the fuzzers ever kept (`fuzz/corpus/<target>/`, minimised,
//! committed) replayed through the same harness bodies the fuzz targets
//! run (`src/fuzzing.rs`), on stable: a regression any of them found stays
//! found (docs/fuzzing.md).

use std::path::PathBuf;

type Harness = fn(&[u8]);

const TARGETS: [(&str, Harness); 10] = [
    ("dbproxy_first_packet", mcp_warden::fuzzing::dbproxy_first_packet),
    ("statement_literals", mcp_warden::fuzzing::statement_literals),
    ("audit_record_line", mcp_warden::fuzzing::audit_record_line),
    ("gateway_messages", mcp_warden::fuzzing::gateway_messages),
    ("argument_rules", mcp_warden::fuzzing::argument_rules),
    ("bearer_token", mcp_warden::fuzzing::bearer_token),
    ("gateway_authorization", mcp_warden::fuzzing::gateway_authorization),
    ("dbproxy_conversation", mcp_warden::fuzzing::dbproxy_conversation),
    ("collector_batches", mcp_warden::fuzzing::collector_batches),
    ("broker_bodies", mcp_warden::fuzzing::broker_bodies),
];

#[test]
fn every_committed_fuzz_input_still_holds_its_property() {
    for (target, harness) in TARGETS {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{target}: no corpus");
        for input in inputs {
            let data = std::fs::read(&input).expect("input");
            let outcome = std::panic::catch_unwind(|| harness(&data));
            assert!(outcome.is_ok(), "{target}: {} breaks its property", input.display());
        }
    }
}

#[test]
fn every_fuzz_target_has_a_harness_and_a_corpus() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/Cargo.toml")).expect("fuzz crate");
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "mcp-warden-fuzz")
        .collect();
    let replayed: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
    assert_eq!(declared, replayed, "fuzz/Cargo.toml and this replay name the same targets");
}
