//! Keeping a copy of a body while it streams to its reader, up to a bound: the relay never holds
//! a whole body for itself, so what an inspection or a recording keeps is taken from the chunks as
//! they pass, and the rest is only counted.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::format::Body;

/// What passed of one body: its first bytes up to the bound, and its whole length.
#[derive(Debug, Clone)]
pub struct Capture(Arc<Mutex<Kept>>);

#[derive(Debug, Default)]
struct Kept {
    bytes: Vec<u8>,
    len: u64,
    limit: usize,
}

impl Capture {
    /// A capture that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Mutex::new(Kept { limit, ..Kept::default() })))
    }

    /// Counts `chunk` and keeps what fits.
    pub fn record(&self, chunk: &[u8]) {
        if let Ok(mut kept) = self.0.lock() {
            kept.len = kept.len.saturating_add(chunk.len() as u64);
            let room = kept.limit.saturating_sub(kept.bytes.len());
            let take = room.min(chunk.len());
            kept.bytes.extend_from_slice(chunk.get(..take).unwrap_or_default());
        }
    }

    /// The body as far as it passed until now.
    pub fn body(&self) -> Body {
        match self.0.lock() {
            Ok(kept) => Body::new(&kept.bytes, kept.len),
            Err(_) => Body::default(),
        }
    }

    /// Wraps `body` so that what it yields is recorded here.
    pub fn tap<B>(&self, body: B) -> Tap<B> {
        Tap { inner: body, capture: self.clone() }
    }
}

/// A body that records what it yields into a [`Capture`] and otherwise is `inner`.
#[derive(Debug)]
pub struct Tap<B> {
    inner: B,
    capture: Capture,
}

impl<B> HttpBody for Tap<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.capture.record(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_tapped_body_passes_through_whole_and_keeps_only_its_first_bytes() {
        let capture = Capture::new(4);
        let body = capture.tap(http_body_util::Full::new(Bytes::from_static(b"hello world")));
        let passed = body.collect().await.unwrap().to_bytes();
        assert_eq!(&passed[..], b"hello world");
        let kept = capture.body();
        assert_eq!((kept.text.as_deref(), kept.len, kept.truncated), (Some("hell"), 11, true));
    }
}
