//! The proxy's connection to the store, as the caller's role: TLS as the
//! store's `sslMode` says (`verify-full` or `disable`; nothing weaker is
//! tried), SCRAM-SHA-256 only (the role's password never travels, and a
//! server asking for anything else is refused), and the call's correlation
//! id as `application_name`.

use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{Frame, FrameReader};
use crate::broker::issuer::Credential;

/// How long connecting and logging in may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream to the store, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Why the store could not be reached as the caller. Messages never hold
/// the password.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Network or TLS failure.
    #[error("store unreachable: {0}")]
    Unreachable(String),
    /// The server's certificate or TLS setup was refused.
    #[error("TLS to the store: {0}")]
    Tls(String),
    /// The server refused the login (SQLSTATE and its message).
    #[error("the store refused the login ({code}): {message}")]
    Refused {
        /// SQLSTATE.
        code: String,
        /// Server message.
        message: String,
    },
    /// The server spoke out of protocol or asked for a weaker method.
    #[error("store protocol: {0}")]
    Protocol(String),
}

/// A logged-in upstream connection.
pub struct Upstream {
    /// The stream, after authentication.
    pub io: Box<dyn Io>,
    /// Bytes read after the greeting (normally none).
    pub leftover: BytesMut,
    /// Messages the server sent after AuthenticationOk, up to and including
    /// its first ReadyForQuery (ParameterStatus, BackendKeyData, …).
    pub greeting: Vec<Frame>,
    /// The server's cancel key.
    pub key: Option<(i32, i32)>,
}

/// Opens a byte stream to the store: TCP, then TLS if `ssl_mode` says so.
pub async fn open(credential: &Credential) -> Result<Box<dyn Io>, UpstreamError> {
    let tcp = TcpStream::connect((credential.host.as_str(), credential.port))
        .await
        .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    match credential.ssl_mode.as_str() {
        "disable" => Ok(Box::new(tcp)),
        "verify-full" => Ok(Box::new(tls(tcp, credential).await?)),
        other => {
            Err(UpstreamError::Tls(format!("sslMode {other} is not served by the proxy (verify-full or disable)")))
        }
    }
}

async fn tls(
    mut tcp: TcpStream,
    credential: &Credential,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    let answer = tcp.read_u8().await.map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    if answer != b'S' {
        return Err(UpstreamError::Tls("the store does not offer TLS and sslMode is verify-full".into()));
    }
    let config = crate::broker::store::tls_config(credential.ca_pem.as_deref())
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from(credential.host.clone())
        .map_err(|_| UpstreamError::Tls("the store's host is not a valid server name".into()))?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))
}

/// Connects and logs in as the credential's role.
pub async fn connect(credential: &Credential, application_name: &str) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(CONNECT_TIMEOUT, login(credential, application_name))
        .await
        .map_err(|_| UpstreamError::Unreachable("connecting to the store timed out".into()))?
}

