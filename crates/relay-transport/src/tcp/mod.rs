//! The TLS/TCP implementation of the seam, for paths where UDP cannot pass (Azure Container Apps
//! ingress, egress firewalls that drop UDP): the edge's TCP listener, the agent's dialers, and
//! the connection both sides run over TLS 1.3 with the same certificates, verifiers and ALPNs as
//! QUIC.
//!
//! # Multiplexing: HTTP/2
//!
//! Streams are HTTP/2 streams (the `h2` crate, from the hyper project). HTTP/2 gives each stream
//! its own flow-control window, so a call whose reader stalls cannot hold up another, and it
//! resets a stream with a code, so a body cut short is an error to the reader and never a clean
//! end. yamux, the other maintained multiplexer, turns a reset into end-of-file and finishes a
//! dropped stream cleanly when the peer already finished; the exchange protocol ends HTTP bodies
//! by finishing the stream, so a truncated body would pass as whole.
//!
//! The agent dials (it is the TLS client) but serves HTTP/2, and the edge is the HTTP/2 client:
//! the edge opens exchange streams as with QUIC, one request each, whose body carries the edge's
//! bytes and whose response body carries the agent's. The agent opens streams (its control and
//! pairing streams) by asking over a *session stream*, the first stream the edge opens; the
//! session stream also carries the close code and reason, which HTTP/2 has no place for. The
//! tunnel code above the seam sees neither.
//!
//! Two differences from QUIC remain visible, and the code above is written for both: a reset ends
//! a stream in both directions (HTTP/2 has no half-reset), and stopping a stream's receiving half
//! is not signalled until the stream ends (HTTP/2 has no STOP_SENDING).
//!
//! What HTTP/2 over TCP cannot remove is head-of-line blocking below the streams: one lost TCP
//! segment holds every stream's later bytes until it is retransmitted (a round trip or more),
//! where QUIC delays only the stream whose packet was lost. That is why QUIC stays the default
//! and TCP is the fallback.

//!
//! # Layout
//!
//! [`session`] is what the session stream carries; `connection` is the connection both sides
//! run (its end, its streams, its keep-alives); `establish` starts HTTP/2 on a new TLS
//! connection, each side its own way; [`TcpTunnelListener`] accepts on the edge, and `dial`
//! dials from the agent (through [`crate::dial_tunnel`] and [`crate::dial_pairing`]).

use std::time::Duration;

use crate::settings::{CONNECTION_RECEIVE_WINDOW, STREAM_RECEIVE_WINDOW};

mod connection;
mod dial;
mod establish;
mod listener;
pub mod session;

pub(crate) use dial::connect;
pub use listener::{IncomingTcp, TcpTunnelListener};

/// Path of the session stream.
pub(crate) const SESSION_PATH: &str = "/session";
/// Path of a stream the edge opens for itself (an exchange).
pub(crate) const EDGE_STREAM_PATH: &str = "/stream";
/// Path of a stream the edge opens because the agent asked for one.
pub(crate) const AGENT_STREAM_PATH: &str = "/agent-stream";

/// How long a stream this side stopped reading keeps accepting (and discarding) the peer's bytes
/// so that what this side wrote is still delivered (see `h2stream::linger`). Matches the time a
/// WebSocket close handshake is given.
pub(crate) const STREAM_LINGER: Duration = Duration::from_secs(5);

/// HTTP/2 settings for both ends: the same windows as QUIC, so a stream carries as much in flight
/// over either transport.
pub(crate) fn h2_windows() -> (u32, u32) {
    (STREAM_RECEIVE_WINDOW, CONNECTION_RECEIVE_WINDOW)
}
