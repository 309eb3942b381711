//! The public listener: connection caps, probes, screening, routing and admission. Admitted
//! exchanges continue in [`crate::forward`] (webhooks) and [`crate::websocket`] (media).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use relay_tunnel::body::RelayBody;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::{self, AuthCheck, Rejection, event_grid};
use crate::answer;
use crate::relay::Relay;
use crate::routes::{self, Route};
use relay_guard::conn_limit::ConnectionLimits;
use relay_guard::linger::LingeringStream;
use relay_guard::rate_limit::SourceRateLimiter;
use relay_guard::request_body::TimedBody;
use relay_guard::target;

/// After a failed accept (out of file descriptors, most often), how long the listener waits
/// before the next: long enough not to spin on an error that persists, short enough that
/// connections resume within a blink once descriptors free up.
const ACCEPT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// State shared by every public request.
pub(crate) struct PublicService {
    /// What relaying needs: settings, agents, calls, metrics, tasks.
    pub relay: Arc<Relay>,
    /// Token verifiers with their keys loaded.
    pub verifiers: admission::Verifiers,
    /// Per-source request rate, when limited.
    pub rate_limit: Option<SourceRateLimiter>,
    /// Cancelled when the edge starts draining: not ready, no new exchanges.
    pub draining: CancellationToken,
    pub next_request_id: AtomicU64,
    /// Client connections open, capped in total and per source.
    pub connections: Arc<ConnectionLimits>,
    pub shutdown: CancellationToken,
}

