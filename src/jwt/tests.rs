//! Hostile tokens: each is refused with its own reason class.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

use super::*;

const ISSUER: &str = "https://login.example.org";
const AUDIENCE: &str = "https://patient-lookup.clinic.example/mcp";
const JWKS: &str = include_str!("../../tests/fixtures/test-jwks.json");
const RSA_KEY: &[u8] = include_bytes!("../../tests/fixtures/test-rsa.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/test-rsa.pub.pem");
const EC_KEY: &[u8] = include_bytes!("../../tests/fixtures/test-ec256.pem");

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

pub(crate) fn claims() -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now() + 600, "nbf": now() - 10,
           "groups": ["front-desk", "nurses"], "scope": "mcp:tools openid"})
}

pub(crate) fn rs256(claims: &Value, kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    encode(&header, claims, &EncodingKey::from_rsa_pem(RSA_KEY).expect("rsa key")).expect("sign")
}

fn es256(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-ec256".into());
    encode(&header, claims, &EncodingKey::from_ec_pem(EC_KEY).expect("ec key")).expect("sign")
}

fn settings() -> CompiledAuthentication {
    CompiledAuthentication {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        groups_claim: "groups".into(),
        required_scopes: ["mcp:tools".to_string()].into(),
        rule_claims: ["department".to_string(), "wards".to_string(), "level".to_string()].into(),
    }
}

pub(crate) async fn authenticator(dir: &tempfile::TempDir) -> Authenticator {
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, JWKS).expect("write jwks");
    Authenticator::new(Keys::load(KeySource::File(file)).await.expect("keys"), settings())
}

async fn verify(auth: &Authenticator, token: &str) -> Result<Caller, AuthnError> {
    auth.verify(token).await
}

#[tokio::test]
async fn valid_rs256_and_es256_tokens_identify_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let caller = verify(&auth, &rs256(&claims(), "test-rsa")).await.expect("rs256");
    assert_eq!(caller.subject, "alice");
    assert_eq!(caller.groups, ["front-desk".to_string(), "nurses".to_string()].into());
    assert_eq!(verify(&auth, &es256(&claims())).await.expect("es256").subject, "alice");
}

#[tokio::test]
async fn only_the_claims_the_policy_names_for_rules_are_taken_and_only_usable_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let mut plain = claims();
    plain["department"] = json!("cardiology");
    plain["wards"] = json!(["3a", "3b"]);
    plain["level"] = json!(2);
    plain["email"] = json!("alice@clinic.example");
    let caller = verify(&auth, &rs256(&plain, "test-rsa")).await.expect("valid");
    assert_eq!(
        caller.claims,
        [
            ("department".to_string(), json!("cardiology")),
            ("wards".into(), json!(["3a", "3b"])),
            ("level".into(), json!(2))
        ]
        .into(),
        "email is not named, so it is not taken"
    );
    // Values a rule could not judge whole are absent (a rule reading them
    // refuses the call); the token itself is still valid.
    for (claim, value) in [
        ("department", json!({"name": "cardiology"})),
        ("department", json!(null)),
        ("department", json!("x".repeat(257))),
        ("wards", json!(["3a", 3])),
        ("wards", json!(vec!["w"; 65])),
        ("wards", json!([["nested"]])),
    ] {
        let mut hostile = claims();
        hostile[claim] = value.clone();
        let caller = verify(&auth, &rs256(&hostile, "test-rsa")).await.expect("valid token");
        assert!(!caller.claims.contains_key(claim), "{claim} = {value}");
    }
}

#[tokio::test]
async fn a_group_named_with_spaces_is_one_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let mut one = claims();
    one["groups"] = json!("Front Desk");
    let caller = verify(&auth, &rs256(&one, "test-rsa")).await.expect("valid");
    assert_eq!(caller.groups, ["Front Desk".to_string()].into(), "not the groups Front and Desk");
    let mut listed = claims();
    listed["groups"] = json!(["Front Desk", "nurses", 7]);
    let caller = verify(&auth, &rs256(&listed, "test-rsa")).await.expect("valid");
    assert_eq!(caller.groups, ["Front Desk".to_string(), "nurses".to_string()].into());
}

