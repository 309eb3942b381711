//! The admin listener: `/metrics` in Prometheus text format. It is separate from the public
//! listener (and on loopback by default) so metrics are never exposed to the internet.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use relay_exchange::body::{RelayBody, full};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::EdgeMetrics;

/// Serves the admin endpoints until shutdown.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<EdgeMetrics>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn answer(req: &Request<Incoming>, metrics: &EdgeMetrics) -> Response<RelayBody> {
    let mut response = match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(full(metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        _ => Response::new(full("not found\n")),
    };
    if req.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}
