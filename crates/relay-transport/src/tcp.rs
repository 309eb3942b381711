//! The TLS/TCP implementation of the seam, for paths where UDP cannot pass (Azure Container Apps
//! ingress, egress firewalls that drop UDP): the edge's TCP listener, the agent's dialers, and
//! the connection both sides run over TLS 1.3 with the same certificates, verifiers and ALPNs as
//! QUIC.
//!
//! # Multiplexing: HTTP/2
//!
//! Streams are HTTP/2 streams (the `h2` crate, from the hyper project). HTTP/2 gives each stream
//! its own flow-control window, so a call whose reader stalls cannot hold up another, and it
//! resets a stream with a code, so a body cut short is an error to the reader and never a clean
//! end. yamux, the other maintained multiplexer, turns a reset into end-of-file and finishes a
//! dropped stream cleanly when the peer already finished; the exchange protocol ends HTTP bodies
//! by finishing the stream, so a truncated body would pass as whole.
//!
//! The agent dials (it is the TLS client) but serves HTTP/2, and the edge is the HTTP/2 client:
//! the edge opens exchange streams as with QUIC, one request each, whose body carries the edge's
//! bytes and whose response body carries the agent's. The agent opens streams (its control and
//! pairing streams) by asking over a *session stream*, the first stream the edge opens; the
//! session stream also carries the close code and reason, which HTTP/2 has no place for. The
//! tunnel code above the seam sees neither.
//!
//! Two differences from QUIC remain visible, and the code above is written for both: a reset ends
//! a stream in both directions (HTTP/2 has no half-reset), and stopping a stream's receiving half
//! is not signalled until the stream ends (HTTP/2 has no STOP_SENDING).
//!
//! What HTTP/2 over TCP cannot remove is head-of-line blocking below the streams: one lost TCP
//! segment holds every stream's later bytes until it is retransmitted (a round trip or more),
//! where QUIC delays only the stream whose packet was lost. That is why QUIC stays the default
//! and TCP is the fallback.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use relay_pki::CaPin;
use relay_proto::codec::encode_frame;
use relay_proto::{SessionMessage, code};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::frames::FrameReader;
use crate::h2stream::{H2Recv, H2Send, io_error};
use crate::peer::{DialError, HandshakeError, PeerKind, classify, tls_failure};
use crate::seam::{BiStream, BoxFuture, ConnectionLost, TunnelConnection};
use crate::settings::{CONNECTION_RECEIVE_WINDOW, MAX_AGENT_INITIATED_STREAMS, STREAM_RECEIVE_WINDOW, TunnelSettings};
use crate::tls::{self, PinCheck};

/// Path of the session stream.
const SESSION_PATH: &str = "/session";
/// Path of a stream the edge opens for itself (an exchange).
const EDGE_STREAM_PATH: &str = "/stream";
/// Path of a stream the edge opens because the agent asked for one.
const AGENT_STREAM_PATH: &str = "/agent-stream";
/// The authority on every request: HTTP/2 wants one, and the tunnel has no use for it.
const AUTHORITY: &str = "https://acs-relay.tunnel";

/// Largest session message: a close reason is a short sentence.
const SESSION_FRAME_LIMIT: usize = 4 * 1024;

/// Longest wait for a close to reach the peer before the TCP connection is dropped. On loopback
/// it takes a millisecond; over the internet a round trip.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a stream this side stopped reading keeps accepting (and discarding) the peer's bytes
/// so that what this side wrote is still delivered (see `h2stream::linger`). Matches the time a
/// WebSocket close handshake is given.
const STREAM_LINGER: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (out of file descriptors, say) before the next one, so the
/// listener does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// HTTP/2 settings for both ends: the same windows as QUIC, so a stream carries as much in flight
/// over either transport.
fn h2_windows() -> (u32, u32) {
    (STREAM_RECEIVE_WINDOW, CONNECTION_RECEIVE_WINDOW)
}

/// How the connection ended; the first reason recorded wins.
struct Ending {
    lost: watch::Sender<Option<ConnectionLost>>,
    /// Cancelled when the connection ends for any reason: its tasks wind down.
    ended: CancellationToken,
    /// Set when this side closed: the tasks give the close message time to reach the peer.
    closed_locally: std::sync::atomic::AtomicBool,
    /// Cancelled when the TCP connection is gone (for `close_and_flush`).
    finished: CancellationToken,
}

