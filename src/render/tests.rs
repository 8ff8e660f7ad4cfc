//! Rendering: every owned object, and the isolation properties they must
//! carry.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::networking::v1::{NetworkPolicyEgressRule, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::deployment::{paths, volumes};
use super::names::{MCP_CONTAINER, POLICY_HASH_ANNOTATION, SIDECAR_CONTAINER};
use super::*;
use crate::api::{PHIStore, SIDECAR_METRICS_PORT, SIDECAR_PUBLIC_PORT};
use crate::fixtures::{admit_server, clinic_server, clinic_stores, clinic_values, remove, set};
use crate::manifest;
use crate::policy::CompiledPolicy;

const UID: &str = "6a1f7c1e-0000-4000-8000-000000000001";

fn clinic() -> MCPServer {
    let mut server = clinic_server();
    server.metadata.uid = Some(UID.into());
    server
}

fn rendered() -> OwnedObjects {
    render(&clinic(), &clinic_stores(), &Settings::default(), None).expect("clinic renders")
}

fn rendered_from(value: Value, stores: &BTreeMap<String, PHIStore>) -> OwnedObjects {
    let server = admit_server(&value).expect("variant admitted");
    render(&server, stores, &Settings::default(), None).expect("variant renders")
}

fn pod(objects: &OwnedObjects) -> &PodSpec {
    objects.deployment.spec.template.spec.as_ref().expect("pod spec")
}

fn sidecar(objects: &OwnedObjects) -> &Container {
    pod(objects).init_containers.iter().flatten().find(|c| c.name == SIDECAR_CONTAINER).expect("sidecar")
}

fn mcp(objects: &OwnedObjects) -> &Container {
    pod(objects).containers.iter().find(|c| c.name == MCP_CONTAINER).expect("mcp container")
}

fn egress_rules(objects: &OwnedObjects) -> Vec<NetworkPolicyEgressRule> {
    objects.egress_policy.spec.as_ref().and_then(|s| s.egress.clone()).unwrap_or_default()
}

fn reaches(objects: &OwnedObjects, store: &PHIStore) -> bool {
    let peers = store_peers(store);
    egress_rules(objects).iter().any(|r| r.to.as_ref() == Some(&peers))
}

#[test]
fn every_object_is_owned_namespaced_and_labelled() {
    let objects = rendered();
    let values = objects.to_values();
    let kinds: Vec<&str> = values.iter().map(|v| v["kind"].as_str().unwrap_or_default()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "ConfigMap", "ConfigMap", "NetworkPolicy", "NetworkPolicy", "Service", "Deployment"]
    );
    for v in &values {
        assert_eq!(v["metadata"]["namespace"], "clinic", "{}", v["kind"]);
        assert_eq!(v["metadata"]["labels"]["mcpwarden.io/server"], "patient-lookup");
        assert_eq!(v["metadata"]["labels"]["app.kubernetes.io/managed-by"], "mcp-warden");
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "MCPServer");
        assert_eq!(owner["uid"], UID);
        assert_eq!(owner["controller"], true);
        assert!(v["apiVersion"].is_string());
    }
}

#[test]
fn offline_render_has_no_owner_reference() {
    let objects = render(&clinic_server(), &clinic_stores(), &Settings::default(), None).expect("renders");
    assert!(objects.deployment.metadata.owner_references.is_none());
}

#[test]
fn service_account_automounts_no_token() {
    let objects = rendered();
    assert_eq!(objects.service_account.automount_service_account_token, Some(false));
    assert_eq!(pod(&objects).automount_service_account_token, Some(false));
    assert_eq!(pod(&objects).service_account_name.as_deref(), Some("patient-lookup-mcpw"));
}

#[test]
fn policy_config_map_carries_the_compiled_policy_and_no_secret() {
    let objects = rendered();
    let data = objects.policy_config_map.data.as_ref().expect("data");
    let text = &data["policy.json"];
    let parsed: CompiledPolicy = serde_json::from_str(text).expect("policy parses");
    assert_eq!(parsed, objects.policy);
    assert_eq!(parsed.server.to_string(), "clinic/patient-lookup");
    let tool = &parsed.tools["lookup_patient"];
    assert!(tool.phi);
    // De-identified: the grants name the scope's views, not the tables.
    assert_eq!(tool.output, crate::api::Output::Deidentified);
    let views: Vec<&str> = tool.data_access["ehr"].iter().map(|g| g.table.as_str()).collect();
    assert_eq!(
        views,
        ["deid_patient_lookup.patients", "deid_patient_lookup.appointments", "deid_patient_lookup.pseudonym_aliases"]
    );
    assert_eq!(parsed.pseudonym_scope, "patient_lookup");
    assert_eq!(parsed.stores["ehr"].host, "ehr-db.clinic.svc");
    assert_eq!(parsed.credential_ttl_seconds, 900);
    for forbidden in ["ehr-db-admin", "adminSecretRef", "password"] {
        assert!(!text.contains(forbidden), "policy mentions {forbidden}");
    }
    let annotations =
        objects.deployment.spec.template.metadata.as_ref().and_then(|m| m.annotations.clone()).expect("annotations");
    assert_eq!(annotations[POLICY_HASH_ANNOTATION], objects.policy.hash());
}

