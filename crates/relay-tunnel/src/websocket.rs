//! Pumping one WebSocket session between a tokio-tungstenite socket and a tunnel stream.
//!
//! Both ends run the same pump: on the edge the socket is ACS's, on the agent it is the bot's.
//! Each direction writes one message at a time and waits for the other side to take it, so a
//! slow reader slows its writer instead of growing a buffer. Close frames travel with their code
//! and reason; a socket that vanishes without a close resets the stream, and the far end closes
//! its socket with 1001 (going away); a malformed frame closes only this session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_proto::{CloseFrame, WsFrame, code};
use relay_transport::{BiStream, FrameReadError, FrameReader, RecvHalf, SendHalf, write_frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WireClose;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::CLOSE_LINGER;
use crate::quality::{Quality, SessionQuality};

/// Bytes a [`WsFrame`] adds around a message: enum tag, length varint, slack.
const FRAME_OVERHEAD: usize = 16;

/// Longest close reason RFC 6455 allows (125-byte control payload less the 2-byte code).
const MAX_CLOSE_REASON: usize = 123;

/// Which way a message crossed the pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// From the socket onto the tunnel (on the agent: from the bot).
    SocketToTunnel,
    /// From the tunnel onto the socket (on the agent: from the caller).
    TunnelToSocket,
}

/// Sees every message a session relays, each way, as it passes (a call recording). It runs on
/// the pump's task for each message, so it must be quick and must not block: copy what it needs
/// and hand it on.
pub trait FrameTap: Send + Sync {
    /// `frame` crossed the pump `crossing`.
    fn frame(&self, crossing: Crossing, frame: &WsFrame);
}

/// How one side of a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideEnd {
    /// A close frame passed, with its code if it had one.
    Closed(Option<u16>),
    /// The socket or stream ended without a close (peer vanished, connection lost).
    Lost(String),
    /// The other end sent a frame that breaks the protocol; this session was closed.
    Malformed(String),
    /// The socket broke RFC 6455 (invalid UTF-8 in text: 1007; anything else: 1002); both ends
    /// were closed with that code.
    Violation(u16, String),
    /// The other direction finished and this one did not within [`CLOSE_LINGER`].
    LingerExpired,
    /// The socket sent a message over the size limit; both ends were closed with 1009.
    TooBig,
    /// The socket did not take what was written to it (its write buffer reached its bound, or a
    /// message waited longer than the write timeout): a peer that does not read. Both ends were
    /// closed with 1008.
    Stalled,
    /// No message passed either way for the idle timeout; both ends were closed with 1001.
    Idle,
}

/// What happened in a session, for the exchange log line.
#[derive(Debug, Clone)]
pub struct PumpReport {
    /// Messages from the socket onto the tunnel.
    pub to_tunnel: u64,
    /// Messages from the tunnel onto the socket.
    pub to_socket: u64,
    /// How the socket → tunnel direction ended.
    pub socket_side: SideEnd,
    /// How the tunnel → socket direction ended.
    pub tunnel_side: SideEnd,
    /// The session's media quality at its end.
    pub quality: Quality,
}

impl PumpReport {
    /// Whether either side ended as `end` describes.
    pub fn ended(&self, end: impl Fn(&SideEnd) -> bool) -> bool {
        end(&self.socket_side) || end(&self.tunnel_side)
    }
}

/// Converts a tungstenite message to its wire frame (`None` for raw frames, which reads never
/// yield).
pub fn to_frame(msg: Message) -> Option<WsFrame> {
    Some(match msg {
        Message::Text(text) => WsFrame::Text(text.as_bytes().to_vec()),
        Message::Binary(bytes) => WsFrame::Binary(bytes.to_vec()),
        Message::Ping(bytes) => WsFrame::Ping(bytes.to_vec()),
        Message::Pong(bytes) => WsFrame::Pong(bytes.to_vec()),
        Message::Close(close) => {
            WsFrame::Close(close.map(|c| CloseFrame { code: u16::from(c.code), reason: c.reason.to_string() }))
        }
        Message::Frame(_) => return None,
    })
}

