//! Relaying one webhook: request head and body down a new stream, the agent's answer back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use relay_exchange::body::{BodyCopyError, RelayBody, body_from_stream, copy_body_to_stream};
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::headers::{from_wire, strip_hop_by_hop, to_wire};
use relay_proto::{ExchangeHead, ExchangeKind, FailureKind, HttpReply, code};
use relay_transport::{BiStream, FrameReadError, read_frame, write_frame};
use tracing::{debug, info, warn};

/// When the agent's answer fails while the request body is still being copied, how long to wait
/// for the copy's own outcome. A copy that reset the stream has already finished; one still
/// writing fails as soon as the stream does. 100 ms is far beyond either.
const BODY_OUTCOME_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

use crate::admission::source_ip::peer_is_trusted;
use crate::affinity::PrefixedBody;
use crate::agents::{InFlight, NoAgent};
use crate::metrics::{DirectionLabels, EdgeMetrics, RouteLabels};
use crate::public::{PublicService, edge_answer, edge_answer_closing};
use crate::request_body::TimedBody;
use crate::routes::Route;

/// Headers a client may use to claim where a request came from. From a peer that is not a
/// trusted proxy they are dropped (the `X-Forwarded-*` three are then rewritten from what the edge
/// itself saw), so a bot that believes them believes only the edge.
const CLIENT_ORIGIN_HEADERS: [&str; 4] = ["forwarded", "x-real-ip", "true-client-ip", "x-forwarded-port"];

/// Request headers as they leave the edge: hop-by-hop removed, `Host` replaced by
/// `X-Forwarded-Host`, and `X-Forwarded-For`/`-Proto` describing the client.
///
/// From a trusted proxy (`trusted_proxies`): its `X-Forwarded-For` is kept and the proxy's
/// address appended, and its `X-Forwarded-Proto` and `-Host` are kept (the ingress terminated TLS
/// for that host), as are `Forwarded` and the like. From anyone else: `X-Forwarded-For` is
/// replaced by the peer's address, `-Proto` by `http`, `-Host` by the `Host` header, and
/// `Forwarded`, `X-Real-IP`, `True-Client-IP` and `X-Forwarded-Port` are dropped.
pub(crate) fn forwarded_headers(original: &HeaderMap, peer: SocketAddr, trusted: &[ipnet::IpNet]) -> HeaderMap {
    let mut headers = original.clone();
    strip_hop_by_hop(&mut headers);
    let from_proxy = peer_is_trusted(peer.ip(), trusted);
    let proto = headers.remove("x-forwarded-proto").filter(|_| from_proxy);
    let forwarded_host = headers.remove("x-forwarded-host").filter(|_| from_proxy);
    let host = forwarded_host.or(headers.remove(header::HOST));
    let peer_ip = peer.ip().to_string();
    let claimed: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    let xff = if from_proxy && !claimed.is_empty() { format!("{}, {peer_ip}", claimed.join(", ")) } else { peer_ip };
    if !from_proxy {
        for name in CLIENT_ORIGIN_HEADERS {
            headers.remove(name);
        }
    }
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", proto.unwrap_or(HeaderValue::from_static("http")));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
    headers
}

/// The call key to pin an exchange by: `found` if it looks like an ACS correlation id
/// ([`crate::affinity::is_pinnable`]); anything else is counted and the exchange goes without a
/// pin, so a client cannot make the edge store keys of its choosing.
pub(crate) fn call_key(service: &PublicService, route: &str, found: Option<String>) -> Option<String> {
    let key = found?;
    if crate::affinity::is_pinnable(&key) {
        return Some(key);
    }
    service.metrics.affinity_keys_refused.inc();
    debug!(route, key_len = key.len(), "call key not pinned: not an ACS correlation id");
    None
}