impl Ending {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            lost: watch::Sender::new(None),
            ended: CancellationToken::new(),
            closed_locally: std::sync::atomic::AtomicBool::new(false),
            finished: CancellationToken::new(),
        })
    }

    fn end(&self, reason: String) {
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

    fn flush_wait(&self) -> Duration {
        if self.closed_locally.load(std::sync::atomic::Ordering::SeqCst) { CLOSE_FLUSH_TIMEOUT } else { Duration::ZERO }
    }
}

/// How this side opens streams.
enum Opener {
    /// The edge: opens HTTP/2 requests directly.
    Edge(h2::client::SendRequest<Bytes>),
    /// The agent: asks over the session stream and waits for the edge to open one.
    Agent(Arc<Mutex<VecDeque<oneshot::Sender<BiStream>>>>),
}

/// A TLS/TCP tunnel connection.
struct TcpConnection {
    opener: Opener,
    session: Mutex<h2::SendStream<Bytes>>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<BiStream>>,
    ending: Arc<Ending>,
    remote: SocketAddr,
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

fn request(path: &str) -> Result<http::Request<()>, ConnectionLost> {
    http::Request::post(format!("{AUTHORITY}{path}")).body(()).map_err(|e| ConnectionLost(e.to_string()))
}

/// Opens one stream as an HTTP/2 request (the edge's side). Returns at once: the peer's half
/// becomes readable when its response head arrives.
async fn open_request(requests: h2::client::SendRequest<Bytes>, path: &str) -> Result<BiStream, ConnectionLost> {
    let mut requests =
        requests.ready().await.map_err(|e| ConnectionLost(format!("tunnel connection lost: {}", io_error(e))))?;
    let (response, send) = requests
        .send_request(request(path)?, false)
        .map_err(|e| ConnectionLost(format!("tunnel connection lost: {}", io_error(e))))?;
    Ok(BiStream { send: Box::new(H2Send::new(send)), recv: Box::new(H2Recv::response(response, STREAM_LINGER)) })
}

/// Reads session messages until the connection ends. The edge opens a stream for each `Open`;
/// both sides end the connection on `Close`.
async fn read_session(
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
async fn keep_alive(mut ping: h2::PingPong, settings: TunnelSettings, ending: Arc<Ending>) {
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

/// The edge's side of a new TLS connection: HTTP/2 client, opens the session stream.
async fn establish_edge<T>(io: T, remote: SocketAddr, settings: &TunnelSettings) -> Result<TcpConnection, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream_window, connection_window) = h2_windows();
    let (requests, mut connection) = h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_concurrent_streams(MAX_AGENT_INITIATED_STREAMS)
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await
        .map_err(|e| e.to_string())?;
    let ending = Ending::new();
    let ping = connection.ping_pong();
    {
        let ending = ending.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    ending.end(match result {
                        Ok(()) => "connection closed by peer".to_owned(),
                        Err(e) => format!("tunnel connection lost: {}", io_error(e)),
                    });
                }
                () = ending.ended.cancelled() => {
                    let _ = tokio::time::timeout(ending.flush_wait(), &mut connection).await;
                }
            }
            ending.finished.cancel();
        });
    }
    if let Some(ping) = ping {
        tokio::spawn(keep_alive(ping, settings.clone(), ending.clone()));
    }
    let mut session_requests = requests.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, session) =
        session_requests.send_request(request(SESSION_PATH).map_err(|e| e.0)?, false).map_err(|e| e.to_string())?;
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    tokio::spawn(read_session(
        H2Recv::response(response, STREAM_LINGER),
        ending.clone(),
        Some((requests.clone(), incoming_tx)),
    ));
    Ok(TcpConnection {
        opener: Opener::Edge(requests),
        session: Mutex::new(session),
        incoming: tokio::sync::Mutex::new(incoming_rx),
        ending,
        remote,
    })
}

/// The agent's side of a new TLS connection: HTTP/2 server; the first stream must be the
/// session stream.
async fn establish_agent<T>(io: T, remote: SocketAddr, settings: &TunnelSettings) -> Result<TcpConnection, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream_window, connection_window) = h2_windows();
    let mut connection = h2::server::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_concurrent_streams(settings.max_exchange_streams)
        .handshake::<T, Bytes>(io)
        .await
        .map_err(|e| format!("the edge closed the connection: {}", io_error(e)))?;
    let (request, mut respond) = match connection.accept().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => return Err(format!("the edge closed the connection: {}", io_error(e))),
        None => return Err("the edge closed the connection before the session began".into()),
    };
    if request.uri().path() != SESSION_PATH {
        return Err(format!("the edge opened {} before the session stream", request.uri().path()));
    }
    let session = respond.send_response(http::Response::new(()), false).map_err(|e| e.to_string())?;
    let session_recv = H2Recv::body(request.into_body(), STREAM_LINGER);
    let ending = Ending::new();
    let waiters: Arc<Mutex<VecDeque<oneshot::Sender<BiStream>>>> = Arc::default();
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    if let Some(ping) = connection.ping_pong() {
        tokio::spawn(keep_alive(ping, settings.clone(), ending.clone()));
    }
    tokio::spawn(read_session(session_recv, ending.clone(), None));
    tokio::spawn(serve_agent(connection, ending.clone(), waiters.clone(), incoming_tx));
    Ok(TcpConnection {
        opener: Opener::Agent(waiters),
        session: Mutex::new(session),
        incoming: tokio::sync::Mutex::new(incoming_rx),
        ending,
        remote,
    })
}

