//! The operator's view of the cluster: one watch and reflector cache per
//! kind, read by every reconcile instead of listing.
//!
//! ```text
//!   watcher(kind) ─ trim ─ InitDone? ─▶ sync flag ─▶ /readyz, reconciles wait for all
//!                                  └─▶ reflector ─▶ Store (read by reconcile)
//!                                               └─▶ trigger stream (the Controller)
//! ```
//!
//! Readiness comes from each stream's own `InitDone` event, not from
//! `Store::wait_until_ready`: that future wakes only its last poller, and the
//! Controller's runner waits on the same store, so a second waiter (the
//! readiness probe) was never woken on a real cluster.
//!
//! Memory: other managers' `managedFields` entries are dropped as objects
//! arrive (only mcp-warden's own Apply entry decides drift), and so are the
//! parts of Pods the evaluation never reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{EmergencyAccess, MCPServer, PHIStore};
use crate::compliance::selectors::selector_matches;
use crate::render::JWKS_SOURCE_ANNOTATION;
use crate::render::OwnedNames;
use crate::render::names::{MANAGER, SERVER_LABEL, pod_labels};

use super::pod_view::ServerPod;

/// A stream of changed objects, for the Controller's triggers.
pub type Trigger<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// Whether each watched kind has listed its objects once.
#[derive(Debug)]
pub struct SyncState {
    flags: Vec<(&'static str, AtomicBool)>,
    synced: tokio::sync::watch::Sender<usize>,
}

impl SyncState {
    fn new(kinds: &[&'static str]) -> Arc<Self> {
        let (synced, _) = tokio::sync::watch::channel(0);
        Arc::new(SyncState { flags: kinds.iter().map(|k| (*k, AtomicBool::new(false))).collect(), synced })
    }

    /// Marks `kind` as listed (idempotent).
    pub fn mark(&self, kind: &str) {
        if let Some((_, flag)) = self.flags.iter().find(|(k, _)| *k == kind)
            && !flag.swap(true, Ordering::SeqCst)
        {
            self.synced.send_modify(|n| *n += 1);
        }
    }

    /// The kinds not listed yet; empty when every cache is ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.flags.iter().filter(|(_, f)| !f.load(Ordering::SeqCst)).map(|(k, _)| *k).collect()
    }

    /// Resolves once every cache has listed its objects.
    pub async fn wait(&self) {
        let total = self.flags.len();
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|n| *n >= total).await;
    }
}

/// The cached objects of every watched kind.
#[derive(Clone)]
pub struct Caches {
    /// MCPServers (the Controller's main store).
    pub servers: Store<MCPServer>,
    /// PHIStores.
    pub stores: Store<PHIStore>,
    /// Deployments managed by mcp-warden.
    pub deployments: Store<Deployment>,
    /// Services managed by mcp-warden.
    pub services: Store<Service>,
    /// ConfigMaps managed by mcp-warden.
    pub config_maps: Store<ConfigMap>,
    /// ServiceAccounts managed by mcp-warden.
    pub service_accounts: Store<ServiceAccount>,
    /// Every NetworkPolicy in scope: ours, and the ones that could widen ours.
    pub network_policies: Store<NetworkPolicy>,
    /// Pods carrying the server label (compact views).
    pub pods: Store<ServerPod>,
    /// Break-glass grants.
    pub grants: Store<EmergencyAccess>,
    /// ValidatingAdmissionPolicies (cluster-wide): the break-glass one must
    /// be in force for any grant to be.
    pub admission_policies: Store<ValidatingAdmissionPolicy>,
    /// Their bindings.
    pub admission_bindings: Store<ValidatingAdmissionPolicyBinding>,
    /// The namespaces in scope (their labels say which opt in to refusing
    /// server pods without the sidecar).
    pub namespaces: Store<Namespace>,
    /// Which caches have synced.
    pub sync: Arc<SyncState>,
}

