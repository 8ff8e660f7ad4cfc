//! Every socket the product accepts has Nagle's algorithm off: for each
//! listener, a connection is made and the server side's TCP_NODELAY is read
//! back from this process's own socket (`common::server_nodelay`). And what
//! that is for: a streamed answer through the sidecar comes back well under
//! the 40 ms a delayed ACK costs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use common::{accepted_with_nodelay, claims, rs256, start_gateway};
use mcp_warden::audit::{Wal, WalConfig};
use mcp_warden::dbproxy::DbProxy;
use mcp_warden::dbproxy::grants::Grants;
use mcp_warden::dbproxy::metrics::ProxyMetrics;
use mcp_warden::health::{self, Health};
use mcp_warden::tls_listener::ApiListen;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get_over(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.expect("answer").expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn health_and_metrics_ports() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = Arc::new(Health::with_flag(Arc::new(true.into()), Registry::default()));
    tokio::spawn(health::serve(listener, health, std::future::pending()));
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert!(get_over(&mut client, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(accepted_with_nodelay(&client).await);
}

#[tokio::test]
async fn the_sidecars_public_listener() {
    let upstream = common::serve(Router::new().route("/mcp", get(|| async { "" }))).await;
    let harness = start_gateway(&format!("{upstream}/mcp"), 64 * 1024 * 1024).await;
    let addr = harness.url.trim_start_matches("http://").to_string();
    let mut client = TcpStream::connect(&addr).await.expect("connect");
    assert!(get_over(&mut client, "/.well-known/oauth-protected-resource").await.starts_with("HTTP/1.1"));
    assert!(accepted_with_nodelay(&client).await);
}

#[tokio::test]
async fn the_control_plane_apis_plain_on_loopback_and_over_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params").self_signed(&key).expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    for tls in [false, true] {
        let listen = ApiListen {
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls_cert_file: tls.then(|| cert_file.clone()),
            tls_key_file: tls.then(|| key_file.clone()),
        };
        let bound = listen.bind("test").await.expect("bind");
        let addr = bound.local_addr().expect("addr");
        let server = tokio::spawn(bound.serve(Router::new().route("/", get(|| async { "ok" }))));
        // Nagle goes off at accept, before any TLS flight.
        let client = TcpStream::connect(addr).await.expect("connect");
        assert!(accepted_with_nodelay(&client).await, "tls: {tls}");
        server.abort();
    }
}

#[tokio::test]
async fn the_database_proxy() {
    let audit = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(WalConfig::new(audit.path(), "clinic/patient-lookup".to_string())).expect("wal"));
    let proxy = DbProxy::new(Grants::new(), wal, ProxyMetrics::register(&mut Registry::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(proxy.serve(listener, std::future::pending()));
    let client = TcpStream::connect(addr).await.expect("connect");
    assert!(accepted_with_nodelay(&client).await);
}

/// What Nagle cost: an SSE answer (headers, then an event, written apart)
/// waited for the client's delayed ACK on every call. Through the sidecar,
/// the median of 20 calls on one connection stays far below that.
#[tokio::test]
async fn a_streamed_answer_through_the_sidecar_does_not_wait_for_a_delayed_ack() {
    use axum::response::sse::{Event, Sse};
    async fn answer(
        body: axum::body::Bytes,
    ) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
        let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let reply = serde_json::json!({"jsonrpc": "2.0", "id": request["id"], "result": {"content": [{"type": "text", "text": "open"}]}});
        Sse::new(futures::stream::once(async move { Ok(Event::default().data(reply.to_string())) }))
    }
    let upstream = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/mcp", axum::routing::post(answer));
        tokio::spawn(async move { axum::serve(mcp_warden::net::no_delay(listener), app).await });
        format!("http://{addr}/mcp")
    };
    let harness = start_gateway(&upstream, 64 * 1024 * 1024).await;
    let token = rs256(&claims("alice", &["front-desk"]));
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
    let mut took = Vec::new();
    for id in 0..21 {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "clinic_hours", "arguments": {}}});
        let started = Instant::now();
        let response = client
            .post(format!("{}/mcp", harness.url))
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "clinic_hours")
            .json(&body)
            .send()
            .await
            .expect("call");
        assert!(response.status().is_success(), "{}", response.status());
        let text = response.text().await.expect("body");
        assert!(text.contains("open"), "{text}");
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!("streamed call through the sidecar: median {median:?} (Nagle with a delayed ACK: ~40 ms)");
    assert!(median < Duration::from_millis(20), "median {median:?}");
}