/// Converts a wire frame from the peer to a message, refusing text that is not UTF-8.
pub fn to_message(frame: WsFrame) -> Result<Message, std::string::FromUtf8Error> {
    Ok(match frame {
        WsFrame::Text(bytes) => Message::Text(String::from_utf8(bytes)?.into()),
        WsFrame::Binary(bytes) => Message::Binary(bytes.into()),
        WsFrame::Ping(bytes) => Message::Ping(bytes.into()),
        WsFrame::Pong(bytes) => Message::Pong(bytes.into()),
        WsFrame::Close(close) => Message::Close(close.and_then(|c| {
            let code = CloseCode::from(c.code);
            // Codes such as 1005/1006 describe a close but may never be sent; drop them.
            code.is_allowed().then(|| WireClose { code, reason: truncate_reason(c.reason).into() })
        })),
    })
}

/// The close reason sent to both ends of a session closed for silence.
const IDLE_REASON: &str = "idle timeout";

/// The close reason sent to both ends of a session whose socket stopped reading.
const STALLED_REASON: &str = "peer not reading";

/// Bytes each WebSocket reads from its socket at a time, allocated up front for every open call.
/// tungstenite's default of 128 KiB suits a few busy sockets; a relay holds a thousand calls of
/// one ~900-byte frame every 20 ms, where 128 KiB per socket was most of each call's memory
/// (measured: 166 KiB per idle call on the edge). 8 KiB still takes several frames per read.
pub const WS_READ_BUFFER: usize = 8 * 1024;

/// Bytes a socket may hold queued for writing beyond one largest message: frame headers, a
/// close, and the pong tungstenite queues for the latest ping.
pub const WS_WRITE_BUFFER_SLACK: usize = 64 * 1024;

/// The write bound of a socket whose messages are at most `max_message` bytes. The pump writes
/// one message at a time and waits for it to be flushed, so what a socket queues is one message
/// and its own control frames; without a bound, tungstenite queues one pong per ping read from a
/// peer that never reads (measured: 200 MiB of pings took the edge from 26 to 220 MiB).
pub fn default_write_buffer(max_message: usize) -> usize {
    max_message.saturating_add(WS_WRITE_BUFFER_SLACK)
}

/// How long a message may wait for a socket to take it before the socket counts as not
/// reading. ACS reads and writes a frame every 20 ms; a peer that takes nothing for 10 s is gone
/// or hostile, and holds the call's buffers until it is closed.
pub const DEFAULT_WS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bounds of one relayed WebSocket session, the same on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest message (and frame) read or relayed; larger: 1009.
    pub max_message: usize,
    /// Bytes the socket may hold queued for writing (at least one largest message, see
    /// [`default_write_buffer`]); tungstenite then answers only the latest unanswered ping.
    pub max_write_buffer: usize,
    /// How long a message may wait for the socket to take it; longer: 1008.
    pub write_timeout: Duration,
    /// With a value, a session in which no data message passes for this long is closed: 1001.
    pub idle_timeout: Option<Duration>,
}

impl SessionLimits {
    /// Limits for messages up to `max_message` bytes, with the default write bound and timeout
    /// and no idle timeout.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            max_write_buffer: default_write_buffer(max_message),
            write_timeout: DEFAULT_WS_WRITE_TIMEOUT,
            idle_timeout: None,
        }
    }
}

/// The WebSocket settings both ends use: messages and frames up to the limit, a read buffer of
/// [`WS_READ_BUFFER`], and at most `max_write_buffer` bytes queued for writing. Frames are
/// written as they are queued; the pump flushes after each message anyway.
pub fn websocket_config(limits: &SessionLimits) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_message))
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(limits.max_write_buffer.max(1))
}

/// Pings forwarded across the tunnel at most once per this interval in each direction. Each hop
/// answers pings itself (tungstenite pongs the latest unanswered ping), so a forwarded ping only
/// tells the far end that the peer is alive; a flood of them would cost every hop and the bot.
pub const PING_FORWARD_INTERVAL: Duration = Duration::from_secs(1);

