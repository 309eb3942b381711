//! `acs-jwt`: ACS Call Automation signs each callback, and the media WebSocket upgrade, with an
//! RS256 JWT in `Authorization: Bearer`. It is checked with the `jsonwebtoken` crate against
//! ACS's published keys (JWKS), fetched once at start-up, cached, refreshed when an unknown `kid`
//! arrives (at most once a minute), and served from cache while the key URL is down.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header, errors::ErrorKind};
use tracing::{info, warn};

use super::{AuthCheck, Rejection};

/// ACS Call Automation's token issuer.
pub const DEFAULT_ACS_ISSUER: &str = "https://acscallautomation.communication.azure.com";

/// Where ACS publishes its signing keys.
pub const DEFAULT_ACS_JWKS_URL: &str = "https://acscallautomation.communication.azure.com/calling/keys";

/// Clock skew tolerated on `exp` and `nbf`: the most the issue allows, because ACS's clock and
/// the edge's are independent and a refused callback is a failed call.
pub const JWT_LEEWAY: Duration = Duration::from_secs(60);

/// Shortest interval between key refreshes caused by unknown `kid`s. ACS rotates keys rarely; a
/// stream of made-up `kid`s must not become a stream of fetches.
pub const JWKS_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(60);

/// How long one key fetch may take before the cache is used as it is.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest key document accepted; ACS's is a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Longest token looked at; ACS's are about 1 KiB.
const MAX_TOKEN_LEN: usize = 16 * 1024;

const CHALLENGE: &str = "Bearer realm=\"acs-relay\"";

/// Where the signing keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// An `https://` (or, for tests, `http://`) URL.
    Url(Uri),
    /// A JWKS file, for air-gapped deployments and tests.
    File(PathBuf),
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The cached signing keys.
pub struct JwksCache {
    source: JwksSource,
    keys: RwLock<Arc<JwkSet>>,
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    min_refresh_interval: Duration,
    client: Option<HttpsClient>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache").field("source", &self.source).finish()
    }
}

impl JwksCache {
    /// Loads the keys once. A failed first load is logged and the edge starts anyway: every
    /// token is refused until a later refresh succeeds.
    pub async fn load(source: JwksSource, min_refresh_interval: Duration) -> Result<Self, String> {
        let client = match &source {
            JwksSource::File(_) => None,
            JwksSource::Url(_) => {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
                    .map_err(|e| e.to_string())?
                    .https_or_http()
                    .enable_http1()
                    .build();
                Some(Client::builder(TokioExecutor::new()).build(connector))
            }
        };
        let cache = Self {
            source,
            keys: RwLock::new(Arc::new(JwkSet { keys: Vec::new() })),
            last_refresh: tokio::sync::Mutex::new(Some(Instant::now())),
            min_refresh_interval,
            client,
        };
        if let Err(e) = cache.refresh().await {
            warn!("cannot load ACS signing keys from {:?}: {e}; ACS tokens are refused until they load", cache.source);
        }
        Ok(cache)
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let bytes = match (&self.source, &self.client) {
            (JwksSource::File(path), _) => {
                tokio::fs::read(path).await.map_err(|e| format!("{}: {e}", path.display()))?
            }
            (JwksSource::Url(uri), Some(client)) => {
                let request = client.get(uri.clone());
                let response = tokio::time::timeout(JWKS_FETCH_TIMEOUT, request)
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()));
                }
                let body = Limited::new(response.into_body(), MAX_JWKS_BYTES);
                tokio::time::timeout(JWKS_FETCH_TIMEOUT, body.collect())
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?
                    .to_bytes()
                    .to_vec()
            }
            (JwksSource::Url(_), None) => return Err("no HTTP client".into()),
        };
        serde_json::from_slice(&bytes).map_err(|e| format!("not a JWKS document: {e}"))
    }

    async fn refresh(&self) -> Result<(), String> {
        let set = self.fetch().await?;
        let count = set.keys.len();
        if let Ok(mut keys) = self.keys.write() {
            *keys = Arc::new(set);
        }
        info!(keys = count, "ACS signing keys loaded");
        Ok(())
    }

    fn cached(&self, kid: &str) -> Option<Jwk> {
        self.keys.read().ok().and_then(|keys| keys.find(kid).cloned())
    }

    /// The key `kid`, refreshing the cache once if it is unknown and the last refresh is older
    /// than the minimum interval. A failed refresh keeps the cached keys.
    pub async fn key(&self, kid: &str) -> Option<Jwk> {
        if let Some(jwk) = self.cached(kid) {
            return Some(jwk);
        }
        let mut last = self.last_refresh.lock().await;
        // Another request may have refreshed while this one waited for the lock.
        if let Some(jwk) = self.cached(kid) {
            return Some(jwk);
        }
        if last.is_none_or(|at| at.elapsed() >= self.min_refresh_interval) {
            *last = Some(Instant::now());
            if let Err(e) = self.refresh().await {
                warn!("cannot refresh ACS signing keys: {e}; using the cached ones");
            }
        }
        self.cached(kid)
    }
}

/// Settings for `acs-jwt`.
#[derive(Debug, Clone)]
pub struct AcsJwtSettings {
    /// The ACS resource's immutable id: the tokens' `aud`.
    pub audience: String,
    /// The tokens' `iss`.
    pub issuer: String,
    /// The signing keys.
    pub keys: Arc<JwksCache>,
}

impl AcsJwtSettings {
    /// Checks the request's bearer token. Failures say only which class of problem it was (for
    /// logs and metrics); the client gets 401 and a challenge, nothing more.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        let reject = |reason| Rejection {
            status: StatusCode::UNAUTHORIZED,
            check: AuthCheck::AcsJwt,
            reason,
            challenge: Some(CHALLENGE),
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.get(..7)
                    .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                    .map(|_| v.get(7..).unwrap_or_default())
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(reject("missing"))?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(reject("malformed"));
        }
        let head = decode_header(token).map_err(|_| reject("malformed"))?;
        // RS256 only: this also stops `none` and HS256-with-the-public-key confusion.
        if head.alg != Algorithm::RS256 {
            return Err(reject("algorithm"));
        }
        let kid = head.kid.ok_or(reject("unknown-key"))?;
        let jwk = self.keys.key(&kid).await.ok_or(reject("unknown-key"))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| reject("unknown-key"))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = JWT_LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.required_spec_claims = HashSet::from(["exp".to_owned(), "aud".to_owned(), "iss".to_owned()]);
        decode::<serde_json::Value>(token, &key, &validation).map(|_| ()).map_err(|e| {
            reject(match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not-yet-valid",
                ErrorKind::InvalidAudience => "audience",
                ErrorKind::InvalidIssuer => "issuer",
                ErrorKind::InvalidSignature => "signature",
                _ => "invalid",
            })
        })
    }
}
