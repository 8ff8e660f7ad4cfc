//! unique-user-identification (164.312(a)(2)(i)), authentication
//! (164.312(d)) and automatic-logoff (164.312(a)(2)(iii)).

use std::sync::LazyLock;

use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Volume};
use kube::ResourceExt;
use regex::Regex;

use super::{Assessment, Input};
use crate::api::MAX_CREDENTIAL_TTL_SECS;
use crate::policy::parse_go_duration;
use crate::render::names::{MCP_CONTAINER, SIDECAR_CONTAINER};

pub(super) fn unique_user_identification(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let oidc = &input.server.spec.authentication.oidc;
    a.held(format!("every caller is identified by an OIDC token from {}", oidc.issuer));
    let with_data = input.server.spec.tools.iter().filter(|t| !t.data_access.is_empty()).count();
    if with_data > 0 {
        a.held(format!(
            "database access is issued per caller and per tool by the broker ({with_data} tool(s) with dataAccess)"
        ));
    } else {
        a.held("no tool reaches a database");
    }
    match input.rendered {
        Ok(rendered) => match &rendered.deployment.spec.template.spec {
            Some(pod) => check_pod_isolation(pod, "the rendered Deployment", &mut a),
            None => a.failed("the rendered Deployment has no pod template"),
        },
        // Nothing is rendered; the declared environment still tells.
        Err(_) => {
            for (i, env) in input.server.spec.env.iter().enumerate() {
                if let Some(why) = credential_in_env(env) {
                    a.failed(format!("spec.env[{i}] {} {why}", env.name));
                }
            }
        }
    }
    if let Some(pods) = &input.observed.pods {
        for pod in pods {
            if let Some(spec) = &pod.spec {
                check_pod_isolation(spec, &format!("pod {}", pod.name_any()), &mut a);
            }
        }
    }
    if a.failed.is_empty() {
        a.held("no static secret, token or password reaches the MCP container");
    }
    a
}

/// The MCP container sees no Secret, no service-account token and no
/// credential-looking environment.
fn check_pod_isolation(pod: &PodSpec, what: &str, a: &mut Assessment) {
    if pod.automount_service_account_token != Some(false) {
        a.failed(format!("{what} automounts a service-account token"));
    }
    let Some(mcp) = pod.containers.iter().find(|c| c.name == MCP_CONTAINER) else {
        a.failed(format!("{what} has no {MCP_CONTAINER} container"));
        return;
    };
    for env in mcp.env.iter().flatten() {
        if let Some(why) = credential_in_env(env) {
            a.failed(format!(
                "{what}: {MCP_CONTAINER} env {} {why}; the MCP container must hold no credential: tools get per-caller database credentials from the broker",
                env.name
            ));
        }
    }
    for from in mcp.env_from.iter().flatten() {
        if let Some(secret) = &from.secret_ref {
            a.failed(format!("{what}: {MCP_CONTAINER} takes its environment from Secret {}", secret.name));
        }
    }
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    for mount in mcp.volume_mounts.iter().flatten() {
        if let Some(volume) = volumes.iter().find(|v| v.name == mount.name)
            && let Some(why) = sensitive_volume(volume)
        {
            a.failed(format!("{what}: {MCP_CONTAINER} mounts volume {} ({why})", volume.name));
        }
    }
}

fn sensitive_volume(volume: &Volume) -> Option<&'static str> {
    if volume.secret.is_some() {
        return Some("a Secret");
    }
    let projected = volume.projected.as_ref()?;
    let sources = projected.sources.as_deref().unwrap_or_default();
    if sources.iter().any(|s| s.service_account_token.is_some()) {
        return Some("a service-account token");
    }
    if sources.iter().any(|s| s.secret.is_some()) {
        return Some("a Secret");
    }
    None
}

// Constant patterns, exercised by the tests: they cannot fail to compile.
#[allow(clippy::expect_used)]
static DSN_WITH_PASSWORD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@").expect("constant regex"));
#[allow(clippy::expect_used)]
static KEYWORD_PASSWORD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)(^|\s)password\s*=").expect("constant regex"));
const SECRET_NAME_PARTS: [&str; 8] =
    ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "API_KEY", "APIKEY", "PRIVATE_KEY", "CREDENTIAL"];

