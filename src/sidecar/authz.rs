//! Authorization from the one policy, as pure functions over JSON-RPC.
//!
//! ```text
//!   method                           decision
//!   initialize, ping, notifications/*,
//!   server/discover, subscriptions/listen,
//!   responses to server requests      allow (protocol)
//!   tools/list, resources/list,
//!   resources/templates/list,
//!   prompts/list                      allow; the response is filtered to the caller
//!   tools/call                        allow iff the policy lists the tool and admits the caller,
//!                                     or a break-glass grant in force opens it to the caller
//!                                     (an Identified tool in the procedure: only the grant)
//!   resources/read|subscribe|unsubscribe  by the longest matching uriPrefix
//!   prompts/get                       by the prompt entry
//!   completion/complete               by the prompt or resource it refers to
//!   anything else                     deny (default deny)
//! ```
//!
//! A tool the caller may not use is refused with exactly the error a
//! nonexistent tool gets, so a refusal reveals nothing.

use serde_json::{Map, Value, json};

use crate::policy::{Caller, CallerSet, CompiledPolicy};

/// `_meta` prefix reserved for the warden; client-supplied keys under it
/// are removed.
pub const META_PREFIX: &str = "io.mcpwarden/";
/// `_meta` key carrying the verified caller to the server.
pub const META_CALLER: &str = "io.mcpwarden/caller";

/// JSON-RPC "invalid params", which MCP servers return for unknown tools
/// and prompts.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC "method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// MCP "resource not found".
pub const RESOURCE_NOT_FOUND: i64 = -32002;

/// What the gateway does with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward it.
    Allow(Allowed),
    /// Answer it with a JSON-RPC error; the server never sees it.
    Deny(Denied),
}

/// An allowed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The tool, resource or prompt concerned.
    pub target: Option<String>,
    /// Whether it touches PHI.
    pub phi: bool,
    /// Why (for the record).
    pub rule: &'static str,
    /// Whether the response must be filtered to the caller.
    pub filter: Option<ListKind>,
    /// The break-glass grant it is allowed under.
    pub grant: Option<String>,
}

/// A refused message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The tool, resource or prompt asked for.
    pub target: Option<String>,
    /// Whether `target` is a name the client made up (not in the policy):
    /// attacker-chosen text, recorded only as its keyed HMAC.
    pub client_named: bool,
    /// Why (for the record; never shown to the caller).
    pub reason: std::borrow::Cow<'static, str>,
    /// JSON-RPC error code returned.
    pub code: i64,
    /// JSON-RPC error message returned (the same for hidden and absent).
    pub message: String,
}

/// Lists whose responses are filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `tools/list`.
    Tools,
    /// `resources/list`.
    Resources,
    /// `resources/templates/list`.
    ResourceTemplates,
    /// `prompts/list`.
    Prompts,
}

fn allow(rule: &'static str) -> Decision {
    Decision::Allow(Allowed { target: None, phi: false, rule, filter: None, grant: None })
}

/// The grant in force that opens `tool` to `caller`, if the policy lets
/// grants open it; a tool answering with identified PHI only under a grant
/// that allows identified output. (The sidecar keeps only grants in force
/// now in `caller.emergency`.)
pub fn grant_opening<'a>(policy: &CompiledPolicy, caller: &'a Caller, tool: &str) -> Option<&'a str> {
    caller.emergency.iter().find(|g| policy.grant_opens(g, &caller.subject, tool)).map(|g| g.name.as_str())
}

fn param<'a>(params: Option<&'a Value>, key: &str) -> Option<&'a str> {
    params?.get(key)?.as_str()
}

