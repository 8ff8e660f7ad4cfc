//! End-to-end tests against the cluster `KUBECONFIG` names.
//!
//! Run with `bash e2e/run.sh` (or `cargo test --test e2e -- --ignored
//! --test-threads=1`). They are ignored in a plain `cargo test`; run without
//! a reachable cluster they print why they skip and pass nothing else.
//!
//! Each test works in a namespace of its own (labelled
//! `app.kubernetes.io/created-by=mcp-warden-e2e`), installs the CRDs
//! (server-side apply), runs the operator binary of this build against the
//! cluster (watching only that namespace, its Lease there too), and deletes
//! the namespace at the end, also when a step fails; `e2e/run.sh` deletes
//! any labelled namespace left behind when the test binary itself dies.
//! Workload images are not pulled from anywhere real, so pods never become
//! ready: these tests assert what the operator creates and reports, not that
//! MCP traffic flows.
//!
//! What they prove on a real API server: the operator becomes ready; it
//! creates, reports and cleans up; a converged server's objects keep their
//! resourceVersions for 30 s and the operator sends no write; 200 servers
//! converge (time and writes per server printed); leadership moves to a
//! standby within the lease duration when the leader gets SIGTERM; the
//! chart and rendered objects pass `kubectl apply --dry-run`; the broker and
//! the collector trust exactly the service-account tokens they should; the
//! chart's emergency-access admission policy refuses self-approval, forged
//! and outsider approvals and widening, as distinct (impersonated) users.
//! That test also creates a cluster-scoped policy and binding, labelled and
//! deleted like the namespaces.

#[path = "../tests/common/chart.rs"]
#[allow(dead_code)] // shared with the offline policy tests
mod chart;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use mcp_warden::api::{MCPServer, PHIStore, all_crds};
use mcp_warden::compliance::Control;
use serde_json::{Value, json};

const MANAGER: &str = "mcp-warden-e2e";
const WAIT: Duration = Duration::from_secs(120);
const CLINIC: &str = include_str!("../examples/compliant/clinic.yaml");

/// A client for a reachable cluster, or None after saying why not.
async fn cluster(test: &str) -> Option<Client> {
    // As `mcp-warden` does at start: test builds compile in two rustls
    // providers (dev-dependencies), and a TLS client must not guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("SKIP {test}: no Kubernetes cluster configured (KUBECONFIG, ~/.kube/config or in-cluster): {e}");
            return None;
        }
    };
    match client.apiserver_version().await {
        Ok(v) => {
            eprintln!("{test}: cluster at Kubernetes {}.{}", v.major, v.minor);
            Some(client)
        }
        Err(e) => {
            eprintln!("SKIP {test}: the configured cluster is not reachable: {e}");
            None
        }
    }
}

/// Label on every namespace this suite creates; `e2e/run.sh` deletes
/// leftovers carrying it even when a test binary aborts.
const RUN_LABEL: &str = "app.kubernetes.io/created-by";

/// The test namespace and the operator processes; all go away on drop.
struct Run {
    namespace: String,
    operators: Vec<Child>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for operator in &mut self.operators {
            let _ = operator.kill();
            let _ = operator.wait();
        }
        let namespace = self.namespace.clone();
        // Drop cannot await. A short-lived runtime on another thread can,
        // with a client of its own: the test's client dispatches through a
        // task on the test's runtime, which is blocked in this join.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let Ok(client) = Client::try_default().await else { return };
                let api: Api<Namespace> = Api::all(client);
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), api.delete(&namespace, &DeleteParams::background()))
                        .await;
            });
            Ok::<(), std::io::Error>(())
        })
        .join();
    }
}

async fn start(client: Client) -> Run {
    let namespace = format!("mcpw-e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": namespace, "labels": {RUN_LABEL: MANAGER}}
    }))
    .expect("namespace");
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    Run { namespace, operators: Vec::new() }
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in all_crds() {
        let name = crd.name_any();
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd)).await.expect("apply CRD");
        tokio::time::timeout(WAIT, await_condition(api.clone(), &name, conditions::is_crd_established()))
            .await
            .expect("CRD established in time")
            .expect("CRD watch");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Runs the operator binary of this build against the cluster, watching
/// only the test namespace and keeping its Lease there; returns the base URL
/// of its health port once it is ready.
async fn run_operator(run: &mut Run, identity: &str, extra: &[&str]) -> String {
    let port = free_port();
    let mut args = vec![
        "operator".to_string(),
        "--health-listen".into(),
        format!("127.0.0.1:{port}"),
        "--resync-seconds".into(),
        "15".into(),
        // Never touch MCPServers of other namespaces on a shared cluster.
        "--watch-namespace".into(),
        run.namespace.clone(),
        "--lease-namespace".into(),
        run.namespace.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new(env!("CARGO_BIN_EXE_mcp-warden"))
        .args(&args)
        .env("POD_NAME", identity)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the operator");
    run.operators.push(child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            eprintln!("operator {identity} ready after {:?}", started.elapsed());
            return base;
        }
        assert!(started.elapsed() < WAIT, "the operator did not become ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sum of the operator's write requests (POST, PUT, PATCH, DELETE), Lease
/// renewals excluded (they use a client of their own).
async fn operator_writes(base: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with("mcpwarden_operator_api_requests_total") && !l.contains("method=\"GET\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The holder of the operator's Lease in `namespace`.
async fn lease_holder(client: &Client, namespace: &str) -> Option<String> {
    let api: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), namespace);
    api.get_opt("mcp-warden-operator").await.ok()??.spec?.holder_identity
}

/// The clinic example in the test namespace, keys from a ConfigMap (no
/// network needed to an identity provider).
fn clinic(namespace: &str) -> (Value, Value) {
    let mut docs: Vec<Value> = serde_yaml::Deserializer::from_str(CLINIC)
        .map(|d| serde::Deserialize::deserialize(d).expect("example YAML"))
        .collect();
    for doc in &mut docs {
        doc["metadata"]["namespace"] = json!(namespace);
    }
    let mut server = docs.remove(1);
    let oidc = server["spec"]["authentication"]["oidc"].as_object_mut().expect("oidc");
    oidc.remove("jwksUri");
    oidc.insert("jwksConfigMapRef".into(), json!({"name": "idp-keys"}));
    (docs.remove(0), server)
}

async fn apply<K>(api: &Api<K>, object: &Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object["metadata"]["name"].as_str().expect("name");
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object)).await.expect("apply");
}

/// Polls until `check` returns Some, or fails after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn condition(server: &MCPServer, type_: &str) -> Option<(String, String)> {
    server.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.message.clone()))
}

