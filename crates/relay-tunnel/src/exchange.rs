//! The exchange stream, both ends: the edge opens one per webhook or WebSocket session and
//! sends its [`ExchangeHead`]; the agent accepts it, reads the head, and answers with an
//! [`relay_proto::HttpReply`] or a [`relay_proto::WsReply`]. What follows the answer (body
//! bytes, WebSocket frames) is [`crate::body`]'s and [`crate::websocket`]'s.
//!
//! A malformed frame resets this stream only, with [`code::MALFORMED_FRAME`]; the connection
//! and every other exchange on it carry on.

use std::time::Duration;

use bincode::Decode;
use http::{HeaderMap, StatusCode};
use relay_proto::headers::{from_wire, strip_hop_by_hop};
use relay_proto::{ExchangeHead, FailureKind, ResponseHead, code};
use relay_transport::{BiStream, FrameReadError, FrameWriteError, RecvHalf, SendHalf};
use tokio::io::AsyncWriteExt;

use crate::{read_head, write_head};

/// Sends an exchange's head on a stream the edge just opened.
pub async fn send_head(stream: &mut BiStream, head: &ExchangeHead) -> Result<(), FrameWriteError> {
    write_head(&mut stream.send, head).await
}

/// Why the edge has no usable answer from the agent.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The stream or the connection ended before an answer.
    #[error("agent stream ended before an answer")]
    Ended,
    /// The answer did not decode or broke the head limit; the stream was stopped.
    #[error("malformed answer from agent: {0}")]
    Malformed(String),
    /// No answer in time; the stream was stopped.
    #[error("no answer from agent within {0:?}")]
    Timeout(Duration),
}

impl ReplyError {
    /// What the edge answers its client: `502` when the agent failed, `504` when it was late.
    pub fn answer(&self) -> EdgeAnswer {
        match self {
            ReplyError::Ended => EdgeAnswer { status: StatusCode::BAD_GATEWAY, text: "agent lost before answering" },
            ReplyError::Malformed(_) => {
                EdgeAnswer { status: StatusCode::BAD_GATEWAY, text: "invalid response from agent" }
            }
            ReplyError::Timeout(_) => EdgeAnswer { status: StatusCode::GATEWAY_TIMEOUT, text: "no answer in time" },
        }
    }
}

/// A status and a one-line text for an answer the edge makes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeAnswer {
    /// The status code.
    pub status: StatusCode,
    /// The plain-text body.
    pub text: &'static str,
}

/// What the edge answers when the agent reports a failure: the failure's class decides.
pub fn failure_answer(kind: FailureKind) -> EdgeAnswer {
    match kind {
        FailureKind::BotTimeout => {
            EdgeAnswer { status: StatusCode::GATEWAY_TIMEOUT, text: "bot did not answer in time" }
        }
        FailureKind::Draining => EdgeAnswer { status: StatusCode::SERVICE_UNAVAILABLE, text: "agent draining" },
        FailureKind::BotUnreachable | FailureKind::InvalidRequest => {
            EdgeAnswer { status: StatusCode::BAD_GATEWAY, text: "bot unreachable" }
        }
    }
}

/// Reads the agent's answer (an [`relay_proto::HttpReply`] or a [`relay_proto::WsReply`]),
/// waiting at most `timeout`. A malformed answer stops the stream with
/// [`code::MALFORMED_FRAME`], a late one with [`code::ABORTED`].
pub async fn read_reply<T: Decode<()>>(recv: &mut Box<dyn RecvHalf>, timeout: Duration) -> Result<T, ReplyError> {
    match tokio::time::timeout(timeout, read_head::<T, _>(recv)).await {
        Ok(Ok(Some(reply))) => Ok(reply),
        Ok(Ok(None) | Err(FrameReadError::Io(_))) => Err(ReplyError::Ended),
        Ok(Err(FrameReadError::Decode(e))) => {
            recv.stop(code::MALFORMED_FRAME);
            Err(ReplyError::Malformed(e.to_string()))
        }
        Err(_) => {
            recv.stop(code::ABORTED);
            Err(ReplyError::Timeout(timeout))
        }
    }
}

/// The status and headers of a response head from the wire, hop-by-hop headers removed; `None`
/// when the status or a header is invalid.
pub fn response_parts(head: ResponseHead) -> Option<(StatusCode, HeaderMap)> {
    let status = StatusCode::from_u16(head.status).ok()?;
    let mut headers = from_wire(head.headers).ok()?;
    strip_hop_by_hop(&mut headers);
    Some((status, headers))
}

/// Why the agent could not take an exchange off a stream the edge opened.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The head did not decode or broke the head limit; the stream was reset.
    #[error("malformed exchange head from the edge: {0}; stream reset")]
    Malformed(String),
    /// No head in time; the stream was reset.
    #[error("no exchange head within {0:?}; stream reset")]
    Timeout(Duration),
    /// The stream failed before its head.
    #[error("exchange stream failed before its head: {0}")]
    Failed(String),
}

/// Reads the head of an exchange the edge opened, waiting at most `timeout`. `Ok(None)`: the
/// edge finished the stream without sending one (it gave up before it began).
pub async fn accept(mut stream: BiStream, timeout: Duration) -> Result<Option<(ExchangeHead, BiStream)>, AcceptError> {
    let head = tokio::time::timeout(timeout, read_head::<ExchangeHead, _>(&mut stream.recv)).await;
    match head {
        Ok(Ok(Some(head))) => Ok(Some((head, stream))),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(FrameReadError::Decode(e))) => {
            reset(&mut stream, code::MALFORMED_FRAME);
            Err(AcceptError::Malformed(e.to_string()))
        }
        Ok(Err(FrameReadError::Io(e))) => Err(AcceptError::Failed(e.to_string())),
        Err(_) => {
            reset(&mut stream, code::ABORTED);
            Err(AcceptError::Timeout(timeout))
        }
    }
}

/// Abandons an exchange both ways with `code`.
pub fn reset(stream: &mut BiStream, code: u32) {
    stream.recv.stop(code);
    stream.send.reset(code);
}

/// Sends the agent's answer; a body or WebSocket frames may follow.
pub async fn reply<T: bincode::Encode>(send: &mut Box<dyn SendHalf>, reply: &T) -> Result<(), FrameWriteError> {
    write_head(send, reply).await
}

/// Sends an answer that ends the exchange (a failure, a refused upgrade) and finishes the
/// stream. Errors are ignored: the edge has gone, and has nobody left to tell.
pub async fn reply_final<T: bincode::Encode>(send: &mut Box<dyn SendHalf>, answer: &T) {
    if write_head(send, answer).await.is_ok() {
        let _ = send.shutdown().await;
    }
}
