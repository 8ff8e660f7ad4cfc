//! JSON Web Key Sets: what an acceptable one is, and the verification keys
//! it yields. Shared by the operator (which fetches and checks the JWKS) and
//! the sidecar (which verifies tokens with it).
//!
//! Only public asymmetric keys pass: a JWKS holding a private member
//! (`d`, `p`, `q`, …) or a symmetric key (`kty: oct`) is refused — the
//! first must never be copied into a ConfigMap, the second would let
//! anyone who reads it mint tokens.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
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

/// A verification key and the one algorithm it may be used with.
pub struct VerificationKey {
    /// `kid`, if the JWKS names it.
    pub kid: Option<String>,
    /// The only algorithm accepted with this key.
    pub algorithm: Algorithm,
    /// The key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// The keys of a JWKS, each bound to its algorithm (from `alg`, or implied
/// by the key type: RSA → RS256, P-256 → ES256, P-384 → ES384, Ed25519 →
/// EdDSA). A key can never be used with another algorithm, so a token
/// cannot switch a public key into an HMAC secret.
pub fn verification_keys(text: &str) -> Result<Vec<VerificationKey>, JwksError> {
    let canonical = validate_jwks(text)?;
    let set: JwkSet = serde_json::from_str(&canonical).map_err(|_| JwksError::Invalid("not a JWK set".into()))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return Err(JwksError::Invalid(format!("key {i} uses an unsupported curve"))),
            },
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            _ => return Err(JwksError::Invalid(format!("key {i} is not an RSA, EC or OKP public key"))),
        };
        let algorithm = match jwk.common.key_algorithm {
            Some(declared) => {
                let name = format!("{declared:?}");
                let algorithm: Algorithm =
                    name.parse().map_err(|_| JwksError::Invalid(format!("key {i} declares an unsupported alg")))?;
                if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                    return Err(JwksError::Invalid(format!("key {i} declares an HMAC alg")));
                }
                algorithm
            }
            None => implied,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|_| JwksError::Invalid(format!("key {i} cannot be used")))?;
        keys.push(VerificationKey { kid: jwk.common.key_id.clone(), algorithm, key });
    }
    Ok(keys)
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

    #[test]
    fn keys_are_bound_to_their_algorithm() {
        let jwks = include_str!("../tests/fixtures/test-jwks.json");
        let keys = verification_keys(jwks).expect("keys");
        assert_eq!(keys.len(), 2);
        assert_eq!((keys[0].kid.as_deref(), keys[0].algorithm), (Some("test-rsa"), Algorithm::RS256));
        assert_eq!((keys[1].kid.as_deref(), keys[1].algorithm), (Some("test-ec256"), Algorithm::ES256));
        let hmac = jwks.replace(r#""alg": "RS256""#, r#""alg": "HS256""#);
        assert!(verification_keys(&hmac).is_err());
    }
}
