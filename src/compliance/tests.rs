//! The evaluator: each control's Pass, Fail and Unknown paths, offline and
//! with cluster observations. Objects are edited after admission where a
//! case must bypass the schema (an object written under an older CRD, or
//! drift in the cluster).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use super::*;
use crate::api::{AllowedCallers, FailurePolicy, PHIStore, SslMode, Verdict};
use crate::fixtures::{clinic_server, clinic_stores};
use crate::render::{self, Settings};

fn evaluate_with(server: &MCPServer, stores: &BTreeMap<String, PHIStore>, observed: &Observations) -> Report {
    let settings = Settings::default();
    let rendered = render::render(server, stores, &settings, None);
    evaluate(&Input { server, stores, rendered: rendered.as_ref(), settings: &settings, observed })
}

fn offline(server: &MCPServer) -> Report {
    evaluate_with(server, &clinic_stores(), &Observations::from_manifests(Vec::new()))
}

fn control(report: &Report, control: Control) -> (Verdict, String) {
    let status = report.controls.iter().find(|c| c.id == control.id()).expect("control reported");
    (status.verdict, status.message.clone())
}

#[track_caller]
fn assert_verdict(report: &Report, c: Control, verdict: Verdict, needle: &str) {
    let (got, message) = control(report, c);
    assert_eq!(got, verdict, "{}: {message}", c.id());
    assert!(message.contains(needle), "{}: {message:?} lacks {needle:?}", c.id());
}

fn policy(yaml: &str) -> NetworkPolicy {
    serde_yaml::from_str(yaml).expect("policy yaml")
}

fn cluster(pods: Vec<Pod>, policies: Vec<NetworkPolicy>, collector: Option<CollectorView>) -> Observations {
    Observations {
        source: Source::Cluster,
        network_policies: Some(policies),
        pods: Some(pods),
        collector,
        emergency: None,
        pod_admission: None,
    }
}

/// A running pod as the rendered Deployment would create it.
fn rendered_pod(name: &str) -> Pod {
    let objects = render::render(&clinic_server(), &clinic_stores(), &Settings::default(), None).expect("renders");
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some("clinic".into()), ..ObjectMeta::default() },
        spec: objects.deployment.spec.template.spec.clone(),
        status: None,
    }
}

fn healthy_collector() -> Option<CollectorView> {
    Some(CollectorView {
        receiving: true,
        chain_verified: true,
        open_incidents: 0,
        observed: "observed".into(),
        emergency_use: Default::default(),
        schema_drift: Default::default(),
    })
}

#[test]
fn every_control_is_reported_once_in_order_with_its_citation() {
    let report = offline(&clinic_server());
    let ids: Vec<&str> = report.controls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, Control::ALL.map(Control::id));
    assert_eq!(report.controls[0].citation, "45 CFR 164.312(a)(1)");
    assert_eq!(report.controls[8].citation, "45 CFR 164.502(b), 164.514(d)");
}

#[test]
fn the_compliant_clinic_offline() {
    let report = offline(&clinic_server());
    assert_verdict(&report, Control::AccessControl, Verdict::Pass, "ingress admits only the sidecar port 8443");
    assert_verdict(&report, Control::AccessControl, Verdict::Pass, "cannot observe");
    assert_verdict(&report, Control::UniqueUserIdentification, Verdict::Pass, "per caller and per tool");
    assert_verdict(&report, Control::EmergencyAccess, Verdict::Unknown, "observed in a cluster only");
    assert_verdict(&report, Control::AutomaticLogoff, Verdict::Pass, "15m");
    assert_verdict(&report, Control::AuditControls, Verdict::Unknown, "cannot be observed from manifests");
    assert_verdict(&report, Control::Integrity, Verdict::Unknown, "not verified");
    assert_verdict(&report, Control::Authentication, Verdict::Pass, "https://patient-lookup.clinic.example/mcp");
    assert_verdict(&report, Control::TransmissionSecurity, Verdict::Pass, "verify-full");
    assert_verdict(
        &report,
        Control::MinimumNecessary,
        Verdict::Pass,
        "egress reaches only the PHI store(s) tools use: ehr",
    );
    // Unobservable controls keep the roll-up at Unknown: never an unearned Pass.
    assert_eq!(report.compliant, Verdict::Unknown);
}

