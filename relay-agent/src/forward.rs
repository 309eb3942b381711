//! Forwarding exchanges to the bot: webhooks with hyper's pooled client, media WebSockets with
//! tokio-tungstenite. Whatever the bot answers goes back on the exchange's stream; when the bot
//! cannot be reached the edge is told why, so it answers 502/504 instead of guessing.

use std::time::Instant;

use http::header::{self, HeaderName};
use http::{Method, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use relay_proto::headers::{PER_HOP_WEBSOCKET, from_wire, strip_hop_by_hop, to_wire};
use relay_proto::{ExchangeHead, ExchangeKind, Failure, FailureKind, HttpReply, ResponseHead, WsReply, code};
use relay_transport::BiStream;
use relay_tunnel::body::{RelayBody, body_from_stream, copy_body_to_stream};
use relay_tunnel::exchange;
use relay_tunnel::quality::SessionQuality;
use relay_tunnel::websocket::{FrameTap, SessionLimits, pump_tapped};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing::{debug, info, warn};

use crate::config::AgentSettings;
use crate::metrics::{AgentMetrics, status_class};
use crate::observe::{Answer, Observer};

/// Forwards exchanges to one bot.
pub(crate) struct Forwarder {
    settings: std::sync::Arc<AgentSettings>,
    client: Client<HttpConnector, RelayBody>,
    metrics: std::sync::Arc<AgentMetrics>,
    /// Inspection and recordings (nothing while inspection is off).
    observer: std::sync::Arc<Observer>,
}

fn path_and_query(head: &ExchangeHead) -> &str {
    if head.path_and_query.starts_with('/') { &head.path_and_query } else { "/" }
}

impl Forwarder {
    /// Reads the head of an exchange the edge opened and forwards it. A malformed head resets
    /// this stream only.
    pub async fn exchange(self: std::sync::Arc<Self>, stream: BiStream, head_timeout: std::time::Duration) {
        match exchange::accept(stream, head_timeout).await {
            Ok(Some((head, stream))) => match head.kind {
                ExchangeKind::Http => self.http(head, stream).await,
                ExchangeKind::WebSocket => self.websocket(head, stream).await,
            },
            Ok(None) => {}
            Err(e) => warn!("{e}"),
        }
    }

    pub fn new(
        settings: std::sync::Arc<AgentSettings>,
        metrics: std::sync::Arc<AgentMetrics>,
        observer: std::sync::Arc<Observer>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.bot_timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { settings, client, metrics, observer }
    }

    fn bot_uri(&self, head: &ExchangeHead, scheme: &str) -> Result<Uri, String> {
        let authority = self.settings.upstream.authority().map(|a| a.as_str()).unwrap_or_default();
        format!("{scheme}://{authority}{}", path_and_query(head))
            .parse::<Uri>()
            .map_err(|e| format!("invalid request target: {e}"))
    }

    /// The bot's request for a webhook exchange, without its body; `None` when the head does not
    /// make a valid request.
    fn bot_request(&self, head: &ExchangeHead) -> Option<Request<()>> {
        let method = Method::from_bytes(head.method.as_bytes()).ok()?;
        let uri = self.bot_uri(head, "http").ok()?;
        let mut headers = from_wire(head.headers.clone()).ok()?;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Some(request)
    }

    /// Relays one webhook.
    pub async fn http(&self, head: ExchangeHead, stream: BiStream) {
        let started = Instant::now();
        let request_id = head.request_id;
        let Some(request) = self.bot_request(&head) else {
            warn!(request_id, "malformed exchange head (method, target or headers); stream reset");
            exchange::reset(&mut { stream }, code::MALFORMED_FRAME);
            self.metrics.exchange("http", "malformed", started.elapsed().as_secs_f64());
            return;
        };
        let watch = self.observer.begin(&head);
        let BiStream { mut send, recv } = stream;
        let body = match &watch {
            Some(watch) => watch.request.tap(body_from_stream(recv)).boxed_unsync(),
            None => body_from_stream(recv),
        };
        let request = request.map(|()| body);
        let answer = tokio::time::timeout(self.settings.bot_timeout, self.client.request(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                let detail = error_chain(&e);
                warn!(request_id, path = %path_of(&head), "bot unreachable: {detail}");
                if let Some(watch) = watch {
                    watch.finish(Answer { failure: Some(format!("bot unreachable: {detail}")), ..Answer::default() });
                }
                let failure = Failure { kind: FailureKind::BotUnreachable, detail };
                exchange::reply_final(&mut send, &HttpReply::Failed(failure)).await;
                self.metrics.exchange("http", "bot-unreachable", started.elapsed().as_secs_f64());
                return;
            }
            Err(_) => {
                warn!(request_id, path = %path_of(&head), "bot did not answer within {:?}", self.settings.bot_timeout);
                let detail = format!("no answer within {:?}", self.settings.bot_timeout);
                if let Some(watch) = watch {
                    watch.finish(Answer { failure: Some(format!("bot timeout: {detail}")), ..Answer::default() });
                }
                let failure = Failure { kind: FailureKind::BotTimeout, detail };
                exchange::reply_final(&mut send, &HttpReply::Failed(failure)).await;
                self.metrics.exchange("http", "bot-timeout", started.elapsed().as_secs_f64());
                return;
            }
        };
        let answered_at = Instant::now();
        let (parts, body) = response.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        let wire = to_wire(&headers);
        let shown = watch.as_ref().map(|_| wire.clone());
        let reply = HttpReply::Response(ResponseHead { status: parts.status.as_u16(), headers: wire });
        if let Err(e) = exchange::reply(&mut send, &reply).await {
            warn!(request_id, "could not return the bot's answer to the edge: {e}");
            send.reset(code::ABORTED);
            return;
        }
        let copied = match &watch {
            Some(watch) => copy_body_to_stream(watch.response.tap(body), &mut send, None).await,
            None => copy_body_to_stream(body, &mut send, None).await,
        };
        if let Some(watch) = watch {
            watch.finish(Answer {
                status: Some(parts.status.as_u16()),
                headers: shown.as_deref(),
                failure: copied.as_ref().err().map(|e| format!("response body not fully relayed: {e}")),
                answered_at: Some(answered_at),
            });
        }
        self.metrics.exchange("http", status_class(parts.status.as_u16()), started.elapsed().as_secs_f64());
        match copied {
            // The edge logs every exchange at info; the agent's line is detail for debugging.
            Ok(bytes_out) => debug!(
                request_id,
                method = %head.method,
                path = %path_of(&head),
                status = parts.status.as_u16(),
                bytes_out,
                duration_ms = started.elapsed().as_millis() as u64,
                "exchange"
            ),
            Err(e) => warn!(request_id, path = %path_of(&head), "response body not fully relayed: {e}"),
        }
    }

    /// The bot's WebSocket handshake request for an exchange head: the caller's end-to-end
    /// headers, with tungstenite making its own handshake headers and `Host`.
    fn bot_ws_request(&self, head: &ExchangeHead) -> Result<Request<()>, String> {
        let mut request = self.bot_uri(head, "ws")?.into_client_request().map_err(|e| e.to_string())?;
        let mut headers = from_wire(head.headers.clone()).map_err(|e| e.to_string())?;
        strip_hop_by_hop(&mut headers);
        for name in PER_HOP_WEBSOCKET.iter().chain([header::HOST.as_str()].iter()) {
            headers.remove(*name);
        }
        let mut last: Option<HeaderName> = None;
        for (name, value) in headers {
            // HeaderMap's owning iterator yields the name once for repeated headers.
            if let Some(name) = name {
                last = Some(name);
            }
            if let Some(name) = &last {
                request.headers_mut().append(name.clone(), value);
            }
        }
        Ok(request)
    }

    /// The limits of a media session. The edge owns the idle timeout (it faces the caller); the
    /// agent follows its close.
    fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_message: self.settings.max_ws_message_bytes,
            max_write_buffer: self.settings.max_ws_write_buffer_bytes,
            write_timeout: self.settings.ws_write_timeout,
            idle_timeout: None,
        }
    }

    /// Opens the bot's socket; `Err` is the answer that tells the edge why not.
    async fn open_bot_socket(&self, request: Request<()>, request_id: u64) -> Result<(BotSocket, WsReply), WsReply> {
        let config = relay_tunnel::websocket::websocket_config(&self.session_limits());
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        match tokio::time::timeout(self.settings.bot_timeout, connect).await {
            Ok(Ok((ws, response))) => {
                let mut headers = response.headers().clone();
                let subprotocol =
                    headers.get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()).map(str::to_owned);
                strip_hop_by_hop(&mut headers);
                Ok((ws, WsReply::Accepted { subprotocol, headers: to_wire(&headers) }))
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                let (parts, body) = response.into_parts();
                let mut headers = parts.headers;
                strip_hop_by_hop(&mut headers);
                let mut body = body.unwrap_or_default();
                body.truncate(relay_tunnel::HEAD_LIMIT / 2);
                let head = ResponseHead { status: parts.status.as_u16(), headers: to_wire(&headers) };
                Err(WsReply::Rejected { head, body })
            }
            Ok(Err(e)) => {
                warn!(request_id, "cannot open the bot's WebSocket: {e}");
                Err(WsReply::Failed(Failure { kind: FailureKind::BotUnreachable, detail: e.to_string() }))
            }
            Err(_) => {
                warn!(request_id, "bot did not accept the WebSocket within {:?}", self.settings.bot_timeout);
                Err(WsReply::Failed(Failure { kind: FailureKind::BotTimeout, detail: "upgrade timed out".into() }))
            }
        }
    }

    /// Relays one media WebSocket: opens the bot's socket, reports the handshake result, pumps.
    pub async fn websocket(&self, head: ExchangeHead, mut stream: BiStream) {
        let started = Instant::now();
        let request_id = head.request_id;
        let request = match self.bot_ws_request(&head) {
            Ok(request) => request,
            Err(e) => {
                warn!(request_id, "malformed WebSocket exchange head: {e}; stream reset");
                exchange::reset(&mut stream, code::MALFORMED_FRAME);
                self.metrics.exchange("websocket", "malformed", started.elapsed().as_secs_f64());
                return;
            }
        };
        let watch = self.observer.begin(&head);
        let (ws, accepted) = match self.open_bot_socket(request, request_id).await {
            Ok(opened) => opened,
            Err(refused) => {
                if let Some(watch) = watch {
                    let _ = watch.upgraded(match &refused {
                        WsReply::Rejected { head, .. } => Answer {
                            status: Some(head.status),
                            headers: Some(&head.headers),
                            answered_at: Some(Instant::now()),
                            ..Answer::default()
                        },
                        WsReply::Failed(failure) => {
                            Answer { failure: Some(failure.detail.clone()), ..Answer::default() }
                        }
                        WsReply::Accepted { .. } => Answer::default(),
                    });
                }
                let outcome = match &refused {
                    WsReply::Rejected { head, .. } => status_class(head.status),
                    WsReply::Failed(Failure { kind: FailureKind::BotTimeout, .. }) => "bot-timeout".into(),
                    _ => "bot-unreachable".into(),
                };
                self.metrics.exchange("websocket", outcome, started.elapsed().as_secs_f64());
                exchange::reply_final(&mut stream.send, &refused).await;
                return;
            }
        };
        if let Err(e) = exchange::reply(&mut stream.send, &accepted).await {
            warn!(request_id, "edge went away before the upgrade completed: {e}");
            return;
        }
        let tap = watch.and_then(|watch| {
            let headers = match &accepted {
                WsReply::Accepted { headers, .. } => Some(headers.as_slice()),
                _ => None,
            };
            watch.upgraded(Answer { status: Some(101), headers, answered_at: Some(Instant::now()), failure: None })
        });
        self.metrics.websocket_sessions.inc();
        let quality = std::sync::Arc::new(SessionQuality::new(self.settings.media_glitch_gap));
        let frames = tap.clone().map(|tap| tap as std::sync::Arc<dyn FrameTap>);
        let report = pump_tapped(ws, stream, self.session_limits(), quality, frames).await;
        if let Some(tap) = tap {
            tap.closed(format!("{:?}", report.tunnel_side), format!("{:?}", report.socket_side));
        }
        self.metrics.websocket_sessions.dec();
        self.metrics.exchange("websocket", "101", started.elapsed().as_secs_f64());
        self.metrics.media(&report.quality);
        // The bot's side of the call's media, next to the bot: `from_bot` gaps are the bot's own;
        // the edge's session line has the same figures as the caller gets them.
        let (to_bot, from_bot) = (&report.quality.to_socket, &report.quality.from_socket);
        info!(
            request_id,
            path = %path_of(&head),
            messages_to_bot = report.to_socket,
            messages_from_bot = report.to_tunnel,
            frames_to_bot = to_bot.frames,
            frames_from_bot = from_bot.frames,
            glitches_to_bot = to_bot.glitches,
            glitches_from_bot = from_bot.glitches,
            longest_gap_to_bot_ms = to_bot.longest_gap_ms.round() as u64,
            longest_gap_from_bot_ms = from_bot.longest_gap_ms.round() as u64,
            jitter_from_bot_ms = format_args!("{:.1}", from_bot.jitter_ms),
            bot_end = ?report.socket_side,
            edge_end = ?report.tunnel_side,
            duration_ms = started.elapsed().as_millis() as u64,
            "websocket session"
        );
    }
}

/// The bot's end of a media session.
type BotSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The path without the query (queries may carry secrets; logs never show them).
fn path_of(head: &ExchangeHead) -> &str {
    path_and_query(head).split('?').next().unwrap_or("/")
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
