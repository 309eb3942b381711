//! `relay-agent pair`: redeem a token for a certificate, with a key made on this host.

use std::path::Path;
use std::time::Duration;

use relay_pki::{
    AgentState, AgentStateError, CaError, CaPin, PairingToken, TokenError, agent_name_from_cert, generate_agent_csr,
};
use relay_proto::{PairRefusal, PairRequest, PairResponse};
use relay_transport::{DialError, TunnelSettings, dial_pairing, host_of};

use crate::config::{DEFAULT_QUIC_FALLBACK_AFTER, TransportChoice};

/// How long the edge has to answer a pairing request once connected. Signing takes
/// milliseconds; the rest is one round trip.
const PAIRING_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Why pairing failed. Each message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The token text is not a valid token.
    #[error("invalid token: {0}")]
    Token(#[from] TokenError),
    /// The edge address in the token does not resolve.
    #[error("cannot resolve the edge address {addr:?}: {reason}")]
    Resolve {
        /// The address from the token.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No address of the edge answered.
    #[error("cannot reach the edge at {addr}: {reason}")]
    Unreachable {
        /// The address from the token.
        addr: String,
        /// The last failure.
        reason: String,
    },
    /// The edge is not the one that issued the token.
    #[error("the edge at {0} does not match the CA pin in the token (wrong edge, or an interceptor); nothing was sent")]
    PinMismatch(String),
    /// The edge refused the token.
    #[error("{}", refusal_text(*.0))]
    Refused(PairRefusal),
    /// The edge broke the pairing protocol.
    #[error("pairing protocol error: {0}")]
    Protocol(String),
    /// The key or CSR could not be made.
    #[error("cannot create the agent key: {0}")]
    Key(#[from] CaError),
    /// The pairing could not be stored.
    #[error("cannot store the pairing: {0}")]
    Storage(#[from] AgentStateError),
}

fn refusal_text(refusal: PairRefusal) -> &'static str {
    match refusal {
        PairRefusal::UnknownToken => "the edge does not know this token (issued by another edge, or cancelled)",
        PairRefusal::Expired => "the token has expired; issue a new one with `relay-edge pair`",
        PairRefusal::Spent => "the token was already used; issue a new one with `relay-edge pair`",
        PairRefusal::BadSecret => "the token's secret is wrong (was the token altered?)",
        PairRefusal::BadCsr => "the edge rejected the certificate request",
        PairRefusal::Internal => "the edge failed to issue a certificate; see the edge's log",
        PairRefusal::RateLimited => "too many failed pairing attempts from this address; wait a minute and retry",
    }
}

/// What pairing produced.
#[derive(Debug, Clone)]
pub struct Paired {
    /// The agent name the edge assigned.
    pub agent_name: String,
    /// The edge's tunnel address, now recorded in the state directory.
    pub edge_addr: String,
}

/// Which transport pairing uses: the same choice, and the same fallback deadline, as the tunnel.
#[derive(Debug, Clone, Copy)]
pub struct PairTransport {
    /// `auto`, `quic` or `tcp`.
    pub choice: TransportChoice,
    /// With `auto`: how long QUIC may go unanswered before TCP is used.
    pub quic_fallback_after: Duration,
}

impl Default for PairTransport {
    fn default() -> Self {
        Self { choice: TransportChoice::Auto, quic_fallback_after: DEFAULT_QUIC_FALLBACK_AFTER }
    }
}

/// Pairs with the edge named in `token_text` and stores the result in `state_dir`. The private
/// key is generated here and written only to `state_dir` (mode 0600).
pub async fn pair(
    state_dir: &Path,
    token_text: &str,
    settings: &TunnelSettings,
    transport: PairTransport,
) -> Result<Paired, PairError> {
    let token = PairingToken::parse(token_text)?;
    let addrs: Vec<_> = tokio::net::lookup_host(&token.edge_addr)
        .await
        .map_err(|e| PairError::Resolve { addr: token.edge_addr.clone(), reason: e.to_string() })?
        .collect();
    let (key_pem, csr_der) = generate_agent_csr("relay-agent")?;
    let server_name = host_of(&token.edge_addr);
    let mut last = String::from("no addresses");
    for addr in addrs {
        let dialled = transport.choice.dial(
            transport.quic_fallback_after,
            |e| matches!(e, DialError::Timeout(_)),
            |over| dial_pairing(over, addr, server_name, token.ca_pin, settings),
        );
        let conn = match dialled.await {
            Ok(conn) => conn,
            Err(DialError::PinMismatch(_)) => return Err(PairError::PinMismatch(token.edge_addr.clone())),
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let request =
            PairRequest { token_id: token.token_id.clone(), secret: token.secret.to_vec(), csr_der: csr_der.clone() };
        let response = relay_tunnel::pairing::redeem(&conn, &request, PAIRING_ANSWER_TIMEOUT)
            .await
            .map_err(|e| PairError::Protocol(e.to_string()));
        return match response? {
            PairResponse::Refused(refusal) => Err(PairError::Refused(refusal)),
            PairResponse::Issued { agent_name, cert_der, ca_der } => {
                // The TLS handshake already proved the pin; check the returned CA is that one too.
                if CaPin::of_cert_der(&ca_der).ok() != Some(token.ca_pin) {
                    return Err(PairError::PinMismatch(token.edge_addr.clone()));
                }
                if agent_name_from_cert(&cert_der).ok().as_deref() != Some(agent_name.as_str()) {
                    return Err(PairError::Protocol("the certificate does not name the agent".into()));
                }
                AgentState::save(state_dir, &agent_name, &token.edge_addr, &key_pem, &cert_der, &ca_der)?;
                Ok(Paired { agent_name, edge_addr: token.edge_addr.clone() })
            }
        };
    }
    Err(PairError::Unreachable { addr: token.edge_addr.clone(), reason: last })
}
