//! The admin listener both binaries run: `/metrics` in Prometheus text format, `/healthz` (the
//! process serves) and `/readyz` (it can do its job now), for container health checks and
//! orchestrator probes. It is kept off the public listener (and on loopback by default) so
//! metrics are never exposed by accident. Also [`probe`], the client side of those checks, which
//! the `health` subcommands run in images that have no shell and no curl.

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

/// A JSON document served at a path of its own (the edge's live call list at `/calls`).
pub type Document = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin listener serves besides its fixed paths.
#[derive(Clone, Default)]
struct Extra {
    documents: Arc<Vec<(&'static str, Document)>>,
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
    #[error("{path} answered {status}")]
    Status {
        /// The path probed.
        path: String,
        /// The status it answered.
        status: StatusCode,
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
        let unreachable = |reason: String| ProbeError::Unreachable { addr, reason };
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, "localhost")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
        match response.status() {
            StatusCode::OK => {
                let limited = http_body_util::Limited::new(response.into_body(), MAX_FETCH_BYTES);
                let body = http_body_util::BodyExt::collect(limited).await.map_err(|e| unreachable(e.to_string()))?;
                Ok(body.to_bytes())
            }
            status => Err(ProbeError::Status { path: path.to_owned(), status }),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt).await.map_err(|_| ProbeError::Timeout(addr))?
}

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

    /// [`AdminListener::serve`], and each of `documents` (JSON) at its path.
    pub async fn serve_with(
        self,
        metrics: impl Fn() -> String + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
        documents: Vec<(&'static str, Document)>,
        shutdown: CancellationToken,
    ) {
        let extra = Extra { documents: Arc::new(documents) };
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

fn text(status: StatusCode, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    response
}

fn answer(req: &Request<Incoming>, metrics: &MetricsText, ready: &Readiness, extra: &Extra) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match path {
        "/metrics" => {}
        "/healthz" => return text(StatusCode::OK, b"ok\n"),
        "/readyz" if ready() => return text(StatusCode::OK, b"ready\n"),
        "/readyz" => return text(StatusCode::SERVICE_UNAVAILABLE, b"not ready\n"),
        _ => {
            let Some((_, document)) = extra.documents.iter().find(|(at, _)| *at == path) else {
                return text(StatusCode::NOT_FOUND, b"not found\n");
            };
            let mut response = Response::new(Full::new(Bytes::from(document())));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return response;
        }
    }
    let mut response = Response::new(Full::new(Bytes::from(metrics())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
