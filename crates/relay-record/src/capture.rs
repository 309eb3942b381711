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

#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    len: u64,
    limit: usize,
    /// The body's whole length, when its head said it (`content-length`).
    expected: Option<u64>,
    /// Called once with what was kept when the body's end passes.
    on_end: Option<Box<dyn FnOnce(Body) + Send>>,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("kept", &self.bytes.len())
            .field("len", &self.len)
            .field("limit", &self.limit)
            .field("expected", &self.expected)
            .field("on_end", &self.on_end.is_some())
            .finish()
    }
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

    /// Has `f` called with the body as kept once its end has passed (not at all if the body
    /// fails or is dropped before its end), so a reader can act on a request before its answer.
    /// `expected` is the body's length when its head said it: a reader (hyper's, for one) stops
    /// polling a body once it has that many bytes, so the end may never be polled for.
    pub fn on_end(&self, expected: Option<u64>, f: impl FnOnce(Body) + Send + 'static) {
        if let Ok(mut kept) = self.0.lock() {
            kept.expected = expected;
            kept.on_end = Some(Box::new(f));
        }
    }

    /// Whether the whole expected length has passed.
    fn complete(&self) -> bool {
        self.0.lock().is_ok_and(|kept| kept.expected.is_some_and(|expected| kept.len >= expected))
    }

    /// Runs the end callback, if one is set and has not run.
    fn ended(&self) {
        let fire = self.0.lock().ok().and_then(|mut kept| {
            let f = kept.on_end.take()?;
            Some((f, Body::new(&kept.bytes, kept.len)))
        });
        // Called outside the lock: the callback may look at this capture again.
        if let Some((f, body)) = fire {
            f(body);
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
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.capture.record(data);
                }
                if self.inner.is_end_stream() || self.capture.complete() {
                    self.capture.ended();
                }
            }
            Poll::Ready(None) => self.capture.ended(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
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

    #[tokio::test]
    async fn the_end_callback_runs_once_with_the_kept_body_when_the_end_passes() {
        let capture = Capture::new(64);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        capture.on_end(None, move |body| {
            let _ = tx.send(body);
        });
        let chunks =
            ["ab", "cd"].map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
        let body = capture.tap(http_body_util::StreamBody::new(futures_util::stream::iter(chunks)));
        let mut body = std::pin::pin!(body);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"ab"[..]));
        assert!(rx.try_recv().is_err(), "the end has not passed yet");
        let _ = body.collect().await.unwrap();
        let kept = rx.try_recv().unwrap();
        assert_eq!((kept.text.as_deref(), kept.len), (Some("abcd"), 4));
        assert!(rx.try_recv().is_err(), "the callback runs once");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_never_runs_the_end_callback() {
        let capture = Capture::new(64);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Body>();
        capture.on_end(None, move |body| {
            let _ = tx.send(body);
        });
        let chunks =
            ["ab", "cd"].map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
        let mut body = Box::pin(capture.tap(http_body_util::StreamBody::new(futures_util::stream::iter(chunks))));
        let _ = body.frame().await;
        drop(body);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_body_of_a_known_length_ends_with_its_last_byte_though_its_end_is_never_polled() {
        let capture = Capture::new(64);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        capture.on_end(Some(4), move |body| {
            let _ = tx.send(body);
        });
        let chunks =
            ["ab", "cd"].map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
        let mut body = Box::pin(capture.tap(http_body_util::StreamBody::new(futures_util::stream::iter(chunks))));
        let _ = body.frame().await;
        assert!(rx.try_recv().is_err(), "two bytes of four");
        let _ = body.frame().await;
        assert_eq!(rx.try_recv().unwrap().len, 4, "the fourth byte ends it");
    }
}
