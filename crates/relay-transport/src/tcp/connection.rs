//! The connection both sides of a TLS/TCP tunnel run: how it ends (first reason wins), how each
//! side opens and accepts streams, its session stream, and its keep-alives.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use relay_proto::code;
use relay_proto::codec::encode_frame;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::session::{SESSION_FRAME_LIMIT, SessionMessage};
use super::{AGENT_STREAM_PATH, EDGE_STREAM_PATH, STREAM_LINGER};
use crate::frames::FrameReader;
use crate::h2stream::{H2Recv, H2Send, io_error};
use crate::seam::{BiStream, BoxFuture, ConnectionLost, TunnelConnection};
use crate::settings::{MAX_AGENT_INITIATED_STREAMS, TunnelSettings};

/// The authority on every request: HTTP/2 wants one, and the tunnel has no use for it.
const AUTHORITY: &str = "https://acs-relay.tunnel";

/// Longest wait for a close to reach the peer before the TCP connection is dropped. On loopback
/// it takes a millisecond; over the internet a round trip.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How the connection ended; the first reason recorded wins.
pub(super) struct Ending {
    pub(super) lost: watch::Sender<Option<ConnectionLost>>,
    /// Cancelled when the connection ends for any reason: its tasks wind down.
    pub(super) ended: CancellationToken,
    /// Set when this side closed: the tasks give the close message time to reach the peer.
    closed_locally: std::sync::atomic::AtomicBool,
    /// Cancelled when the TCP connection is gone (for `close_and_flush`).
    pub(super) finished: CancellationToken,
}

impl Ending {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            lost: watch::Sender::new(None),
            ended: CancellationToken::new(),
            closed_locally: std::sync::atomic::AtomicBool::new(false),
            finished: CancellationToken::new(),
        })
    }

    pub(super) fn end(&self, reason: String) {
        self.lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            *lost = Some(ConnectionLost(reason));
            true
        });
        self.ended.cancel();
    }

    fn current(&self) -> Option<ConnectionLost> {
        self.lost.borrow().clone()
    }

    pub(super) fn flush_wait(&self) -> Duration {
        if self.closed_locally.load(std::sync::atomic::Ordering::SeqCst) { CLOSE_FLUSH_TIMEOUT } else { Duration::ZERO }
    }
}

/// How this side opens streams.
pub(super) enum Opener {
    /// The edge: opens HTTP/2 requests directly.
    Edge(h2::client::SendRequest<Bytes>),
    /// The agent: asks over the session stream and waits for the edge to open one.
    Agent(Arc<Mutex<VecDeque<oneshot::Sender<BiStream>>>>),
}

/// A TLS/TCP tunnel connection.
pub(super) struct TcpConnection {
    pub(super) opener: Opener,
    pub(super) session: Mutex<h2::SendStream<Bytes>>,
    pub(super) incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<BiStream>>,
    pub(super) ending: Arc<Ending>,
    pub(super) remote: SocketAddr,
}

impl TcpConnection {
    fn send_session(&self, msg: &SessionMessage) -> Result<(), ConnectionLost> {
        let mut frame = bytes::BytesMut::new();
        encode_frame(msg, SESSION_FRAME_LIMIT, &mut frame).map_err(|e| ConnectionLost(e.to_string()))?;
        let mut session = self.session.lock().map_err(|_| ConnectionLost("session lock poisoned".into()))?;
        // HTTP/2 queues what exceeds the session stream's credit; these messages are tiny.
        session.send_data(frame.freeze(), false).map_err(|e| ConnectionLost(io_error(e).to_string()))
    }

    fn lost_or(&self, fallback: &str) -> ConnectionLost {
        self.ending.current().unwrap_or_else(|| ConnectionLost(fallback.to_owned()))
    }
}

impl TunnelConnection for TcpConnection {
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>> {
        Box::pin(async move {
            if let Some(lost) = self.ending.current() {
                return Err(lost);
            }
            match &self.opener {
                Opener::Edge(requests) => open_request(requests.clone(), EDGE_STREAM_PATH).await,
                Opener::Agent(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.lock().map_err(|_| ConnectionLost("waiters lock poisoned".into()))?.push_back(tx);
                    self.send_session(&SessionMessage::Open)?;
                    tokio::select! {
                        stream = rx => stream.map_err(|_| self.lost_or("connection lost")),
                        () = self.ending.ended.cancelled() => Err(self.lost_or("connection lost")),
                    }
                }
            }
        })
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>> {
        Box::pin(async move {
            let mut incoming = self.incoming.lock().await;
            tokio::select! {
                stream = incoming.recv() => stream.ok_or_else(|| self.lost_or("connection lost")),
                () = self.ending.ended.cancelled() => Err(self.lost_or("connection lost")),
            }
        })
    }

    fn closed(&self) -> BoxFuture<'_, ConnectionLost> {
        let mut lost = self.ending.lost.subscribe();
        Box::pin(async move {
            match lost.wait_for(Option::is_some).await {
                Ok(lost) => lost.clone().unwrap_or_else(|| ConnectionLost("connection lost".into())),
                Err(_) => ConnectionLost("connection lost".into()),
            }
        })
    }

