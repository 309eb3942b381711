//! A real bot for tests and the demo: echoes webhooks (streaming, byte for byte) and media
//! WebSocket messages, and records everything that reaches it.
//!
//! Behaviour knobs, all in the query string: `status=NNN` answers with that status;
//! `delay_ms=N` waits before answering; on a WebSocket upgrade `refuse=NNN` refuses with that
//! status. A text message `close:CODE:REASON` makes the bot close the socket with that code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_util::sync::CancellationToken;

use crate::client::Fnv;

type BotBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Bytes of each request body the bot keeps for assertions (the hash covers all of it).
const KEPT_BODY_BYTES: usize = 64 * 1024;

/// A webhook that reached the bot.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request method.
    pub method: String,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Total body length.
    pub body_len: u64,
    /// The first 64 KiB of the body.
    pub body: Vec<u8>,
    /// Hash of the whole body.
    pub hash: Fnv,
}

/// A media WebSocket session that reached the bot.
#[derive(Debug, Default)]
pub struct WsSession {
    /// Path and query of the upgrade.
    pub path_and_query: String,
    /// Upgrade request headers as received.
    pub headers: HeaderMap,
    /// Text and binary messages received.
    pub received: AtomicU64,
    /// Pings received.
    pub pings: AtomicU64,
    /// The close the bot received (code, reason), if any.
    pub close: Mutex<Option<(u16, String)>>,
    /// Whether the session has ended.
    pub ended: AtomicBool,
    /// Whether the session ended with a completed close handshake (a close frame each way),
    /// rather than a connection dropped without one.
    pub closed_cleanly: AtomicBool,
}

#[derive(Debug, Default)]
struct Log {
    /// Whether requests and sessions are kept; a benchmark's bot keeps nothing, so its memory
    /// stays flat however long a run lasts.
    record: bool,
    hits: AtomicU64,
    requests: Mutex<Vec<Recorded>>,
    sessions: Mutex<Vec<Arc<WsSession>>>,
}

/// The echo bot.
#[derive(Debug)]
pub struct EchoBot {
    addr: SocketAddr,
    log: Arc<Log>,
    shutdown: CancellationToken,
}

impl Drop for EchoBot {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl EchoBot {
    /// Starts the bot on `127.0.0.1` with a port from the OS.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?).await
    }

    /// Starts the bot on `addr`.
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(addr, true).await
    }

    /// Starts a bot on `addr` that records nothing but [`EchoBot::hits`], for load that runs
    /// for minutes (the benchmark).
    pub async fn start_quiet_on(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(addr, false).await
    }

    async fn start_with(addr: SocketAddr, record: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Log { record, ..Log::default() });
        let shutdown = CancellationToken::new();
        let (accept_log, accept_shutdown) = (log.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = accept_shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                let _ = stream.set_nodelay(true);
                let log = accept_log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(handle(req, log).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Self { addr, log, shutdown })
    }

    /// The bot's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bot's base URL, as given to `relay-agent --upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request that reached the bot (webhooks and upgrades), counted on arrival.
    pub fn hits(&self) -> u64 {
        self.log.hits.load(Ordering::SeqCst)
    }

    /// Webhooks whose bodies the bot has read to the end.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// WebSocket sessions accepted so far.
    pub fn sessions(&self) -> Vec<Arc<WsSession>> {
        self.log.sessions.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
}

fn text_response(status: StatusCode, text: &'static str) -> Response<BotBody> {
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from_static(text.as_bytes())).map_err(|never| match never {}).boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

