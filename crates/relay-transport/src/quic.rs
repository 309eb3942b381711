//! The QUIC implementation of the seam: the edge's listener, the agent's dialers, and the
//! transport settings both use.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use relay_pki::{CaPin, agent_name_from_cert, cert_serial_hex};
use relay_proto::{PAIRING_ALPN, TUNNEL_ALPN, code};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::seam::{BiStream, BoxFuture, ConnectionLost, RecvHalf, SendHalf, TunnelConnection};
use crate::tls::{self, PinCheck, TlsError};

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

/// How long a QUIC + TLS handshake may take. A loopback handshake takes about a millisecond and an
/// intercontinental one a few hundred; 10 s leaves room for loss and retransmission.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams the edge may have open to one agent at once: one per webhook in flight or call in
/// progress. Far above the 1,000 concurrent calls an agent is sized for, so it is never the limit
/// in practice, while still bounding what one connection can hold.
pub const DEFAULT_MAX_EXCHANGE_STREAMS: u32 = 4096;

/// Streams an agent may open to the edge at once: the control stream and one pairing stream;
/// a small number guards the edge against a misbehaving agent.
const MAX_AGENT_INITIATED_STREAMS: u32 = 8;

/// How many later packets must be acknowledged before an unacknowledged one counts as lost.
/// QUIC's default of 3 (from TCP) assumes paths barely reorder; a tunnel carrying a thousand
/// frames a second across a path that jitters by a few milliseconds sees later packets overtake
/// earlier ones by dozens, and every such overtake became a spurious loss that shrank the
/// congestion window: measured with ±10 ms jitter and no loss at all, media queued for seconds.
/// Loss is still found by QUIC's time threshold (9/8 of the RTT), which reordering this small
/// never reaches.
pub const REORDER_PACKET_THRESHOLD: u32 = 100;

/// Bytes one stream may have in flight towards its reader. A media call needs a few KiB; a
/// webhook body streams at up to ~80 Mbit/s per stream on a 100 ms path with 1 MiB; quinn's
/// default (1.25 MB) is about the same, named here so it is a decision.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes all streams of one connection together may have in flight towards their readers. Quinn
/// leaves this unbounded, so a peer could make the other side buffer up to a full stream window
/// on each of thousands of streams; 16 MiB bounds that while leaving room for ~1.3 Gbit/s at a
/// 100 ms round trip.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Bytes this side keeps sent but unacknowledged across all streams (quinn's default is eight
/// stream windows); matched to the peer's connection window.
pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Which congestion controller paces each connection.
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

/// Transport settings shared by both ends.
#[derive(Debug, Clone)]
pub struct QuicSettings {
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

impl Default for QuicSettings {
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

impl QuicSettings {
    fn transport(&self, incoming_bidi: u32) -> TransportConfig {
        let mut transport = TransportConfig::default();
        // An idle timeout that does not fit QUIC's varint is clamped to the largest it allows.
        let idle = IdleTimeout::try_from(self.idle_timeout).unwrap_or(IdleTimeout::from(VarInt::MAX));
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .packet_threshold(REORDER_PACKET_THRESHOLD)
            .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
            .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
            .send_window(SEND_WINDOW);
        match self.congestion {
            Congestion::Bbr => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::Cubic => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
        };
        transport
    }
}

/// What a peer that completed the handshake is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKind {
    /// An agent on the tunnel ALPN with a certificate from the pairing CA.
    Agent {
        /// The agent name from its certificate.
        name: String,
        /// The certificate's serial number (lower-case hex), which the edge checks against the
        /// agent's record.
        serial: String,
    },
    /// A client on the pairing ALPN (no certificate); it may only redeem a token.
    Pairing,
}

/// Why an incoming connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// TLS failed: for an agent, usually a certificate not issued by this edge's CA, or expired.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The client's certificate has expired: the agent must be paired again.
    #[error("the client certificate has expired ({0})")]
    CertificateExpired(String),
    /// The handshake did not complete in time.
    #[error("handshake timed out")]
    Timeout,
    /// The client asked for the tunnel without presenting a certificate.
    #[error("no client certificate on the tunnel protocol")]
    CertificateRequired,
    /// The certificate verified but names no valid agent.
    #[error("client certificate names no agent: {0}")]
    BadAgentCertificate(String),
    /// No application protocol we serve was negotiated.
    #[error("unexpected application protocol")]
    UnknownAlpn,
}

