//! The MCPServer status, as a pure function of what was observed, merged
//! with the previous status so that nothing churns: `lastTransitionTime`
//! moves only when a condition's status really changes, and nothing
//! time-varying is written otherwise.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ControlStatus, Counts, MCPServerStatus, Verdict};
use crate::compliance::Report;

/// Condition: the workload is rendered, applied and available.
pub const READY: &str = "Ready";
/// Condition: every control passes.
pub const COMPLIANT: &str = "Compliant";
/// Condition: the JWKS served to the sidecar is the one last fetched.
pub const JWKS_CURRENT: &str = "JWKSCurrent";

/// A condition before it gets its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionValue {
    /// `Ready`, `Compliant`, `JWKSCurrent`.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What was observed.
    pub message: String,
}

impl ConditionValue {
    fn new(type_: &'static str, status: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        ConditionValue { type_, status, reason, message: message.into() }
    }
}

/// Readiness from the render outcome and the observed Deployment.
pub fn ready_condition(render_error: Option<&str>, deployment: Option<&Deployment>, replicas: i32) -> ConditionValue {
    if let Some(error) = render_error {
        return ConditionValue::new(READY, "False", "InvalidSpec", format!("nothing is deployed: {error}"));
    }
    let Some(deployment) = deployment else {
        return ConditionValue::new(READY, "False", "Deploying", "the Deployment does not exist yet");
    };
    let status = deployment.status.clone().unwrap_or_default();
    let generation = deployment.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return ConditionValue::new(
            READY,
            "False",
            "Progressing",
            "the Deployment controller has not observed the latest spec",
        );
    }
    let available = status.available_replicas.unwrap_or(0);
    if replicas == 0 {
        return ConditionValue::new(READY, "True", "ScaledToZero", "replicas is 0");
    }
    if available >= replicas && status.updated_replicas.unwrap_or(0) >= replicas {
        ConditionValue::new(READY, "True", "Available", format!("{available}/{replicas} replicas available"))
    } else {
        ConditionValue::new(READY, "False", "Progressing", format!("{available}/{replicas} replicas available"))
    }
}

/// The `Compliant` condition from the roll-up of the report.
pub fn compliant_condition(report: &Report) -> ConditionValue {
    let with = |verdict: Verdict| -> Vec<&str> {
        report.controls.iter().filter(|c| c.verdict == verdict).map(|c| c.id.as_str()).collect()
    };
    match report.compliant {
        Verdict::Pass => ConditionValue::new(
            COMPLIANT,
            "True",
            "AllControlsPass",
            format!("all {} controls pass", report.controls.len()),
        ),
        Verdict::Fail => ConditionValue::new(
            COMPLIANT,
            "False",
            "ControlsFailing",
            format!("failing: {}", with(Verdict::Fail).join(", ")),
        ),
        Verdict::Unknown => ConditionValue::new(
            COMPLIANT,
            "Unknown",
            "ControlsUnverified",
            format!("not verified: {}", with(Verdict::Unknown).join(", ")),
        ),
    }
}

/// The JWKS state for servers using `jwksUri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksState {
    /// The last fetch succeeded.
    Current,
    /// The last fetch failed; the previous keys are still served.
    Stale(String),
    /// No fetch ever succeeded: the sidecar has no keys.
    Missing(String),
}

/// The `JWKSCurrent` condition.
pub fn jwks_condition(uri: &str, state: &JwksState) -> ConditionValue {
    match state {
        JwksState::Current => {
            ConditionValue::new(JWKS_CURRENT, "True", "Fetched", format!("keys from {uri} are served to the sidecar"))
        }
        JwksState::Stale(error) => ConditionValue::new(
            JWKS_CURRENT,
            "False",
            "FetchFailed",
            format!("fetching {uri} failed ({error}); the last good keys are still served"),
        ),
        JwksState::Missing(error) => ConditionValue::new(
            JWKS_CURRENT,
            "False",
            "NoKeys",
            format!("fetching {uri} failed ({error}) and no earlier keys exist: every caller is refused"),
        ),
    }
}

