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
            JwksSource::Url(_) => Some(https_client()?),
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
            (JwksSource::Url(uri), Some(client)) => get(client, uri).await?,
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

/// An HTTPS client for key and discovery documents: rustls on ring, Mozilla's roots (no system
/// store needed in a minimal container).
fn https_client() -> Result<HttpsClient, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| e.to_string())?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// GETs a small document, bounded in time and size.
async fn get(client: &HttpsClient, uri: &Uri) -> Result<Vec<u8>, String> {
    let response = tokio::time::timeout(JWKS_FETCH_TIMEOUT, client.get(uri.clone()))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES);
    Ok(tokio::time::timeout(JWKS_FETCH_TIMEOUT, body.collect())
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec())
}

/// What an OpenID Connect discovery document says about token checking.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct OpenIdConfiguration {
    /// The tokens' issuer.
    pub issuer: String,
    /// Where the signing keys are published.
    pub jwks_uri: String,
}

/// Fetches an OpenID Connect discovery document (Entra ID's
/// `.../v2.0/.well-known/openid-configuration`).
pub async fn discover(url: &Uri) -> Result<OpenIdConfiguration, String> {
    let body = get(&https_client()?, url).await?;
    serde_json::from_slice(&body).map_err(|e| format!("not an OpenID configuration: {e}"))
}

/// Why a bearer token was refused, as a fixed reason class for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Present but refused; the reason class.
    Invalid(&'static str),
}

/// Checks the request's bearer token: RS256 only (which also stops `none` and HS256 with the
/// public key as secret), the key by `kid` from `keys`, `aud` exactly `audience`, `iss` one of
/// `issuers`, `exp`/`nbf` with [`JWT_LEEWAY`].
pub async fn verify_bearer(
    headers: &HeaderMap,
    audience: &str,
    issuers: &[String],
    keys: &JwksCache,
) -> Result<(), TokenFailure> {
    let invalid = TokenFailure::Invalid;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case("bearer ")).map(|_| v.get(7..).unwrap_or_default())
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(TokenFailure::Missing)?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid("malformed"));
    }
    let head = decode_header(token).map_err(|_| invalid("malformed"))?;
    if head.alg != Algorithm::RS256 {
        return Err(invalid("algorithm"));
    }
    let kid = head.kid.ok_or(invalid("unknown-key"))?;
    let jwk = keys.key(&kid).await.ok_or(invalid("unknown-key"))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| invalid("unknown-key"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = JWT_LEEWAY.as_secs();
    validation.validate_nbf = true;
    validation.set_audience(&[audience]);
    validation.set_issuer(issuers);
    validation.required_spec_claims = HashSet::from(["exp".to_owned(), "aud".to_owned(), "iss".to_owned()]);
    decode::<serde_json::Value>(token, &key, &validation).map(|_| ()).map_err(|e| {
        invalid(match e.kind() {
            ErrorKind::ExpiredSignature => "expired",
            ErrorKind::ImmatureSignature => "not-yet-valid",
            ErrorKind::InvalidAudience => "audience",
            ErrorKind::InvalidIssuer => "issuer",
            ErrorKind::InvalidSignature => "signature",
            _ => "invalid",
        })
    })
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
        verify_bearer(headers, &self.audience, std::slice::from_ref(&self.issuer), &self.keys).await.map_err(
            |failure| match failure {
                TokenFailure::Missing => reject("missing"),
                TokenFailure::Invalid(reason) => reject(reason),
            },
        )
    }
}