/// The trigger streams feeding the Controller, one per cache.
pub struct Triggers {
    /// MCPServer changes.
    pub servers: Trigger<MCPServer>,
    /// PHIStore changes.
    pub stores: Trigger<PHIStore>,
    /// Owned Deployment changes.
    pub deployments: Trigger<Deployment>,
    /// Owned Service changes.
    pub services: Trigger<Service>,
    /// Owned ConfigMap changes.
    pub config_maps: Trigger<ConfigMap>,
    /// Owned ServiceAccount changes.
    pub service_accounts: Trigger<ServiceAccount>,
    /// Any NetworkPolicy change.
    pub network_policies: Trigger<NetworkPolicy>,
    /// Server pod changes.
    pub pods: Trigger<ServerPod>,
    /// Grant changes.
    pub grants: Trigger<EmergencyAccess>,
    /// Admission policy changes.
    pub admission_policies: Trigger<ValidatingAdmissionPolicy>,
    /// Admission binding changes.
    pub admission_bindings: Trigger<ValidatingAdmissionPolicyBinding>,
    /// Namespace changes.
    pub namespaces: Trigger<Namespace>,
}

const KINDS: [&str; 12] = [
    "MCPServer",
    "PHIStore",
    "Deployment",
    "Service",
    "ConfigMap",
    "ServiceAccount",
    "NetworkPolicy",
    "Pod",
    "EmergencyAccess",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "Namespace",
];

/// Label selecting the objects mcp-warden manages.
pub fn managed_selector() -> String {
    format!("app.kubernetes.io/managed-by={MANAGER}")
}

/// Keeps only mcp-warden's own Apply entry among `managedFields`, as its
/// JSON text: drift is decided from it alone, and a Deployment's field tree
/// parsed into maps weighs several times its text.
pub fn keep_own_apply_entry<K: Resource>(object: &mut K) {
    let entries = object.managed_fields_mut();
    entries.retain(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.subresource.as_deref().is_none_or(str::is_empty)
    });
    for entry in entries.iter_mut() {
        if let Some(fields) = entry.fields_v1.as_mut()
            && !fields.0.is_string()
        {
            fields.0 = Value::String(fields.0.to_string());
        }
        entry.time = None;
        entry.fields_type = None;
    }
}

/// An owned Deployment as drift and readiness read it: metadata and status
/// (its pod template is what this operator applied; field ownership says
/// whether it still holds).
pub fn trim_deployment(deployment: &mut Deployment) {
    keep_own_apply_entry(deployment);
    deployment.spec = Default::default();
}

/// An owned Service: metadata only.
pub fn trim_service(service: &mut Service) {
    keep_own_apply_entry(service);
    service.spec = None;
    service.status = None;
}

/// An owned ConfigMap: metadata, and the data of a JWKS copy (the last good
/// keys are served again when a fetch fails).
pub fn trim_config_map(config_map: &mut ConfigMap) {
    keep_own_apply_entry(config_map);
    if !config_map.annotations().contains_key(JWKS_SOURCE_ANNOTATION) {
        config_map.data = None;
        config_map.binary_data = None;
    }
}

/// Drops what the operator never reads of an MCPServer, PHIStore, grant or
/// admission policy: field ownership and annotations (`kubectl apply`'s
/// last-applied copy of the whole spec among them).
pub fn trim_custom<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.meta_mut().annotations = None;
}

/// A namespace: its name and labels.
pub fn trim_namespace(namespace: &mut Namespace) {
    trim_custom(namespace);
    namespace.spec = None;
    namespace.status = None;
}

/// A pod as the evaluation reads it (see `pod_view`).
pub fn trim_pod(pod: &mut ServerPod) {
    pod.trim();
}

fn slim<K: DeserializeOwned + Serialize>(value: Value, trim: fn(&mut K)) -> Value {
    match serde_json::from_value::<K>(value.clone()) {
        Ok(mut object) => {
            trim(&mut object);
            serde_json::to_value(&object).unwrap_or(value)
        }
        Err(_) => value,
    }
}

/// An API server's answer about an object of `kind`, trimmed as its cache
/// keeps such objects (answers stand in for the cache for a while; they
/// need not weigh more).
pub fn as_cached(kind: &str, value: Value) -> Value {
    match kind {
        "Deployment" => slim::<Deployment>(value, trim_deployment),
        "Service" => slim::<Service>(value, trim_service),
        "ConfigMap" => slim::<ConfigMap>(value, trim_config_map),
        "ServiceAccount" => slim::<ServiceAccount>(value, keep_own_apply_entry),
        "NetworkPolicy" => slim::<NetworkPolicy>(value, keep_own_apply_entry),
        "MCPServer" => slim::<MCPServer>(value, trim_custom),
        _ => value,
    }
}

fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
    sync: &Arc<SyncState>,
    kind: &'static str,
    trim: fn(&mut K),
) -> (Store<K>, Trigger<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let sync = Arc::clone(sync);
    let stream = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                tracing::debug!(kind, "cache synced");
                sync.mark(kind);
            }
        })
        .reflect(writer)
        .touched_objects()
        .boxed();
    (reader, stream)
}

/// Where the operator watches: every namespace, or one.
#[derive(Clone)]
pub struct Scope {
    /// The API client.
    pub client: kube::Client,
    /// The one namespace watched, or None for all.
    pub namespace: Option<String>,
}

impl Scope {
    /// An Api for namespaced kind `K` in this scope.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}

impl Caches {
    /// Starts one watch per kind. Nothing is fetched until the returned
    /// triggers are polled (by the Controller).
    pub fn watch(scope: &Scope) -> (Caches, Triggers) {
        let sync = SyncState::new(&KINDS);
        let all = watcher::Config::default;
        let managed = || watcher::Config::default().labels(&managed_selector());
        let (servers, servers_t) = cache(scope.api(), all(), &sync, "MCPServer", trim_custom);
        let (stores, stores_t) = cache(scope.api(), all(), &sync, "PHIStore", trim_custom);
        let (deployments, deployments_t) = cache(scope.api(), managed(), &sync, "Deployment", trim_deployment);
        let (services, services_t) = cache(scope.api(), managed(), &sync, "Service", trim_service);
        let (config_maps, config_maps_t) = cache(scope.api(), managed(), &sync, "ConfigMap", trim_config_map);
        let (service_accounts, service_accounts_t) =
            cache(scope.api(), managed(), &sync, "ServiceAccount", keep_own_apply_entry);
        let (network_policies, network_policies_t) =
            cache(scope.api(), all(), &sync, "NetworkPolicy", keep_own_apply_entry);
        let (pods, pods_t) = cache(scope.api(), all().labels(SERVER_LABEL), &sync, "Pod", trim_pod);
        let (grants, grants_t) = cache(scope.api(), all(), &sync, "EmergencyAccess", trim_custom);
        // Cluster-scoped: whatever namespace is watched.
        let (admission_policies, admission_policies_t) =
            cache(Api::all(scope.client.clone()), all(), &sync, "ValidatingAdmissionPolicy", trim_custom);
        let (admission_bindings, admission_bindings_t) =
            cache(Api::all(scope.client.clone()), all(), &sync, "ValidatingAdmissionPolicyBinding", trim_custom);
        // Only the watched namespace when there is one (its labels are all
        // the operator reads of it).
        let namespace_config = match &scope.namespace {
            Some(ns) => all().fields(&format!("metadata.name={ns}")),
            None => all(),
        };
        let (namespaces, namespaces_t) =
            cache(Api::all(scope.client.clone()), namespace_config, &sync, "Namespace", trim_namespace);
        let caches = Caches {
            servers,
            stores,
            deployments,
            services,
            config_maps,
            service_accounts,
            network_policies,
            pods,
            grants,
            admission_policies,
            admission_bindings,
            namespaces,
            sync,
        };
        let triggers = Triggers {
            servers: servers_t,
            stores: stores_t,
            deployments: deployments_t,
            services: services_t,
            config_maps: config_maps_t,
            service_accounts: service_accounts_t,
            network_policies: network_policies_t,
            pods: pods_t,
            grants: grants_t,
            admission_policies: admission_policies_t,
            admission_bindings: admission_bindings_t,
            namespaces: namespaces_t,
        };
        (caches, triggers)
    }

    /// The grants of server `name` in `namespace`.
    pub fn grants_of(&self, namespace: &str, name: &str) -> Vec<Arc<EmergencyAccess>> {
        in_namespace(&self.grants, namespace).filter(|g| g.spec.server == name).collect()
    }

    /// Whether the API server refuses pods of servers in `namespace` that
    /// lack their sidecar: the policy `name` in force, the namespace opted in.
    pub fn pod_admission(&self, name: &str, namespace: &str) -> crate::compliance::pod_admission::PodAdmissionView {
        use crate::compliance::pod_admission::{OPT_IN_LABEL, in_force};
        let policy = self.admission_policies.get(&ObjectRef::new(name));
        let binding = self.admission_bindings.get(&ObjectRef::new(name));
        let opted_in = self
            .namespaces
            .get(&ObjectRef::new(namespace))
            .is_some_and(|ns| ns.labels().get(OPT_IN_LABEL).map(String::as_str) == Some("true"));
        crate::compliance::pod_admission::PodAdmissionView {
            policy: name.to_string(),
            in_force: in_force(name, policy.as_deref(), binding.as_deref()),
            namespace_opted_in: opted_in,
        }
    }