#[test]
fn observed_cluster_state_turns_unknowns_into_verdicts() {
    let mut pending = rendered_pod("p-2");
    pending.status =
        Some(k8s_openapi::api::core::v1::PodStatus { phase: Some("Pending".into()), ..Default::default() });
    let mut running = rendered_pod("p-1");
    running.status =
        Some(k8s_openapi::api::core::v1::PodStatus { phase: Some("Running".into()), ..Default::default() });
    let observed = cluster(vec![running, pending.clone(), pending], Vec::new(), healthy_collector());
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &observed);
    // Pods that exist are not pods that serve: their phases are said.
    assert_verdict(
        &report,
        Control::AuditControls,
        Verdict::Pass,
        "all 3 pod(s) carry the auditing sidecar (2 Pending, 1 Running)",
    );
    assert_verdict(&report, Control::Integrity, Verdict::Pass, "verified");
    assert_verdict(&report, Control::AccessControl, Verdict::Pass, "no other NetworkPolicy in the namespace");
    // Break-glass is still not implemented.
    assert_eq!(report.compliant, Verdict::Unknown);
}

#[test]
fn roll_up_of_verdicts() {
    use Verdict::*;
    assert_eq!(super::roll_up([Pass, Pass]), Pass);
    assert_eq!(super::roll_up([Pass, Unknown]), Unknown);
    assert_eq!(super::roll_up([Unknown, Fail, Pass]), Fail);
    assert_eq!(super::roll_up([]), Unknown);
}

#[test]
fn a_pod_without_the_sidecar_fails_audit_controls() {
    let mut bare = rendered_pod("bare-1");
    if let Some(spec) = bare.spec.as_mut() {
        spec.init_containers = None;
    }
    let mut demoted = rendered_pod("demoted-1");
    if let Some(spec) = demoted.spec.as_mut() {
        // The sidecar moved to a regular container: it no longer starts first
        // and is not a native sidecar.
        let sidecar = spec.init_containers.take().unwrap_or_default();
        spec.containers.extend(sidecar);
    }
    let observed = cluster(vec![rendered_pod("ok-1"), bare, demoted], Vec::new(), healthy_collector());
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &observed);
    assert_verdict(&report, Control::AuditControls, Verdict::Fail, "bare-1, demoted-1");
    assert_eq!(report.compliant, Verdict::Fail);
}

#[test]
fn a_listed_schema_that_drifted_from_the_declaration_fails_minimum_necessary() {
    let agreeing = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![], vec![], healthy_collector()));
    let before = agreeing.controls.iter().find(|c| c.id == Control::MinimumNecessary.id()).expect("control");
    assert!(!before.message.contains("inputSchema"), "{}", before.message);
    let mut drifted = healthy_collector();
    if let Some(view) = drifted.as_mut() {
        view.schema_drift.insert("lookup_patient".into(), vec!["takes undeclared argument(s) \"sql\"".into()]);
    }
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![], vec![], drifted));
    assert_verdict(
        &report,
        Control::MinimumNecessary,
        Verdict::Fail,
        "tool lookup_patient: the inputSchema its server lists differs from the declared arguments (takes undeclared argument(s) \"sql\")",
    );
}

