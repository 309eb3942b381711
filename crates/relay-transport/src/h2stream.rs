//! HTTP/2 streams as the seam's stream halves: `AsyncWrite` over an `h2::SendStream` that waits
//! for flow-control credit, `AsyncRead` over an `h2::RecvStream` that returns credit as bytes are
//! consumed, and the QUIC-like end-of-stream rules the tunnel code relies on (a clean finish is
//! EOF, a reset is an error, finishing never discards what was written).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::seam::{RecvHalf, SendHalf};

/// Largest piece one `poll_write` hands to HTTP/2 at once: one stream's whole receive window,
/// so a large write waits for credit once rather than per 16 KiB frame.
const MAX_WRITE_CHUNK: usize = crate::settings::STREAM_RECEIVE_WINDOW as usize;

/// Turns an HTTP/2 error into the I/O error a stream half reports. A reset by the peer carries
/// its code, so logs say why.
pub(crate) fn io_error(err: h2::Error) -> io::Error {
    match err.reason() {
        Some(reason) if err.is_reset() && err.is_remote() => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by peer with code {:#x}", u32::from(reason)),
        ),
        Some(reason) if err.is_reset() => {
            io::Error::new(io::ErrorKind::ConnectionReset, format!("stream reset with code {:#x}", u32::from(reason)))
        }
        _ if err.is_io() || err.is_go_away() => {
            io::Error::new(io::ErrorKind::ConnectionAborted, format!("tunnel connection lost: {err}"))
        }
        _ => io::Error::other(err),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    Open,
    Finished,
    Reset,
}

/// The sending half of an HTTP/2 stream.
pub(crate) struct H2Send {
    stream: SendStream<Bytes>,
    state: SendState,
}

impl std::fmt::Debug for H2Send {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Send").field("state", &self.state).finish()
    }
}

impl H2Send {
    pub(crate) fn new(stream: SendStream<Bytes>) -> Self {
        Self { stream, state: SendState::Open }
    }

    /// The error a write reports once the stream cannot take more: the peer's reset code if
    /// there was one.
    fn closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.stream.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream stopped by peer with code {:#x}", u32::from(reason)),
            ),
            Poll::Ready(Err(e)) => io_error(e),
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
        }
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.state != SendState::Open {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream already finished or reset")));
        }
        let want = buf.len().min(MAX_WRITE_CHUNK);
        self.stream.reserve_capacity(want);
        // `poll_capacity` answers 0 only right after credit it announced was taken back; the
        // next poll then waits for real credit, so this ends within two rounds.
        for _ in 0..2 {
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(credit)) => {
                    let n = credit.min(want);
                    let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    return match self.stream.send_data(chunk, false) {
                        Ok(()) => Poll::Ready(Ok(n)),
                        Err(e) => Poll::Ready(Err(io_error(e))),
                    };
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(self.closed_error(cx))),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to HTTP/2 is written by the connection task as credit allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.state {
            SendState::Finished => Poll::Ready(Ok(())),
            SendState::Reset => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream was reset"))),
            SendState::Open => match self.stream.send_data(Bytes::new(), true) {
                Ok(()) => {
                    self.state = SendState::Finished;
                    Poll::Ready(Ok(()))
                }
                Err(_) => Poll::Ready(Err(self.closed_error(cx))),
            },
        }
    }
}

impl SendHalf for H2Send {
    fn reset(&mut self, code: u32) {
        if self.state == SendState::Open {
            self.stream.send_reset(Reason::from(code));
            self.state = SendState::Reset;
        }
    }
}

impl Drop for H2Send {
    fn drop(&mut self) {
        // As with QUIC, a half dropped without finishing or resetting finishes; the tunnel code
        // resets explicitly on every failure, so this is only ever a clean end.
        if self.state == SendState::Open {
            let _ = self.stream.send_data(Bytes::new(), true);
        }
    }
}

