//! The pairing stream, both ends: on a connection with the pairing ALPN the agent opens one
//! stream, sends one [`PairRequest`] and finishes; the edge answers with one [`PairResponse`].
//! Whether to issue is the edge's business (relay-pki's, through the edge); this module only
//! carries the two messages and ends the connection cleanly either way.

use std::sync::Arc;
use std::time::Duration;

use relay_proto::{PairRequest, PairResponse, code};
use relay_transport::{BiStream, FrameReadError, TunnelConnection};
use tokio::io::AsyncWriteExt;

use crate::{read_head, write_head};

/// Why the edge got no pairing request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The connection or stream ended without a request.
    #[error("no pairing request: {0}")]
    Lost(String),
    /// The request did not decode or broke the head limit (the connection is closed).
    #[error("bad pairing request: {0}")]
    Malformed(String),
    /// No request in time (the connection is closed).
    #[error("no pairing request within {0:?}")]
    Timeout(Duration),
}

/// The edge's end of a pairing connection, holding the stream to answer on.
pub struct PairingAnswer {
    conn: Arc<dyn TunnelConnection>,
    stream: BiStream,
}

impl std::fmt::Debug for PairingAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingAnswer").field("remote", &self.conn.remote_addr()).finish_non_exhaustive()
    }
}

/// Waits up to `timeout` for the agent's request. A connection that sends something else, or
/// nothing in time, is closed with [`code::PROTOCOL_VIOLATION`].
pub async fn read_request(
    conn: &Arc<dyn TunnelConnection>,
    timeout: Duration,
) -> Result<(PairingAnswer, PairRequest), ServeError> {
    let request = tokio::time::timeout(timeout, async {
        let mut stream = conn.accept_bi().await.map_err(|e| ServeError::Lost(e.0))?;
        match read_head::<PairRequest, _>(&mut stream.recv).await {
            Ok(Some(request)) => Ok((PairingAnswer { conn: conn.clone(), stream }, request)),
            Ok(None) => Err(ServeError::Lost("the agent finished the stream".into())),
            Err(FrameReadError::Io(e)) => Err(ServeError::Lost(e.to_string())),
            Err(FrameReadError::Decode(e)) => Err(ServeError::Malformed(e.to_string())),
        }
    })
    .await
    .unwrap_or(Err(ServeError::Timeout(timeout)));
    match &request {
        Err(ServeError::Malformed(_) | ServeError::Lost(_)) => {
            conn.close(code::PROTOCOL_VIOLATION, "bad pairing request")
        }
        Err(ServeError::Timeout(_)) => conn.close(code::PROTOCOL_VIOLATION, "pairing timeout"),
        Ok(_) => {}
    }
    request
}

impl PairingAnswer {
    /// Sends the answer, lets the agent read it and close first (closing at once could discard
    /// it), waiting at most `linger`, then closes the connection.
    pub async fn send(mut self, response: &PairResponse, linger: Duration) {
        if write_head(&mut self.stream.send, response).await.is_ok() {
            let _ = self.stream.send.shutdown().await;
            let _ = tokio::time::timeout(linger, self.conn.closed()).await;
        }
        self.conn.close(code::OK, "pairing done");
    }
}

/// Why the agent got no answer to its pairing request.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// The stream or connection failed.
    #[error("{0}")]
    Stream(String),
    /// The edge closed without answering.
    #[error("the edge closed without answering")]
    Unanswered,
    /// The answer did not decode.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// No answer in time.
    #[error("the edge did not answer in time")]
    Timeout,
}

/// Sends `request` on a new stream and waits up to `timeout` for the edge's answer; closes the
/// connection either way.
pub async fn redeem(
    conn: &Arc<dyn TunnelConnection>,
    request: &PairRequest,
    timeout: Duration,
) -> Result<PairResponse, RedeemError> {
    let exchange = async {
        let mut stream = conn.open_bi().await.map_err(|e| RedeemError::Stream(e.to_string()))?;
        write_head(&mut stream.send, request).await.map_err(|e| RedeemError::Stream(e.to_string()))?;
        let _ = stream.send.shutdown().await;
        match read_head::<PairResponse, _>(&mut stream.recv).await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(RedeemError::Unanswered),
            Err(FrameReadError::Io(e)) => Err(RedeemError::Stream(e.to_string())),
            Err(FrameReadError::Decode(e)) => Err(RedeemError::Malformed(e.to_string())),
        }
    };
    let response = tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(RedeemError::Timeout));
    conn.close_and_flush(code::OK, "paired").await;
    response
}
