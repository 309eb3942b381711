//! The pairing CA: creation, the edge's tunnel certificate, and signing agent CSRs.
//!
//! The CA signs exactly two kinds of certificate: the edge's server certificate and agent client
//! certificates. When it signs a CSR it keeps only the public key: subject, key usages, extended
//! key usages, validity and serial are the CA's choice, whatever the CSR asks.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CLOCK_SKEW_ALLOWANCE;

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key generation or certificate signing failed inside rcgen.
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("certificate does not parse")]
    BadCertificate,
    /// A certificate carries no usable common name.
    #[error("certificate has no common name")]
    NoCommonName,
    /// The CSR did not parse, or its signature does not verify.
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
    /// An agent name breaks the naming rules.
    #[error(
        "invalid agent name {0:?}: use 1-63 characters from a-z, A-Z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    BadAgentName(String),
    /// A time is outside what X.509 can express.
    #[error("time out of range")]
    TimeOutOfRange,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// The pairing CA: its certificate and key.
pub struct PairingCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for PairingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingCa").field("cert_der_len", &self.cert_der.len()).field("key", &"<redacted>").finish()
    }
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| CaError::Random)?;
    // Positive and non-zero: clear the sign bit, set the next one.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(now: SystemTime, validity: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "acs-relay pairing CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = to_offset(now.checked_sub(CLOCK_SKEW_ALLOWANCE).ok_or(CaError::TimeOutOfRange)?);
    params.not_after = to_offset(now.checked_add(validity).ok_or(CaError::TimeOutOfRange)?);
    params.serial_number = Some(serial()?);
    params.use_authority_key_identifier_extension = false;
    Ok(params)
}

impl PairingCa {
    /// Creates a new CA valid from `now` (less the clock-skew allowance) for `validity`.
    pub fn generate(now: SystemTime, validity: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let params = ca_params(now, validity)?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_der: cert.der().to_vec(), cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from its PEM certificate and PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let pem = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| CaError::BadCertificate)?;
        let cert_der: rustls_pki_types::CertificateDer<'static> = pem;
        let (_, parsed) = X509Certificate::from_der(&cert_der).map_err(|_| CaError::BadCertificate)?;
        if !parsed.is_ca() {
            return Err(CaError::BadCertificate);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self { cert_der: cert_der.to_vec(), cert_pem: cert_pem.to_owned(), issuer })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM). Write it with mode 0600 and never log it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The pin agents check the edge against.
    pub fn pin(&self) -> Result<crate::CaPin, CaError> {
        crate::CaPin::of_cert_der(&self.cert_der)
    }

    /// Issues the edge's tunnel (server) certificate for `names` plus `localhost` and
    /// `127.0.0.1`, with a fresh key. Returns `(cert_pem, key_pem)`.
    pub fn issue_edge_cert(
        &self,
        names: &[String],
        now: SystemTime,
        validity: Duration,
    ) -> Result<(String, String), CaError> {
        let mut sans: Vec<String> = names.to_vec();
        for default in ["localhost", "127.0.0.1"] {
            if !sans.iter().any(|n| n == default) {
                sans.push(default.to_owned());
            }
        }
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("acs-relay edge"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = to_offset(now.checked_sub(CLOCK_SKEW_ALLOWANCE).ok_or(CaError::TimeOutOfRange)?);
        params.not_after = to_offset(now.checked_add(validity).ok_or(CaError::TimeOutOfRange)?);
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs an agent CSR. Only the CSR's public key is used: the subject is `agent_name`, the
    /// certificate is for client authentication only, and validity and serial are the CA's.
    /// Returns the certificate DER and its serial (hex).
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        agent_name: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<IssuedAgentCert, CaError> {
        validate_agent_name(agent_name)?;
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(CaError::BadCsr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Back-date for clock skew, but by no more than a tenth of the validity, so the
        // renewal point (two thirds of the lifetime) stays near two thirds of `validity`.
        let skew = CLOCK_SKEW_ALLOWANCE.min(validity / 10);
        params.not_before = to_offset(now.checked_sub(skew).ok_or(CaError::TimeOutOfRange)?);
        let not_after = now.checked_add(validity).ok_or(CaError::TimeOutOfRange)?;
        params.not_after = to_offset(not_after);
        let serial = serial()?;
        let serial_hex = serial.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedAgentCert { cert_der: cert.der().to_vec(), serial_hex, not_after })
    }
}

/// An agent certificate fresh from the CA.
#[derive(Debug, Clone)]
pub struct IssuedAgentCert {
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// Its serial number, lower-case hex.
    pub serial_hex: String,
    /// When it expires.
    pub not_after: SystemTime,
}

/// Agent names become certificate subjects and file names, so they are restricted.
pub fn validate_agent_name(name: &str) -> Result<(), CaError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(CaError::BadAgentName(name.to_owned())) }
}

