//! Relaying one webhook: request head and body down a new stream, the agent's answer back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use relay_proto::{ExchangeKind, HttpReply, code};
use relay_transport::{BiStream, RecvHalf};
use relay_tunnel::body::{BodyCopyError, RelayBody, body_from_stream, copy_body_to_stream};
use relay_tunnel::exchange::{self, ReplyError};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::affinity::{AffinitySource, PrefixedBody};
use crate::answer;
use crate::metrics::{DirectionLabels, EdgeMetrics, RouteLabels};
use crate::relay::Relay;
use crate::routes::Route;
use relay_guard::request_body::TimedBody;

/// When the agent's answer fails while the request body is still being copied, how long to wait
/// for the copy's own outcome. A copy that reset the stream has already finished; one still
/// writing fails as soon as the stream does. 100 ms is far beyond either.
const BODY_OUTCOME_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// A status and text the edge answers with itself.
type Refusal = (StatusCode, &'static str);

/// The request body's copy down the stream, running beside the wait for the answer.
type BodyCopy = JoinHandle<Result<u64, BodyCopyError>>;

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

impl ExchangeLog {
    fn new(
        relay: &Relay,
        request_id: u64,
        route: &Route,
        method: &http::Method,
        agent: &str,
        started: Instant,
    ) -> Self {
        Self {
            metrics: relay.metrics.clone(),
            request_id,
            route: route.name.clone(),
            method: method.to_string(),
            agent: agent.to_owned(),
            status: 0,
            started,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: Arc::new(AtomicU64::new(0)),
        }
    }
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
            target: crate::ACCESS_LOG,
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

/// Relays one webhook to an agent and returns the answer, its body streaming from the tunnel.
pub(crate) async fn relay_http(
    relay: &Relay,
    req: Request<Incoming>,
    route: &Route,
    peer: SocketAddr,
    request_id: u64,
) -> Response<RelayBody> {
    let started = Instant::now();
    let limit = relay.settings.max_body_bytes;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        info!(request_id, route = %route.name, status = 413, bytes_declared = len, limit, "request body over the limit");
        relay.metrics.rejection(&route.name, "limit", "body-size");
        return answer::closing(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let (req, key) = match with_call_key(relay, req, route, request_id).await {
        Ok(keyed) => keyed,
        Err((status, text)) => return answer::closing(status, text),
    };
    let (in_flight, mut stream) = match relay.open_exchange(&route.name, key.as_deref()).await {
        Ok(opened) => opened,
        Err(why) => return relay.unavailable(why),
    };
    let agent = in_flight.agent().name.clone();
    let head = relay.exchange_head(&req, ExchangeKind::Http, peer, request_id, &[], key);
    let mut log = ExchangeLog::new(relay, request_id, route, req.method(), &agent, started);
    if let Err(e) = exchange::send_head(&mut stream, &head).await {
        warn!(request_id, agent = %agent, "could not send the request head: {e}");
        log.status = 503;
        return relay.unavailable("agent connection lost");
    }
    // The body streams on its own task while we wait for the answer: a bot may answer before
    // reading everything, and a large body must not wait for an answer to be sent.
    let BiStream { mut send, mut recv } = stream;
    let bytes_in = log.bytes_in.clone();
    let body_task = tokio::spawn(async move {
        let body = CountingBody { inner: req.into_body(), count: bytes_in, _hold: () };
        copy_body_to_stream(body, &mut send, Some(limit)).await
    });
    let reply = match await_reply(relay, &route.name, request_id, &mut recv, body_task).await {
        Ok(reply) => reply,
        Err((status, text)) => {
            recv.stop(code::ABORTED);
            log.status = status.as_u16();
            return answer::closing(status, text);
        }
    };
    let response = respond(relay, reply, recv, request_id, &agent);
    log.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    // The log line and the in-flight count live until the response body ends or is dropped.
    let count = log.bytes_out.clone();
    let body = CountingBody { inner: body, count, _hold: (log, in_flight) };
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}

/// The request with the call's key: from the head, or from a bounded prefix of the body, which
/// is then sent on in front of the rest.
async fn with_call_key(
    relay: &Relay,
    req: Request<Incoming>,
    route: &Route,
    request_id: u64,
) -> Result<(Request<PrefixedBody>, Option<String>), Refusal> {
    let mut key = route.affinity.as_ref().and_then(|source| source.from_head(&req));
    let (parts, body) = req.into_parts();
    let body = TimedBody::new(body, relay.settings.body_read_timeout);
    let body = match &route.affinity {
        Some(source @ AffinitySource::JsonPointer(_)) => {
            let (prefix, complete, rest) = crate::affinity::read_prefix(body, relay.settings.affinity_prefix_bytes)
                .await
                .map_err(|e| body_failure(relay, &route.name, request_id, &e))?;
            if complete {
                key = source.from_body(&prefix);
            }
            PrefixedBody::new(prefix, rest)
        }
        _ => PrefixedBody::new(bytes::Bytes::new(), body),
    };
    Ok((Request::from_parts(parts, body), relay.call_key(&route.name, key)))
}

/// Waits for the agent's answer while the request body copies. A copy that fails first (the
/// body is too large, the client stalled or went away) refuses the request instead.
async fn await_reply(
    relay: &Relay,
    route: &str,
    request_id: u64,
    recv: &mut Box<dyn RecvHalf>,
    mut body_task: BodyCopy,
) -> Result<Result<HttpReply, ReplyError>, Refusal> {
    let reply = exchange::read_reply::<HttpReply>(recv, relay.settings.response_timeout);
    tokio::pin!(reply);
    let mut body_done = false;
    loop {
        tokio::select! {
            copied = &mut body_task, if !body_done => {
                body_done = true;
                if let Some(refused) = body_refusal(relay, route, request_id, &copied) {
                    return Err(refused);
                }
            }
            reply = &mut reply => {
                // Over TCP, resetting the request body (too large, client gone) ends the
                // answer's direction too, and that failure may be seen first: let the body
                // copy, which is finishing, say why before the agent is blamed.
                if matches!(reply, Err(ReplyError::Ended)) && !body_done
                    && let Ok(copied) = tokio::time::timeout(BODY_OUTCOME_GRACE, &mut body_task).await
                    && let Some(refused) = body_refusal(relay, route, request_id, &copied)
                {
                    return Err(refused);
                }
                return Ok(reply);
            }
        }
    }
}

/// Why a body copy that ended refuses the request, if it does.
fn body_refusal(
    relay: &Relay,
    route: &str,
    request_id: u64,
    copied: &Result<Result<u64, BodyCopyError>, tokio::task::JoinError>,
) -> Option<Refusal> {
    match copied {
        Ok(Err(BodyCopyError::TooLarge { .. })) => {
            relay.metrics.rejection(route, "limit", "body-size");
            Some((StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))
        }
        Ok(Err(BodyCopyError::Source(e))) => Some(body_failure(relay, route, request_id, e.as_ref())),
        // Copied, or the agent stopped reading: its answer (or failure) comes on the stream.
        Ok(Ok(_)) | Ok(Err(BodyCopyError::Sink(_))) | Err(_) => None,
    }
}

/// The client's response for the agent's answer.
fn respond(
    relay: &Relay,
    reply: Result<HttpReply, ReplyError>,
    mut recv: Box<dyn RecvHalf>,
    request_id: u64,
    agent: &str,
) -> Response<RelayBody> {
    match reply {
        Ok(HttpReply::Response(head)) => match exchange::response_parts(head) {
            Some((status, headers)) => {
                let mut response = Response::new(body_from_stream(recv));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                response
            }
            None => {
                recv.stop(code::MALFORMED_FRAME);
                warn!(request_id, agent = %agent, "agent sent an invalid response head; stream reset");
                answer::plain(StatusCode::BAD_GATEWAY, "invalid response from agent")
            }
        },
        Ok(HttpReply::Failed(failure)) => {
            warn!(request_id, agent = %agent, "agent could not deliver: {:?}: {}", failure.kind, failure.detail);
            relay.protocol_answer(exchange::failure_answer(failure.kind))
        }
        Err(e) => {
            warn!(request_id, agent = %agent, "{e}");
            relay.protocol_answer(e.answer())
        }
    }
}

/// The answer to a request whose body could not be read: 408 when the client stalled (counted),
/// 400 when its connection failed mid-body. Either way the answer closes the connection.
fn body_failure(
    relay: &Relay,
    route: &str,
    request_id: u64,
    error: &(dyn std::error::Error + 'static),
) -> (StatusCode, &'static str) {
    if relay_guard::request_body::stalled(error) {
        relay.metrics.rejection(route, "limit", "body-timeout");
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
