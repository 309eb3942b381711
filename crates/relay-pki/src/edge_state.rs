//! The edge's state directory: the CA, the tunnel certificate, pending tokens and paired agents.
//!
//! Layout (every file written atomically; keys mode 0600):
//!
//! ```text
//! ca.crt  ca.key            the pairing CA
//! edge.pem                  the edge's tunnel key and certificate (signed by the CA), in one
//!                           file so a renewal replaces both at once
//! tokens/<id>.toml          a pending token: agent name, SHA-256 of the secret, expiry
//! tokens/<id>.spent         a redeemed token (renamed atomically, so only one redeemer wins)
//! agents/<name>.toml        a paired agent: status and live certificate serials (see
//!                           `agent_registry`)
//! agents/.lock              taken while a record is read, changed and written
//! status/<host>-<pid>-<port>.json  written by each running edge: who is connected (see relay-edge)
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::ca::{
    CaError, IssuedAgentCert, PairingCa, cert_subject_alt_names, cert_validity, renewal_due, validate_agent_name,
};
use crate::fsutil::{read_private_key_file, write_atomic};
use crate::token::{PairingToken, TokenError, secret_hash_hex};
use crate::{DEFAULT_CA_VALIDITY, DEFAULT_EDGE_CERT_VALIDITY};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const EDGE_IDENTITY: &str = "edge.pem";
const TOKENS_DIR: &str = "tokens";
/// One record per paired agent ([`crate::agent_registry`]).
pub(crate) const AGENTS_DIR: &str = "agents";

/// Why the edge state could not be created, opened or changed.
#[derive(Debug, thiserror::Error)]
pub enum EdgeStateError {
    /// `init` found an existing CA; re-initialising would orphan every paired agent.
    #[error("{0} is already initialised (found {CA_KEY}); refusing to replace the pairing CA")]
    AlreadyInitialized(PathBuf),
    /// The directory has no CA: `relay-edge init` was not run.
    #[error("{0} holds no pairing CA; run `relay-edge init --state-dir {0}` first")]
    NotInitialized(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A certificate or key file does not parse.
    #[error("{0}: not a valid certificate or key (corrupt or truncated?)")]
    Corrupt(PathBuf),
    /// A CA operation failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A token could not be made.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No agent of that name is paired.
    #[error("no agent named {0:?} is paired with this edge")]
    UnknownAgent(String),
    /// The agent is paired already; pairing it again needs `--replace`.
    #[error("agent {0:?} is already paired; use --replace to pair it again (its current certificate stops working)")]
    AlreadyPaired(String),
    /// The agent was revoked, so it gets no new certificate without pairing again.
    #[error("agent {0:?} is revoked")]
    Revoked(String),
    /// An agent record does not parse; only that agent is affected.
    #[error("{path}: corrupt agent record: {reason}")]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why a pairing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// No token with that id exists.
    #[error("unknown token")]
    UnknownToken,
    /// The token's time ran out.
    #[error("token expired")]
    Expired,
    /// The token was already redeemed.
    #[error("token already used")]
    Spent,
    /// The secret does not match.
    #[error("wrong token secret")]
    BadSecret,
    /// The CSR is invalid.
    #[error("invalid CSR: {0}")]
    BadCsr(CaError),
    /// The edge failed internally.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One side's tunnel credentials, ready for rustls: its certificate chain and key, and the
/// pairing CA, the only root it trusts for the other side.
#[derive(Debug)]
pub struct TlsIdentity {
    /// The certificate chain (the edge's: `[edge certificate, CA certificate]`; the agent's: its
    /// certificate).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf certificate's private key.
    pub key: PrivateKeyDer<'static>,
    /// The pairing CA certificate.
    pub ca_cert: CertificateDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self { cert_chain: self.cert_chain.clone(), key: self.key.clone_key(), ca_cert: self.ca_cert.clone() }
    }
}

/// A certificate issued by redeeming a token.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The agent the certificate names.
    pub agent_name: String,
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// The CA certificate (DER).
    pub ca_der: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    agent: String,
    secret_sha256: String,
    expires_at_unix: u64,
}