/// Drives the agent's HTTP/2 server connection: every stream the edge opens becomes an exchange
/// for `accept_bi`, or the answer to a pending `open_bi`.
async fn serve_agent<T>(
    mut connection: h2::server::Connection<T, Bytes>,
    ending: Arc<Ending>,
    waiters: Arc<Mutex<VecDeque<oneshot::Sender<BiStream>>>>,
    incoming: mpsc::UnboundedSender<BiStream>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = ending.ended.cancelled() => {
                // Keep the connection moving so the close message is written, then drop it.
                let flush = async { while connection.accept().await.is_some_and(|r| r.is_ok()) {} };
                let _ = tokio::time::timeout(ending.flush_wait(), flush).await;
                break;
            }
        };
        let (request, mut respond) = match next {
            Some(Ok(pair)) => pair,
            Some(Err(e)) => {
                ending.end(format!("tunnel connection lost: {}", io_error(e)));
                break;
            }
            None => {
                ending.end("connection closed by peer".into());
                break;
            }
        };
        let path = request.uri().path().to_owned();
        let send = match respond.send_response(http::Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                debug!("could not answer a stream from the edge: {e}");
                continue;
            }
        };
        let stream = BiStream {
            send: Box::new(H2Send::new(send)),
            recv: Box::new(H2Recv::body(request.into_body(), STREAM_LINGER)),
        };
        match path.as_str() {
            EDGE_STREAM_PATH => {
                if incoming.send(stream).is_err() {
                    // Nobody accepts any more: the connection is being dropped.
                    break;
                }
            }
            AGENT_STREAM_PATH => {
                let mut stream = Some(stream);
                if let Ok(mut waiters) = waiters.lock() {
                    while let (Some(waiter), Some(s)) = (waiters.pop_front(), stream.take()) {
                        // A waiter whose `open_bi` was cancelled hands the stream back.
                        if let Err(back) = waiter.send(s) {
                            stream = Some(back);
                        }
                    }
                }
                if let Some(mut unwanted) = stream {
                    unwanted.send.reset(code::REFUSED);
                }
            }
            other => {
                ending.end(format!("protocol violation: the edge opened {other}"));
                break;
            }
        }
    }
    ending.finished.cancel();
}

/// Connections a listener accepted, so closing the listener closes them as QUIC's endpoint close
/// does. Weak: a connection's owner decides how long it lives.
type Accepted = Arc<Mutex<Vec<std::sync::Weak<TcpConnection>>>>;

/// The edge's TLS/TCP tunnel listener, serving the tunnel and pairing ALPNs.
#[derive(Debug)]
pub struct TcpTunnelListener {
    listener: tokio::net::TcpListener,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    settings: TunnelSettings,
    closed: CancellationToken,
    accepted: Accepted,
}

