//! Shared harness of the sidecar tests: test tokens, the clinic policy, and
//! a gateway over the real WAL in front of a given upstream.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use mcp_warden::audit::args_hmac::ArgsKey;
use mcp_warden::audit::{Wal, WalConfig};
use mcp_warden::broker::client::BrokerClient;
use mcp_warden::dbproxy::grants::Grants;
use mcp_warden::jwt::{Authenticator, KeySource, Keys};
use mcp_warden::policy::CompiledPolicy;
use mcp_warden::sidecar::data_access::DataAccess;
use mcp_warden::sidecar::gateway::{Gateway, GatewayConfig};
use mcp_warden::sidecar::metrics::SidecarMetrics;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

pub const ISSUER: &str = "https://login.example.org";
pub const AUDIENCE: &str = "https://patient-lookup.clinic.example/mcp";
pub const JWKS: &str = include_str!("../fixtures/test-jwks.json");
pub const RSA_KEY: &[u8] = include_bytes!("../fixtures/test-rsa.pem");
pub const RSA_PUBLIC: &[u8] = include_bytes!("../fixtures/test-rsa.pub.pem");
pub const EC_KEY: &[u8] = include_bytes!("../fixtures/test-ec256.pem");
pub const CLINIC: &str = include_str!("../../examples/compliant/clinic.yaml");

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

pub fn claims(sub: &str, groups: &[&str]) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": now() + 600, "groups": groups, "scope": "mcp:tools"})
}

pub fn rs256(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-rsa".into());
    encode(&header, claims, &EncodingKey::from_rsa_pem(RSA_KEY).expect("key")).expect("sign")
}

pub fn es256(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-ec256".into());
    encode(&header, claims, &EncodingKey::from_ec_pem(EC_KEY).expect("key")).expect("sign")
}

pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    format!("http://{addr}")
}

pub fn policy() -> CompiledPolicy {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("clinic.yaml");
    std::fs::write(&file, CLINIC).expect("write");
    let (set, errors) = mcp_warden::manifest::load_paths(&[file]);
    assert!(errors.is_empty(), "{errors:?}");
    let stores = set.stores.iter().map(|s| (kube::ResourceExt::name_any(&s.object), s.object.clone())).collect();
    mcp_warden::policy::compile(&set.servers[0].object, &stores).expect("policy")
}

/// A gateway in front of `upstream` (the MCP endpoint URL), with keys from
/// a JWKS served over HTTP and a WAL bounded to `wal_bytes`.
pub struct Harness {
    /// Base URL of the gateway.
    pub url: String,
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// The WAL directory.
    pub audit: tempfile::TempDir,
}

pub async fn start_gateway(upstream: &str, wal_bytes: u64) -> Harness {
    let jwks_base =
        serve(Router::new().route("/jwks", get(|| async { ([("content-type", "application/json")], JWKS) }))).await;
    let keys = Keys::load(KeySource::Url(format!("{jwks_base}/jwks"))).await.expect("keys");
    let policy = Arc::new(policy());
    let audit = tempfile::tempdir().expect("tempdir");
    let mut wal_config = WalConfig::new(audit.path(), policy.server.to_string());
    wal_config.pod = Some("p-1".into());
    wal_config.max_bytes = wal_bytes;
    let wal = Arc::new(Wal::open(wal_config).expect("wal"));
    let config = GatewayConfig {
        upstream: reqwest::Url::parse(upstream).expect("url"),
        allowed_hosts: vec!["127.0.0.1".into()],
        allowed_origins: vec![],
        max_body_bytes: 1024 * 1024,
    };
    let authn = Authenticator::new(keys, policy.authentication.clone());
    let metrics = SidecarMetrics::register(&mut Registry::default());
    let args_key = ArgsKey::from_bytes(&[42; 32]).expect("key");
    let broker = BrokerClient::new(&fake_broker().await, FAKE_BROKER_CREDENTIAL).expect("broker client");
    // Nothing listens at the proxy address: these tests stop at the MCP
    // server (tests/dbproxy.rs covers the database side).
    let data_access = DataAccess::new(broker, Grants::new(), "127.0.0.1:9".parse().expect("addr"));
    let gateway = Gateway::new(policy, authn, wal, args_key, config, metrics).expect("gateway");
    let gateway = Arc::new(gateway.with_data_access(data_access));
    // Served as the sidecar binary serves it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = Arc::clone(&gateway).router();
    tokio::spawn(mcp_warden::sidecar::serve_public(listener, router, std::future::pending()));
    Harness { url, gateway, audit }
}

