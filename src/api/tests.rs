//! The CRDs: their shape, their freshness on disk, and every validation
//! rule, exercised through the same admission `check` uses.

use kube::CustomResourceExt;
use kube::core::cel::{ScopeContext, analyze_rule, compile_schema};
use serde_json::{Value, json};

use super::*;
use crate::fixtures::{admit_server, clinic_values, refusals, remove, set};
use crate::manifest;

fn server_refusals(value: Value) -> Vec<String> {
    refusals(admit_server(&value))
}

fn store_refusals(value: Value) -> Vec<String> {
    refusals(manifest::admit::<PHIStore>(&value))
}

/// Asserts the value is refused with a message containing `needle`.
#[track_caller]
fn assert_refused(messages: Vec<String>, needle: &str) {
    assert!(messages.iter().any(|m| m.contains(needle)), "expected a refusal containing {needle:?}, got {messages:#?}");
}

fn server() -> Value {
    clinic_values().1
}

fn store() -> Value {
    clinic_values().0
}

#[test]
fn committed_crds_are_fresh() {
    let committed = include_str!("../../crds/mcpwarden.io.yaml");
    let generated = crds_yaml().expect("CRDs serialize");
    assert!(committed == generated, "crds/mcpwarden.io.yaml is stale: run `cargo run -- crd > crds/mcpwarden.io.yaml`");
}

