//! rustls configurations for both ends of the tunnel, all on the `ring` provider.
//!
//! * Edge: TLS 1.3 server offering [`TUNNEL_ALPN`] and [`PAIRING_ALPN`]. A client certificate,
//!   when presented, must chain to the pairing CA and carry the client-auth usage; the tunnel
//!   ALPN additionally *requires* one (checked right after the handshake, see `quic.rs`), while
//!   pairing connections come without one.
//! * Agent (tunnel): trusts only the pairing CA, presents its certificate.
//! * Agent (pairing): trusts only a CA whose key matches the token's pin.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use relay_pki::CaPin;
use relay_pki::TlsIdentity;
use relay_proto::{PAIRING_ALPN, TUNNEL_ALPN};
use rustls::DistinguishedName;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use crate::throttle::{LogThrottle, Verdict};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls rejected the certificates, key or settings.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate could not be used as a trust root.
    #[error("the pairing CA certificate is not a usable trust root: {0}")]
    BadRoot(String),
    /// The TLS configuration cannot carry QUIC (no TLS 1.3 or no QUIC-capable cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}

/// The one crypto provider used everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    store.add(ca.clone()).map_err(|e| TlsError::BadRoot(e.to_string()))?;
    Ok(Arc::new(store))
}

/// The edge's server configuration.
pub fn edge_server_config(identity: &TlsIdentity) -> Result<ServerConfig, TlsError> {
    let (cert_chain, key, ca) = (identity.cert_chain.clone(), identity.key.clone_key(), &identity.ca_cert);
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::BadRoot(e.to_string()))?;
    let verifier = Arc::new(AgentCertVerifier { inner });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec(), PAIRING_ALPN.to_vec()];
    Ok(config)
}

/// Agents refused for an expired certificate, logged once per agent name and then summarised:
/// one table per process, as there is one log.
static EXPIRED_AGENTS: std::sync::LazyLock<LogThrottle> = std::sync::LazyLock::new(LogThrottle::default);

/// The edge's client-certificate verifier: webpki's, which also names the agent when it refuses
/// a certificate that expired. The TLS error carries only the times; an operator needs to know
/// which agent to pair again.
#[derive(Debug)]
struct AgentCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl AgentCertVerifier {
    /// Logs an expired agent certificate with its name and expiry, if it is one of ours: it
    /// must verify at its last valid second, so a forged certificate names nobody.
    fn report_expired(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity) else { return };
        let not_after = cert.validity().not_after.timestamp();
        let Ok(last_valid) = u64::try_from(not_after) else { return };
        let at_expiry = UnixTime::since_unix_epoch(std::time::Duration::from_secs(last_valid));
        if self.inner.verify_client_cert(end_entity, intermediates, at_expiry).is_err() {
            return;
        }
        let Ok(agent) = relay_pki::agent_name_from_cert(end_entity) else { return };
        let expired_at = cert.validity().not_after.to_string();
        match EXPIRED_AGENTS.check(&agent, std::time::Instant::now()) {
            Verdict::Log => tracing::warn!(
                %agent,
                %expired_at,
                "refused an agent whose certificate has expired: pair it again (relay-edge pair, relay-agent pair)"
            ),
            Verdict::Summary(times) => {
                tracing::warn!(%agent, %expired_at, times, "still refusing an agent whose certificate has expired")
            }
            Verdict::Quiet => {}
        }
    }
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now);
        if let Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) = &verified
        {
            self.report_expired(end_entity, intermediates);
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The agent's tunnel client configuration: trusts only the pairing CA, presents its certificate.
pub fn agent_client_config(identity: &TlsIdentity) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&identity.ca_cert)?)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    Ok(config)
}

/// Shared flag that records whether the pinned verifier saw an edge whose CA does not match the
/// pin, so the pairing code can tell "wrong edge" from "no edge".
#[derive(Debug, Clone, Default)]
pub struct PinCheck(Arc<AtomicBool>);

impl PinCheck {
    /// Whether the edge presented a chain without the pinned CA.
    pub fn mismatched(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The agent's pairing client configuration: the edge must present a chain containing a CA
/// certificate whose key matches `pin`, and its certificate must verify against that CA.
pub fn pairing_client_config(pin: CaPin, check: PinCheck) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier { pin, provider: provider.clone(), check });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![PAIRING_ALPN.to_vec()];
    Ok(config)
}

/// Verifies the edge against the CA pin from a pairing token instead of any system root.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    check: PinCheck,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|cert| CaPin::of_cert_der(cert).is_ok_and(|pin| pin == self.pin));
        let Some(ca) = ca else {
            self.check.0.store(true, Ordering::SeqCst);
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure));
        };
        let roots = roots(&ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
