//! acs-relay exchange plumbing shared by both ends of the tunnel.
//!
//! This crate owns moving one exchange's payload across a tunnel stream once the head frames
//! are settled: streaming HTTP bodies between hyper and a stream without holding them whole
//! ([`body`]), and pumping WebSocket messages between a tokio-tungstenite socket and a stream
//! with backpressure in both directions ([`websocket`]). The edge and the agent use the same
//! code, so the two ends cannot drift apart.

pub mod body;
pub mod websocket;

/// The largest WebSocket message relayed by default. ACS media frames are about 1 KiB of JSON
/// (20 ms of 16 kHz PCM, base64); 1 MiB leaves room for any bot-side payload while bounding
/// what one message can make either side buffer. tungstenite's own default is 64 MiB.
pub const DEFAULT_MAX_WS_MESSAGE: usize = 1024 * 1024;

/// How long a closing WebSocket waits for the other side's close before giving up. RFC 6455
/// leaves it to the implementation; 5 s is far above any round trip and short enough that a
/// vanished peer does not hold resources.
pub const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(5);
