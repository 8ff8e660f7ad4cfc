//! Label-selector and NetworkPolicy-peer reasoning, as pure functions.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::PHIStore;

/// Label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Whether `selector` selects an object with `labels` (Kubernetes semantics:
/// an empty selector selects everything; an unknown operator selects
/// nothing).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// The labels a selector guarantees (its `matchLabels`), used as the best
/// available description of the objects it selects.
pub fn known_labels(selector: &LabelSelector) -> BTreeMap<String, String> {
    selector.match_labels.clone().unwrap_or_default()
}

/// Whether an egress peer declared in `namespace` may reach the endpoints of
/// `store` (which lives in the same namespace). Returns why, or None.
///
/// Conservative where it must guess: a peer is judged against the labels
/// the store's own selectors require, so a peer selecting "every pod", or
/// every pod carrying the store's labels, is caught.
pub fn peer_reaches_store(peer: &NetworkPolicyPeer, namespace: &str, store: &PHIStore) -> Option<String> {
    let endpoints = &store.spec.endpoints;
    if let Some(block) = &peer.ip_block {
        let cidr: Option<IpNet> = block.cidr.parse().ok();
        let Some(cidr) = cidr else {
            return Some(format!("its ipBlock {:?} is not a valid CIDR", block.cidr));
        };
        if cidr.prefix_len() == 0 {
            return Some(format!("its ipBlock {cidr} is the whole address space"));
        }
        for store_block in &endpoints.ip_blocks {
            if let Ok(store_net) = store_block.cidr.parse::<IpNet>()
                && (cidr.contains(&store_net) || store_net.contains(&cidr))
            {
                return Some(format!("its ipBlock {cidr} overlaps the store's {store_net}"));
            }
        }
        return None;
    }
    let store_pods = endpoints.pod_selector.as_ref()?;
    // Namespaces of the store's pods, as far as labels can tell.
    let store_namespace_labels = match &endpoints.namespace_selector {
        Some(ns) => known_labels(ns),
        None => BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())]),
    };
    let namespace_ok = match &peer.namespace_selector {
        // No namespaceSelector: the policy's own namespace.
        None => endpoints.namespace_selector.is_none(),
        Some(ns) => selector_matches(ns, &store_namespace_labels),
    };
    if !namespace_ok {
        return None;
    }
    let pods_ok = match &peer.pod_selector {
        None => true,
        Some(pods) => selector_matches(pods, &known_labels(store_pods)),
    };
    if !pods_ok {
        return None;
    }
    Some(match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => "it is an empty peer, which selects everything".to_string(),
        (Some(_), None) => "it selects every pod of the store's namespace".to_string(),
        _ => "it selects the store's pods".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::IPBlock;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector { match_labels: Some(labels(pairs)), ..LabelSelector::default() }
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..LabelSelector::default()
        }
    }

    fn store(yaml: &str) -> PHIStore {
        serde_yaml::from_str(yaml).expect("store yaml")
    }

    fn db_store() -> PHIStore {
        store(
            "apiVersion: mcpwarden.io/v1alpha1\nkind: PHIStore\nmetadata: {name: ehr, namespace: clinic}\nspec:\n  postgres: {host: db, database: ehr, adminSecretRef: {name: a}}\n  endpoints: {podSelector: {matchLabels: {app: ehr-db}}, ports: [5432]}\n",
        )
    }

    #[test]
    fn selector_semantics() {
        let pod = labels(&[("app", "ehr-db"), ("tier", "data")]);
        assert!(selector_matches(&LabelSelector::default(), &pod));
        assert!(selector_matches(&sel(&[("app", "ehr-db")]), &pod));
        assert!(!selector_matches(&sel(&[("app", "web")]), &pod));
        assert!(selector_matches(&expr("tier", "In", &["data", "x"]), &pod));
        assert!(!selector_matches(&expr("tier", "NotIn", &["data"]), &pod));
        assert!(selector_matches(&expr("zone", "DoesNotExist", &[]), &pod));
        assert!(selector_matches(&expr("app", "Exists", &[]), &pod));
        assert!(!selector_matches(&expr("app", "Bogus", &[]), &pod));
    }

    #[test]
    fn peers_that_reach_a_store() {
        let s = db_store();
        let peer = |ns: Option<LabelSelector>, pods: Option<LabelSelector>| NetworkPolicyPeer {
            namespace_selector: ns,
            pod_selector: pods,
            ip_block: None,
        };
        assert!(peer_reaches_store(&peer(None, Some(LabelSelector::default())), "clinic", &s).is_some());
        assert!(peer_reaches_store(&peer(None, Some(sel(&[("app", "ehr-db")]))), "clinic", &s).is_some());
        assert!(peer_reaches_store(&peer(Some(LabelSelector::default()), None), "clinic", &s).is_some());
        assert!(
            peer_reaches_store(&peer(Some(sel(&[(NAMESPACE_NAME_LABEL, "clinic")])), None), "clinic", &s).is_some()
        );
        assert!(peer_reaches_store(&peer(None, None), "clinic", &s).is_some());
        // Other pods, other namespaces: no.
        assert!(peer_reaches_store(&peer(None, Some(sel(&[("app", "web")]))), "clinic", &s).is_none());
        assert!(
            peer_reaches_store(&peer(Some(sel(&[(NAMESPACE_NAME_LABEL, "billing")])), None), "clinic", &s).is_none()
        );
    }

    #[test]
    fn ip_blocks_that_reach_a_store() {
        let s = store(
            "apiVersion: mcpwarden.io/v1alpha1\nkind: PHIStore\nmetadata: {name: ehr}\nspec:\n  postgres: {host: db, database: ehr, adminSecretRef: {name: a}}\n  endpoints: {ipBlocks: [{cidr: 10.20.0.5/32}], ports: [5432]}\n",
        );
        let block = |cidr: &str| NetworkPolicyPeer {
            ip_block: Some(IPBlock { cidr: cidr.into(), except: None }),
            ..NetworkPolicyPeer::default()
        };
        assert!(peer_reaches_store(&block("0.0.0.0/0"), "clinic", &s).is_some());
        assert!(peer_reaches_store(&block("::/0"), "clinic", &s).is_some());
        assert!(peer_reaches_store(&block("10.0.0.0/8"), "clinic", &s).is_some());
        assert!(peer_reaches_store(&block("192.168.1.0/24"), "clinic", &s).is_none());
        assert!(peer_reaches_store(&block("not-a-cidr"), "clinic", &s).is_some());
        // Pod-selected store: an unrelated, specific block is not judged to reach it.
        assert!(peer_reaches_store(&block("192.168.1.0/24"), "clinic", &db_store()).is_none());
    }
}
