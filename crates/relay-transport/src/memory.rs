//! An in-process connection pair that keeps the seam's contract, so the code above the seam (the
//! tunnel's stream roles) is tested without sockets, certificates or timers.
//!
//! Each stream direction is a bounded channel of chunks with a shared end state: finishing (or
//! dropping) the sending half is end-of-file after the data already sent, resetting it is an
//! error to the reader at once, and a reader that stops or goes away makes the writer's next
//! write fail. Closing either handle, or dropping the last handle to one side, ends the
//! connection for both with the reason, and every stream on it fails.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender, WaitForCancellationFutureOwned};

use crate::seam::{BiStream, BoxFuture, ConnectionLost, RecvHalf, SendHalf, TunnelConnection};

/// Chunks a stream direction holds before its writer waits: enough to keep a writer of head
/// frames and small bodies from ever waiting in tests, small enough that back-pressure is real.
const PIPE_CHUNKS: usize = 64;

/// Streams a side may have opened and the peer not yet accepted.
const PENDING_STREAMS: usize = 64;

/// Returns two connected handles: `(edge, agent)`. Either side opens and accepts streams.
pub fn pair() -> (Arc<dyn TunnelConnection>, Arc<dyn TunnelConnection>) {
    let shared = Arc::new(Shared { closed: CancellationToken::new(), reason: Mutex::new(None) });
    let (to_agent, agent_incoming) = mpsc::channel(PENDING_STREAMS);
    let (to_edge, edge_incoming) = mpsc::channel(PENDING_STREAMS);
    let edge_addr = SocketAddr::from(([127, 0, 0, 1], 1));
    let agent_addr = SocketAddr::from(([127, 0, 0, 2], 2));
    let edge = MemoryConnection {
        shared: shared.clone(),
        to_peer: to_agent,
        incoming: tokio::sync::Mutex::new(edge_incoming),
        peer_addr: agent_addr,
    };
    let agent = MemoryConnection {
        shared,
        to_peer: to_edge,
        incoming: tokio::sync::Mutex::new(agent_incoming),
        peer_addr: edge_addr,
    };
    (Arc::new(edge), Arc::new(agent))
}

/// What both handles of a pair share: whether the connection is closed, and why.
struct Shared {
    closed: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Shared {
    fn close(&self, reason: String) {
        if let Ok(mut slot) = self.reason.lock()
            && slot.is_none()
        {
            *slot = Some(reason);
        }
        self.closed.cancel();
    }

    fn reason(&self) -> String {
        self.reason.lock().ok().and_then(|r| r.clone()).unwrap_or_else(|| "connection closed".to_owned())
    }
}

/// One side of an in-memory connection.
struct MemoryConnection {
    shared: Arc<Shared>,
    to_peer: mpsc::Sender<BiStream>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<BiStream>>,
    peer_addr: SocketAddr,
}

impl Drop for MemoryConnection {
    fn drop(&mut self) {
        self.shared.close("the peer dropped the connection".to_owned());
    }
}

impl TunnelConnection for MemoryConnection {
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>> {
        Box::pin(async move {
            if self.shared.closed.is_cancelled() {
                return Err(ConnectionLost(self.shared.reason()));
            }
            let (our_send, their_recv) = pipe(&self.shared);
            let (their_send, our_recv) = pipe(&self.shared);
            let theirs = BiStream { send: Box::new(their_send), recv: Box::new(their_recv) };
            tokio::select! {
                sent = self.to_peer.send(theirs) => sent.map_err(|_| ConnectionLost(self.shared.reason()))?,
                () = self.shared.closed.cancelled() => return Err(ConnectionLost(self.shared.reason())),
            }
            Ok(BiStream { send: Box::new(our_send), recv: Box::new(our_recv) })
        })
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>> {
        Box::pin(async move {
            let mut incoming = self.incoming.lock().await;
            tokio::select! {
                stream = incoming.recv() => stream.ok_or_else(|| ConnectionLost(self.shared.reason())),
                () = self.shared.closed.cancelled() => Err(ConnectionLost(self.shared.reason())),
            }
        })
    }

    fn closed(&self) -> BoxFuture<'_, ConnectionLost> {
        Box::pin(async move {
            self.shared.closed.cancelled().await;
            ConnectionLost(self.shared.reason())
        })
    }

