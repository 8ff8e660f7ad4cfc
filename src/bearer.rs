//! Bearer tokens on the control plane's own APIs (broker, collector): the
//! header parsed once, and static shared credentials for laptops and tests,
//! kept only as their SHA-256 and compared in constant time.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest static credential accepted.
pub const MIN_CREDENTIAL_BYTES: usize = 32;

/// A static shared credential, kept only as its SHA-256.
#[derive(Clone)]
pub struct StaticCredential([u8; 32]);

impl StaticCredential {
    /// From the secret text (trimmed); refuses short ones.
    pub fn new(secret: &str) -> Result<StaticCredential, String> {
        let secret = secret.trim();
        if secret.len() < MIN_CREDENTIAL_BYTES {
            return Err(format!("a static credential must be at least {MIN_CREDENTIAL_BYTES} bytes"));
        }
        Ok(StaticCredential(Sha256::digest(secret.as_bytes()).into()))
    }

    /// Whether the request's bearer value is this credential (constant time).
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|token| {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            digest.ct_eq(&self.0).into()
        })
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}
