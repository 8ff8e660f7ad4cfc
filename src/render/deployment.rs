//! The Deployment: the MCP server container and the warden sidecar.
//!
//! ```text
//!   pod (automountServiceAccountToken: false, seccomp RuntimeDefault, non-root)
//!   ├─ initContainers[mcp-warden-sidecar]  restartPolicy: Always (native sidecar), uid 10002
//!   │    mounts: policy (ro), jwks (ro), audit WAL (rw), audit key Secret (ro),
//!   │            projected tokens for the broker / collector audiences (ro, when wired)
//!   │    ports:  8443 public, 9090 health/metrics; 127.0.0.1:15432 database proxy
//!   └─ containers[mcp-server]              uid 10001
//!        mounts: /tmp only — no token, no secret, no audit volume
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Context;
use super::config_maps::{JWKS_FILE, POLICY_FILE, WARDEN_CA_FILE};
use super::names::{
    MCP_CONTAINER, POLICY_HASH_ANNOTATION, SIDECAR_COMMAND, SIDECAR_CONTAINER, pod_labels, selector_labels,
};
use super::service::PUBLIC_PORT_NAME;
use crate::api::{SIDECAR_METRICS_PORT, SIDECAR_PG_PROXY_PORT, SIDECAR_PUBLIC_PORT};
use crate::policy::CompiledPolicy;

/// Volume names, shared with the evaluator's isolation checks.
pub mod volumes {
    /// Compiled policy (ConfigMap, mounted as a directory).
    pub const POLICY: &str = "policy";
    /// JWKS document.
    pub const JWKS: &str = "jwks";
    /// Audit write-ahead log.
    pub const AUDIT: &str = "audit-wal";
    /// Key of the arguments' HMAC and of session binding (a Secret).
    pub const AUDIT_KEY: &str = "audit-key";
    /// Scratch space of the MCP container (its root is read-only).
    pub const MCP_TMP: &str = "tmp";
    /// Projected service-account tokens for the broker and the collector
    /// (sidecar only).
    pub const WARDEN_TOKENS: &str = "warden-tokens";
}

/// Paths inside the sidecar.
pub mod paths {
    /// Policy directory.
    pub const POLICY_DIR: &str = "/etc/mcp-warden/policy";
    /// JWKS directory.
    pub const JWKS_DIR: &str = "/etc/mcp-warden/jwks";
    /// Audit WAL directory.
    pub const AUDIT_DIR: &str = "/var/lib/mcp-warden/audit";
    /// Audit key directory.
    pub const AUDIT_KEY_DIR: &str = "/etc/mcp-warden/audit-key";
    /// Projected tokens directory.
    pub const TOKENS_DIR: &str = "/var/run/mcp-warden/tokens";
    /// The broker token, inside [`TOKENS_DIR`].
    pub const BROKER_TOKEN: &str = "broker-token";
    /// The collector token, inside [`TOKENS_DIR`].
    pub const COLLECTOR_TOKEN: &str = "collector-token";
}

/// Lifetime asked for the projected tokens (the kubelet rotates them at 80%).
const TOKEN_SECONDS: i64 = 3600;

/// The control-plane services this pod's sidecar talks to, with the token
/// audience of each.
fn warden_links<'a>(ctx: &'a Context<'_>, policy: &CompiledPolicy) -> Vec<(&'a str, &'static str, &'static str)> {
    let mut links = Vec::new();
    if let Some(url) = &ctx.settings.collector_url {
        links.push((url.as_str(), crate::token_review::COLLECTOR_AUDIENCE, paths::COLLECTOR_TOKEN));
    }
    if let Some(url) = &ctx.settings.broker_url
        && policy.tools.values().any(|t| !t.data_access.is_empty())
    {
        links.push((url.as_str(), crate::token_review::BROKER_AUDIENCE, paths::BROKER_TOKEN));
    }
    links
}

const METRICS_PORT_NAME: &str = "metrics";
/// Key of the audit-key Secret holding the HMAC key.
pub const AUDIT_KEY_FILE: &str = "key";

