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

/// What a client of a control-plane API (the collector, the broker)
/// presents as its bearer token.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    /// A fixed credential.
    Fixed(String),
    /// A file re-read before every request: a static credential, or the
    /// kubelet's projected service-account token, which rotates.
    File(std::path::PathBuf),
}

impl ClientCredential {
    /// The credential to present now. The error names the file, never its
    /// content.
    pub fn current(&self) -> Result<String, String> {
        match self {
            ClientCredential::Fixed(text) => Ok(text.trim().to_string()),
            ClientCredential::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("credential file {}: {e}", path.display())),
        }
    }
}

/// An HTTP client for a control-plane API, trusting the system roots and,
/// when given, the PEM CA bundle in `ca_file` (the warden's own CA).
pub fn api_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    // Idle connections are let go well before the server would close them
    // (`http_server`), so a request never goes out on one being closed.
    let mut builder = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .pool_idle_timeout(crate::http_server::HEADER_READ_TIMEOUT / 2);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("CA file {} is not PEM certificates: {e}", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}
