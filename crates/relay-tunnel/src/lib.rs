//! The tunnel protocol's stream roles, both ends side by side.
//!
//! [`relay_proto`] says what the frames are; this crate says who sends which, when, and what
//! each end does when its peer breaks the rules, the way `h2` keeps its client and server beside
//! each other:
//!
//! * [`control`]: the agent greets, announces drains and asks for renewals; the edge welcomes,
//!   confirms and answers.
//! * [`exchange`]: the edge opens a stream per webhook or WebSocket session and reads the answer;
//!   the agent accepts the stream, reads its head and answers.
//! * [`pairing`]: the agent redeems a token; the edge serves the request.
//! * [`body`] and [`websocket`]: what follows an exchange's answer, the same code at both ends:
//!   HTTP bodies streamed without holding them whole, WebSocket messages pumped with
//!   backpressure both ways, and [`quality`]: each session's media quality, measured as it
//!   passes.
//!
//! Every head frame is bounded by [`HEAD_LIMIT`]. The binaries keep only policy (admission,
//! affinity, the agent set, forwarding to the bot, process life); everything here runs over any
//! [`relay_transport::TunnelConnection`], and is tested over an in-memory one.

pub mod body;
pub mod control;
pub mod exchange;
pub mod pairing;
pub mod quality;
pub mod websocket;

use relay_transport::{FrameReadError, FrameWriteError, read_frame, write_frame};
use tokio::io::{AsyncRead, AsyncWrite};

/// The largest head frame either end sends or accepts: exchange heads and answers, control and
/// pairing messages. See [`relay_proto::codec::DEFAULT_MAX_HEAD_LEN`] for why 64 KiB.
pub const HEAD_LIMIT: usize = relay_proto::codec::DEFAULT_MAX_HEAD_LEN;

/// Reads one head frame, bounded by [`HEAD_LIMIT`], consuming nothing after it.
pub(crate) async fn read_head<T, R>(recv: &mut R) -> Result<Option<T>, FrameReadError>
where
    T: bincode::Decode<()>,
    R: AsyncRead + Unpin + ?Sized,
{
    read_frame(recv, HEAD_LIMIT).await
}

/// Writes one head frame, bounded by [`HEAD_LIMIT`].
pub(crate) async fn write_head<T, W>(send: &mut W, msg: &T) -> Result<(), FrameWriteError>
where
    T: bincode::Encode,
    W: AsyncWrite + Unpin + ?Sized,
{
    write_frame(send, msg, HEAD_LIMIT).await
}

/// The largest WebSocket message relayed by default. ACS media frames are about 1 KiB of JSON
/// (20 ms of 16 kHz PCM, base64); 1 MiB leaves room for any bot-side payload while bounding
/// what one message can make either side buffer. tungstenite's own default is 64 MiB.
pub const DEFAULT_MAX_WS_MESSAGE: usize = 1024 * 1024;

/// How long a closing WebSocket waits for the other side's close before giving up. RFC 6455
/// leaves it to the implementation; 5 s is far above any round trip and short enough that a
/// vanished peer does not hold resources.
pub const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(5);