/// Decides one JSON-RPC message (`method` absent: a response to a server
/// request, which is protocol traffic).
pub fn decide(policy: &CompiledPolicy, caller: &Caller, method: Option<&str>, params: Option<&Value>) -> Decision {
    let Some(method) = method else { return allow("response to a server request") };
    match method {
        "initialize" | "ping" | "server/discover" | "subscriptions/listen" | "logging/setLevel" => allow("protocol"),
        m if m.starts_with("notifications/") => allow("protocol notification"),
        "tools/list" => list(ListKind::Tools),
        "resources/list" => list(ListKind::Resources),
        "resources/templates/list" => list(ListKind::ResourceTemplates),
        "prompts/list" => list(ListKind::Prompts),
        "tools/call" => {
            let name = param(params, "name").unwrap_or_default();
            let decision = call(policy, caller, name);
            // Minimum necessary inside the call: declared arguments and rules.
            match (&decision, policy.tools.get(name)) {
                (Decision::Allow(_), Some(tool)) => {
                    let arguments = params.and_then(|p| p.get("arguments"));
                    match crate::policy::arguments::check(
                        tool.arguments.as_deref(),
                        &tool.argument_rules,
                        caller,
                        arguments,
                    ) {
                        Ok(()) => decision,
                        Err(refused) => Decision::Deny(Denied {
                            target: Some(name.to_string()),
                            client_named: false,
                            reason: refused.reason.into(),
                            code: INVALID_PARAMS,
                            message: format!("Invalid arguments for tool {name}: {}", refused.message),
                        }),
                    }
                }
                _ => decision,
            }
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            resource(policy, caller, param(params, "uri").unwrap_or_default())
        }
        "prompts/get" => prompt(policy, caller, param(params, "name").unwrap_or_default()),
        "completion/complete" => {
            let reference = params.and_then(|p| p.get("ref"));
            match reference.and_then(|r| r.get("type")).and_then(Value::as_str) {
                Some("ref/prompt") => prompt(policy, caller, param(reference, "name").unwrap_or_default()),
                Some("ref/resource") => resource(policy, caller, param(reference, "uri").unwrap_or_default()),
                _ => deny_method(method),
            }
        }
        other => deny_method(other),
    }
}

/// The policy's decision on calling tool `name`, before its arguments.
fn call(policy: &CompiledPolicy, caller: &Caller, name: &str) -> Decision {
    match policy.tools.get(name) {
        Some(tool) if tool.callers.admits(caller) && !policy.break_glass_only(name) => Decision::Allow(Allowed {
            target: Some(name.to_string()),
            phi: tool.phi,
            rule: "tool allowed for caller",
            filter: None,
            grant: None,
        }),
        Some(tool) if let Some(grant) = grant_opening(policy, caller, name) => Decision::Allow(Allowed {
            target: Some(name.to_string()),
            phi: tool.phi,
            rule: "tool opened by emergency access",
            filter: None,
            grant: Some(grant.to_string()),
        }),
        found => Decision::Deny(Denied {
            target: Some(name.to_string()),
            client_named: found.is_none(),
            reason: if found.is_some() { "tool not allowed for caller" } else { "tool not in policy" }.into(),
            code: INVALID_PARAMS,
            message: format!("Unknown tool: {name}"),
        }),
    }
}

fn list(kind: ListKind) -> Decision {
    Decision::Allow(Allowed {
        target: None,
        phi: false,
        rule: "list, filtered to the caller",
        filter: Some(kind),
        grant: None,
    })
}

fn deny_method(method: &str) -> Decision {
    Decision::Deny(Denied {
        target: None,
        client_named: false,
        reason: "method not in policy".into(),
        code: METHOD_NOT_FOUND,
        message: format!("Method not found: {method}"),
    })
}

fn resource(policy: &CompiledPolicy, caller: &Caller, uri: &str) -> Decision {
    // Resources are kept longest prefix first: the most specific entry rules.
    match policy.resources.iter().find(|r| uri.starts_with(&r.uri_prefix)) {
        Some(entry) if entry.callers.admits(caller) => Decision::Allow(Allowed {
            target: Some(entry.uri_prefix.clone()),
            phi: entry.phi,
            rule: "resource allowed for caller",
            filter: None,
            grant: None,
        }),
        found => Decision::Deny(Denied {
            target: found.map(|r| r.uri_prefix.clone()),
            client_named: false,
            reason: if found.is_some() { "resource not allowed for caller" } else { "resource not in policy" }.into(),
            code: RESOURCE_NOT_FOUND,
            message: "Resource not found".into(),
        }),
    }
}

fn prompt(policy: &CompiledPolicy, caller: &Caller, name: &str) -> Decision {
    match policy.prompts.get(name) {
        Some(callers) if callers.admits(caller) => Decision::Allow(Allowed {
            target: Some(name.to_string()),
            phi: false,
            rule: "prompt allowed for caller",
            filter: None,
            grant: None,
        }),
        found => Decision::Deny(Denied {
            target: Some(name.to_string()),
            client_named: found.is_none(),
            reason: if found.is_some() { "prompt not allowed for caller" } else { "prompt not in policy" }.into(),
            code: INVALID_PARAMS,
            message: format!("Unknown prompt: {name}"),
        }),
    }
}