    fn close(&self, code: u32, reason: &str) {
        if self.ending.current().is_some() {
            return;
        }
        self.ending.closed_locally.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.send_session(&SessionMessage::Close { code, reason: reason.to_owned() });
        self.ending.end("closed locally".into());
    }

    fn close_and_flush(&self, code: u32, reason: &str) -> BoxFuture<'_, ()> {
        self.close(code, reason);
        Box::pin(async move {
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.ending.finished.cancelled()).await;
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn transport(&self) -> &'static str {
        "tcp"
    }
}

impl Drop for TcpConnection {
    /// As with QUIC, the last handle going closes the connection; without this the connection's
    /// tasks would keep it, and its keep-alives, running with nobody using it.
    fn drop(&mut self) {
        self.close(code::OK, "connection dropped");
    }
}

pub(super) fn request(path: &str) -> Result<http::Request<()>, ConnectionLost> {
    http::Request::post(format!("{AUTHORITY}{path}")).body(()).map_err(|e| ConnectionLost(e.to_string()))
}

/// Opens one stream as an HTTP/2 request (the edge's side). Returns at once: the peer's half
/// becomes readable when its response head arrives.
pub(super) async fn open_request(
    requests: h2::client::SendRequest<Bytes>,
    path: &str,
) -> Result<BiStream, ConnectionLost> {
    let mut requests =
        requests.ready().await.map_err(|e| ConnectionLost(format!("tunnel connection lost: {}", io_error(e))))?;
    let (response, send) = requests
        .send_request(request(path)?, false)
        .map_err(|e| ConnectionLost(format!("tunnel connection lost: {}", io_error(e))))?;
    Ok(BiStream { send: Box::new(H2Send::new(send)), recv: Box::new(H2Recv::response(response, STREAM_LINGER)) })
}

/// Reads session messages until the connection ends. The edge opens a stream for each `Open`;
/// both sides end the connection on `Close`.
pub(super) async fn read_session(
    mut recv: H2Recv,
    ending: Arc<Ending>,
    edge: Option<(h2::client::SendRequest<Bytes>, mpsc::UnboundedSender<BiStream>)>,
) {
    let mut reader = FrameReader::new(SESSION_FRAME_LIMIT);
    // Streams opened for the agent over the connection's life. An agent asks for one or two (its
    // control stream, or its pairing stream); the cap keeps a peer (a pairing client is not
    // authenticated) from making the edge open streams without end.
    let mut granted = 0u32;
    loop {
        let msg = tokio::select! {
            () = ending.ended.cancelled() => return,
            msg = reader.next::<SessionMessage, _>(&mut recv) => msg,
        };
        match msg {
            Ok(Some(SessionMessage::Close { code, reason })) => {
                ending.end(format!("closed by peer: {reason} (code {code:#x})"));
                return;
            }
            Ok(Some(SessionMessage::Open)) => {
                let Some((requests, incoming)) = &edge else {
                    ending.end("protocol violation: the edge asked to open a stream".into());
                    return;
                };
                granted += 1;
                if granted > MAX_AGENT_INITIATED_STREAMS {
                    ending.end("protocol violation: the agent asked for too many streams".into());
                    return;
                }
                match open_request(requests.clone(), AGENT_STREAM_PATH).await {
                    Ok(stream) => {
                        if incoming.send(stream).is_err() {
                            return;
                        }
                    }
                    Err(lost) => {
                        ending.end(lost.0);
                        return;
                    }
                }
            }
            Ok(None) => {
                ending.end("connection closed by peer without a reason".into());
                return;
            }
            Err(e) => {
                ending.end(format!("session stream failed: {e}"));
                return;
            }
        }
    }
}

/// Pings the peer every `keep_alive`; a ping unanswered within `idle_timeout` ends the
/// connection, as QUIC's idle timeout does. Runs for the life of the connection.
pub(super) async fn keep_alive(mut ping: h2::PingPong, settings: TunnelSettings, ending: Arc<Ending>) {
    loop {
        tokio::select! {
            () = ending.ended.cancelled() => return,
            () = tokio::time::sleep(settings.keep_alive) => {}
        }
        let pong = tokio::select! {
            () = ending.ended.cancelled() => return,
            pong = tokio::time::timeout(settings.idle_timeout, ping.ping(h2::Ping::opaque())) => pong,
        };
        match pong {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                ending.end(format!("tunnel connection lost: {}", io_error(e)));
                return;
            }
            Err(_) => {
                ending.end("timed out".into());
                return;
            }
        }
    }
}
