//! The resources the fake serves, and what the real API server adds to
//! each (the defaults table of `tests/k8s-recordings/README.md`).

use serde_json::{Value, json};

/// One served resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Plural resource name.
    pub plural: &'static str,
    /// Built-in kinds' LIST items carry no apiVersion/kind.
    pub builtin: bool,
    /// Whether `status` is a subresource (main writes ignore it).
    pub status_subresource: bool,
    /// Whether `metadata.generation` is kept.
    pub generation: bool,
}

impl Kind {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
}

const fn builtin(group: &'static str, version: &'static str, kind: &'static str, plural: &'static str) -> Kind {
    Kind { group, version, kind, plural, builtin: true, status_subresource: false, generation: false }
}

/// Every resource served.
pub const KINDS: &[Kind] = &[
    Kind {
        group: "mcpwarden.io",
        version: "v1alpha1",
        kind: "MCPServer",
        plural: "mcpservers",
        builtin: false,
        status_subresource: true,
        generation: true,
    },
    Kind {
        group: "mcpwarden.io",
        version: "v1alpha1",
        kind: "PHIStore",
        plural: "phistores",
        builtin: false,
        status_subresource: true,
        generation: true,
    },
    Kind {
        group: "mcpwarden.io",
        version: "v1alpha1",
        kind: "EmergencyAccess",
        plural: "emergencyaccesses",
        builtin: false,
        status_subresource: true,
        generation: true,
    },
    Kind {
        generation: true,
        ..builtin("admissionregistration.k8s.io", "v1", "ValidatingAdmissionPolicy", "validatingadmissionpolicies")
    },
    Kind {
        generation: true,
        ..builtin(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicyBinding",
            "validatingadmissionpolicybindings",
        )
    },
    Kind { status_subresource: true, generation: true, ..builtin("apps", "v1", "Deployment", "deployments") },
    Kind { generation: true, ..builtin("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies") },
    builtin("", "v1", "Service", "services"),
    builtin("", "v1", "ConfigMap", "configmaps"),
    builtin("", "v1", "ServiceAccount", "serviceaccounts"),
    builtin("", "v1", "Secret", "secrets"),
    Kind { status_subresource: true, ..builtin("", "v1", "Pod", "pods") },
    builtin("coordination.k8s.io", "v1", "Lease", "leases"),
    builtin("events.k8s.io", "v1", "Event", "events"),
    builtin("", "v1", "Namespace", "namespaces"),
    builtin("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions"),
];

/// The resource served at `group`/`plural`.
pub fn by_plural(group: &str, plural: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.group == group && k.plural == plural)
}

fn default(object: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    if let Some(map) = object.pointer_mut(parent).and_then(Value::as_object_mut)
        && !map.contains_key(key)
    {
        map.insert(key.to_string(), value);
    }
}

fn each<'a>(object: &'a mut Value, pointer: &str) -> impl Iterator<Item = &'a mut Value> {
    object.pointer_mut(pointer).and_then(Value::as_array_mut).into_iter().flatten()
}

fn container_defaults(container: &mut Value) {
    default(container, "/terminationMessagePath", json!("/dev/termination-log"));
    default(container, "/terminationMessagePolicy", json!("File"));
    default(container, "/imagePullPolicy", json!("IfNotPresent"));
    default(container, "/resources", json!({}));
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if container.get(probe).is_some() {
            default(container, &format!("/{probe}/timeoutSeconds"), json!(1));
            default(container, &format!("/{probe}/successThreshold"), json!(1));
            if container.pointer(&format!("/{probe}/httpGet")).is_some() {
                default(container, &format!("/{probe}/httpGet/scheme"), json!("HTTP"));
            }
        }
    }
    for env in each(container, "/env") {
        if env.pointer("/valueFrom/fieldRef").is_some() {
            default(env, "/valueFrom/fieldRef/apiVersion", json!("v1"));
        }
    }
}

fn pod_spec_defaults(spec: &mut Value) {
    default(spec, "/restartPolicy", json!("Always"));
    default(spec, "/terminationGracePeriodSeconds", json!(30));
    default(spec, "/dnsPolicy", json!("ClusterFirst"));
    default(spec, "/schedulerName", json!("default-scheduler"));
    default(spec, "/securityContext", json!({}));
    if let Some(account) = spec.get("serviceAccountName").cloned() {
        default(spec, "/serviceAccount", account);
    }
    for list in ["/containers", "/initContainers"] {
        for container in each(spec, list) {
            container_defaults(container);
        }
    }
    for volume in each(spec, "/volumes") {
        for source in ["configMap", "secret"] {
            if volume.get(source).is_some() {
                default(volume, &format!("/{source}/defaultMode"), json!(420));
            }
        }
    }
}

/// Adds the fields the API server fills in when they are absent.
pub fn apply_defaults(kind: &Kind, object: &mut Value, cluster_ip: impl FnOnce() -> String) {
    match kind.kind {
        "Deployment" => {
            default(
                object,
                "/spec/strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
            );
            default(object, "/spec/revisionHistoryLimit", json!(10));
            default(object, "/spec/progressDeadlineSeconds", json!(600));
            default(object, "/spec/template/metadata/creationTimestamp", Value::Null);
            if let Some(spec) = object.pointer_mut("/spec/template/spec") {
                pod_spec_defaults(spec);
            }
            default(object, "/status", json!({}));
        }
        "Pod" => {
            if let Some(spec) = object.get_mut("spec") {
                pod_spec_defaults(spec);
            }
        }
        "Service" => {
            default(object, "/spec/type", json!("ClusterIP"));
            default(object, "/spec/sessionAffinity", json!("None"));
            default(object, "/spec/ipFamilies", json!(["IPv4"]));
            default(object, "/spec/ipFamilyPolicy", json!("SingleStack"));
            default(object, "/spec/internalTrafficPolicy", json!("Cluster"));
            if object.pointer("/spec/clusterIP").is_none() {
                let ip = cluster_ip();
                default(object, "/spec/clusterIP", json!(ip));
                default(object, "/spec/clusterIPs", json!([ip]));
            }
            for port in each(object, "/spec/ports") {
                default(port, "/protocol", json!("TCP"));
                if let Some(p) = port.get("port").cloned() {
                    default(port, "/targetPort", p);
                }
            }
            default(object, "/status", json!({"loadBalancer": {}}));
        }
        "CustomResourceDefinition" => {
            // The apiextensions controller accepts the names at once.
            default(
                object,
                "/status",
                json!({"conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}
                ]}),
            );
        }
        "NetworkPolicy" => {
            let types = if object.pointer("/spec/egress").is_some() {
                json!(["Ingress", "Egress"])
            } else {
                json!(["Ingress"])
            };
            default(object, "/spec/policyTypes", types);
            for direction in ["/spec/ingress", "/spec/egress"] {
                for rule in each(object, direction) {
                    for port in each(rule, "/ports") {
                        default(port, "/protocol", json!("TCP"));
                    }
                }
            }
        }
        _ => {}
    }
}
