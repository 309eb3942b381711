//! The edge's tunnel listener over both transports, and the agent's choice between them: one
//! accept loop and one dial call, so the tunnel code above never branches on the transport.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_pki::CaPin;
use relay_pki::TlsIdentity;

use crate::peer::{DialError, HandshakeError, PeerKind};
use crate::quic::{IncomingQuic, QuicListener};
use crate::seam::TunnelConnection;
use crate::settings::TunnelSettings;
use crate::tcp::{IncomingTcp, TcpTunnelListener};
use crate::tls::{self, PinCheck};
use crate::{quic, tcp};

/// A transport the agent can dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC over UDP: the default; no head-of-line blocking between calls.
    Quic,
    /// TLS 1.3 over TCP with HTTP/2 streams: where UDP cannot pass.
    Tcp,
}

impl Transport {
    /// The name used in logs, metrics and status files.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which transport the agent dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// QUIC first; TLS/TCP when no QUIC handshake completes within the fallback deadline.
    #[default]
    Auto,
    /// Only this transport.
    Only(Transport),
}

impl TransportChoice {
    /// Parses `auto`, `quic` or `tcp` (any case).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Only(Transport::Quic)),
            "tcp" => Ok(Self::Only(Transport::Tcp)),
            other => Err(format!("{other:?}: expected \"auto\", \"quic\" or \"tcp\"")),
        }
    }

    /// Dials with `dial` over the chosen transport. With `Auto`, QUIC goes first, and TCP is
    /// dialled when QUIC gets no answer within `fallback_after` (`unanswered` says which errors
    /// mean no answer); a QUIC refusal is final, since the edge answered.
    pub async fn dial<T, E, Fut>(
        self,
        fallback_after: std::time::Duration,
        unanswered: impl Fn(&E) -> bool,
        dial: impl Fn(Transport) -> Fut,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let only = match self {
            TransportChoice::Only(only) => only,
            TransportChoice::Auto => match tokio::time::timeout(fallback_after, dial(Transport::Quic)).await {
                Ok(Err(e)) if !unanswered(&e) => return Err(e),
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(_)) | Err(_) => {
                    tracing::info!(
                        "no QUIC answer within {fallback_after:?} (is UDP blocked on the way?); connecting over TLS/TCP"
                    );
                    Transport::Tcp
                }
            },
        };
        dial(only).await
    }
}

/// Dials the edge's tunnel over `transport` with the agent's certificate; the edge must prove
/// itself with a certificate from the pairing CA for `server_name`.
pub async fn dial_tunnel(
    transport: Transport,
    addr: SocketAddr,
    server_name: &str,
    identity: &TlsIdentity,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    connect(transport, addr, server_name, tls::agent_client_config(identity)?, settings).await
}

/// Dials the edge's pairing ALPN over `transport`, trusting only a CA that matches `pin`.
pub async fn dial_pairing(
    transport: Transport,
    addr: SocketAddr,
    server_name: &str,
    pin: CaPin,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let check = PinCheck::default();
    let client = tls::pairing_client_config(pin, check.clone())?;
    match connect(transport, addr, server_name, client, settings).await {
        Err(_) if check.mismatched() => Err(DialError::PinMismatch(addr)),
        dialled => dialled,
    }
}

async fn connect(
    transport: Transport,
    addr: SocketAddr,
    server_name: &str,
    client: rustls::ClientConfig,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    match transport {
        Transport::Quic => quic::connect(addr, server_name, client, settings).await,
        Transport::Tcp => tcp::connect(addr, server_name, client, settings).await,
    }
}

/// The edge's tunnel listener: QUIC on a UDP port and, unless disabled, TLS/TCP on a TCP port.
#[derive(Debug)]
pub struct TunnelListener {
    quic: QuicListener,
    tcp: Option<TcpTunnelListener>,
}

/// How many times to look for a port number free on both UDP and TCP when both listeners are
/// asked for "the same port, any number" (port 0). A port the OS picked for UDP is taken on TCP
/// only by chance, so a few tries always suffice.
const SAME_PORT_TRIES: usize = 16;

