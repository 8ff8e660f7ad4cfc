//! The chart's objects as tests need them without Helm (shared with
//! `e2e/`, which includes this file by path).

use serde_json::Value;

/// The sidecar image the chart's defaults (and `render`'s) name.
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/mcp-warden/mcp-warden:0.1.0";

/// The documents of a chart template, installed as release `release`: its
/// Helm control lines left out, the release name and the default sidecar
/// image filled in.
fn documents(template: &str, release: &str) -> Vec<Value> {
    let image = r#"{{ .Values.sidecarImage | default (include "mcp-warden.image" .) | squote }}"#;
    let plain: String = template
        .lines()
        .filter(|l| !l.trim_start().starts_with("{{"))
        .map(|l| l.replace("{{ .Release.Name }}", release).replace(image, &format!("'{DEFAULT_SIDECAR_IMAGE}'")))
        .collect::<Vec<_>>()
        .join("\n");
    serde_yaml::Deserializer::from_str(&plain)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

/// The chart's break-glass ValidatingAdmissionPolicy and its binding.
pub fn emergency_admission_policy(release: &str) -> Vec<Value> {
    documents(include_str!("../../charts/mcp-warden/templates/emergency-access-policy.yaml"), release)
}

/// The chart's policy refusing MCP-server pods without their sidecar, and
/// its binding.
pub fn server_pod_policy(release: &str) -> Vec<Value> {
    documents(include_str!("../../charts/mcp-warden/templates/server-pod-policy.yaml"), release)
}

/// A pod as the ReplicaSet would create it in `namespace` from the
/// Deployment `render` makes of the compliant example.
pub fn rendered_server_pod(namespace: &str) -> Value {
    let example = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/compliant"));
    let (set, errors) = mcp_warden::manifest::load_paths(&[example]);
    assert!(errors.is_empty(), "{errors:?}");
    let stores = set.stores.iter().map(|s| (kube::ResourceExt::name_any(&s.object), s.object.clone())).collect();
    let settings = mcp_warden::render::Settings::default();
    let objects = mcp_warden::render::render(&set.servers[0].object, &stores, &settings, None).expect("renders");
    let deployment = objects.to_values().into_iter().find(|o| o["kind"] == "Deployment").expect("deployment");
    let template = &deployment["spec"]["template"];
    let mut metadata = template["metadata"].clone();
    metadata["name"] = serde_json::json!("patient-lookup-7d9f-abcde");
    metadata["namespace"] = serde_json::json!(namespace);
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"].clone()})
}

/// The messages of the validations `evaluator` refuses with (empty:
/// admitted). Every expression must evaluate cleanly: an evaluation error
/// would be a refusal for the wrong reason, so it fails the test.
pub fn refusals(
    evaluator: &kube::core::cel::VapEvaluator,
    validations: &[kube::core::cel::VapExpression],
) -> Vec<String> {
    let mut failed = Vec::new();
    for result in evaluator.evaluate(validations).into_iter().filter(|r| !r.passed) {
        let message = result.message.unwrap_or_default();
        assert!(
            validations.iter().any(|e| e.message.as_deref() == Some(message.as_str())),
            "{} did not evaluate: {message}",
            result.expression
        );
        failed.push(message);
    }
    failed
}
