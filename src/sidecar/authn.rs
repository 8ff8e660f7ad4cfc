//! Authentication over HTTP: the sidecar as an OAuth 2.1 resource server.
//!
//! Every request carries `Authorization: Bearer <JWT>`, checked by
//! [`crate::jwt`]; a token in the query string is refused (the MCP
//! authorization spec forbids it). Refusals carry `WWW-Authenticate` per
//! RFC 6750 and RFC 9728. The token never leaves the sidecar.

use axum::http::{HeaderMap, Uri, header};

pub use crate::jwt::{Authenticator, AuthnError};
use crate::policy::Caller;

/// Authenticates a request from its headers and URI.
pub async fn authenticate(auth: &Authenticator, headers: &HeaderMap, uri: &Uri) -> Result<Caller, AuthnError> {
    if uri.query().is_some_and(query_has_token) {
        return Err(AuthnError::TokenInQuery);
    }
    let value = headers.get(header::AUTHORIZATION).ok_or(AuthnError::Missing)?;
    let value = value.to_str().map_err(|_| AuthnError::Invalid("malformed header"))?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
        _ => return Err(AuthnError::Invalid("not a bearer token")),
    };
    auth.verify(token).await
}

fn query_has_token(query: &str) -> bool {
    query.split('&').any(|pair| {
        let key = pair.split('=').next().unwrap_or_default().to_ascii_lowercase();
        key == "access_token" || key == "token" || key == "authorization"
    })
}

/// `WWW-Authenticate` for a refusal, per RFC 6750 and RFC 9728:
/// `error="invalid_token"` only when a token was presented.
pub fn www_authenticate(error: &AuthnError, resource_metadata: &str) -> String {
    let base = format!(r#"Bearer resource_metadata="{resource_metadata}""#);
    match error {
        AuthnError::Missing => base,
        AuthnError::TokenInQuery => {
            format!(r#"{base}, error="invalid_request", error_description="token in query string""#)
        }
        AuthnError::Invalid(why) => format!(r#"{base}, error="invalid_token", error_description="{why}""#),
        AuthnError::InsufficientScope(scopes) => {
            format!(r#"{base}, error="insufficient_scope", scope="{}""#, scopes.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;

    use super::*;
    use crate::jwt::tests::{authenticator, claims, rs256};

    #[tokio::test]
    async fn headers_and_query_strings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = authenticator(&dir).await;
        let uri: Uri = "/mcp".parse().expect("uri");
        assert_eq!(authenticate(&auth, &HeaderMap::new(), &uri).await, Err(AuthnError::Missing));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic YWxpY2U6cHc=".parse().expect("header"));
        assert_eq!(authenticate(&auth, &headers, &uri).await, Err(AuthnError::Invalid("not a bearer token")));
        let token = rs256(&claims(), "test-rsa");
        headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
        assert!(authenticate(&auth, &headers, &uri).await.is_ok());
        let leaked: Uri = format!("/mcp?access_token={token}").parse().expect("uri");
        assert_eq!(authenticate(&auth, &headers, &leaked).await, Err(AuthnError::TokenInQuery));
    }

    #[test]
    fn www_authenticate_follows_rfc_6750() {
        let meta = "https://patient-lookup.clinic.example/.well-known/oauth-protected-resource/mcp";
        assert_eq!(www_authenticate(&AuthnError::Missing, meta), format!(r#"Bearer resource_metadata="{meta}""#));
        assert!(www_authenticate(&AuthnError::Invalid("expired"), meta).contains(r#"error="invalid_token""#));
        assert!(
            www_authenticate(&AuthnError::InsufficientScope(vec!["mcp:tools".into(), "ehr:read".into()]), meta)
                .ends_with(r#"error="insufficient_scope", scope="mcp:tools ehr:read""#)
        );
    }
}
