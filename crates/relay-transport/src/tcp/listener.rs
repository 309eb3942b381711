//! The edge's TLS/TCP tunnel listener: accepts TCP connections, completes TLS and HTTP/2, and
//! classifies each peer by the same rules as QUIC.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use relay_pki::TlsIdentity;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::connection::TcpConnection;
use super::establish::establish_edge;
use crate::peer::{DialError, HandshakeError, PeerKind, classify, tls_failure};
use crate::seam::TunnelConnection;
use crate::settings::TunnelSettings;
use crate::tls;

/// Pause after a failed `accept` (out of file descriptors, say) before the next one, so the
/// listener does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections a listener accepted, so closing the listener closes them as QUIC's endpoint close
/// does. Weak: a connection's owner decides how long it lives.
type Accepted = Arc<Mutex<Vec<std::sync::Weak<TcpConnection>>>>;

/// The edge's TLS/TCP tunnel listener, serving the tunnel and pairing ALPNs.
#[derive(Debug)]
pub struct TcpTunnelListener {
    listener: tokio::net::TcpListener,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    settings: TunnelSettings,
    closed: CancellationToken,
    accepted: Accepted,
}

impl TcpTunnelListener {
    /// Listens on `addr` with the edge's certificate chain, key and the pairing CA. Call from
    /// within the Tokio runtime.
    pub fn bind(addr: SocketAddr, identity: &TlsIdentity, settings: &TunnelSettings) -> Result<Self, DialError> {
        let tls = tls::edge_server_config(identity)?;
        let std_listener = std::net::TcpListener::bind(addr).map_err(DialError::TcpBind)?;
        std_listener.set_nonblocking(true).map_err(DialError::TcpBind)?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(DialError::TcpBind)?;
        Ok(Self {
            listener,
            tls: RwLock::new(Arc::new(tls)),
            settings: settings.clone(),
            closed: CancellationToken::new(),
            accepted: Accepted::default(),
        })
    }

    /// Replaces the edge's certificate for new connections; established ones keep theirs.
    pub fn set_certificate(&self, identity: &TlsIdentity) -> Result<(), DialError> {
        let tls = Arc::new(tls::edge_server_config(identity)?);
        if let Ok(mut current) = self.tls.write() {
            *current = tls;
        }
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next incoming connection, or `None` once the listener is closed.
    pub async fn accept(&self) -> Option<IncomingTcp> {
        loop {
            let accepted = tokio::select! {
                () = self.closed.cancelled() => return None,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let tls = self.tls.read().map(|tls| tls.clone()).ok()?;
                    let accepted = self.accepted.clone();
                    return Some(IncomingTcp { stream, remote, tls, settings: self.settings.clone(), accepted });
                }
                Err(e) => {
                    debug!("tunnel TCP accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }

    /// Stops accepting and closes every connection still open with `code` and `reason`.
    pub fn close(&self, code: u32, reason: &str) {
        self.closed.cancel();
        let accepted = self.accepted.lock().map(|mut list| std::mem::take(&mut *list)).unwrap_or_default();
        for conn in accepted.iter().filter_map(std::sync::Weak::upgrade) {
            conn.close(code, reason);
        }
    }
}

/// A TCP connection attempt, not yet authenticated.
pub struct IncomingTcp {
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    settings: TunnelSettings,
    accepted: Accepted,
}

impl std::fmt::Debug for IncomingTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingTcp").field("remote", &self.remote).finish()
    }
}

impl IncomingTcp {
    /// The address the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Completes TLS and HTTP/2 and classifies the peer, by the same rules as QUIC. A refused
    /// peer is told why over the session stream, as QUIC tells it in its close.
    pub async fn handshake(self) -> Result<(Arc<dyn TunnelConnection>, PeerKind), HandshakeError> {
        let Self { stream, remote, tls, settings, accepted } = self;
        let attempt = async {
            // Media frames are small and latency-bound: never hold them back to fill a segment.
            let _ = stream.set_nodelay(true);
            let tls =
                tokio_rustls::TlsAcceptor::from(tls).accept(stream).await.map_err(|e| tls_failure(e.to_string()))?;
            let (_, session) = tls.get_ref();
            let kind = classify(session.alpn_protocol(), session.peer_certificates());
            let conn = establish_edge(tls, remote, &settings).await.map_err(HandshakeError::Tls)?;
            Ok::<_, HandshakeError>((conn, kind))
        };
        let (conn, kind) =
            tokio::time::timeout(settings.handshake_timeout, attempt).await.map_err(|_| HandshakeError::Timeout)??;
        match kind {
            Ok(kind) => {
                let conn = Arc::new(conn);
                if let Ok(mut list) = accepted.lock() {
                    list.retain(|weak| weak.strong_count() > 0);
                    list.push(Arc::downgrade(&conn));
                }
                Ok((conn, kind))
            }
            Err(refusal) => {
                conn.close_and_flush(refusal.code, refusal.reason).await;
                Err(refusal.error)
            }
        }
    }
}