/// A token issued and not yet redeemed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingToken {
    /// The token's public id.
    pub token_id: String,
    /// The agent it pairs.
    pub agent: String,
    /// When it stops working, seconds since the Unix epoch.
    pub expires_at_unix: u64,
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EdgeStateError + '_ {
    move |source| EdgeStateError::Io { path: path.to_owned(), source }
}

/// An opened edge state directory.
#[derive(Debug)]
pub struct EdgeState {
    dir: PathBuf,
    ca: PairingCa,
}

impl EdgeState {
    /// Creates the CA and the edge's tunnel certificate for `names` (plus `localhost` and
    /// `127.0.0.1`). Refuses to overwrite an existing CA.
    pub fn init(dir: &Path, names: &[String], now: SystemTime) -> Result<Self, EdgeStateError> {
        if dir.join(CA_KEY).exists() {
            return Err(EdgeStateError::AlreadyInitialized(dir.to_owned()));
        }
        for sub in ["", TOKENS_DIR, AGENTS_DIR] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_err(&path))?;
        }
        let ca = PairingCa::generate(now, DEFAULT_CA_VALIDITY)?;
        let (edge_cert, edge_key) = ca.issue_edge_cert(names, now, DEFAULT_EDGE_CERT_VALIDITY)?;
        let write = |name: &str, contents: &[u8], mode: u32| {
            let path = dir.join(name);
            write_atomic(&path, contents, mode).map_err(io_err(&path))
        };
        write(CA_KEY, ca.key_pem().as_bytes(), 0o600)?;
        write(CA_CERT, ca.cert_pem().as_bytes(), 0o644)?;
        write(EDGE_IDENTITY, format!("{edge_key}{edge_cert}").as_bytes(), 0o600)?;
        Ok(Self { dir: dir.to_owned(), ca })
    }

    /// Opens an initialised state directory, checking key permissions and parsing the CA.
    pub fn open(dir: &Path) -> Result<Self, EdgeStateError> {
        let key_path = dir.join(CA_KEY);
        if !key_path.exists() {
            return Err(EdgeStateError::NotInitialized(dir.to_owned()));
        }
        let key = read_private_key_file(&key_path).map_err(io_err(&key_path))?;
        let cert_path = dir.join(CA_CERT);
        let cert = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        let key = String::from_utf8(key).map_err(|_| EdgeStateError::Corrupt(key_path.clone()))?;
        let cert = String::from_utf8(cert).map_err(|_| EdgeStateError::Corrupt(cert_path.clone()))?;
        let ca = PairingCa::from_pem(&cert, &key).map_err(|_| EdgeStateError::Corrupt(dir.join(CA_CERT)))?;
        for sub in [TOKENS_DIR, AGENTS_DIR] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_err(&path))?;
        }
        Ok(Self { dir: dir.to_owned(), ca })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pairing CA.
    pub fn ca(&self) -> &PairingCa {
        &self.ca
    }

    /// Loads the edge's tunnel certificate chain and key.
    pub fn tls_material(&self) -> Result<TlsIdentity, EdgeStateError> {
        let path = self.dir.join(EDGE_IDENTITY);
        let pem = read_private_key_file(&path).map_err(|source| EdgeStateError::Io { path: path.clone(), source })?;
        let leaf = CertificateDer::from_pem_slice(&pem).map_err(|_| EdgeStateError::Corrupt(path.clone()))?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| EdgeStateError::Corrupt(path))?;
        let ca_cert = CertificateDer::from(self.ca.cert_der().to_vec());
        Ok(TlsIdentity { cert_chain: vec![leaf, ca_cert.clone()], key, ca_cert })
    }

    /// Re-issues the edge's tunnel certificate from the CA, for the same names, once two thirds
    /// of its validity have passed. Returns whether it did; the caller then loads the new one.
    pub fn renew_edge_cert_if_due(&self, now: SystemTime) -> Result<bool, EdgeStateError> {
        let material = self.tls_material()?;
        let path = self.dir.join(EDGE_IDENTITY);
        let leaf = material.cert_chain.first().ok_or_else(|| EdgeStateError::Corrupt(path.clone()))?;
        let (not_before, not_after) = cert_validity(leaf).map_err(|_| EdgeStateError::Corrupt(path.clone()))?;
        if !renewal_due(not_before, not_after, now) {
            return Ok(false);
        }
        let names = cert_subject_alt_names(leaf).map_err(|_| EdgeStateError::Corrupt(path.clone()))?;
        let (cert, key) = self.ca.issue_edge_cert(&names, now, DEFAULT_EDGE_CERT_VALIDITY)?;
        write_atomic(&path, format!("{key}{cert}").as_bytes(), 0o600)
            .map_err(|source| EdgeStateError::Io { path, source })?;
        Ok(true)
    }

    /// Issues a pairing token for `agent`, valid for `ttl`, naming `edge_addr` as the place to
    /// redeem it. The edge keeps only a hash of the secret. A name that is paired now is
    /// refused unless `replace` is set; a revoked one may be paired again freely.
    pub fn create_token(
        &self,
        agent: &str,
        edge_addr: &str,
        ttl: Duration,
        now: SystemTime,
        replace: bool,
    ) -> Result<PairingToken, EdgeStateError> {
        validate_agent_name(agent)?;
        if !replace
            && let Some(record) = self.agent_record(agent)?
            && record.status == crate::AgentStatus::Paired
        {
            return Err(EdgeStateError::AlreadyPaired(agent.to_owned()));
        }
        let token = PairingToken::generate(edge_addr.to_owned(), self.ca.pin()?)?;
        let record = TokenRecord {
            agent: agent.to_owned(),
            secret_sha256: token.secret_hash_hex(),
            expires_at_unix: unix(now.checked_add(ttl).unwrap_or(now)),
        };
        let path = self.token_path(&token.token_id, "toml");
        let text = toml::to_string(&record)
            .map_err(|e| EdgeStateError::Io { path: path.clone(), source: io::Error::other(e) })?;
        write_atomic(&path, text.as_bytes(), 0o600).map_err(io_err(&path))?;
        Ok(token)
    }

    fn token_path(&self, token_id: &str, ext: &str) -> PathBuf {
        self.dir.join(TOKENS_DIR).join(format!("{token_id}.{ext}"))
    }

    /// Tokens issued and neither redeemed nor cancelled, expired ones included (with their
    /// expiry, so the caller can tell).
    pub fn pending_tokens(&self) -> Vec<PendingToken> {
        let Ok(read) = fs::read_dir(self.dir.join(TOKENS_DIR)) else { return Vec::new() };
        let mut tokens: Vec<PendingToken> = read
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let file = entry.file_name().to_string_lossy().into_owned();
                let token_id = file.strip_suffix(".toml")?.to_owned();
                let text = fs::read_to_string(entry.path()).ok()?;
                let record: TokenRecord = toml::from_str(&text).ok()?;
                Some(PendingToken { token_id, agent: record.agent, expires_at_unix: record.expires_at_unix })
            })
            .collect();
        tokens.sort_by(|a, b| (&a.agent, a.expires_at_unix).cmp(&(&b.agent, b.expires_at_unix)));
        tokens
    }

    /// Cancels every pending token for `agent`; returns how many there were.
    pub fn cancel_tokens(&self, agent: &str) -> Result<usize, EdgeStateError> {
        let mut cancelled = 0;
        for token in self.pending_tokens().into_iter().filter(|t| t.agent == agent) {
            let path = self.token_path(&token.token_id, "toml");
            match fs::remove_file(&path) {
                Ok(()) => cancelled += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(EdgeStateError::Io { path, source }),
            }
        }
        Ok(cancelled)
    }

    /// Redeems a token: checks it, signs the CSR, spends the token atomically (a concurrent
    /// redeemer of the same token gets [`RedeemError::Spent`]), and records the agent.
    pub fn redeem(
        &self,
        token_id: &str,
        secret: &[u8],
        csr_der: &[u8],
        now: SystemTime,
        validity: Duration,
    ) -> Result<IssuedCert, RedeemError> {
        if !PairingToken::is_valid_id(token_id) {
            return Err(RedeemError::UnknownToken);
        }
        let pending = self.token_path(token_id, "toml");
        // A spent token keeps its record (the spend is a rename), so its secret is checked like
        // a pending one's: "already used" is only said to whoever holds the secret, and a wrong
        // secret is a failed attempt whatever the token's state.
        let (path, spent) = match fs::metadata(&pending) {
            Ok(_) => (pending.clone(), false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (self.token_path(token_id, "spent"), true),
            Err(e) => return Err(RedeemError::Internal(format!("{}: {e}", pending.display()))),
        };
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // Spent between the look and the read: the spent record is there now.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !spent => {
                return self.redeem(token_id, secret, csr_der, now, validity);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RedeemError::UnknownToken),
            Err(e) => return Err(RedeemError::Internal(format!("{}: {e}", path.display()))),
        };
        let record: TokenRecord =
            toml::from_str(&text).map_err(|e| RedeemError::Internal(format!("{}: {}", path.display(), e.message())))?;
        let presented = secret_hash_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(record.secret_hash_bytes())) {
            return Err(RedeemError::BadSecret);
        }
        if spent {
            return Err(RedeemError::Spent);
        }
        if unix(now) >= record.expires_at_unix {
            return Err(RedeemError::Expired);
        }
        let issued: IssuedAgentCert =
            self.ca.sign_agent_csr(csr_der, &record.agent, now, validity).map_err(|e| match e {
                CaError::BadCsr(_) => RedeemError::BadCsr(e),
                other => RedeemError::Internal(other.to_string()),
            })?;
        // The spend: rename is atomic, so of two concurrent redeemers exactly one succeeds.
        match fs::rename(&pending, self.token_path(token_id, "spent")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RedeemError::Spent),
            Err(e) => return Err(RedeemError::Internal(format!("{}: {e}", pending.display()))),
        }
        self.record_issued(&record.agent, &issued, now, true).map_err(|e| RedeemError::Internal(e.to_string()))?;
        Ok(IssuedCert { agent_name: record.agent, cert_der: issued.cert_der, ca_der: self.ca.cert_der().to_vec() })
    }
}

