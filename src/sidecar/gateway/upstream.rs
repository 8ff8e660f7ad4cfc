//! Step 7: the request to the MCP server, on the pod's loopback.
//!
//! A plain HTTP/1.1 client (hyper's pooled client, TCP_NODELAY): the server
//! is the container next door, so there is no proxy, no redirect, no TLS
//! and no URL to parse per request. The token, cookies and hop-by-hop
//! headers stay here; the server's own session id goes in their place.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Headers never forwarded: credentials, hop-by-hop headers, and the
/// client's view of the session (replaced by the server's own id).
const DROPPED: [&str; 12] = [
    "host",
    "authorization",
    "cookie",
    "proxy-authorization",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "mcp-session-id",
];

/// Why the upstream URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Not `http://host:port/path`.
    #[error("--upstream must be an http:// URL of the MCP server on the pod's loopback: {0}")]
    NotHttp(String),
}

/// The MCP server's endpoint and a connection pool to it.
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
}

impl Upstream {
    /// A client for `url` (http only: the server is in the same pod).
    pub fn new(url: &reqwest::Url) -> Result<Upstream, UpstreamError> {
        let not_http = || UpstreamError::NotHttp(url.to_string());
        if url.scheme() != "http" || url.host_str().is_none() {
            return Err(not_http());
        }
        let uri: Uri = url.as_str().parse().map_err(|_| not_http())?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Upstream { client, uri })
    }

    /// A JSON-RPC POST.
    pub fn post(&self, incoming: &HeaderMap, session: Option<&str>, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = self.request(Method::POST, incoming, session, body);
        request.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }

    /// Any request to the endpoint (GET for the server's stream, DELETE
    /// to end a session).
    pub fn request(
        &self,
        method: Method,
        incoming: &HeaderMap,
        session: Option<&str>,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = forwarded_headers(incoming, session);
        request
    }

    /// Sends a request; the answer's body streams from the connection.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(request).await
    }
}

/// Request headers for the upstream: no credential, no hop-by-hop header,
/// the server's own session id. (The client sets `Host` from the URI.)
pub(super) fn forwarded_headers(incoming: &HeaderMap, session: Option<&str>) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if !DROPPED.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    if let Some(session) = session
        && let Ok(v) = HeaderValue::from_str(session)
    {
        out.insert("mcp-session-id", v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut incoming = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer secret"),
            ("cookie", "a=b"),
            ("proxy-authorization", "Basic x"),
            ("host", "evil.example"),
            ("connection", "keep-alive"),
            ("mcp-session-id", "client-view.tag"),
            ("mcp-protocol-version", "2025-11-25"),
            ("accept", "application/json, text/event-stream"),
            ("last-event-id", "7"),
        ] {
            incoming.append(name, HeaderValue::from_static(value));
        }
        let out = forwarded_headers(&incoming, Some("server-id"));
        for gone in ["authorization", "cookie", "proxy-authorization", "host", "connection"] {
            assert!(out.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(out["mcp-session-id"], "server-id");
        assert_eq!(out["mcp-protocol-version"], "2025-11-25");
        assert_eq!(out["last-event-id"], "7");
        assert_eq!(out["accept"], "application/json, text/event-stream");
    }

    #[test]
    fn only_a_plain_http_upstream_is_accepted() {
        for url in ["https://127.0.0.1:8080/mcp", "unix:/run/mcp.sock", "file:///mcp"] {
            let url = reqwest::Url::parse(url).expect("url");
            assert!(Upstream::new(&url).is_err(), "{url} accepted");
        }
    }
}
