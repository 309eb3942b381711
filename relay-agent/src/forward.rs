//! Forwarding exchanges to the bot: webhooks with hyper's pooled client, media WebSockets with
//! tokio-tungstenite. Whatever the bot answers goes back on the exchange's stream; when the bot
//! cannot be reached the edge is told why, so it answers 502/504 instead of guessing.

use std::time::Instant;

use http::header::{self, HeaderName};
use http::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use relay_exchange::body::{RelayBody, body_from_stream, copy_body_to_stream};
use relay_exchange::websocket::{SessionLimits, pump};
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::headers::{PER_HOP_WEBSOCKET, from_wire, strip_hop_by_hop, to_wire};
use relay_proto::{ExchangeHead, Failure, FailureKind, HttpReply, ResponseHead, WsReply, code};
use relay_transport::{BiStream, write_frame};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing::{debug, info, warn};

use crate::config::AgentSettings;
use crate::metrics::{AgentMetrics, status_class};

/// Forwards exchanges to one bot.
pub(crate) struct Forwarder {
    settings: std::sync::Arc<AgentSettings>,
    client: Client<HttpConnector, RelayBody>,
    metrics: std::sync::Arc<AgentMetrics>,
}

fn path_and_query(head: &ExchangeHead) -> &str {
    if head.path_and_query.starts_with('/') { &head.path_and_query } else { "/" }
}

impl Forwarder {
    pub fn new(settings: std::sync::Arc<AgentSettings>, metrics: std::sync::Arc<AgentMetrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.bot_timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { settings, client, metrics }
    }

    fn bot_uri(&self, head: &ExchangeHead, scheme: &str) -> Result<Uri, String> {
        let authority = self.settings.upstream.authority().map(|a| a.as_str()).unwrap_or_default();
        format!("{scheme}://{authority}{}", path_and_query(head))
            .parse::<Uri>()
            .map_err(|e| format!("invalid request target: {e}"))
    }