/// The head frame for an exchange.
pub(crate) fn exchange_head<B>(
    req: &Request<B>,
    kind: ExchangeKind,
    peer: SocketAddr,
    request_id: u64,
    headers: &HeaderMap,
    affinity_key: Option<String>,
) -> ExchangeHead {
    ExchangeHead {
        request_id,
        kind,
        method: req.method().as_str().to_owned(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: to_wire(headers),
        client_addr: peer.to_string(),
        affinity_key,
    }
}

/// Picks an agent (the call's pinned one when `key` names a call) and opens a stream to it, or
/// says why not (as the `503` to send).
pub(crate) async fn open_exchange(
    service: &PublicService,
    route: &str,
    key: Option<&str>,
) -> Result<(InFlight, BiStream), &'static str> {
    // Two tries: an agent whose connection just died is removed when its session notices; the
    // second pick then finds another agent if there is one.
    for _ in 0..2 {
        let limit = service.settings.max_exchanges_per_agent;
        let chosen = match key {
            None => service.agents.pick(limit),
            Some(key) => service.affinity.choose(key, &service.agents, limit, std::time::Instant::now()).map(|pinned| {
                if let Some(gone) = pinned.moved_from {
                    service.metrics.affinity_moves.inc();
                    warn!(call = %key, from_agent_connection = gone, to = %pinned.agent.name, "call moved: its agent is gone");
                }
                pinned.agent
            }),
        };
        let agent = match chosen {
            Ok(agent) => agent,
            Err(NoAgent::NoneConnected) => return Err("no agent connected"),
            Err(NoAgent::AtCapacity) => {
                service.metrics.rejection(route, "limit", "agent-capacity");
                return Err("agents at capacity");
            }
        };
        let in_flight = agent.begin_exchange();
        match tokio::time::timeout(service.settings.open_stream_timeout, agent.conn.open_bi()).await {
            Ok(Ok(stream)) => return Ok((in_flight, stream)),
            Ok(Err(e)) => {
                warn!(agent = %agent.name, "cannot open an exchange stream: {e}");
                service.agents.remove(agent.id);
            }
            Err(_) => return Err("agent busy: no stream slot free"),
        }
    }
    Err("no agent reachable")
}

/// One log line per exchange, written when the exchange ends (response body finished or
/// abandoned), so the byte counts are final.
pub(crate) struct ExchangeLog {
    pub metrics: Arc<EdgeMetrics>,
    pub request_id: u64,
    pub route: String,
    pub method: String,
    pub agent: String,
    pub status: u16,
    pub started: Instant,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
}

impl Drop for ExchangeLog {
    fn drop(&mut self) {
        let (bytes_in, bytes_out) = (self.bytes_in.load(Ordering::Relaxed), self.bytes_out.load(Ordering::Relaxed));
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "in" }).inc_by(bytes_in);
        self.metrics.bytes.get_or_create(&DirectionLabels { direction: "out" }).inc_by(bytes_out);
        self.metrics
            .exchange_duration
            .get_or_create(&RouteLabels { route: self.route.clone() })
            .observe(self.started.elapsed().as_secs_f64());
        info!(
            request_id = self.request_id,
            route = %self.route,
            method = %self.method,
            status = self.status,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out.load(Ordering::Relaxed),
            duration_ms = self.started.elapsed().as_millis() as u64,
            agent = %self.agent,
            "exchange"
        );
    }
}