fn elapsed_ms(since: tokio::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn truncate_reason(mut reason: String) -> String {
    if reason.len() > MAX_CLOSE_REASON {
        let mut cut = MAX_CLOSE_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

fn close_message(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(WireClose { code, reason: reason.into() }))
}

/// The close a socket error calls for, if the error is the peer's fault: RFC 6455 §7.4.1.
fn violation(error: &WsError) -> Option<(CloseCode, &'static str)> {
    match error {
        WsError::Utf8(_) => Some((CloseCode::Invalid, "invalid UTF-8 in text message")),
        // A connection dropped without a close is a lost peer, not a protocol breach.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((CloseCode::Protocol, "protocol error")),
        _ => None,
    }
}

/// A close the socket → tunnel direction asks the other direction (which owns the sink) to
/// send to the socket.
#[derive(Debug, Default)]
struct CloseRequest {
    wanted: std::sync::Mutex<Option<(CloseCode, &'static str)>>,
    notify: tokio::sync::Notify,
}

impl CloseRequest {
    fn ask(&self, code: CloseCode, reason: &'static str) {
        if let Ok(mut wanted) = self.wanted.lock() {
            *wanted = Some((code, reason));
        }
        self.notify.notify_one();
    }

    async fn asked(&self) -> (CloseCode, &'static str) {
        self.notify.notified().await;
        self.wanted.lock().ok().and_then(|w| *w).unwrap_or((CloseCode::Error, "relay error"))
    }
}

/// What both directions of one session share: the limits, the signals one direction gives the
/// other, and the counts. Atomics rather than plain counters: both directions borrow them, and a
/// lingering direction may be dropped mid-way, yet its count so far still belongs in the report.
struct Shared {
    /// The largest frame a message may make on the tunnel.
    frame_limit: usize,
    /// How long the socket may take to accept one message.
    write_timeout: Duration,
    /// Cancelled when the socket stops taking what is written to it: the socket → tunnel
    /// direction then closes the tunnel side with 1008.
    stalled: CancellationToken,
    /// Cancelled when the session has been silent for the idle timeout: both directions close.
    idle: CancellationToken,
    /// Set when the socket must be closed for what it sent (too big, a protocol violation): the
    /// other direction, which owns the sink, sends the close.
    close_socket: CloseRequest,
    started: tokio::time::Instant,
    /// Milliseconds from `started` to the last data message relayed either way.
    last_activity: AtomicU64,
    to_tunnel: AtomicU64,
    to_socket: AtomicU64,
    /// Sizes and arrival times of the data messages each way.
    quality: std::sync::Arc<SessionQuality>,
    /// Sees each message relayed, when the session is being recorded.
    tap: Option<std::sync::Arc<dyn FrameTap>>,
}

impl Shared {
    fn new(
        limits: &SessionLimits,
        quality: std::sync::Arc<SessionQuality>,
        tap: Option<std::sync::Arc<dyn FrameTap>>,
    ) -> Self {
        Self {
            frame_limit: limits.max_message.saturating_add(FRAME_OVERHEAD),
            write_timeout: limits.write_timeout,
            stalled: CancellationToken::new(),
            idle: CancellationToken::new(),
            close_socket: CloseRequest::default(),
            started: tokio::time::Instant::now(),
            last_activity: AtomicU64::new(0),
            to_tunnel: AtomicU64::new(0),
            to_socket: AtomicU64::new(0),
            quality,
            tap,
        }
    }

    fn tap(&self, crossing: Crossing, frame: &WsFrame) {
        if let Some(tap) = &self.tap {
            tap.frame(crossing, frame);
        }
    }

    /// A data message passed: the session is not idle.
    fn touch(&self) {
        self.last_activity.store(elapsed_ms(self.started), Ordering::Relaxed);
    }

    /// Cancels `idle` once no data message has passed for `limit`; never, without one.
    async fn watchdog(&self, limit: Option<Duration>) {
        let Some(limit) = limit else { return std::future::pending().await };
        loop {
            let deadline = self.started + Duration::from_millis(self.last_activity.load(Ordering::Relaxed)) + limit;
            if tokio::time::Instant::now() >= deadline {
                self.idle.cancel();
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Sends the tunnel a close with `code` and `reason`, finishes the stream, and ends this
    /// direction with `end`.
    async fn close_tunnel(&self, send: &mut Box<dyn SendHalf>, code: u16, reason: &str, end: SideEnd) -> SideEnd {
        let close = WsFrame::Close(Some(CloseFrame { code, reason: reason.into() }));
        let _ = write_frame(send, &close, self.frame_limit).await;
        let _ = send.shutdown().await;
        end
    }
}

/// Relays messages between `ws` (configured with [`websocket_config`] of the same `limits`) and
/// `stream` until both directions end (or one ends and the other does not follow within
/// [`CLOSE_LINGER`]), then completes the socket's close handshake. With an idle timeout, a
/// session in which no data message passes either way for that long is closed on both ends with
/// 1001; pings and pongs do not count, so they cannot keep a dead call open.
pub async fn pump<S>(ws: WebSocketStream<S>, stream: BiStream, limits: SessionLimits) -> PumpReport
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let quality = std::sync::Arc::new(SessionQuality::new(crate::quality::DEFAULT_GLITCH_GAP));
    pump_measured(ws, stream, limits, quality).await
}

/// [`pump`], recording the session's media quality into `quality`, which a caller may read while
/// the session runs (a live call list).
pub async fn pump_measured<S>(
    ws: WebSocketStream<S>,
    stream: BiStream,
    limits: SessionLimits,
    quality: std::sync::Arc<SessionQuality>,
) -> PumpReport
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pump_tapped(ws, stream, limits, quality, None).await
}

/// [`pump_measured`], showing each relayed message to `tap` when there is one.
pub async fn pump_tapped<S>(
    ws: WebSocketStream<S>,
    stream: BiStream,
    limits: SessionLimits,
    quality: std::sync::Arc<SessionQuality>,
    tap: Option<std::sync::Arc<dyn FrameTap>>,
) -> PumpReport
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, source) = ws.split();
    let BiStream { mut send, mut recv } = stream;
    let shared = Shared::new(&limits, quality, tap);
    let socket_to_tunnel = socket_to_tunnel(&shared, source, &mut send);
    let tunnel_to_socket = tunnel_to_socket(&shared, &mut sink, &mut recv);
    let (socket_side, tunnel_side) = {
        tokio::pin!(socket_to_tunnel, tunnel_to_socket);
        let both = async {
            tokio::select! {
                socket_side = &mut socket_to_tunnel => {
                    let tunnel_side = tokio::time::timeout(CLOSE_LINGER, &mut tunnel_to_socket).await.unwrap_or(SideEnd::LingerExpired);
                    (socket_side, tunnel_side)
                }
                tunnel_side = &mut tunnel_to_socket => {
                    let socket_side = tokio::time::timeout(CLOSE_LINGER, &mut socket_to_tunnel).await.unwrap_or(SideEnd::LingerExpired);
                    (socket_side, tunnel_side)
                }
            }
        };
        let watchdog = shared.watchdog(limits.idle_timeout);
        tokio::pin!(both, watchdog);
        // The watchdog only cancels `idle`; both directions then close and `both` completes.
        tokio::select! {
            sides = &mut both => sides,
            () = &mut watchdog => both.await,
        }
    };
    // Complete the socket's close handshake: flush the answer tungstenite queued to the peer's
    // close, or send a close if none passed, so neither end sees 1006 (abnormal closure). A
    // socket that does not read gets its 1008 if it still takes one.
    if tunnel_side == SideEnd::Stalled {
        let stalled = close_message(CloseCode::Policy, STALLED_REASON);
        let _ = tokio::time::timeout(CLOSE_LINGER, sink.send(stalled)).await;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, sink.close()).await;
    PumpReport {
        to_tunnel: shared.to_tunnel.load(Ordering::Relaxed),
        to_socket: shared.to_socket.load(Ordering::Relaxed),
        socket_side,
        tunnel_side,
        quality: shared.quality.snapshot(),
    }
}

/// The close code a frame carries, if it is a close (`Some(None)`: a close without a code).
fn close_code(frame: &WsFrame) -> Option<Option<u16>> {
    match frame {
        WsFrame::Close(close) => Some(close.as_ref().map(|c| c.code)),
        _ => None,
    }
}

/// The socket → tunnel direction: each message from the socket becomes one frame on the stream.
async fn socket_to_tunnel<St>(shared: &Shared, mut source: St, send: &mut Box<dyn SendHalf>) -> SideEnd
where
    St: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut last_ping: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            next = source.next() => next,
            () = shared.idle.cancelled() => return shared.close_tunnel(send, 1001, IDLE_REASON, SideEnd::Idle).await,
            () = shared.stalled.cancelled() => return shared.close_tunnel(send, 1008, STALLED_REASON, SideEnd::Stalled).await,
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return socket_failed(shared, send, e).await,
            None => {
                send.reset(code::ABORTED);
                return SideEnd::Lost("socket ended without a close frame".into());
            }
        };
        let data_len = match &msg {
            Message::Text(text) => Some(text.len()),
            Message::Binary(bytes) => Some(bytes.len()),
            _ => None,
        };
        if let Some(len) = data_len {
            shared.quality.socket_frame(len);
        }
        let is_data = data_len.is_some();
        match &msg {
            // Answered on this hop; forwarded at most once per interval so the far end still
            // learns the peer is alive.
            Message::Ping(_) if last_ping.is_some_and(|at| at.elapsed() < PING_FORWARD_INTERVAL) => continue,
            Message::Ping(_) => last_ping = Some(tokio::time::Instant::now()),
            // Every hop answers its own pings: a pong is for this hop alone.
            Message::Pong(_) => continue,
            _ => {}
        }
        let Some(frame) = to_frame(msg) else { continue };
        let closing = close_code(&frame);
        // A write the tunnel does not take (its far end is stuck behind the same socket that
        // stopped reading) gives way when the other direction gives up on that socket.
        let written = tokio::select! {
            written = write_frame(send, &frame, shared.frame_limit) => written.map_err(|e| SideEnd::Lost(e.to_string())),
            () = shared.stalled.cancelled() => Err(SideEnd::Stalled),
        };
        if let Err(end) = written {
            send.reset(code::ABORTED);
            return end;
        }
        shared.tap(Crossing::SocketToTunnel, &frame);
        if is_data {
            shared.touch();
        }
        shared.to_tunnel.fetch_add(1, Ordering::Relaxed);
        if let Some(code) = closing {
            let _ = send.shutdown().await;
            return SideEnd::Closed(code);
        }
    }
}

