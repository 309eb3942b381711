//! The agent's TLS/TCP dialer: TCP, TLS with the configuration it is given (the tunnel's or
//! pairing's), then HTTP/2 as the agent's side.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use super::connection::TcpConnection;
use super::establish::establish_agent;
use crate::peer::{DialError, Dialled};
use crate::settings::TunnelSettings;

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

/// Dials `addr` over TLS/TCP with the client TLS configuration `client` (the tunnel's or
/// pairing's).
pub(crate) async fn connect(addr: SocketAddr, name: &str, client: ClientConfig, settings: &TunnelSettings) -> Dialled {
    Ok(Arc::new(dial(addr, name, client, settings).await?))
}