/// Builds the status, keeping each condition's `lastTransitionTime` from
/// `previous` unless its status changed.
pub fn desired_status(
    generation: Option<i64>,
    conditions: Vec<ConditionValue>,
    controls: Vec<ControlStatus>,
    counts: Counts,
    previous: Option<&MCPServerStatus>,
    now: &Time,
) -> MCPServerStatus {
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let conditions = conditions
        .into_iter()
        .map(|c| {
            let before = previous_conditions.iter().find(|p| p.type_ == c.type_);
            let last_transition_time = match before {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: c.type_.to_string(),
                status: c.status.to_string(),
                reason: c.reason.to_string(),
                message: c.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect();
    MCPServerStatus { observed_generation: generation, conditions, controls, counts }
}

/// Conditions whose status changed between two statuses, as
/// `(type, old, new)`: the transitions worth an event. A condition reported
/// for the first time is no transition (the "Applied" event already says
/// the server was set up; one event per condition per server at creation
/// would be noise, and the event recorder keeps each for minutes).
pub fn transitions(previous: Option<&MCPServerStatus>, next: &MCPServerStatus) -> Vec<(String, String, String)> {
    next.conditions
        .iter()
        .filter_map(|c| {
            let old = previous?.conditions.iter().find(|o| o.type_ == c.type_)?.status.clone();
            (old != c.status).then(|| (c.type_.clone(), old, c.status.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("timestamp"))
    }

    fn deployment(generation: i64, observed: i64, available: i32, updated: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { generation: Some(generation), ..ObjectMeta::default() },
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                available_replicas: Some(available),
                updated_replicas: Some(updated),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    #[test]
    fn readiness_follows_the_deployment() {
        assert_eq!(ready_condition(Some("tool x uses a missing store"), None, 2).reason, "InvalidSpec");
        assert_eq!(ready_condition(None, None, 2).status, "False");
        assert_eq!(ready_condition(None, Some(&deployment(3, 2, 2, 2)), 2).reason, "Progressing");
        let partial = ready_condition(None, Some(&deployment(3, 3, 1, 2)), 2);
        assert_eq!((partial.status, partial.message.as_str()), ("False", "1/2 replicas available"));
        let ready = ready_condition(None, Some(&deployment(3, 3, 2, 2)), 2);
        assert_eq!((ready.status, ready.reason), ("True", "Available"));
        assert_eq!(ready_condition(None, Some(&deployment(1, 1, 0, 0)), 0).status, "True");
    }

    #[test]
    fn transition_times_move_only_with_status() {
        let first = desired_status(
            Some(1),
            vec![ConditionValue::new(READY, "False", "Progressing", "0/2")],
            vec![],
            Counts::default(),
            None,
            &at(100),
        );
        assert_eq!(first.conditions[0].last_transition_time, at(100));
        // Same status, new message: the time stays.
        let second = desired_status(
            Some(1),
            vec![ConditionValue::new(READY, "False", "Progressing", "1/2")],
            vec![],
            Counts::default(),
            Some(&first),
            &at(200),
        );
        assert_eq!(second.conditions[0].last_transition_time, at(100));
        assert_eq!(second.conditions[0].message, "1/2");
        assert!(transitions(Some(&first), &second).is_empty());
        assert!(transitions(None, &first).is_empty(), "a first report is no transition");
        // Status flips: the time moves, and it is a transition.
        let third = desired_status(
            Some(1),
            vec![ConditionValue::new(READY, "True", "Available", "2/2")],
            vec![],
            Counts::default(),
            Some(&second),
            &at(300),
        );
        assert_eq!(third.conditions[0].last_transition_time, at(300));
        assert_eq!(
            transitions(Some(&second), &third),
            [("Ready".to_string(), "False".to_string(), "True".to_string())]
        );
        // Same inputs again produce an identical status: nothing to write.
        let again = desired_status(
            Some(1),
            vec![ConditionValue::new(READY, "True", "Available", "2/2")],
            vec![],
            Counts::default(),
            Some(&third),
            &at(400),
        );
        assert_eq!(again, third);
    }
}
