//! acs-relay pairing PKI.
//!
//! This crate owns every certificate and secret of the product: the pairing CA, the edge's
//! tunnel certificate, agent keys and CSRs, the signing of agent certificates, pairing tokens
//! and CA pins, and the on-disk state of both sides. It never reads the clock: every function
//! that depends on time takes `now: SystemTime`, so expiry is tested without waiting. It does no
//! network I/O.

mod agent_registry;
mod agent_state;
mod ca;
mod edge_state;
mod fsutil;
mod pin;
mod token;

pub use agent_registry::{AgentEntry, AgentRecord, AgentRefusal, AgentStatus, CertEntry, RenewError};
pub use agent_state::{AgentIdentity, AgentState, AgentStateError};
pub use ca::{
    CaError, IssuedAgentCert, PairingCa, agent_name_from_cert, cert_serial_hex, cert_subject_alt_names, cert_validity,
    generate_agent_csr, renewal_due, validate_agent_name,
};
pub use edge_state::{EdgeState, EdgeStateError, IssuedCert, PendingToken, RedeemError, TlsIdentity};
pub use fsutil::{read_private_key_file, read_secret_file, write_atomic};
pub use pin::CaPin;
pub use token::{PairingToken, TokenError};

use std::time::Duration;

/// How long a pairing token may wait to be redeemed. Long enough to copy it to the agent's host
/// and run one command; short enough that a token leaked from a terminal scroll-back is useless
/// soon after (kubeadm bootstrap tokens default to 24 h; ours are single-use and shorter).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// Validity of an agent certificate. Short, so a stolen key is useful for a day at most; the
/// agent renews long before it runs out (renewal arrives with certificate lifecycle work).
pub const DEFAULT_AGENT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);

/// Validity of a bundle's certificate. A bundle lives in a secret store and renewals cannot be
/// written back to it, so an agent restarted from it must still find it valid; 30 days leaves
/// room for a monthly rotation (`relay-edge pair --bundle --replace`).
pub const DEFAULT_BUNDLE_VALIDITY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Validity of the edge's tunnel certificate. Agents pin the CA, not this certificate, so a year
/// costs nothing in trust and saves operators from surprise expiry.
pub const DEFAULT_EDGE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Validity of the pairing CA. Replacing it means re-pairing every agent, so it is long.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Certificates start this long before `now`, so a peer whose clock is a little behind still
/// accepts them.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
