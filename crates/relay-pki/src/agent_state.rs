//! The agent's state directory: its key, its certificate, the CA, and where the edge is.
//!
//! Layout (every file written atomically; the key mode 0600):
//!
//! ```text
//! identity.pem the agent's private key (generated on this host, never sent anywhere) and the
//!              certificate the edge signed for it, in one file (mode 0600) so a renewal
//!              replaces both at once
//! ca.crt       the pairing CA (checked against the token's pin when paired)
//! agent.toml   the agent's name and the edge's tunnel address
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_private_key_file, write_atomic};

const IDENTITY: &str = "identity.pem";
const CA_CERT: &str = "ca.crt";
const AGENT_TOML: &str = "agent.toml";

/// Why the agent state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AgentStateError {
    /// The directory holds no pairing: `relay-agent pair` was not run.
    #[error("{0} holds no agent identity; run `relay-agent pair --state-dir {0} --token TOKEN` first")]
    NotPaired(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A file does not parse.
    #[error("{0}: corrupt or truncated")]
    Corrupt(PathBuf),
    /// A bundle is malformed.
    #[error("invalid agent bundle: {0}")]
    Bundle(String),
}

/// First line of every bundle.
const BUNDLE_HEADER: &str = "# acs-relay agent bundle";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentToml {
    name: String,
    edge_addr: String,
}

/// The agent's credentials, ready for rustls.
#[derive(Debug)]
pub struct AgentIdentity {
    /// The agent's name (its certificate subject).
    pub name: String,
    /// The edge's tunnel address recorded at pairing.
    pub edge_addr: String,
    /// `[agent certificate]`.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The agent's private key.
    pub key: PrivateKeyDer<'static>,
    /// The pairing CA, the only root the agent trusts for the edge.
    pub ca_cert: CertificateDer<'static>,
}

impl AgentIdentity {
    /// The certificate, key and CA to dial the tunnel with.
    pub fn tls(&self) -> crate::TlsIdentity {
        crate::TlsIdentity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca_cert: self.ca_cert.clone(),
        }
    }
}

/// Reads and writes the agent state directory.
#[derive(Debug)]
pub struct AgentState;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AgentStateError + '_ {
    move |source| AgentStateError::Io { path: path.to_owned(), source }
}

impl AgentState {
    /// Stores a fresh pairing: key (0600), certificate, CA and edge address.
    pub fn save(
        dir: &Path,
        name: &str,
        edge_addr: &str,
        key_pem: &str,
        cert_der: &[u8],
        ca_der: &[u8],
    ) -> Result<(), AgentStateError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let write = |file: &str, contents: &[u8], mode: u32| {
            let path = dir.join(file);
            write_atomic(&path, contents, mode).map_err(io_err(&path))
        };
        let toml = toml::to_string(&AgentToml { name: name.to_owned(), edge_addr: edge_addr.to_owned() })
            .map_err(|e| AgentStateError::Io { path: dir.join(AGENT_TOML), source: io::Error::other(e) })?;
        write(IDENTITY, identity_pem(key_pem, cert_der).as_bytes(), 0o600)?;
        write(CA_CERT, pem("CERTIFICATE", ca_der).as_bytes(), 0o644)?;
        write(AGENT_TOML, toml.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Replaces the key and certificate after a renewal, atomically: a crash leaves either the
    /// old pair or the new one.
    pub fn save_renewed(dir: &Path, key_pem: &str, cert_der: &[u8]) -> Result<(), AgentStateError> {
        let path = dir.join(IDENTITY);
        write_atomic(&path, identity_pem(key_pem, cert_der).as_bytes(), 0o600).map_err(io_err(&path))
    }

    /// Whether `dir` already holds a pairing.
    pub fn exists(dir: &Path) -> bool {
        dir.join(AGENT_TOML).exists() || dir.join(IDENTITY).exists()
    }

    /// Loads the pairing, refusing a key file readable by group or others.
    pub fn load(dir: &Path) -> Result<AgentIdentity, AgentStateError> {
        let toml_path = dir.join(AGENT_TOML);
        let text = match fs::read_to_string(&toml_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AgentStateError::NotPaired(dir.to_owned())),
            Err(e) => return Err(io_err(&toml_path)(e)),
        };
        let meta: AgentToml = toml::from_str(&text).map_err(|_| AgentStateError::Corrupt(toml_path.clone()))?;
        let path = dir.join(IDENTITY);
        let identity = read_private_key_file(&path).map_err(io_err(&path))?;
        let key = PrivateKeyDer::from_pem_slice(&identity).map_err(|_| AgentStateError::Corrupt(path.clone()))?;
        let cert = CertificateDer::from_pem_slice(&identity).map_err(|_| AgentStateError::Corrupt(path))?;
        let ca_path = dir.join(CA_CERT);
        let ca_cert = CertificateDer::from_pem_file(&ca_path).map_err(|_| AgentStateError::Corrupt(ca_path))?;
        Ok(AgentIdentity { name: meta.name, edge_addr: meta.edge_addr, cert_chain: vec![cert], key, ca_cert })
    }
}

