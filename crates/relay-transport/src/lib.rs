//! acs-relay tunnel transport.
//!
//! This crate owns how edge and agent reach each other: the rustls configurations of both sides
//! (mutual TLS for the tunnel, a CA-pinned client for pairing), the quinn endpoints and their
//! transport settings, and the small seam — [`TunnelConnection`] with its stream halves — that
//! the tunnel code above programs against, so it never branches on the transport. QUIC is the
//! first implementation; a TLS-over-TCP one can sit behind the same seam. It also owns reading
//! and writing [`relay_proto`] frames on those streams.

pub mod frames;
pub mod quic;
pub mod seam;
pub mod tls;

pub use frames::{FrameReadError, FrameReader, FrameWriteError, read_frame, write_frame};
pub use quic::{
    Congestion, DialError, HandshakeError, IncomingTunnel, PeerKind, QuicListener, QuicSettings, dial_pairing,
    dial_tunnel, host_of,
};
pub use seam::{BiStream, BoxFuture, ConnectionLost, RecvHalf, SendHalf, TunnelConnection};
pub use tls::{PinCheck, TlsError};
