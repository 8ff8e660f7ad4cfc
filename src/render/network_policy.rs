//! The two NetworkPolicies of an MCPServer.
//!
//! Ingress: the sidecar's public port, from `allowedClients` only; none
//! declared renders `ingress: []` (deny all), never an empty `from` (which
//! would admit everyone).
//!
//! Egress, in order: cluster DNS; the warden control plane (broker,
//! collector); each PHIStore some tool with named callers uses; the declared
//! extras. Nothing reaches the identity provider: the JWKS is a mounted file.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Context;
use super::names::selector_labels;
use crate::api::{PHIStore, SIDECAR_PUBLIC_PORT};

/// A PHIStore that the egress policy must reach.
#[derive(Debug, Clone)]
pub struct StoreEgress<'a> {
    /// Store name.
    pub name: String,
    /// The store.
    pub store: &'a PHIStore,
}

pub(super) fn ingress(ctx: &Context<'_>) -> NetworkPolicy {
    let clients = &ctx.server.spec.network.allowed_clients;
    let rules = if clients.is_empty() {
        Vec::new()
    } else {
        vec![NetworkPolicyIngressRule { from: Some(clients.clone()), ports: Some(vec![tcp_port(SIDECAR_PUBLIC_PORT)]) }]
    };
    NetworkPolicy {
        metadata: ctx.meta(&ctx.names.ingress_policy),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pod_selector(ctx)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(rules),
            ..NetworkPolicySpec::default()
        }),
    }
}

pub(super) fn egress(ctx: &Context<'_>, stores: &[StoreEgress<'_>]) -> NetworkPolicy {
    let settings = ctx.settings;
    let mut rules = vec![
        NetworkPolicyEgressRule {
            to: Some(vec![peer_in_namespaces(&settings.dns_namespace_labels, &settings.dns_pod_labels)]),
            ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
        },
        NetworkPolicyEgressRule {
            to: Some(vec![peer_in_namespaces(
                &BTreeMap::from([("kubernetes.io/metadata.name".to_string(), settings.warden_namespace.clone())]),
                &settings.control_plane_labels,
            )]),
            ports: Some(vec![tcp_port(settings.control_plane_port)]),
        },
    ];
    for store in stores {
        rules.push(NetworkPolicyEgressRule {
            to: Some(store_peers(store.store)),
            ports: Some(store.store.spec.endpoints.ports.iter().map(|p| tcp_port(*p)).collect()),
        });
    }
    rules.extend(ctx.server.spec.network.egress.iter().cloned());
    NetworkPolicy {
        metadata: ctx.meta(&ctx.names.egress_policy),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pod_selector(ctx)),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(rules),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The peers that reach a store's endpoints: its pods (with their
/// namespace selector in the same peer, so both must match) and its IP
/// blocks.
pub fn store_peers(store: &PHIStore) -> Vec<NetworkPolicyPeer> {
    let endpoints = &store.spec.endpoints;
    let mut peers = Vec::new();
    if let Some(pods) = &endpoints.pod_selector {
        peers.push(NetworkPolicyPeer {
            pod_selector: Some(pods.clone()),
            namespace_selector: endpoints.namespace_selector.clone(),
            ip_block: None,
        });
    }
    peers.extend(endpoints.ip_blocks.iter().map(|b| NetworkPolicyPeer {
        ip_block: Some(IPBlock { cidr: b.cidr.clone(), except: None }),
        ..NetworkPolicyPeer::default()
    }));
    peers
}

fn pod_selector(ctx: &Context<'_>) -> LabelSelector {
    LabelSelector { match_labels: Some(selector_labels(&ctx.server_name())), ..LabelSelector::default() }
}

/// One peer: pods with `pods` labels in namespaces with `namespaces` labels.
fn peer_in_namespaces(namespaces: &BTreeMap<String, String>, pods: &BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector { match_labels: Some(namespaces.clone()), ..LabelSelector::default() }),
        pod_selector: Some(LabelSelector { match_labels: Some(pods.clone()), ..LabelSelector::default() }),
        ip_block: None,
    }
}

fn tcp_port(number: i32) -> NetworkPolicyPort {
    port("TCP", number)
}

fn port(protocol: &str, number: i32) -> NetworkPolicyPort {
    NetworkPolicyPort { protocol: Some(protocol.into()), port: Some(IntOrString::Int(number)), end_port: None }
}
