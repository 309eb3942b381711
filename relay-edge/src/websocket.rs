//! Relaying a media WebSocket: the bot's handshake answer decides the upgrade, then messages are
//! pumped between ACS's socket and the stream until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use relay_exchange::body::{RelayBody, empty, full};
use relay_exchange::websocket::{SessionLimits, SideEnd, pump, websocket_config};
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::headers::{PER_HOP_WEBSOCKET, from_wire, strip_hop_by_hop};
use relay_proto::{ExchangeKind, FailureKind, WsReply, code};
use relay_transport::{BiStream, read_frame, write_frame};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{info, warn};

use crate::forward::{call_key, exchange_head, forwarded_headers, open_exchange};
use crate::metrics::RouteLabels;
use crate::public::{PublicService, edge_answer};
use crate::routes::Route;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub(crate) async fn relay_upgrade(
    service: &Arc<PublicService>,
    mut req: Request<Incoming>,
    route: &Route,
    peer: SocketAddr,
    request_id: u64,
) -> Response<RelayBody> {
    let started = Instant::now();
    let headers = req.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return edge_answer(StatusCode::BAD_REQUEST, "this route accepts WebSocket upgrades only");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        let mut response = edge_answer(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 required");
        response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return edge_answer(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };

    let call_key = call_key(service, &route.name, route.affinity.as_ref().and_then(|source| source.from_head(&req)));
    let (in_flight, stream) = match open_exchange(service, &route.name, call_key.as_deref()).await {
        Ok(opened) => opened,
        Err(why) => return service.unavailable(why),
    };
    let agent = in_flight.agent().name.clone();
    let BiStream { mut send, mut recv } = stream;
    let mut forwarded = forwarded_headers(req.headers(), peer, &service.settings.admission.trusted_proxies);
    for name in PER_HOP_WEBSOCKET {
        forwarded.remove(name);
    }
    let head = exchange_head(&req, ExchangeKind::WebSocket, peer, request_id, &forwarded, call_key.clone());
    if let Err(e) = write_frame(&mut send, &head, DEFAULT_MAX_HEAD_LEN).await {
        warn!(request_id, agent = %agent, "could not send the upgrade head: {e}");
        return service.unavailable("agent connection lost");
    }
    let reply = tokio::time::timeout(
        service.settings.response_timeout,
        read_frame::<WsReply, _>(&mut recv, DEFAULT_MAX_HEAD_LEN),
    )
    .await;
    let (subprotocol, bot_headers) = match reply {
        Ok(Ok(Some(WsReply::Accepted { subprotocol, headers }))) => (subprotocol, headers),
        Ok(Ok(Some(WsReply::Rejected { head, body }))) => {
            let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
            info!(request_id, route = %route.name, agent = %agent, status = status.as_u16(), "bot refused the WebSocket upgrade");
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            if let Ok(mut headers) = from_wire(head.headers) {
                strip_hop_by_hop(&mut headers);
                *response.headers_mut() = headers;
            }
            return response;
        }
        Ok(Ok(Some(WsReply::Failed(failure)))) => {
            warn!(request_id, agent = %agent, "agent could not open the bot's WebSocket: {:?}: {}", failure.kind, failure.detail);
            return match failure.kind {
                FailureKind::BotTimeout => edge_answer(StatusCode::GATEWAY_TIMEOUT, "bot did not answer in time"),
                FailureKind::Draining => service.unavailable("agent draining"),
                _ => edge_answer(StatusCode::BAD_GATEWAY, "bot unreachable"),
            };
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            recv.stop(code::MALFORMED_FRAME);
            send.reset(code::MALFORMED_FRAME);
            warn!(request_id, agent = %agent, "agent sent no valid upgrade answer; stream reset");
            return edge_answer(StatusCode::BAD_GATEWAY, "invalid response from agent");
        }
        Err(_) => {
            send.reset(code::ABORTED);
            return edge_answer(StatusCode::GATEWAY_TIMEOUT, "no answer in time");
        }
    };

    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    if let Ok(mut extra) = from_wire(bot_headers) {
        strip_hop_by_hop(&mut extra);
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
    if let Ok(accept) = HeaderValue::from_str(&key) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        out.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }

    let upgrade = hyper::upgrade::on(&mut req);
    let limits = SessionLimits {
        max_message: service.settings.max_ws_message_bytes,
        max_write_buffer: service.settings.max_ws_write_buffer_bytes,
        write_timeout: service.settings.ws_write_timeout,
        idle_timeout: Some(service.settings.ws_idle_timeout),
    };
    let route_name = route.name.clone();
    let metrics = service.metrics.clone();
    let affinity = service.affinity.clone();
    service.tasks.spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                send.reset(code::ABORTED);
                warn!(request_id, agent = %agent, "client upgrade failed: {e}");
                return;
            }
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(websocket_config(&limits)))
                .await;
        metrics.websocket_sessions.inc();
        if let Some(call) = &call_key {
            affinity.session(call, true, std::time::Instant::now());
        }
        let report = pump(ws, BiStream { send, recv }, limits).await;
        metrics.websocket_sessions.dec();
        if let Some(call) = &call_key {
            affinity.session(call, false, std::time::Instant::now());
        }
        if report.socket_side == SideEnd::Idle {
            metrics.websocket_idle_closes.inc();
        }
        if report.socket_side == SideEnd::TooBig {
            metrics.rejection(&route_name, "limit", "ws-message-size");
        }
        if report.ended(|side| *side == SideEnd::Stalled) {
            metrics.rejection(&route_name, "limit", "ws-not-reading");
        }
        if report.ended(|side| matches!(side, SideEnd::Violation(..))) {
            metrics.rejection(&route_name, "websocket", "protocol-violation");
        }
        metrics
            .exchange_duration
            .get_or_create(&RouteLabels { route: route_name.clone() })
            .observe(started.elapsed().as_secs_f64());
        drop(in_flight);
        info!(
            request_id,
            route = %route_name,
            status = 101,
            messages_in = report.to_tunnel,
            messages_out = report.to_socket,
            client_end = ?report.socket_side,
            bot_end = ?report.tunnel_side,
            duration_ms = started.elapsed().as_millis() as u64,
            agent = %agent,
            "websocket session"
        );
    });
    response
}
