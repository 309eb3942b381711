//! acs-relay tunnel transport.
//!
//! This crate owns how edge and agent reach each other: the rustls configurations of both sides
//! (mutual TLS for the tunnel, a CA-pinned client for pairing), the two transports — QUIC (quinn)
//! and, where UDP cannot pass, TLS over TCP with HTTP/2 streams (h2) — and the small seam,
//! [`TunnelConnection`] with its stream halves, that the tunnel code above programs against, so it
//! never branches on the transport. It also owns reading and writing [`relay_proto`] frames on
//! those streams.

pub mod frames;
mod h2stream;
pub mod listener;
pub mod memory;
pub mod peer;
pub mod quic;
pub mod seam;
pub mod settings;
pub mod tcp;
pub mod throttle;
pub mod tls;

pub use frames::{FrameReadError, FrameReader, FrameWriteError, read_frame, write_frame};
pub use listener::{IncomingTunnel, TcpListen, Transport, TransportChoice, TunnelListener, dial_pairing, dial_tunnel};
pub use peer::{DialError, HandshakeError, PeerKind};
pub use quic::{QuicListener, host_of};
pub use seam::{BiStream, BoxFuture, ConnectionLost, RecvHalf, SendHalf, TunnelConnection};
pub use settings::{Congestion, TunnelSettings};
pub use throttle::{LogThrottle, Verdict};
pub use tls::{PinCheck, TlsError};
