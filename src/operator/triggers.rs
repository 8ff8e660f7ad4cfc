//! Which MCPServers a change of another object concerns: the Controller's
//! mappers, as pure functions over the cached servers.
//!
//! ```text
//!   PHIStore      ─▶ the servers of its namespace whose tools use it
//!   NetworkPolicy ─▶ its owner, and the servers whose pods it selects now or selected before
//!   Pod           ─▶ the server its label names
//! ```
//!
//! A NetworkPolicy concerns a server only when its pod selector matches the
//! server's pod labels: re-queueing every server of the namespace on any
//! policy change made converging O(servers²).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::api::{MCPServer, PHIStore};
use crate::compliance::selectors::selector_matches;
use crate::render::names::{SERVER_LABEL, pod_labels};

/// The servers of `store`'s namespace whose tools use it.
pub fn servers_using_store(servers: &[Arc<MCPServer>], store: &PHIStore) -> Vec<ObjectRef<MCPServer>> {
    let name = store.name_any();
    servers
        .iter()
        .filter(|s| s.namespace() == store.namespace())
        .filter(|s| s.spec.tools.iter().any(|t| t.data_access.iter().any(|d| d.store == name)))
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

/// The server a pod says it belongs to.
pub fn server_of_pod<K: kube::Resource>(pod: &K) -> Option<ObjectRef<MCPServer>> {
    let name = pod.labels().get(SERVER_LABEL)?;
    let reference = ObjectRef::<MCPServer>::new(name);
    Some(match pod.namespace() {
        Some(ns) => reference.within(&ns),
        None => reference,
    })
}

/// The servers whose pods `policy` selects (an absent selector selects
/// every pod of its namespace), and the server that owns it.
pub fn servers_selected_by(servers: &[Arc<MCPServer>], policy: &NetworkPolicy) -> Vec<ObjectRef<MCPServer>> {
    let namespace = policy.namespace();
    let selector = policy.spec.as_ref().and_then(|s| s.pod_selector.as_ref());
    let mut found: Vec<ObjectRef<MCPServer>> = servers
        .iter()
        .filter(|s| s.namespace() == namespace)
        .filter(|s| selector.is_none_or(|sel| selector_matches(sel, &pod_labels(&s.name_any()))))
        .map(|s| ObjectRef::from_obj(&**s))
        .collect();
    let owner = policy
        .owner_references()
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == "MCPServer")
        .map(|r| ObjectRef::<MCPServer>::new(&r.name));
    if let (Some(owner), Some(ns)) = (owner, namespace) {
        let owner = owner.within(&ns);
        if !found.contains(&owner) {
            found.push(owner);
        }
    }
    found
}

/// Remembers which servers each NetworkPolicy selected, so a policy that
/// stops selecting a server (or is deleted) still re-evaluates it.
#[derive(Default)]
pub struct PolicyTargets {
    last: Mutex<HashMap<ObjectRef<NetworkPolicy>, Vec<ObjectRef<MCPServer>>>>,
}

impl PolicyTargets {
    /// The servers concerned by this change of `policy`: those it selects
    /// now and those it selected at its previous change.
    pub fn concerned(&self, servers: &[Arc<MCPServer>], policy: &NetworkPolicy) -> Vec<ObjectRef<MCPServer>> {
        let now = servers_selected_by(servers, policy);
        let key = ObjectRef::from_obj(policy);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let before = if now.is_empty() { last.remove(&key) } else { last.insert(key, now.clone()) };
        let mut concerned = now;
        for server in before.unwrap_or_default() {
            if !concerned.contains(&server) {
                concerned.push(server);
            }
        }
        concerned
    }
}

/// The servers of a namespace (its labels decide whether their pods are
/// refused without the sidecar).
pub fn servers_in_namespace(
    servers: &[std::sync::Arc<MCPServer>],
    namespace: &k8s_openapi::api::core::v1::Namespace,
) -> Vec<ObjectRef<MCPServer>> {
    let name = kube::ResourceExt::name_any(namespace);
    servers
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(name.as_str()))
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(ns: &str, name: &str) -> Arc<MCPServer> {
        let mut s = crate::fixtures::clinic_server();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some(ns.into());
        Arc::new(s)
    }

    fn policy(ns: &str, selector: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": ns},
            "spec": {"podSelector": selector, "policyTypes": ["Ingress"]}
        }))
        .expect("policy")
    }

    fn names(refs: &[ObjectRef<MCPServer>]) -> Vec<String> {
        let mut n: Vec<String> =
            refs.iter().map(|r| format!("{}/{}", r.namespace.clone().unwrap_or_default(), r.name)).collect();
        n.sort();
        n
    }

    #[test]
    fn a_policy_concerns_only_the_servers_whose_pods_it_selects() {
        let servers = [server("a", "one"), server("a", "two"), server("b", "one")];
        let one = policy("a", json!({"matchLabels": {SERVER_LABEL: "one"}}));
        assert_eq!(names(&servers_selected_by(&servers, &one)), ["a/one"]);
        let everything = policy("a", json!({}));
        assert_eq!(names(&servers_selected_by(&servers, &everything)), ["a/one", "a/two"]);
        let others = policy("a", json!({"matchLabels": {"app": "billing"}}));
        assert!(servers_selected_by(&servers, &others).is_empty());
        let by_expression = policy(
            "a",
            json!({"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["mcp-server"]}]}),
        );
        assert_eq!(names(&servers_selected_by(&servers, &by_expression)), ["a/one", "a/two"]);
    }

    #[test]
    fn a_policy_that_stops_selecting_still_concerns_its_former_targets_once() {
        let servers = [server("a", "one"), server("a", "two")];
        let targets = PolicyTargets::default();
        let selecting = policy("a", json!({"matchLabels": {SERVER_LABEL: "one"}}));
        assert_eq!(names(&targets.concerned(&servers, &selecting)), ["a/one"]);
        let moved = policy("a", json!({"matchLabels": {SERVER_LABEL: "two"}}));
        assert_eq!(names(&targets.concerned(&servers, &moved)), ["a/one", "a/two"]);
        let none = policy("a", json!({"matchLabels": {"app": "x"}}));
        assert_eq!(names(&targets.concerned(&servers, &none)), ["a/two"]);
        assert!(targets.concerned(&servers, &none).is_empty());
    }

    #[test]
    fn an_owned_policy_concerns_its_owner() {
        let servers = [server("a", "one")];
        let mut owned = policy("a", json!({"matchLabels": {"app": "none"}}));
        owned.metadata.owner_references = Some(vec![serde_json::from_value(json!({
            "apiVersion": "mcpwarden.io/v1alpha1", "kind": "MCPServer", "name": "gone", "uid": "u", "controller": true
        })).expect("owner")]);
        assert_eq!(names(&servers_selected_by(&servers, &owned)), ["a/gone"]);
    }
}