#[test]
fn policy_hash_follows_the_policy_and_nothing_else() {
    let (_, value) = clinic_values();
    let base = rendered_from(value.clone(), &clinic_stores()).policy.hash();
    assert_eq!(base, rendered_from(value.clone(), &clinic_stores()).policy.hash(), "deterministic");
    let replicas = rendered_from(set(value.clone(), "/spec/replicas", json!(5)), &clinic_stores());
    assert_eq!(base, replicas.policy.hash(), "replicas are not policy");
    let callers = set(value, "/spec/tools/0/allowedCallers/groups", json!(["front-desk", "nurses"]));
    assert_ne!(base, rendered_from(callers, &clinic_stores()).policy.hash());
}

#[test]
fn config_maps_are_mounted_as_directories_never_sub_path() {
    let objects = rendered();
    for c in pod(&objects).init_containers.iter().flatten().chain(&pod(&objects).containers) {
        for m in c.volume_mounts.iter().flatten() {
            assert!(m.sub_path.is_none() && m.sub_path_expr.is_none(), "{} mounts {} with subPath", c.name, m.name);
        }
    }
    let args = sidecar(&objects).args.clone().unwrap_or_default();
    let policy_arg = args.iter().position(|a| a == "--policy").map(|i| args[i + 1].clone());
    assert_eq!(policy_arg.as_deref(), Some("/etc/mcp-warden/policy/policy.json"));
}

#[test]
fn jwks_from_uri_is_carried_by_the_operator() {
    let objects = render(&clinic(), &clinic_stores(), &Settings::default(), Some(r#"{"keys":[]}"#)).expect("renders");
    let cm = objects.jwks_config_map.as_ref().expect("jwks ConfigMap for jwksUri");
    assert_eq!(cm.metadata.name.as_deref(), Some("patient-lookup-jwks"));
    assert_eq!(cm.data.as_ref().expect("data")["jwks.json"], r#"{"keys":[]}"#);
    assert_eq!(
        cm.metadata.annotations.as_ref().expect("annotations")["mcpwarden.io/jwks-source"],
        "https://login.example.org/jwks"
    );
    // Without a fetched document the data is left to the operator.
    assert!(rendered().jwks_config_map.expect("cm").data.is_none());
}

#[test]
fn referenced_jwks_is_mounted_directly_into_the_sidecar_only() {
    let (_, value) = clinic_values();
    let oidc = "/spec/authentication/oidc";
    let by_secret = set(
        remove(value.clone(), &format!("{oidc}/jwksUri")),
        &format!("{oidc}/jwksSecretRef"),
        json!({"name": "idp-keys", "key": "keys"}),
    );
    let objects = rendered_from(by_secret, &clinic_stores());
    assert!(objects.jwks_config_map.is_none());
    let volume = pod(&objects).volumes.iter().flatten().find(|v| v.name == volumes::JWKS).expect("jwks volume");
    let secret = volume.secret.as_ref().expect("secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("idp-keys"));
    assert_eq!(secret.items.as_ref().expect("items")[0].path, "jwks.json");
    assert!(!mcp(&objects).volume_mounts.iter().flatten().any(|m| m.name == volumes::JWKS));

    let by_cm =
        set(remove(value, &format!("{oidc}/jwksUri")), &format!("{oidc}/jwksConfigMapRef"), json!({"name": "idp-cm"}));
    let objects = rendered_from(by_cm, &clinic_stores());
    let volume = pod(&objects).volumes.iter().flatten().find(|v| v.name == volumes::JWKS).expect("jwks volume");
    assert_eq!(volume.config_map.as_ref().expect("cm volume").name, "idp-cm");
}

#[test]
fn the_sidecar_is_a_native_sidecar_wired_to_the_server() {
    let objects = rendered();
    let sidecar = sidecar(&objects);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image, Some(Settings::default().sidecar_image));
    let args = sidecar.args.clone().unwrap_or_default();
    let value_of = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    assert_eq!(sidecar.command, Some(vec!["/usr/local/bin/mcp-warden-sidecar".to_string()]), "the sidecar-only binary");
    assert_eq!(args[0], "--policy");
    assert_eq!(value_of("--upstream").as_deref(), Some("http://127.0.0.1:8080/mcp"));
    assert_eq!(value_of("--listen").as_deref(), Some("0.0.0.0:8443"));
    assert_eq!(value_of("--audit-dir").as_deref(), Some(paths::AUDIT_DIR));
    assert_eq!(value_of("--args-key-file").as_deref(), Some("/etc/mcp-warden/audit-key/key"));
    assert_eq!(value_of("--metrics-listen").as_deref(), Some("0.0.0.0:9090"));
    assert!(value_of("--jwks-file").is_some());
    let ports: Vec<i32> = sidecar.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [SIDECAR_PUBLIC_PORT, SIDECAR_METRICS_PORT]);
    let probe_port = sidecar.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|h| h.port.clone());
    assert_eq!(probe_port, Some(IntOrString::String("metrics".into())));
    // The MCP container is the only regular container and declares no port.
    assert_eq!(pod(&objects).containers.len(), 1);
    assert!(mcp(&objects).ports.is_none());
    assert_eq!(mcp(&objects).image.as_deref(), Some("registry.example/phi-tools:1.4"));
}

#[test]
fn containers_are_restricted_with_distinct_uids() {
    let objects = rendered();
    let pod_sc = pod(&objects).security_context.as_ref().expect("pod security context");
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert_eq!(pod_sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));
    let mut uids = Vec::new();
    for c in [sidecar(&objects), mcp(&objects)] {
        let sc = c.security_context.as_ref().expect("container security context");
        assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.privileged, Some(false), "{}", c.name);
        assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]), "{}", c.name);
        assert!(sc.capabilities.as_ref().is_some_and(|c| c.add.is_none()), "{}", c.name);
        assert_eq!(sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));
        let uid = sc.run_as_user.expect("uid");
        assert!(uid > 0, "{} runs as root", c.name);
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "sidecar and MCP container share a UID");
    let pod = pod(&objects);
    assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
}

