//! `shared-secret`: a secret in a header or a query parameter, compared in constant time and
//! removed before the request is forwarded, so the bot (and its logs) never see it.

use http::header::HeaderName;
use http::{Request, StatusCode, Uri};
use subtle::ConstantTimeEq;

use super::{AuthCheck, Rejection};

/// Where the secret travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretLocation {
    /// In this header.
    Header(HeaderName),
    /// In this query parameter (compared exactly as sent, percent-encoding included).
    Query(String),
}

/// The expected secret and where to find it.
#[derive(Clone)]
pub struct SharedSecret {
    location: SecretLocation,
    value: Vec<u8>,
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSecret").field("location", &self.location).field("value", &"********").finish()
    }
}

const CHALLENGE: &str = "Secret realm=\"acs-relay\"";

impl SharedSecret {
    /// A secret expected at `location`.
    pub fn new(location: SecretLocation, value: Vec<u8>) -> Self {
        Self { location, value }
    }

    fn presented<'a, B>(&self, req: &'a Request<B>) -> Option<&'a [u8]> {
        match &self.location {
            SecretLocation::Header(name) => req.headers().get(name).map(|v| v.as_bytes()),
            SecretLocation::Query(key) => req
                .uri()
                .query()?
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_bytes()),
        }
    }

    /// Checks the request carries the secret.
    pub fn verify<B>(&self, req: &Request<B>) -> Result<(), Rejection> {
        let reject = |reason| Rejection {
            status: StatusCode::UNAUTHORIZED,
            check: AuthCheck::SharedSecret,
            reason,
            challenge: Some(CHALLENGE),
        };
        let presented = self.presented(req).ok_or(reject("missing"))?;
        // Lengths differ only when the secret is wrong; ct_eq returns false for them at once,
        // which reveals the length, not the secret.
        if bool::from(presented.ct_eq(&self.value)) { Ok(()) } else { Err(reject("mismatch")) }
    }

    /// Removes the secret from the request before it is forwarded.
    pub fn strip<B>(&self, req: &mut Request<B>) {
        match &self.location {
            SecretLocation::Header(name) => {
                req.headers_mut().remove(name);
            }
            SecretLocation::Query(key) => {
                let Some(query) = req.uri().query() else { return };
                let kept: Vec<&str> =
                    query.split('&').filter(|pair| pair.split('=').next() != Some(key.as_str())).collect();
                let path = req.uri().path();
                let rebuilt = if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
                if let Ok(uri) = rebuilt.parse::<Uri>() {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        *r.uri_mut() = uri.parse().unwrap();
        if let Some(v) = header {
            r.headers_mut().insert("x-bot-secret", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn a_header_secret_is_verified_and_stripped() {
        let s = SharedSecret::new(SecretLocation::Header(HeaderName::from_static("x-bot-secret")), b"s3cret".to_vec());
        assert!(s.verify(&req("/a", Some("s3cret"))).is_ok());
        assert_eq!(s.verify(&req("/a", Some("s3cre"))).unwrap_err().reason, "mismatch");
        let missing = s.verify(&req("/a", None)).unwrap_err();
        assert_eq!((missing.status, missing.reason), (StatusCode::UNAUTHORIZED, "missing"));
        let mut r = req("/a", Some("s3cret"));
        s.strip(&mut r);
        assert!(r.headers().get("x-bot-secret").is_none());
    }

    #[test]
    fn a_query_secret_is_verified_and_stripped_leaving_other_parameters() {
        let s = SharedSecret::new(SecretLocation::Query("secret".into()), b"abc".to_vec());
        assert!(s.verify(&req("/cb?x=1&secret=abc&y=2", None)).is_ok());
        assert!(s.verify(&req("/cb?secret=abd", None)).is_err());
        assert!(s.verify(&req("/cb?notsecret=abc", None)).is_err());
        let mut r = req("/cb?x=1&secret=abc&y=2", None);
        s.strip(&mut r);
        assert_eq!(r.uri().to_string(), "/cb?x=1&y=2");
        let mut only = req("/cb?secret=abc", None);
        s.strip(&mut only);
        assert_eq!(only.uri().to_string(), "/cb");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SharedSecret::new(SecretLocation::Query("k".into()), b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
