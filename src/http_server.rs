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
//! kept-alive connection).
//!
//! ```text
//!   listener.accept() ─▶ http1::Builder { timer, header_read_timeout } ─▶ Router
//!   shutdown          ─▶ stop accepting; open connections finish their
//!                        request in flight (graceful), then serve returns
//! ```

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// Longest a connection may take to send a whole request head once it is
/// ready for one (hyper's own default, which `axum::serve` leaves inert).
/// It is also how long an idle kept-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// connections finish what they are answering.
pub async fn serve<L: Listener>(listener: L, app: Router, shutdown: impl Future<Output = ()> + Send) {
    serve_with(listener, app, shutdown, HEADER_READ_TIMEOUT).await
}

/// [`serve`] with another head timeout (tests).
pub async fn serve_with<L: Listener>(
    mut listener: L,
    app: Router,
    shutdown: impl Future<Output = ()> + Send,
    header_read_timeout: Duration,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
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
        Router::new().route("/", get(|| async { "ok" })).route(
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
        (addr, tokio::spawn(serve_with(listener, app(), shutdown, TIMEOUT)))
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
