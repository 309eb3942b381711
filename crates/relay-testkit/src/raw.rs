//! Raw HTTP/1.1 over a TCP connection, for what no well-behaved client sends: paths that a
//! client library would refuse or normalise, heads of an exact size, a whole oversized request
//! written before the answer is read, a body that never comes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most response bytes kept: the edge's own answers are a few hundred bytes.
const MAX_RESPONSE: usize = 1024 * 1024;

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The head (status line and headers), lower-cased.
    pub head: String,
    /// The body bytes read.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of header `name` (lower-case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    }
}

/// How an exchange ended before a whole response arrived.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The connection failed (reset, refused).
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// No complete response within the deadline.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The connection closed before a complete response.
    #[error("connection closed after {0} bytes, before a complete response")]
    Closed(usize),
}

/// Writes `request` on a new connection to `addr`, then reads one response (`Content-Length`
/// delimited, or to EOF) within `deadline`.
pub async fn exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> Result<RawResponse, RawError> {
    let mut stream = TcpStream::connect(addr).await?;
    tokio::time::timeout(deadline, async {
        stream.write_all(request).await?;
        read_response(&mut stream).await
    })
    .await
    .map_err(|_| RawError::Timeout(deadline))?
}

/// Reads one response from `stream`.
pub async fn read_response(stream: &mut TcpStream) -> Result<RawResponse, RawError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = parse(&buf) {
            return Ok(response);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > MAX_RESPONSE {
            return parse_to_eof(&buf).ok_or(RawError::Closed(buf.len()));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

fn split_head(buf: &[u8]) -> Option<(u16, String, &[u8])> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(buf.get(..end)?).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head, buf.get(end + 4..)?))
}

/// A complete `Content-Length` response, or `None` while more is needed.
fn parse(buf: &[u8]) -> Option<RawResponse> {
    let (status, head, body) = split_head(buf)?;
    let response = RawResponse { status, head, body: Vec::new() };
    let len: usize = response.header("content-length")?.parse().ok()?;
    let body = body.get(..len)?.to_vec();
    Some(RawResponse { body, ..response })
}

fn parse_to_eof(buf: &[u8]) -> Option<RawResponse> {
    let (status, head, body) = split_head(buf)?;
    Some(RawResponse { status, head, body: body.to_vec() })
}

/// A `POST` of `body` to `target` with `extra` header lines (each without CRLF).
pub fn post(target: &str, extra: &[&str], body: &[u8]) -> Vec<u8> {
    let mut request = format!("POST {target} HTTP/1.1\r\nhost: relay.test\r\ncontent-type: application/json\r\n");
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Opens a media WebSocket on `path` by hand and returns the connection after the `101`, for
/// tests that write frames no WebSocket library would.
pub async fn ws_upgrade(addr: SocketAddr, path: &str, correlation_id: &str) -> Result<TcpStream, RawError> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: relay.test\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         x-ms-call-correlation-id: {correlation_id}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Read the head only, byte by byte, so no frame after it is swallowed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 || head.len() > 16 * 1024 {
            return Err(RawError::Closed(head.len()));
        }
        head.extend_from_slice(&byte);
    }
    match split_head(&head) {
        Some((101, _, _)) => Ok(stream),
        _ => Err(RawError::Closed(head.len())),
    }
}

/// One WebSocket frame as a client writes it: `first` is the FIN/RSV/opcode byte (`0x81` is a
/// final text frame), the payload masked with a fixed key when `masked`.
pub fn ws_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut frame = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => frame.push(mask_bit | n as u8),
        n @ 126..=65535 => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    if masked {
        frame.extend_from_slice(&key);
    }
    frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| if masked { b ^ k } else { *b }));
    frame
}

/// Reads server frames until a close frame and returns its code (`None` for a close without
/// one), skipping data and control frames; an error if the connection ends first.
pub async fn ws_read_close(stream: &mut TcpStream) -> Result<Option<u16>, RawError> {
    // Bounded: each pass reads one frame of at most 64 KiB, and the caller's deadline applies.
    for _ in 0..10_000 {
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).await?;
        let opcode = header[0] & 0x0f;
        let len = match header[1] & 0x7f {
            126 => u64::from(stream.read_u16().await?),
            127 => stream.read_u64().await?,
            n => u64::from(n),
        };
        if len > 64 * 1024 {
            return Err(RawError::Closed(0));
        }
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await?;
        if opcode == 0x8 {
            return Ok(payload.get(..2).and_then(|code| <[u8; 2]>::try_from(code).ok()).map(u16::from_be_bytes));
        }
    }
    Err(RawError::Closed(0))
}

/// Writes up to `bytes` of 125-byte pings on a WebSocket `conn` opened with [`ws_upgrade`],
/// reading nothing, as a caller that never reads would; returns the bytes written. Stops early
/// when the connection fails or a write does not finish within `stall` (the far end stopped
/// reading); bounded by `bytes` and by `stall` per write.
pub async fn flood_pings(conn: &mut TcpStream, bytes: usize, stall: Duration) -> usize {
    let ping = ws_frame(0x89, &[b'p'; 125], true);
    let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1024).collect();
    let mut written = 0;
    while written < bytes {
        match tokio::time::timeout(stall, conn.write_all(&burst)).await {
            Ok(Ok(())) => written += burst.len(),
            _ => break,
        }
    }
    written
}