/// How the socket → tunnel direction ends on a socket error: a message over the limit or a
/// protocol violation closes both ends with its code; anything else is a lost socket.
async fn socket_failed(shared: &Shared, send: &mut Box<dyn SendHalf>, error: WsError) -> SideEnd {
    if let WsError::Capacity(_) = error {
        shared.close_socket.ask(CloseCode::Size, "message too big");
        return shared.close_tunnel(send, 1009, "message too big", SideEnd::TooBig).await;
    }
    if let Some((code, reason)) = violation(&error) {
        shared.close_socket.ask(code, reason);
        return shared
            .close_tunnel(send, code.into(), reason, SideEnd::Violation(code.into(), error.to_string()))
            .await;
    }
    send.reset(code::ABORTED);
    SideEnd::Lost(error.to_string())
}

/// The tunnel → socket direction: each frame from the stream becomes one message on the socket,
/// sent within the write timeout.
async fn tunnel_to_socket<Si>(shared: &Shared, sink: &mut Si, recv: &mut Box<dyn RecvHalf>) -> SideEnd
where
    Si: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    let mut reader = FrameReader::new(shared.frame_limit);
    loop {
        let next = tokio::select! {
            next = reader.next::<WsFrame, _>(recv) => next,
            (code, reason) = shared.close_socket.asked() => {
                let _ = sink.send(close_message(code, reason)).await;
                recv.stop(code::ABORTED);
                return SideEnd::Closed(Some(code.into()));
            }
            () = shared.idle.cancelled() => {
                let _ = sink.send(close_message(CloseCode::Away, IDLE_REASON)).await;
                recv.stop(code::ABORTED);
                return SideEnd::Idle;
            }
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            failed => return tunnel_failed(sink, recv, failed.err()).await,
        };
        let closing = close_code(&frame);
        shared.tap(Crossing::TunnelToSocket, &frame);
        let data_len = match &frame {
            WsFrame::Text(bytes) | WsFrame::Binary(bytes) => Some(bytes.len()),
            _ => None,
        };
        if let Some(len) = data_len {
            shared.quality.tunnel_frame(len);
        }
        let is_data = data_len.is_some();
        let Ok(msg) = to_message(frame) else {
            recv.stop(code::MALFORMED_FRAME);
            let _ = sink.send(close_message(CloseCode::Invalid, "invalid UTF-8 in text message")).await;
            return SideEnd::Malformed("text message is not UTF-8".into());
        };
        let sent = tokio::time::timeout(shared.write_timeout, sink.send(msg)).await;
        if let Some(code) = closing {
            // After a close the socket may already be closing; either way this side is done.
            return SideEnd::Closed(code);
        }
        match sent {
            Ok(Ok(())) => {}
            // The socket's peer is not reading: close both ends rather than hold or queue more.
            Err(_) | Ok(Err(WsError::WriteBufferFull(_))) => {
                shared.stalled.cancel();
                recv.stop(code::ABORTED);
                return SideEnd::Stalled;
            }
            Ok(Err(e)) => {
                recv.stop(code::ABORTED);
                return SideEnd::Lost(e.to_string());
            }
        }
        if is_data {
            shared.touch();
        }
        shared.to_socket.fetch_add(1, Ordering::Relaxed);
    }
}

