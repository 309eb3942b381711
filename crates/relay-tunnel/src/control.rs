//! The control stream, both ends: the agent opens it right after the handshake and greets; the
//! edge reads the hello and welcomes; afterwards the agent announces drains and asks for
//! certificate renewals on it, and the edge confirms and answers.
//!
//! A peer that breaks the control protocol (no hello, a garbage frame, a frame over the head
//! limit) gets its whole connection closed with [`code::PROTOCOL_VIOLATION`]: without a working
//! control stream the connection is of no use.

use std::sync::Arc;
use std::time::Duration;

use relay_proto::{ControlMessage, Hello, RenewOutcome, code};
use relay_transport::{BiStream, FrameReadError, FrameReader, FrameWriteError, TunnelConnection};

use crate::write_head;

/// What the edge says when it accepts an agent's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The name the edge knows the agent by (from its certificate).
    pub agent_name: String,
    /// The edge's software version, for logs.
    pub software_version: String,
    /// The edge process's instance id.
    pub edge_instance: String,
}

impl From<Welcome> for ControlMessage {
    fn from(w: Welcome) -> Self {
        ControlMessage::Welcome {
            agent_name: w.agent_name,
            software_version: w.software_version,
            edge_instance: w.edge_instance,
        }
    }
}

/// Why the agent's greeting failed.
#[derive(Debug, thiserror::Error)]
pub enum GreetError {
    /// The connection ended before the control stream opened or the welcome came.
    #[error("the connection ended: {0}")]
    Lost(String),
    /// The edge answered with something other than a welcome (the connection is closed).
    #[error("the edge did not welcome us")]
    NotWelcomed,
    /// The edge's answer did not decode (the connection is closed).
    #[error("the edge sent a malformed welcome: {0}")]
    Malformed(String),
    /// No welcome within the timeout (the connection is closed).
    #[error("no welcome from the edge within {0:?}")]
    Timeout(Duration),
}

/// Why the edge did not get a hello.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The connection ended before the hello.
    #[error("the connection ended before its hello: {0}")]
    Lost(String),
    /// The first control message was not a hello, or did not decode (the connection is closed).
    #[error("expected a hello: {0}")]
    Violation(String),
    /// No hello within the timeout (the connection is closed).
    #[error("no hello within {0:?}")]
    Timeout(Duration),
}

/// Why a control-stream request from the agent got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control stream or the connection failed.
    #[error("control stream failed: {0}")]
    Stream(String),
    /// The edge did not answer within the timeout.
    #[error("no answer from the edge within {0:?}")]
    Timeout(Duration),
    /// The edge answered with a message that does not answer the request.
    #[error("unexpected control message: {0}")]
    Unexpected(String),
}

impl From<FrameWriteError> for ControlError {
    fn from(e: FrameWriteError) -> Self {
        ControlError::Stream(e.to_string())
    }
}

impl From<FrameReadError> for ControlError {
    fn from(e: FrameReadError) -> Self {
        ControlError::Stream(e.to_string())
    }
}

/// The agent's end of the control stream, once welcomed.
#[derive(Debug)]
pub struct AgentControl {
    stream: BiStream,
    reader: FrameReader,
}

/// Opens the control stream on a new connection, says `hello`, and waits up to `timeout` for the
/// edge's welcome. A connection that does not end in a welcome is closed.
pub async fn greet(
    conn: &Arc<dyn TunnelConnection>,
    hello: Hello,
    timeout: Duration,
) -> Result<(AgentControl, Welcome), GreetError> {
    let greeting = tokio::time::timeout(timeout, async {
        let mut stream = conn.open_bi().await.map_err(|e| GreetError::Lost(e.0))?;
        write_head(&mut stream.send, &ControlMessage::Hello(hello)).await.map_err(|e| lost_or(conn, e))?;
        let mut reader = FrameReader::new(crate::HEAD_LIMIT);
        match reader.next::<ControlMessage, _>(&mut stream.recv).await {
            Ok(Some(ControlMessage::Welcome { agent_name, software_version, edge_instance })) => {
                Ok((AgentControl { stream, reader }, Welcome { agent_name, software_version, edge_instance }))
            }
            Ok(Some(_)) => Err(GreetError::NotWelcomed),
            Ok(None) | Err(FrameReadError::Io(_)) => Err(GreetError::Lost(closed_reason_now(conn))),
            Err(FrameReadError::Decode(e)) => Err(GreetError::Malformed(e.to_string())),
        }
    })
    .await
    .unwrap_or(Err(GreetError::Timeout(timeout)));
    match &greeting {
        Err(GreetError::NotWelcomed | GreetError::Malformed(_)) => {
            conn.close(code::PROTOCOL_VIOLATION, "expected welcome")
        }
        Err(GreetError::Timeout(_)) => conn.close(code::PROTOCOL_VIOLATION, "no welcome"),
        _ => {}
    }
    greeting
}