#[test]
fn collector_states() {
    let not_receiving = Some(CollectorView {
        receiving: false,
        chain_verified: true,
        open_incidents: 0,
        observed: "observed".into(),
        emergency_use: Default::default(),
        schema_drift: Default::default(),
    });
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![], vec![], not_receiving));
    assert_verdict(&report, Control::AuditControls, Verdict::Fail, "not receiving");
    let incidents = Some(CollectorView {
        receiving: true,
        chain_verified: true,
        open_incidents: 2,
        observed: "observed".into(),
        emergency_use: Default::default(),
        schema_drift: Default::default(),
    });
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![], vec![], incidents));
    assert_verdict(&report, Control::Integrity, Verdict::Fail, "2 open integrity incident(s)");
    let broken = Some(CollectorView {
        receiving: true,
        chain_verified: false,
        open_incidents: 0,
        observed: "observed".into(),
        emergency_use: Default::default(),
        schema_drift: Default::default(),
    });
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![], vec![], broken));
    assert_verdict(&report, Control::Integrity, Verdict::Fail, "could not verify");
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![], vec![], None));
    assert_verdict(&report, Control::AuditControls, Verdict::Unknown, "has not reported");
}

#[test]
fn audit_controls_say_whether_pods_without_the_sidecar_are_refused_at_admission() {
    use crate::compliance::pod_admission::PodAdmissionView;
    let with = |in_force: Result<(), String>, namespace_opted_in: bool| {
        let observed = Observations {
            pod_admission: Some(PodAdmissionView { policy: "mcpw-server-pods".into(), in_force, namespace_opted_in }),
            ..cluster(vec![], vec![], None)
        };
        evaluate_with(&clinic_server(), &clinic_stores(), &observed)
    };
    let enforced = with(Ok(()), true);
    assert_verdict(&enforced, Control::AuditControls, Verdict::Unknown, "the API server refuses this server's pods");
    assert_verdict(
        &with(Ok(()), false),
        Control::AuditControls,
        Verdict::Unknown,
        "not labelled mcpwarden.io/enforce-sidecar=true",
    );
    assert_verdict(
        &with(Err("it is not installed".into()), true),
        Control::AuditControls,
        Verdict::Unknown,
        "mcpw-server-pods: it is not installed",
    );
}

#[test]
fn fail_open_fails_audit_controls() {
    let mut server = clinic_server();
    server.spec.audit.failure_policy = FailurePolicy::Open;
    assert_verdict(&offline(&server), Control::AuditControls, Verdict::Fail, "failurePolicy is Open");
}

#[test]
fn widening_network_policies_fail_access_control_by_name() {
    let allow_all = policy(
        "metadata: {name: allow-all, namespace: clinic}\nspec: {podSelector: {}, policyTypes: [Ingress], ingress: [{}]}",
    );
    let egress_anywhere = policy(
        "metadata: {name: egress-anywhere, namespace: clinic}\nspec: {podSelector: {matchLabels: {mcpwarden.io/server: patient-lookup}}, policyTypes: [Egress], egress: [{}]}",
    );
    let report = evaluate_with(
        &clinic_server(),
        &clinic_stores(),
        &Observations::from_manifests(vec![allow_all, egress_anywhere]),
    );
    let (verdict, message) = control(&report, Control::AccessControl);
    assert_eq!(verdict, Verdict::Fail);
    assert!(message.contains("NetworkPolicy clinic/allow-all selects these pods and admits ingress"), "{message}");
    assert!(message.contains("NetworkPolicy clinic/egress-anywhere selects these pods and allows egress"), "{message}");
    assert_eq!(report.compliant, Verdict::Fail);
}

#[test]
fn harmless_other_policies_pass() {
    let deny_all = policy(
        "metadata: {name: default-deny, namespace: clinic}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
    );
    let other_pods = policy(
        "metadata: {name: web, namespace: clinic}\nspec: {podSelector: {matchLabels: {app: web}}, ingress: [{}]}",
    );
    let other_namespace =
        policy("metadata: {name: allow-all, namespace: billing}\nspec: {podSelector: {}, ingress: [{}]}");
    // The warden's own policies, as they would be observed in the cluster.
    let objects = render::render(&clinic_server(), &clinic_stores(), &Settings::default(), None).expect("renders");
    let observed = Observations::from_manifests(vec![
        deny_all,
        other_pods,
        other_namespace,
        objects.ingress_policy.clone(),
        objects.egress_policy.clone(),
    ]);
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &observed);
    assert_verdict(
        &report,
        Control::AccessControl,
        Verdict::Pass,
        "1 other NetworkPolicy(ies) among the manifests select these pods without widening",
    );
}