async fn login(credential: &Credential, application_name: &str) -> Result<Upstream, UpstreamError> {
    let mut io = open(credential).await?;
    let io_err = |e: std::io::Error| UpstreamError::Unreachable(e.to_string());
    let mut buf = BytesMut::new();
    let params = [
        ("user", credential.role.as_str()),
        ("database", credential.database.as_str()),
        ("application_name", application_name),
        ("client_encoding", "UTF8"),
    ];
    frontend::startup_message(params.iter().copied(), &mut buf).map_err(io_err)?;
    io.write_all(&buf).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;
    let mut reader = FrameReader::new(io);
    let mut scram: Option<ScramSha256> = None;
    let mut pending_write: Option<BytesMut> = None;
    let mut greeting = Vec::new();
    let mut key = None;
    let mut authenticated = false;
    let mut scram_done = false;
    loop {
        if let Some(bytes) = pending_write.take() {
            reader.get_mut().write_all(&bytes).await.map_err(io_err)?;
            reader.get_mut().flush().await.map_err(io_err)?;
        }
        let frame = reader
            .next()
            .await
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?
            .ok_or_else(|| UpstreamError::Protocol("the store closed the connection during login".into()))?;
        let message = parse(&frame)?;
        match message {
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(mechanism) = mechanisms.next().map_err(|e| UpstreamError::Protocol(e.to_string()))? {
                    offered |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !offered {
                    return Err(UpstreamError::Protocol("the store does not offer SCRAM-SHA-256".into()));
                }
                let s = ScramSha256::new(credential.password.as_bytes(), ChannelBinding::unsupported());
                let mut out = BytesMut::new();
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out).map_err(io_err)?;
                scram = Some(s);
                pending_write = Some(out);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| UpstreamError::Protocol("SASL out of order".into()))?;
                s.update(body.data()).map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                let mut out = BytesMut::new();
                frontend::sasl_response(s.message(), &mut out).map_err(io_err)?;
                pending_write = Some(out);
            }
            Message::AuthenticationSaslFinal(body) => {
                let mut s = scram.take().ok_or_else(|| UpstreamError::Protocol("SASL out of order".into()))?;
                // Proves the server knew the verifier: a server that merely
                // accepts is not enough.
                s.finish(body.data()).map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                scram_done = true;
            }
            Message::AuthenticationOk => {
                // Only after a finished SCRAM exchange: a server that lets
                // the role in without one (trust) has not authenticated it,
                // nor proved it knows the verifier.
                if !scram_done {
                    return Err(UpstreamError::Protocol(
                        "the store let the role in without SCRAM-SHA-256 (trust?); refused".into(),
                    ));
                }
                authenticated = true;
            }
            Message::AuthenticationCleartextPassword
            | Message::AuthenticationMd5Password(_)
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationGssContinue(_) => {
                return Err(UpstreamError::Protocol(
                    "the store asked for an authentication method other than SCRAM-SHA-256; the proxy sends the \
                     password in no other form"
                        .into(),
                ));
            }
            Message::ErrorResponse(body) => return Err(refusal(&body)),
            Message::BackendKeyData(body) => {
                key = Some((body.process_id(), body.secret_key()));
                greeting.push(frame);
            }
            Message::ReadyForQuery(_) => {
                if !authenticated {
                    return Err(UpstreamError::Protocol("ready before authentication".into()));
                }
                greeting.push(frame);
                break;
            }
            _ if authenticated => greeting.push(frame),
            _ => return Err(UpstreamError::Protocol("unexpected message during login".into())),
        }
    }
    if greeting.iter().any(super::tracker::backslash_literals) {
        return Err(UpstreamError::Protocol(
            "the store's session starts with standard_conforming_strings off: the proxy could not tell string \
             literals from the rest of a statement in its records, so it refuses"
                .into(),
        ));
    }
    let (io, leftover) = reader.into_parts();
    Ok(Upstream { io, leftover, greeting, key })
}

fn parse(frame: &Frame) -> Result<Message, UpstreamError> {
    let mut buf = BytesMut::from(&frame.raw[..]);
    match Message::parse(&mut buf) {
        Ok(Some(message)) => Ok(message),
        _ => Err(UpstreamError::Protocol("unreadable server message".into())),
    }
}

fn refusal(body: &postgres_protocol::message::backend::ErrorResponseBody) -> UpstreamError {
    let mut code = String::from("XX000");
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    UpstreamError::Refused { code, message }
}

/// Sends a CancelRequest for `key` to the store, over TLS when the store's
/// connections use it.
pub async fn cancel(credential: &Credential, key: (i32, i32)) -> Result<(), UpstreamError> {
    let mut io = tokio::time::timeout(CONNECT_TIMEOUT, open(credential))
        .await
        .map_err(|_| UpstreamError::Unreachable("connecting to the store timed out".into()))??;
    let mut buf = BytesMut::new();
    frontend::cancel_request(key.0, key.1, &mut buf);
    io.write_all(&buf).await.map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    io.flush().await.map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    // The server answers by closing.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(2), io.read(&mut sink)).await;
    Ok(())
}
