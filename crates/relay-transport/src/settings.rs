//! Tunnel settings both transports share: liveness, handshake and stream limits, flow-control
//! windows.

use std::time::Duration;

/// A peer silent this long is gone, and its connection closed with every exchange on it. This is
/// how the edge notices an agent that died without a word (SIGKILL, a node lost, a cable pulled):
/// until then it would keep routing new calls to it. ACS media flows every 20 ms, so a call that
/// hears nothing for 5 s is lost anyway; with a keep-alive every second, 5 s is five missed
/// keep-alives in a row, which ordinary loss does not produce.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Keep-alives well under the idle timeout (a fifth), so an idle but live tunnel never times out,
/// and NAT bindings on the agent's egress path stay open. One tiny packet a second each way per
/// connection costs nothing.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long a handshake may take (QUIC + TLS, or TCP + TLS + HTTP/2). A loopback handshake takes about a millisecond and an
/// intercontinental one a few hundred; 10 s leaves room for loss and retransmission.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams the edge may have open to one agent at once: one per webhook in flight or call in
/// progress. Far above the 1,000 concurrent calls an agent is sized for, so it is never the limit
/// in practice, while still bounding what one connection can hold.
pub const DEFAULT_MAX_EXCHANGE_STREAMS: u32 = 4096;

/// Streams an agent may open to the edge at once: the control stream and one pairing stream;
/// a small number guards the edge against a misbehaving agent.
pub(crate) const MAX_AGENT_INITIATED_STREAMS: u32 = 8;

/// Bytes one stream may have in flight towards its reader. A media call needs a few KiB; a
/// webhook body streams at up to ~80 Mbit/s per stream on a 100 ms path with 1 MiB; quinn's
/// default (1.25 MB) is about the same, named here so it is a decision.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes all streams of one connection together may have in flight towards their readers. Quinn
/// leaves this unbounded, so a peer could make the other side buffer up to a full stream window
/// on each of thousands of streams; 16 MiB bounds that while leaving room for ~1.3 Gbit/s at a
/// 100 ms round trip.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Which congestion controller paces each QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR, the default. The tunnel carries many small real-time flows whose rate is set by the
    /// callers (50 frames a second per call), and the links it crosses lose packets for reasons
    /// that are not congestion (Wi-Fi, busy NATs). A loss-based controller reads every loss as
    /// congestion: measured through the test kit's impairment proxy at 5% random loss and
    /// 100 ms round trip, CUBIC collapsed to a few dozen frames a second for 20 calls and media
    /// queued for tens of seconds; BBR paces by measured bandwidth and RTT and carries them.
    #[default]
    Bbr,
    /// CUBIC, quinn's own default, kept for comparison and for networks where BBR misbehaves.
    Cubic,
}

/// Tunnel transport settings shared by both ends and both transports (the congestion
/// controller applies to QUIC only: TCP's is the kernel's).
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`DEFAULT_KEEP_ALIVE`].
    pub keep_alive: Duration,
    /// See [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// See [`DEFAULT_MAX_EXCHANGE_STREAMS`].
    pub max_exchange_streams: u32,
    /// See [`Congestion`].
    pub congestion: Congestion,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_exchange_streams: DEFAULT_MAX_EXCHANGE_STREAMS,
            congestion: Congestion::default(),
        }
    }
}
