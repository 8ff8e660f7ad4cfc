//! What kube-controller-manager does in the recordings' cluster (which has
//! no kubelet and no scheduler): the Deployment controller writes status
//! and the revision annotation and makes Pending pods; the garbage
//! collector deletes what an object's owner references say it owns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::core::{Core, Selector};
use super::kinds::{self, Kind};

const MANAGER: &str = "kube-controller-manager";

fn kind(group: &str, plural: &str) -> Kind {
    kinds::by_plural(group, plural).expect("served kind")
}

fn template_hash(deployment: &Value) -> String {
    let template = serde_json::to_vec(&deployment["spec"]["template"]).unwrap_or_default();
    hex::encode(Sha256::digest(template))[..10].to_string()
}

/// Runs the Deployment controller: each Deployment whose generation it has
/// not observed gets, after `delay`, its status, revision and pods.
pub async fn deployments(core: Arc<Core>, delay: Duration) {
    let mut cursor = core.rv();
    let mut latest = core.latest.subscribe();
    loop {
        match core.events_after(cursor, "deployments", None) {
            Ok((events, now)) => {
                cursor = now;
                for event in events {
                    let ns = event.namespace.clone();
                    let name =
                        event.object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
                    match event.type_ {
                        "DELETED" => delete_pods(&core, &ns, &name, None),
                        _ => {
                            let observed = event.object.pointer("/status/observedGeneration").and_then(Value::as_i64);
                            let generation = event.object.pointer("/metadata/generation").and_then(Value::as_i64);
                            if observed != generation && event.object.pointer("/metadata/deletionTimestamp").is_none() {
                                let core = Arc::clone(&core);
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    sync(&core, &ns, &name);
                                });
                            }
                        }
                    }
                }
            }
            Err(now) => cursor = now,
        }
        if latest.changed().await.is_err() {
            return;
        }
    }
}

fn pods_of(core: &Core, namespace: &str, deployment: &str) -> Vec<(String, String)> {
    let prefix = format!("{deployment}-");
    core.scan(&kind("", "pods"), namespace, &Selector::default(), |pod| {
        let owner = pod.pointer("/metadata/ownerReferences/0/name").and_then(Value::as_str)?;
        let hash = owner.strip_prefix(&prefix)?;
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        (hash.len() == 10).then(|| (name, hash.to_string()))
    })
}

fn delete_pods(core: &Core, namespace: &str, deployment: &str, keep_hash: Option<&str>) {
    for (pod, hash) in pods_of(core, namespace, deployment) {
        if Some(hash.as_str()) != keep_hash {
            let _ = core.delete(&kind("", "pods"), namespace, &pod);
        }
    }
}

static POD_SEQ: AtomicU64 = AtomicU64::new(1);

fn sync(core: &Core, namespace: &str, name: &str) {
    let deployments = kind("apps", "deployments");
    let Ok(deployment) = core.get(&deployments, namespace, name) else { return };
    let generation = deployment.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
    let replicas = deployment.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let hash = template_hash(&deployment);
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let revision = deployment
        .pointer("/metadata/annotations/deployment.kubernetes.io~1revision")
        .and_then(Value::as_str)
        .and_then(|r| r.parse::<u64>().ok());
    // A new template (pods of another hash exist) is a new revision.
    let hashes: Vec<String> = pods_of(core, namespace, name).into_iter().map(|(_, h)| h).collect();
    let next_revision = match revision {
        None => 1,
        Some(r) if !hashes.is_empty() && !hashes.contains(&hash) => r + 1,
        Some(r) => r,
    };
    if revision != Some(next_revision) {
        let _ = core.update(&deployments, namespace, name, MANAGER, None, |live| {
            let mut next = live.clone();
            next["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!(next_revision.to_string());
            Ok(next)
        });
    }
    let rs = format!("{name}-{hash}");
    let status = json!({
        "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas, "unavailableReplicas": replicas,
        "conditions": [
            {"type": "Available", "status": "False", "lastUpdateTime": now, "lastTransitionTime": now,
             "reason": "MinimumReplicasUnavailable", "message": "Deployment does not have minimum availability."},
            {"type": "Progressing", "status": "True", "lastUpdateTime": now, "lastTransitionTime": now,
             "reason": "ReplicaSetUpdated", "message": format!("ReplicaSet \"{rs}\" is progressing.")}
        ]
    });
    let _ = core.update(&deployments, namespace, name, MANAGER, Some("status"), |live| {
        let mut next = live.clone();
        next["status"] = status;
        Ok(next)
    });
    // Pods: the template's, Pending (nothing schedules them), as many as wanted.
    delete_pods(core, namespace, name, Some(&hash));
    let current = pods_of(core, namespace, name);
    let pods = kind("", "pods");
    for (extra, _) in current.iter().skip(replicas as usize) {
        let _ = core.delete(&pods, namespace, extra);
    }
    let Ok(deployment) = core.get(&deployments, namespace, name) else { return };
    let template = &deployment["spec"]["template"];
    for _ in current.len()..replicas.max(0) as usize {
        let mut labels = template["metadata"]["labels"].clone();
        labels["pod-template-hash"] = json!(hash);
        let suffix = format!("{:05x}", POD_SEQ.fetch_add(1, Ordering::Relaxed) % 0xfffff);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{rs}-{suffix}"), "generateName": format!("{rs}-"), "namespace": namespace,
                "labels": labels, "annotations": template["metadata"]["annotations"].clone(),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                    "uid": format!("rs-{hash}"), "controller": true, "blockOwnerDeletion": true}]
            },
            "spec": template["spec"].clone(),
            "status": {"phase": "Pending", "qosClass": "Burstable"}
        });
        let _ = core.create(&pods, namespace, pod, MANAGER);
    }
}

/// Deletes the dependents of every removed object (background deletion).
pub async fn garbage_collector(core: Arc<Core>) {
    let mut latest = core.latest.subscribe();
    loop {
        if latest.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (namespace, uid) in core.take_removed() {
            for (kind, name) in core.dependents(&namespace, &uid) {
                let _ = core.delete(&kind, &namespace, &name);
            }
        }
    }
}