#[test]
fn other_policies_not_observed_is_unknown() {
    let observed = Observations {
        source: Source::Cluster,
        network_policies: None,
        pods: None,
        collector: None,
        emergency: None,
        pod_admission: None,
    };
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &observed);
    assert_verdict(&report, Control::AccessControl, Verdict::Unknown, "were not observed");
}

fn with_egress(extra: serde_json::Value) -> MCPServer {
    let mut server = clinic_server();
    server.spec.network.egress = serde_json::from_value(extra).expect("egress rules");
    server
}

#[test]
fn egress_extras_that_reach_phi_fail_access_control() {
    let cases = [
        (json!([{"ports": [{"port": 443}]}]), "network.egress[0] has no `to`"),
        (json!([{"to": []}]), "network.egress[0] has no `to`"),
        (json!([{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]), "the whole address space"),
        (json!([{"to": [{"ipBlock": {"cidr": "::/0"}}]}]), "the whole address space"),
        (json!([{"to": [{"podSelector": {}}]}]), "reaches PHIStore ehr"),
        (
            json!([{"to": [{"podSelector": {"matchLabels": {"app": "ehr-db"}}}]}]),
            "reaches PHIStore ehr (it selects the store's pods)",
        ),
        (json!([{"to": [{"namespaceSelector": {}}]}]), "reaches PHIStore ehr"),
        (json!([{"to": [{}]}]), "empty peer"),
    ];
    for (extra, needle) in cases {
        let report = offline(&with_egress(extra.clone()));
        let (verdict, message) = control(&report, Control::AccessControl);
        assert_eq!(verdict, Verdict::Fail, "{extra}: {message}");
        assert!(message.contains(needle), "{extra}: {message:?} lacks {needle:?}");
    }
    let specific = with_egress(json!([{"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}], "ports": [{"port": 443}]}]));
    assert_verdict(
        &offline(&specific),
        Control::AccessControl,
        Verdict::Pass,
        "1 declared egress extra(s) reach no PHI store",
    );
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

#[test]
fn credentials_in_the_environment_fail_unique_user_identification_without_leaking() {
    let secret_value = "s3cr3t-Value-9";
    let cases = [
        (env("DATABASE_URL", &format!("postgres://app:{secret_value}@db:5432/ehr")), "connection URL with a password"),
        (env("PG_DSN", &format!("host=db user=app password={secret_value}")), "connection string with a password"),
        (env("PGPASSWORD", secret_value), "named like a credential"),
        (env("EHR_API_TOKEN", secret_value), "named like a credential"),
    ];
    for (var, needle) in cases {
        let mut server = clinic_server();
        server.spec.env = vec![var.clone()];
        let report = offline(&server);
        assert_verdict(&report, Control::UniqueUserIdentification, Verdict::Fail, needle);
        let all = serde_json::to_string(&report).expect("json");
        assert!(!all.contains(secret_value), "the value of {} leaked into the report", var.name);
    }
    let mut benign = clinic_server();
    benign.spec.env =
        vec![env("LOG_LEVEL", "info"), env("EHR_URL", "https://ehr.example/api"), env("TOKEN_AUDIENCE_HINT", "")];
    assert_verdict(&offline(&benign), Control::UniqueUserIdentification, Verdict::Pass, "no static secret");
}

#[test]
fn a_secret_reaching_the_mcp_container_in_a_running_pod_fails() {
    let mut pod = rendered_pod("drifted-1");
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: "db-creds".into(),
            secret: Some(SecretVolumeSource { secret_name: Some("db".into()), ..SecretVolumeSource::default() }),
            ..Volume::default()
        });
        if let Some(mcp) = spec.containers.iter_mut().find(|c| c.name == "mcp-server") {
            mcp.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
                name: "db-creds".into(),
                mount_path: "/creds".into(),
                ..VolumeMount::default()
            });
        }
    }
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![pod], vec![], healthy_collector()));
    assert_verdict(
        &report,
        Control::UniqueUserIdentification,
        Verdict::Fail,
        "pod drifted-1: mcp-server mounts volume db-creds (a Secret)",
    );
}

