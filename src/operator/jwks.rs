//! The issuer's keys: fetched from `jwksUri` by the operator, checked, and
//! carried into the pod as a ConfigMap, so the MCP pod needs no egress to
//! the identity provider.
//!
//! Only public asymmetric keys pass: a JWKS holding a private member
//! (`d`, `p`, `q`, …) or a symmetric key (`kty: oct`) is refused — the
//! first must never be copied into a ConfigMap, the second would let
//! anyone who reads it mint tokens.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];

/// Why keys could not be obtained. Messages name the failure class only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// The document could not be fetched.
    #[error("fetch failed: {0}")]
    Fetch(String),
    /// The document is not an acceptable JWKS.
    #[error("not an acceptable JWKS: {0}")]
    Invalid(String),
}

/// Validates a JWKS document and returns it in canonical (compact) form.
pub fn validate_jwks(text: &str) -> Result<String, JwksError> {
    let invalid = |m: &str| JwksError::Invalid(m.to_string());
    if text.len() > MAX_JWKS_BYTES {
        return Err(invalid("larger than 256 KiB"));
    }
    let value: Value = serde_json::from_str(text).map_err(|_| invalid("not JSON"))?;
    let keys = value.get("keys").and_then(Value::as_array).ok_or_else(|| invalid("no \"keys\" array"))?;
    if keys.is_empty() {
        return Err(invalid("no keys"));
    }
    for (i, key) in keys.iter().enumerate() {
        let Some(object) = key.as_object() else {
            return Err(JwksError::Invalid(format!("key {i} is not an object")));
        };
        match object.get("kty").and_then(Value::as_str) {
            Some("RSA" | "EC" | "OKP") => {}
            Some("oct") => return Err(JwksError::Invalid(format!("key {i} is symmetric (kty oct)"))),
            _ => return Err(JwksError::Invalid(format!("key {i} has no supported kty"))),
        }
        if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| object.contains_key(**m)) {
            return Err(JwksError::Invalid(format!("key {i} contains private member {member:?}")));
        }
    }
    serde_json::to_string(&value).map_err(|_| invalid("cannot re-encode"))
}

/// Where keys come from; a trait so the controller can be tested without
/// a network.
pub trait JwksSource: Send + Sync {
    /// Fetches the document at `uri` (unvalidated).
    fn fetch<'a>(&'a self, uri: &'a str) -> BoxFuture<'a, Result<String, JwksError>>;
}

/// Fetches over HTTPS with the system's web PKI roots.
pub struct HttpsJwksSource {
    client: reqwest::Client,
}

impl HttpsJwksSource {
    /// A client that follows no redirects off https and gives up after
    /// `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, JwksError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| JwksError::Fetch(format!("cannot build an HTTPS client: {e}")))?;
        Ok(HttpsJwksSource { client })
    }
}

impl JwksSource for HttpsJwksSource {
    fn fetch<'a>(&'a self, uri: &'a str) -> BoxFuture<'a, Result<String, JwksError>> {
        Box::pin(async move {
            let response = self.client.get(uri).send().await.map_err(|e| JwksError::Fetch(classify(&e)))?;
            if !response.status().is_success() {
                return Err(JwksError::Fetch(format!("HTTP {}", response.status().as_u16())));
            }
            if response.content_length().is_some_and(|l| l > MAX_JWKS_BYTES as u64) {
                return Err(JwksError::Invalid("larger than 256 KiB".into()));
            }
            let mut body = Vec::new();
            let mut response = response;
            while let Some(chunk) = response.chunk().await.map_err(|e| JwksError::Fetch(classify(&e)))? {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_JWKS_BYTES {
                    return Err(JwksError::Invalid("larger than 256 KiB".into()));
                }
            }
            String::from_utf8(body).map_err(|_| JwksError::Invalid("not UTF-8".into()))
        })
    }
}

fn classify(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else if e.is_redirect() {
        "too many or insecure redirects".into()
    } else {
        "request failed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_asymmetric_keys_pass_in_canonical_form() {
        let jwks = r#"{ "keys": [ {"kty": "RSA", "kid": "a", "n": "xyz", "e": "AQAB"}, {"kty": "EC", "crv": "P-256", "x": "1", "y": "2"} ] }"#;
        let out = validate_jwks(jwks).expect("valid");
        assert!(!out.contains(' '));
        assert!(out.contains(r#""kid":"a""#));
    }

    #[test]
    fn private_symmetric_empty_and_garbage_are_refused() {
        for (doc, needle) in [
            (r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB","d":"secret"}]}"#, "private member \"d\""),
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, "symmetric"),
            (r#"{"keys":[]}"#, "no keys"),
            (r#"{"keys":[{"n":"x"}]}"#, "no supported kty"),
            ("<html>", "not JSON"),
            (r#"{"jwks":[]}"#, "no \"keys\" array"),
        ] {
            let err = validate_jwks(doc).expect_err(doc);
            assert!(err.to_string().contains(needle), "{doc}: {err}");
            assert!(!err.to_string().contains("secret") && !err.to_string().contains("c2VjcmV0"));
        }
        let huge = format!(r#"{{"keys":[{{"kty":"RSA","n":"{}","e":"AQAB"}}]}}"#, "a".repeat(MAX_JWKS_BYTES));
        assert!(validate_jwks(&huge).is_err());
    }

    #[tokio::test]
    async fn plain_http_is_refused() {
        let source = HttpsJwksSource::new(Duration::from_secs(2)).expect("client");
        let err = source.fetch("http://127.0.0.1:9/jwks").await.expect_err("http");
        assert!(matches!(err, JwksError::Fetch(_)), "{err}");
    }
}