/// Generates an agent key pair and a CSR for it. Returns `(key_pem, csr_der)`; the key never
/// leaves the agent's host.
pub fn generate_agent_csr(agent_name_hint: &str) -> Result<(String, Vec<u8>), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, agent_name_hint);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Lower-case hex of a certificate's serial number, as [`IssuedAgentCert::serial_hex`] has it.
pub fn cert_serial_hex(cert_der: &[u8]) -> Result<String, CaError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| CaError::BadCertificate)?;
    Ok(cert.tbs_certificate.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
}

/// A certificate's validity window.
pub fn cert_validity(cert_der: &[u8]) -> Result<(SystemTime, SystemTime), CaError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| CaError::BadCertificate)?;
    let to_system = |t: i64| {
        u64::try_from(t)
            .ok()
            .and_then(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .ok_or(CaError::TimeOutOfRange)
    };
    let validity = cert.validity();
    Ok((to_system(validity.not_before.timestamp())?, to_system(validity.not_after.timestamp())?))
}

/// The DNS names and IP addresses a certificate is valid for.
pub fn cert_subject_alt_names(cert_der: &[u8]) -> Result<Vec<String>, CaError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| CaError::BadCertificate)?;
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Ok(Vec::new()) };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// Whether a certificate valid from `not_before` to `not_after` is due for renewal at `now`:
/// once two thirds of its lifetime have passed, leaving a third (8 h of a 24 h certificate) to
/// retry a renewal that failed.
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let renew_at = not_before + lifetime.mul_f64(2.0 / 3.0);
    now >= renew_at
}

/// The agent name (subject common name) of a certificate issued by [`PairingCa::sign_agent_csr`].
pub fn agent_name_from_cert(cert_der: &[u8]) -> Result<String, CaError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| CaError::BadCertificate)?;
    let cn = cert.subject().iter_common_name().next().ok_or(CaError::NoCommonName)?;
    let name = cn.as_str().map_err(|_| CaError::NoCommonName)?;
    validate_agent_name(name)?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_keeps_only_the_csr_public_key() {
        let now = SystemTime::now();
        let ca = PairingCa::generate(now, Duration::from_secs(3600)).unwrap();
        // The CSR asks for another name; the certificate gets the name the CA chose.
        let (_key, csr) = generate_agent_csr("evil.example.com").unwrap();
        let issued = ca.sign_agent_csr(&csr, "bot-1", now, Duration::from_secs(600)).unwrap();
        assert_eq!(agent_name_from_cert(&issued.cert_der).unwrap(), "bot-1");
        let (_, cert) = X509Certificate::from_der(&issued.cert_der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        let not_after = cert.validity().not_after.timestamp();
        let expected =
            (now + Duration::from_secs(600)).duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((not_after - expected).abs() <= 1);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let ca = PairingCa::generate(SystemTime::now(), Duration::from_secs(3600)).unwrap();
        let (_key, mut csr) = generate_agent_csr("bot").unwrap();
        let last = csr.len() - 1;
        csr[last] ^= 0xff;
        assert!(matches!(
            ca.sign_agent_csr(&csr, "bot", SystemTime::now(), Duration::from_secs(60)),
            Err(CaError::BadCsr(_))
        ));
        assert!(matches!(
            ca.sign_agent_csr(b"garbage", "bot", SystemTime::now(), Duration::from_secs(60)),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn a_ca_reloaded_from_pem_signs_with_the_same_identity() {
        let now = SystemTime::now();
        let ca = PairingCa::generate(now, Duration::from_secs(3600)).unwrap();
        let reloaded = PairingCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.pin().unwrap(), reloaded.pin().unwrap());
        let (_k, csr) = generate_agent_csr("a").unwrap();
        let issued = reloaded.sign_agent_csr(&csr, "a", now, Duration::from_secs(60)).unwrap();
        let (_, cert) = X509Certificate::from_der(&issued.cert_der).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn the_serial_read_back_from_a_certificate_matches_the_issued_one() {
        let now = SystemTime::now();
        let ca = PairingCa::generate(now, Duration::from_secs(3600)).unwrap();
        let (_k, csr) = generate_agent_csr("a").unwrap();
        let issued = ca.sign_agent_csr(&csr, "a", now, Duration::from_secs(60)).unwrap();
        assert_eq!(cert_serial_hex(&issued.cert_der).unwrap(), issued.serial_hex);
        let (_, not_after) = cert_validity(&issued.cert_der).unwrap();
        let drift = not_after.duration_since(now + Duration::from_secs(60)).unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_secs(2));
    }

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90);
        assert!(!renewal_due(start, end, start + Duration::from_secs(59)));
        assert!(renewal_due(start, end, start + Duration::from_secs(60)));
        assert!(renewal_due(start, end, end + Duration::from_secs(1)));
    }

    #[test]
    fn agent_names_are_restricted() {
        for good in ["bot", "bot-1", "a.b_c", "7"] {
            validate_agent_name(good).unwrap();
        }
        for bad in ["", "-x", "../etc", "a b", "a/b", &"x".repeat(64)] {
            assert!(validate_agent_name(bad).is_err(), "{bad:?}");
        }
    }
}
