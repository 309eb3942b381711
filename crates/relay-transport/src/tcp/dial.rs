//! The agent's TLS/TCP dialers: the tunnel with its certificate, pairing with the token's pin.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_pki::CaPin;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::connection::TcpConnection;
use super::establish::establish_agent;
use crate::peer::DialError;
use crate::seam::TunnelConnection;
use crate::settings::TunnelSettings;
use crate::tls::{self, PinCheck};

async fn dial(
    addr: SocketAddr,
    server_name: &str,
    client: rustls::ClientConfig,
    settings: &TunnelSettings,
) -> Result<TcpConnection, DialError> {
    let name =
        ServerName::try_from(server_name.to_owned()).map_err(|_| DialError::ServerName(server_name.to_owned()))?;
    let attempt = async {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|source| DialError::TcpConnect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, stream)
            .await
            .map_err(|e| DialError::Handshake { addr, reason: e.to_string() })?;
        establish_agent(tls, addr, settings).await.map_err(|reason| DialError::Handshake { addr, reason })
    };
    tokio::time::timeout(settings.handshake_timeout, attempt).await.map_err(|_| DialError::Timeout(addr))?
}

/// Dials the edge's tunnel over TLS/TCP with the agent's certificate; the edge must prove itself
/// with a certificate from the pairing CA for `server_name`.
pub async fn dial_tunnel(
    addr: SocketAddr,
    server_name: &str,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let client = tls::agent_client_config(cert_chain, key, ca)?;
    Ok(Arc::new(dial(addr, server_name, client, settings).await?))
}

/// Dials the edge's pairing ALPN over TLS/TCP, trusting only a CA that matches `pin`.
pub async fn dial_pairing(
    addr: SocketAddr,
    server_name: &str,
    pin: CaPin,
    settings: &TunnelSettings,
) -> Result<Arc<dyn TunnelConnection>, DialError> {
    let check = PinCheck::default();
    let client = tls::pairing_client_config(pin, check.clone())?;
    match dial(addr, server_name, client, settings).await {
        Ok(conn) => Ok(Arc::new(conn)),
        Err(_) if check.mismatched() => Err(DialError::PinMismatch(addr)),
        Err(err) => Err(err),
    }
}