/// Why dialling the edge failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The local UDP socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Bind(io::Error),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The edge address's host is not a valid TLS server name.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
    /// quinn refused to start the connection.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed (refused certificate, wrong protocol, connection refused).
    #[error("handshake with {addr} failed: {reason}")]
    Handshake {
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// No answer within the handshake timeout (nothing listening, or UDP blocked).
    #[error("no answer from {0} within the handshake timeout")]
    Timeout(SocketAddr),
    /// The edge presented a CA that does not match the pin in the pairing token.
    #[error("the edge at {0} does not match the CA pin in the token")]
    PinMismatch(SocketAddr),
}

/// A QUIC tunnel connection.
///
/// A client connection keeps its endpoint so that closing can wait until the close is sent.
struct QuicConnection {
    conn: quinn::Connection,
    endpoint: Option<quinn::Endpoint>,
}

/// Longest wait for a close to be sent before a process moves on. On loopback it takes a
/// millisecond; over the internet a few round trips.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

impl SendHalf for quinn::SendStream {
    fn reset(&mut self, code: u32) {
        // Resetting an already finished or reset stream is harmless.
        let _ = quinn::SendStream::reset(self, VarInt::from_u32(code));
    }
}

impl RecvHalf for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = quinn::RecvStream::stop(self, VarInt::from_u32(code));
    }
}

fn lost(err: quinn::ConnectionError) -> ConnectionLost {
    ConnectionLost(err.to_string())
}

impl TunnelConnection for QuicConnection {
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>> {
        Box::pin(async move {
            let (send, recv) = self.conn.open_bi().await.map_err(lost)?;
            Ok(BiStream { send: Box::new(send), recv: Box::new(recv) })
        })
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, ConnectionLost>> {
        Box::pin(async move {
            let (send, recv) = self.conn.accept_bi().await.map_err(lost)?;
            Ok(BiStream { send: Box::new(send), recv: Box::new(recv) })
        })
    }

    fn closed(&self) -> BoxFuture<'_, ConnectionLost> {
        Box::pin(async move { lost(self.conn.closed().await) })
    }

    fn close(&self, code: u32, reason: &str) {
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }

    fn close_and_flush(&self, code: u32, reason: &str) -> BoxFuture<'_, ()> {
        self.close(code, reason);
        Box::pin(async move {
            if let Some(endpoint) = &self.endpoint {
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, endpoint.wait_idle()).await;
            }
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn transport(&self) -> &'static str {
        "quic"
    }
}

/// The edge's QUIC listener, serving the tunnel and pairing ALPNs on one UDP port.
#[derive(Debug)]
pub struct QuicListener {
    endpoint: quinn::Endpoint,
    handshake_timeout: Duration,
    settings: QuicSettings,
}

fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
    settings: &QuicSettings,
) -> Result<quinn::ServerConfig, DialError> {
    let tls = tls::edge_server_config(cert_chain, key, ca)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| DialError::Tls(TlsError::Quic(e.to_string())))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(settings.transport(MAX_AGENT_INITIATED_STREAMS)));
    Ok(server)
}

impl QuicListener {
    /// Binds `addr` with the edge's certificate chain, key and the pairing CA.
    pub fn bind(
        addr: SocketAddr,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: &CertificateDer<'static>,
        settings: &QuicSettings,
    ) -> Result<Self, DialError> {
        let server = server_config(cert_chain, key, ca, settings)?;
        let endpoint = quinn::Endpoint::server(server, addr).map_err(DialError::Bind)?;
        Ok(Self { endpoint, handshake_timeout: settings.handshake_timeout, settings: settings.clone() })
    }

