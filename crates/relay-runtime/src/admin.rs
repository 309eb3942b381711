//! The admin listener both binaries run: `/metrics` in Prometheus text format, `/healthz` (the
//! process serves) and `/readyz` (it can do its job now), for container health checks and
//! orchestrator probes. It is kept off the public listener (and on loopback by default) so
//! metrics are never exposed by accident. Also [`probe`], the client side of those checks, which
//! the `health` subcommands run in images that have no shell and no curl, and [`fetch`] /
//! [`stream`], which the `calls`, `inspect`, `replay` and `record` subcommands read documents and
//! live recordings with. A binary adds its own paths as [`Route`]s.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Produces the current metrics text.
type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// Says whether the process can do its job now (`/readyz`).
type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// What a [`Route`] is asked: the part of the path after the route's own (`/exchanges/7` at
/// `/exchanges` is `7`; empty at the route's path itself) and the query, if any.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The path below the route's (no leading `/`).
    pub rest: &'a str,
    /// The query string, without the `?`.
    pub query: Option<&'a str>,
}

/// What a [`Route`] answers.
#[derive(Debug)]
pub enum RouteAnswer {
    /// A JSON document.
    Json(String),
    /// JSON lines written as they come, until the sender is dropped (a live recording). The
    /// connection's backpressure reaches the sender: a slow reader fills the channel.
    Lines(tokio::sync::mpsc::Receiver<Bytes>),
    /// Nothing there: 404 with this text.
    NotFound(String),
    /// The request cannot be served: this status with this text.
    Refused(StatusCode, String),
}

/// A path the admin listener serves besides its fixed ones (the edge's live call list at
/// `/calls`, the agent's inspected exchanges at `/exchanges` and `/exchanges/ID`).
pub type Route = Arc<dyn Fn(RouteRequest<'_>) -> RouteAnswer + Send + Sync>;

/// What the admin listener serves besides its fixed paths.
#[derive(Clone, Default)]
struct Extra {
    routes: Arc<Vec<(&'static str, Route)>>,
}

impl Extra {
    /// The route serving `path`, with what is left of the path below it.
    fn find<'a>(&self, path: &'a str) -> Option<(&Route, &'a str)> {
        self.routes.iter().find_map(|(at, route)| {
            let rest = path.strip_prefix(at)?;
            match rest.strip_prefix('/') {
                Some(below) => Some((route, below)),
                None if rest.is_empty() => Some((route, rest)),
                None => None,
            }
        })
    }
}

/// How long a health probe waits for its answer. Orchestrators give a probe a few seconds; the
/// answer is local and takes a millisecond.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a health probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing answered at the address.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The address probed.
        addr: std::net::SocketAddr,
        /// Why.
        reason: String,
    },
    /// The answer was not 200.
    #[error("{path} answered {status}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Status {
        /// The path probed.
        path: String,
        /// The status it answered.
        status: StatusCode,
        /// The listener's explanation, if it gave one.
        reason: String,
    },
    /// No answer within [`PROBE_TIMEOUT`].
    #[error("no answer from {0} within {PROBE_TIMEOUT:?}")]
    Timeout(std::net::SocketAddr),
}

/// The address to probe a listener bound to `addr` at: the same port on loopback when it is
/// bound to every address (`0.0.0.0`, `::`).
pub fn local(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => (std::net::Ipv4Addr::LOCALHOST, addr.port()).into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => (std::net::Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// GETs `path` from the admin listener at `addr` and succeeds on 200.
pub async fn probe(addr: std::net::SocketAddr, path: &str) -> Result<(), ProbeError> {
    fetch(addr, path).await.map(|_| ())
}

/// Largest answer [`fetch`] reads: a live call list of thousands of calls fits many times over.
pub const MAX_FETCH_BYTES: usize = 64 * 1024 * 1024;

/// GETs `path` from the admin listener at `addr` and returns its body on 200.
pub async fn fetch(addr: std::net::SocketAddr, path: &str) -> Result<Bytes, ProbeError> {
    let attempt = async {
        let response = get(addr, path).await?;
        let limited = http_body_util::Limited::new(response.into_body(), MAX_FETCH_BYTES);
        let body = http_body_util::BodyExt::collect(limited)
            .await
            .map_err(|e| ProbeError::Unreachable { addr, reason: e.to_string() })?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt).await.map_err(|_| ProbeError::Timeout(addr))?
}

/// GETs `path` from the admin listener at `addr` and, on 200, returns its body to be read as it
/// comes (a live recording, which lasts as long as its call). Only the answer's head is bounded
/// by [`PROBE_TIMEOUT`].
pub async fn stream(addr: std::net::SocketAddr, path: &str) -> Result<Incoming, ProbeError> {
    let response =
        tokio::time::timeout(PROBE_TIMEOUT, get(addr, path)).await.map_err(|_| ProbeError::Timeout(addr))??;
    Ok(response.into_body())
}

/// Sends a GET for `path` and returns the answer if it is 200; any other status is an error
/// that carries the listener's one-line explanation.
async fn get(addr: std::net::SocketAddr, path: &str) -> Result<Response<Incoming>, ProbeError> {
    let unreachable = |reason: String| ProbeError::Unreachable { addr, reason };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response);
    }
    // The listener explains a refusal in one short line; read at most a little of it.
    let limited = http_body_util::Limited::new(response.into_body(), MAX_REASON_BYTES);
    let reason = match http_body_util::BodyExt::collect(limited).await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
        Err(_) => String::new(),
    };
    Err(ProbeError::Status { path: path.to_owned(), status, reason })
}

