//! The chart's ValidatingAdmissionPolicy for `EmergencyAccess`, evaluated
//! offline with the CEL evaluator `check` uses (kube-cel's), against the
//! acts the API server will see: creating, approving, widening, revoking —
//! by the right person and by the wrong ones. The same policy runs in a
//! cluster; e2e exercises it there.

mod common;

use kube::core::cel::{AdmissionRequest, VapEvaluator, VapExpression};
use serde_json::{Value, json};

/// The policy's validations, from the chart template with its Helm lines
/// left out.
fn validations() -> Vec<VapExpression> {
    let objects = common::chart::emergency_admission_policy("rel");
    let policy = objects.iter().find(|d| d["kind"] == "ValidatingAdmissionPolicy").expect("the policy");
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(policy["spec"]["paramKind"]["kind"], "MCPServer");
    let binding = objects.iter().find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding").expect("the binding");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(binding["spec"]["paramRef"]["parameterNotFoundAction"], "Deny");
    policy["spec"]["validations"]
        .as_array()
        .expect("validations")
        .iter()
        .map(|v| VapExpression {
            expression: v["expression"].as_str().expect("expression").to_string(),
            message: v["message"].as_str().map(str::to_string),
            message_expression: None,
        })
        .collect()
}

/// The MCPServers of the namespace (the binding's params).
fn servers() -> Vec<Value> {
    vec![
        json!({"metadata": {"name": "patient-lookup"}, "spec": {"tools": [{"name": "lookup_patient"}],
            "emergencyAccess": {"approvers": {"users": ["oidc:dr-house", "oidc:er-agent"], "groups": ["er-attendings"]},
                                "maxDuration": "2h", "tools": ["lookup_patient"], "approval": "Required",
                                "kubernetesUsernamePrefix": "oidc:"}}}),
        json!({"metadata": {"name": "billing"}, "spec": {"tools": []}}),
    ]
}

fn grant() -> Value {
    json!({"metadata": {"name": "er-1", "namespace": "clinic"},
           "spec": {"server": "patient-lookup", "requester": "oidc:nurse-joy", "beneficiary": "er-agent",
                    "tools": ["lookup_patient"], "reason": "unconscious patient", "duration": "1h"}})
}

fn approved(by: &str) -> Value {
    let mut g = grant();
    g["spec"]["approval"] = json!({"approver": by});
    g
}

/// The failing messages (empty: admitted), over every param.
fn verdict(operation: &str, user: &str, groups: &[&str], object: &Value, old: Option<&Value>) -> Vec<String> {
    let expressions = validations();
    let mut failed = Vec::new();
    for params in servers() {
        let request = AdmissionRequest {
            operation: operation.into(),
            username: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        };
        let mut builder = VapEvaluator::builder().object(object.clone()).request(request).params(params);
        if let Some(old) = old {
            builder = builder.old_object(old.clone());
        }
        failed.extend(common::chart::refusals(&builder.build(), &expressions));
    }
    failed
}

#[track_caller]
fn admitted(failed: Vec<String>) {
    assert!(failed.is_empty(), "refused: {failed:?}");
}

#[track_caller]
fn refused(failed: Vec<String>, needle: &str) {
    assert!(failed.iter().any(|m| m.contains(needle)), "expected {needle:?}, got {failed:?}");
}

#[test]
fn the_requester_creates_an_unapproved_grant_within_the_procedure() {
    admitted(verdict("CREATE", "oidc:nurse-joy", &[], &grant(), None));
    refused(verdict("CREATE", "oidc:mallory", &[], &grant(), None), "spec.requester must be the user creating");
    refused(verdict("CREATE", "oidc:nurse-joy", &[], &approved("oidc:dr-house"), None), "created unapproved");
    let mut wider = grant();
    wider["spec"]["tools"] = json!(["lookup_patient", "drop_tables"]);
    refused(verdict("CREATE", "oidc:nurse-joy", &[], &wider, None), "only tools of the server's emergencyAccess");
    let mut longer = grant();
    longer["spec"]["duration"] = json!("3h");
    refused(verdict("CREATE", "oidc:nurse-joy", &[], &longer, None), "exceeds the procedure's maxDuration");
    let mut elsewhere = grant();
    elsewhere["spec"]["server"] = json!("billing");
    refused(verdict("CREATE", "oidc:nurse-joy", &[], &elsewhere, None), "declares no emergencyAccess procedure");
}

#[test]
fn only_an_approver_other_than_requester_and_beneficiary_approves_as_themselves() {
    let old = grant();
    admitted(verdict("UPDATE", "oidc:dr-house", &[], &approved("oidc:dr-house"), Some(&old)));
    admitted(verdict("UPDATE", "oidc:dr-who", &["er-attendings"], &approved("oidc:dr-who"), Some(&old)));
    refused(verdict("UPDATE", "oidc:nurse-joy", &[], &approved("oidc:nurse-joy"), Some(&old)), "self-approval");
    refused(
        verdict("UPDATE", "oidc:nurse-joy", &[], &approved("oidc:dr-house"), Some(&old)),
        "must be the user approving",
    );
    refused(verdict("UPDATE", "oidc:janitor", &["staff"], &approved("oidc:janitor"), Some(&old)), "only an approver");
    // The beneficiary is listed as an approver, and still may not approve
    // a grant for themselves.
    refused(verdict("UPDATE", "oidc:er-agent", &[], &approved("oidc:er-agent"), Some(&old)), "beneficiary");
}

#[test]
fn nothing_widens_or_changes_after_approval_and_revocation_sticks() {
    let old = approved("oidc:dr-house");
    let mut wider = old.clone();
    wider["spec"]["tools"] = json!(["lookup_patient", "other"]);
    refused(verdict("UPDATE", "oidc:nurse-joy", &[], &wider, Some(&old)), "cannot be changed");
    let mut longer = old.clone();
    longer["spec"]["duration"] = json!("2h");
    refused(verdict("UPDATE", "oidc:dr-house", &[], &longer, Some(&old)), "cannot be changed");
    let mut identified = old.clone();
    identified["spec"]["identifiedOutput"] = json!(true);
    refused(verdict("UPDATE", "oidc:dr-house", &[], &identified, Some(&old)), "cannot be changed");
    refused(
        verdict("UPDATE", "oidc:dr-who", &["er-attendings"], &approved("oidc:dr-who"), Some(&old)),
        "cannot be changed or removed",
    );
    refused(verdict("UPDATE", "oidc:dr-house", &[], &grant(), Some(&old)), "cannot be changed or removed");
    let mut revoked = old.clone();
    revoked["spec"]["revoked"] = json!(true);
    admitted(verdict("UPDATE", "oidc:nurse-joy", &[], &revoked, Some(&old)));
    refused(verdict("UPDATE", "oidc:nurse-joy", &[], &old, Some(&revoked)), "stays revoked");
}