#[test]
fn a_pod_automounting_a_token_fails() {
    let mut pod = rendered_pod("token-1");
    if let Some(spec) = pod.spec.as_mut() {
        spec.automount_service_account_token = None;
    }
    let report = evaluate_with(&clinic_server(), &clinic_stores(), &cluster(vec![pod], vec![], healthy_collector()));
    assert_verdict(
        &report,
        Control::UniqueUserIdentification,
        Verdict::Fail,
        "pod token-1 automounts a service-account token",
    );
}

#[test]
fn ttl_above_the_cap_fails_automatic_logoff() {
    let mut server = clinic_server();
    server.spec.credentials.ttl = "2h".into();
    let report = offline(&server);
    assert_verdict(&report, Control::AutomaticLogoff, Verdict::Fail, "above the 1h cap");
    server.spec.credentials.ttl = "soon".into();
    assert_verdict(&offline(&server), Control::AutomaticLogoff, Verdict::Fail, "invalid");
}

#[test]
fn authentication_needs_https_issuer_audience_and_one_key_source() {
    let mut server = clinic_server();
    server.spec.authentication.oidc.issuer = "http://login.example.org".into();
    assert_verdict(&offline(&server), Control::Authentication, Verdict::Fail, "is not an https URL");
    let mut server = clinic_server();
    server.spec.authentication.oidc.audience = "patient-lookup".into();
    assert_verdict(&offline(&server), Control::Authentication, Verdict::Fail, "resource URI");
    let mut server = clinic_server();
    server.spec.authentication.oidc.jwks_uri = None;
    assert_verdict(&offline(&server), Control::Authentication, Verdict::Fail, "no JWKS source");
}

#[test]
fn unverified_tls_to_a_store_fails_transmission_security() {
    for (mode, name) in [(SslMode::Require, "require"), (SslMode::VerifyCa, "verify-ca"), (SslMode::Disable, "disable")]
    {
        let mut stores = clinic_stores();
        if let Some(store) = stores.get_mut("ehr") {
            store.spec.postgres.ssl_mode = mode;
        }
        let report = evaluate_with(&clinic_server(), &stores, &Observations::from_manifests(Vec::new()));
        assert_verdict(&report, Control::TransmissionSecurity, Verdict::Fail, &format!("sslMode {name}"));
    }
}

#[test]
fn a_missing_store_fails_minimum_necessary_and_leaves_the_rest_unknown() {
    let report = evaluate_with(&clinic_server(), &BTreeMap::new(), &Observations::from_manifests(Vec::new()));
    assert_verdict(&report, Control::MinimumNecessary, Verdict::Fail, "uses PHIStore ehr, which does not exist");
    assert_verdict(&report, Control::AccessControl, Verdict::Unknown, "no objects can be rendered");
    assert_verdict(&report, Control::TransmissionSecurity, Verdict::Unknown, "PHIStore ehr was not found");
    assert_eq!(report.compliant, Verdict::Fail);
}

