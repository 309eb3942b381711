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
