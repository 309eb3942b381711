//! Relaying a media WebSocket: the bot's handshake answer decides the upgrade, then messages are
//! pumped between ACS's socket and the stream until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use relay_proto::headers::PER_HOP_WEBSOCKET;
use relay_proto::{ExchangeKind, HeaderList, WsReply, code};
use relay_transport::BiStream;
use relay_tunnel::body::{RelayBody, empty, full};
use relay_tunnel::exchange::{self, ReplyError};
use relay_tunnel::quality::SessionQuality;
use relay_tunnel::websocket::{PumpReport, SessionLimits, SideEnd, pump_measured, websocket_config};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{info, warn};

use crate::agents::InFlight;
use crate::answer;
use crate::calls::NewCall;
use crate::metrics::{EdgeMetrics, RouteLabels};
use crate::relay::Relay;
use crate::routes::Route;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Sec-WebSocket-Accept` value for a valid upgrade request, or the answer to an invalid one.
fn accept_key<B>(req: &Request<B>) -> Result<String, (StatusCode, &'static str)> {
    let headers = req.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err((StatusCode::BAD_REQUEST, "this route accepts WebSocket upgrades only"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return Err((StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 required"));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .ok_or((StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"))
}

/// Relays one upgrade: the bot's answer decides it; on 101 the session runs on its own task.
pub(crate) async fn relay_upgrade(
    relay: &Arc<Relay>,
    mut req: Request<Incoming>,
    route: &Route,
    peer: SocketAddr,
    request_id: u64,
) -> Response<RelayBody> {
    let started = Instant::now();
    let key = match accept_key(&req) {
        Ok(key) => key,
        Err((status, text)) => {
            let mut response = answer::plain(status, text);
            if status == StatusCode::UPGRADE_REQUIRED {
                response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            return response;
        }
    };
    let call_key = relay.call_key(&route.name, route.affinity.as_ref().and_then(|source| source.from_head(&req)));
    let (in_flight, mut stream) = match relay.open_exchange(&route.name, call_key.as_deref()).await {
        Ok(opened) => opened,
        Err(why) => return relay.unavailable(why),
    };
    let agent = in_flight.agent().name.clone();
    let head =
        relay.exchange_head(&req, ExchangeKind::WebSocket, peer, request_id, &PER_HOP_WEBSOCKET, call_key.clone());
    if let Err(e) = exchange::send_head(&mut stream, &head).await {
        warn!(request_id, agent = %agent, "could not send the upgrade head: {e}");
        return relay.unavailable("agent connection lost");
    }
    let (subprotocol, bot_headers) = match exchange::read_reply(&mut stream.recv, relay.settings.response_timeout).await
    {
        Ok(WsReply::Accepted { subprotocol, headers }) => (subprotocol, headers),
        Ok(WsReply::Rejected { head, body }) => {
            info!(request_id, route = %route.name, agent = %agent, status = head.status, "bot refused the WebSocket upgrade");
            return refused_upgrade(head, body);
        }
        Ok(WsReply::Failed(failure)) => {
            warn!(request_id, agent = %agent, "agent could not open the bot's WebSocket: {:?}: {}", failure.kind, failure.detail);
            return relay.protocol_answer(exchange::failure_answer(failure.kind));
        }
        Err(e) => {
            let reset = if matches!(e, ReplyError::Timeout(_)) { code::ABORTED } else { code::MALFORMED_FRAME };
            exchange::reset(&mut stream, reset);
            warn!(request_id, agent = %agent, "agent sent no valid upgrade answer: {e}; stream reset");
            return relay.protocol_answer(e.answer());
        }
    };
    let response = switching_protocols(&key, subprotocol, bot_headers);
    let session = Session {
        relay: relay.clone(),
        upgrade: hyper::upgrade::on(&mut req),
        stream,
        route: route.name.clone(),
        call_key,
        agent,
        request_id,
        started,
        in_flight,
    };
    relay.tasks.spawn(session.run());
    response
}

/// The bot's refusal of an upgrade, passed on to the client as the bot gave it.
fn refused_upgrade(head: relay_proto::ResponseHead, body: Vec<u8>) -> Response<RelayBody> {
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    if let Some((_, headers)) = exchange::response_parts(head) {
        *response.headers_mut() = headers;
    }
    response
}

/// The client's `101`: the bot's end-to-end headers, and the handshake headers the edge makes
/// for the client's own key.
fn switching_protocols(key: &str, subprotocol: Option<String>, bot_headers: HeaderList) -> Response<RelayBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    if let Some((_, mut extra)) =
        exchange::response_parts(relay_proto::ResponseHead { status: 101, headers: bot_headers })
    {
        for name in
            PER_HOP_WEBSOCKET.iter().chain(["sec-websocket-accept", "sec-websocket-protocol", "content-length"].iter())
        {
            extra.remove(*name);
        }
        *response.headers_mut() = extra;
    }
    let out = response.headers_mut();
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(key) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        out.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// A media session whose upgrade was accepted, to run once the client's connection upgrades.
struct Session {
    relay: Arc<Relay>,
    upgrade: OnUpgrade,
    stream: BiStream,
    route: String,
    call_key: Option<String>,
    agent: String,
    request_id: u64,
    started: Instant,
    /// Counts the session against its agent until it ends.
    in_flight: InFlight,
}

impl Session {
    async fn run(mut self) {
        let upgraded = match (&mut self.upgrade).await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                self.stream.send.reset(code::ABORTED);
                warn!(request_id = self.request_id, agent = %self.agent, "client upgrade failed: {e}");
                return;
            }
        };
        let settings = &self.relay.settings;
        let limits = SessionLimits {
            max_message: settings.max_ws_message_bytes,
            max_write_buffer: settings.max_ws_write_buffer_bytes,
            write_timeout: settings.ws_write_timeout,
            idle_timeout: Some(settings.ws_idle_timeout),
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(websocket_config(&limits)))
                .await;
        let (metrics, affinity) = (&self.relay.metrics, &self.relay.affinity);
        metrics.websocket_sessions.inc();
        if let Some(call) = &self.call_key {
            affinity.session(call, true, std::time::Instant::now());
        }
        let quality = Arc::new(SessionQuality::new(settings.media_glitch_gap));
        let listed = self.relay.calls.list(NewCall {
            request_id: self.request_id,
            call: self.call_key.clone(),
            agent: self.agent.clone(),
            transport: self.in_flight.agent().conn.transport(),
            route: self.route.clone(),
            quality: quality.clone(),
        });
        let report = pump_measured(ws, self.stream, limits, quality).await;
        drop(listed);
        metrics.websocket_sessions.dec();
        if let Some(call) = &self.call_key {
            affinity.session(call, false, std::time::Instant::now());
        }
        count_session_end(metrics, &self.route, &report, self.started);
        drop(self.in_flight);
        let (caller, bot) = (&report.quality.from_socket, &report.quality.to_socket);
        info!(
            target: crate::ACCESS_LOG,
            request_id = self.request_id,
            route = %self.route,
            status = 101,
            call = self.call_key.as_deref().unwrap_or("-"),
            agent = %self.agent,
            duration_ms = self.started.elapsed().as_millis() as u64,
            messages_in = report.to_tunnel,
            messages_out = report.to_socket,
            frames_in = caller.frames,
            frames_out = bot.frames,
            glitches_in = caller.glitches,
            glitches_out = bot.glitches,
            longest_gap_in_ms = caller.longest_gap_ms.round() as u64,
            longest_gap_out_ms = bot.longest_gap_ms.round() as u64,
            jitter_in_ms = format_args!("{:.1}", caller.jitter_ms),
            jitter_out_ms = format_args!("{:.1}", bot.jitter_ms),
            first_frame_ms = caller.first_frame_ms.map_or(-1, |ms| ms.round() as i64),
            end = end_of(&report),
            client_end = ?report.socket_side,
            bot_end = ?report.tunnel_side,
            "websocket session"
        );
    }
}

/// How a media session ended, in one word for its log line and the ended-calls counter: what
/// the edge did to it (`idle`, `too-big`, `stalled`, `protocol-violation`), who vanished without
/// a close (`caller-lost`, `bot-lost`), or `closed` with a close handshake.
pub(crate) fn end_of(report: &PumpReport) -> &'static str {
    match (&report.socket_side, &report.tunnel_side) {
        (SideEnd::Idle, _) | (_, SideEnd::Idle) => "idle",
        (SideEnd::TooBig, _) | (_, SideEnd::TooBig) => "too-big",
        (SideEnd::Stalled, _) | (_, SideEnd::Stalled) => "stalled",
        (SideEnd::Violation(..), _) | (_, SideEnd::Violation(..)) => "protocol-violation",
        (SideEnd::Malformed(_), _) | (_, SideEnd::Malformed(_)) => "relay-error",
        (SideEnd::Lost(_), _) => "caller-lost",
        (_, SideEnd::Lost(_)) => "bot-lost",
        (SideEnd::LingerExpired, _) | (_, SideEnd::LingerExpired) => "close-unanswered",
        (SideEnd::Closed(_), SideEnd::Closed(_)) => "closed",
    }
}

/// Counts how a media session ended and how long it ran.
fn count_session_end(metrics: &EdgeMetrics, route: &str, report: &PumpReport, started: Instant) {
    if report.socket_side == SideEnd::Idle {
        metrics.websocket_idle_closes.inc();
    }
    if report.socket_side == SideEnd::TooBig {
        metrics.rejection(route, "limit", "ws-message-size");
    }
    if report.ended(|side| *side == SideEnd::Stalled) {
        metrics.rejection(route, "limit", "ws-not-reading");
    }
    if report.ended(|side| matches!(side, SideEnd::Violation(..))) {
        metrics.rejection(route, "websocket", "protocol-violation");
    }
    metrics
        .exchange_duration
        .get_or_create(&RouteLabels { route: route.to_owned() })
        .observe(started.elapsed().as_secs_f64());
    metrics.media.call_ended(&report.quality, end_of(report));
}
