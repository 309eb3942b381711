//! Pairing tokens: what `relay-edge pair` prints and `relay-agent pair` redeems.
//!
//! A token is `acsr1.` followed by URL-safe base64 of a bincode record holding the edge's tunnel
//! address, a public token id, a 32-byte secret and the CA pin. The edge keeps only the SHA-256
//! of the secret. The secret never appears in `Debug` output or logs.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bincode::{Decode, Encode};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::CaPin;

/// Prefix naming the token format; a new format gets a new prefix.
const TOKEN_PREFIX: &str = "acsr1.";

/// Upper bound on an encoded token's length; anything longer is not a token. An edge address
/// of a few hundred bytes plus 80 bytes of id, secret and pin fits with room to spare.
const MAX_TOKEN_LEN: usize = 1024;

/// Length of the token id in random bytes (shown as hex).
const TOKEN_ID_BYTES: usize = 8;

/// Length of the secret in random bytes: 256 bits, beyond guessing.
const SECRET_BYTES: usize = 32;

/// Why a token string could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It does not start with the expected prefix, so it is not a pairing token of this version.
    #[error("not an acs-relay pairing token (it should start with {TOKEN_PREFIX:?})")]
    WrongPrefix,
    /// It is longer than any real token.
    #[error("pairing token is too long")]
    TooLong,
    /// The text after the prefix is not valid base64, or does not decode to a token: it was
    /// truncated or altered.
    #[error("pairing token is corrupt (truncated or altered)")]
    Corrupt,
    /// The system random number generator failed while making a token.
    #[error("the system random number generator failed")]
    Random,
}

#[derive(Encode, Decode)]
struct TokenWire {
    edge_addr: String,
    token_id: [u8; TOKEN_ID_BYTES],
    secret: [u8; SECRET_BYTES],
    ca_pin: [u8; 32],
}

/// A pairing token.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingToken {
    /// The edge's tunnel address (`host:port`), where the agent dials to pair.
    pub edge_addr: String,
    /// Public id of the token; names its record on the edge.
    pub token_id: String,
    /// The secret that proves possession of the token.
    pub secret: [u8; SECRET_BYTES],
    /// Pin of the pairing CA, which the agent checks the edge against.
    pub ca_pin: CaPin,
}

impl fmt::Debug for PairingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingToken")
            .field("edge_addr", &self.edge_addr)
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("ca_pin", &self.ca_pin)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl PairingToken {
    /// A fresh token with a random id and secret.
    pub fn generate(edge_addr: String, ca_pin: CaPin) -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let mut id = [0u8; TOKEN_ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill(&mut id).map_err(|_| TokenError::Random)?;
        rng.fill(&mut secret).map_err(|_| TokenError::Random)?;
        Ok(Self { edge_addr, token_id: hex(&id), secret, ca_pin })
    }

    /// The one-line text form.
    pub fn encode(&self) -> String {
        let id = unhex::<TOKEN_ID_BYTES>(&self.token_id).unwrap_or_default();
        let wire =
            TokenWire { edge_addr: self.edge_addr.clone(), token_id: id, secret: self.secret, ca_pin: self.ca_pin.0 };
        // Encoding plain owned data into a Vec cannot fail.
        let bytes = bincode::encode_to_vec(&wire, bincode::config::standard()).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses the text form (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::WrongPrefix)?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Corrupt)?;
        let config = bincode::config::standard().with_limit::<MAX_TOKEN_LEN>();
        let (wire, used): (TokenWire, usize) =
            bincode::decode_from_slice(&bytes, config).map_err(|_| TokenError::Corrupt)?;
        if used != bytes.len() || wire.edge_addr.is_empty() {
            return Err(TokenError::Corrupt);
        }
        Ok(Self {
            edge_addr: wire.edge_addr,
            token_id: hex(&wire.token_id),
            secret: wire.secret,
            ca_pin: CaPin(wire.ca_pin),
        })
    }

    /// Hex SHA-256 of the secret: the only form of the secret the edge stores.
    pub fn secret_hash_hex(&self) -> String {
        secret_hash_hex(&self.secret)
    }

    /// Whether `token_id` has the shape of a token id (so it is safe to use as a file name).
    pub fn is_valid_id(token_id: &str) -> bool {
        unhex::<TOKEN_ID_BYTES>(token_id).is_some() && token_id.bytes().all(|b| !b.is_ascii_uppercase())
    }
}

/// Hex SHA-256 of a secret.
pub fn secret_hash_hex(secret: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, secret).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> PairingToken {
        PairingToken::generate("edge.example.com:4433".into(), CaPin([7; 32])).unwrap()
    }

    #[test]
    fn a_token_round_trips_through_its_text_form() {
        let t = token();
        let text = t.encode();
        assert!(text.starts_with("acsr1.") && !text.contains(char::is_whitespace));
        assert_eq!(PairingToken::parse(&format!("  {text}\n")).unwrap(), t);
        assert!(PairingToken::is_valid_id(&t.token_id));
    }

    #[test]
    fn altered_or_truncated_tokens_are_corrupt() {
        let text = token().encode();
        assert!(matches!(PairingToken::parse(&text[..text.len() - 5]), Err(TokenError::Corrupt)));
        assert!(matches!(PairingToken::parse("acsr1.!!!"), Err(TokenError::Corrupt)));
        assert!(matches!(PairingToken::parse("hello"), Err(TokenError::WrongPrefix)));
        assert!(matches!(PairingToken::parse(&"acsr1.A".repeat(300)), Err(TokenError::TooLong)));
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let t = token();
        let shown = format!("{t:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex(&t.secret)));
        assert!(!shown.contains(&format!("{:?}", t.secret)));
    }

    #[test]
    fn ids_that_could_escape_a_directory_are_invalid() {
        for bad in ["../../etc", "0123456789abcdeg", "0123456789ABCDEF", ""] {
            assert!(!PairingToken::is_valid_id(bad), "{bad}");
        }
    }
}