fn lost_or(conn: &Arc<dyn TunnelConnection>, e: FrameWriteError) -> GreetError {
    match e {
        FrameWriteError::Io(_) => GreetError::Lost(closed_reason_now(conn)),
        FrameWriteError::Encode(e) => GreetError::Malformed(e.to_string()),
    }
}

/// Why the connection ended, if it has; the edge usually closes with a reason when it refuses.
fn closed_reason_now(conn: &Arc<dyn TunnelConnection>) -> String {
    futures_util::FutureExt::now_or_never(conn.closed())
        .map_or_else(|| "the stream ended, the connection is still open".to_owned(), |lost| lost.0)
}

impl AgentControl {
    /// Tells the edge to send nothing new on this connection and waits up to `timeout` for its
    /// confirmation; until it comes the edge may still open an exchange here.
    pub async fn drain(&mut self, timeout: Duration) -> Result<(), ControlError> {
        write_head(&mut self.stream.send, &ControlMessage::Drain).await?;
        self.answer(timeout, |msg| matches!(msg, ControlMessage::Drained).then_some(())).await
    }

    /// Asks the edge to sign a certificate for a new key and waits up to `timeout` for its answer.
    pub async fn renew(&mut self, csr_der: Vec<u8>, timeout: Duration) -> Result<RenewOutcome, ControlError> {
        write_head(&mut self.stream.send, &ControlMessage::Renew { csr_der }).await?;
        self.answer(timeout, |msg| match msg {
            ControlMessage::Renewed(outcome) => Some(outcome),
            _ => None,
        })
        .await
    }

    /// Reads the answer `pick` recognises. A drain confirmation arriving while a renewal waits
    /// (or the reverse) cannot happen, since the agent asks one thing at a time; anything else is
    /// a broken edge.
    async fn answer<T>(
        &mut self,
        timeout: Duration,
        pick: impl Fn(ControlMessage) -> Option<T>,
    ) -> Result<T, ControlError> {
        let next = tokio::time::timeout(timeout, self.reader.next::<ControlMessage, _>(&mut self.stream.recv))
            .await
            .map_err(|_| ControlError::Timeout(timeout))??;
        let msg = next.ok_or_else(|| ControlError::Stream("the edge ended the control stream".into()))?;
        let shown = format!("{msg:?}");
        pick(msg).ok_or(ControlError::Unexpected(shown))
    }
}

/// What an agent asks on its control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRequest {
    /// Send no new exchanges to this connection; answer with [`EdgeControl::drained`].
    Drain,
    /// Sign this CSR; answer with [`EdgeControl::renewed`].
    Renew {
        /// A PKCS#10 CSR (DER) for the agent's new key.
        csr_der: Vec<u8>,
    },
    /// The agent ended its control stream: it is leaving and sends nothing more.
    Leaving,
    /// A message only the edge sends (named here); it changes nothing and is ignored, so an
    /// agent newer than the edge is not cut off for it.
    Ignored(&'static str),
}

/// How an agent's control stream ended, as the edge saw it.
#[derive(Debug, thiserror::Error)]
pub enum ControlEnd {
    /// The connection ended; the text is its reason.
    #[error("{0}")]
    Lost(String),
    /// The agent sent a frame that does not decode (the connection is closed).
    #[error("control protocol violation: {0}")]
    Violation(String),
}