#[test]
fn the_mcp_container_holds_no_token_secret_or_password() {
    let objects = rendered();
    let mcp = mcp(&objects);
    let mounts: Vec<&str> = mcp.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
    assert_eq!(mounts, [volumes::MCP_TMP]);
    assert!(mcp.env_from.is_none());
    for env in mcp.env.iter().flatten() {
        assert!(env.value_from.as_ref().is_none_or(|f| f.secret_key_ref.is_none()));
    }
    // Audit, key and policy material belong to the sidecar alone.
    for private in [volumes::AUDIT_KEY, volumes::AUDIT, volumes::JWKS, volumes::POLICY] {
        let holders: Vec<&str> = pod(&objects)
            .init_containers
            .iter()
            .flatten()
            .chain(&pod(&objects).containers)
            .filter(|c| c.volume_mounts.iter().flatten().any(|m| m.name == private))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(holders, [SIDECAR_CONTAINER], "volume {private}");
    }
    let key = pod(&objects).volumes.iter().flatten().find(|v| v.name == volumes::AUDIT_KEY).expect("audit key");
    let secret = key.secret.as_ref().expect("secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("patient-lookup-audit-key"));
    assert_eq!(secret.default_mode, Some(0o400));
    // No secret reference anywhere in the MCP container, and no credential.
    let mcp_json = serde_json::to_string(mcp).expect("json");
    assert!(!mcp_json.contains("secretKeyRef") && !mcp_json.to_ascii_lowercase().contains("password"));
    // Without a broker or collector, no projected token at all.
    let deployment = serde_json::to_string(&objects.deployment).expect("json");
    assert!(!deployment.contains("serviceAccountToken"));
}

fn with_control_plane() -> Settings {
    Settings {
        broker_url: Some("https://mcpw-broker.mcp-warden.svc:8443".into()),
        collector_url: Some("https://mcpw-collector.mcp-warden.svc:8443".into()),
        warden_ca_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        ..Settings::default()
    }
}

#[test]
fn with_the_control_plane_only_the_sidecar_gets_identity_and_the_mcp_container_no_credential() {
    let objects = render(&clinic(), &clinic_stores(), &with_control_plane(), None).expect("renders");
    let args = sidecar(&objects).args.clone().unwrap_or_default();
    let value_of = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    assert_eq!(value_of("--broker").as_deref(), Some("https://mcpw-broker.mcp-warden.svc:8443"));
    assert_eq!(value_of("--broker-credential-file").as_deref(), Some("/var/run/mcp-warden/tokens/broker-token"));
    assert_eq!(value_of("--db-proxy-listen").as_deref(), Some("127.0.0.1:15432"));
    assert_eq!(value_of("--collector").as_deref(), Some("https://mcpw-collector.mcp-warden.svc:8443"));
    assert_eq!(value_of("--collector-credential-file").as_deref(), Some("/var/run/mcp-warden/tokens/collector-token"));
    assert_eq!(value_of("--warden-ca-file").as_deref(), Some("/etc/mcp-warden/policy/warden-ca.pem"));
    let ca = objects.policy_config_map.data.as_ref().and_then(|d| d.get("warden-ca.pem"));
    assert!(ca.is_some_and(|pem| pem.contains("BEGIN CERTIFICATE")));
    // One projected volume, one audience per service, short-lived, mounted
    // into the sidecar only.
    let tokens = pod(&objects).volumes.iter().flatten().find(|v| v.name == volumes::WARDEN_TOKENS).expect("tokens");
    let audiences: Vec<(String, i64)> = tokens
        .projected
        .as_ref()
        .and_then(|p| p.sources.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.service_account_token.as_ref())
        .map(|t| (t.audience.clone().unwrap_or_default(), t.expiration_seconds.unwrap_or_default()))
        .collect();
    assert_eq!(audiences, [("mcp-warden-collector".to_string(), 3600), ("mcp-warden-broker".to_string(), 3600)]);
    let holders: Vec<&str> = pod(&objects)
        .init_containers
        .iter()
        .flatten()
        .chain(&pod(&objects).containers)
        .filter(|c| c.volume_mounts.iter().flatten().any(|m| m.name == volumes::WARDEN_TOKENS))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(holders, [SIDECAR_CONTAINER]);
    assert_eq!(pod(&objects).automount_service_account_token, Some(false));
    // The MCP container: no database password, no token, no secret — at
    // any point, since its environment is exactly what is rendered here.
    let mcp = mcp(&objects);
    let mounts: Vec<&str> = mcp.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
    assert_eq!(mounts, [volumes::MCP_TMP]);
    assert!(mcp.env_from.is_none());
    for env in mcp.env.iter().flatten() {
        assert_eq!(crate::compliance::identity::credential_in_env(env), None, "{}", env.name);
    }
    let mcp_json = serde_json::to_string(mcp).expect("json").to_ascii_lowercase();
    for word in ["password", "secretkeyref", "token", "postgres://", "admin"] {
        assert!(!mcp_json.contains(word), "{word} in the MCP container");
    }
}

#[test]
fn a_server_without_data_access_gets_no_broker_identity() {
    let (_, mut value) = clinic_values();
    for tool in value["spec"]["tools"].as_array_mut().expect("tools") {
        tool["dataAccess"] = json!([]);
        tool["phi"] = json!(false);
        tool["noDataAccessReason"] = json!("static answers");
        tool["allowedCallers"] = json!({"groups": ["front-desk"]});
    }
    let server = admit_server(&value).expect("admitted");
    let objects = render(&server, &clinic_stores(), &with_control_plane(), None).expect("renders");
    let args = sidecar(&objects).args.clone().unwrap_or_default();
    assert!(!args.iter().any(|a| a == "--broker"));
    assert!(args.iter().any(|a| a == "--collector"));
}

#[test]
fn the_service_targets_only_the_sidecar() {
    let objects = rendered();
    let spec = objects.service.spec.as_ref().expect("spec");
    let ports = spec.ports.as_ref().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, SIDECAR_PUBLIC_PORT);
    assert_eq!(ports[0].target_port, Some(IntOrString::String("mcp".into())));
    assert_eq!(spec.selector.as_ref().expect("selector")["mcpwarden.io/server"], "patient-lookup");
    let mcp_port_named =
        sidecar(&objects).ports.iter().flatten().find(|p| p.name.as_deref() == Some("mcp")).map(|p| p.container_port);
    assert_eq!(mcp_port_named, Some(SIDECAR_PUBLIC_PORT));
}

