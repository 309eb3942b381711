//! HTTP bodies across a tunnel stream: raw bytes after the head frame, ended by finishing the
//! stream. Neither direction holds a whole body: each chunk is written as it arrives, and the
//! stream's flow control pushes back on a fast sender.

use std::io;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame};
use relay_proto::code;
use relay_transport::{RecvHalf, SendHalf};
use tokio::io::AsyncWriteExt;

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

/// First read size when turning a stream into a body: a webhook's whole body (ACS events are a
/// few KiB) in one read, without reserving a large buffer for every request (a 64 KiB buffer
/// per request was a measurable share of the edge's allocator time under webhook load).
const BODY_READ_FIRST: usize = 4 * 1024;

/// Largest read size: a read that fills its buffer doubles the next one up to this, so a large
/// body moves in quinn-sized chunks.
const BODY_READ_MAX: usize = 64 * 1024;

/// A body that yields the stream's bytes until the peer finishes it. A reset by the peer
/// surfaces as a body error, so hyper aborts the message instead of passing it off as complete.
pub fn body_from_stream(recv: Box<dyn RecvHalf>) -> RelayBody {
    StreamBody { recv, buf: BytesMut::new(), next_read: BODY_READ_FIRST, done: false }.boxed_unsync()
}

/// See [`body_from_stream`].
struct StreamBody {
    recv: Box<dyn RecvHalf>,
    buf: BytesMut,
    /// Bytes the next read reserves: [`BODY_READ_FIRST`], doubled after each read that filled
    /// its reservation, up to [`BODY_READ_MAX`].
    next_read: usize,
    done: bool,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        this.buf.reserve(this.next_read);
        let room = this.next_read;
        let mut limited = bytes::BufMut::limit(&mut this.buf, room);
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut this.recv), cx, &mut limited) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Ok(0)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Ok(n)) => {
                if n >= room {
                    this.next_read = (this.next_read * 2).min(BODY_READ_MAX);
                }
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
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