/// The edge's end of an agent's control stream.
pub struct EdgeControl {
    conn: Arc<dyn TunnelConnection>,
    stream: BiStream,
    reader: FrameReader,
}

impl std::fmt::Debug for EdgeControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeControl").field("remote", &self.conn.remote_addr()).finish_non_exhaustive()
    }
}

/// Waits up to `timeout` for a new connection's control stream and its hello. A connection that
/// sends anything else, or nothing in time, is closed.
pub async fn accept_hello(
    conn: &Arc<dyn TunnelConnection>,
    timeout: Duration,
) -> Result<(EdgeControl, Hello), HelloError> {
    let hello = tokio::time::timeout(timeout, async {
        let mut stream = conn.accept_bi().await.map_err(|e| HelloError::Lost(e.0))?;
        let mut reader = FrameReader::new(crate::HEAD_LIMIT);
        match reader.next::<ControlMessage, _>(&mut stream.recv).await {
            Ok(Some(ControlMessage::Hello(hello))) => Ok((EdgeControl { conn: conn.clone(), stream, reader }, hello)),
            Ok(Some(_)) => Err(HelloError::Violation("first control message was not a hello".into())),
            Ok(None) | Err(FrameReadError::Io(_)) => Err(HelloError::Lost(closed_reason_now(conn))),
            Err(FrameReadError::Decode(e)) => Err(HelloError::Violation(e.to_string())),
        }
    })
    .await
    .unwrap_or(Err(HelloError::Timeout(timeout)));
    match &hello {
        Err(HelloError::Violation(_)) => conn.close(code::PROTOCOL_VIOLATION, "expected hello"),
        Err(HelloError::Timeout(_)) => conn.close(code::PROTOCOL_VIOLATION, "hello timeout"),
        _ => {}
    }
    hello
}

impl EdgeControl {
    /// Accepts the agent: the edge may open exchange streams once this is sent.
    pub async fn welcome(&mut self, welcome: Welcome) -> Result<(), FrameWriteError> {
        write_head(&mut self.stream.send, &ControlMessage::from(welcome)).await
    }

    /// The agent's next request. Cancel-safe, so it can sit in a `select!` beside shutdown.
    pub async fn next(&mut self) -> Result<AgentRequest, ControlEnd> {
        match self.reader.next::<ControlMessage, _>(&mut self.stream.recv).await {
            Ok(Some(ControlMessage::Drain)) => Ok(AgentRequest::Drain),
            Ok(Some(ControlMessage::Renew { csr_der })) => Ok(AgentRequest::Renew { csr_der }),
            Ok(Some(other)) => Ok(AgentRequest::Ignored(message_name(&other))),
            Ok(None) => Ok(AgentRequest::Leaving),
            // The stream failed because the connection did: report the connection's reason.
            Err(FrameReadError::Io(_)) => Err(ControlEnd::Lost(self.conn.closed().await.0)),
            Err(FrameReadError::Decode(e)) => Err(self.violation(e.to_string())),
        }
    }

    fn violation(&self, why: String) -> ControlEnd {
        self.conn.close(code::PROTOCOL_VIOLATION, "bad control frame");
        ControlEnd::Violation(why)
    }

    /// Confirms a drain: nothing new goes to this connection from now on.
    pub async fn drained(&mut self) -> Result<(), FrameWriteError> {
        write_head(&mut self.stream.send, &ControlMessage::Drained).await
    }

    /// Answers a renewal.
    pub async fn renewed(&mut self, outcome: RenewOutcome) -> Result<(), FrameWriteError> {
        write_head(&mut self.stream.send, &ControlMessage::Renewed(outcome)).await
    }
}

fn message_name(msg: &ControlMessage) -> &'static str {
    match msg {
        ControlMessage::Hello(_) => "a second hello",
        ControlMessage::Welcome { .. } => "a welcome",
        ControlMessage::Drain => "a drain",
        ControlMessage::Renew { .. } => "a renewal",
        ControlMessage::Renewed(_) => "a renewal answer",
        ControlMessage::Drained => "a drain confirmation",
    }
}
