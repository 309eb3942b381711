//! CA pins: the SHA-256 of the pairing CA's SubjectPublicKeyInfo, carried in pairing tokens.

use std::fmt;

use ring::digest;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::CaError;

/// SHA-256 of a CA certificate's DER SubjectPublicKeyInfo (the HPKP pin form). Pinning the key,
/// not the certificate, keeps the pin valid if the CA certificate is re-issued with the same key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin(pub [u8; 32]);

impl CaPin {
    /// The pin of a DER certificate.
    pub fn of_cert_der(cert_der: &[u8]) -> Result<Self, CaError> {
        let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| CaError::BadCertificate)?;
        let spki = cert.tbs_certificate.subject_pki.raw;
        let hash = digest::digest(&digest::SHA256, spki);
        let mut pin = [0u8; 32];
        pin.copy_from_slice(hash.as_ref());
        Ok(Self(pin))
    }

    /// Lower-case hex, as shown to operators.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}
