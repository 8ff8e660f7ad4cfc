//! The policy ConfigMap (always) and the JWKS ConfigMap (for `jwksUri`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::Context;
use crate::policy::CompiledPolicy;

/// File name of the compiled policy inside its ConfigMap and mount.
pub const POLICY_FILE: &str = "policy.json";
/// File name of the warden's CA bundle inside the policy ConfigMap.
pub const WARDEN_CA_FILE: &str = "warden-ca.pem";
/// File name of the JWKS inside its ConfigMap and mount.
pub const JWKS_FILE: &str = "jwks.json";
/// Annotation naming where the operator fetches the JWKS from.
pub const JWKS_SOURCE_ANNOTATION: &str = "mcpwarden.io/jwks-source";

pub(super) fn policy_config_map(ctx: &Context<'_>, policy: &CompiledPolicy) -> ConfigMap {
    let mut data = BTreeMap::from([(POLICY_FILE.to_string(), policy.to_json())]);
    if let Some(ca) = &ctx.settings.warden_ca_pem {
        data.insert(WARDEN_CA_FILE.to_string(), ca.clone());
    }
    ConfigMap { metadata: ctx.meta(&ctx.names.policy_config_map), data: Some(data), ..ConfigMap::default() }
}

/// Only `jwksUri` needs a ConfigMap of the operator's: a referenced
/// ConfigMap or Secret is mounted as it is (into the sidecar only), so
/// there is no copy to keep fresh and the operator needs no Secret access.
pub(super) fn jwks_config_map(ctx: &Context<'_>, jwks: Option<&str>) -> Option<ConfigMap> {
    let uri = ctx.server.spec.authentication.oidc.jwks_uri.as_ref()?;
    let mut metadata = ctx.meta(&ctx.names.jwks_config_map);
    metadata.annotations = Some(BTreeMap::from([(JWKS_SOURCE_ANNOTATION.to_string(), uri.clone())]));
    Some(ConfigMap {
        metadata,
        data: jwks.map(|doc| BTreeMap::from([(JWKS_FILE.to_string(), doc.to_string())])),
        ..ConfigMap::default()
    })
}