impl TcpTunnelListener {
    /// Listens on `addr` with the edge's certificate chain, key and the pairing CA. Call from
    /// within the Tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: &CertificateDer<'static>,
        settings: &TunnelSettings,
    ) -> Result<Self, DialError> {
        let tls = tls::edge_server_config(cert_chain, key, ca)?;
        let std_listener = std::net::TcpListener::bind(addr).map_err(DialError::TcpBind)?;
        std_listener.set_nonblocking(true).map_err(DialError::TcpBind)?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(DialError::TcpBind)?;
        Ok(Self {
            listener,
            tls: RwLock::new(Arc::new(tls)),
            settings: settings.clone(),
            closed: CancellationToken::new(),
            accepted: Accepted::default(),
        })
    }

    /// Replaces the edge's certificate for new connections; established ones keep theirs.
    pub fn set_certificate(
        &self,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: &CertificateDer<'static>,
    ) -> Result<(), DialError> {
        let tls = Arc::new(tls::edge_server_config(cert_chain, key, ca)?);
        if let Ok(mut current) = self.tls.write() {
            *current = tls;
        }
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next incoming connection, or `None` once the listener is closed.
    pub async fn accept(&self) -> Option<IncomingTcp> {
        loop {
            let accepted = tokio::select! {
                () = self.closed.cancelled() => return None,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let tls = self.tls.read().map(|tls| tls.clone()).ok()?;
                    let accepted = self.accepted.clone();
                    return Some(IncomingTcp { stream, remote, tls, settings: self.settings.clone(), accepted });
                }
                Err(e) => {
                    debug!("tunnel TCP accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }

    /// Stops accepting and closes every connection still open with `code` and `reason`.
    pub fn close(&self, code: u32, reason: &str) {
        self.closed.cancel();
        let accepted = self.accepted.lock().map(|mut list| std::mem::take(&mut *list)).unwrap_or_default();
        for conn in accepted.iter().filter_map(std::sync::Weak::upgrade) {
            conn.close(code, reason);
        }
    }
}

/// A TCP connection attempt, not yet authenticated.
pub struct IncomingTcp {
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    settings: TunnelSettings,
    accepted: Accepted,
}

impl std::fmt::Debug for IncomingTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingTcp").field("remote", &self.remote).finish()
    }
}

impl IncomingTcp {
    /// The address the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Completes TLS and HTTP/2 and classifies the peer, by the same rules as QUIC. A refused
    /// peer is told why over the session stream, as QUIC tells it in its close.
    pub async fn handshake(self) -> Result<(Arc<dyn TunnelConnection>, PeerKind), HandshakeError> {
        let Self { stream, remote, tls, settings, accepted } = self;
        let attempt = async {
            // Media frames are small and latency-bound: never hold them back to fill a segment.
            let _ = stream.set_nodelay(true);
            let tls =
                tokio_rustls::TlsAcceptor::from(tls).accept(stream).await.map_err(|e| tls_failure(e.to_string()))?;
            let (_, session) = tls.get_ref();
            let kind = classify(session.alpn_protocol(), session.peer_certificates());
            let conn = establish_edge(tls, remote, &settings).await.map_err(HandshakeError::Tls)?;
            Ok::<_, HandshakeError>((conn, kind))
        };
        let (conn, kind) =
            tokio::time::timeout(settings.handshake_timeout, attempt).await.map_err(|_| HandshakeError::Timeout)??;
        match kind {
            Ok(kind) => {
                let conn = Arc::new(conn);
                if let Ok(mut list) = accepted.lock() {
                    list.retain(|weak| weak.strong_count() > 0);
                    list.push(Arc::downgrade(&conn));
                }
                Ok((conn, kind))
            }
            Err(refusal) => {
                conn.close_and_flush(refusal.code, refusal.reason).await;
                Err(refusal.error)
            }
        }
    }
}

async fn dial(
    addr: SocketAddr,
    server_name: &str,
    client: rustls::ClientConfig,
    settings: &TunnelSettings,
) -> Result<TcpConnection, DialError> {
    let name =
        ServerName::try_from(server_name.to_owned()).map_err(|_| DialError::ServerName(server_name.to_owned()))?;
    let attempt = async {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|source| DialError::TcpConnect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, stream)
            .await
            .map_err(|e| DialError::Handshake { addr, reason: e.to_string() })?;
        establish_agent(tls, addr, settings).await.map_err(|reason| DialError::Handshake { addr, reason })
    };
    tokio::time::timeout(settings.handshake_timeout, attempt).await.map_err(|_| DialError::Timeout(addr))?
}

/// Dials the edge's tunnel over TLS/TCP with the agent's certificate; the edge must prove itself
/// with a certificate from the pairing CA for `server_name`.
pub async fn dial_tunnel(
    addr: SocketAddr,
    server_name: &str,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let client = tls::agent_client_config(cert_chain, key, ca)?;
    Ok(Arc::new(dial(addr, server_name, client, settings).await?))
}

/// Dials the edge's pairing ALPN over TLS/TCP, trusting only a CA that matches `pin`.
pub async fn dial_pairing(
    addr: SocketAddr,
    server_name: &str,
    pin: CaPin,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let check = PinCheck::default();
    let client = tls::pairing_client_config(pin, check.clone())?;
    match dial(addr, server_name, client, settings).await {
        Ok(conn) => Ok(Arc::new(conn)),
        Err(_) if check.mismatched() => Err(DialError::PinMismatch(addr)),
        Err(err) => Err(err),
    }
}
