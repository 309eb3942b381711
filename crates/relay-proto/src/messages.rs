//! The messages carried in frames, one type per stream role.

use bincode::{Decode, Encode};

use crate::HeaderList;

/// What an exchange stream carries after its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum ExchangeKind {
    /// A webhook: request body bytes, then the agent's [`HttpReply`] and response body bytes.
    Http,
    /// A WebSocket session: the agent's [`WsReply`], then [`WsFrame`]s both ways.
    WebSocket,
}

/// First frame of every exchange stream, written by the edge.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ExchangeHead {
    /// Edge-assigned id, unique per edge process, for correlating logs on both sides.
    pub request_id: u64,
    /// HTTP or WebSocket.
    pub kind: ExchangeKind,
    /// Request method as sent by the client (`GET`, `POST`, ...).
    pub method: String,
    /// Path and query exactly as received (`/api/callbacks/abc?x=1`).
    pub path_and_query: String,
    /// End-to-end request headers, hop-by-hop ones already removed, `X-Forwarded-*` added.
    pub headers: HeaderList,
    /// The client's address as the edge saw it (`ip:port`).
    pub client_addr: String,
    /// Key that keeps one call's exchanges on one agent (ACS correlation id), when known.
    pub affinity_key: Option<String>,
}

/// Status line and headers of an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ResponseHead {
    /// HTTP status code.
    pub status: u16,
    /// End-to-end response headers.
    pub headers: HeaderList,
}

/// Why the agent could not complete an exchange with the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum FailureKind {
    /// The bot refused or dropped the connection (the edge answers 502).
    BotUnreachable,
    /// The bot did not answer in time (the edge answers 504).
    BotTimeout,
    /// The request could not be turned into a valid request to the bot (the edge answers 502).
    InvalidRequest,
    /// The agent is shutting down and takes no new exchanges (the edge answers 503).
    Draining,
}

/// An exchange the agent could not complete, with a short reason for the edge's log.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Failure {
    /// The class of failure, which decides the edge's status code.
    pub kind: FailureKind,
    /// One line for the edge's log. Never contains secrets.
    pub detail: String,
}

/// The agent's answer on an HTTP exchange stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum HttpReply {
    /// The bot answered; its body follows as raw bytes until the agent finishes the stream.
    Response(ResponseHead),
    /// The bot could not be reached; nothing follows.
    Failed(Failure),
}

/// The agent's answer on a WebSocket exchange stream, sent once the bot's handshake is decided.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum WsReply {
    /// The bot accepted the upgrade; [`WsFrame`]s follow both ways.
    Accepted {
        /// The subprotocol the bot selected, if any.
        subprotocol: Option<String>,
        /// End-to-end headers of the bot's `101` response.
        headers: HeaderList,
    },
    /// The bot answered the upgrade with a non-101 status; the edge returns it to the client.
    Rejected {
        /// The bot's status and headers.
        head: ResponseHead,
        /// The bot's response body, truncated to the head frame limit.
        body: Vec<u8>,
    },
    /// The bot could not be reached.
    Failed(Failure),
}

/// A WebSocket close code and reason.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CloseFrame {
    /// The RFC 6455 close code.
    pub code: u16,
    /// The UTF-8 reason (at most 123 bytes on the wire).
    pub reason: String,
}

/// One WebSocket message relayed between the caller and the bot.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum WsFrame {
    /// A text message. The bytes are UTF-8; receivers check, and reset the stream if not.
    Text(Vec<u8>),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping with its payload.
    Ping(Vec<u8>),
    /// A pong with its payload.
    Pong(Vec<u8>),
    /// A close, with code and reason when the closing side gave one.
    Close(Option<CloseFrame>),
}

/// What the agent says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// The agent's name as the agent believes it (the edge trusts its certificate instead).
    pub agent_name: String,
    /// The agent's software version, for logs.
    pub software_version: String,
    /// [`crate::PROTOCOL_VERSION`] as the agent speaks it.
    pub protocol_version: u32,
    /// Optional features the agent supports, for forward compatibility.
    pub capabilities: Vec<String>,
    /// Free-form labels (`replica=bot-7`), shown in logs.
    pub labels: Vec<(String, String)>,
}

/// Messages on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ControlMessage {
    /// Agent → edge, first message: who is connecting.
    Hello(Hello),
    /// Edge → agent: hello accepted; the edge may now open exchange streams.
    Welcome {
        /// The name the edge knows this agent by (from its certificate).
        agent_name: String,
        /// The edge's software version, for logs.
        software_version: String,
        /// This edge process's instance id, random per start: replicas behind one address tell
        /// themselves apart by it.
        edge_instance: String,
    },
    /// Agent → edge: send no new exchanges; in-flight ones continue.
    Drain,
    /// Agent → edge: sign a certificate for this new key (same subject); answered by
    /// [`ControlMessage::Renewed`].
    Renew {
        /// A PKCS#10 CSR (DER) for the agent's freshly generated key.
        csr_der: Vec<u8>,
    },
    /// Edge → agent: the answer to [`ControlMessage::Renew`].
    Renewed(RenewOutcome),
    /// Edge → agent: the answer to [`ControlMessage::Drain`]: no new exchange goes to this
    /// connection from now on. An agent going away waits for it, so that no edge sends it a new
    /// exchange it would then cut.
    Drained,
}

/// The edge's answer to a renewal request.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum RenewOutcome {
    /// The new certificate (DER).
    Issued {
        /// The certificate.
        cert_der: Vec<u8>,
    },
    /// Refused (revoked, invalid CSR, edge failure), with a one-line reason.
    Refused(String),
}

/// Agent → edge on a pairing connection: redeem a token for a certificate.
#[derive(Clone, PartialEq, Eq, Encode, Decode)]
pub struct PairRequest {
    /// The token's public id.
    pub token_id: String,
    /// The token's secret, proving possession of the token.
    pub secret: Vec<u8>,
    /// A PKCS#10 CSR (DER) for the agent's locally generated key.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for PairRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairRequest")
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("csr_der_len", &self.csr_der.len())
            .finish()
    }
}

/// Why the edge refused a pairing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum PairRefusal {
    /// No token with that id exists (never issued, or already cleaned up).
    UnknownToken,
    /// The token existed but its time ran out.
    Expired,
    /// The token was already used.
    Spent,
    /// The secret does not match the token.
    BadSecret,
    /// The CSR did not parse or its signature is invalid.
    BadCsr,
    /// The edge failed internally (disk, signing); the token was not spent.
    Internal,
    /// Too many failed attempts from this address; try again later.
    RateLimited,
}

/// Edge → agent on a pairing connection.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum PairResponse {
    /// The signed certificate.
    Issued {
        /// The agent name the certificate was issued to.
        agent_name: String,
        /// The agent certificate (DER).
        cert_der: Vec<u8>,
        /// The pairing CA certificate (DER); the agent checks it against the token's pin.
        ca_der: Vec<u8>,
    },
    /// The request was refused.
    Refused(PairRefusal),
}