/// Where the TCP listener goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpListen {
    /// The QUIC listener's address and port number (when that port is 0: a number free on both).
    SamePort,
    /// This address.
    At(SocketAddr),
    /// No TCP listener.
    Off,
}

impl TunnelListener {
    /// Binds QUIC on `quic_addr` and TCP as `tcp` says, with the edge's certificate chain, key
    /// and the pairing CA. Call from within the Tokio runtime.
    pub fn bind(
        quic_addr: SocketAddr,
        tcp: TcpListen,
        identity: &TlsIdentity,
        settings: &TunnelSettings,
    ) -> Result<Self, DialError> {
        let bind_quic = || QuicListener::bind(quic_addr, identity, settings);
        let bind_tcp = |addr| TcpTunnelListener::bind(addr, identity, settings);
        match tcp {
            TcpListen::Off => Ok(Self { quic: bind_quic()?, tcp: None }),
            TcpListen::At(addr) => Ok(Self { quic: bind_quic()?, tcp: Some(bind_tcp(addr)?) }),
            TcpListen::SamePort => {
                let mut last = None;
                for _ in 0..SAME_PORT_TRIES {
                    let quic = bind_quic()?;
                    let bound = quic.local_addr().map_err(DialError::Bind)?;
                    match bind_tcp(bound) {
                        Ok(tcp) => return Ok(Self { quic, tcp: Some(tcp) }),
                        // Only a port the OS chose may be chosen again.
                        Err(e) if quic_addr.port() == 0 => last = Some(e),
                        Err(e) => return Err(e),
                    }
                }
                Err(last.unwrap_or(DialError::TcpBind(std::io::ErrorKind::AddrInUse.into())))
            }
        }
    }

    /// Replaces the edge's certificate for new connections on both transports.
    pub fn set_certificate(&self, identity: &TlsIdentity) -> Result<(), DialError> {
        if let Some(tcp) = &self.tcp {
            tcp.set_certificate(identity)?;
        }
        self.quic.set_certificate(identity)
    }

    /// The QUIC (UDP) address.
    pub fn quic_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// The TCP address, when listening on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|tcp| tcp.local_addr().ok())
    }

    /// The next connection attempt on either transport, or `None` once closed.
    pub async fn accept(&self) -> Option<IncomingTunnel> {
        let tcp = async {
            match &self.tcp {
                Some(tcp) => tcp.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            quic = self.quic.accept() => quic.map(|quic| IncomingTunnel::Quic(Box::new(quic))),
            tcp = tcp => tcp.map(IncomingTunnel::Tcp),
        }
    }

    /// Stops accepting and closes every connection on both transports with `code` and `reason`.
    pub fn close(&self, code: u32, reason: &str) {
        if let Some(tcp) = &self.tcp {
            tcp.close(code, reason);
        }
        self.quic.close(code, reason);
    }

    /// Waits until every QUIC connection has finished closing.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
    }
}

/// A connection attempt on either transport, not yet authenticated. Run
/// [`IncomingTunnel::handshake`] on its own task so one slow peer never delays others.
#[derive(Debug)]
pub enum IncomingTunnel {
    /// Over QUIC (boxed: quinn's incoming state is several times the TCP one).
    Quic(Box<IncomingQuic>),
    /// Over TLS/TCP.
    Tcp(IncomingTcp),
}

impl IncomingTunnel {
    /// The address the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        match self {
            IncomingTunnel::Quic(incoming) => incoming.remote_addr(),
            IncomingTunnel::Tcp(incoming) => incoming.remote_addr(),
        }
    }

    /// The transport the attempt came over.
    pub fn transport(&self) -> Transport {
        match self {
            IncomingTunnel::Quic(_) => Transport::Quic,
            IncomingTunnel::Tcp(_) => Transport::Tcp,
        }
    }

    /// Completes the handshake and classifies the peer.
    pub async fn handshake(self) -> Result<(Arc<dyn TunnelConnection>, PeerKind), HandshakeError> {
        match self {
            IncomingTunnel::Quic(incoming) => (*incoming).handshake().await,
            IncomingTunnel::Tcp(incoming) => incoming.handshake().await,
        }
    }
}