/// Why an environment variable carries a credential, if it does. The value
/// itself never appears in the answer.
pub(crate) fn credential_in_env(env: &EnvVar) -> Option<&'static str> {
    if let Some(from) = &env.value_from
        && from.secret_key_ref.is_some()
    {
        return Some("is read from a Secret");
    }
    let value = env.value.as_deref().unwrap_or_default();
    if value.is_empty() {
        return None;
    }
    if DSN_WITH_PASSWORD.is_match(value) {
        return Some("holds a connection URL with a password");
    }
    if KEYWORD_PASSWORD.is_match(value) {
        return Some("holds a connection string with a password");
    }
    let name = env.name.to_ascii_uppercase();
    if SECRET_NAME_PARTS.iter().any(|part| name.contains(part)) || name == "PGPASS" {
        return Some("is named like a credential and has a literal value");
    }
    None
}

pub(super) fn authentication(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let oidc = &input.server.spec.authentication.oidc;
    if !oidc.issuer.starts_with("https://") {
        a.failed(format!("authentication.oidc.issuer {:?} is not an https URL", oidc.issuer));
    }
    if !oidc.audience.starts_with("https://") {
        a.failed(format!(
            "authentication.oidc.audience {:?} is not this server's https resource URI (RFC 8707)",
            oidc.audience
        ));
    }
    let sources = [oidc.jwks_uri.is_some(), oidc.jwks_config_map_ref.is_some(), oidc.jwks_secret_ref.is_some()];
    match sources.iter().filter(|s| **s).count() {
        1 => {}
        0 => a.failed("no JWKS source: set jwksUri, jwksConfigMapRef or jwksSecretRef"),
        _ => a.failed("several JWKS sources: set exactly one of jwksUri, jwksConfigMapRef, jwksSecretRef"),
    }
    match input.rendered {
        Ok(rendered) => {
            let enforcing = rendered
                .deployment
                .spec
                .template
                .spec
                .as_ref()
                .and_then(|pod| sidecar_of(pod))
                .is_some_and(|c| c.args.as_deref().unwrap_or_default().iter().any(|a| a == "--policy"));
            if !enforcing {
                a.failed("the rendered Deployment has no sidecar enforcing the policy");
            }
            if rendered.policy.authentication.audience != oidc.audience {
                a.failed("the compiled policy's audience differs from authentication.oidc.audience");
            }
        }
        Err(e) => a.unseen(format!("no objects can be rendered ({e})")),
    }
    a.held(format!(
        "the sidecar accepts only bearer JWTs from {} whose audience is {} (this server's resource URI), and never forwards them upstream",
        oidc.issuer, oidc.audience
    ));
    if !oidc.required_scopes.is_empty() {
        a.held(format!("required scopes: {}", oidc.required_scopes.join(", ")));
    }
    a
}

/// The sidecar container of a pod, wherever it is declared.
pub(crate) fn sidecar_of(pod: &PodSpec) -> Option<&Container> {
    pod.init_containers.iter().flatten().chain(pod.containers.iter()).find(|c| c.name == SIDECAR_CONTAINER)
}

pub(super) fn automatic_logoff(input: &Input<'_>) -> Assessment {
    let mut a = Assessment::default();
    let ttl = &input.server.spec.credentials.ttl;
    match parse_go_duration(ttl) {
        Ok(d) if d.as_secs() > MAX_CREDENTIAL_TTL_SECS => {
            a.failed(format!("credentials.ttl is {ttl}, above the 1h cap"));
        }
        Ok(d) if d.as_secs() == 0 => a.failed("credentials.ttl is zero"),
        Ok(_) => a.held(format!(
            "per-caller database roles expire after {ttl} (VALID UNTIL); their sessions are ended with them"
        )),
        Err(e) => a.failed(format!("credentials.ttl {ttl:?} is invalid: {e}")),
    }
    a
}