impl TokenRecord {
    fn secret_hash_bytes(&self) -> &[u8] {
        self.secret_sha256.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::generate_agent_csr;

    const TTL: Duration = Duration::from_secs(900);
    const VALIDITY: Duration = Duration::from_secs(3600);

    fn state() -> (tempfile::TempDir, EdgeState) {
        let dir = tempfile::tempdir().unwrap();
        let state = EdgeState::init(dir.path(), &["edge.example.com".into()], SystemTime::now()).unwrap();
        (dir, state)
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_keys_0600_and_refuses_to_run_twice() {
        let (dir, _state) = state();
        assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
        assert_eq!(mode(&dir.path().join(EDGE_IDENTITY)), 0o600);
        assert!(matches!(
            EdgeState::init(dir.path(), &[], SystemTime::now()),
            Err(EdgeStateError::AlreadyInitialized(_))
        ));
        let reopened = EdgeState::open(dir.path()).unwrap();
        reopened.tls_material().unwrap();
    }

    #[test]
    fn the_token_record_holds_only_a_hash_of_the_secret() {
        let (dir, state) = state();
        let token = state.create_token("bot", "127.0.0.1:4433", TTL, SystemTime::now(), false).unwrap();
        let record = fs::read_to_string(dir.path().join(TOKENS_DIR).join(format!("{}.toml", token.token_id))).unwrap();
        let secret_hex: String = token.secret.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!record.contains(&secret_hex));
        assert!(record.contains(&token.secret_hash_hex()));
    }

    #[test]
    fn a_token_redeems_once_then_is_spent() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let token = state.create_token("bot", "127.0.0.1:4433", TTL, now, false).unwrap();
        let (_key, csr) = generate_agent_csr("bot").unwrap();
        let issued = state.redeem(&token.token_id, &token.secret, &csr, now, VALIDITY).unwrap();
        assert_eq!(issued.agent_name, "bot");
        assert_eq!(state.agent_record("bot").unwrap().unwrap().status, crate::AgentStatus::Paired);
        assert!(matches!(state.redeem(&token.token_id, &token.secret, &csr, now, VALIDITY), Err(RedeemError::Spent)));
        assert!(
            matches!(state.redeem(&token.token_id, b"guessed", &csr, now, VALIDITY), Err(RedeemError::BadSecret)),
            "a spent token's id alone learns nothing: the secret is checked first"
        );
    }