    /// Relays one webhook.
    pub async fn http(&self, head: ExchangeHead, stream: BiStream) {
        let started = Instant::now();
        let BiStream { mut send, mut recv } = stream;
        let request_id = head.request_id;
        let (method, uri, headers) = match (
            Method::from_bytes(head.method.as_bytes()),
            self.bot_uri(&head, "http"),
            from_wire(head.headers.clone()),
        ) {
            (Ok(method), Ok(uri), Ok(mut headers)) => {
                strip_hop_by_hop(&mut headers);
                headers.remove(header::HOST);
                (method, uri, headers)
            }
            _ => {
                warn!(request_id, "malformed exchange head (method, target or headers); stream reset");
                recv.stop(code::MALFORMED_FRAME);
                send.reset(code::MALFORMED_FRAME);
                self.metrics.exchange("http", "malformed", started.elapsed().as_secs_f64());
                return;
            }
        };
        let mut request = Request::new(body_from_stream(recv));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let answer = tokio::time::timeout(self.settings.bot_timeout, self.client.request(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                let detail = error_chain(&e);
                warn!(request_id, path = %path_of(&head), "bot unreachable: {detail}");
                let failure = Failure { kind: FailureKind::BotUnreachable, detail };
                let _ = write_frame(&mut send, &HttpReply::Failed(failure), DEFAULT_MAX_HEAD_LEN).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
                self.metrics.exchange("http", "bot-unreachable", started.elapsed().as_secs_f64());
                return;
            }
            Err(_) => {
                warn!(request_id, path = %path_of(&head), "bot did not answer within {:?}", self.settings.bot_timeout);
                let failure = Failure {
                    kind: FailureKind::BotTimeout,
                    detail: format!("no answer within {:?}", self.settings.bot_timeout),
                };
                let _ = write_frame(&mut send, &HttpReply::Failed(failure), DEFAULT_MAX_HEAD_LEN).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
                self.metrics.exchange("http", "bot-timeout", started.elapsed().as_secs_f64());
                return;
            }
        };
        let (parts, body) = response.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        let reply = HttpReply::Response(ResponseHead { status: parts.status.as_u16(), headers: to_wire(&headers) });
        if let Err(e) = write_frame(&mut send, &reply, DEFAULT_MAX_HEAD_LEN).await {
            warn!(request_id, "could not return the bot's answer to the edge: {e}");
            send.reset(code::ABORTED);
            return;
        }
        let copied = copy_body_to_stream(body, &mut send, None).await;
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

    /// Relays one media WebSocket: opens the bot's socket, reports the handshake result, pumps.
    pub async fn websocket(&self, head: ExchangeHead, stream: BiStream) {
        let started = Instant::now();
        let BiStream { mut send, mut recv } = stream;
        let request_id = head.request_id;
        let request = self.bot_uri(&head, "ws").map_err(|e| e.to_string()).and_then(|uri| {
            let mut request = uri.into_client_request().map_err(|e| e.to_string())?;
            let mut headers = from_wire(head.headers.clone()).map_err(|e| e.to_string())?;
            strip_hop_by_hop(&mut headers);
            // tungstenite makes its own handshake headers, and Host, for the bot.
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
        });
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                warn!(request_id, "malformed WebSocket exchange head: {e}; stream reset");
                recv.stop(code::MALFORMED_FRAME);
                send.reset(code::MALFORMED_FRAME);
                self.metrics.exchange("websocket", "malformed", started.elapsed().as_secs_f64());
                return;
            }
        };
        // The edge owns the idle timeout (it faces the caller); the agent follows its close.
        let limits = SessionLimits {
            max_message: self.settings.max_ws_message_bytes,
            max_write_buffer: self.settings.max_ws_write_buffer_bytes,
            write_timeout: self.settings.ws_write_timeout,
            idle_timeout: None,
        };
        let config = relay_exchange::websocket::websocket_config(&limits);
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let reply = match tokio::time::timeout(self.settings.bot_timeout, connect).await {
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
                body.truncate(DEFAULT_MAX_HEAD_LEN / 2);
                Err(WsReply::Rejected {
                    head: ResponseHead { status: parts.status.as_u16(), headers: to_wire(&headers) },
                    body,
                })
            }
            Ok(Err(e)) => {
                warn!(request_id, "cannot open the bot's WebSocket: {e}");
                Err(WsReply::Failed(Failure { kind: FailureKind::BotUnreachable, detail: e.to_string() }))
            }
            Err(_) => {
                warn!(request_id, "bot did not accept the WebSocket within {:?}", self.settings.bot_timeout);
                Err(WsReply::Failed(Failure { kind: FailureKind::BotTimeout, detail: "upgrade timed out".into() }))
            }
        };
        let (ws, accepted) = match reply {
            Ok(pair) => pair,
            Err(refused) => {
                let outcome = match &refused {
                    WsReply::Rejected { head, .. } => status_class(head.status),
                    WsReply::Failed(Failure { kind: FailureKind::BotTimeout, .. }) => "bot-timeout".into(),
                    _ => "bot-unreachable".into(),
                };
                self.metrics.exchange("websocket", outcome, started.elapsed().as_secs_f64());
                let _ = write_frame(&mut send, &refused, DEFAULT_MAX_HEAD_LEN).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
                return;
            }
        };
        if let Err(e) = write_frame(&mut send, &accepted, DEFAULT_MAX_HEAD_LEN).await {
            warn!(request_id, "edge went away before the upgrade completed: {e}");
            return;
        }
        self.metrics.websocket_sessions.inc();
        let report = pump(ws, BiStream { send, recv }, limits).await;
        self.metrics.websocket_sessions.dec();
        self.metrics.exchange("websocket", "101", started.elapsed().as_secs_f64());
        info!(
            request_id,
            path = %path_of(&head),
            messages_to_bot = report.to_socket,
            messages_from_bot = report.to_tunnel,
            bot_end = ?report.socket_side,
            edge_end = ?report.tunnel_side,
            duration_ms = started.elapsed().as_millis() as u64,
            "websocket session"
        );
    }
}

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
