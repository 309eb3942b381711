//! Paired agents as the edge records them: one TOML file per agent under `agents/`, holding its
//! status and the serials of its live certificates. A certificate is accepted only while its
//! serial is listed, so revoking an agent, or pairing it again, retires every older certificate
//! at once. Read-modify-write of a record happens under an exclusive lock on `agents/.lock`, so
//! the running edge (renewals) and the CLI (revoke) never lose each other's updates.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::ca::{CaError, IssuedAgentCert, validate_agent_name};
use crate::edge_state::{AGENTS_DIR, EdgeState, EdgeStateError, IssuedCert, unix};
use crate::fsutil::write_atomic;

const LOCK_FILE: &str = ".lock";

/// Whether an agent may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// Paired: its listed certificates are accepted until they expire.
    Paired,
    /// Revoked: every certificate it ever had is refused. Pairing again makes it `Paired`.
    Revoked,
}

/// One live certificate of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: u64,
}

/// The edge's record of one agent (`agents/NAME.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// The agent name (its certificates' subject).
    pub name: String,
    /// Paired or revoked.
    pub status: AgentStatus,
    /// Certificates accepted now: the current one, and during a renewal the one it replaces.
    pub certificates: Vec<CertEntry>,
    /// When it was (last) paired, seconds since the Unix epoch.
    pub paired_at_unix: u64,
    /// When it was revoked, if it is.
    #[serde(default)]
    pub revoked_at_unix: Option<u64>,
}

impl AgentRecord {
    /// The newest certificate.
    pub fn current(&self) -> Option<&CertEntry> {
        self.certificates.iter().max_by_key(|c| c.not_after_unix)
    }
}

/// Why an agent certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentRefusal {
    /// No agent of that name is paired here.
    #[error("agent {0:?} is not paired with this edge")]
    NotPaired(String),
    /// The agent was revoked.
    #[error("agent {0:?} was revoked; pair it again to restore it")]
    Revoked(String),
    /// The certificate has expired.
    #[error("the certificate of agent {0:?} has expired; the agent must be paired again")]
    Expired(String),
    /// The certificate was replaced by a newer pairing or renewal and is no longer accepted.
    #[error("certificate {serial} of agent {name:?} is no longer current (replaced or revoked)")]
    NotCurrent {
        /// The agent.
        name: String,
        /// The refused serial.
        serial: String,
    },
    /// The agent's record cannot be read; the agent is refused until it is repaired.
    #[error("the record of agent {name:?} is unreadable: {reason}")]
    Corrupt {
        /// The agent.
        name: String,
        /// What is wrong, naming the file.
        reason: String,
    },
}

/// Why a renewal was refused.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The agent may not hold a certificate any more.
    #[error(transparent)]
    Refused(#[from] AgentRefusal),
    /// The CSR is invalid.
    #[error("invalid CSR: {0}")]
    BadCsr(CaError),
    /// The edge failed internally (disk, signing).
    #[error("internal error: {0}")]
    Internal(String),
}

/// A listed agent record, or the reason it cannot be read.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    /// The agent name (from the file name when the record is unreadable).
    pub name: String,
    /// The record, or an error naming the file.
    pub record: Result<AgentRecord, String>,
}

/// An exclusive lock on the agent records, released on drop.
struct RegistryLock(File);

impl Drop for RegistryLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl EdgeState {
    pub(crate) fn agent_path(&self, name: &str) -> PathBuf {
        self.dir().join(AGENTS_DIR).join(format!("{name}.toml"))
    }