#[test]
fn over_broad_phi_declarations_fail_minimum_necessary() {
    // Each edit is one the schema refuses; the evaluator must catch it too
    // (objects admitted under an older CRD, or checked without one).
    let mut open = clinic_server();
    open.spec.tools[0].allowed_callers = AllowedCallers { any_authenticated: true, ..AllowedCallers::default() };
    assert_verdict(&offline(&open), Control::MinimumNecessary, Verdict::Fail, "open to any authenticated caller");

    let mut no_purpose = clinic_server();
    no_purpose.spec.tools[0].purpose = None;
    assert_verdict(&offline(&no_purpose), Control::MinimumNecessary, Verdict::Fail, "states no purpose");

    let mut star = clinic_server();
    star.spec.tools[0].data_access[0].tables[0].columns = vec!["*".into()];
    assert_verdict(&offline(&star), Control::MinimumNecessary, Verdict::Fail, "grants '*'");

    let mut nobody = clinic_server();
    nobody.spec.tools[1].allowed_callers = AllowedCallers::default();
    assert_verdict(&offline(&nobody), Control::MinimumNecessary, Verdict::Fail, "names no caller");

    let mut unmarked = clinic_server();
    unmarked.spec.tools[0].phi = false;
    assert_verdict(&offline(&unmarked), Control::MinimumNecessary, Verdict::Fail, "is not marked phi: true");
}

#[test]
fn a_phi_tool_taking_free_form_sql_fails_minimum_necessary_until_a_rule_constrains_it() {
    use crate::api::{ArgumentRule, ArgumentSpec, ArgumentType};
    let string = |name: &str| ArgumentSpec {
        name: name.into(),
        kind: ArgumentType::String,
        required: false,
        max_length: None,
        minimum: None,
        maximum: None,
    };
    let mut sql = clinic_server();
    sql.spec.tools[0].arguments = Some(vec![string("patient"), string("rawSql")]);
    assert_verdict(&offline(&sql), Control::MinimumNecessary, Verdict::Fail, "free-form string argument \"rawSql\"");
    sql.spec.tools[0].argument_rules =
        vec![ArgumentRule { rule: "args.rawSql.startsWith('SELECT birth_date FROM')".into(), message: "x".into() }];
    assert_verdict(
        &offline(&sql),
        Control::MinimumNecessary,
        Verdict::Pass,
        "1 declare their arguments, 1 with argument rules",
    );
    // Undeclared arguments are evidence, not a failure.
    assert_verdict(&offline(&clinic_server()), Control::MinimumNecessary, Verdict::Pass, "0 declare their arguments");
}

#[test]
fn a_render_failure_is_never_a_pass() {
    let report = evaluate_with(&clinic_server(), &BTreeMap::new(), &cluster(vec![], vec![], healthy_collector()));
    for c in [Control::AccessControl, Control::AuditControls] {
        assert_ne!(control(&report, c).0, Verdict::Pass, "{}", c.id());
    }
}

#[test]
fn sidecar_detection_ignores_look_alikes() {
    let spec = PodSpec {
        containers: vec![Container { name: "mcp-warden-sidecar-fake".into(), ..Container::default() }],
        ..PodSpec::default()
    };
    assert!(identity::sidecar_of(&spec).is_none());
}

#[test]
fn de_identified_tools_pass_naming_every_column_and_method() {
    let report = offline(&clinic_server());
    assert_verdict(&report, Control::Deidentification, Verdict::Pass, "views of schema deid_patient_lookup");
    assert_verdict(&report, Control::Deidentification, Verdict::Pass, "public.patients.birth_date BirthYear");
    assert_verdict(&report, Control::Deidentification, Verdict::Pass, "public.appointments.patient_id pseudonym");
    assert_verdict(&report, Control::Deidentification, Verdict::Pass, "Safe Harbor 164.514(b)(2)");
}

