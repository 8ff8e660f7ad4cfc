//! The chart's ValidatingAdmissionPolicy refusing MCP-server pods without
//! their auditing sidecar, evaluated offline with the CEL evaluator `check`
//! uses (kube-cel's) against the pod `render` produces and against pods
//! someone built to look like it. The same policy runs in a cluster; e2e
//! exercises it there.

mod common;

use kube::core::cel::{AdmissionRequest, VapEvaluator, VapExpression};
use serde_json::{Value, json};

fn policy() -> Value {
    common::chart::server_pod_policy("rel")
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("policy")
}

fn expressions(list: &Value, message_key: &str) -> Vec<VapExpression> {
    list.as_array()
        .expect("expressions")
        .iter()
        .map(|v| VapExpression {
            expression: v["expression"].as_str().expect("expression").to_string(),
            message: v[message_key].as_str().map(str::to_string),
            message_expression: None,
        })
        .collect()
}

fn rendered_pod() -> Value {
    common::chart::rendered_server_pod("clinic")
}

fn evaluator(operation: &str, object: &Value, old: Option<&Value>) -> VapEvaluator {
    let request = AdmissionRequest {
        operation: operation.into(),
        username: "system:serviceaccount:kube-system:replicaset-controller".into(),
        ..Default::default()
    };
    let mut builder = VapEvaluator::builder().object(object.clone()).request(request);
    if let Some(old) = old {
        builder = builder.old_object(old.clone());
    }
    builder.build()
}

/// Whether the policy applies to the pod at all (its matchConditions).
fn applies(pod: &Value) -> bool {
    let conditions = expressions(&policy()["spec"]["matchConditions"], "name");
    evaluator("CREATE", pod, None).evaluate(&conditions).iter().all(|r| r.passed)
}

/// The failing messages (empty: admitted).
fn verdict(operation: &str, pod: &Value, old: Option<&Value>) -> Vec<String> {
    let validations = expressions(&policy()["spec"]["validations"], "message");
    common::chart::refusals(&evaluator(operation, pod, old), &validations)
}

#[track_caller]
fn refused(pod: &Value, needle: &str) {
    let failed = verdict("CREATE", pod, None);
    assert!(failed.iter().any(|m| m.contains(needle)), "expected {needle:?}, got {failed:?}");
}

fn changed(edit: impl FnOnce(&mut Value)) -> Value {
    let mut pod = rendered_pod();
    edit(&mut pod);
    pod
}

#[test]
fn the_rendered_pod_is_admitted_and_only_opted_in_namespaces_are_checked() {
    let pod = rendered_pod();
    assert!(applies(&pod));
    assert_eq!(verdict("CREATE", &pod, None), Vec::<String>::new());
    let spec = &policy()["spec"];
    assert_eq!(spec["failurePolicy"], "Fail");
    assert_eq!(spec["matchConstraints"]["namespaceSelector"]["matchLabels"]["mcpwarden.io/enforce-sidecar"], "true");
    let resources = &spec["matchConstraints"]["resourceRules"][0]["resources"];
    assert_eq!(resources, &json!(["pods", "pods/ephemeralcontainers"]));
    let binding = common::chart::server_pod_policy("rel")
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .expect("binding");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
}

#[test]
fn pods_that_look_like_a_server_are_checked_and_others_are_not() {
    let unlabelled = changed(|p| {
        p["metadata"]["labels"] = json!({"app": "imitation"});
    });
    assert!(applies(&unlabelled), "the server's service account alone makes it a server pod");
    let stranger = json!({"metadata": {"name": "web", "labels": {"app": "web"}},
                          "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx"}]}});
    assert!(!applies(&stranger));
    let bare = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "busybox"}]}});
    assert!(!applies(&bare));
}