pub(crate) async fn relay_http(
    service: &Arc<PublicService>,
    req: Request<Incoming>,
    route: &Route,
    peer: SocketAddr,
    request_id: u64,
) -> Response<RelayBody> {
    let started = Instant::now();
    let limit = service.settings.max_body_bytes;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        info!(request_id, route = %route.name, status = 413, bytes_declared = len, limit, "request body over the limit");
        service.metrics.rejection(&route.name, "limit", "body-size");
        return edge_answer_closing(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    // The call's key: from the head, or from a bounded prefix of the body, which is then sent
    // on in front of the rest.
    let mut key = route.affinity.as_ref().and_then(|source| source.from_head(&req));
    let (parts, body) = req.into_parts();
    let body = TimedBody::new(body, service.settings.body_read_timeout);
    let body = match &route.affinity {
        Some(source @ crate::affinity::AffinitySource::JsonPointer(_)) => {
            match crate::affinity::read_prefix(body, service.settings.affinity_prefix_bytes).await {
                Ok((prefix, complete, rest)) => {
                    if complete {
                        key = source.from_body(&prefix);
                    }
                    PrefixedBody::new(prefix, rest)
                }
                Err(e) => {
                    let (status, text) = body_failure(service, &route.name, request_id, &e);
                    return edge_answer_closing(status, text);
                }
            }
        }
        _ => PrefixedBody::new(bytes::Bytes::new(), body),
    };
    let req = Request::from_parts(parts, body);
    let key = call_key(service, &route.name, key);
    let (in_flight, stream) = match open_exchange(service, &route.name, key.as_deref()).await {
        Ok(opened) => opened,
        Err(why) => return service.unavailable(why),
    };
    let agent = in_flight.agent().name.clone();
    let BiStream { mut send, mut recv } = stream;
    let headers = forwarded_headers(req.headers(), peer, &service.settings.admission.trusted_proxies);
    let head = exchange_head(&req, ExchangeKind::Http, peer, request_id, &headers, key);
    let mut log = ExchangeLog {
        metrics: service.metrics.clone(),
        request_id,
        route: route.name.clone(),
        method: req.method().to_string(),
        agent: agent.clone(),
        status: 0,
        started,
        bytes_in: Arc::new(AtomicU64::new(0)),
        bytes_out: Arc::new(AtomicU64::new(0)),
    };
    if let Err(e) = write_frame(&mut send, &head, DEFAULT_MAX_HEAD_LEN).await {
        warn!(request_id, agent = %agent, "could not send the request head: {e}");
        log.status = 503;
        return service.unavailable("agent connection lost");
    }

    // The body streams on its own task while we wait for the answer: a bot may answer before
    // reading everything, and a large body must not wait for an answer to be sent.
    let bytes_in = log.bytes_in.clone();
    let mut body_task = tokio::spawn(async move {
        let body = CountingBody { inner: req.into_body(), count: bytes_in, _hold: () };
        copy_body_to_stream(body, &mut send, Some(limit)).await
    });
    // Wait for the answer while the body copies; a failed copy may answer first.
    let waited = {
        let reply = tokio::time::timeout(
            service.settings.response_timeout,
            read_frame::<HttpReply, _>(&mut recv, DEFAULT_MAX_HEAD_LEN),
        );
        tokio::pin!(reply);
        let mut body_done = false;
        // Why a body copy that ended refuses the request, if it does.
        let refusal = |copied: &Result<Result<u64, BodyCopyError>, tokio::task::JoinError>| match copied {
            Ok(Err(BodyCopyError::TooLarge { .. })) => {
                service.metrics.rejection(&route.name, "limit", "body-size");
                Some((StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))
            }
            Ok(Err(BodyCopyError::Source(e))) => Some(body_failure(service, &route.name, request_id, e.as_ref())),
            // Copied, or the agent stopped reading: its answer (or failure) comes on `recv`.
            Ok(Ok(_)) | Ok(Err(BodyCopyError::Sink(_))) | Err(_) => None,
        };
        loop {
            tokio::select! {
                copied = &mut body_task, if !body_done => {
                    body_done = true;
                    if let Some(refused) = refusal(&copied) {
                        break Err(refused);
                    }
                }
                reply = &mut reply => {
                    // Over TCP, resetting the request body (too large, client gone) ends the
                    // answer's direction too, and that failure may be seen first: let the body
                    // copy, which is finishing, say why before the agent is blamed.
                    let stream_failed = matches!(reply, Ok(Ok(None)) | Ok(Err(FrameReadError::Io(_))));
                    if stream_failed && !body_done
                        && let Ok(copied) = tokio::time::timeout(BODY_OUTCOME_GRACE, &mut body_task).await
                        && let Some(refused) = refusal(&copied)
                    {
                        break Err(refused);
                    }
                    break Ok(reply);
                }
            }
        }
    };
    let reply = match waited {
        Ok(reply) => reply,
        Err((status, text)) => {
            recv.stop(code::ABORTED);
            log.status = status.as_u16();
            return edge_answer_closing(status, text);
        }
    };
    let (status, response) = match reply {
        Ok(Ok(Some(HttpReply::Response(head)))) => match (StatusCode::from_u16(head.status), from_wire(head.headers)) {
            (Ok(status), Ok(mut headers)) => {
                strip_hop_by_hop(&mut headers);
                let mut response = Response::new(body_from_stream(recv));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                (status, response)
            }
            _ => {
                recv.stop(code::MALFORMED_FRAME);
                warn!(request_id, agent = %agent, "agent sent an invalid response head; stream reset");
                (StatusCode::BAD_GATEWAY, edge_answer(StatusCode::BAD_GATEWAY, "invalid response from agent"))
            }
        },
        Ok(Ok(Some(HttpReply::Failed(failure)))) => {
            warn!(request_id, agent = %agent, "agent could not deliver: {:?}: {}", failure.kind, failure.detail);
            match failure.kind {
                FailureKind::BotTimeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    edge_answer(StatusCode::GATEWAY_TIMEOUT, "bot did not answer in time"),
                ),
                FailureKind::Draining => (StatusCode::SERVICE_UNAVAILABLE, service.unavailable("agent draining")),
                FailureKind::BotUnreachable | FailureKind::InvalidRequest => {
                    (StatusCode::BAD_GATEWAY, edge_answer(StatusCode::BAD_GATEWAY, "bot unreachable"))
                }
            }
        }
        Ok(Ok(None)) | Ok(Err(FrameReadError::Io(_))) => {
            warn!(request_id, agent = %agent, "agent stream ended before an answer");
            (StatusCode::BAD_GATEWAY, edge_answer(StatusCode::BAD_GATEWAY, "agent lost before answering"))
        }
        Ok(Err(FrameReadError::Decode(e))) => {
            recv.stop(code::MALFORMED_FRAME);
            warn!(request_id, agent = %agent, "malformed answer from agent: {e}; stream reset");
            (StatusCode::BAD_GATEWAY, edge_answer(StatusCode::BAD_GATEWAY, "invalid response from agent"))
        }
        Err(_) => {
            recv.stop(code::ABORTED);
            warn!(request_id, agent = %agent, "no answer from agent within {:?}", service.settings.response_timeout);
            (StatusCode::GATEWAY_TIMEOUT, edge_answer(StatusCode::GATEWAY_TIMEOUT, "no answer in time"))
        }
    };
    log.status = status.as_u16();
    let (parts, body) = response.into_parts();
    // The log line and the in-flight count live until the response body ends or is dropped.
    let count = log.bytes_out.clone();
    let body = CountingBody { inner: body, count, _hold: (log, in_flight) };
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}

/// The answer to a request whose body could not be read: 408 when the client stalled (counted),
/// 400 when its connection failed mid-body. Either way the answer closes the connection.
fn body_failure(
    service: &PublicService,
    route: &str,
    request_id: u64,
    error: &(dyn std::error::Error + 'static),
) -> (StatusCode, &'static str) {
    if crate::request_body::stalled(error) {
        service.metrics.rejection(route, "limit", "body-timeout");
        info!(request_id, route, status = 408, "{error}");
        (StatusCode::REQUEST_TIMEOUT, "request body not received in time")
    } else {
        warn!(request_id, route, "client request body failed: {error}");
        (StatusCode::BAD_REQUEST, "request body incomplete")
    }
}

/// A body that counts the data bytes passing through it, holding `_hold` until it is dropped.
struct CountingBody<B, H> {
    inner: B,
    count: Arc<AtomicU64>,
    _hold: H,
}

impl<B, H> hyper::body::Body for CountingBody<B, H>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    H: Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
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