    /// Whether the break-glass admission policy `name` (and its binding of
    /// the same name) is in force.
    pub fn emergency_admission(&self, name: &str) -> crate::breakglass::Admission {
        let policy = self.admission_policies.get(&ObjectRef::new(name));
        let binding = self.admission_bindings.get(&ObjectRef::new(name));
        crate::breakglass::admission(name, policy.as_deref(), binding.as_deref())
    }

    /// The PHIStores of `namespace`, by name.
    pub fn stores_in(&self, namespace: &str) -> BTreeMap<String, PHIStore> {
        in_namespace(&self.stores, namespace).map(|s| (s.name_any(), (*s).clone())).collect()
    }

    /// The NetworkPolicies of `namespace` that select the pods of server
    /// `name` (its own among them): the only ones its verdict depends on.
    pub fn network_policies_selecting(&self, namespace: &str, name: &str) -> Vec<NetworkPolicy> {
        let labels = pod_labels(name);
        in_namespace(&self.network_policies, namespace)
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.pod_selector.as_ref()).is_none_or(|sel| selector_matches(sel, &labels))
            })
            .map(|p| (*p).clone())
            .collect()
    }

    /// The pods of server `name` in `namespace`.
    pub fn pods_of(&self, namespace: &str, name: &str) -> Vec<Pod> {
        in_namespace(&self.pods, namespace)
            .filter(|p| p.labels().get(SERVER_LABEL).map(String::as_str) == Some(name))
            .map(|p| p.to_pod())
            .collect()
    }

    /// The objects server `name` of `namespace` may own, looked up by the
    /// names the renderer gives them (every name it can produce, whether or
    /// not the spec needs it now: what it no longer needs is an orphan), as
    /// JSON keyed by `(kind, name)`. Objects carrying another server's
    /// labels are not its own.
    pub fn managed_of(&self, namespace: &str, name: &str) -> BTreeMap<(String, String), Value> {
        let names = OwnedNames::for_server(name);
        let mut found = BTreeMap::new();
        lookup(&self.service_accounts, namespace, &names.service_account, name, &mut found);
        lookup(&self.config_maps, namespace, &names.policy_config_map, name, &mut found);
        lookup(&self.config_maps, namespace, &names.jwks_config_map, name, &mut found);
        lookup(&self.network_policies, namespace, &names.ingress_policy, name, &mut found);
        lookup(&self.network_policies, namespace, &names.egress_policy, name, &mut found);
        lookup(&self.services, namespace, &names.workload, name, &mut found);
        lookup(&self.deployments, namespace, &names.workload, name, &mut found);
        found
    }
}

fn in_namespace<'a, K>(store: &Store<K>, namespace: &'a str) -> impl Iterator<Item = Arc<K>> + 'a
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state().into_iter().filter(move |o| o.meta().namespace.as_deref() == Some(namespace))
}

fn lookup<K>(
    store: &Store<K>,
    namespace: &str,
    object: &str,
    server: &str,
    into: &mut BTreeMap<(String, String), Value>,
) where
    K: Resource<DynamicType = ()> + Clone + Serialize + 'static,
{
    let Some(found) = store.get(&ObjectRef::new(object).within(namespace)) else { return };
    let labels = found.labels();
    if labels.get(SERVER_LABEL).map(String::as_str) != Some(server)
        || labels.get("app.kubernetes.io/managed-by").map(String::as_str) != Some(MANAGER)
    {
        return;
    }
    if let Ok(value) = serde_json::to_value(&*found) {
        into.insert((K::kind(&()).to_string(), object.to_string()), value);
    }
}

/// Caches filled from objects, for tests: every kind synced.
#[cfg(test)]
pub mod fill {
    use super::*;

