//! A client's request body as the edge reads it: every read must make progress within the body
//! read timeout, so a client that sends a head and then trickles or withholds its body cannot hold
//! a connection (and a file descriptor, and an agent stream) for as long as it likes. The deadline
//! covers the whole body: the prefix read to find a call's key and the rest streamed to the agent.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// How long a request body may go without a byte before the edge gives up with 408. ACS sends
/// each event in one write; 10 s (as for the head) tolerates a slow link and stops a client
/// that holds a body back.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    /// No byte arrived for the body read timeout.
    #[error("no request body progress for {0:?}")]
    Stalled(Duration),
    /// The client's connection failed mid-body.
    #[error(transparent)]
    Client(#[from] hyper::Error),
}

/// A request body that fails with [`BodyReadError::Stalled`] when it makes no progress for
/// `timeout`.
#[derive(Debug)]
pub struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl TimedBody {
    /// Wraps `inner`; the first byte is due within `timeout` from now.
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + self.timeout;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyReadError::Stalled(self.timeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a failed body read was the client stalling (to answer 408 rather than 400).
pub fn stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(error.downcast_ref::<BodyReadError>(), Some(BodyReadError::Stalled(_)))
}
