//! How the product serves HTTP on every listener it opens (the sidecar's
//! public port, health and metrics ports, the broker's and the collector's
//! APIs).
//!
//! `axum::serve` gives hyper no timer, and without one hyper's header-read
//! timeout is silently off: a client that connects and sends nothing, sends
//! a request head a byte at a time, or says nothing after its last answer,
//! holds a connection — a task and a file descriptor — for as long as it
//! likes. Enough of them and nobody else is served. This accept loop serves
//! each connection with hyper's HTTP/1 builder and tokio's timer, so a
//! request head must arrive whole within [`HEADER_READ_TIMEOUT`] of the
//! connection being ready for one (after accept, and after each answer on a
//! kept-alive connection). hyper times only the head: a client could send
//! one promising a body and then trickle it, a byte every few seconds,
//! forever — before the broker or the collector has read who it is. So
//! each request's body must arrive whole within [`BODY_READ_TIMEOUT`] of
//! its head; a body that does not is a read error for whoever reads it.
//!
//! ```text
//!   listener.accept() ─▶ http1::Builder { timer, header_read_timeout }
//!                          └─▶ body with a deadline ─▶ Router
//!   shutdown          ─▶ stop accepting; open connections finish their
//!                        request in flight (graceful), then serve returns
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// Longest a connection may take to send a whole request head once it is
/// ready for one (hyper's own default, which `axum::serve` leaves inert).
/// It is also how long an idle kept-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request's body may take to arrive whole, from its head. The
/// product's bodies are one JSON-RPC message, a credential request or an
/// audit batch of at most 1 MiB.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send what it sends.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// A request head, once the connection is ready for one.
    pub head: Duration,
    /// A request body, from its head.
    pub body: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience { head: HEADER_READ_TIMEOUT, body: BODY_READ_TIMEOUT }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// connections finish what they are answering.
pub async fn serve<L: Listener>(listener: L, app: Router, shutdown: impl Future<Output = ()> + Send) {
    serve_with(listener, app, shutdown, Patience::default()).await
}

/// [`serve`] with other timeouts (tests).
pub async fn serve_with<L: Listener>(
    mut listener: L,
    app: Router,
    shutdown: impl Future<Output = ()> + Send,
    patience: Patience,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(patience.head);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = app.clone().map_request(move |request: hyper::Request<Incoming>| {
            request.map(|body| Deadline::new(body, patience.body))
        });
        let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A head timeout, a reset or a malformed request: the client's
            // doing, nothing to log at more than debug.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Why a request body was not read: it did not arrive whole in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?} of its head")]
pub struct BodyTimeout(pub Duration);

/// Whether `error` (or what caused it) is a [`BodyTimeout`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<BodyTimeout>())
}

/// A request body that fails once its deadline passes. The timer is set
/// only when the body is not already there, so a body that came with its
/// head (the common case) costs no timer at all.
struct Deadline {
    body: Incoming,
    deadline: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(body: Incoming, timeout: Duration) -> Self {
        Deadline { body, deadline: Instant::now() + timeout, timeout, timer: None }
    }
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const TIMEOUT: Duration = Duration::from_millis(300);
    /// Far beyond TIMEOUT: a connection still open then was never closed.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn app() -> Router {
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/echo", axum::routing::post(|body: Bytes| async move { format!("{} bytes", body.len()) }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow"
                }),
            )
    }

    async fn server(
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, tokio::spawn(serve_with(listener, app(), shutdown, Patience { head: TIMEOUT, body: TIMEOUT })))
    }

    /// Reads until the server closes; what it said, and when it closed.
    async fn until_closed(socket: &mut TcpStream) -> (String, Instant) {
        let mut got = Vec::new();
        let read = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the server kept the connection open ({} bytes so far)", got.len());
        (String::from_utf8_lossy(&got).into_owned(), Instant::now())
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_let_go() {
        let (addr, _server) = server(std::future::pending()).await;
        let started = Instant::now();
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        let (said, closed) = until_closed(&mut socket).await;
        assert!(closed - started >= TIMEOUT, "closed before the timeout: {said}");
        assert!(!said.contains("200"), "{said}");
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_cut_off() {
        let (addr, _server) = server(std::future::pending()).await;
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        let (mut read, mut write) = socket.split();
        let trickle = async {
            for byte in b"GET / HTTP/1.1\r\nHost: example\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(trickle, tokio::time::timeout(PATIENCE, read.read_to_end(&mut got)));
        assert!(read.is_ok(), "the server waited for the whole trickled head");
        assert!(!String::from_utf8_lossy(&got).contains("200"), "a head trickled past the timeout was served");
    }

    /// Sends a head promising `len` bytes of body, then the body a byte
    /// every `every`; what the server said.
    async fn trickled_body(len: usize, every: Duration) -> String {
        let (addr, _server) = server(std::future::pending()).await;
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        let head = format!("POST /echo HTTP/1.1\r\nHost: example\r\nContent-Length: {len}\r\n\r\n");
        socket.write_all(head.as_bytes()).await.expect("head");
        let (mut read, mut write) = socket.split();
        let trickle = async {
            for _ in 0..len {
                tokio::time::sleep(every).await;
                if write.write_all(b"x").await.is_err() {
                    return;
                }
            }
        };
        let mut got = Vec::new();
        let answer = async {
            let mut buf = [0u8; 4096];
            // The first answer, whole or not.
            if let Ok(Ok(n)) = tokio::time::timeout(PATIENCE, read.read(&mut buf)).await {
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::join!(trickle, answer);
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_body_trickled_past_its_deadline_is_not_read() {
        let started = Instant::now();
        // 100 bytes at one per 50 ms: 5 s, far past the 300 ms allowed.
        let said = trickled_body(100, Duration::from_millis(50)).await;
        assert!(said.starts_with("HTTP/1.1 4"), "{said}");
        assert!(!said.contains("100 bytes"), "{said}");
        assert!(started.elapsed() < Duration::from_secs(4), "the server waited for the whole trickle");
    }

    #[tokio::test]
    async fn a_body_that_arrives_in_time_is_read_even_in_pieces() {
        let said = trickled_body(5, Duration::from_millis(20)).await;
        assert!(said.starts_with("HTTP/1.1 200") && said.ends_with("5 bytes"), "{said}");
    }

    #[test]
    fn a_body_timeout_is_known_through_the_errors_wrapping_it() {
        let wrapped = axum::Error::new(BodyTimeout(Duration::from_secs(1)));
        assert!(is_body_timeout(&wrapped));
        assert!(!is_body_timeout(&std::io::Error::other("reset")));
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_after_its_answer() {
        let (addr, _server) = server(std::future::pending()).await;
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await.expect("request");
        let (said, _) = until_closed(&mut socket).await;
        assert!(said.starts_with("HTTP/1.1 200"), "{said}");
        assert!(said.ends_with("ok"), "{said}");
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish_then_returns() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = server(async move {
            let _ = stopped.await;
        })
        .await;
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket.write_all(b"GET /slow HTTP/1.1\r\nHost: example\r\n\r\n").await.expect("request");
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(()).expect("stop");
        let (said, _) = until_closed(&mut socket).await;
        assert!(said.starts_with("HTTP/1.1 200") && said.ends_with("slow"), "{said}");
        tokio::time::timeout(PATIENCE, server).await.expect("serve returned").expect("no panic");
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    }
}