fn resource_admitted(policy: &CompiledPolicy, caller: &Caller, uri: &str) -> bool {
    policy.resources.iter().find(|r| uri.starts_with(&r.uri_prefix)).is_some_and(|r| r.callers.admits(caller))
}

/// Filters a list result in place to what the caller may use. Returns how
/// many entries were removed.
pub fn filter_list(policy: &CompiledPolicy, caller: &Caller, kind: ListKind, result: &mut Value) -> usize {
    let field = match kind {
        ListKind::Tools => "tools",
        ListKind::Resources => "resources",
        ListKind::ResourceTemplates => "resourceTemplates",
        ListKind::Prompts => "prompts",
    };
    let Some(items) = result.get_mut(field).and_then(Value::as_array_mut) else { return 0 };
    let before = items.len();
    items.retain(|item| admits_entry(policy, caller, kind, item));
    before - items.len()
}

/// Whether the caller may see one list entry.
fn admits_entry(policy: &CompiledPolicy, caller: &Caller, kind: ListKind, item: &Value) -> bool {
    let text = |key: &str| item.get(key).and_then(Value::as_str).unwrap_or_default();
    match kind {
        ListKind::Tools => policy.tools.get(text("name")).is_some_and(|tool| {
            let name = text("name");
            (tool.callers.admits(caller) && !policy.break_glass_only(name))
                || grant_opening(policy, caller, name).is_some()
        }),
        ListKind::Resources => resource_admitted(policy, caller, text("uri")),
        ListKind::ResourceTemplates => resource_admitted(policy, caller, text("uriTemplate")),
        ListKind::Prompts => policy.prompts.get(text("name")).is_some_and(|c: &CallerSet| c.admits(caller)),
    }
}

/// Removes client-supplied `io.mcpwarden/*` keys from `params._meta` and
/// puts the verified caller there instead. Returns whether the client had
/// supplied any (worth recording).
pub fn rewrite_meta(message: &mut Map<String, Value>, caller: &Caller, issuer: &str) -> bool {
    let Some(params) = message.get_mut("params").and_then(Value::as_object_mut) else { return false };
    let meta = params.entry("_meta").or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        // A non-object _meta is replaced: nothing the client put there survives.
        *meta = json!({META_CALLER: caller_json(caller, issuer)});
        return true;
    };
    let before = meta.len();
    meta.retain(|k, _| !k.starts_with(META_PREFIX));
    let stripped = meta.len() != before;
    meta.insert(META_CALLER.into(), caller_json(caller, issuer));
    stripped
}