pub(super) fn deployment(ctx: &Context<'_>, policy: &CompiledPolicy) -> Deployment {
    let server = ctx.server_name();
    let pod_labels = pod_labels(&server);
    let annotations = BTreeMap::from([
        (POLICY_HASH_ANNOTATION.to_string(), policy.hash()),
        ("kubectl.kubernetes.io/default-container".to_string(), MCP_CONTAINER.to_string()),
    ]);
    Deployment {
        metadata: ctx.meta(&ctx.names.workload),
        spec: DeploymentSpec {
            replicas: Some(ctx.server.spec.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(&server)), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(ctx, policy)),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

fn pod_spec(ctx: &Context<'_>, policy: &CompiledPolicy) -> PodSpec {
    PodSpec {
        service_account_name: Some(ctx.names.service_account.clone()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        init_containers: Some(vec![sidecar_container(ctx, policy)]),
        containers: vec![mcp_container(ctx)],
        volumes: Some(pod_volumes(ctx, policy)),
        ..PodSpec::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }
}

/// Restricted container security: own UID, read-only root, no capability,
/// no privilege escalation.
fn restricted(uid: i64) -> SecurityContext {
    SecurityContext {
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

fn mcp_container(ctx: &Context<'_>) -> Container {
    let spec = &ctx.server.spec;
    Container {
        name: MCP_CONTAINER.into(),
        image: Some(spec.image.clone()),
        env: (!spec.env.is_empty()).then(|| spec.env.clone()),
        resources: spec.compute_resources.clone(),
        security_context: Some(restricted(ctx.settings.mcp_uid)),
        volume_mounts: Some(vec![mount(volumes::MCP_TMP, "/tmp", false)]),
        ..Container::default()
    }
}

fn sidecar_container(ctx: &Context<'_>, policy: &CompiledPolicy) -> Container {
    let spec = &ctx.server.spec;
    let settings = ctx.settings;
    let arg = |flag: &str, value: String| [flag.to_string(), value];
    let mut args = Vec::new();
    args.extend(arg("--policy", format!("{}/{POLICY_FILE}", paths::POLICY_DIR)));
    args.extend(arg("--jwks-file", format!("{}/{JWKS_FILE}", paths::JWKS_DIR)));
    args.extend(arg("--upstream", format!("http://127.0.0.1:{}{}", spec.port, spec.path)));
    args.extend(arg("--listen", format!("0.0.0.0:{SIDECAR_PUBLIC_PORT}")));
    args.extend(arg("--metrics-listen", format!("0.0.0.0:{SIDECAR_METRICS_PORT}")));
    args.extend(arg("--audit-dir", paths::AUDIT_DIR.to_string()));
    args.extend(arg("--args-key-file", format!("{}/{AUDIT_KEY_FILE}", paths::AUDIT_KEY_DIR)));
    let links = warden_links(ctx, policy);
    for (url, audience, file) in &links {
        let token = format!("{}/{file}", paths::TOKENS_DIR);
        if *audience == crate::token_review::COLLECTOR_AUDIENCE {
            args.extend(arg("--collector", url.to_string()));
            args.extend(arg("--collector-credential-file", token));
        } else {
            args.extend(arg("--broker", url.to_string()));
            args.extend(arg("--broker-credential-file", token));
            args.extend(arg("--db-proxy-listen", format!("127.0.0.1:{SIDECAR_PG_PROXY_PORT}")));
        }
    }
    if settings.warden_ca_pem.is_some() {
        args.extend(arg("--warden-ca-file", format!("{}/{WARDEN_CA_FILE}", paths::POLICY_DIR)));
    }
    let mut mounts = vec![
        mount(volumes::POLICY, paths::POLICY_DIR, true),
        mount(volumes::JWKS, paths::JWKS_DIR, true),
        mount(volumes::AUDIT, paths::AUDIT_DIR, false),
        mount(volumes::AUDIT_KEY, paths::AUDIT_KEY_DIR, true),
    ];
    if !links.is_empty() {
        mounts.push(mount(volumes::WARDEN_TOKENS, paths::TOKENS_DIR, true));
    }
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(settings.sidecar_image.clone()),
        command: Some(vec![SIDECAR_COMMAND.into()]),
        args: Some(args),
        // A native sidecar: starts before, and outlives, the MCP container.
        restart_policy: Some("Always".into()),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_UID", "metadata.uid"),
        ]),
        ports: Some(vec![
            container_port(PUBLIC_PORT_NAME, SIDECAR_PUBLIC_PORT),
            container_port(METRICS_PORT_NAME, SIDECAR_METRICS_PORT),
        ]),
        startup_probe: Some(http_probe("/healthz", 30)),
        liveness_probe: Some(http_probe("/healthz", 3)),
        readiness_probe: Some(http_probe("/readyz", 3)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted(settings.sidecar_uid)),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn pod_volumes(ctx: &Context<'_>, policy: &CompiledPolicy) -> Vec<Volume> {
    let oidc = &ctx.server.spec.authentication.oidc;
    let jwks_item =
        |key: &str| Some(vec![KeyToPath { key: key.to_string(), path: JWKS_FILE.into(), ..KeyToPath::default() }]);
    let jwks = if let Some(secret) = &oidc.jwks_secret_ref {
        Volume {
            name: volumes::JWKS.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: jwks_item(&secret.key),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }
    } else if let Some(cm) = &oidc.jwks_config_map_ref {
        config_map_volume(volumes::JWKS, &cm.name, jwks_item(&cm.key))
    } else {
        config_map_volume(volumes::JWKS, &ctx.names.jwks_config_map, None)
    };
    let mut list = vec![
        config_map_volume(volumes::POLICY, &ctx.names.policy_config_map, None),
        jwks,
        Volume {
            name: volumes::AUDIT.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(ctx.settings.audit_volume_size.clone())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Created by the platform team (see docs); mounted into the sidecar only.
        Volume {
            name: volumes::AUDIT_KEY.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ctx.names.audit_key_secret.clone()),
                items: Some(vec![KeyToPath {
                    key: AUDIT_KEY_FILE.into(),
                    path: AUDIT_KEY_FILE.into(),
                    ..KeyToPath::default()
                }]),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume { name: volumes::MCP_TMP.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
    ];
    // The sidecar's own identity towards the broker and the collector:
    // short-lived tokens bound to this pod, one audience each, mounted into
    // the sidecar only.
    let links = warden_links(ctx, policy);
    if !links.is_empty() {
        let sources = links
            .iter()
            .map(|(_, audience, file)| VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(audience.to_string()),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    path: file.to_string(),
                    ..ServiceAccountTokenProjection::default()
                }),
                ..VolumeProjection::default()
            })
            .collect();
        list.push(Volume {
            name: volumes::WARDEN_TOKENS.into(),
            projected: Some(ProjectedVolumeSource { sources: Some(sources), ..ProjectedVolumeSource::default() }),
            ..Volume::default()
        });
    }
    list
}

fn config_map_volume(volume: &str, config_map: &str, items: Option<Vec<KeyToPath>>) -> Volume {
    Volume {
        name: volume.into(),
        config_map: Some(ConfigMapVolumeSource { name: config_map.into(), items, ..ConfigMapVolumeSource::default() }),
        ..Volume::default()
    }
}

/// A mount of a whole volume as a directory (never `subPath`, which would
/// freeze the file and miss ConfigMap updates).
fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(METRICS_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}
