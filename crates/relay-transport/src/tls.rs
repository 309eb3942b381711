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
use relay_proto::{PAIRING_ALPN, TUNNEL_ALPN};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
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
pub fn edge_server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::BadRoot(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec(), PAIRING_ALPN.to_vec()];
    Ok(config)
}

/// The agent's tunnel client configuration: trusts only the pairing CA, presents its certificate.
pub fn agent_client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(cert_chain, key)?;
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