#[test]
fn ingress_admits_only_declared_clients_on_the_sidecar_port() {
    let objects = rendered();
    let spec = objects.ingress_policy.spec.as_ref().expect("spec");
    assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
    let rules = spec.ingress.as_ref().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].from, Some(clinic().spec.network.allowed_clients));
    let ports = rules[0].ports.as_ref().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(IntOrString::Int(SIDECAR_PUBLIC_PORT)));
    // The client peer keeps namespace and pod selector together (both must match).
    let peer = &rules[0].from.as_ref().expect("from")[0];
    assert!(peer.namespace_selector.is_some() && peer.pod_selector.is_some());
}

#[test]
fn empty_allowed_clients_admit_nobody() {
    let (_, value) = clinic_values();
    let objects = rendered_from(remove(value, "/spec/network/allowedClients"), &clinic_stores());
    let json = serde_json::to_value(&objects.ingress_policy).expect("json");
    assert_eq!(json["spec"]["ingress"], json!([]), "deny-all is an explicit empty list");
    assert_eq!(json["spec"]["policyTypes"], json!(["Ingress"]));
}

fn second_store() -> PHIStore {
    let (store, _) = clinic_values();
    let store = set(
        set(store, "/metadata/name", json!("billing")),
        "/spec/endpoints/podSelector/matchLabels/app",
        json!("billing-db"),
    );
    manifest::admit(&store).expect("second store")
}