fn reaches_store(policy: &NetworkPolicy) -> bool {
    serde_json::to_string(&policy.spec).unwrap_or_default().contains("ehr-db")
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn operator_reconciles_reports_and_cleans_up() {
    let Some(client) = cluster("operator_reconciles_reports_and_cleans_up").await else { return };
    install_crds(&client).await;
    let mut run = start(client.clone()).await;
    let ns = run.namespace.clone();
    run_operator(&mut run, "e2e-operator", &[]).await;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let keys: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "idp-keys"},
        "data": {"jwks.json": r#"{"keys":[{"kty":"RSA","kid":"e2e","n":"AQAB","e":"AQAB"}]}"#}
    }))
    .expect("configmap");
    config_maps.create(&PostParams::default(), &keys).await.expect("keys");
    let (store, server) = clinic(&ns);
    let stores: Api<PHIStore> = Api::namespaced(client.clone(), &ns);
    let servers: Api<MCPServer> = Api::namespaced(client.clone(), &ns);
    apply(&stores, &store).await;
    apply(&servers, &server).await;

    // Status and owned objects.
    let reported = eventually("status with every control", || async {
        let s = servers.get("patient-lookup").await.ok()?;
        (s.status.as_ref()?.controls.len() == Control::ALL.len() && condition(&s, "Compliant").is_some()).then_some(s)
    })
    .await;
    let status = reported.status.clone().expect("status");
    assert_eq!(status.counts.phi_tools, 1);
    let access = status.controls.iter().find(|c| c.id == "access-control").expect("access-control");
    assert_eq!(access.verdict, mcp_warden::api::Verdict::Pass, "{}", access.message);
    assert_ne!(condition(&reported, "Compliant").map(|c| c.0).as_deref(), Some("True"), "break-glass is not verified");
    let uid = reported.uid().expect("uid");
    let owned_by_server = |owners: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
        owners.is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)))
    };
    let deployment =
        Api::<Deployment>::namespaced(client.clone(), &ns).get("patient-lookup").await.expect("deployment");
    assert!(owned_by_server(deployment.metadata.owner_references.as_ref()));
    let pod = deployment.spec.template.spec.clone().expect("pod spec");
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(
        pod.init_containers
            .iter()
            .flatten()
            .any(|c| c.name == "mcp-warden-sidecar" && c.restart_policy.as_deref() == Some("Always"))
    );
    Api::<Service>::namespaced(client.clone(), &ns).get("patient-lookup").await.expect("service");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns).get("patient-lookup-mcpw").await.expect("service account");
    config_maps.get("patient-lookup-policy").await.expect("policy");
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let ingress = policies.get("patient-lookup-ingress").await.expect("ingress policy");
    assert!(owned_by_server(ingress.metadata.owner_references.as_ref()));
    assert!(reaches_store(&policies.get("patient-lookup-egress").await.expect("egress policy")));

    // A foreign widening NetworkPolicy: Compliant False, named.
    let widen: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "allow-everything"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}
    }))
    .expect("policy");
    policies.create(&PostParams::default(), &widen).await.expect("create widening policy");
    let message = eventually("Compliant False naming the policy", || async {
        let s = servers.get("patient-lookup").await.ok()?;
        let (status, _) = condition(&s, "Compliant")?;
        let access = s.status?.controls.into_iter().find(|c| c.id == "access-control")?;
        (status == "False" && access.message.contains("allow-everything")).then_some(access.message)
    })
    .await;
    assert!(message.contains(&format!("NetworkPolicy {ns}/allow-everything")), "{message}");
    policies.delete("allow-everything", &DeleteParams::default()).await.expect("delete widening policy");

    // Dropping the PHI tool closes egress to its store.
    let mut without_phi = server.clone();
    without_phi["spec"]["tools"].as_array_mut().expect("tools").retain(|t| t["name"] != "lookup_patient");
    apply(&servers, &without_phi).await;
    eventually("egress to the store removed", || async {
        let egress = policies.get("patient-lookup-egress").await.ok()?;
        (!reaches_store(&egress)).then_some(())
    })
    .await;

    // Deleting the MCPServer removes every owned object.
    servers.delete("patient-lookup", &DeleteParams::default()).await.expect("delete server");
    eventually("server and owned objects gone", || async {
        let selector = ListParams::default().labels("mcpwarden.io/server=patient-lookup");
        let left = servers.get_opt("patient-lookup").await.ok()?.is_some() as usize
            + Api::<Deployment>::namespaced(client.clone(), &ns).list(&selector).await.ok()?.items.len()
            + Api::<Service>::namespaced(client.clone(), &ns).list(&selector).await.ok()?.items.len()
            + Api::<ServiceAccount>::namespaced(client.clone(), &ns).list(&selector).await.ok()?.items.len()
            + config_maps.list(&selector).await.ok()?.items.len()
            + policies.list(&selector).await.ok()?.items.len();
        (left == 0).then_some(())
    })
    .await;
    drop(run);
}

/// helm and kubectl: from PATH, or as installed by `.ci/k8s-tools.sh`.
fn tool(name: &str) -> Option<String> {
    let local = format!("{}/.ci/bin/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::path::Path::new(&local).exists() {
        return Some(local);
    }
    Command::new(name).arg("version").arg("--client").output().ok().map(|_| name.to_string())
}

