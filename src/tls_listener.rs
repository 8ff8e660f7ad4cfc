//! Serving the control plane's APIs (broker, collector) over TLS: a listener for
//! `axum::serve` that completes each handshake in its own task, so a slow
//! or silent client holds up nobody.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Where a control-plane API listens, and its TLS: flattened into the
/// broker's and the collector's flags. Both return secrets or take the
/// audit trail, so plain HTTP is for loopback only.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiListen {
    /// Address of the API; off loopback only with TLS.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain of the API.
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
}

/// A bound API listener, plain (loopback) or TLS.
pub struct Bound {
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
}

impl ApiListen {
    /// Loads the TLS configuration, refuses plain HTTP off loopback, binds.
    pub async fn bind(&self, what: &str) -> anyhow::Result<Bound> {
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(server_config(cert, key)?),
            _ => None,
        };
        anyhow::ensure!(
            tls.is_some() || self.listen.ip().is_loopback(),
            "--listen {}: off loopback the {what} API needs --tls-cert-file and --tls-key-file",
            self.listen
        );
        let listener = TcpListener::bind(self.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", self.listen))?;
        Ok(Bound { listener, tls })
    }
}

impl Bound {
    /// Whether it serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves `app` until SIGTERM/SIGINT.
    pub async fn serve(self, app: axum::Router) -> anyhow::Result<()> {
        let shutdown = crate::health::shutdown_signal();
        match self.tls {
            Some(config) => {
                axum::serve(TlsListener::new(self.listener, config)?, app).with_graceful_shutdown(shutdown).await?
            }
            None => axum::serve(self.listener, app).with_graceful_shutdown(shutdown).await?,
        }
        Ok(())
    }
}

/// Time a client gets to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS serving cannot start.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// The server configuration from PEM files (a certificate chain and its key).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| TlsError(format!("{}: {e}", cert_file.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no certificate", cert_file.display())));
    }
    // The key's parse error is not quoted: it could echo key material.
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|_| TlsError(format!("{} holds no usable private key", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("certificate and key do not match: {e}")))
}

/// Accepted TLS connections.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener`, handshaking with `config`.
    pub fn new(listener: TcpListener, config: rustls::ServerConfig) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, accepted) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let sender = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(pair) => pair,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
