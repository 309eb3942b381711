//! ACS-aware admission: before any byte goes to an agent, decide whether a request really comes
//! from ACS or Event Grid, per route. Every check named in a route's `auth` must pass; each
//! failure has its own status (401 with a challenge for missing or bad credentials, 403 for a
//! forbidden source or subscription) and a reason for logs and metrics that never echoes the
//! credential. Platform handshakes (Event Grid's validation and `OPTIONS`) are answered here too.

pub mod acs_jwt;
pub mod config;
pub mod event_grid;
pub mod shared_secret;
pub mod source_ip;

use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, StatusCode, header};
use ipnet::IpNet;
use relay_tunnel::body::RelayBody;
use serde::Deserialize;

pub use acs_jwt::AcsJwtSettings;
pub use event_grid::{EntraConfig, EntraVerifier, EventGridSettings};
pub use shared_secret::SharedSecret;
pub use source_ip::SourceIpSet;

use crate::answer;

/// A check a route can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthCheck {
    /// An ACS-signed JWT in `Authorization: Bearer`.
    AcsJwt,
    /// Event Grid delivery: handshakes answered here, subscription name checked.
    EventGrid,
    /// A shared secret in a header or query parameter.
    SharedSecret,
    /// The client address is in an allow-list.
    SourceIp,
}

impl AuthCheck {
    /// The name used in configuration, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::AcsJwt => "acs-jwt",
            Self::EventGrid => "event-grid",
            Self::SharedSecret => "shared-secret",
            Self::SourceIp => "source-ip",
        }
    }
}

impl AdmissionSettings {
    /// Whether `check` proves anything about the caller as configured: `acs-jwt`,
    /// `shared-secret` and `source-ip` do; `event-grid` only with Entra ID, since the
    /// subscription name it checks otherwise is a header anyone can send.
    pub fn authenticates(&self, check: AuthCheck) -> bool {
        match check {
            AuthCheck::AcsJwt | AuthCheck::SharedSecret | AuthCheck::SourceIp => true,
            AuthCheck::EventGrid => self.event_grid.as_ref().is_some_and(|grid| grid.entra.is_some()),
        }
    }

    /// Whether some check of `checks` authenticates the caller.
    pub fn route_authenticates(&self, checks: &[AuthCheck]) -> bool {
        checks.iter().any(|check| self.authenticates(*check))
    }
}

/// Admission settings shared by every route.
#[derive(Debug, Clone, Default)]
pub struct AdmissionSettings {
    /// Peers whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// For `shared-secret`.
    pub shared_secret: Option<SharedSecret>,
    /// For `source-ip`.
    pub source_ip: Option<SourceIpSet>,
    /// For `event-grid`.
    pub event_grid: Option<EventGridSettings>,
    /// For `acs-jwt`: audience, issuer and where the keys are (loaded when the edge starts).
    pub acs: Option<AcsJwtConfig>,
}

/// `acs-jwt` as configured, before its keys are loaded.
#[derive(Debug, Clone)]
pub struct AcsJwtConfig {
    /// The ACS resource's immutable id (`aud`).
    pub audience: String,
    /// The expected `iss`.
    pub issuer: String,
    /// Where the signing keys come from.
    pub keys: acs_jwt::JwksSource,
    /// See [`acs_jwt::JWKS_REFRESH_MIN_INTERVAL`].
    pub refresh_min_interval: std::time::Duration,
}

/// The token verifiers, with their keys loaded when the edge started.
#[derive(Debug, Clone, Default)]
pub struct Verifiers {
    /// For `acs-jwt`.
    pub acs: Option<AcsJwtSettings>,
    /// For `event-grid` with an Entra ID token.
    pub entra: Option<EntraVerifier>,
}

impl Verifiers {
    /// The verifiers `settings` call for, with their keys fetched (or read) now, so a key source
    /// that does not work is a start-up error.
    pub async fn load(settings: &AdmissionSettings) -> Result<Self, String> {
        let entra = match settings.event_grid.as_ref().and_then(|grid| grid.entra.as_ref()) {
            None => None,
            Some(config) => Some(config.load(acs_jwt::JWKS_REFRESH_MIN_INTERVAL).await?),
        };
        let acs = match &settings.acs {
            None => None,
            Some(config) => Some(AcsJwtSettings {
                audience: config.audience.clone(),
                issuer: config.issuer.clone(),
                keys: std::sync::Arc::new(
                    acs_jwt::JwksCache::load(config.keys.clone(), config.refresh_min_interval).await?,
                ),
            }),
        };
        Ok(Self { acs, entra })
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The status answered.
    pub status: StatusCode,
    /// The check that failed.
    pub check: AuthCheck,
    /// A short, fixed reason for logs and metrics (`missing`, `mismatch`, `denied`, ...).
    pub reason: &'static str,
    /// `WWW-Authenticate` challenge for 401s.
    pub challenge: Option<&'static str>,
}

impl Rejection {
    /// The answer to the client: status and challenge only, nothing that helps an attacker.
    pub fn response(&self) -> Response<RelayBody> {
        let text = self.status.canonical_reason().unwrap_or("refused");
        let mut response = answer::plain(self.status, text);
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

/// Runs the checks `checks` names, in a fixed order from cheapest to dearest, against a request
/// from `peer`. A check without settings is refused (configuration makes that impossible; this
/// keeps a programming error from becoming a silent pass).
pub async fn admit<B>(
    checks: &[AuthCheck],
    settings: &AdmissionSettings,
    verifiers: &Verifiers,
    req: &Request<B>,
    peer: SocketAddr,
) -> Result<(), Rejection> {
    let missing = |check| Rejection { status: StatusCode::FORBIDDEN, check, reason: "not-configured", challenge: None };
    if checks.contains(&AuthCheck::SourceIp) {
        let set = settings.source_ip.as_ref().ok_or(missing(AuthCheck::SourceIp))?;
        let client = source_ip::client_ip(peer.ip(), req.headers(), &settings.trusted_proxies);
        if !client.is_some_and(|ip| set.contains(ip)) {
            return Err(Rejection {
                status: StatusCode::FORBIDDEN,
                check: AuthCheck::SourceIp,
                reason: "denied",
                challenge: None,
            });
        }
    }
    if checks.contains(&AuthCheck::SharedSecret) {
        let secret = settings.shared_secret.as_ref().ok_or(missing(AuthCheck::SharedSecret))?;
        secret.verify(req)?;
    }
    if checks.contains(&AuthCheck::EventGrid) {
        let grid = settings.event_grid.as_ref().ok_or(missing(AuthCheck::EventGrid))?;
        grid.verify(req.headers())?;
        if grid.entra.is_some() {
            verifiers.entra.as_ref().ok_or(missing(AuthCheck::EventGrid))?.verify(req.headers()).await?;
        }
    }
    if checks.contains(&AuthCheck::AcsJwt) {
        verifiers.acs.as_ref().ok_or(missing(AuthCheck::AcsJwt))?.verify(req.headers()).await?;
    }
    Ok(())
}