#[test]
fn an_identified_tool_fails_unless_break_glass_gates_it() {
    let mut server = clinic_server();
    server.spec.tools[0].output = crate::api::Output::Identified;
    server.spec.tools[0].identified_reason = Some("check-in compares the real identity".into());
    // In the procedure (as the example has it): served only under a grant.
    let report = offline(&server);
    assert_verdict(&report, Control::Deidentification, Verdict::Pass, "only under break-glass");
    // Outside it: identified PHI for its callers, every day.
    server.spec.emergency_access = None;
    let report = offline(&server);
    assert_verdict(&report, Control::Deidentification, Verdict::Fail, "check-in compares the real identity");
    assert_verdict(&report, Control::Deidentification, Verdict::Fail, "outside emergency access");
}

#[test]
fn unclassified_and_free_text_columns_fail_by_name() {
    let mut server = clinic_server();
    server.spec.tools[0].data_access[0].tables[0].columns.push("ssn".into());
    assert_verdict(&offline(&server), Control::Deidentification, Verdict::Fail, "public.patients.ssn");
    let mut server = clinic_server();
    server.spec.tools[0].data_access[0].tables[1].columns.push("reason".into());
    assert_verdict(
        &offline(&server),
        Control::Deidentification,
        Verdict::Fail,
        "free-text column(s) public.appointments.reason",
    );
    let mut stores = clinic_stores();
    stores.get_mut("ehr").expect("ehr").spec.deidentification = None;
    let report = evaluate_with(&clinic_server(), &stores, &Observations::from_manifests(Vec::new()));
    assert_verdict(&report, Control::Deidentification, Verdict::Fail, "has no deidentification classification");
}

#[test]
fn a_server_without_phi_tools_passes_de_identification() {
    let mut server = clinic_server();
    server.spec.tools.retain(|t| !t.phi);
    assert_verdict(&offline(&server), Control::Deidentification, Verdict::Pass, "no tool reads a PHIStore");
}

#[test]
fn an_identifier_pattern_that_does_not_compile_fails_by_name() {
    let mut stores = clinic_stores();
    let deid = stores.get_mut("ehr").expect("ehr").spec.deidentification.as_mut().expect("classified");
    deid.identifier_patterns.push(crate::api::IdentifierPattern { name: "chart".into(), regex: "CH-(".into() });
    let report = evaluate_with(&clinic_server(), &stores, &Observations::from_manifests(Vec::new()));
    assert_verdict(&report, Control::Deidentification, Verdict::Fail, "identifier pattern \"chart\" does not compile");
    let policy = crate::policy::compile(&clinic_server(), &stores);
    assert!(policy.is_err_and(|e| e.to_string().contains("does not compile")));
}

fn with_procedure() -> MCPServer {
    let mut server = clinic_server();
    server.spec.emergency_access = Some(crate::api::EmergencyProcedure {
        approvers: crate::api::Approvers { users: vec!["oidc:dr-house".into()], groups: vec!["er-attendings".into()] },
        max_duration: "2h".into(),
        tools: vec!["lookup_patient".into()],
        approval: crate::api::ApprovalMode::Required,
        review_within: "24h".into(),
        kubernetes_username_prefix: "oidc:".into(),
    });
    server
}

fn grant_view(name: &str, state: crate::api::GrantState, review_overdue: bool) -> crate::compliance::GrantView {
    let at = |s: i64| k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).expect("time");
    crate::compliance::GrantView {
        name: name.into(),
        beneficiary: "er-agent".into(),
        tools: vec!["lookup_patient".into()],
        approver: Some("oidc:dr-house".into()).filter(|_| !review_overdue),
        judgement: crate::breakglass::Judgement {
            state,
            message: String::new(),
            activated_at: Some(at(0)),
            expires_at: Some(at(3600)),
            review_due_at: review_overdue.then(|| at(60)),
            reviewed: false,
            review_overdue,
        },
    }
}