#[test]
fn mcpserver_crd_names_columns_and_status() {
    let crd = MCPServer::crd();
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.scope, "Namespaced");
    let names = &crd.spec.names;
    assert_eq!(names.short_names.as_deref(), Some(&["mcpw".to_string(), "wmcp".to_string()][..]));
    assert_eq!(names.categories.as_deref(), Some(&["mcpwarden".to_string()][..]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, VERSION);
    let columns: Vec<(&str, &str)> =
        version.additional_printer_columns.iter().flatten().map(|c| (c.name.as_str(), c.json_path.as_str())).collect();
    assert_eq!(
        columns,
        [
            ("Ready", r#".status.conditions[?(@.type=="Ready")].status"#),
            ("Compliant", r#".status.conditions[?(@.type=="Compliant")].status"#),
            ("PHI tools", ".status.counts.phiTools"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
    assert!(version.subresources.as_ref().is_some_and(|s| s.status.is_some()));
    let schema = schema_of::<MCPServer>();
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    let tools = &schema["properties"]["spec"]["properties"]["tools"];
    assert_eq!(tools["x-kubernetes-list-type"], "map");
    assert_eq!(tools["x-kubernetes-list-map-keys"], json!(["name"]));
}

fn schema_of<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()))
        .expect("schema serializes")
}

/// Every CEL rule compiles, uses only CRD-scope variables and passes
/// kube-cel's cost analysis. The API server also multiplies each rule's cost
/// by how often it can run (the product of the enclosing lists' maxItems)
/// and caps the CRD's total; so every enclosing list is bounded, every list
/// a rule iterates is bounded, evaluations × iterations stay within 10^6 per
/// rule, and regular expressions run only outside lists.
#[test]
fn every_cel_rule_compiles_and_is_bounded() {
    for schema in [schema_of::<MCPServer>(), schema_of::<PHIStore>()] {
        let compiled = compile_schema(&schema);
        assert!(compiled.compilation_errors().is_empty(), "{:?}", compiled.compilation_errors());
        let mut rules = 0;
        walk_rules(&schema, "", Some(1), &mut |path, node, rule, cardinality| {
            rules += 1;
            let cardinality =
                cardinality.unwrap_or_else(|| panic!("rule {rule:?} at {path} sits under a list without maxItems"));
            // kube-cel's scope check does not know comprehension variables
            // (`all(t, ...)`), so those reports are dropped; all else counts.
            let bound = comprehension_variables(rule);
            let warnings: Vec<_> = analyze_rule(rule, &compile_schema(node), ScopeContext::CrdValidation)
                .into_iter()
                .filter(|w| !bound.iter().any(|v| w.message.contains(&format!("variable '{v}' is not available"))))
                .collect();
            assert!(warnings.is_empty(), "rule {rule:?} at {path}: {warnings:?}");
            let iterations = iterated_list_sizes(node, rule)
                .into_iter()
                .map(|size| size.unwrap_or_else(|| panic!("rule {rule:?} at {path} iterates an unbounded list")))
                .sum::<u64>()
                .max(1);
            assert!(
                cardinality * iterations <= 1_000_000,
                "rule {rule:?} at {path}: {cardinality} evaluations x {iterations} iterations"
            );
            if rule.contains("matches(") {
                assert_eq!(cardinality, 1, "rule {rule:?} at {path} runs a regex inside a list");
            }
        });
        assert!(rules > 0);
    }
}

/// Sizes (maxItems) of the lists a rule iterates: `self` when the node is a
/// list, and `self.<field>` for list fields.
fn iterated_list_sizes(node: &Value, rule: &str) -> Vec<Option<u64>> {
    let max_items = |n: &Value| n.get("maxItems").and_then(Value::as_u64);
    let iterates = |target: &str| {
        ["all(", "exists(", "exists_one(", "map(", "filter("].iter().any(|m| rule.contains(&format!("{target}.{m}")))
    };
    let mut sizes = Vec::new();
    if node.get("type").and_then(Value::as_str) == Some("array") && iterates("self") {
        sizes.push(max_items(node));
    }
    for (name, prop) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
        if prop.get("type").and_then(Value::as_str) == Some("array") && iterates(&format!("self.{name}")) {
            sizes.push(max_items(prop));
        }
    }
    sizes
}

fn comprehension_variables(rule: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b(?:all|exists|exists_one|map|filter)\((\w+),").expect("regex");
    re.captures_iter(rule).map(|c| c[1].to_string()).collect()
}

/// Visits every rule with the number of times the API server may evaluate
/// it (None: under an unbounded list).
/// Called with (path, schema node, rule, cardinality).
type RuleVisitor<'a> = dyn FnMut(&str, &Value, &str, Option<u64>) + 'a;

fn walk_rules(node: &Value, path: &str, cardinality: Option<u64>, f: &mut RuleVisitor<'_>) {
    for rule in node.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
        f(path, node, rule["rule"].as_str().unwrap_or_default(), cardinality);
    }
    for (name, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
        walk_rules(child, &format!("{path}.{name}"), cardinality, f);
    }
    if let Some(items) = node.get("items") {
        let below = cardinality.zip(node.get("maxItems").and_then(Value::as_u64)).map(|(c, m)| c * m);
        walk_rules(items, &format!("{path}[]"), below, f);
    }
}

#[test]
fn the_examples_are_admitted() {
    assert_eq!(server_refusals(server()), Vec::<String>::new());
    assert_eq!(store_refusals(store()), Vec::<String>::new());
}

#[test]
fn defaults_are_applied() {
    let minimal = json!({
        "apiVersion": API_VERSION, "kind": "MCPServer", "metadata": {"name": "m", "namespace": "n"},
        "spec": {"image": "i", "authentication": {"oidc": {"issuer": "https://a.example", "audience": "https://b.example/mcp", "jwksUri": "https://a.example/jwks"}}}
    });
    let admitted = admit_server(&minimal).expect("minimal server admitted");
    assert_eq!(admitted.spec.port, 8080);
    assert_eq!(admitted.spec.path, "/mcp");
    assert_eq!(admitted.spec.replicas, 1);
    assert_eq!(admitted.spec.credentials.ttl, "15m");
    assert_eq!(admitted.spec.audit.failure_policy, FailurePolicy::Closed);
    assert_eq!(admitted.spec.authentication.oidc.groups_claim, "groups");
    assert!(admitted.spec.tools.is_empty());
}

#[test]
fn tool_names_are_unique() {
    let tool = server()["spec"]["tools"][1].clone();
    assert_refused(
        server_refusals(set(server(), "/spec/tools/2", tool)),
        r#"spec.tools[2]: duplicate entry with name="clinic_hours""#,
    );
}

#[test]
fn a_phi_tool_states_its_purpose() {
    assert_refused(server_refusals(remove(server(), "/spec/tools/0/purpose")), "a PHI tool must state its purpose");
    assert_refused(
        server_refusals(set(server(), "/spec/tools/0/purpose", json!(""))),
        "a PHI tool must state its purpose",
    );
}

#[test]
fn any_authenticated_is_refused_on_a_phi_tool() {
    let v = set(server(), "/spec/tools/0/allowedCallers", json!({"anyAuthenticated": true}));
    assert_refused(server_refusals(v), "anyAuthenticated is refused on a PHI tool");
    // Combined with groups it is still refused.
    let v = set(server(), "/spec/tools/0/allowedCallers", json!({"groups": ["front-desk"], "anyAuthenticated": true}));
    assert_refused(server_refusals(v), "anyAuthenticated is refused on a PHI tool");
}

#[test]
fn allowed_callers_must_name_someone() {
    let v = set(server(), "/spec/tools/1/allowedCallers", json!({}));
    assert_refused(server_refusals(v), "allowedCallers names nobody");
    let v = set(server(), "/spec/tools/1/allowedCallers", json!({"groups": []}));
    assert_refused(server_refusals(v), "allowedCallers names nobody");
}

#[test]
fn star_and_non_identifier_columns_are_refused() {
    let cols = "/spec/tools/0/dataAccess/0/tables/0/columns";
    assert_refused(server_refusals(set(server(), cols, json!(["mrn", "*"]))), "'*' is refused");
    assert_refused(
        server_refusals(set(server(), cols, json!(["mrn; drop table x"]))),
        "columns[0]: must match the pattern",
    );
    assert_refused(server_refusals(set(server(), cols, json!(["1mrn"]))), "columns[0]: must match the pattern");
    assert_refused(server_refusals(set(server(), cols, json!([]))), "must have at least 1 item");
    assert_refused(server_refusals(set(server(), cols, json!(["mrn", "mrn"]))), "duplicate value");
}

#[test]
fn tables_are_schema_qualified_and_privileges_column_level() {
    let table = "/spec/tools/0/dataAccess/0/tables/0";
    assert_refused(
        server_refusals(set(server(), &format!("{table}/name"), json!("patients"))),
        "must match the pattern",
    );
    assert_refused(
        server_refusals(set(server(), &format!("{table}/privileges"), json!(["DELETE"]))),
        "unsupported value \"DELETE\"",
    );
    assert_refused(
        server_refusals(set(server(), &format!("{table}/privileges"), json!(["TRUNCATE"]))),
        "unsupported value",
    );
}

#[test]
fn data_access_is_explicit() {
    assert_refused(
        server_refusals(remove(server(), "/spec/tools/1/noDataAccessReason")),
        "must say why in noDataAccessReason",
    );
    assert_refused(
        server_refusals(remove(server(), "/spec/tools/1/dataAccess")),
        "spec.tools[1].dataAccess: required field is missing",
    );
    let v = set(server(), "/spec/tools/0/noDataAccessReason", json!("none"));
    assert_refused(server_refusals(v), "noDataAccessReason is only for tools with empty dataAccess");
    // A tool reading a PHIStore is a PHI tool.
    let access = server()["spec"]["tools"][0]["dataAccess"].clone();
    let v = remove(set(server(), "/spec/tools/1/dataAccess", access), "/spec/tools/1/noDataAccessReason");
    assert_refused(server_refusals(v), "a tool that reads a PHIStore is a PHI tool");
}

#[test]
fn phi_must_be_declared() {
    assert_refused(
        server_refusals(remove(server(), "/spec/tools/1/phi")),
        "spec.tools[1].phi: required field is missing",
    );
}

#[test]
fn credential_ttl_is_capped_at_one_hour() {
    assert_eq!(server_refusals(set(server(), "/spec/credentials/ttl", json!("1h"))), Vec::<String>::new());
    assert_eq!(server_refusals(set(server(), "/spec/credentials/ttl", json!("59m60s"))), Vec::<String>::new());
    assert_refused(
        server_refusals(set(server(), "/spec/credentials/ttl", json!("61m"))),
        "credentials.ttl may be at most 1h",
    );
    assert_refused(
        server_refusals(set(server(), "/spec/credentials/ttl", json!("2h"))),
        "credentials.ttl may be at most 1h",
    );
    assert_refused(server_refusals(set(server(), "/spec/credentials/ttl", json!("30s"))), "at least 1m");
    assert_refused(server_refusals(set(server(), "/spec/credentials/ttl", json!("1d"))), "must match the pattern");
}

#[test]
fn fail_open_is_refused_while_anything_is_phi() {
    let open = set(server(), "/spec/audit/failurePolicy", json!("Open"));
    assert_refused(
        server_refusals(open.clone()),
        "audit.failurePolicy Open is refused while any tool or resource is PHI",
    );
    // Without PHI tools it is admitted (and fails audit-controls instead).
    // (The break-glass procedure names that tool: it goes too.)
    let no_phi = remove(remove(open, "/spec/tools/0"), "/spec/emergencyAccess");
    assert_eq!(server_refusals(no_phi.clone()), Vec::<String>::new());
    // A PHI resource counts as PHI too.
    let phi_resource = set(
        no_phi,
        "/spec/resources",
        json!([{"uriPrefix": "ehr://", "phi": true, "purpose": "charts", "allowedCallers": {"groups": ["nurses"]}}]),
    );
    assert_refused(server_refusals(phi_resource), "audit.failurePolicy Open is refused");
}

#[test]
fn port_may_not_collide_with_the_sidecar() {
    for port in [SIDECAR_PUBLIC_PORT, SIDECAR_METRICS_PORT, SIDECAR_PG_PROXY_PORT] {
        assert_refused(
            server_refusals(set(server(), "/spec/port", json!(port))),
            "port collides with a port of the mcp-warden sidecar",
        );
    }
    assert_refused(server_refusals(set(server(), "/spec/port", json!(70000))), "must be less than or equal to 65535");
    assert_eq!(server_refusals(set(server(), "/spec/port", json!(3000))), Vec::<String>::new());
}

#[test]
fn env_may_not_reference_secrets() {
    let secret = json!([{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]);
    assert_refused(server_refusals(set(server(), "/spec/env", secret)), "env may not reference Secrets");
    let config = json!([{"name": "LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}}}]);
    assert_eq!(server_refusals(set(server(), "/spec/env", config)), Vec::<String>::new());
    // envFrom is not part of the API at all.
    let env_from = set(server(), "/spec/envFrom", json!([{"secretRef": {"name": "db"}}]));
    assert_refused(server_refusals(env_from), "spec.envFrom: unknown field");
}

#[test]
fn exactly_one_jwks_source() {
    let oidc = "/spec/authentication/oidc";
    assert_refused(server_refusals(remove(server(), &format!("{oidc}/jwksUri"))), "set exactly one of jwksUri");
    let two = set(server(), &format!("{oidc}/jwksSecretRef"), json!({"name": "jwks"}));
    assert_refused(server_refusals(two), "set exactly one of jwksUri");
    let cm =
        set(remove(server(), &format!("{oidc}/jwksUri")), &format!("{oidc}/jwksConfigMapRef"), json!({"name": "jwks"}));
    assert_eq!(server_refusals(cm), Vec::<String>::new());
}

#[test]
fn issuer_and_audience_are_https() {
    let oidc = "/spec/authentication/oidc";
    assert_refused(
        server_refusals(set(server(), &format!("{oidc}/issuer"), json!("http://login.example.org"))),
        "must match the pattern",
    );
    assert_refused(
        server_refusals(set(server(), &format!("{oidc}/audience"), json!("patient-lookup"))),
        "must match the pattern",
    );
    assert_refused(
        server_refusals(remove(server(), "/spec/authentication")),
        "spec.authentication: required field is missing",
    );
}

#[test]
fn names_are_dns_labels_short_enough_for_suffixes() {
    let long = "a".repeat(53);
    assert_refused(server_refusals(set(server(), "/metadata/name", json!(long))), "at most 52 characters");
    assert_refused(server_refusals(set(server(), "/metadata/name", json!("Patient.Lookup"))), "must be a DNS label");
}

#[test]
fn bounds_are_enforced() {
    let many: Vec<Value> = (0..65)
        .map(|i| json!({"name": format!("t{i}"), "phi": false, "allowedCallers": {"anyAuthenticated": true}, "dataAccess": [], "noDataAccessReason": "x"}))
        .collect();
    assert_refused(server_refusals(set(server(), "/spec/tools", json!(many))), "must have at most 64 items");
    assert_refused(
        server_refusals(set(server(), "/spec/tools/0/purpose", json!("x".repeat(1025)))),
        "may not be longer than 1024",
    );
}

#[test]
fn phistore_endpoints_are_specific() {
    let ep = "/spec/endpoints";
    assert_refused(
        store_refusals(set(store(), &format!("{ep}/podSelector"), json!({}))),
        "podSelector must not be empty",
    );
    let ns_only = set(
        remove(store(), &format!("{ep}/podSelector")),
        &format!("{ep}/namespaceSelector"),
        json!({"matchLabels": {"a": "b"}}),
    );
    assert_refused(store_refusals(ns_only), "must select the store's pods");
    let ns_alone = set(
        set(
            remove(store(), &format!("{ep}/podSelector")),
            &format!("{ep}/namespaceSelector"),
            json!({"matchLabels": {"a": "b"}}),
        ),
        &format!("{ep}/ipBlocks"),
        json!([{"cidr": "10.0.0.1/32"}]),
    );
    assert_refused(store_refusals(ns_alone), "namespaceSelector must be paired with podSelector");
    let world = set(store(), &format!("{ep}/ipBlocks"), json!([{"cidr": "0.0.0.0/0"}]));
    assert_refused(store_refusals(world), "whole address space");
    assert_refused(store_refusals(set(store(), &format!("{ep}/ports"), json!([]))), "must have at least 1 item");
    assert_refused(
        store_refusals(remove(store(), "/spec/postgres/adminSecretRef")),
        "adminSecretRef: required field is missing",
    );
    assert_refused(store_refusals(set(store(), "/spec/postgres/sslMode", json!("verify_full"))), "unsupported value");
}

#[test]
fn counts_for_the_printer_columns() {
    let server = admit_server(&server()).expect("admitted");
    assert_eq!(server.spec.counts(), Counts { tools: 2, phi_tools: 1, resources: 0, prompts: 0, stores: 1 });
}

#[test]
fn output_defaults_to_deidentified_and_identified_needs_a_reason() {
    let admitted = admit_server(&server()).expect("admitted");
    assert_eq!(admitted.spec.tools[0].output, Output::Deidentified);
    let identified = set(server(), "/spec/tools/0/output", json!("Identified"));
    assert_refused(server_refusals(identified.clone()), "an Identified tool must say why in identifiedReason");
    let with_reason = set(identified, "/spec/tools/0/identifiedReason", json!("check-in compares the real identity"));
    assert!(server_refusals(with_reason).is_empty());
    let stray = set(server(), "/spec/tools/0/identifiedReason", json!("why not"));
    assert_refused(server_refusals(stray), "identifiedReason is only for Identified tools");
    assert_refused(server_refusals(set(server(), "/spec/tools/0/output", json!("Raw"))), "output");
}

#[test]
fn a_deidentified_tool_only_reads() {
    let privileges = "/spec/tools/0/dataAccess/0/tables/0/privileges";
    assert_refused(
        server_refusals(set(server(), privileges, json!(["SELECT", "UPDATE"]))),
        "a Deidentified tool reads pseudonymized views: SELECT only",
    );
    let identified = set(
        set(set(server(), privileges, json!(["SELECT", "UPDATE"])), "/spec/tools/0/output", json!("Identified")),
        "/spec/tools/0/identifiedReason",
        json!("corrects demographics at the front desk"),
    );
    assert!(server_refusals(identified).is_empty());
}

#[test]
fn pseudonym_scopes_are_plain_identifiers() {
    assert!(server_refusals(set(server(), "/spec/pseudonymScope", json!("clinic_shared"))).is_empty());
    for bad in ["Clinic", "1clinic", "clinic-shared", "a;drop", ""] {
        assert_refused(server_refusals(set(server(), "/spec/pseudonymScope", json!(bad))), "pseudonymScope");
    }
}

#[test]
fn column_classifications_carry_what_their_class_needs() {
    let column = "/spec/deidentification/tables/0/columns/0";
    let refused = |value: Value, needle: &str| assert_refused(store_refusals(set(store(), column, value)), needle);
    refused(json!({"name": "id", "class": "Identifier"}), "an Identifier column names the entity it identifies");
    refused(
        json!({"name": "id", "class": "Clear", "entity": "patient"}),
        "entity and keyColumn are only for Identifier",
    );
    refused(json!({"name": "dob", "class": "Quasi"}), "a Quasi column names its generalization");
    refused(json!({"name": "dob", "class": "Clear", "generalize": "Year"}), "generalize is only for Quasi columns");
    refused(
        json!({"name": "dob", "class": "Clear", "method": "ExpertDetermination"}),
        "Expert Determination names the determination document in reference",
    );
    refused(json!({"name": "dob", "class": "Secret"}), "class");
    refused(json!({"name": "dob", "class": "Quasi", "generalize": "Month"}), "generalize");
    let expert = json!({"name": "dob", "class": "Clear", "method": "ExpertDetermination", "reference": "ED-2026-04"});
    assert!(store_refusals(set(store(), column, expert)).is_empty());
    let prefix = "/spec/deidentification/entities/0/prefix";
    assert_refused(store_refusals(set(store(), prefix, json!("PT"))), "prefix");
    assert_refused(store_refusals(set(store(), prefix, json!("pt_x"))), "prefix");
}

#[test]
fn rotation_is_bounded_and_its_grace_within_it() {
    let rotation = "/spec/deidentification/rotation";
    assert!(store_refusals(set(store(), rotation, json!({"every": "2160h", "grace": "24h"}))).is_empty());
    assert_refused(
        store_refusals(set(store(), rotation, json!({"every": "30m", "grace": "0s"}))),
        "between 1h and 8760h",
    );
    assert_refused(
        store_refusals(set(store(), rotation, json!({"every": "9000h", "grace": "0s"}))),
        "between 1h and 8760h",
    );
    assert_refused(
        store_refusals(set(store(), rotation, json!({"every": "1h", "grace": "2h"}))),
        "grace must not exceed every",
    );
    assert_refused(store_refusals(set(store(), rotation, json!({"every": "1 day", "grace": "0s"}))), "every");
}

#[test]
fn an_emergency_procedure_is_bounded_and_names_declared_tools_and_approvers() {
    let procedure = |tools: Value, max: &str, approvers: Value| {
        set(
            server(),
            "/spec/emergencyAccess",
            json!({"approvers": approvers, "maxDuration": max, "tools": tools, "approval": "Required"}),
        )
    };
    let house = json!({"users": ["oidc:dr-house"]});
    assert!(server_refusals(procedure(json!(["lookup_patient"]), "2h", house.clone())).is_empty());
    assert_refused(
        server_refusals(procedure(json!(["drop_tables"]), "2h", house.clone())),
        "emergencyAccess.tools may name only declared tools",
    );
    assert_refused(server_refusals(procedure(json!(["lookup_patient"]), "5h", house.clone())), "between 1m and 4h");
    assert_refused(server_refusals(procedure(json!(["lookup_patient"]), "2h", json!({}))), "approvers names nobody");
}

#[test]
fn an_emergency_grant_is_bounded_and_says_why() {
    let grant = json!({
        "apiVersion": "mcpwarden.io/v1alpha1", "kind": "EmergencyAccess",
        "metadata": {"name": "er-1", "namespace": "clinic"},
        "spec": {"server": "patient-lookup", "requester": "oidc:nurse-joy", "beneficiary": "er-agent",
                 "tools": ["lookup_patient"], "reason": "unconscious patient", "duration": "1h"}
    });
    let refusals = |v: Value| refusals(manifest::admit::<EmergencyAccess>(&v));
    assert!(refusals(grant.clone()).is_empty(), "{:?}", refusals(grant.clone()));
    assert_refused(refusals(set(grant.clone(), "/spec/duration", json!("5h"))), "duration must be between 1m and 4h");
    assert_refused(refusals(set(grant.clone(), "/spec/reason", json!(""))), "reason");
    assert_refused(refusals(set(grant.clone(), "/spec/tools", json!([]))), "tools");
    assert_refused(refusals(set(grant, "/spec/server", json!("Not_A_Name"))), "server");
}