/// What the gateway tests' stand-in broker expects.
pub const FAKE_BROKER_CREDENTIAL: &str = "fake-broker-credential-0123456789abcdef";

/// The break-glass grant the stand-in broker reports in force: for `er-doc`
/// only, opening `lookup_patient` for ten minutes.
pub const FAKE_GRANT: &str = "ea-er-doc";

/// A stand-in for the credential broker, for tests of the gateway alone:
/// answers every well-formed request from the right sidecar with a
/// credential for a store that is never contacted, and reports
/// [`FAKE_GRANT`] in force for `er-doc`.
pub async fn fake_broker() -> String {
    async fn grants(headers: axum::http::HeaderMap, body: axum::Json<Value>) -> axum::response::Response {
        use axum::response::IntoResponse;
        if mcp_warden::bearer::bearer(&headers) != Some(FAKE_BROKER_CREDENTIAL) {
            let refusal = json!({"error": "unauthenticated", "message": "stand-in broker refused"});
            return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(refusal)).into_response();
        }
        let grants = if body["subject"] == "er-doc" {
            let expires = (chrono::Utc::now() + chrono::Duration::minutes(10)).format("%Y-%m-%dT%H:%M:%SZ").to_string();
            json!([{"name": FAKE_GRANT, "beneficiary": "er-doc", "tools": ["lookup_patient"], "expiresAt": expires}])
        } else {
            json!([])
        };
        axum::Json(json!({"grants": grants})).into_response()
    }
    async fn issue(headers: axum::http::HeaderMap, body: axum::Json<Value>) -> axum::response::Response {
        use axum::response::IntoResponse;
        let authorized = mcp_warden::bearer::bearer(&headers) == Some(FAKE_BROKER_CREDENTIAL);
        let complete = ["server", "tool", "store", "callerToken"]
            .iter()
            .all(|k| body.get(k).and_then(Value::as_str).is_some_and(|v| !v.is_empty()));
        if !authorized || !complete {
            let refusal = json!({"error": "invalid_request", "message": "stand-in broker refused"});
            return (axum::http::StatusCode::BAD_REQUEST, axum::Json(refusal)).into_response();
        }
        let valid_until = (chrono::Utc::now() + chrono::Duration::minutes(15)).to_rfc3339();
        axum::Json(json!({
            "leaseId": "fake-lease", "role": "mcpw_u_fake", "password": "never-used", "validUntil": valid_until,
            "host": "127.0.0.1", "port": 9, "database": "ehr", "sslMode": "disable", "reused": false
        }))
        .into_response()
    }
    serve(
        Router::new()
            .route("/v1/credentials", axum::routing::post(issue))
            .route("/v1/emergency-grants", axum::routing::post(grants)),
    )
    .await
}

/// Kills and reaps a child process when dropped, so no test leaves one
/// running.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// Whether the server side of `client`'s connection, in this process, has
/// TCP_NODELAY set: its socket is found among this process's descriptors by
/// its addresses (the client's, mirrored) and the option read back. None
/// until the server has accepted the connection.
pub fn server_nodelay(client: &tokio::net::TcpStream) -> Option<bool> {
    let (client_local, client_peer) = (client.local_addr().ok()?, client.peer_addr().ok()?);
    fn address(fd: i32, peer: bool) -> Option<std::net::SocketAddr> {
        // SAFETY: a zeroed sockaddr_storage is valid; the kernel fills at most `len` bytes.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let ptr = &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr;
        // SAFETY: ptr and len describe `storage`.
        let rc =
            unsafe { if peer { libc::getpeername(fd, ptr, &mut len) } else { libc::getsockname(fd, ptr, &mut len) } };
        if rc != 0 || i32::from(storage.ss_family) != libc::AF_INET {
            return None;
        }
        // SAFETY: the family is AF_INET, so the storage holds a sockaddr_in.
        let v4: libc::sockaddr_in = unsafe { *(ptr as *const libc::sockaddr_in) };
        let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
        Some(std::net::SocketAddr::from((ip, u16::from_be(v4.sin_port))))
    }
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if address(fd, true) != Some(client_local) || address(fd, false) != Some(client_peer) {
            continue;
        }
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len describe an int, as TCP_NODELAY takes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &mut value as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        return (rc == 0).then_some(value != 0);
    }
    None
}

/// Waits (up to 5 s) until this process has accepted `client`'s connection,
/// and says whether that socket has TCP_NODELAY.
pub async fn accepted_with_nodelay(client: &tokio::net::TcpStream) -> bool {
    let started = std::time::Instant::now();
    loop {
        if let Some(on) = server_nodelay(client) {
            return on;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "the connection was never accepted");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub mod chart;