#[tokio::test]
async fn hostile_tokens_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let with = |patch: Value| {
        let mut c = claims();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("claims").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let cases = [
        (rs256(&with(json!({"exp": now() - 120})), "test-rsa"), AuthnError::Invalid("expired")),
        (rs256(&with(json!({"nbf": now() + 600})), "test-rsa"), AuthnError::Invalid("not yet valid")),
        (rs256(&with(json!({"iss": "https://evil.example"})), "test-rsa"), AuthnError::Invalid("wrong issuer")),
        (
            rs256(&with(json!({"aud": "https://other-server.example/mcp"})), "test-rsa"),
            AuthnError::Invalid("wrong audience"),
        ),
        (rs256(&with(json!({"sub": null})), "test-rsa"), AuthnError::Invalid("missing claim")),
        (rs256(&with(json!({"exp": null})), "test-rsa"), AuthnError::Invalid("missing claim")),
        (rs256(&claims(), "rotated-away"), AuthnError::Invalid("unknown signing key")),
        (rs256(&with(json!({"scope": "openid"})), "test-rsa"), AuthnError::InsufficientScope(vec!["mcp:tools".into()])),
    ];
    for (token, expected) in cases {
        assert_eq!(verify(&auth, &token).await, Err(expected.clone()), "{expected}");
    }
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"test-rsa"}"#),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    assert_eq!(verify(&auth, &unsigned).await, Err(AuthnError::Invalid("unsupported algorithm")));
    // The classic confusion attack: HS256 keyed with the RSA public key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("test-rsa".into());
    let forged = encode(&header, &claims(), &EncodingKey::from_secret(RSA_PUBLIC)).expect("sign");
    assert_eq!(verify(&auth, &forged).await, Err(AuthnError::Invalid("algorithm does not match the key")));
    // An ES256 token claiming the RSA key's kid.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-rsa".into());
    let mismatched = encode(&header, &claims(), &EncodingKey::from_ec_pem(EC_KEY).expect("ec")).expect("sign");
    assert_eq!(verify(&auth, &mismatched).await, Err(AuthnError::Invalid("algorithm does not match the key")));
}

#[tokio::test]
async fn a_tampered_payload_fails_the_signature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let token = rs256(&claims(), "test-rsa");
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload = claims();
    payload["sub"] = json!("mallory");
    let tampered = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(payload.to_string()), parts[2]);
    assert_eq!(verify(&auth, &tampered).await, Err(AuthnError::Invalid("bad signature")));
    assert_eq!(verify(&auth, "garbage").await, Err(AuthnError::Invalid("malformed")));
    assert_eq!(verify(&auth, &format!("{}.{}", parts[0], parts[1])).await, Err(AuthnError::Invalid("malformed")));
}

#[tokio::test]
async fn an_unknown_kid_reloads_the_keys_once_then_waits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    // Start with only the EC key; the RSA key arrives by rotation.
    let mut only_ec: Value = serde_json::from_str(JWKS).expect("jwks");
    only_ec["keys"].as_array_mut().expect("keys").remove(0);
    std::fs::write(&file, only_ec.to_string()).expect("write");
    let auth = Authenticator::new(Keys::load(KeySource::File(file.clone())).await.expect("keys"), settings());
    assert_eq!(auth.keys().len(), 1);
    std::fs::write(&file, JWKS).expect("rotate");
    assert!(verify(&auth, &rs256(&claims(), "test-rsa")).await.is_ok(), "rotation picked up");
    // A flood of unknown kids does not reload again within the interval.
    std::fs::write(&file, "{not json").expect("break the file");
    assert_eq!(verify(&auth, &rs256(&claims(), "nope")).await, Err(AuthnError::Invalid("unknown signing key")));
    assert_eq!(auth.keys().len(), 2, "keys kept");
}

#[tokio::test]
async fn insecure_jwks_urls_and_bad_files_are_refused_at_start() {
    assert!(matches!(
        Keys::load(KeySource::Url("http://idp.example/jwks".into())).await,
        Err(KeysError::InsecureUrl(_))
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).expect("write");
    let err = Keys::load(KeySource::File(file)).await.err().expect("symmetric refused");
    assert!(!err.to_string().contains("c2VjcmV0"));
}

#[tokio::test]
async fn a_verified_token_is_remembered_only_while_settings_and_expiry_allow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = authenticator(&dir).await;
    let token = rs256(&claims(), "test-rsa");
    assert!(verify(&auth, &token).await.is_ok());
    assert!(verify(&auth, &token).await.is_ok());
    assert_eq!(auth.full_checks(), 1, "the second request skipped the signature check");
    // New settings (a reloaded policy with another audience): forgotten, and refused.
    auth.set_settings(CompiledAuthentication { audience: "https://other.example/mcp".into(), ..settings() });
    assert_eq!(verify(&auth, &token).await, Err(AuthnError::Invalid("wrong audience")));
    // A token past its exp (inside the 30 s leeway) is checked in full every time.
    auth.set_settings(settings());
    let mut stale = claims();
    stale["exp"] = json!(now() - 5);
    let stale = rs256(&stale, "test-rsa");
    let before = auth.full_checks();
    assert!(verify(&auth, &stale).await.is_ok(), "within leeway");
    assert!(verify(&auth, &stale).await.is_ok());
    assert_eq!(auth.full_checks(), before + 2, "an expired token is never served from memory");
    // A key reload forgets every remembered token.
    let fresh = rs256(&claims(), "test-rsa");
    verify(&auth, &fresh).await.expect("fresh");
    let checks = auth.full_checks();
    let _ = verify(&auth, &rs256(&claims(), "unknown-kid")).await;
    verify(&auth, &fresh).await.expect("still valid");
    assert_eq!(auth.full_checks(), checks + 2, "re-checked after the reload");
}
