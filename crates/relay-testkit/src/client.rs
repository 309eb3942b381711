//! HTTP helpers for tests: one request per connection, bodies generated and hashed on the fly.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;

/// A request body type for tests.
pub type TestBody = UnsyncBoxBody<Bytes, Infallible>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// FNV-1a, to compare large bodies without holding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Folds `bytes` in.
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The byte at `offset` of the deterministic test pattern.
fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 8)) as u8
}

/// A body of `len` pattern bytes generated in `chunk`-sized pieces, plus its length and hash.
pub fn pattern_body(len: u64, chunk: usize) -> (TestBody, Fnv) {
    let mut hash = Fnv::default();
    let mut offset = 0;
    while offset < len {
        let n = (chunk as u64).min(len - offset);
        let piece: Vec<u8> = (offset..offset + n).map(pattern_byte).collect();
        hash.update(&piece);
        offset += n;
    }
    (pattern_stream(len, chunk), hash)
}

/// A body of `len` pattern bytes generated in `chunk`-sized pieces as it is read: the same bytes
/// as [`pattern_body`], without computing their hash first.
pub fn pattern_stream(len: u64, chunk: usize) -> TestBody {
    let chunks = stream::unfold(0u64, move |offset| async move {
        if offset >= len {
            return None;
        }
        let n = (chunk as u64).min(len - offset);
        let piece: Vec<u8> = (offset..offset + n).map(pattern_byte).collect();
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(piece))), offset + n))
    });
    StreamBody::new(chunks).boxed_unsync()
}

/// Reads a body to the end without keeping it: returns its length and hash.
pub async fn hash_body(mut body: Incoming) -> Result<(u64, Fnv), hyper::Error> {
    let mut hash = Fnv::default();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            hash.update(&data);
        }
    }
    Ok((len, hash))
}

/// Sends one request on a fresh connection to `addr` and returns the response with its body
/// still streaming.
pub async fn send(addr: SocketAddr, req: Request<TestBody>) -> anyhow::Result<Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

/// Sends one request and collects the whole response body.
pub async fn send_collect(addr: SocketAddr, req: Request<TestBody>) -> anyhow::Result<Response<Bytes>> {
    let response = send(addr, req).await?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, bytes))
}

/// A `POST` with a JSON body.
pub fn post_json(addr: SocketAddr, path: &str, json: &str) -> Request<TestBody> {
    let mut req = Request::new(full(json.to_owned()));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = path.parse().unwrap_or_default();
    let headers = req.headers_mut();
    headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(&addr.to_string()).unwrap_or(http::HeaderValue::from_static("localhost")),
    );
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    req
}
