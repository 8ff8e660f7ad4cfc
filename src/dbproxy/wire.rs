//! The PostgreSQL wire format at the proxy's edges: bounded, cancel-safe
//! framing of both directions, the client's first packet, and the few
//! backend messages the proxy writes itself. Messages the server sends are
//! parsed with `postgres-protocol`; messages the proxy sends upstream are
//! written with it (see `upstream.rs`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest startup packet accepted (PostgreSQL's own limit is 10000).
pub const MAX_STARTUP_BYTES: usize = 10_000;
/// Largest message accepted in either direction after startup. A statement
/// or a row larger than this ends the connection with a clear error.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3: i32 = 3;

/// Why the bytes a peer sent cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed mid-message.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A length outside the bounds.
    #[error("a message of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// Bytes that are not the protocol.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

impl WireError {
    /// The class named in records and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            WireError::Io(_) => "connection_lost",
            WireError::TooLarge(_) => "oversized_message",
            WireError::Malformed(_) => "malformed_message",
        }
    }
}

/// The first packet of a client connection.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstPacket {
    /// SSLRequest.
    Ssl,
    /// GSSENCRequest.
    GssEnc,
    /// CancelRequest with the key the client was given.
    Cancel {
        /// Process id of the key.
        pid: i32,
        /// Secret of the key.
        secret: i32,
    },
    /// StartupMessage.
    Startup {
        /// Minor protocol version asked for (major is 3).
        minor: u16,
        /// Parameters, in order.
        params: Vec<(String, String)>,
    },
}

/// Reads the client's first (or, after an SSL/GSS refusal, second) packet.
pub async fn read_first_packet<R: AsyncRead + Unpin>(reader: &mut R) -> Result<FirstPacket, WireError> {
    let len = reader.read_i32().await?;
    if !(8..=MAX_STARTUP_BYTES as i32).contains(&len) {
        return Err(if len > MAX_STARTUP_BYTES as i32 {
            WireError::TooLarge(len as u64)
        } else {
            WireError::Malformed("startup length")
        });
    }
    let mut body = vec![0u8; len as usize - 4];
    reader.read_exact(&mut body).await?;
    parse_first_packet(&body)
}

/// Parses a first packet's body (after its length).
pub fn parse_first_packet(body: &[u8]) -> Result<FirstPacket, WireError> {
    let mut buf = body;
    // (read_first_packet never hands over fewer; anyone else may.)
    if buf.len() < 4 {
        return Err(WireError::Malformed("startup length"));
    }
    let code = buf.get_i32();
    match code {
        SSL_REQUEST if buf.is_empty() => Ok(FirstPacket::Ssl),
        GSSENC_REQUEST if buf.is_empty() => Ok(FirstPacket::GssEnc),
        CANCEL_REQUEST if buf.len() == 8 => Ok(FirstPacket::Cancel { pid: buf.get_i32(), secret: buf.get_i32() }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(WireError::Malformed("request length")),
        version if version >> 16 == PROTOCOL_3 => {
            let mut params = Vec::new();
            loop {
                let name = cstring(&mut buf)?;
                if name.is_empty() {
                    break;
                }
                let value = cstring(&mut buf)?;
                if params.iter().any(|(n, _)| *n == name) {
                    return Err(WireError::Malformed("repeated startup parameter"));
                }
                params.push((name, value));
            }
            if !buf.is_empty() {
                return Err(WireError::Malformed("bytes after the startup parameters"));
            }
            Ok(FirstPacket::Startup { minor: (version & 0xffff) as u16, params })
        }
        _ => Err(WireError::Malformed("unsupported protocol version")),
    }
}

/// Reads a NUL-terminated UTF-8 string.
pub fn cstring(buf: &mut &[u8]) -> Result<String, WireError> {
    let end = buf.iter().position(|b| *b == 0).ok_or(WireError::Malformed("unterminated string"))?;
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| WireError::Malformed("string is not UTF-8"))?.to_string();
    *buf = &buf[end + 1..];
    Ok(text)
}

/// One tagged message, as read.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The tag byte.
    pub tag: u8,
    /// The whole message: tag, length and body, as it travels.
    pub raw: Bytes,
}

impl Frame {
    /// The body, after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Reads tagged messages from one side. Cancel-safe: bytes read but not yet
/// a whole message stay in its buffer.
pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader over `reader`.
    pub fn new(reader: R) -> Self {
        FrameReader::with_buffer(reader, BytesMut::with_capacity(8192))
    }

    /// A reader that first yields the bytes already in `buf`.
    pub fn with_buffer(reader: R, buf: BytesMut) -> Self {
        FrameReader { reader, buf }
    }

    /// The underlying stream (to write to it).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.reader
    }

    /// The stream and the bytes read but not yet returned.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.reader, self.buf)
    }

    /// The next message; `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.split_frame()? {
                return Ok(Some(frame));
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    /// The next message if it is already read in full (no waiting).
    pub fn buffered(&mut self) -> Result<Option<Frame>, WireError> {
        self.split_frame()
    }

    fn split_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(WireError::Malformed("message length"));
        }
        let total = len as usize + 1;
        if total > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(len as u64));
        }
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let raw = self.buf.split_to(total).freeze();
        Ok(Some(Frame { tag: raw[0], raw }))
    }
}