fn caller_json(caller: &Caller, issuer: &str) -> Value {
    json!({"sub": caller.subject, "iss": issuer, "groups": caller.groups})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{clinic_server, clinic_stores};
    use crate::policy::compile;

    fn policy() -> CompiledPolicy {
        let mut server = clinic_server();
        server.spec.resources = serde_json::from_value(json!([
            {"uriPrefix": "ehr://charts/", "phi": true, "purpose": "charts", "allowedCallers": {"groups": ["nurses"]}},
            {"uriPrefix": "ehr://charts/public/", "phi": false, "allowedCallers": {"anyAuthenticated": true}},
            {"uriPrefix": "docs://", "phi": false, "allowedCallers": {"anyAuthenticated": true}}
        ]))
        .expect("resources");
        server.spec.prompts =
            serde_json::from_value(json!([{"name": "triage", "allowedCallers": {"groups": ["nurses"]}}]))
                .expect("prompts");
        compile(&server, &clinic_stores()).expect("policy")
    }

    fn caller(groups: &[&str]) -> Caller {
        Caller::new("alice", groups.iter().copied())
    }

    fn call(tool: &str) -> Value {
        json!({"name": tool, "arguments": {"mrn": "12345678"}})
    }

    #[test]
    fn tools_call_follows_the_policy_and_hides_refusals() {
        let p = policy();
        let front_desk = caller(&["front-desk"]);
        let billing = caller(&["billing"]);
        match decide(&p, &front_desk, Some("tools/call"), Some(&call("lookup_patient"))) {
            Decision::Allow(a) => assert!(a.phi && a.target.as_deref() == Some("lookup_patient")),
            other => panic!("{other:?}"),
        }
        let hidden = decide(&p, &billing, Some("tools/call"), Some(&call("lookup_patient")));
        let absent = decide(&p, &billing, Some("tools/call"), Some(&call("drop_tables")));
        let (Decision::Deny(hidden), Decision::Deny(absent)) = (hidden, absent) else { panic!("both refused") };
        assert_eq!((hidden.code, hidden.message.as_str()), (INVALID_PARAMS, "Unknown tool: lookup_patient"));
        assert_eq!(
            (absent.code, absent.message.replace("drop_tables", "X")),
            (INVALID_PARAMS, "Unknown tool: X".into())
        );
        assert_ne!(hidden.reason, absent.reason, "the record knows the difference");
        assert!(matches!(decide(&p, &billing, Some("tools/call"), Some(&call("clinic_hours"))), Decision::Allow(_)));
        assert!(matches!(decide(&p, &billing, Some("tools/call"), None), Decision::Deny(_)));
    }

    #[test]
    fn protocol_lists_and_unknown_methods() {
        let p = policy();
        let c = caller(&[]);
        for m in [
            "initialize",
            "ping",
            "notifications/initialized",
            "notifications/cancelled",
            "server/discover",
            "subscriptions/listen",
        ] {
            assert!(matches!(decide(&p, &c, Some(m), None), Decision::Allow(_)), "{m}");
        }
        assert!(matches!(decide(&p, &c, None, None), Decision::Allow(_)), "responses pass");
        match decide(&p, &c, Some("tools/list"), None) {
            Decision::Allow(a) => assert_eq!(a.filter, Some(ListKind::Tools)),
            other => panic!("{other:?}"),
        }
        match decide(&p, &c, Some("admin/shutdown"), None) {
            Decision::Deny(d) => assert_eq!(d.code, METHOD_NOT_FOUND),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resources_use_the_longest_prefix() {
        let p = policy();
        let nurse = caller(&["nurses"]);
        let anyone = caller(&[]);
        let read = |uri: &str| json!({"uri": uri});
        assert!(
            matches!(decide(&p, &nurse, Some("resources/read"), Some(&read("ehr://charts/123"))), Decision::Allow(a) if a.phi)
        );
        assert!(
            matches!(decide(&p, &anyone, Some("resources/read"), Some(&read("ehr://charts/123"))), Decision::Deny(d) if d.code == RESOURCE_NOT_FOUND)
        );
        assert!(
            matches!(decide(&p, &anyone, Some("resources/read"), Some(&read("ehr://charts/public/x"))), Decision::Allow(a) if !a.phi)
        );
        assert!(matches!(
            decide(&p, &anyone, Some("resources/read"), Some(&read("file:///etc/passwd"))),
            Decision::Deny(_)
        ));
        let complete =
            json!({"ref": {"type": "ref/resource", "uri": "ehr://charts/1"}, "argument": {"name": "x", "value": "y"}});
        assert!(matches!(decide(&p, &anyone, Some("completion/complete"), Some(&complete)), Decision::Deny(_)));
        assert!(matches!(
            decide(&p, &nurse, Some("prompts/get"), Some(&json!({"name": "triage"}))),
            Decision::Allow(_)
        ));
        assert!(matches!(
            decide(&p, &anyone, Some("prompts/get"), Some(&json!({"name": "triage"}))),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn lists_are_filtered_to_the_caller() {
        let p = policy();
        let tools = json!({"tools": [{"name": "lookup_patient"}, {"name": "clinic_hours"}, {"name": "undeclared"}]});
        let mut for_billing = tools.clone();
        assert_eq!(filter_list(&p, &caller(&["billing"]), ListKind::Tools, &mut for_billing), 2);
        assert_eq!(for_billing, json!({"tools": [{"name": "clinic_hours"}]}));
        let mut for_front_desk = tools;
        filter_list(&p, &caller(&["front-desk"]), ListKind::Tools, &mut for_front_desk);
        assert_eq!(for_front_desk["tools"].as_array().map(Vec::len), Some(2));
        let mut resources =
            json!({"resources": [{"uri": "ehr://charts/1"}, {"uri": "docs://a"}, {"uri": "other://x"}]});
        filter_list(&p, &caller(&[]), ListKind::Resources, &mut resources);
        assert_eq!(resources, json!({"resources": [{"uri": "docs://a"}]}));
        let mut prompts = json!({"prompts": [{"name": "triage"}, {"name": "other"}]});
        filter_list(&p, &caller(&["nurses"]), ListKind::Prompts, &mut prompts);
        assert_eq!(prompts, json!({"prompts": [{"name": "triage"}]}));
    }

    #[test]
    fn client_meta_under_the_warden_prefix_is_replaced_by_the_verified_caller() {
        let mut message = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "lookup_patient",
            "_meta": {"io.mcpwarden/caller": {"sub": "admin"}, "io.mcpwarden/db": {"ehr": "postgres://x"}, "progressToken": 7}
        }});
        let map = message.as_object_mut().expect("object");
        assert!(rewrite_meta(map, &caller(&["front-desk"]), "https://login.example.org"));
        let meta = &message["params"]["_meta"];
        assert_eq!(meta["io.mcpwarden/caller"]["sub"], "alice");
        assert!(meta.get("io.mcpwarden/db").is_none());
        assert_eq!(meta["progressToken"], 7);
        let mut plain = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "x"}});
        assert!(!rewrite_meta(plain.as_object_mut().expect("object"), &caller(&[]), "https://i"));
        assert_eq!(plain["params"]["_meta"]["io.mcpwarden/caller"]["sub"], "alice");
    }

    fn grant(beneficiary: &str, tools: &[&str], identified_output: bool) -> crate::breakglass::ActiveGrant {
        crate::breakglass::ActiveGrant {
            name: "ea-1".into(),
            beneficiary: beneficiary.into(),
            tools: tools.iter().map(|t| t.to_string()).collect(),
            identified_output,
            expires_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::MAX),
        }
    }

    #[test]
    fn a_grant_opens_exactly_its_tools_for_exactly_its_beneficiary() {
        let policy = policy();
        let listed = |caller: &Caller| {
            let mut result = json!({"tools": [{"name": "lookup_patient"}, {"name": "clinic_hours"}]});
            filter_list(&policy, caller, ListKind::Tools, &mut result);
            result["tools"].as_array().map(|t| t.len()).unwrap_or_default()
        };
        // alice, in no group: lookup_patient is refused as nonexistent and hidden.
        let mut alice = caller(&[]);
        let refused = decide(&policy, &alice, Some("tools/call"), Some(&call("lookup_patient")));
        assert!(matches!(refused, Decision::Deny(ref d) if d.message == "Unknown tool: lookup_patient"));
        assert_eq!(listed(&alice), 1);
        // Under a grant for her: allowed, named, listed.
        alice.emergency = vec![grant("alice", &["lookup_patient"], false)];
        match decide(&policy, &alice, Some("tools/call"), Some(&call("lookup_patient"))) {
            Decision::Allow(a) => {
                assert_eq!((a.grant.as_deref(), a.rule, a.phi), (Some("ea-1"), "tool opened by emergency access", true))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(listed(&alice), 2);
        // A grant for someone else, or naming a tool outside the server's
        // procedure, opens nothing.
        alice.emergency = vec![grant("bob", &["lookup_patient"], false)];
        assert!(matches!(
            decide(&policy, &alice, Some("tools/call"), Some(&call("lookup_patient"))),
            Decision::Deny(_)
        ));
        assert_eq!(listed(&alice), 1);
        let mut outside = policy.clone();
        outside.emergency_tools.clear();
        alice.emergency = vec![grant("alice", &["lookup_patient"], false)];
        assert!(matches!(
            decide(&outside, &alice, Some("tools/call"), Some(&call("lookup_patient"))),
            Decision::Deny(_)
        ));
        // A tool answering with identified PHI opens only under a grant
        // allowing identified output.
        let mut identified = policy.clone();
        identified.tools.get_mut("lookup_patient").expect("tool").output = crate::api::Output::Identified;
        assert!(matches!(
            decide(&identified, &alice, Some("tools/call"), Some(&call("lookup_patient"))),
            Decision::Deny(_)
        ));
        alice.emergency = vec![grant("alice", &["lookup_patient"], true)];
        assert!(matches!(
            decide(&identified, &alice, Some("tools/call"), Some(&call("lookup_patient"))),
            Decision::Allow(_)
        ));
    }
}