fn pipe(producer: &mut Command, consumer: &mut Command) -> (bool, String) {
    let produced = producer.output().expect("run producer");
    assert!(produced.status.success(), "{}", String::from_utf8_lossy(&produced.stderr));
    let mut child =
        consumer.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run consumer");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(&produced.stdout).expect("pipe");
    let out = child.wait_with_output().expect("wait");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn chart_and_rendered_objects_pass_kubectl_dry_runs() {
    let Some(client) = cluster("chart_and_rendered_objects_pass_kubectl_dry_runs").await else { return };
    let (Some(helm), Some(kubectl)) = (tool("helm"), tool("kubectl")) else {
        eprintln!("SKIP chart dry runs: helm and kubectl not found (bash .ci/k8s-tools.sh installs them)");
        return;
    };
    install_crds(&client).await;
    let run = start(client.clone()).await;
    let chart = format!("{}/charts/mcp-warden", env!("CARGO_MANIFEST_DIR"));
    for mode in ["client", "server"] {
        let (ok, out) = pipe(
            Command::new(&helm).args(["template", "mcpw", &chart, "--namespace", &run.namespace]),
            Command::new(&kubectl).args(["apply", &format!("--dry-run={mode}"), "-f", "-"]),
        );
        assert!(ok, "helm template | kubectl apply --dry-run={mode}: {out}");
        let (ok, out) = pipe(
            Command::new(&helm).args(["template", "mcpw", &chart, "--namespace", &run.namespace]).args([
                "--set",
                "broker.enabled=true",
                "--set",
                "broker.tls.secretName=mcpw-broker-tls",
                "--set",
                "broker.revokerSecretName=mcpw-broker-revoker",
            ]),
            Command::new(&kubectl).args(["apply", &format!("--dry-run={mode}"), "-f", "-"]),
        );
        assert!(ok, "helm template (broker enabled) | kubectl apply --dry-run={mode}: {out}");
        let (ok, out) = pipe(
            Command::new(&helm).args(["template", "mcpw", &chart, "--namespace", &run.namespace]).args([
                "--set",
                "collector.enabled=true",
                "--set",
                "collector.tls.secretName=mcpw-collector-tls",
                "--set",
                "collector.signingKeySecretName=mcpw-collector-signing",
                "--set",
                "wardenCa.configMapName=mcpw-warden-ca",
            ]),
            Command::new(&kubectl).args(["apply", &format!("--dry-run={mode}"), "-f", "-"]),
        );
        assert!(ok, "helm template (collector enabled) | kubectl apply --dry-run={mode}: {out}");
    }
    // What the operator would create, as the API server would take it.
    let dir = tempfile::tempdir().expect("tempdir");
    let example = dir.path().join("clinic.yaml");
    std::fs::write(&example, CLINIC.replace("namespace: clinic", &format!("namespace: {}", run.namespace)))
        .expect("write");
    let (ok, out) = pipe(
        Command::new(env!("CARGO_BIN_EXE_mcp-warden")).args(["render", "-f", example.to_str().expect("path")]),
        Command::new(&kubectl).args(["apply", "--dry-run=server", "-f", "-"]),
    );
    assert!(ok, "render | kubectl apply --dry-run=server: {out}");
    // Wired to the broker and the collector: projected tokens in the sidecar.
    let (ok, out) = pipe(
        Command::new(env!("CARGO_BIN_EXE_mcp-warden")).args([
            "render",
            "-f",
            example.to_str().expect("path"),
            "--broker-url",
            "https://mcpw-broker.mcp-warden.svc:8443",
            "--collector-url",
            "https://mcpw-collector.mcp-warden.svc:8443",
        ]),
        Command::new(&kubectl).args(["apply", "--dry-run=server", "-f", "-"]),
    );
    assert!(ok, "render (wired) | kubectl apply --dry-run=server: {out}");
    drop(run);
}

/// A projected-style token of a service account for `audience`.
async fn token_for(client: &Client, namespace: &str, account: &str, audience: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = api.create_token_request(account, &PostParams::default(), &request).await.expect("token request");
    answer.status.and_then(|s| s.token).expect("a token")
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn broker_reviews_sidecar_tokens_reads_its_inventory_and_writes_store_status() {
    use mcp_warden::broker::cluster::{BROKER_AUDIENCE, ReviewError, StatusWriter, TokenReviewer, load_inventory};
    use mcp_warden::broker::inventory::StoreRef;
    use mcp_warden::policy::ServerRef;
    let Some(client) = cluster("broker_reviews_sidecar_tokens_reads_its_inventory_and_writes_store_status").await
    else {
        return;
    };
    install_crds(&client).await;
    let run = start(client.clone()).await;
    let ns = run.namespace.clone();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    for name in ["patient-lookup-mcpw", "other"] {
        apply(
            &accounts,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}),
        )
        .await;
    }

    // TokenReview, as the real API server answers it.
    let reviewer = TokenReviewer::new(client.clone(), BROKER_AUDIENCE);
    let sidecar = token_for(&client, &ns, "patient-lookup-mcpw", BROKER_AUDIENCE).await;
    assert_eq!(
        reviewer.server_of(&sidecar).await.expect("the sidecar's token"),
        ServerRef { namespace: ns.clone(), name: "patient-lookup".into() }
    );
    let collector_audience = token_for(&client, &ns, "patient-lookup-mcpw", "mcp-warden-collector").await;
    assert!(
        matches!(reviewer.server_of(&collector_audience).await, Err(ReviewError::NotAuthenticated(_))),
        "a token for another audience is refused"
    );
    let other = token_for(&client, &ns, "other", BROKER_AUDIENCE).await;
    assert!(matches!(reviewer.server_of(&other).await, Err(ReviewError::NotASidecar)));

    // The inventory from the API: the store, its admin Secret (by name), the JWKS ConfigMap.
    let (store, server) = clinic(&ns);
    apply(&Api::<PHIStore>::namespaced(client.clone(), &ns), &store).await;
    apply(&Api::<MCPServer>::namespaced(client.clone(), &ns), &server).await;
    apply(
        &Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ehr-db-admin", "namespace": ns},
                "stringData": {"username": "warden_admin", "password": "e2e-password"}}),
    )
    .await;
    let jwks = include_str!("../tests/fixtures/test-jwks.json");
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns),
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "idp-keys", "namespace": ns},
                "data": {"jwks.json": jwks}}),
    )
    .await;
    let inventory =
        load_inventory(&client, Some(&ns), mcp_warden::breakglass::DEFAULT_ADMISSION_POLICY).await.expect("inventory");
    let key = StoreRef { namespace: ns.clone(), name: "ehr".into() };
    let entry = inventory.stores[&key].as_ref().expect("store usable");
    assert_eq!(entry.access.admin_user, "warden_admin");
    let server_key = ServerRef { namespace: ns.clone(), name: "patient-lookup".into() };
    assert!(inventory.servers[&server_key].is_ok(), "{:?}", inventory.servers[&server_key].as_ref().err());

    // Status under the broker's own field manager.
    let status = mcp_warden::api::PHIStoreStatus { admin_missing: vec!["CREATEROLE".into()], ..Default::default() };
    let writer = StatusWriter::new(client.clone());
    assert_eq!(writer.write(&std::collections::BTreeMap::from([(key.clone(), status)])).await.expect("status"), 1);
    let stored = Api::<PHIStore>::namespaced(client.clone(), &ns).get("ehr").await.expect("store");
    assert_eq!(stored.status.expect("status").admin_missing, vec!["CREATEROLE".to_string()]);
    let managers: Vec<String> =
        stored.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.iter().any(|m| m == "mcp-warden-broker"), "{managers:?}");

    // Deleting the MCPServer ends its access while a finalizer still holds
    // the object (as the operator's does until its cleanup is done).
    let servers = Api::<MCPServer>::namespaced(client.clone(), &ns);
    let hold = json!({"metadata": {"finalizers": ["e2e.mcpwarden.io/hold"]}});
    servers.patch("patient-lookup", &PatchParams::default(), &Patch::Merge(&hold)).await.expect("finalizer");
    servers.delete("patient-lookup", &Default::default()).await.expect("delete");
    let inventory =
        load_inventory(&client, Some(&ns), mcp_warden::breakglass::DEFAULT_ADMISSION_POLICY).await.expect("inventory");
    let entry = inventory.servers.get(&server_key).expect("still listed while held");
    assert!(entry.as_ref().is_err_and(|e| e.contains("being deleted")), "a server being deleted is unusable");
    assert!(!inventory.groups().contains_key(&key), "it wants no group role, so its leases end");
    let release = json!({"metadata": {"finalizers": null}});
    servers.patch("patient-lookup", &PatchParams::default(), &Patch::Merge(&release)).await.expect("release");
    drop(run);
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn collector_knows_senders_and_its_reader_by_real_service_account_tokens() {
    use mcp_warden::audit::collector::{self, Readers, Senders, store::Storage};
    use mcp_warden::audit::record::{Chain, Event, Kind};
    use mcp_warden::audit::{Wal, WalConfig};
    use mcp_warden::token_review::{BROKER_AUDIENCE, COLLECTOR_AUDIENCE, TokenReviewer};
    use std::sync::Arc;
    let Some(client) = cluster("collector_knows_senders_and_its_reader_by_real_service_account_tokens").await else {
        return;
    };
    let run = start(client.clone()).await;
    let ns = run.namespace.clone();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    for name in ["patient-lookup-mcpw", "billing-mcpw", "mcpw-broker", "mcpw-operator"] {
        apply(
            &accounts,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}),
        )
        .await;
    }
    // The collector as it runs in a cluster, reviewing with the API server.
    let reviewer = Arc::new(TokenReviewer::new(client.clone(), COLLECTOR_AUDIENCE));
    let data = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(std::sync::Mutex::new(Storage::open(data.path()).expect("storage")));
    std::fs::create_dir_all(data.path().join("incidents")).expect("dir");
    let incidents =
        Arc::new(Wal::open(WalConfig::new(data.path().join("incidents"), collector::COLLECTOR_SERVER)).expect("wal"));
    let senders = Senders::TokenReview(
        Arc::clone(&reviewer),
        vec![(format!("system:serviceaccount:{ns}:mcpw-broker"), mcp_warden::audit::collector::BROKER_SENDER)],
    );
    let readers = Readers::ServiceAccount(Arc::clone(&reviewer), format!("system:serviceaccount:{ns}:mcpw-operator"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = collector::router(storage, incidents, senders, readers).expect("the collector's router");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let http = reqwest::Client::new();
    let first_record = |stream: &str, server: &str| {
        let mut chain = Chain::new(stream.to_string(), server.to_string(), None);
        let mut line = chain.seal(Event::new(Kind::StreamStart), chrono::Utc::now()).expect("seal").record.to_line();
        line.push(b'\n');
        line
    };
    let send = async |token: &str, line: Vec<u8>| {
        http.post(format!("{base}/v1/records"))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(line)
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    };
    let server = format!("{ns}/patient-lookup");
    let sidecar = token_for(&client, &ns, "patient-lookup-mcpw", COLLECTOR_AUDIENCE).await;
    let wrong_audience = token_for(&client, &ns, "patient-lookup-mcpw", BROKER_AUDIENCE).await;
    let other_sidecar = token_for(&client, &ns, "billing-mcpw", COLLECTOR_AUDIENCE).await;
    let broker = token_for(&client, &ns, "mcpw-broker", COLLECTOR_AUDIENCE).await;
    let operator = token_for(&client, &ns, "mcpw-operator", COLLECTOR_AUDIENCE).await;
    let own = first_record(&format!("{server}/pod-1/s1"), &server);
    assert_eq!(send(&wrong_audience, own.clone()).await, 401, "a token for the broker's audience");
    assert_eq!(send(&other_sidecar, own.clone()).await, 403, "another server's sidecar");
    assert_eq!(send(&operator, own.clone()).await, 401, "not a sidecar");
    assert_eq!(send(&sidecar, own).await, 200, "its own server's stream");
    let leases = first_record(&format!("{ns}/billing/broker-0/s1"), &format!("{ns}/billing"));
    assert_eq!(send(&broker, leases).await, 200, "the broker ships any server's lease stream");

    // Only the operator's account reads per-server health.
    let health = async |token: &str| {
        http.get(format!("{base}/v1/health")).bearer_auth(token).send().await.expect("health").status().as_u16()
    };
    assert_eq!(health(&sidecar).await, 401);
    assert_eq!(health(&broker).await, 401);
    assert_eq!(health(&operator).await, 200);
    drop(run);
}

/// The server `name` of the clinic example, keys from ConfigMap `idp-keys`.
fn clinic_server(namespace: &str, name: &str) -> Value {
    let (_, mut server) = clinic(namespace);
    server["metadata"]["name"] = json!(name);
    server
}

async fn keys_and_store(client: &Client, namespace: &str) {
    let keys = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "idp-keys", "namespace": namespace},
                      "data": {"jwks.json": include_str!("../tests/fixtures/test-jwks.json")}});
    apply(&Api::<ConfigMap>::namespaced(client.clone(), namespace), &keys).await;
    let (store, _) = clinic(namespace);
    apply(&Api::<PHIStore>::namespaced(client.clone(), namespace), &store).await;
}

