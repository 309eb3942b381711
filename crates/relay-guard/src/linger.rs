//! Lingering close for client connections, as nginx does it: when the edge closes a connection
//! whose client may still be sending (an answer given before the request was read: 413, 431,
//! 408), it sends its FIN, then reads and discards what follows for a bounded time and size
//! before closing. Closing with unread data makes the kernel send a reset, and a reset makes
//! the client's kernel throw away the answer it had not read yet: the client would see a reset
//! instead of the 413 that tells it why.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::conn_limit::ConnectionPermit;

/// How long a closing connection is read and discarded at most: long enough for a client on a
/// slow link to finish writing a request it sent before reading (4 MiB at 10 Mbit/s takes
/// about 3 s), short enough that lingering connections do not pile up.
pub const DEFAULT_LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes discarded at most while lingering: four times the default body limit. A client still
/// sending after that is not waiting for an answer.
pub const LINGER_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// A client connection that lingers when dropped before its client finished sending. It holds
/// the connection's permit, so a lingering connection still counts against the caps.
#[derive(Debug)]
pub struct LingeringStream {
    inner: Option<TcpStream>,
    read_eof: bool,
    linger: Duration,
    permit: Option<ConnectionPermit>,
}

impl LingeringStream {
    /// Wraps an accepted connection.
    pub fn new(stream: TcpStream, linger: Duration, permit: ConnectionPermit) -> Self {
        Self { inner: Some(stream), read_eof: false, linger, permit: Some(permit) }
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.inner.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

/// Sends FIN, then discards what the client still sends until it closes, `limit` passes or
/// [`LINGER_MAX_BYTES`] have been read.
async fn linger(mut stream: TcpStream, limit: Duration, permit: Option<ConnectionPermit>) {
    let _ = tokio::time::timeout(limit, async {
        stream.shutdown().await?;
        let mut discard = [0u8; 16 * 1024];
        let mut total: u64 = 0;
        while total < LINGER_MAX_BYTES {
            match stream.read(&mut discard).await? {
                0 => break,
                n => total += n as u64,
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
    drop(permit);
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.inner.take() else { return };
        if self.read_eof || self.linger.is_zero() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(stream, self.linger, self.permit.take()));
        }
    }
}

impl AsyncRead for LingeringStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(self.stream()?).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.read_eof = true;
        }
        polled
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()?).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_shutdown(cx)
    }
}