    fn lock_registry(&self) -> Result<RegistryLock, EdgeStateError> {
        let path = self.dir().join(AGENTS_DIR).join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| EdgeStateError::Io { path: path.clone(), source })?;
        file.lock().map_err(|source| EdgeStateError::Io { path, source })?;
        Ok(RegistryLock(file))
    }

    /// The record of `name`: `Ok(None)` if there is none, an error naming the file if it is
    /// unreadable.
    pub fn agent_record(&self, name: &str) -> Result<Option<AgentRecord>, EdgeStateError> {
        if validate_agent_name(name).is_err() {
            return Ok(None);
        }
        let path = self.agent_path(name);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(EdgeStateError::Io { path, source }),
        };
        match toml::from_str::<AgentRecord>(&text) {
            Ok(record) if record.name == name => Ok(Some(record)),
            Ok(record) => Err(EdgeStateError::CorruptRecord { path, reason: format!("names agent {:?}", record.name) }),
            Err(e) => Err(EdgeStateError::CorruptRecord { path, reason: e.message().replace('\n', " ") }),
        }
    }

    fn write_agent_record(&self, record: &AgentRecord) -> Result<(), EdgeStateError> {
        let path = self.agent_path(&record.name);
        let text = toml::to_string(record)
            .map_err(|e| EdgeStateError::Io { path: path.clone(), source: io::Error::other(e) })?;
        write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| EdgeStateError::Io { path, source })
    }

    /// Whether the certificate `serial` of agent `name` may connect at `now`.
    pub fn check_agent(&self, name: &str, serial: &str, now: SystemTime) -> Result<(), AgentRefusal> {
        let record = match self.agent_record(name) {
            Ok(Some(record)) => record,
            Ok(None) => return Err(AgentRefusal::NotPaired(name.to_owned())),
            Err(e) => return Err(AgentRefusal::Corrupt { name: name.to_owned(), reason: e.to_string() }),
        };
        if record.status == AgentStatus::Revoked {
            return Err(AgentRefusal::Revoked(name.to_owned()));
        }
        match record.certificates.iter().find(|c| c.serial == serial) {
            None => Err(AgentRefusal::NotCurrent { name: name.to_owned(), serial: serial.to_owned() }),
            Some(cert) if unix(now) >= cert.not_after_unix => Err(AgentRefusal::Expired(name.to_owned())),
            Some(_) => Ok(()),
        }
    }

    /// Records a certificate just issued to `name`. A pairing (`replace`) makes it the only
    /// accepted certificate and clears a revocation; a renewal adds it beside the one it
    /// replaces, dropping certificates that have expired.
    pub(crate) fn record_issued(
        &self,
        name: &str,
        issued: &IssuedAgentCert,
        now: SystemTime,
        replace: bool,
    ) -> Result<(), EdgeStateError> {
        let _lock = self.lock_registry()?;
        let entry = CertEntry { serial: issued.serial_hex.clone(), not_after_unix: unix(issued.not_after) };
        let record = match (replace, self.agent_record(name)?) {
            (false, Some(mut record)) => {
                if record.status == AgentStatus::Revoked {
                    return Err(EdgeStateError::Revoked(name.to_owned()));
                }
                record.certificates.retain(|c| c.not_after_unix > unix(now));
                record.certificates.push(entry);
                record
            }
            (false, None) => return Err(EdgeStateError::UnknownAgent(name.to_owned())),
            (true, _) => AgentRecord {
                name: name.to_owned(),
                status: AgentStatus::Paired,
                certificates: vec![entry],
                paired_at_unix: unix(now),
                revoked_at_unix: None,
            },
        };
        self.write_agent_record(&record)
    }

    /// Issues a renewed certificate for a connected agent from a CSR for its new key.
    pub fn renew(
        &self,
        name: &str,
        csr_der: &[u8],
        now: SystemTime,
        validity: Duration,
    ) -> Result<IssuedCert, RenewError> {
        match self.agent_record(name) {
            Ok(Some(record)) if record.status == AgentStatus::Paired => {}
            Ok(Some(_)) => return Err(AgentRefusal::Revoked(name.to_owned()).into()),
            Ok(None) => return Err(AgentRefusal::NotPaired(name.to_owned()).into()),
            Err(e) => return Err(AgentRefusal::Corrupt { name: name.to_owned(), reason: e.to_string() }.into()),
        }
        let issued = self.ca().sign_agent_csr(csr_der, name, now, validity).map_err(|e| match e {
            CaError::BadCsr(_) => RenewError::BadCsr(e),
            other => RenewError::Internal(other.to_string()),
        })?;
        self.record_issued(name, &issued, now, false).map_err(|e| match e {
            EdgeStateError::Revoked(name) => RenewError::Refused(AgentRefusal::Revoked(name)),
            other => RenewError::Internal(other.to_string()),
        })?;
        Ok(IssuedCert { agent_name: name.to_owned(), cert_der: issued.cert_der, ca_der: self.ca().cert_der().to_vec() })
    }

    /// Issues a key and certificate for `name` on the edge and returns them as a bundle for
    /// platforms where the agent cannot keep a state directory. Like pairing, it replaces any
    /// earlier certificate; a name paired now needs `replace`.
    pub fn issue_bundle(
        &self,
        name: &str,
        edge_addr: &str,
        validity: Duration,
        now: SystemTime,
        replace: bool,
    ) -> Result<String, EdgeStateError> {
        validate_agent_name(name)?;
        if !replace && self.agent_record(name)?.is_some_and(|r| r.status == AgentStatus::Paired) {
            return Err(EdgeStateError::AlreadyPaired(name.to_owned()));
        }
        let (key_pem, csr_der) = crate::generate_agent_csr(name)?;
        let issued = self.ca().sign_agent_csr(&csr_der, name, now, validity)?;
        self.record_issued(name, &issued, now, true)?;
        Ok(crate::AgentState::bundle_text(name, edge_addr, &key_pem, &issued.cert_der, self.ca().cert_der()))
    }

    /// Revokes `name`: every certificate it holds is refused from now on.
    pub fn revoke(&self, name: &str, now: SystemTime) -> Result<AgentRecord, EdgeStateError> {
        let _lock = self.lock_registry()?;
        let mut record = self.agent_record(name)?.ok_or_else(|| EdgeStateError::UnknownAgent(name.to_owned()))?;
        record.status = AgentStatus::Revoked;
        record.certificates.clear();
        record.revoked_at_unix = Some(unix(now));
        self.write_agent_record(&record)?;
        Ok(record)
    }

    /// Every agent record, sorted by name; unreadable ones are listed with their error.
    pub fn list_agents(&self) -> Result<Vec<AgentEntry>, EdgeStateError> {
        let dir = self.dir().join(AGENTS_DIR);
        let read = fs::read_dir(&dir).map_err(|source| EdgeStateError::Io { path: dir.clone(), source })?;
        let mut entries: Vec<AgentEntry> = read
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let file = entry.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(".toml")?.to_owned();
                if name.starts_with('.') {
                    return None;
                }
                let record = match self.agent_record(&name) {
                    Ok(Some(record)) => Ok(record),
                    Ok(None) => Err(format!("{}: not a valid agent name", entry.path().display())),
                    Err(e) => Err(e.to_string()),
                };
                Some(AgentEntry { name, record })
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }
}