#[test]
fn egress_reaches_a_store_only_while_an_allowed_tool_uses_it() {
    let mut stores = clinic_stores();
    stores.insert("billing".into(), second_store());
    let (_, value) = clinic_values();
    let with_tool = rendered_from(value.clone(), &stores);
    assert!(reaches(&with_tool, &stores["ehr"]), "egress to the store a tool uses");
    assert!(!reaches(&with_tool, &stores["billing"]), "no egress to a store no tool uses");
    let store_rule = egress_rules(&with_tool)
        .into_iter()
        .find(|r| r.to.as_ref() == Some(&store_peers(&stores["ehr"])))
        .expect("rule");
    assert_eq!(store_rule.ports.expect("ports")[0].port, Some(IntOrString::Int(5432)));

    // (The break-glass procedure names that tool: it goes too.)
    let without_tool = rendered_from(remove(remove(value, "/spec/tools/0"), "/spec/emergencyAccess"), &stores);
    assert!(!reaches(&without_tool, &stores["ehr"]), "egress to the store disappears with its tool");
    assert_eq!(egress_rules(&without_tool).len(), 2, "only DNS and the warden remain");
}

#[test]
fn egress_holds_dns_warden_stores_and_extras_only() {
    let (_, value) = clinic_values();
    let extra = json!([{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]);
    let objects = rendered_from(set(value, "/spec/network/egress", extra), &clinic_stores());
    let rules = egress_rules(&objects);
    assert_eq!(rules.len(), 4);
    let peer = |rule: &NetworkPolicyEgressRule| -> NetworkPolicyPeer { rule.to.as_ref().expect("to")[0].clone() };
    let dns = peer(&rules[0]);
    assert_eq!(
        dns.namespace_selector.and_then(|s| s.match_labels).expect("ns")["kubernetes.io/metadata.name"],
        "kube-system"
    );
    assert_eq!(dns.pod_selector.and_then(|s| s.match_labels).expect("pods")["k8s-app"], "kube-dns");
    let warden = peer(&rules[1]);
    assert_eq!(
        warden.namespace_selector.and_then(|s| s.match_labels).expect("ns")["kubernetes.io/metadata.name"],
        "mcp-warden"
    );
    assert!(warden.pod_selector.is_some(), "control plane peer selects pods and namespace together");
    assert_eq!(peer(&rules[3]).ip_block.expect("extra").cidr, "203.0.113.0/24");
    for rule in &rules {
        assert!(rule.to.as_ref().is_some_and(|t| !t.is_empty()), "no rendered egress rule is open to everything");
    }
    let spec = objects.egress_policy.spec.as_ref().expect("spec");
    assert_eq!(spec.policy_types.as_deref(), Some(&["Egress".to_string()][..]));
    // The identity provider is not reachable: the JWKS is a mounted file.
    let text = serde_json::to_string(&objects.egress_policy).expect("json");
    assert!(!text.contains("login.example.org"));
}

#[test]
fn a_missing_store_renders_nothing() {
    let err = render(&clinic(), &BTreeMap::new(), &Settings::default(), None).expect_err("missing store");
    assert_eq!(
        err.to_string(),
        r#"tool "lookup_patient" uses PHIStore "ehr", which does not exist in namespace "clinic""#
    );
}

#[test]
fn yaml_output_round_trips() {
    let yaml = rendered().to_yaml().expect("yaml");
    let docs: Vec<Value> =
        serde_yaml::Deserializer::from_str(&yaml).map(|d| serde::Deserialize::deserialize(d).expect("doc")).collect();
    assert_eq!(docs.len(), 7);
    assert!(docs.iter().all(|d| d["metadata"]["name"].is_string()));
}
