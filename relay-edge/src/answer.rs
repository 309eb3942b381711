//! The edge's own answers: short plain-text responses for what it decides itself (404, 405,
//! 408, 413, 431, 502, 503, 504), with `Connection: close` when it stopped reading the request,
//! and `Retry-After` on a 503 so Event Grid and ACS retry instead of giving up.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use relay_tunnel::body::{RelayBody, full};
use relay_tunnel::exchange::EdgeAnswer;

/// A short plain-text answer from the edge itself.
pub(crate) fn plain(status: StatusCode, text: &str) -> Response<RelayBody> {
    let mut response = Response::new(full(format!("{text}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// [`plain`] for a request the edge stopped reading: `Connection: close` tells the client the
/// connection ends with this answer (and [`relay_guard::linger`] makes sure it is read).
pub(crate) fn closing(status: StatusCode, text: &str) -> Response<RelayBody> {
    let mut response = plain(status, text);
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `503` with `Retry-After` (at least a second). Logged: an operator must see that ACS traffic
/// is being turned away.
pub(crate) fn unavailable(text: &str, retry_after: Duration) -> Response<RelayBody> {
    tracing::warn!("answering 503 at the edge: {text}");
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
    response
}

/// The response for an answer the tunnel protocol decided (a failure the agent reported, an
/// agent that did not answer); a 503 gets its `Retry-After`.
pub(crate) fn from_protocol(answer: EdgeAnswer, retry_after: Duration) -> Response<RelayBody> {
    if answer.status == StatusCode::SERVICE_UNAVAILABLE {
        unavailable(answer.text, retry_after)
    } else {
        plain(answer.status, answer.text)
    }
}