#[test]
fn a_declared_procedure_is_named_offline_and_judged_with_its_grants_in_a_cluster() {
    use crate::api::GrantState;
    use crate::breakglass::Admission;
    let server = with_procedure();
    let report = offline(&server);
    assert_verdict(&report, Control::EmergencyAccess, Verdict::Unknown, "observed in a cluster only");
    assert_verdict(&report, Control::EmergencyAccess, Verdict::Unknown, "oidc:dr-house, group er-attendings");
    let mut without = clinic_server();
    without.spec.emergency_access = None;
    assert_verdict(&offline(&without), Control::EmergencyAccess, Verdict::Unknown, "no break-glass procedure");

    let in_cluster = |admission: Admission, grants: Vec<crate::compliance::GrantView>| {
        let observed = Observations {
            emergency: Some(crate::compliance::EmergencyView { admission, grants }),
            ..cluster(vec![], vec![], None)
        };
        evaluate_with(&server, &clinic_stores(), &observed)
    };
    let enforced = || Admission::Enforced { since: k8s_openapi::jiff::Timestamp::UNIX_EPOCH };
    let quiet = in_cluster(enforced(), vec![grant_view("old", GrantState::Expired, false)]);
    assert_verdict(&quiet, Control::EmergencyAccess, Verdict::Pass, "no emergency access is in force");
    let active = in_cluster(enforced(), vec![grant_view("ea-1", GrantState::Active, false)]);
    assert_verdict(&active, Control::EmergencyAccess, Verdict::Pass, "ea-1 (er-agent → lookup_patient, until");
    assert_verdict(&active, Control::EmergencyAccess, Verdict::Pass, "approved by oidc:dr-house");
    let late = in_cluster(enforced(), vec![grant_view("ea-2", GrantState::Expired, true)]);
    assert_verdict(
        &late,
        Control::EmergencyAccess,
        Verdict::Fail,
        "no approver reviewed emergency access ea-2 in time",
    );
    // With the collector's trail: use inside each grant's bounds passes,
    // use past its end or under a grant never in force fails.
    let with_trail = |grants: Vec<crate::compliance::GrantView>, used: &[(&str, i64, i64)]| {
        let at = |s: i64| k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).expect("time").to_string();
        let emergency_use = used
            .iter()
            .map(|(name, first, last)| {
                let use_ = crate::audit::collector::store::GrantUse { first: at(*first), last: at(*last), uses: 3 };
                (name.to_string(), use_)
            })
            .collect();
        let observed = Observations {
            emergency: Some(crate::compliance::EmergencyView { admission: enforced(), grants }),
            collector: Some(CollectorView {
                receiving: true,
                chain_verified: true,
                open_incidents: 0,
                observed: "observed".into(),
                emergency_use,
                schema_drift: Default::default(),
            }),
            ..cluster(vec![], vec![], None)
        };
        evaluate_with(&server, &clinic_stores(), &observed)
    };
    let used = with_trail(vec![grant_view("ea-1", GrantState::Expired, false)], &[("ea-1", 60, 3000)]);
    assert_verdict(&used, Control::EmergencyAccess, Verdict::Pass, "use only within each grant's bounds: ea-1");
    let gone = with_trail(vec![], &[("ea-9", 60, 3000)]);
    assert_verdict(&gone, Control::EmergencyAccess, Verdict::Pass, "ea-9 (deleted since)");
    let late = with_trail(vec![grant_view("ea-1", GrantState::Expired, false)], &[("ea-1", 60, 3700)]);
    assert_verdict(&late, Control::EmergencyAccess, Verdict::Fail, "ea-1 was used outside its bounds");
    let mut never = grant_view("ea-3", GrantState::Refused, false);
    (never.judgement.activated_at, never.judgement.expires_at) = (None, None);
    let unapproved = with_trail(vec![never], &[("ea-3", 60, 70)]);
    assert_verdict(&unapproved, Control::EmergencyAccess, Verdict::Fail, "ea-3 was used (3 use(s)");
    let unguarded = in_cluster(Admission::Unenforced("admission policy p: absent".into()), vec![]);
    assert_verdict(
        &unguarded,
        Control::EmergencyAccess,
        Verdict::Fail,
        "every grant is refused because admission policy p: absent",
    );
}