/// Backend messages the proxy writes itself.
pub mod backend {
    use super::*;

    fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u8(tag);
        buf.put_i32(0);
        body(&mut buf);
        let len = (buf.len() - 1) as i32;
        buf[1..5].copy_from_slice(&len.to_be_bytes());
        buf.freeze()
    }

    /// AuthenticationCleartextPassword: the per-call token is the password
    /// (loopback inside the pod only).
    pub fn cleartext_password_request() -> Bytes {
        message(b'R', |b| b.put_i32(3))
    }

    /// AuthenticationOk.
    pub fn authentication_ok() -> Bytes {
        message(b'R', |b| b.put_i32(0))
    }

    /// BackendKeyData with the proxy's own key.
    pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
        message(b'K', |b| {
            b.put_i32(pid);
            b.put_i32(secret);
        })
    }

    /// NegotiateProtocolVersion: only 3.0 is spoken; `_pq_` options are
    /// not understood.
    pub fn negotiate_protocol_version(options: &[String]) -> Bytes {
        message(b'v', |b| {
            b.put_i32(0);
            b.put_i32(options.len() as i32);
            for option in options {
                b.put_slice(option.as_bytes());
                b.put_u8(0);
            }
        })
    }

    /// ErrorResponse (`FATAL` or `ERROR`) with a SQLSTATE and a message the
    /// proxy wrote (never anything the client or server sent).
    pub fn error(severity: &str, code: &str, text: &str) -> Bytes {
        message(b'E', |b| {
            for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', text)] {
                b.put_u8(field);
                b.put_slice(value.as_bytes());
                b.put_u8(0);
            }
            b.put_u8(0);
        })
    }

    /// ReadyForQuery with a transaction status byte.
    pub fn ready_for_query(status: u8) -> Bytes {
        message(b'Z', |b| b.put_u8(status))
    }
}

/// Writes all of `bytes` and flushes.
pub async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((8 + rest.len()) as i32).to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[tokio::test]
    async fn first_packets() {
        let ssl = packet(SSL_REQUEST, &[]);
        assert_eq!(read_first_packet(&mut ssl.as_slice()).await.unwrap(), FirstPacket::Ssl);
        let cancel = packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(read_first_packet(&mut cancel.as_slice()).await.unwrap(), FirstPacket::Cancel { pid: 7, secret: 9 });
        let startup = packet(196_608, b"user\0mcp\0database\0ehr\0\0");
        match read_first_packet(&mut startup.as_slice()).await.unwrap() {
            FirstPacket::Startup { minor, params } => {
                assert_eq!(minor, 0);
                assert_eq!(params, vec![("user".into(), "mcp".into()), ("database".into(), "ehr".into())]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn hostile_first_packets_are_refused() {
        let huge = (1i32 << 30).to_be_bytes();
        assert!(matches!(read_first_packet(&mut huge.as_slice()).await, Err(WireError::TooLarge(_))));
        let tiny = 3i32.to_be_bytes();
        assert!(matches!(read_first_packet(&mut tiny.as_slice()).await, Err(WireError::Malformed(_))));
        for bad in [
            packet(196_608, b"user\0mcp\0database"),
            packet(196_608, b"user\0mcp\0user\0x\0\0"),
            packet(196_608, b"user\0\xff\xfe\0\0"),
            packet(131_072, b"\0"),
            packet(CANCEL_REQUEST, &[0, 0, 0, 7]),
            packet(SSL_REQUEST, &[1]),
        ] {
            assert!(matches!(read_first_packet(&mut bad.as_slice()).await, Err(WireError::Malformed(_))), "{bad:?}");
        }
        // A TLS ClientHello sent without asking (direct TLS).
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        assert!(read_first_packet(&mut hello.as_slice()).await.is_err());
    }

    #[tokio::test]
    async fn frames_are_bounded_and_split() {
        let mut input = Vec::new();
        input.extend_from_slice(b"Q\0\0\0\x0eSELECT 1;\0");
        input.extend_from_slice(b"X\0\0\0\x04");
        let mut reader = FrameReader::new(input.as_slice());
        let q = reader.next().await.unwrap().unwrap();
        assert_eq!(q.tag, b'Q');
        assert_eq!(q.body(), b"SELECT 1;\0");
        assert_eq!(reader.next().await.unwrap().unwrap().tag, b'X');
        assert!(reader.next().await.unwrap().is_none());

        let huge = [b'Q', 0x40, 0, 0, 0];
        assert!(matches!(FrameReader::new(&huge[..]).next().await, Err(WireError::TooLarge(_))));
        let negative = [b'Q', 0, 0, 0, 2];
        assert!(matches!(FrameReader::new(&negative[..]).next().await, Err(WireError::Malformed(_))));
        let torn = b"Q\0\0\0\x0dSEL";
        assert!(matches!(FrameReader::new(&torn[..]).next().await, Err(WireError::Io(_))));
    }
}