/// Whether the server has a status for its current generation.
fn reported(server: &MCPServer) -> bool {
    server
        .status
        .as_ref()
        .is_some_and(|s| s.observed_generation == server.metadata.generation && s.controls.len() == Control::ALL.len())
}

/// resourceVersions of the server and everything it owns.
async fn versions(client: &Client, namespace: &str, name: &str) -> Vec<(String, String)> {
    let selector =
        ListParams::default().labels(&format!("mcpwarden.io/server={name},app.kubernetes.io/managed-by=mcp-warden"));
    let mut out = Vec::new();
    let rv = |kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (format!("{kind} {}", meta.name.clone().unwrap_or_default()), meta.resource_version.clone().unwrap_or_default())
    };
    let server = Api::<MCPServer>::namespaced(client.clone(), namespace).get(name).await.expect("server");
    out.push(rv("MCPServer", &server.metadata));
    for d in Api::<Deployment>::namespaced(client.clone(), namespace).list(&selector).await.expect("list").items {
        out.push(rv("Deployment", &d.metadata));
    }
    for s in Api::<Service>::namespaced(client.clone(), namespace).list(&selector).await.expect("list").items {
        out.push(rv("Service", &s.metadata));
    }
    for a in Api::<ServiceAccount>::namespaced(client.clone(), namespace).list(&selector).await.expect("list").items {
        out.push(rv("ServiceAccount", &a.metadata));
    }
    for c in Api::<ConfigMap>::namespaced(client.clone(), namespace).list(&selector).await.expect("list").items {
        out.push(rv("ConfigMap", &c.metadata));
    }
    for p in Api::<NetworkPolicy>::namespaced(client.clone(), namespace).list(&selector).await.expect("list").items {
        out.push(rv("NetworkPolicy", &p.metadata));
    }
    out.sort();
    out
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn a_converged_server_and_its_objects_stay_unchanged() {
    let Some(client) = cluster("a_converged_server_and_its_objects_stay_unchanged").await else { return };
    install_crds(&client).await;
    let mut run = start(client.clone()).await;
    let ns = run.namespace.clone();
    let operator = run_operator(&mut run, "e2e-quiet", &[]).await;
    keys_and_store(&client, &ns).await;
    apply(&Api::<MCPServer>::namespaced(client.clone(), &ns), &clinic_server(&ns, "patient-lookup")).await;
    let servers: Api<MCPServer> = Api::namespaced(client.clone(), &ns);
    eventually("a status for the generation", || async { servers.get("patient-lookup").await.ok().filter(reported) })
        .await;
    // Let the Deployment controller, the pods and the debounce settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = versions(&client, &ns, "patient-lookup").await;
    let writes_before = operator_writes(&operator).await;
    assert!(before.len() >= 6, "the server and its objects: {before:?}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = versions(&client, &ns, "patient-lookup").await;
    let writes_after = operator_writes(&operator).await;
    eprintln!(
        "after convergence, 30 s: {} object(s) unchanged; operator writes {writes_before} -> {writes_after}",
        after.len()
    );
    assert_eq!(before, after, "a converged world is left alone");
    assert_eq!(writes_before, writes_after, "no write request in steady state");
    drop(run);
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn two_hundred_servers_converge_with_bounded_writes() {
    const N: usize = 200;
    let Some(client) = cluster("two_hundred_servers_converge_with_bounded_writes").await else { return };
    install_crds(&client).await;
    let mut run = start(client.clone()).await;
    let ns = run.namespace.clone();
    keys_and_store(&client, &ns).await;
    let servers: Api<MCPServer> = Api::namespaced(client.clone(), &ns);
    for i in 0..N {
        apply(&servers, &clinic_server(&ns, &format!("s-{i:03}"))).await;
    }
    let operator = run_operator(&mut run, "e2e-scale", &["--concurrency", "16"]).await;
    let started = Instant::now();
    let mut done = 0;
    while done < N {
        done = servers.list(&ListParams::default()).await.expect("list").items.iter().filter(|s| reported(s)).count();
        assert!(started.elapsed() < Duration::from_secs(600), "{done}/{N} reconciled after 10 min");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let reconciled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let writes = operator_writes(&operator).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let later = operator_writes(&operator).await;
    eprintln!(
        "{N} servers: all reconciled in {reconciled:?}; {writes} writes ({:.1} per server, events included); {} more in the next 30 s",
        writes / N as f64,
        later - writes
    );
    // Six owned objects, the finalizer, the status (maybe twice), a few
    // events: a loop would be far above this.
    assert!(writes / (N as f64) <= 14.0, "{writes} writes for {N} servers");
    assert_eq!(later, writes, "no writes once converged");
    drop(run);
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn leadership_moves_to_the_standby_when_the_leader_stops() {
    let Some(client) = cluster("leadership_moves_to_the_standby_when_the_leader_stops").await else { return };
    install_crds(&client).await;
    let mut run = start(client.clone()).await;
    let ns = run.namespace.clone();
    keys_and_store(&client, &ns).await;
    run_operator(&mut run, "e2e-a", &[]).await;
    eventually("a leads", || async { lease_holder(&client, &ns).await.filter(|h| h.starts_with("e2e-a_")) }).await;
    // The standby reports ready with warm caches while it does not lead.
    run_operator(&mut run, "e2e-b", &[]).await;
    let servers: Api<MCPServer> = Api::namespaced(client.clone(), &ns);
    apply(&servers, &clinic_server(&ns, "patient-lookup")).await;
    eventually("a status", || async { servers.get("patient-lookup").await.ok().filter(reported) }).await;

    // SIGTERM: a stops reconciling and releases the Lease.
    let leader = run.operators[0].id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(leader, libc::SIGTERM) };
    let stopped = Instant::now();
    eventually("b leads", || async { lease_holder(&client, &ns).await.filter(|h| h.starts_with("e2e-b_")) }).await;
    let took = stopped.elapsed();
    eprintln!("leadership moved in {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(10), "within the lease duration: the lease was released ({took:?})");
    let status = run.operators[0].wait().expect("a exits");
    assert!(status.success(), "a stopped cleanly: {status}");

    // The new leader acts: dropping the PHI tool closes egress to its store.
    let mut without_phi = clinic_server(&ns, "patient-lookup");
    without_phi["spec"]["tools"].as_array_mut().expect("tools").retain(|t| t["name"] != "lookup_patient");
    apply(&servers, &without_phi).await;
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    eventually("egress to the store removed by b", || async {
        let egress = policies.get("patient-lookup-egress").await.ok()?;
        (!reaches_store(&egress)).then_some(())
    })
    .await;
    drop(run);
}

/// A client acting as `user` in `groups` (impersonation: the suite's own
/// identity may impersonate on a test cluster).
async fn acting_as(user: &str, groups: &[&str]) -> Client {
    let mut config = kube::Config::infer().await.expect("config");
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    Client::try_from(config).expect("impersonating client")
}

/// A chart policy and binding (`docs`), named after `namespace` and bound to
/// it only (a shared cluster's other namespaces are left alone), labelled
/// for `e2e/run.sh`'s cleanup.
fn bound_to_namespace(mut docs: Vec<Value>, namespace: &str) -> (Value, Value) {
    for doc in &mut docs {
        doc["metadata"]["labels"] = json!({RUN_LABEL: MANAGER});
    }
    docs[1]["spec"]["matchResources"] =
        json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}});
    (docs[0].clone(), docs[1].clone())
}

/// The chart's emergency-access policy and binding, for `namespace` only.
fn emergency_policy(namespace: &str) -> (Value, Value) {
    bound_to_namespace(chart::emergency_admission_policy(namespace), namespace)
}

/// The chart's server-pod policy and binding, for `namespace` only.
fn server_pod_policy(namespace: &str) -> (Value, Value) {
    bound_to_namespace(chart::server_pod_policy(namespace), namespace)
}

/// Creates a policy and its binding; they are deleted when the first value
/// returned is dropped. The second is the bindings' API.
async fn install_policy(
    client: &Client,
    (policy, binding): (Value, Value),
) -> (AdmissionObjects, Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>) {
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    let name = policy["metadata"]["name"].as_str().expect("name").to_string();
    let cleanup = AdmissionObjects(name);
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    policies.create(&PostParams::default(), &serde_json::from_value(policy).expect("policy")).await.expect("policy");
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    bindings.create(&PostParams::default(), &serde_json::from_value(binding).expect("binding")).await.expect("binding");
    (cleanup, bindings)
}

/// Deletes the run's cluster-scoped admission objects when dropped.
struct AdmissionObjects(String);

impl Drop for AdmissionObjects {
    fn drop(&mut self) {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let Ok(client) = Client::try_default().await else { return };
                let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
                let _ = bindings.delete(&name, &DeleteParams::default()).await;
                let policies: Api<ValidatingAdmissionPolicy> = Api::all(client);
                let _ = policies.delete(&name, &DeleteParams::default()).await;
            });
            Ok::<(), std::io::Error>(())
        })
        .join();
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn the_api_server_refuses_self_approval_and_widening_and_the_operator_judges_the_rest() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use mcp_warden::api::EmergencyAccess;
    let test = "the_api_server_refuses_self_approval_and_widening_and_the_operator_judges_the_rest";
    let Some(client) = cluster(test).await else { return };
    install_crds(&client).await;
    let mut run = start(client.clone()).await;
    let ns = run.namespace.clone();

    // The chart's policy, bound to this namespace only.
    let (cleanup, bindings) = install_policy(&client, emergency_policy(&ns)).await;
    let name = cleanup.0.clone();

    // The people may create and update grants here (RBAC); who may do what
    // beyond that is the policy's to say.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "emergency-access", "namespace": ns},
        "rules": [{"apiGroups": ["mcpwarden.io"], "resources": ["emergencyaccesses"],
                   "verbs": ["get", "list", "create", "update", "patch"]}]
    }))
    .expect("role");
    Api::<Role>::namespaced(client.clone(), &ns).create(&PostParams::default(), &role).await.expect("role");
    let people = ["oidc:nurse-joy", "oidc:dr-house", "oidc:janitor", "oidc:dr-who"];
    let subjects: Vec<Value> =
        people.iter().map(|u| json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": u})).collect();
    let role_binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "emergency-access", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "emergency-access"},
        "subjects": subjects
    }))
    .expect("role binding");
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &role_binding)
        .await
        .expect("role binding");

    // The server and its procedure (no operator needed: it is the param).
    let (_, mut server) = clinic(&ns);
    server["spec"]["emergencyAccess"] = json!({
        "approvers": {"users": ["oidc:dr-house"], "groups": ["er-attendings"]},
        "maxDuration": "2h", "tools": ["lookup_patient"], "approval": "Required",
        "kubernetesUsernamePrefix": "oidc:"
    });
    apply(&Api::<MCPServer>::namespaced(client.clone(), &ns), &server).await;

    let grant = |name: &str, requester: &str| -> EmergencyAccess {
        serde_json::from_value(json!({
            "apiVersion": "mcpwarden.io/v1alpha1", "kind": "EmergencyAccess",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"server": "patient-lookup", "requester": requester, "beneficiary": "er-agent",
                     "tools": ["lookup_patient"], "reason": "unconscious patient", "duration": "1h"}
        }))
        .expect("grant")
    };
    let grants_as = |client: &Client| Api::<EmergencyAccess>::namespaced(client.clone(), &ns);
    let nurse = grants_as(&acting_as("oidc:nurse-joy", &[]).await);
    let house = grants_as(&acting_as("oidc:dr-house", &[]).await);
    let janitor = grants_as(&acting_as("oidc:janitor", &["staff"]).await);
    let refusal = |result: Result<EmergencyAccess, kube::Error>| match result {
        Ok(_) => "admitted".to_string(),
        Err(e) => e.to_string(),
    };

    // Policies take a moment to be in force: until then a forged requester
    // would pass; wait for its refusal.
    let mut probe = 0;
    eventually("the emergency-access policy in force", || {
        probe += 1;
        let (nurse, grant) = (nurse.clone(), grant(&format!("probe-{probe}"), "oidc:someone-else"));
        async move {
            match nurse.create(&PostParams::default(), &grant).await {
                Err(e) if e.to_string().contains("spec.requester must be the user creating") => Some(()),
                _ => None,
            }
        }
    })
    .await;
    // The requester creates an unapproved grant.
    nurse.create(&PostParams::default(), &grant("er-1", "oidc:nurse-joy")).await.expect("the requester's grant");
    let approve = |by: &str| Patch::Merge(json!({"spec": {"approval": {"approver": by}}}));
    let params = PatchParams::default();
    let self_approved = refusal(nurse.patch("er-1", &params, &approve("oidc:nurse-joy")).await);
    assert!(self_approved.contains("self-approval"), "{self_approved}");
    let forged = refusal(nurse.patch("er-1", &params, &approve("oidc:dr-house")).await);
    assert!(forged.contains("must be the user approving"), "{forged}");
    let outsider = refusal(janitor.patch("er-1", &params, &approve("oidc:janitor")).await);
    assert!(outsider.contains("only an approver"), "{outsider}");
    // The approver approves; nothing widens afterwards.
    house.patch("er-1", &params, &approve("oidc:dr-house")).await.expect("the approver's approval");
    let widened = refusal(nurse.patch("er-1", &params, &Patch::Merge(json!({"spec": {"duration": "2h"}}))).await);
    assert!(widened.contains("cannot be changed"), "{widened}");
    let longer = refusal(
        nurse
            .create(&PostParams::default(), &{
                let mut g = grant("er-2", "oidc:nurse-joy");
                g.spec.duration = "3h".into();
                g
            })
            .await,
    );
    assert!(longer.contains("maxDuration"), "{longer}");

    // The operator judges what admission let through. Bound to this
    // namespace only, the policy does not cover every grant, so the
    // operator refuses them all (defence in depth)…
    keys_and_store(&client, &ns).await;
    let policy_flag = ["--leader-election=false", "--emergency-admission-policy", name.as_str()];
    run_operator(&mut run, "e2e-grants", &policy_flag).await;
    let grants = Api::<EmergencyAccess>::namespaced(client.clone(), &ns);
    let judged = |wanted: &'static str| {
        let grants = grants.clone();
        move || {
            let grants = grants.clone();
            async move {
                let grant = grants.get("er-1").await.ok()?;
                let status = grant.status?;
                (status.state.map(|s| format!("{s:?}")).as_deref() == Some(wanted)).then_some(status)
            }
        }
    };
    let refused = eventually("er-1 refused while the binding selects only this namespace", judged("Refused")).await;
    assert!(refused.message.as_deref().unwrap_or_default().contains("selects only some grants"), "{refused:?}");
    // …and once it covers every grant (as the chart binds it), the grant,
    // created after the policy and approved by dr-house, is in force.
    bindings
        .patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"matchResources": null}})))
        .await
        .expect("bind the policy cluster-wide, as the chart does");
    let active = eventually("er-1 active", judged("Active")).await;
    let (approved, expires) = (active.approved_at.expect("stamped"), active.expires_at.expect("bounded"));
    assert_eq!(expires.0.duration_since(approved.0), k8s_openapi::jiff::SignedDuration::from_hours(1));
    let servers = Api::<MCPServer>::namespaced(client.clone(), &ns);
    eventually("the server naming er-1 in its emergency-access control", || {
        let servers = servers.clone();
        async move {
            let server = servers.get("patient-lookup").await.ok()?;
            let control = server.status?.controls.into_iter().find(|c| c.id == "emergency-access")?;
            (control.verdict == mcp_warden::api::Verdict::Pass && control.message.contains("er-1 (er-agent"))
                .then_some(())
        }
    })
    .await;
    // Revoked by the requester: it ends, with events on both objects.
    nurse.patch("er-1", &params, &Patch::Merge(json!({"spec": {"revoked": true}}))).await.expect("revoke");
    eventually("er-1 revoked", judged("Revoked")).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<(String, String)> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| Some((e.reason?, e.regarding?.kind?)))
        .filter(|(reason, _)| reason.starts_with("EmergencyAccess"))
        .collect();
    for kind in ["EmergencyAccess", "MCPServer"] {
        assert!(reasons.contains(&("EmergencyAccessActive".into(), kind.into())), "{reasons:?}");
        assert!(reasons.contains(&("EmergencyAccessRevoked".into(), kind.into())), "{reasons:?}");
    }
    drop(run);
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn the_api_server_refuses_server_pods_without_their_sidecar_where_namespaces_opt_in() {
    use k8s_openapi::api::core::v1::Pod;
    let test = "the_api_server_refuses_server_pods_without_their_sidecar_where_namespaces_opt_in";
    let Some(client) = cluster(test).await else { return };
    let run = start(client.clone()).await;
    let other = start(client.clone()).await;
    let ns = run.namespace.clone();
    // This namespace opts in; the other does not.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let opt_in = json!({"metadata": {"labels": {"mcpwarden.io/enforce-sidecar": "true"}}});
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(opt_in)).await.expect("opt in");
    let _cleanup = install_policy(&client, server_pod_policy(&ns)).await;
    for namespace in [&ns, &other.namespace] {
        let account = json!({"metadata": {"name": "patient-lookup-mcpw", "namespace": namespace}});
        Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &serde_json::from_value(account).expect("account"))
            .await
            .expect("the server's service account");
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let create = |pods: Api<Pod>, pod: Value| async move {
        pods.create(&PostParams::default(), &serde_json::from_value(pod).expect("pod")).await.map_err(|e| e.to_string())
    };
    let stripped = |namespace: &str, name: &str| {
        let mut pod = chart::rendered_server_pod(namespace);
        pod["metadata"]["name"] = json!(name);
        pod["spec"].as_object_mut().map(|s| s.remove("initContainers"));
        pod
    };
    // Policies take a moment to be in force: wait for the first refusal.
    let mut probe = 0;
    let first = eventually("the server-pod policy in force", || {
        probe += 1;
        let (pods, pod) = (pods.clone(), stripped(&ns, &format!("probe-{probe}")));
        async move {
            match create(pods, pod).await {
                Err(e) if e.contains("runs the mcp-warden-sidecar") => Some(e),
                _ => None,
            }
        }
    })
    .await;
    assert!(first.contains("mcp-warden-sidecar"), "{first}");
    // The rendered pod is admitted (nothing schedules it; it stays Pending).
    create(pods.clone(), chart::rendered_server_pod(&ns)).await.expect("the rendered pod");
    // One more container: refused.
    let mut extra = chart::rendered_server_pod(&ns);
    extra["metadata"]["name"] = json!("with-extra");
    extra["spec"]["containers"].as_array_mut().expect("containers").push(json!({"name": "debug", "image": "busybox"}));
    let refused = create(pods.clone(), extra).await.expect_err("an extra container");
    assert!(refused.contains("exactly one container"), "{refused}");
    // Where the namespace did not opt in, the stripped pod is admitted.
    let elsewhere = Api::<Pod>::namespaced(client.clone(), &other.namespace);
    create(elsewhere, stripped(&other.namespace, "not-opted-in")).await.expect("a namespace that did not opt in");
    drop(other);
    drop(run);
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: bash e2e/run.sh"]
async fn argument_rules_are_bounded_by_the_api_server_and_judged_by_the_operator() {
    let test = "argument_rules_are_bounded_by_the_api_server_and_judged_by_the_operator";
    let Some(client) = cluster(test).await else { return };
    install_crds(&client).await;
    let mut run = start(client.clone()).await;
    let ns = run.namespace.clone();
    run_operator(&mut run, "e2e-arguments", &[]).await;
    keys_and_store(&client, &ns).await;
    let servers: Api<MCPServer> = Api::namespaced(client.clone(), &ns);
    let with_rule = |rule: &str, claims: Value| {
        let mut server = clinic_server(&ns, "ward-lookup");
        server["spec"]["authentication"]["oidc"]["ruleClaims"] = claims;
        let tool = &mut server["spec"]["tools"][0];
        tool["arguments"] = json!([
            {"name": "patient", "type": "string", "required": true, "maxLength": 64},
            {"name": "department", "type": "string", "required": true, "maxLength": 64},
            {"name": "limit", "type": "integer", "minimum": 1, "maximum": 50}
        ]);
        tool["argumentRules"] = json!([{"rule": rule, "message": "your own department only"}]);
        server
    };
    let try_apply = async |server: &Value| {
        servers
            .patch("ward-lookup", &PatchParams::apply(MANAGER).force(), &Patch::Apply(server))
            .await
            .map_err(|e| e.to_string())
    };
    // The CRD's bounds, enforced by the API server itself.
    let long = format!("args.patient == '{}'", "x".repeat(600));
    let refused = try_apply(&with_rule(&long, json!(["department"]))).await.expect_err("a rule over 512 characters");
    assert!(refused.contains("argumentRules[0].rule"), "{refused}");
    let refused =
        try_apply(&with_rule("true", json!(["dept-name"]))).await.expect_err("a claim name CEL cannot select");
    assert!(refused.contains("ruleClaims[0]"), "{refused}");
    let refused = try_apply(&with_rule("true", json!(vec!["c"; 17]))).await.expect_err("more than 16 claims");
    assert!(refused.contains("ruleClaims"), "{refused}");

    // A valid rule over a named claim: rendered into the sidecar's policy.
    let own = "caller.claims.department == args.department";
    try_apply(&with_rule(own, json!(["department"]))).await.expect("a valid rule");
    let server =
        eventually("a status for the generation", || async { servers.get("ward-lookup").await.ok().filter(reported) })
            .await;
    let (ready, message) = condition(&server, "Ready").expect("Ready");
    assert!(!message.contains("nothing is deployed"), "{ready}: {message}");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let policy = eventually("the rendered policy", || async {
        config_maps.get("ward-lookup-policy").await.ok()?.data?.remove("policy.json")
    })
    .await;
    assert!(policy.contains(own) && policy.contains("ruleClaims"), "{policy}");
    let minimum = server
        .status
        .as_ref()
        .and_then(|s| s.controls.iter().find(|c| c.id == Control::MinimumNecessary.id()))
        .cloned()
        .expect("minimum-necessary");
    // Its evidence counts the declaration and the rule (the verdict may
    // fail for what the cluster shows of egress; never for the arguments).
    let counted = minimum.message.contains("1 declare their arguments, 1 with argument rules");
    let failed_elsewhere = minimum.verdict == mcp_warden::api::Verdict::Fail && !minimum.message.contains("argument");
    assert!(counted || failed_elsewhere, "{:?}: {}", minimum.verdict, minimum.message);

    // A rule the sidecar would refuse (a claim the server does not name)
    // passes the schema but the operator marks the spec invalid.
    try_apply(&with_rule("caller.claims.email == args.department", json!(["department"]))).await.expect("schema-valid");
    let (_, why) = eventually("Ready False InvalidSpec", || async {
        let server = servers.get("ward-lookup").await.ok().filter(reported)?;
        let ready = server.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
        (ready.reason == "InvalidSpec").then_some((ready.status, ready.message))
    })
    .await;
    assert!(why.contains("ruleClaims does not name"), "{why}");
    drop(run);
}