#[test]
fn a_server_pod_stripped_of_or_added_to_is_refused() {
    refused(
        &changed(|p| p["spec"].as_object_mut().map(|s| s.remove("initContainers")).map(drop).unwrap_or(())),
        "runs the mcp-warden-sidecar",
    );
    refused(
        &changed(|p| {
            p["spec"]["initContainers"][0].as_object_mut().map(|c| c.remove("restartPolicy")).map(drop).unwrap_or(())
        }),
        "restartPolicy Always",
    );
    refused(&changed(|p| p["spec"]["initContainers"][0]["image"] = json!("evil/sidecar:latest")), "sidecar image");
    // The operator's image, running something other than the sidecar.
    refused(&changed(|p| p["spec"]["initContainers"][0]["command"] = json!(["/bin/sh"])), "runs the sidecar");
    refused(
        &changed(|p| p["spec"]["initContainers"][0]["command"] = json!(["/usr/local/bin/mcp-warden"])),
        "runs the sidecar",
    );
    refused(
        &changed(|p| {
            p["spec"]["initContainers"][0].as_object_mut().map(|c| c.remove("command")).map(drop).unwrap_or(());
            p["spec"]["initContainers"][0]["args"] = json!(["broker", "--listen", "0.0.0.0:8443"]);
        }),
        "runs the sidecar",
    );
    // A pod rendered before the sidecar-only binary (the image's
    // entrypoint, `sidecar` first) is still the sidecar.
    let older = changed(|p| {
        let sidecar = &mut p["spec"]["initContainers"][0];
        sidecar.as_object_mut().map(|c| c.remove("command")).map(drop).unwrap_or(());
        let mut args = vec![json!("sidecar")];
        args.extend(sidecar["args"].as_array().cloned().unwrap_or_default());
        sidecar["args"] = json!(args);
    });
    assert_eq!(verdict("CREATE", &older, None), Vec::<String>::new());
    refused(
        &changed(|p| {
            let extra = json!({"name": "debug", "image": "busybox"});
            p["spec"]["containers"].as_array_mut().expect("containers").push(extra);
        }),
        "exactly one container",
    );
    refused(
        &changed(|p| {
            let first = json!({"name": "setup", "image": "busybox"});
            p["spec"]["initContainers"].as_array_mut().expect("init").insert(0, first);
        }),
        "no init container but mcp-warden-sidecar",
    );
    refused(
        &changed(|p| {
            let mount = json!({"name": "audit-wal", "mountPath": "/steal"});
            p["spec"]["containers"][0]["volumeMounts"].as_array_mut().expect("mounts").push(mount);
        }),
        "mounted by the sidecar only",
    );
    refused(&changed(|p| p["spec"]["hostNetwork"] = json!(true)), "host namespace");
    refused(&changed(|p| p["spec"]["shareProcessNamespace"] = json!(true)), "process namespace");
    refused(
        &changed(|p| p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80, "hostPort": 80}])),
        "host port",
    );
    refused(&changed(|p| p["spec"]["automountServiceAccountToken"] = json!(true)), "service-account token");
    // `kubectl debug` adds an ephemeral container (an UPDATE of the
    // subresource, carrying the whole pod).
    let debugged = changed(|p| p["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox"}]));
    let failed = verdict("UPDATE", &debugged, Some(&rendered_pod()));
    assert!(failed.iter().any(|m| m.contains("ephemeral")), "{failed:?}");
}

#[test]
fn an_existing_pod_keeps_its_sidecar_image_across_a_chart_upgrade() {
    let old = changed(|p| p["spec"]["initContainers"][0]["image"] = json!("ghcr.io/mcp-warden/mcp-warden:0.0.9"));
    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"]["team"] = json!("er");
    assert_eq!(verdict("UPDATE", &relabelled, Some(&old)), Vec::<String>::new());
    // A new pod with the old image is refused; so is swapping the image.
    refused(&old, "sidecar image");
    let swapped = changed(|p| p["spec"]["initContainers"][0]["image"] = json!("evil/sidecar:latest"));
    let failed = verdict("UPDATE", &swapped, Some(&old));
    assert!(failed.iter().any(|m| m.contains("sidecar image")), "{failed:?}");
}
