//! The acs-relay wire protocol between `relay-edge` and `relay-agent`.
//!
//! This crate owns the message types that cross the tunnel, the bounded length-prefixed
//! bincode codec that carries them, the ALPN and version constants, the stream reset codes, and
//! the header rules every hop applies (hop-by-hop removal, wire conversion). It does no I/O and
//! reads no clock: everything here is a pure function of its input, so it is tested exhaustively
//! without sockets.
//!
//! # Streams
//!
//! * **Control stream** (opened by the agent right after the handshake): [`ControlMessage`]s.
//! * **Exchange stream** (opened by the edge, one per webhook or WebSocket session): an
//!   [`ExchangeHead`] frame, then
//!   * HTTP: raw request body bytes until the edge finishes its side; the agent answers with an
//!     [`HttpReply`] frame and then raw response body bytes until it finishes;
//!   * WebSocket: the agent answers with a [`WsReply`] frame; then both sides send [`WsFrame`]s.
//! * **Pairing stream** (on a connection with [`PAIRING_ALPN`]): one [`PairRequest`], one
//!   [`PairResponse`].
//!
//! The TLS/TCP transport has one more stream below these, its session stream, which is the
//! transport's own (`relay_transport::tcp::session`): the tunnel never sees it.

pub mod codec;
pub mod headers;
pub mod messages;

pub use codec::{DecodeError, EncodeError, FrameDecoder, decode_payload, encode_frame};
pub use headers::{HeaderError, HeaderList};
pub use messages::*;

/// ALPN of the tunnel. A protocol change that old peers cannot read gets a new ALPN, so a
/// mismatched edge and agent fail the handshake with a clear "no application protocol" error.
/// Version 2: the welcome names the edge instance, so an agent can reach every replica behind
/// one address.
pub const TUNNEL_ALPN: &[u8] = b"acs-relay/2";

/// ALPN of the pairing exchange, served on the same address as the tunnel. Connections with this
/// ALPN need no client certificate and may only redeem a pairing token.
pub const PAIRING_ALPN: &[u8] = b"acs-relay-pair/1";

/// Version of the messages inside [`TUNNEL_ALPN`], sent in the agent's hello for diagnostics.
pub const PROTOCOL_VERSION: u32 = 2;

/// Hello label: this agent process's instance id, random per start. A connection from the same
/// agent name with another instance comes from a restarted process.
pub const LABEL_AGENT_INSTANCE: &str = "instance";

/// Hello label: the edge instances this agent process already holds a connection to, comma
/// separated. An edge that finds itself listed knows the new connection is a probe the agent
/// will close (it dials one address until it has found every replica behind it); otherwise the
/// new connection supersedes the agent's older ones to this edge, which are stale.
pub const LABEL_HOLDS: &str = "holds";

/// Hello label: the edge instance whose connection this one replaces (the agent's previous
/// connection to it was lost, or is moving from TCP to QUIC). That edge retires the agent's
/// older connections at once, even those of the same agent process, and does not take the new
/// connection for a probe although the instance is listed in `holds`.
pub const LABEL_REPLACES: &str = "replaces";

/// Hello label: this connection's id, random per connection, so that a later connection can
/// name exactly the one it replaces.
pub const LABEL_CONNECTION: &str = "connection";

/// Hello label, with [`LABEL_REPLACES`]: the id ([`LABEL_CONNECTION`]) of the connection being
/// replaced. The edge then retires that one of the agent process's connections and no other: a
/// connection the same process made meanwhile (another of its links reached the same edge
/// first) stays. Without it (agents before this label), every connection of the process goes.
pub const LABEL_REPLACES_CONNECTION: &str = "replaces_connection";

/// Application error codes used to reset a stream or close a connection.
pub mod code {
    /// Normal end; nothing went wrong.
    pub const OK: u32 = 0;
    /// The peer sent a frame that does not decode or breaks a limit; only this stream is reset.
    pub const MALFORMED_FRAME: u32 = 0x10;
    /// The sending side gave up on the exchange (its client went away, a limit was hit).
    pub const ABORTED: u32 = 0x11;
    /// The exchange was refused because a limit was reached.
    pub const REFUSED: u32 = 0x12;
    /// Connection closed: the agent presented no certificate on the tunnel ALPN.
    pub const CERTIFICATE_REQUIRED: u32 = 0x20;
    /// Connection closed: the agent's certificate names no known, paired agent.
    pub const UNKNOWN_AGENT: u32 = 0x21;
    /// Connection closed: the peer violated the control protocol.
    pub const PROTOCOL_VIOLATION: u32 = 0x22;
    /// Connection closed: the process is shutting down.
    pub const SHUTDOWN: u32 = 0x23;
    /// Connection closed: the agent was revoked, or its certificate is no longer accepted.
    pub const REVOKED: u32 = 0x24;
}