async fn handle(req: Request<Incoming>, log: Arc<Log>) -> Response<BotBody> {
    log.hits.fetch_add(1, Ordering::SeqCst);
    let query = req.uri().query().map(str::to_owned);
    if let Some(ms) = query_param(query.as_deref(), "delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let is_upgrade =
        req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if is_upgrade {
        return upgrade(req, log, query.as_deref());
    }
    let status = query_param(query.as_deref(), "status")
        .and_then(|v| v.parse().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    let record = Recorded {
        method: req.method().to_string(),
        path_and_query: req.uri().path_and_query().map_or_else(String::new, |pq| pq.as_str().to_owned()),
        headers: req.headers().clone(),
        body_len: 0,
        body: Vec::new(),
        hash: Fnv::default(),
    };
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let content_length = req.headers().get(header::CONTENT_LENGTH).cloned();
    let body = RecordingBody { inner: req.into_body(), record: log.record.then_some(record), log };
    let mut response = Response::new(body.boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-bot", HeaderValue::from_static("echo"));
    headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
    headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
    if let Some(value) = content_type {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Some(value) = content_length {
        headers.insert(header::CONTENT_LENGTH, value);
    }
    response
}

/// Echoes the request body as the response body, recording it as it passes.
struct RecordingBody {
    inner: Incoming,
    record: Option<Recorded>,
    log: Arc<Log>,
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let (Some(data), Some(record)) = (frame.data_ref(), self.record.as_mut())
        {
            record.body_len += data.len() as u64;
            record.hash.update(data);
            let room = KEPT_BODY_BYTES.saturating_sub(record.body.len());
            record.body.extend_from_slice(data.get(..room.min(data.len())).unwrap_or_default());
        }
        // A length-delimited body may never be polled to `None`: record once it is complete.
        if (matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream())
            && let Some(record) = self.record.take()
            && self.log.record
            && let Ok(mut requests) = self.log.requests.lock()
        {
            requests.push(record);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn upgrade(mut req: Request<Incoming>, log: Arc<Log>, query: Option<&str>) -> Response<BotBody> {
    if let Some(status) =
        query_param(query, "refuse").and_then(|v| v.parse().ok()).and_then(|v| StatusCode::from_u16(v).ok())
    {
        return text_response(status, "refused by bot");
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return text_response(StatusCode::BAD_REQUEST, "no key");
    };
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let session = Arc::new(WsSession {
        path_and_query: req.uri().path_and_query().map_or_else(String::new, |pq| pq.as_str().to_owned()),
        headers: req.headers().clone(),
        ..Default::default()
    });
    if log.record
        && let Ok(mut sessions) = log.sessions.lock()
    {
        sessions.push(session.clone());
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            echo(ws, &session).await;
        }
        session.ended.store(true, Ordering::SeqCst);
    });
    let mut response = text_response(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert("x-bot", HeaderValue::from_static("echo"));
    if let Ok(accept) = HeaderValue::from_str(&key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = offered.and_then(|p| HeaderValue::from_str(&p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

async fn echo<S>(mut ws: WebSocketStream<S>, session: &WsSession)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = match ws.next().await {
            Some(Ok(msg)) => msg,
            // The close handshake completed: both close frames passed.
            None | Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => {
                session.closed_cleanly.store(true, Ordering::SeqCst);
                break;
            }
            Some(Err(_)) => break,
        };
        match msg {
            Message::Text(text) => {
                session.received.fetch_add(1, Ordering::SeqCst);
                if let Some(rest) = text.as_str().strip_prefix("close:") {
                    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
                    let code = code.parse::<u16>().unwrap_or(1000);
                    let _ = ws
                        .close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() }))
                        .await;
                    continue;
                }
                if ws.send(Message::Text(text)).await.is_err() {
                    break;
                }
            }
            Message::Binary(bytes) => {
                session.received.fetch_add(1, Ordering::SeqCst);
                if ws.send(Message::Binary(bytes)).await.is_err() {
                    break;
                }
            }
            Message::Ping(_) => {
                session.pings.fetch_add(1, Ordering::SeqCst);
            }
            Message::Close(frame) => {
                if let Ok(mut close) = session.close.lock() {
                    *close = Some(frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string())));
                }
            }
            Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}
