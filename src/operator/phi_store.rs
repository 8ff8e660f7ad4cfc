//! PHIStore status. The operator does not read Secrets, so it cannot reach
//! a store; store health is the broker's to report. Until a broker does,
//! the status says so as Unknown, written once.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;

use super::context::{Context, ErrorLabels};
use super::reconcile::Error;
use crate::api::{API_VERSION, PHIStore, PHIStoreStatus};
use crate::render::names::MANAGER;

/// The status the operator can vouch for: Ready Unknown until a broker
/// reports. Keeps an unchanged condition's transition time.
pub fn desired_store_status(store: &PHIStore, now: &Time) -> PHIStoreStatus {
    let previous = store.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(p) if p.status == "Unknown" => p.last_transition_time.clone(),
        _ => now.clone(),
    };
    PHIStoreStatus {
        observed_generation: store.metadata.generation,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "Unknown".into(),
            reason: "AwaitingBroker".into(),
            message: "store health is reported by the mcp-warden broker, which has not reported on this store".into(),
            last_transition_time,
            observed_generation: store.metadata.generation,
        }],
        ..PHIStoreStatus::default()
    }
}

/// Reconciles one PHIStore's status.
pub async fn reconcile_store(store: Arc<PHIStore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = store.namespace().ok_or(Error::NoNamespace)?;
    let next = desired_store_status(&store, &Time(k8s_openapi::jiff::Timestamp::now()));
    if store.status.as_ref() != Some(&next) {
        let api: Api<PHIStore> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": API_VERSION, "kind": "PHIStore", "status": next});
        api.patch_status(&store.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    Ok(Action::await_change())
}

/// Retries a failed store status update.
pub fn store_error_policy(store: Arc<PHIStore>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("phistore/{}/{}", store.namespace().unwrap_or_default(), store.name_any());
    ctx.metrics.failures.get_or_create(&ErrorLabels { error: error.metric_label().into() }).inc();
    Action::requeue(ctx.backoff(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_once_then_stable() {
        let mut store: PHIStore = serde_yaml::from_str(
            "apiVersion: mcpwarden.io/v1alpha1\nkind: PHIStore\nmetadata: {name: ehr, namespace: clinic, generation: 1}\nspec:\n  postgres: {host: db, database: ehr, adminSecretRef: {name: a}}\n  endpoints: {podSelector: {matchLabels: {app: db}}, ports: [5432]}\n",
        )
        .expect("store");
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(100).expect("t"));
        let t2 = Time(k8s_openapi::jiff::Timestamp::from_second(200).expect("t"));
        let first = desired_store_status(&store, &t1);
        assert_eq!(first.conditions[0].status, "Unknown");
        store.status = Some(first.clone());
        assert_eq!(desired_store_status(&store, &t2), first, "no churn");
    }
}
