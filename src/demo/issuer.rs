//! The demo's OIDC issuer, in process: a fresh Ed25519 key per run, its
//! JWKS (served over HTTP on loopback, with the discovery document, and
//! written into the manifests the broker reads), and tokens for named
//! callers. No key leaves the process; tokens expire in an hour. Keys can
//! be rotated: the JWKS then holds the old and the new key, and new tokens
//! are signed with the new one.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The issuer's name (`iss`): a name, not a server anyone must reach.
pub const ISSUER: &str = "https://login.clinic.example";
/// The key ids in the JWKS and in tokens' headers: this, `-2` after the
/// first rotation, and so on.
const KID: &str = "demo-ed25519";
/// How long a demo token is valid.
const TOKEN_SECONDS: u64 = 3600;

/// One signing key and what verifiers need of it.
struct Key {
    kid: String,
    encoding: EncodingKey,
    public: [u8; 32],
}

impl Key {
    fn fresh(kid: String) -> anyhow::Result<Key> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for the demo issuer's key: {e}"))?;
        let signing = SigningKey::from_bytes(&seed);
        let der = signing.to_pkcs8_der().context("encode the demo issuer's key")?;
        Ok(Key { kid, encoding: EncodingKey::from_ed_der(der.as_bytes()), public: signing.verifying_key().to_bytes() })
    }
}

/// The issuer's keys (the last one signs) and its audience.
pub struct Issuer {
    keys: std::sync::RwLock<Vec<Key>>,
    audience: String,
}

impl Issuer {
    /// A fresh key, for tokens meant for `audience` (the MCP server's URI).
    pub fn new(audience: &str) -> anyhow::Result<Issuer> {
        Ok(Issuer { keys: std::sync::RwLock::new(vec![Key::fresh(KID.into())?]), audience: audience.to_string() })
    }

    /// A new signing key; the JWKS keeps the previous ones.
    pub fn rotate(&self) -> anyhow::Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = Key::fresh(format!("{KID}-{}", keys.len() + 1))?;
        keys.push(next);
        Ok(())
    }

    /// The public JWKS.
    pub fn jwks(&self) -> Value {
        let keys = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let keys: Vec<Value> = keys
            .iter()
            .map(|k| {
                json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": k.kid,
                       "x": URL_SAFE_NO_PAD.encode(k.public)})
            })
            .collect();
        json!({ "keys": keys })
    }

    /// A token for `sub` in `groups`, with the scope the server requires.
    pub fn token(&self, sub: &str, groups: &[&str]) -> anyhow::Result<String> {
        self.token_for(sub, groups, TOKEN_SECONDS)
    }

    /// Like [`Issuer::token`], valid for `seconds`.
    pub fn token_for(&self, sub: &str, groups: &[&str], seconds: u64) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).context("clock before 1970")?.as_secs();
        let claims = json!({"iss": ISSUER, "aud": self.audience, "sub": sub, "groups": groups,
                            "scope": "mcp:tools", "iat": now, "exp": now + seconds});
        let keys = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = keys.last().context("the issuer has no key")?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding).context("sign a demo token")
    }

    /// Serves the JWKS as it is at each request (and the discovery document
    /// naming it) on `listener` until the task is dropped.
    pub fn serve(
        self: &std::sync::Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let base = format!("http://{}", listener.local_addr()?);
        let discovery = json!({"issuer": ISSUER, "jwks_uri": format!("{base}/jwks"),
                               "id_token_signing_alg_values_supported": ["EdDSA"]})
        .to_string();
        let json = |body: String| move || async move { ([("content-type", "application/json")], body) };
        let issuer = std::sync::Arc::clone(self);
        let jwks = move || {
            let body = issuer.jwks().to_string();
            async move { ([("content-type", "application/json")], body) }
        };
        let app = axum::Router::new()
            .route("/jwks", axum::routing::get(jwks))
            .route("/.well-known/openid-configuration", axum::routing::get(json(discovery)));
        Ok(tokio::spawn(async move {
            let _ = axum::serve(crate::net::no_delay(listener), app).await;
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::verification_keys;

    #[test]
    fn tokens_verify_under_the_published_jwks_only() {
        let issuer = Issuer::new("https://a.example/mcp").unwrap();
        let keys = verification_keys(&issuer.jwks().to_string()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].algorithm, Algorithm::EdDSA);
        let token = issuer.token("dana", &["front-desk"]).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["https://a.example/mcp"]);
        validation.set_issuer(&[ISSUER]);
        let data = jsonwebtoken::decode::<Value>(&token, &keys[0].key, &validation).unwrap();
        assert_eq!(data.claims["sub"], "dana");
        assert_eq!(data.claims["groups"], json!(["front-desk"]));
        // Another run's key does not verify it.
        let other = verification_keys(&Issuer::new("https://a.example/mcp").unwrap().jwks().to_string()).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&token, &other[0].key, &validation).is_err());
        // After a rotation the JWKS holds both keys and new tokens name the new one.
        issuer.rotate().unwrap();
        let keys = verification_keys(&issuer.jwks().to_string()).unwrap();
        assert_eq!(keys.len(), 2);
        let rotated = issuer.token_for("dana", &[], 60).unwrap();
        let kid = jsonwebtoken::decode_header(&rotated).unwrap().kid.unwrap();
        assert_eq!(kid, format!("{KID}-2"));
        assert!(jsonwebtoken::decode::<Value>(&rotated, &keys[0].key, &validation).is_err());
        assert!(jsonwebtoken::decode::<Value>(&rotated, &keys[1].key, &validation).is_ok());
    }
}
