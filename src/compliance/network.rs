//! access-control (45 CFR 164.312(a)(1)): only the sidecar's port is
//! reachable, only from declared clients; egress reaches nothing that
//! bypasses the tools' policy; no other NetworkPolicy widens either.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::selectors::{peer_reaches_store, selector_matches};
use super::{Assessment, Input, Source};
use crate::api::SIDECAR_PUBLIC_PORT;
use crate::policy::namespace_of;
use crate::render::{OwnedNames, OwnedObjects};

pub(super) fn access_control(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let rendered = match input.rendered {
        Ok(rendered) => rendered,
        Err(e) => {
            a.unseen(format!("no objects can be rendered ({e}), so no network isolation is in place"));
            return a;
        }
    };
    check_rendered_ingress(&rendered.ingress_policy, &mut a);
    check_egress_extras(input, &mut a);
    check_other_policies(input, rendered, &mut a);
    if a.failed.is_empty() {
        a.held("enforcement rests on the cluster's network plugin (CNI) enforcing NetworkPolicy, which mcp-warden cannot observe");
    }
    a
}

fn check_rendered_ingress(policy: &NetworkPolicy, a: &mut Assessment) {
    let spec = policy.spec.as_ref();
    let types_ok = spec.and_then(|s| s.policy_types.as_ref()).is_some_and(|t| t.iter().any(|t| t == "Ingress"));
    let rules = spec.and_then(|s| s.ingress.clone()).unwrap_or_default();
    if !types_ok {
        a.failed(format!("NetworkPolicy {} does not restrict ingress", policy.name_any()));
        return;
    }
    let mut peers = 0;
    for (i, rule) in rules.iter().enumerate() {
        let from = rule.from.as_deref().unwrap_or_default();
        if from.is_empty() {
            a.failed(format!("NetworkPolicy {} rule {i} has no `from`: it admits every source", policy.name_any()));
        }
        if !only_sidecar_port(rule) {
            a.failed(format!(
                "NetworkPolicy {} rule {i} admits ports other than the sidecar's {SIDECAR_PUBLIC_PORT}",
                policy.name_any()
            ));
        }
        peers += from.len();
    }
    if rules.is_empty() {
        a.held("ingress admits nobody (network.allowedClients is empty)");
    } else {
        a.held(format!(
            "ingress admits only the sidecar port {SIDECAR_PUBLIC_PORT}, from {peers} declared client peer(s)"
        ));
    }
}

fn only_sidecar_port(rule: &NetworkPolicyIngressRule) -> bool {
    let ports = rule.ports.as_deref().unwrap_or_default();
    !ports.is_empty()
        && ports.iter().all(|p| {
            p.port == Some(IntOrString::Int(SIDECAR_PUBLIC_PORT))
                && p.end_port.is_none()
                && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
        })
}

fn check_egress_extras(input: &Input<'_>, a: &mut Assessment) {
    let namespace = namespace_of(input.server);
    let extras = &input.server.spec.network.egress;
    for (i, rule) in extras.iter().enumerate() {
        let to = rule.to.as_deref().unwrap_or_default();
        if to.is_empty() {
            a.failed(format!(
                "network.egress[{i}] has no `to`: it allows every destination, PHI stores included; name the destinations"
            ));
            continue;
        }
        for (j, peer) in to.iter().enumerate() {
            if peer.ip_block.is_none() && peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
                a.failed(format!("network.egress[{i}].to[{j}] is an empty peer, which selects everything"));
                continue;
            }
            if let Some(block) = &peer.ip_block
                && block.cidr.parse::<ipnet::IpNet>().is_ok_and(|n| n.prefix_len() == 0)
            {
                a.failed(format!(
                    "network.egress[{i}].to[{j}] is {}: the whole address space, PHI stores included",
                    block.cidr
                ));
                continue;
            }
            for (name, store) in input.stores {
                if let Some(why) = peer_reaches_store(peer, &namespace, store) {
                    a.failed(format!(
                        "network.egress[{i}].to[{j}] reaches PHIStore {name} ({why}); PHI stores are reached only through a tool's dataAccess"
                    ));
                }
            }
        }
    }
    if !extras.is_empty() && a.failed.is_empty() {
        a.held(format!("{} declared egress extra(s) reach no PHI store", extras.len()));
    }
}

/// NetworkPolicies are additive: any other policy selecting the pods with
/// a rule the warden's policies do not have widens their traffic.
fn check_other_policies(input: &Input<'_>, rendered: &OwnedObjects, a: &mut Assessment) {
    let Some(policies) = &input.observed.network_policies else {
        a.unseen("other NetworkPolicies selecting these pods were not observed");
        return;
    };
    let names = OwnedNames::for_server(&input.server.name_any());
    let namespace = namespace_of(input.server);
    let pod_labels = pod_labels(rendered);
    let ours_in = rendered.ingress_policy.spec.as_ref().and_then(|s| s.ingress.clone()).unwrap_or_default();
    let ours_out = rendered.egress_policy.spec.as_ref().and_then(|s| s.egress.clone()).unwrap_or_default();
    let mut selecting = 0;
    for policy in policies {
        if namespace_of(policy) != namespace || names.is_owned_network_policy(&policy.name_any()) {
            continue;
        }
        let Some(spec) = &policy.spec else { continue };
        if !spec.pod_selector.as_ref().is_none_or(|s| selector_matches(s, &pod_labels)) {
            continue;
        }
        selecting += 1;
        let who = format!("NetworkPolicy {}", qualified(policy));
        if widens_ingress(spec.ingress.as_deref().unwrap_or_default(), &ours_in) {
            a.failed(format!(
                "{who} selects these pods and admits ingress beyond the sidecar port from network.allowedClients"
            ));
        }
        if widens_egress(spec.egress.as_deref().unwrap_or_default(), &ours_out) {
            a.failed(format!("{who} selects these pods and allows egress beyond the warden's egress policy"));
        }
    }
    let place = match input.observed.source {
        Source::Manifests => "among the manifests",
        Source::Cluster => "in the namespace",
    };
    if selecting == 0 {
        a.held(format!("no other NetworkPolicy {place} selects these pods"));
    } else if a.failed.is_empty() {
        a.held(format!(
            "{selecting} other NetworkPolicy(ies) {place} select these pods without widening their traffic"
        ));
    }
}

fn widens_ingress(rules: &[NetworkPolicyIngressRule], ours: &[NetworkPolicyIngressRule]) -> bool {
    rules.iter().any(|r| !ours.contains(r))
}

fn widens_egress(rules: &[NetworkPolicyEgressRule], ours: &[NetworkPolicyEgressRule]) -> bool {
    rules.iter().any(|r| !ours.contains(r))
}

fn pod_labels(rendered: &OwnedObjects) -> BTreeMap<String, String> {
    rendered.deployment.spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default()
}

fn qualified(policy: &NetworkPolicy) -> String {
    match policy.namespace() {
        Some(ns) => format!("{ns}/{}", policy.name_any()),
        None => policy.name_any(),
    }
}
