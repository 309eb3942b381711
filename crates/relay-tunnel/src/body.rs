//! HTTP bodies across a tunnel stream: raw bytes after the head frame, ended by finishing the
//! stream. Neither direction holds a whole body: each chunk is written as it arrives, and the
//! stream's flow control pushes back on a fast sender.

use std::io;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame};
use relay_proto::code;
use relay_transport::{RecvHalf, SendHalf};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

/// The body type both binaries hand to hyper.
pub type RelayBody = UnsyncBoxBody<Bytes, io::Error>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> RelayBody {
    http_body_util::Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> RelayBody {
    full(Bytes::new())
}

/// Read size when turning a stream into a body; matches quinn's typical chunk so one read is
/// usually one chunk.
const BODY_READ_CHUNK: usize = 64 * 1024;

/// A body that yields the stream's bytes until the peer finishes it. A reset by the peer
/// surfaces as a body error, so hyper aborts the message instead of passing it off as complete.
pub fn body_from_stream(recv: Box<dyn RecvHalf>) -> RelayBody {
    let stream = ReaderStream::with_capacity(recv, BODY_READ_CHUNK).map_ok(Frame::data);
    StreamBody::new(stream).boxed_unsync()
}

/// Why a body could not be copied onto a stream.
#[derive(Debug, thiserror::Error)]
pub enum BodyCopyError {
    /// The body is larger than allowed; the stream was reset.
    #[error("body exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Reading the body failed (the client went away mid-body, or stalled); the stream was
    /// reset. The source's own error, for the caller to tell the cases apart.
    #[error("reading the body failed: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// Writing to the stream failed (the peer reset it or the connection was lost).
    #[error("writing to the tunnel failed: {0}")]
    Sink(io::Error),
}

/// Copies `body` onto `send` and finishes the stream. On any failure the stream is reset, so the
/// peer never mistakes a partial body for a whole one. Returns the bytes copied.
pub async fn copy_body_to_stream<B>(
    body: B,
    send: &mut Box<dyn SendHalf>,
    limit: Option<u64>,
) -> Result<u64, BodyCopyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut total: u64 = 0;
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                send.reset(code::ABORTED);
                return Err(BodyCopyError::Source(e.into()));
            }
        };
        // Trailers are hop-by-hop for our purposes (ACS sends none); only data crosses.
        let Ok(data) = frame.into_data() else { continue };
        total += data.len() as u64;
        if let Some(limit) = limit.filter(|limit| total > *limit) {
            send.reset(code::ABORTED);
            return Err(BodyCopyError::TooLarge { limit });
        }
        if let Err(e) = send.write_all(&data).await {
            send.reset(code::ABORTED);
            return Err(BodyCopyError::Sink(e));
        }
    }
    send.shutdown().await.map_err(BodyCopyError::Sink)?;
    Ok(total)
}