    /// Replaces the edge's certificate for new connections (after it was renewed); established
    /// connections keep theirs.
    pub fn set_certificate(
        &self,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: &CertificateDer<'static>,
    ) -> Result<(), DialError> {
        self.endpoint.set_server_config(Some(server_config(cert_chain, key, ca, &self.settings)?));
        Ok(())
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next incoming connection attempt, or `None` once the listener is closed.
    pub async fn accept(&self) -> Option<IncomingTunnel> {
        let incoming = self.endpoint.accept().await?;
        Some(IncomingTunnel { incoming, handshake_timeout: self.handshake_timeout })
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self, code: u32, reason: &str) {
        self.endpoint.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until every connection has finished closing (QUIC's draining period: three
    /// round-trip timeouts), so peers saw the close before the process moves on.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// A connection attempt, not yet authenticated. Run [`IncomingTunnel::handshake`] on its own task
/// so one slow peer never delays others.
#[derive(Debug)]
pub struct IncomingTunnel {
    incoming: quinn::Incoming,
    handshake_timeout: Duration,
}

impl IncomingTunnel {
    /// The address the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Completes the handshake and classifies the peer. A tunnel peer without a certificate is
    /// closed here with [`code::CERTIFICATE_REQUIRED`].
    pub async fn handshake(self) -> Result<(Arc<dyn TunnelConnection>, PeerKind), HandshakeError> {
        let connecting = self.incoming.accept().map_err(|e| HandshakeError::Tls(e.to_string()))?;
        let conn = match tokio::time::timeout(self.handshake_timeout, connecting).await {
            Err(_) => return Err(HandshakeError::Timeout),
            // rustls reports an expired peer certificate as "certificate expired: ...".
            Ok(Err(e)) if e.to_string().to_ascii_lowercase().contains("certificate expired") => {
                return Err(HandshakeError::CertificateExpired(e.to_string()));
            }
            Ok(Err(e)) => return Err(HandshakeError::Tls(e.to_string())),
            Ok(Ok(conn)) => conn,
        };
        let alpn =
            conn.handshake_data().and_then(|data| data.downcast::<HandshakeData>().ok()).and_then(|data| data.protocol);
        let kind = match alpn.as_deref() {
            Some(p) if p == TUNNEL_ALPN => {
                let certs = conn
                    .peer_identity()
                    .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .filter(|certs| !certs.is_empty());
                let Some(leaf) = certs.as_ref().and_then(|certs| certs.first()) else {
                    conn.close(VarInt::from_u32(code::CERTIFICATE_REQUIRED), b"client certificate required");
                    return Err(HandshakeError::CertificateRequired);
                };
                match agent_name_from_cert(leaf).and_then(|name| Ok((name, cert_serial_hex(leaf)?))) {
                    Ok((name, serial)) => PeerKind::Agent { name, serial },
                    Err(e) => {
                        conn.close(VarInt::from_u32(code::UNKNOWN_AGENT), b"certificate names no agent");
                        return Err(HandshakeError::BadAgentCertificate(e.to_string()));
                    }
                }
            }
            Some(p) if p == PAIRING_ALPN => PeerKind::Pairing,
            _ => {
                conn.close(VarInt::from_u32(code::PROTOCOL_VIOLATION), b"unknown protocol");
                return Err(HandshakeError::UnknownAlpn);
            }
        };
        Ok((Arc::new(QuicConnection { conn, endpoint: None }), kind))
    }
}

/// The host part of `host:port` (brackets removed for IPv6), for the TLS server name.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

async fn dial(
    addr: SocketAddr,
    server_name: &str,
    client: rustls::ClientConfig,
    settings: &QuicSettings,
) -> Result<(quinn::Connection, quinn::Endpoint), DialError> {
    let bind: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(DialError::Bind)?;
    let crypto = QuicClientConfig::try_from(client).map_err(|e| DialError::Tls(TlsError::Quic(e.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(settings.transport(settings.max_exchange_streams)));
    endpoint.set_default_client_config(config);
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| DialError::ServerName(server_name.to_owned()))?
        .to_str()
        .into_owned();
    let connecting = endpoint.connect(addr, &name)?;
    match tokio::time::timeout(settings.handshake_timeout, connecting).await {
        // Quinn's idle timeout also runs during the handshake and may fire first: to the caller
        // both mean the same thing, nobody answered.
        Err(_) | Ok(Err(quinn::ConnectionError::TimedOut)) => Err(DialError::Timeout(addr)),
        Ok(Err(e)) => Err(DialError::Handshake { addr, reason: e.to_string() }),
        Ok(Ok(conn)) => Ok((conn, endpoint)),
    }
}

/// Dials the edge's tunnel with the agent's certificate; the edge must prove itself with a
/// certificate from the pairing CA for `server_name`.
pub async fn dial_tunnel(
    addr: SocketAddr,
    server_name: &str,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
    settings: &QuicSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let client = tls::agent_client_config(cert_chain, key, ca)?;
    let (conn, endpoint) = dial(addr, server_name, client, settings).await?;
    Ok(Arc::new(QuicConnection { conn, endpoint: Some(endpoint) }))
}

/// Dials the edge's pairing ALPN, trusting only a CA that matches `pin`.
pub async fn dial_pairing(
    addr: SocketAddr,
    server_name: &str,
    pin: CaPin,
    settings: &QuicSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let check = PinCheck::default();
    let client = tls::pairing_client_config(pin, check.clone())?;
    match dial(addr, server_name, client, settings).await {
        Ok((conn, endpoint)) => Ok(Arc::new(QuicConnection { conn, endpoint: Some(endpoint) })),
        Err(_) if check.mismatched() => Err(DialError::PinMismatch(addr)),
        Err(err) => Err(err),
    }
}