    fn close(&self, code: u32, reason: &str) {
        self.shared.close(format!("closed: {reason} (code {code:#x})"));
    }

    fn close_and_flush(&self, code: u32, reason: &str) -> BoxFuture<'_, ()> {
        self.close(code, reason);
        Box::pin(async {})
    }

    fn remote_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    fn transport(&self) -> &'static str {
        "memory"
    }
}

/// How a stream direction ended, as its writer left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Finished,
    Reset(u32),
}

/// The state both halves of one stream direction share.
struct PipeState {
    end: Mutex<End>,
    /// Set by the reader's `stop`; the writer's next write fails with it.
    stopped: Mutex<Option<u32>>,
}

fn pipe(shared: &Arc<Shared>) -> (MemorySend, MemoryRecv) {
    let (tx, rx) = mpsc::channel::<Bytes>(PIPE_CHUNKS);
    let state = Arc::new(PipeState { end: Mutex::new(End::Open), stopped: Mutex::new(None) });
    let send = MemorySend {
        tx: PollSender::new(tx),
        state: state.clone(),
        closed: Box::pin(shared.closed.clone().cancelled_owned()),
        shared: shared.clone(),
    };
    let recv = MemoryRecv {
        rx,
        pending: Bytes::new(),
        state,
        closed: Box::pin(shared.closed.clone().cancelled_owned()),
        shared: shared.clone(),
    };
    (send, recv)
}

fn lost(shared: &Shared) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, format!("tunnel connection lost: {}", shared.reason()))
}

struct MemorySend {
    tx: PollSender<Bytes>,
    state: Arc<PipeState>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Arc<Shared>,
}

impl MemorySend {
    fn set_end(&mut self, end: End) {
        if let Ok(mut slot) = self.state.end.lock()
            && *slot == End::Open
        {
            *slot = end;
        }
        self.tx.close();
    }
}

impl Drop for MemorySend {
    fn drop(&mut self) {
        // Like a QUIC send stream, one dropped without a reset is finished.
        self.set_end(End::Finished);
    }
}

impl SendHalf for MemorySend {
    fn reset(&mut self, code: u32) {
        self.set_end(End::Reset(code));
    }
}

impl AsyncWrite for MemorySend {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(lost(&self.shared)));
        }
        if let Some(code) = self.state.stopped.lock().ok().and_then(|s| *s) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, format!("stopped by peer: {code:#x}"))));
        }
        match ready!(self.tx.poll_reserve(cx)) {
            Ok(()) => match self.tx.send_item(Bytes::copy_from_slice(buf)) {
                Ok(()) => Poll::Ready(Ok(buf.len())),
                Err(_) => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))),
            },
            Err(_) => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.set_end(End::Finished);
        Poll::Ready(Ok(()))
    }
}

struct MemoryRecv {
    rx: mpsc::Receiver<Bytes>,
    /// What is left of the chunk last taken from the channel.
    pending: Bytes,
    state: Arc<PipeState>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Arc<Shared>,
}

impl MemoryRecv {
    fn reset_code(&self) -> Option<u32> {
        match self.state.end.lock().map(|e| *e) {
            Ok(End::Reset(code)) => Some(code),
            _ => None,
        }
    }
}

impl Drop for MemoryRecv {
    fn drop(&mut self) {
        self.stop(relay_proto::code::OK);
    }
}

impl RecvHalf for MemoryRecv {
    fn stop(&mut self, code: u32) {
        if let Ok(mut stopped) = self.state.stopped.lock()
            && stopped.is_none()
        {
            *stopped = Some(code);
        }
        self.rx.close();
    }
}

impl AsyncRead for MemoryRecv {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // As over QUIC, a closed connection fails its streams: nothing more is delivered.
        if self.shared.closed.is_cancelled() {
            return Poll::Ready(Err(lost(&self.shared)));
        }
        if let Some(code) = self.reset_code() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("reset by peer: {code:#x}"),
            )));
        }
        if self.pending.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => self.pending = chunk,
                Poll::Ready(None) => {
                    return Poll::Ready(match self.reset_code() {
                        Some(code) => {
                            Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("reset by peer: {code:#x}")))
                        }
                        None => Ok(()),
                    });
                }
                Poll::Pending => {
                    ready!(self.closed.as_mut().poll(cx));
                    return Poll::Ready(Err(lost(&self.shared)));
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}
