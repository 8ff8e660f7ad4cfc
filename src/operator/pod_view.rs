//! Pods as the operator caches them: only what the evaluation reads.
//!
//! ```text
//!   watch pods (label mcpwarden.io/server) ─▶ ServerPod { metadata, spec view, phase } ─▶ cache
//!   reconcile ─▶ ServerPod::to_pod ─▶ compliance (audit-controls, unique-user-identification)
//! ```
//!
//! Deserialized straight into these small structs: a k8s-openapi
//! `Container` carries every probe, lifecycle hook and security context
//! inline (kilobytes each, even empty), and with two per pod they were the
//! largest part of the operator's memory at a thousand servers.

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod, PodSpec, PodStatus, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::render::names::SIDECAR_CONTAINER;

/// A pod of an MCP server, as cached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerPod {
    /// Name, namespace, labels, deletion.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What the evaluation reads of the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodSpecView>,
    /// The phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatusView>,
}

/// The parts of a pod spec that say whether the pod audits every call and
/// keeps credentials from the MCP container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView {
    /// Containers.
    #[serde(default)]
    pub containers: Vec<ContainerView>,
    /// Init containers (the native sidecar is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<ContainerView>>,
    /// Volumes (as cached: those mounted by containers other than the
    /// sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<Volume>>,
    /// Whether a service-account token is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
    /// The service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// The parts of a container the evaluation reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    /// Name.
    pub name: String,
    /// Image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments (the sidecar's `--audit-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Environment from ConfigMaps and Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_from: Option<Vec<EnvFromSource>>,
    /// Mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<VolumeMount>>,
    /// `Always` for a native sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

/// The pod's phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodStatusView {
    /// Pending, Running, Succeeded, Failed, Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl kube::Resource for ServerPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl ContainerView {
    fn to_container(&self) -> Container {
        Container {
            name: self.name.clone(),
            image: self.image.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            env_from: self.env_from.clone(),
            volume_mounts: self.volume_mounts.clone(),
            restart_policy: self.restart_policy.clone(),
            ..Container::default()
        }
    }
}

impl ServerPod {
    /// The Pod the evaluation judges.
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|s| PodSpec {
                containers: s.containers.iter().map(ContainerView::to_container).collect(),
                init_containers: s
                    .init_containers
                    .as_ref()
                    .map(|cs| cs.iter().map(ContainerView::to_container).collect()),
                volumes: s.volumes.clone(),
                automount_service_account_token: s.automount_service_account_token,
                service_account_name: s.service_account_name.clone(),
                ..PodSpec::default()
            }),
            status: self.status.as_ref().map(|s| PodStatus { phase: s.phase.clone(), ..PodStatus::default() }),
        }
    }

    /// Drops what is never read: field ownership, annotations, owner
    /// references, and the volumes only the sidecar mounts.
    pub fn trim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
        self.metadata.owner_references = None;
        if let Some(spec) = self.spec.as_mut() {
            let mounted_by_others: Vec<String> = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .filter(|c| c.name != SIDECAR_CONTAINER)
                .flat_map(|c| c.volume_mounts.iter().flatten().map(|m| m.name.clone()))
                .collect();
            if let Some(volumes) = spec.volumes.as_mut() {
                volumes.retain(|v| mounted_by_others.contains(&v.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded_pod() -> serde_json::Value {
        let path = format!("{}/tests/k8s-recordings/03-get/get-pod.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).expect("recording")).expect("json")
    }

    /// The recorded pod, read as the view and turned back into a Pod, is
    /// judged exactly as the full Pod is.
    #[test]
    fn the_view_keeps_what_the_evaluation_reads() {
        let full: Pod = serde_json::from_value(recorded_pod()).expect("pod");
        let mut view: ServerPod = serde_json::from_value(recorded_pod()).expect("view");
        view.trim();
        let pod = view.to_pod();
        assert_eq!(pod.metadata.name, full.metadata.name);
        assert_eq!(pod.metadata.labels, full.metadata.labels);
        assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
        let (spec, full_spec) = (pod.spec.expect("spec"), full.spec.expect("spec"));
        let names = |cs: &[Container]| cs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&spec.containers), names(&full_spec.containers));
        let sidecar = spec.init_containers.as_ref().and_then(|c| c.iter().find(|c| c.name == SIDECAR_CONTAINER));
        let full_sidecar =
            full_spec.init_containers.as_ref().and_then(|c| c.iter().find(|c| c.name == SIDECAR_CONTAINER));
        assert_eq!(
            sidecar.map(|c| (&c.args, &c.volume_mounts, &c.restart_policy)),
            full_sidecar.map(|c| (&c.args, &c.volume_mounts, &c.restart_policy))
        );
        assert_eq!(spec.automount_service_account_token, full_spec.automount_service_account_token);
        // Only the MCP container's volume stays (tmp); the sidecar's go.
        let kept: Vec<_> = spec.volumes.iter().flatten().map(|v| v.name.clone()).collect();
        assert_eq!(kept, ["tmp"]);
    }
}
