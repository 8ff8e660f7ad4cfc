//! The chart's objects as tests need them without Helm (shared with
//! `e2e/`, which includes this file by path).

use serde_json::Value;

/// The chart's break-glass ValidatingAdmissionPolicy and its binding, as
/// installed under the release name `release` (the template with its Helm
/// control lines left out).
pub fn emergency_admission_policy(release: &str) -> Vec<Value> {
    const TEMPLATE: &str = include_str!("../../charts/mcp-warden/templates/emergency-access-policy.yaml");
    let plain: String = TEMPLATE
        .lines()
        .filter(|l| !l.trim_start().starts_with("{{"))
        .map(|l| l.replace("{{ .Release.Name }}", release))
        .collect::<Vec<_>>()
        .join("\n");
    serde_yaml::Deserializer::from_str(&plain)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("YAML"))
        .filter(|d| !d.is_null())
        .collect()
}
