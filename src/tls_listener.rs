//! Serving the control plane's APIs (broker, collector) over TLS: a listener for
//! `axum::serve` that completes each handshake in its own task, so a slow
//! or silent client holds up nobody, and a serving certificate that follows
//! its files: cert-manager (or a person) renews the Secret, the kubelet
//! swaps the mounted files, and the next handshakes use the new certificate
//! without a restart. A renewal that cannot be used (half-written, key and
//! certificate not matching) keeps the certificate in force and is logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
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
    tls: Option<Arc<ServingCertificate>>,
}

impl ApiListen {
    /// Loads the TLS configuration, refuses plain HTTP off loopback, binds.
    pub async fn bind(&self, what: &str) -> anyhow::Result<Bound> {
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(ServingCertificate::load(cert, key)?),
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
    /// The address bound (a port chosen by the system when 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether it serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves `app` until SIGTERM/SIGINT.
    pub async fn serve(self, app: axum::Router) -> anyhow::Result<()> {
        let shutdown = crate::health::shutdown_signal();
        match self.tls {
            Some(certificate) => {
                certificate.keep_fresh(CERTIFICATE_RELOAD_INTERVAL);
                let listener = TlsListener::new(self.listener, certificate.server_config()?)?;
                crate::http_server::serve(listener, app, shutdown).await;
            }
            None => crate::http_server::serve(crate::net::no_delay(self.listener), app, shutdown).await,
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

/// How often the certificate files are read again. The kubelet updates a
/// mounted Secret within about a minute; cert-manager renews weeks before
/// expiry, so this only has to be well inside that.
pub const CERTIFICATE_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// The certificate an API serves, as its two PEM files hold it now.
pub struct ServingCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    /// SHA-256 of both files' bytes: a change is noticed without parsing.
    digest: [u8; 32],
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate").field("cert_file", &self.cert_file).finish_non_exhaustive()
    }
}

impl ServingCertificate {
    /// Reads both files; a missing, empty or mismatched pair is an error.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<ServingCertificate>, TlsError> {
        let loaded = read_pair(cert_file, key_file)?;
        Ok(Arc::new(ServingCertificate {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(loaded),
        }))
    }

    /// A server configuration whose handshakes use the certificate in force.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        Ok(rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>))
    }

    /// Reads the files again. `Ok(true)` when a new certificate is in force,
    /// `Ok(false)` when the files are unchanged; on error the certificate in
    /// force stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let digest = file_digest(&self.cert_file, &self.key_file)?;
        if self.current.read().unwrap_or_else(|p| p.into_inner()).digest == digest {
            return Ok(false);
        }
        let loaded = read_pair(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(true)
    }

    /// Reloads every `every` for as long as the certificate is in use.
    pub fn keep_fresh(self: &Arc<Self>, every: Duration) {
        let weak: Weak<ServingCertificate> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(certificate) = weak.upgrade() else { return };
                match certificate.reload() {
                    Ok(true) => tracing::info!(file = %certificate.cert_file.display(), "serving certificate renewed"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "renewed certificate not usable; the previous one stays in force")
                    }
                }
            }
        });
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()).key))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_digest(cert_file: &Path, key_file: &Path) -> Result<[u8; 32], TlsError> {
    let mut hash = Sha256::new();
    for file in [cert_file, key_file] {
        let bytes = std::fs::read(file).map_err(|e| TlsError(format!("{}: {e}", file.display())))?;
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(&bytes);
    }
    Ok(hash.finalize().into())
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<Loaded, TlsError> {
    // Digest first: if the files change while being parsed, the next round
    // sees a different digest and reads them again.
    let digest = file_digest(cert_file, key_file)?;
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
    let key = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError(format!("certificate and key do not match: {e}")))?;
    Ok(Loaded { key: Arc::new(key), digest })
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
                // Before the handshake: its own flights are small writes too.
                crate::net::set_no_delay(&tcp);
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
