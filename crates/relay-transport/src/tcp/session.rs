//! What the session stream carries: the one stream of a TLS/TCP tunnel connection that is not an
//! exchange, opened by the edge first, on which the agent asks for streams and either side
//! says it is closing and why.

use bincode::{Decode, Encode};

/// Largest session message: a close reason is a short sentence.
pub(super) const SESSION_FRAME_LIMIT: usize = 4 * 1024;

/// What the TLS/TCP transport's session stream carries. QUIC has these in the transport itself
/// (either side opens streams; a close carries a code and a reason); HTTP/2, which the TCP
/// transport multiplexes with, lets only the edge open streams and has no close reason, so the
/// transport carries them here, below the tunnel protocol. The tunnel code never sees them.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum SessionMessage {
    /// Agent to edge: open a stream for me. The edge opens one marked as the agent's, which the
    /// agent's `open_bi` returns and the edge's `accept_bi` yields.
    Open,
    /// Either way: the connection is closing with this application code and reason.
    Close {
        /// One of [`relay_proto::code`].
        code: u32,
        /// A short, human-readable reason.
        reason: String,
    },
}