impl PublicService {
    /// Accepts connections until shutdown.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and similar: keep serving the connections we have.
                    debug!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            let permit = match self.connections.admit(peer.ip()) {
                Ok(permit) => permit,
                Err(refused) => {
                    // Closed before a byte is read: the cheapest answer, and nothing is held.
                    self.relay.metrics.rejection("unmatched", "limit", refused.reason());
                    debug!(%peer, reason = refused.reason(), "connection refused: over the cap");
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let stream = LingeringStream::new(stream, self.relay.settings.linger_timeout, permit);
            let this = self.clone();
            self.relay.tasks.spawn(async move { this.serve_connection(stream, peer).await });
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: LingeringStream, peer: SocketAddr) {
        let this = self.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.relay.settings.header_read_timeout)
            .max_buf_size(self.relay.settings.max_header_bytes)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    // hyper has answered 431 itself; count it like every other refusal.
                    if e.is_parse_too_large() {
                        self.relay.metrics.rejection("unmatched", "limit", "header-size");
                        self.relay.metrics.request("unmatched", 431);
                    }
                    debug!(%peer, "public connection ended: {e}");
                }
            }
            () = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// Answers a request that failed admission; it never reaches an agent.
    fn reject(&self, route: &Route, peer: SocketAddr, rejection: Rejection) -> Response<RelayBody> {
        self.relay.metrics.rejection(&route.name, rejection.check.name(), rejection.reason);
        info!(
            route = %route.name,
            check = rejection.check.name(),
            reason = rejection.reason,
            status = rejection.status.as_u16(),
            %peer,
            "request refused at the edge"
        );
        rejection.response()
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<RelayBody> {
        let path = req.uri().path();
        let path_check = target::check_path(path);
        let route_name = match path {
            "/healthz" | "/readyz" => None,
            _ if path_check.is_err() => Some("unmatched".to_owned()),
            _ => Some(
                routes::find(&self.relay.settings.routes, path)
                    .map_or_else(|| "unmatched".to_owned(), |r| r.name.clone()),
            ),
        };
        let response = match self.screen(&req, path_check, peer) {
            Some(refused) => refused,
            None => self.handle_route(req, peer).await,
        };
        if let Some(route) = route_name {
            self.relay.metrics.request(&route, response.status().as_u16());
        }
        response
    }

    /// What the edge refuses of any request before a route is matched: a head larger than
    /// `max_header_bytes` (hyper's own buffer limit is only a backstop: heads just above it would
    /// otherwise pass, then fail the tunnel's head frame with a misleading 503), and a path that
    /// a server behind the agent could read differently ([`target`]).
    fn screen<B>(
        &self,
        req: &Request<B>,
        path_check: Result<(), target::PathRefusal>,
        peer: SocketAddr,
    ) -> Option<Response<RelayBody>> {
        let head_len = request_head_len(req);
        if head_len > self.relay.settings.max_header_bytes {
            self.relay.metrics.rejection("unmatched", "limit", "header-size");
            info!(%peer, head_len, limit = self.relay.settings.max_header_bytes, status = 431, "request head over the limit");
            return Some(answer::closing(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"));
        }
        if let Err(refusal) = path_check {
            self.relay.metrics.rejection("unmatched", "path", refusal.reason());
            info!(%peer, reason = refusal.reason(), status = 400, "request path refused at the edge");
            return Some(answer::plain(StatusCode::BAD_REQUEST, "request path not accepted"));
        }
        None
    }

    async fn handle_route(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<RelayBody> {
        let path = req.uri().path();
        if let Some(answer) = self.probe(path) {
            return answer;
        }
        let Some(route) = routes::find(&self.relay.settings.routes, path).cloned() else {
            return answer::plain(StatusCode::NOT_FOUND, "not found");
        };
        if self.draining.is_cancelled() {
            return self.relay.unavailable("edge draining");
        }
        let admission = &self.relay.settings.admission;
        // Before admission: a flood must not get to make the edge verify signatures.
        if let Some(refused) = self.over_rate(&route, &req, peer) {
            return refused;
        }
        // Event Grid's CloudEvents handshake arrives as OPTIONS on the webhook route, before any
        // event; only the checks that do not depend on an event apply to it.
        if req.method() == Method::OPTIONS && route.auth.contains(&AuthCheck::EventGrid) {
            let pre: Vec<AuthCheck> = route
                .auth
                .iter()
                .copied()
                .filter(|c| matches!(c, AuthCheck::SourceIp | AuthCheck::SharedSecret))
                .collect();
            if let Err(rejection) = admission::admit(&pre, admission, &self.verifiers, &req, peer).await {
                return self.reject(&route, peer, rejection);
            }
            return event_grid::options_response(req.headers());
        }
        if !route.methods.contains(req.method()) {
            return method_not_allowed(&route);
        }
        if let Err(rejection) = admission::admit(&route.auth, admission, &self.verifiers, &req, peer).await {
            return self.reject(&route, peer, rejection);
        }
        if route.auth.contains(&AuthCheck::EventGrid) && event_grid::is_validation(req.headers()) {
            return answer_validation(req, &route, self.relay.settings.body_read_timeout).await;
        }
        let mut req = req;
        if route.auth.contains(&AuthCheck::SharedSecret)
            && let Some(secret) = &admission.shared_secret
        {
            secret.strip(&mut req);
        }
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        if route.websocket {
            crate::websocket::relay_upgrade(&self.relay, req, &route, peer, request_id).await
        } else {
            crate::forward::relay_http(&self.relay, req, &route, peer, request_id).await
        }
    }
}

impl PublicService {
    /// The answer to a liveness or readiness probe, if `path` is one.
    fn probe(&self, path: &str) -> Option<Response<RelayBody>> {
        match path {
            "/healthz" => Some(answer::plain(StatusCode::OK, "ok")),
            "/readyz" if self.draining.is_cancelled() => Some(self.relay.unavailable("edge draining")),
            "/readyz" if self.relay.agents.ready() => Some(answer::plain(StatusCode::OK, "ready")),
            "/readyz" => Some(self.relay.unavailable("no agent connected")),
            _ => None,
        }
    }

    /// `429` when the client (behind a trusted proxy: the address it names) is over its rate.
    fn over_rate<B>(&self, route: &Route, req: &Request<B>, peer: SocketAddr) -> Option<Response<RelayBody>> {
        let limiter = self.rate_limit.as_ref()?;
        let trusted = &self.relay.settings.admission.trusted_proxies;
        let client = admission::source_ip::client_ip(peer.ip(), req.headers(), trusted).unwrap_or(peer.ip());
        if limiter.allow(client, std::time::Instant::now()) {
            return None;
        }
        self.relay.metrics.rejection(&route.name, "limit", "rate");
        let mut response = answer::plain(StatusCode::TOO_MANY_REQUESTS, "too many requests");
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Some(response)
    }
}

/// `405` with the route's methods in `Allow`.
fn method_not_allowed(route: &Route) -> Response<RelayBody> {
    let mut response = answer::plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    let allow: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
    if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// The size of a request head as it came on the wire: request line, each header line with its
/// `": "` and CRLF, and the blank line.
fn request_head_len<B>(req: &Request<B>) -> usize {
    // "METHOD SP target SP HTTP/1.1 CRLF", the target as sent (origin or absolute form).
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + 1 + target + 1 + 8 + 2;
    let headers: usize = req.headers().iter().map(|(name, value)| name.as_str().len() + 2 + value.len() + 2).sum();
    line + headers + 2
}

/// Answers Event Grid's subscription validation at the edge; the bot never sees it.
async fn answer_validation(req: Request<Incoming>, route: &Route, body_timeout: Duration) -> Response<RelayBody> {
    use http_body_util::BodyExt;
    let body = TimedBody::new(req.into_body(), body_timeout);
    let body = match http_body_util::Limited::new(body, event_grid::MAX_VALIDATION_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if relay_guard::request_body::stalled(e.as_ref()) => {
            return answer::closing(StatusCode::REQUEST_TIMEOUT, "request body not received in time");
        }
        Err(_) => return answer::closing(StatusCode::PAYLOAD_TOO_LARGE, "validation request too large"),
    };
    match event_grid::validation_response(&body) {
        Some(response) => {
            info!(route = %route.name, "answered Event Grid subscription validation");
            response
        }
        None => {
            warn!(route = %route.name, "Event Grid validation request without a validation code");
            answer::plain(StatusCode::BAD_REQUEST, "no validation code")
        }
    }
}
