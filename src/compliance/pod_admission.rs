//! Whether the API server refuses MCP-server pods without their sidecar:
//! the chart's ValidatingAdmissionPolicy `<release>-server-pods` and its
//! binding, in force for namespaces labelled [`OPT_IN_LABEL`]`=true`.

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};

/// The namespace label that opts a namespace in.
pub const OPT_IN_LABEL: &str = "mcpwarden.io/enforce-sidecar";

/// The policy's name when the chart is installed as release `mcp-warden`.
pub const DEFAULT_SERVER_POD_POLICY: &str = "mcp-warden-server-pods";

/// What is observed of the server-pod policy for one server's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAdmissionView {
    /// The policy's name.
    pub policy: String,
    /// In force (fails closed, covers pod creation, bound with Deny), or why
    /// not.
    pub in_force: Result<(), String>,
    /// Whether the server's namespace carries the opt-in label.
    pub namespace_opted_in: bool,
}

/// Whether the policy `name` and its binding of the same name deny pod
/// creation (pure).
pub fn in_force(
    name: &str,
    policy: Option<&ValidatingAdmissionPolicy>,
    binding: Option<&ValidatingAdmissionPolicyBinding>,
) -> Result<(), String> {
    let policy = policy.ok_or("it is not installed")?;
    let binding = binding.ok_or("its binding is not installed")?;
    let spec = policy.spec.clone().unwrap_or_default();
    if spec.failure_policy.as_deref() == Some("Ignore") {
        return Err("its failurePolicy is Ignore".into());
    }
    let covers_pods = spec.match_constraints.and_then(|m| m.resource_rules).unwrap_or_default().iter().any(|r| {
        r.resources.as_ref().is_some_and(|rs| rs.iter().any(|x| x == "pods" || x == "*"))
            && r.operations.as_ref().is_some_and(|os| os.iter().any(|o| o == "CREATE" || o == "*"))
    });
    if !covers_pods || spec.validations.unwrap_or_default().is_empty() {
        return Err("it does not validate pod creation".into());
    }
    if binding.spec.policy_name != name || !binding.spec.validation_actions.iter().any(|a| a == "Deny") {
        return Err("its binding does not Deny".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_must_deny_pod_creation() {
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["pods", "pods/ephemeralcontainers"]}]},
                "validations": [{"expression": "true"}]}
        }))
        .expect("policy");
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"}, "spec": {"policyName": "p", "validationActions": ["Deny"]}
        }))
        .expect("binding");
        assert_eq!(in_force("p", Some(&policy), Some(&binding)), Ok(()));
        assert_eq!(in_force("p", None, Some(&binding)), Err("it is not installed".into()));
        assert_eq!(in_force("p", Some(&policy), None), Err("its binding is not installed".into()));
        let mut warn = binding.clone();
        warn.spec.validation_actions = vec!["Warn".into()];
        assert_eq!(in_force("p", Some(&policy), Some(&warn)), Err("its binding does not Deny".into()));
        let mut ignore = policy.clone();
        ignore.spec.as_mut().expect("spec").failure_policy = Some("Ignore".into());
        assert_eq!(in_force("p", Some(&ignore), Some(&binding)), Err("its failurePolicy is Ignore".into()));
    }
}
