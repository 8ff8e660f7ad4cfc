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

pub use crate::jwks::{JwksError, MAX_JWKS_BYTES, validate_jwks};

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

    #[tokio::test]
    async fn plain_http_is_refused() {
        let source = HttpsJwksSource::new(Duration::from_secs(2)).expect("client");
        let err = source.fetch("http://127.0.0.1:9/jwks").await.expect_err("http");
        assert!(matches!(err, JwksError::Fetch(_)), "{err}");
    }
}