/// Longest refusal text read from the listener: one line.
const MAX_REASON_BYTES: usize = 1024;

/// An admin listener bound at start-up (so a taken port is a start-up error) and served once the
/// service whose metrics and readiness it reports exists.
#[derive(Debug)]
pub struct AdminListener {
    listener: TcpListener,
    addr: std::net::SocketAddr,
}

impl AdminListener {
    /// Binds `addr`; the error names the address.
    pub async fn bind(addr: std::net::SocketAddr) -> Result<Self, BindError> {
        let bound = async {
            let listener = TcpListener::bind(addr).await?;
            let local = listener.local_addr()?;
            Ok::<_, std::io::Error>(Self { listener, addr: local })
        };
        bound.await.map_err(|source| BindError { addr, source })
    }

    /// The address bound (with the port the OS chose for port 0).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
    pub async fn serve(
        self,
        metrics: impl Fn() -> String + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        self.serve_with(metrics, ready, Vec::new(), shutdown).await;
    }

    /// [`AdminListener::serve`], and each of `routes` at its path and below it.
    pub async fn serve_with(
        self,
        metrics: impl Fn() -> String + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
        routes: Vec<(&'static str, Route)>,
        shutdown: CancellationToken,
    ) {
        let extra = Extra { routes: Arc::new(routes) };
        serve_metrics(self.listener, Arc::new(metrics), Arc::new(ready), extra, shutdown).await;
    }
}

/// The admin listener's address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address.
    pub addr: std::net::SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// Serves `/metrics`, `/healthz` and `/readyz` from `listener` until `shutdown`.
async fn serve_metrics(
    listener: TcpListener,
    metrics: MetricsText,
    ready: Readiness,
    extra: Extra,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let (metrics, ready, extra) = (metrics.clone(), ready.clone(), extra.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (metrics, ready, extra) = (metrics.clone(), ready.clone(), extra.clone());
                async move { Ok::<_, Infallible>(answer(&req, &metrics, &ready, &extra)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The listener's answers: whole documents, or lines streamed as they come.
type AdminBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn whole(bytes: impl Into<Bytes>) -> AdminBody {
    http_body_util::BodyExt::boxed_unsync(Full::new(bytes.into()))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut response = Response::new(whole(body));
    *response.status_mut() = status;
    response
}

fn with_type(mut response: Response<AdminBody>, content_type: &'static str) -> Response<AdminBody> {
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn answer(req: &Request<Incoming>, metrics: &MetricsText, ready: &Readiness, extra: &Extra) -> Response<AdminBody> {
    let path = req.uri().path();
    match path {
        "/metrics" => {
            with_type(text(StatusCode::OK, metrics()), "application/openmetrics-text; version=1.0.0; charset=utf-8")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => {
            let Some((route, rest)) = extra.find(path) else {
                return text(StatusCode::NOT_FOUND, "not found\n");
            };
            match route(RouteRequest { rest, query: req.uri().query() }) {
                RouteAnswer::Json(json) => with_type(text(StatusCode::OK, json), "application/json"),
                RouteAnswer::Lines(lines) => {
                    let frames = futures_util::stream::unfold(lines, |mut lines| async move {
                        let line = lines.recv().await?;
                        Some((Ok::<_, Infallible>(hyper::body::Frame::data(line)), lines))
                    });
                    let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames));
                    with_type(Response::new(body), "application/x-ndjson")
                }
                RouteAnswer::NotFound(why) => text(StatusCode::NOT_FOUND, format!("{why}\n")),
                RouteAnswer::Refused(status, why) => text(status, format!("{why}\n")),
            }
        }
    }
}
