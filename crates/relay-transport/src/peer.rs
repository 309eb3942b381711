//! What both transports agree on about a peer: how a completed handshake is classified (agent or
//! pairing client), and why handshakes and dials fail.

use std::io;
use std::net::SocketAddr;

use relay_pki::{agent_name_from_cert, cert_serial_hex};
use relay_proto::{PAIRING_ALPN, TUNNEL_ALPN, code};
use rustls::pki_types::CertificateDer;

use crate::tls::TlsError;

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
    /// The TCP listener could not be opened.
    #[error("cannot listen on TCP: {0}")]
    TcpBind(io::Error),
    /// The TCP connection could not be made (refused, unreachable).
    #[error("cannot connect to {addr} over TCP: {source}")]
    TcpConnect {
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
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
    /// No answer within the handshake timeout (nothing listening, or packets dropped on the way).
    #[error("no answer from {0} within the handshake timeout")]
    Timeout(SocketAddr),
    /// The edge presented a CA that does not match the pin in the pairing token.
    #[error("the edge at {0} does not match the CA pin in the token")]
    PinMismatch(SocketAddr),
}

/// A handshake that completed but must be refused: close the connection with `code` and
/// `reason`, and report `error`.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub code: u32,
    pub reason: &'static str,
    pub error: HandshakeError,
}

/// Classifies a peer from the negotiated ALPN and the certificates it presented (already verified
/// by rustls against the pairing CA). The same rules hold on every transport.
pub(crate) fn classify(alpn: Option<&[u8]>, certs: Option<&[CertificateDer<'_>]>) -> Result<PeerKind, Refusal> {
    match alpn {
        Some(p) if p == TUNNEL_ALPN => {
            let Some(leaf) = certs.and_then(|certs| certs.first()) else {
                return Err(Refusal {
                    code: code::CERTIFICATE_REQUIRED,
                    reason: "client certificate required",
                    error: HandshakeError::CertificateRequired,
                });
            };
            match agent_name_from_cert(leaf).and_then(|name| Ok((name, cert_serial_hex(leaf)?))) {
                Ok((name, serial)) => Ok(PeerKind::Agent { name, serial }),
                Err(e) => Err(Refusal {
                    code: code::UNKNOWN_AGENT,
                    reason: "certificate names no agent",
                    error: HandshakeError::BadAgentCertificate(e.to_string()),
                }),
            }
        }
        Some(p) if p == PAIRING_ALPN => Ok(PeerKind::Pairing),
        _ => Err(Refusal {
            code: code::PROTOCOL_VIOLATION,
            reason: "unknown protocol",
            error: HandshakeError::UnknownAlpn,
        }),
    }
}

/// Maps a TLS handshake failure to the error the edge reports: rustls words an expired peer
/// certificate as "certificate expired: ...", which deserves its own advice (pair again).
pub(crate) fn tls_failure(text: String) -> HandshakeError {
    if text.to_ascii_lowercase().contains("certificate expired") {
        HandshakeError::CertificateExpired(text)
    } else {
        HandshakeError::Tls(text)
    }
}

/// A dialled tunnel connection, or why there is none.
pub(crate) type Dialled = Result<std::sync::Arc<dyn crate::seam::TunnelConnection>, DialError>;