/// How the tunnel → socket direction ends when the stream ends (`None`) or fails: the socket is
/// told the peer went away, or, for a malformed frame, that the relay failed.
async fn tunnel_failed<Si>(sink: &mut Si, recv: &mut Box<dyn RecvHalf>, error: Option<FrameReadError>) -> SideEnd
where
    Si: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    match error {
        None => {
            let _ = sink.send(close_message(CloseCode::Away, "relay stream ended")).await;
            SideEnd::Lost("tunnel stream ended without a close frame".into())
        }
        Some(FrameReadError::Io(e)) => {
            let _ = sink.send(close_message(CloseCode::Away, "peer went away")).await;
            SideEnd::Lost(e.to_string())
        }
        Some(FrameReadError::Decode(e)) => {
            recv.stop(code::MALFORMED_FRAME);
            let _ = sink.send(close_message(CloseCode::Error, "relay protocol error")).await;
            SideEnd::Malformed(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_convert_both_ways_exactly() {
        let cases = vec![
            Message::Text("{\"kind\":\"AudioData\"}".into()),
            Message::Binary(vec![0u8, 1, 255].into()),
            Message::Ping(b"p".to_vec().into()),
            Message::Pong(Vec::new().into()),
            close_message(CloseCode::Library(4000), "bye"),
            Message::Close(None),
        ];
        for msg in cases {
            let back = to_message(to_frame(msg.clone()).unwrap()).unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn invalid_text_and_unsendable_close_codes_are_handled() {
        assert!(to_message(WsFrame::Text(vec![0xff, 0xfe])).is_err());
        let abnormal = WsFrame::Close(Some(CloseFrame { code: 1006, reason: "x".into() }));
        assert_eq!(to_message(abnormal).unwrap(), Message::Close(None));
        let long = WsFrame::Close(Some(CloseFrame { code: 1000, reason: "é".repeat(100) }));
        let Message::Close(Some(close)) = to_message(long).unwrap() else { panic!("close expected") };
        assert!(close.reason.len() <= MAX_CLOSE_REASON);
    }
}
