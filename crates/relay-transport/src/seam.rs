//! The transport seam: a connection that opens and accepts independent bidirectional streams.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A boxed future, as the seam's methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The sending half of a stream. Shutting it down (`AsyncWriteExt::shutdown`) finishes the
/// stream cleanly; [`SendHalf::reset`] abandons it.
pub trait SendHalf: AsyncWrite + Send + Unpin {
    /// Abandons the stream: the peer's reads fail with `code`. Buffered data may be dropped.
    fn reset(&mut self, code: u32);
}

/// The receiving half of a stream.
pub trait RecvHalf: AsyncRead + Send + Unpin {
    /// Tells the peer to stop sending, with `code`.
    fn stop(&mut self, code: u32);
}

/// A bidirectional stream: one exchange, or the control stream.
pub struct BiStream {
    /// Where we write.
    pub send: Box<dyn SendHalf>,
    /// Where we read.
    pub recv: Box<dyn RecvHalf>,
}

impl std::fmt::Debug for BiStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BiStream")
    }
}

/// The connection is gone; the text says why (timeout, closed by peer with a reason, ...).
#[derive(Debug, Clone, thiserror::Error)]
#[error("tunnel connection lost: {0}")]
pub struct ConnectionLost(pub String);

/// An established, authenticated tunnel connection.
pub trait TunnelConnection: Send + Sync + 'static {
    /// Opens a new bidirectional stream.
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>>;
    /// Waits for the peer to open a bidirectional stream.
    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>>;
    /// Resolves when the connection ends, with the reason.
    fn closed(&self) -> BoxFuture<'_, ConnectionLost>;
    /// Closes the connection at once with an application code and a short reason.
    fn close(&self, code: u32, reason: &str);
    /// Closes like [`TunnelConnection::close`], then waits (bounded) until the close has been
    /// sent, so a process that exits next does not leave the peer waiting for a timeout.
    fn close_and_flush(&self, code: u32, reason: &str) -> BoxFuture<'_, ()>;
    /// The peer's address.
    fn remote_addr(&self) -> SocketAddr;
    /// Which transport carries this connection (`"quic"` or `"tcp"`), for logs and metrics.
    fn transport(&self) -> &'static str;
}