    /// A synced store holding `objects`.
    pub fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let mut writer = reflector::store::Writer::<K>::default();
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(object));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer.as_reader()
    }

    /// Synced caches holding the objects in `values` (any kind, routed by
    /// their `kind`), handed over as a LIST hands them (built-in kinds
    /// without apiVersion/kind) and trimmed as the watchers trim them.
    pub fn caches(values: &[Value]) -> Caches {
        fn of<K: DeserializeOwned + Resource<DynamicType = ()>>(values: &[Value], trim: fn(&mut K)) -> Vec<K> {
            values
                .iter()
                .filter(|v| v["kind"] == K::kind(&()).as_ref())
                .map(|v| {
                    let mut listed = v.clone();
                    if K::group(&()).as_ref() != "mcpwarden.io"
                        && let Some(fields) = listed.as_object_mut()
                    {
                        fields.remove("apiVersion");
                        fields.remove("kind");
                    }
                    let mut object: K = serde_json::from_value(listed).expect("object of its kind");
                    trim(&mut object);
                    object
                })
                .collect()
        }
        let sync = SyncState::new(&KINDS);
        for kind in KINDS {
            sync.mark(kind);
        }
        Caches {
            servers: store(of(values, trim_custom)),
            stores: store(of(values, trim_custom)),
            deployments: store(of(values, trim_deployment)),
            services: store(of(values, trim_service)),
            config_maps: store(of(values, trim_config_map)),
            service_accounts: store(of(values, keep_own_apply_entry)),
            network_policies: store(of(values, keep_own_apply_entry)),
            pods: store(of(values, trim_pod)),
            grants: store(of(values, trim_custom)),
            admission_policies: store(of(values, trim_custom)),
            admission_bindings: store(of(values, trim_custom)),
            namespaces: store(of(values, trim_namespace)),
            sync,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn readiness_waits_for_every_kind_and_wakes_every_waiter() {
        let sync = SyncState::new(&["A", "B"]);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let sync = Arc::clone(&sync);
                tokio::spawn(async move { sync.wait().await })
            })
            .collect();
        sync.mark("A");
        sync.mark("A");
        assert_eq!(sync.pending(), ["B"]);
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        sync.mark("B");
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(1), waiter).await.expect("woken").expect("task");
        }
        assert!(sync.pending().is_empty());
    }

    #[test]
    fn only_our_apply_entry_is_kept() {
        let stored = format!(
            "{}/tests/k8s-recordings/05-errors/409-setup-merge-patch-by-kubectl-edit.response.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut config_map: ConfigMap =
            serde_json::from_str(&std::fs::read_to_string(stored).expect("recording")).expect("configmap");
        assert_eq!(config_map.managed_fields().len(), 2);
        keep_own_apply_entry(&mut config_map);
        let managers: Vec<_> = config_map.managed_fields().iter().filter_map(|m| m.manager.clone()).collect();
        assert_eq!(managers, ["mcp-warden"]);
    }

    #[test]
    fn pods_keep_their_phase_and_spec_only() {
        let mut pod: ServerPod = serde_json::from_value(json!({
            "metadata": {"name": "p", "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"containers": [{"name": "c", "livenessProbe": {"httpGet": {"port": 1}}}]},
            "status": {"phase": "Pending", "qosClass": "Burstable", "conditions": [{"type": "PodScheduled", "status": "False"}]}
        }))
        .expect("pod");
        trim_pod(&mut pod);
        assert!(pod.managed_fields().is_empty());
        let pod = pod.to_pod();
        let status = pod.status.expect("status");
        assert_eq!((status.phase.as_deref(), status.qos_class, status.conditions), (Some("Pending"), None, None));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.containers.len(), 1);
        assert!(spec.containers[0].liveness_probe.is_none(), "not kept");
    }

    #[test]
    fn cached_owned_objects_keep_what_drift_and_readiness_read() {
        let stored = format!(
            "{}/tests/k8s-recordings/01-apply/ssa-again-deployment-patient-lookup.response.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let value: Value = serde_json::from_str(&std::fs::read_to_string(stored).expect("recording")).expect("json");
        let cached = as_cached("Deployment", value.clone());
        assert_eq!(cached["status"], value["status"]);
        assert_eq!(cached["metadata"]["annotations"], value["metadata"]["annotations"]);
        assert!(cached["spec"]["template"].get("spec").is_none(), "the pod template is not kept");
        let entries = cached["metadata"]["managedFields"].as_array().expect("entries");
        assert_eq!(entries.len(), 1);
        assert!(entries[0]["fieldsV1"].is_string(), "kept as text");
        assert_eq!(
            crate::operator::managed_fields::applied_fields(&cached, MANAGER),
            crate::operator::managed_fields::applied_fields(&value, MANAGER)
        );
    }
}