    #[test]
    fn expired_wrong_secret_unknown_and_bad_csr_are_refused_without_spending() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let token = state.create_token("bot", "127.0.0.1:4433", TTL, now, false).unwrap();
        let (_key, csr) = generate_agent_csr("bot").unwrap();
        let later = now + TTL + Duration::from_secs(1);
        assert!(matches!(
            state.redeem(&token.token_id, &token.secret, &csr, later, VALIDITY),
            Err(RedeemError::Expired)
        ));
        assert!(matches!(state.redeem(&token.token_id, b"wrong", &csr, now, VALIDITY), Err(RedeemError::BadSecret)));
        assert!(matches!(
            state.redeem("00112233aabbccdd", &token.secret, &csr, now, VALIDITY),
            Err(RedeemError::UnknownToken)
        ));
        assert!(matches!(state.redeem("../../ca", &token.secret, &csr, now, VALIDITY), Err(RedeemError::UnknownToken)));
        assert!(matches!(
            state.redeem(&token.token_id, &token.secret, b"not a csr", now, VALIDITY),
            Err(RedeemError::BadCsr(_))
        ));
        // None of the refusals spent the token.
        state.redeem(&token.token_id, &token.secret, &csr, now, VALIDITY).unwrap();
    }

    #[test]
    fn concurrent_redeemers_of_one_token_have_exactly_one_winner() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let token = state.create_token("bot", "127.0.0.1:4433", TTL, now, false).unwrap();
        let state = std::sync::Arc::new(state);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (state, token) = (state.clone(), token.clone());
                std::thread::spawn(move || {
                    let (_key, csr) = generate_agent_csr("bot").unwrap();
                    state.redeem(&token.token_id, &token.secret, &csr, now, VALIDITY).is_ok()
                })
            })
            .collect();
        let winners = handles.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count();
        assert_eq!(winners, 1);
    }

    fn paired(state: &EdgeState, name: &str, now: SystemTime) -> (String, IssuedCert) {
        let token = state.create_token(name, "127.0.0.1:4433", TTL, now, true).unwrap();
        let (key, csr) = generate_agent_csr(name).unwrap();
        (key, state.redeem(&token.token_id, &token.secret, &csr, now, VALIDITY).unwrap())
    }

    fn serial(issued: &IssuedCert) -> String {
        crate::cert_serial_hex(&issued.cert_der).unwrap()
    }

    #[test]
    fn only_listed_unexpired_certificates_of_a_paired_agent_are_accepted() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let (_, issued) = paired(&state, "bot", now);
        state.check_agent("bot", &serial(&issued), now).unwrap();
        assert!(matches!(state.check_agent("bot", "00ff", now), Err(crate::AgentRefusal::NotCurrent { .. })));
        assert!(matches!(state.check_agent("ghost", &serial(&issued), now), Err(crate::AgentRefusal::NotPaired(_))));
        let later = now + VALIDITY + Duration::from_secs(1);
        assert!(matches!(state.check_agent("bot", &serial(&issued), later), Err(crate::AgentRefusal::Expired(_))));
    }

    #[test]
    fn pairing_a_paired_name_needs_replace_and_retires_the_old_certificate() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let (_, first) = paired(&state, "bot", now);
        assert!(matches!(
            state.create_token("bot", "127.0.0.1:4433", TTL, now, false),
            Err(EdgeStateError::AlreadyPaired(_))
        ));
        let (_, second) = paired(&state, "bot", now);
        assert!(matches!(state.check_agent("bot", &serial(&first), now), Err(crate::AgentRefusal::NotCurrent { .. })));
        state.check_agent("bot", &serial(&second), now).unwrap();
    }

    #[test]
    fn revoking_refuses_every_certificate_and_re_pairing_needs_no_replace() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let (_, old) = paired(&state, "bot", now);
        state.revoke("bot", now).unwrap();
        assert!(matches!(state.check_agent("bot", &serial(&old), now), Err(crate::AgentRefusal::Revoked(_))));
        assert!(matches!(state.revoke("ghost", now), Err(EdgeStateError::UnknownAgent(_))));
        let (_, csr) = generate_agent_csr("bot").unwrap();
        assert!(matches!(state.renew("bot", &csr, now, VALIDITY), Err(crate::RenewError::Refused(_))));

        let token = state.create_token("bot", "127.0.0.1:4433", TTL, now, false).unwrap();
        let fresh = state.redeem(&token.token_id, &token.secret, &csr, now, VALIDITY).unwrap();
        state.check_agent("bot", &serial(&fresh), now).unwrap();
        assert!(
            state.check_agent("bot", &serial(&old), now).is_err(),
            "a certificate from before the revoke stays refused"
        );
    }

    #[test]
    fn renewal_adds_a_certificate_and_keeps_the_previous_one_until_it_expires() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        let (_, first) = paired(&state, "bot", now);
        let (_, csr) = generate_agent_csr("bot").unwrap();
        let later = now + VALIDITY.mul_f64(0.7);
        let renewed = state.renew("bot", &csr, later, VALIDITY).unwrap();
        state.check_agent("bot", &serial(&first), later).unwrap();
        state.check_agent("bot", &serial(&renewed), later).unwrap();
        assert_eq!(crate::agent_name_from_cert(&renewed.cert_der).unwrap(), "bot");
        // A renewal after the first expired drops it from the record.
        let much_later = now + VALIDITY + Duration::from_secs(5);
        let (_, csr) = generate_agent_csr("bot").unwrap();
        state.renew("bot", &csr, much_later, VALIDITY).unwrap();
        let record = state.agent_record("bot").unwrap().unwrap();
        assert!(record.certificates.iter().all(|c| c.serial != serial(&first)));
    }

    #[test]
    fn a_corrupt_agent_record_affects_only_that_agent() {
        let (dir, state) = state();
        let now = SystemTime::now();
        let (_, good) = paired(&state, "good", now);
        paired(&state, "broken", now);
        fs::write(dir.path().join("agents/broken.toml"), "name = \"broken\"\nstatus = ").unwrap();
        let refusal = state.check_agent("broken", "00", now).unwrap_err();
        assert!(
            matches!(&refusal, crate::AgentRefusal::Corrupt { reason, .. } if reason.contains("broken.toml")),
            "{refusal}"
        );
        state.check_agent("good", &serial(&good), now).unwrap();
        let listed = state.list_agents().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(
            listed
                .iter()
                .any(|e| e.name == "broken" && e.record.as_ref().is_err_and(|err| err.contains("broken.toml")))
        );
    }

    #[test]
    fn pending_tokens_are_listed_and_cancelled_by_agent() {
        let (_dir, state) = state();
        let now = SystemTime::now();
        state.create_token("a", "127.0.0.1:4433", TTL, now, false).unwrap();
        state.create_token("a", "127.0.0.1:4433", TTL, now, false).unwrap();
        let b = state.create_token("b", "127.0.0.1:4433", TTL, now, false).unwrap();
        assert_eq!(state.pending_tokens().len(), 3);
        assert_eq!(state.cancel_tokens("a").unwrap(), 2);
        let left = state.pending_tokens();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].token_id, b.token_id);
    }

    #[test]
    fn the_edge_certificate_is_renewed_for_the_same_names_only_when_due() {
        let (_dir, state) = state();
        let before = state.tls_material().unwrap().cert_chain[0].clone();
        assert!(!state.renew_edge_cert_if_due(SystemTime::now()).unwrap());
        let late = SystemTime::now() + DEFAULT_EDGE_CERT_VALIDITY.mul_f64(0.9);
        assert!(state.renew_edge_cert_if_due(late).unwrap());
        let after = state.tls_material().unwrap().cert_chain[0].clone();
        assert_ne!(before, after);
        let mut names = cert_subject_alt_names(&after).unwrap();
        names.sort();
        assert_eq!(names, ["127.0.0.1", "edge.example.com", "localhost"]);
        let (_, not_after) = cert_validity(&after).unwrap();
        assert!(not_after > late + DEFAULT_EDGE_CERT_VALIDITY.mul_f64(0.9));
    }

    #[test]
    fn a_corrupt_ca_certificate_is_named_in_the_error() {
        let (dir, _state) = state();
        fs::write(dir.path().join(CA_CERT), "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
        let err = EdgeState::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }
}
