//! The pods' ServiceAccount and the Service in front of the sidecar.

use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Context;
use super::names::selector_labels;
use crate::api::SIDECAR_PUBLIC_PORT;

/// Name of the sidecar's public port on the pod and the Service.
pub const PUBLIC_PORT_NAME: &str = "mcp";

pub(super) fn service_account(ctx: &Context<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.meta(&ctx.names.service_account),
        // Tokens reach the sidecar only, through a projected volume with
        // audiences of the warden's own; nothing is automounted.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub(super) fn service(ctx: &Context<'_>) -> Service {
    Service {
        metadata: ctx.meta(&ctx.names.workload),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&ctx.server_name())),
            ports: Some(vec![ServicePort {
                name: Some(PUBLIC_PORT_NAME.into()),
                port: SIDECAR_PUBLIC_PORT,
                target_port: Some(IntOrString::String(PUBLIC_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
