//! minimum-necessary (164.502(b), 164.514(d)) and transmission-security
//! (164.312(e)(1)).

use std::collections::BTreeSet;

use kube::ResourceExt;

use super::{Assessment, Input};
use crate::api::SslMode;
use crate::policy::{CallerSet, namespace_of, stores_in_use};
use crate::render::store_peers;

pub(super) fn minimum_necessary(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let spec = &input.server.spec;
    let namespace = namespace_of(input.server);
    let mut phi_tools = 0;
    let mut columns = 0;
    let (mut declared, mut ruled) = (0, 0);
    for (i, tool) in spec.tools.iter().enumerate() {
        let at = format!("tools[{i}] {}", tool.name);
        let callers = CallerSet::from(&tool.allowed_callers);
        if tool.phi {
            phi_tools += 1;
            declared += usize::from(tool.arguments.is_some());
            ruled += usize::from(!tool.argument_rules.is_empty());
            for code in free_form_code(tool) {
                a.failed(format!(
                    "{at} takes a free-form string argument {code:?} that no argument rule constrains: \
                     an agent does not run code it wrote against PHI (constrain it in argumentRules, or drop it)"
                ));
            }
            if tool.purpose.as_deref().is_none_or(|p| p.trim().is_empty()) {
                a.failed(format!("{at} is PHI but states no purpose"));
            }
            if callers.any_authenticated {
                a.failed(format!("{at} is PHI and open to any authenticated caller; name the groups or subjects"));
            }
        }
        if callers.is_empty() {
            a.failed(format!("{at} names no caller"));
        }
        if !tool.data_access.is_empty() && !tool.phi {
            a.failed(format!("{at} reads a PHIStore but is not marked phi: true"));
        }
        if tool.data_access.is_empty() && tool.no_data_access_reason.as_deref().is_none_or(str::is_empty) {
            a.failed(format!("{at} declares no dataAccess and gives no noDataAccessReason"));
        }
        for access in &tool.data_access {
            if !input.stores.contains_key(&access.store) {
                a.failed(format!(
                    "{at} uses PHIStore {}, which does not exist in namespace {namespace:?}",
                    access.store
                ));
            }
            for table in &access.tables {
                if table.columns.is_empty() {
                    a.failed(format!("{at}: table {} names no column", table.name));
                }
                if table.columns.iter().any(|c| c.trim() == "*") {
                    a.failed(format!("{at}: table {} grants '*'; name each column the purpose needs", table.name));
                }
                columns += table.columns.len();
            }
        }
    }
    for (i, resource) in spec.resources.iter().enumerate() {
        let at = format!("resources[{i}] {}", resource.uri_prefix);
        let callers = CallerSet::from(&resource.allowed_callers);
        if resource.phi && resource.purpose.as_deref().is_none_or(|p| p.trim().is_empty()) {
            a.failed(format!("{at} is PHI but states no purpose"));
        }
        if resource.phi && callers.any_authenticated {
            a.failed(format!("{at} is PHI and open to any authenticated caller; name the groups or subjects"));
        }
        if callers.is_empty() {
            a.failed(format!("{at} names no caller"));
        }
    }
    check_store_egress(input, &mut a);
    if let Some(collector) = &input.observed.collector {
        for (tool, findings) in &collector.schema_drift {
            a.failed(format!(
                "tool {tool}: the inputSchema its server lists differs from the declared arguments ({}); \
                 the sidecar still enforces the declaration — review the server's change and the declaration",
                findings.join("; ")
            ));
        }
    }
    if phi_tools > 0 {
        a.held(format!(
            "{phi_tools} PHI tool(s), each with a purpose, named callers and explicit columns ({columns} in all); \
             {declared} declare their arguments, {ruled} with argument rules"
        ));
    } else {
        a.held("no tool is PHI");
    }
    a.held("tools/list shows each caller only the tools it may call; other tools are refused as nonexistent");
    a
}

/// Declared string arguments named like code (`sql`, `query`, `code`,
/// `script`, `expression`) with no rule reading them.
fn free_form_code(tool: &crate::api::ToolPolicy) -> Vec<String> {
    const CODE: [&str; 5] = ["sql", "query", "code", "script", "expression"];
    let Some(arguments) = &tool.arguments else { return Vec::new() };
    arguments
        .iter()
        .filter(|arg| arg.kind == crate::api::ArgumentType::String)
        .filter(|arg| {
            let name = arg.name.to_ascii_lowercase();
            CODE.iter().any(|c| name.contains(c))
        })
        .filter(|arg| !tool.argument_rules.iter().any(|r| r.rule.contains(&format!("args.{}", arg.name))))
        .map(|arg| arg.name.clone())
        .collect()
}

/// The rendered egress reaches exactly the stores that tools use.
fn check_store_egress(input: &Input<'_>, a: &mut Assessment) {
    let Ok(rendered) = input.rendered else {
        a.unseen("no objects can be rendered, so egress to PHI stores was not assessed");
        return;
    };
    let rules = rendered.egress_policy.spec.as_ref().and_then(|s| s.egress.clone()).unwrap_or_default();
    let in_use = stores_in_use(input.server);
    let mut reached = BTreeSet::new();
    for (name, store) in input.stores {
        let peers = store_peers(store);
        let has_rule = !peers.is_empty() && rules.iter().any(|r| r.to.as_ref() == Some(&peers));
        if has_rule {
            reached.insert(name.clone());
            if !in_use.contains(name) {
                a.failed(format!("egress reaches PHIStore {name}, which no tool uses"));
            }
        }
    }
    for name in in_use.iter().filter(|n| input.stores.contains_key(*n)) {
        if !reached.contains(name) {
            a.failed(format!("PHIStore {name} is used by a tool but the egress policy does not reach it"));
        }
    }
    if reached.is_empty() {
        a.held("egress reaches no PHI store");
    } else {
        let names: Vec<&str> = reached.iter().map(String::as_str).collect();
        a.held(format!("egress reaches only the PHI store(s) tools use: {}", names.join(", ")));
    }
}

pub(super) fn transmission_security(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let in_use = stores_in_use(input.server);
    for name in &in_use {
        match input.stores.get(name) {
            None => a.unseen(format!("PHIStore {name} was not found, so its TLS settings are unknown")),
            Some(store) if store.spec.postgres.ssl_mode != SslMode::VerifyFull => a.failed(format!(
                "PHIStore {} uses sslMode {}: the database's certificate and host name are not both verified; set verify-full",
                store.name_any(),
                store.spec.postgres.ssl_mode.as_str()
            )),
            Some(_) => a.held(format!(
                "connections to PHIStore {name} use TLS verifying the database's certificate and host name (verify-full)"
            )),
        }
    }
    if in_use.is_empty() {
        a.held("no tool reaches a PHI store");
    }
    a.held("TLS between clients and the sidecar's Service is terminated outside the pod (ingress or mesh) and is not verified by mcp-warden");
    a
}
