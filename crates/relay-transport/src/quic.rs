//! The QUIC implementation of the seam: the edge's UDP listener and the agent's dialers.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use relay_pki::TlsIdentity;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::peer::{DialError, Dialled, HandshakeError, PeerKind, classify, tls_failure};
use crate::seam::{BiStream, BoxFuture, ConnectionLost, RecvHalf, SendHalf, TunnelConnection};
use crate::settings::{
    CONNECTION_RECEIVE_WINDOW, Congestion, MAX_AGENT_INITIATED_STREAMS, STREAM_RECEIVE_WINDOW, TunnelSettings,
};
use crate::tls::{self, TlsError};

impl TunnelSettings {
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

/// How many later packets must be acknowledged before an unacknowledged one counts as lost.
/// QUIC's default of 3 (from TCP) assumes paths barely reorder; a tunnel carrying a thousand
/// frames a second across a path that jitters by a few milliseconds sees later packets overtake
/// earlier ones by dozens, and every such overtake became a spurious loss that shrank the
/// congestion window: measured with ±10 ms jitter and no loss at all, media queued for seconds.
/// Loss is still found by QUIC's time threshold (9/8 of the RTT), which reordering this small
/// never reaches.
pub const REORDER_PACKET_THRESHOLD: u32 = 100;

/// Bytes this side keeps sent but unacknowledged across all streams (quinn's default is eight
/// stream windows); matched to the peer's connection window.
pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;

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
    settings: TunnelSettings,
}

fn server_config(identity: &TlsIdentity, settings: &TunnelSettings) -> Result<quinn::ServerConfig, DialError> {
    let tls = tls::edge_server_config(identity)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| DialError::Tls(TlsError::Quic(e.to_string())))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(settings.transport(MAX_AGENT_INITIATED_STREAMS)));
    Ok(server)
}

impl QuicListener {
    /// Binds `addr` with the edge's certificate chain, key and the pairing CA.
    pub fn bind(addr: SocketAddr, identity: &TlsIdentity, settings: &TunnelSettings) -> Result<Self, DialError> {
        let server = server_config(identity, settings)?;
        let endpoint = quinn::Endpoint::server(server, addr).map_err(DialError::Bind)?;
        Ok(Self { endpoint, handshake_timeout: settings.handshake_timeout, settings: settings.clone() })
    }

    /// Replaces the edge's certificate for new connections (after it was renewed); established
    /// connections keep theirs.
    pub fn set_certificate(&self, identity: &TlsIdentity) -> Result<(), DialError> {
        self.endpoint.set_server_config(Some(server_config(identity, &self.settings)?));
        Ok(())
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next incoming connection attempt, or `None` once the listener is closed.
    pub async fn accept(&self) -> Option<IncomingQuic> {
        let incoming = self.endpoint.accept().await?;
        Some(IncomingQuic { incoming, handshake_timeout: self.handshake_timeout })
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

/// A connection attempt, not yet authenticated. Run [`IncomingQuic::handshake`] on its own task
/// so one slow peer never delays others.
#[derive(Debug)]
pub struct IncomingQuic {
    incoming: quinn::Incoming,
    handshake_timeout: Duration,
}

impl IncomingQuic {
    /// The address the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Completes the handshake and classifies the peer. A tunnel peer without a certificate is
    /// closed here with [`relay_proto::code::CERTIFICATE_REQUIRED`].
    pub async fn handshake(self) -> Result<(Arc<dyn TunnelConnection>, PeerKind), HandshakeError> {
        let connecting = self.incoming.accept().map_err(|e| HandshakeError::Tls(e.to_string()))?;
        let conn = match tokio::time::timeout(self.handshake_timeout, connecting).await {
            Err(_) => return Err(HandshakeError::Timeout),
            Ok(Err(e)) => return Err(tls_failure(e.to_string())),
            Ok(Ok(conn)) => conn,
        };
        let alpn =
            conn.handshake_data().and_then(|data| data.downcast::<HandshakeData>().ok()).and_then(|data| data.protocol);
        let certs = conn.peer_identity().and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
        let kind = match classify(alpn.as_deref(), certs.as_deref().map(Vec::as_slice)) {
            Ok(kind) => kind,
            Err(refusal) => {
                conn.close(VarInt::from_u32(refusal.code), refusal.reason.as_bytes());
                return Err(refusal.error);
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
    settings: &TunnelSettings,
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

/// Dials `addr` with the client TLS configuration `client` (the tunnel's or pairing's).
pub(crate) async fn connect(addr: SocketAddr, name: &str, client: ClientConfig, settings: &TunnelSettings) -> Dialled {
    let (conn, endpoint) = dial(addr, name, client, settings).await?;
    Ok(Arc::new(QuicConnection { conn, endpoint: Some(endpoint) }))
}