/// Where a receiving half gets its bytes from.
enum Source {
    /// A stream this side opened: the peer's bytes come as the response body, once the response
    /// head arrives.
    Response(h2::client::ResponseFuture),
    /// The body being received.
    Body(RecvStream),
    /// Stopped by this side; nothing more is read.
    Stopped,
}

/// The receiving half of an HTTP/2 stream.
pub(crate) struct H2Recv {
    source: Source,
    /// The rest of the last DATA frame, not yet read.
    pending: Bytes,
    /// How long a stopped or dropped half keeps draining the peer's bytes (see [`linger`]).
    linger: Duration,
}

impl std::fmt::Debug for H2Recv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Recv").field("pending", &self.pending.len()).finish()
    }
}

impl H2Recv {
    pub(crate) fn body(body: RecvStream, linger: Duration) -> Self {
        Self { source: Source::Body(body), pending: Bytes::new(), linger }
    }

    pub(crate) fn response(response: h2::client::ResponseFuture, linger: Duration) -> Self {
        Self { source: Source::Response(response), pending: Bytes::new(), linger }
    }

    /// Whether the peer's side has ended, so nothing remains to drain.
    fn at_end(&self) -> bool {
        match &self.source {
            Source::Body(body) => body.is_end_stream(),
            Source::Response(_) => false,
            Source::Stopped => true,
        }
    }
}

impl AsyncRead for H2Recv {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(this.pending.get(..n).unwrap_or_default());
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match &mut this.source {
                Source::Response(response) => match ready!(Pin::new(response).poll(cx)) {
                    Ok(response) if response.status() == http::StatusCode::OK => {
                        this.source = Source::Body(response.into_body());
                    }
                    Ok(response) => {
                        this.source = Source::Stopped;
                        return Poll::Ready(Err(io::Error::other(format!(
                            "peer answered the stream with status {}",
                            response.status()
                        ))));
                    }
                    Err(e) => return Poll::Ready(Err(io_error(e))),
                },
                Source::Body(body) => match ready!(body.poll_data(cx)) {
                    // A clean end of the peer's side.
                    None => return Poll::Ready(Ok(())),
                    Some(Ok(data)) => {
                        // The bytes are ours now (one frame at most, 16 KiB): hand the credit
                        // back so the peer can send the next window while these are read.
                        let _ = body.flow_control().release_capacity(data.len());
                        this.pending = data;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                },
                Source::Stopped => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream stopped by this side")));
                }
            }
        }
    }
}

impl RecvHalf for H2Recv {
    fn stop(&mut self, _code: u32) {
        // HTTP/2 has no STOP_SENDING: the peer learns when this stream ends (see `linger`).
        let source = std::mem::replace(&mut self.source, Source::Stopped);
        self.pending = Bytes::new();
        linger(source, self.linger);
    }
}

impl Drop for H2Recv {
    fn drop(&mut self) {
        if !self.at_end() {
            let source = std::mem::replace(&mut self.source, Source::Stopped);
            linger(source, self.linger);
        }
    }
}

/// Keeps a receiving half that this side no longer reads alive, discarding what arrives, until
/// the peer ends its side or `linger` passes.
///
/// h2 resets a stream with CANCEL as soon as both its halves are gone while the peer is still
/// sending, and that reset discards whatever this side wrote but the connection task has not yet
/// put on the wire: a WebSocket close frame written just before the exchange ended would be lost.
/// QUIC keeps delivering a finished stream's data whatever happens to the receiving half; holding
/// the half here gives the same guarantee. When the peer has not finished after `linger`, the
/// stream is reset, which also tells a peer that kept sending to stop.
fn linger(source: Source, linger: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let drain = async move {
            let mut body = match source {
                Source::Response(response) => match response.await {
                    Ok(response) => response.into_body(),
                    Err(_) => return,
                },
                Source::Body(body) => body,
                Source::Stopped => return,
            };
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
            }
        };
        let _ = tokio::time::timeout(linger, drain).await;
    });
}