impl AgentState {
    /// The text of a bundle: a comment header naming the agent and the edge, then the private
    /// key, the agent certificate and the CA certificate as PEM.
    pub fn bundle_text(name: &str, edge_addr: &str, key_pem: &str, cert_der: &[u8], ca_der: &[u8]) -> String {
        format!(
            "{BUNDLE_HEADER}: holds agent {name:?}'s private key; store it as a secret.\n# agent: {name}\n# edge: {edge_addr}\n{}{}",
            identity_pem(key_pem, cert_der),
            pem("CERTIFICATE", ca_der)
        )
    }

    /// Reads a bundle made by [`AgentState::bundle_text`].
    pub fn from_bundle(text: &str) -> Result<AgentIdentity, AgentStateError> {
        let bad = |what: &str| AgentStateError::Bundle(what.to_owned());
        if !text.trim_start().starts_with(BUNDLE_HEADER) {
            return Err(bad("it does not start with the acs-relay bundle header"));
        }
        let field = |key: &str| {
            text.lines().find_map(|line| line.strip_prefix(&format!("# {key}: ")).map(|v| v.trim().to_owned()))
        };
        let name = field("agent").ok_or_else(|| bad("no '# agent:' line"))?;
        let edge_addr = field("edge").ok_or_else(|| bad("no '# edge:' line"))?;
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|_| bad("no private key"))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("a certificate does not parse"))?;
        let [cert, ca_cert] = <[CertificateDer<'static>; 2]>::try_from(certs)
            .map_err(|_| bad("expected exactly two certificates (agent, then CA)"))?;
        if crate::agent_name_from_cert(&cert).ok().as_deref() != Some(name.as_str()) {
            return Err(bad("the certificate does not name the agent in the header"));
        }
        Ok(AgentIdentity { name, edge_addr, cert_chain: vec![cert], key, ca_cert })
    }
}

fn identity_pem(key_pem: &str, cert_der: &[u8]) -> String {
    format!("{key_pem}{}", pem("CERTIFICATE", cert_der))
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PairingCa, generate_agent_csr};
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_saved_pairing_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca = PairingCa::generate(now, Duration::from_secs(3600)).unwrap();
        let (key, csr) = generate_agent_csr("bot").unwrap();
        let issued = ca.sign_agent_csr(&csr, "bot", now, Duration::from_secs(60)).unwrap();
        AgentState::save(dir.path(), "bot", "127.0.0.1:4433", &key, &issued.cert_der, ca.cert_der()).unwrap();
        let id = AgentState::load(dir.path()).unwrap();
        assert_eq!((id.name.as_str(), id.edge_addr.as_str()), ("bot", "127.0.0.1:4433"));
        assert_eq!(id.cert_chain[0].as_ref(), issued.cert_der.as_slice());
        assert_eq!(id.ca_cert.as_ref(), ca.cert_der());
    }

    #[test]
    fn a_bundle_round_trips_and_damage_is_reported() {
        let now = SystemTime::now();
        let ca = PairingCa::generate(now, Duration::from_secs(3600)).unwrap();
        let (key, csr) = generate_agent_csr("bot").unwrap();
        let issued = ca.sign_agent_csr(&csr, "bot", now, Duration::from_secs(60)).unwrap();
        let text = AgentState::bundle_text("bot", "edge.example.com:4433", &key, &issued.cert_der, ca.cert_der());
        let id = AgentState::from_bundle(&text).unwrap();
        assert_eq!((id.name.as_str(), id.edge_addr.as_str()), ("bot", "edge.example.com:4433"));
        assert_eq!(id.ca_cert.as_ref(), ca.cert_der());
        assert!(matches!(AgentState::from_bundle("hello"), Err(AgentStateError::Bundle(_))));
        let renamed = text.replace("# agent: bot", "# agent: other");
        assert!(AgentState::from_bundle(&renamed).unwrap_err().to_string().contains("does not name"));
        let truncated = &text[..text.len() - 200];
        assert!(AgentState::from_bundle(truncated).is_err());
    }

    #[test]
    fn an_empty_directory_is_not_paired() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(AgentState::load(dir.path()), Err(AgentStateError::NotPaired(_))));
    }
}
