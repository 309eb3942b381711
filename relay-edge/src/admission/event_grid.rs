//! `event-grid`: Event Grid's handshakes, answered at the edge so the bot never sees them, and
//! the subscription-name check.
//!
//! * Event Grid schema: a `POST` with `aeg-event-type: SubscriptionValidation` carries a
//!   `validationCode`; the answer is `200 {"validationResponse": code}`.
//! * CloudEvents schema: an `OPTIONS` with `WebHook-Request-Origin`; the answer echoes it in
//!   `WebHook-Allowed-Origin`, with `Allow: POST`.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use relay_tunnel::body::{RelayBody, full};
use serde::Deserialize;

use std::sync::Arc;

use http::Uri;

use super::acs_jwt::{JwksCache, JwksSource, TokenFailure, discover, verify_bearer};
use super::{AuthCheck, Rejection};

/// Largest validation request body read at the edge. A validation event is a few hundred bytes.
pub const MAX_VALIDATION_BODY: usize = 64 * 1024;

/// Settings for `event-grid`.
#[derive(Debug, Clone, Default)]
pub struct EventGridSettings {
    /// When non-empty, `aeg-subscription-name` must be one of these (compared case-insensitively:
    /// Event Grid sends the name upper-cased).
    pub subscription_names: Vec<String>,
    /// When set, Event Grid's Entra ID token is required (keys loaded when the edge starts).
    pub entra: Option<EntraConfig>,
}

/// Event Grid's Entra ID token settings, as configured.
#[derive(Debug, Clone)]
pub struct EntraConfig {
    /// The Entra tenant (directory) id.
    pub tenant_id: String,
    /// The token audience: the app id or app id URI configured on the subscription.
    pub audience: String,
    /// The tenant's OpenID configuration (by default Entra's well-known URL for the tenant).
    pub openid_config_url: Uri,
}

impl EntraConfig {
    /// Entra's well-known discovery URL for a tenant.
    pub fn default_openid_config_url(tenant_id: &str) -> String {
        format!("https://login.microsoftonline.com/{tenant_id}/v2.0/.well-known/openid-configuration")
    }

    /// Loads the tenant's issuer and keys. If discovery fails the tenant's well-known issuer and
    /// key URL are used, and the failure is logged.
    pub async fn load(&self, refresh_min_interval: std::time::Duration) -> Result<EntraVerifier, String> {
        let tenant = &self.tenant_id;
        let v1_issuer = format!("https://sts.windows.net/{tenant}/");
        let (issuer, jwks_uri) = match discover(&self.openid_config_url).await {
            Ok(config) => (config.issuer, config.jwks_uri),
            Err(e) => {
                tracing::warn!(
                    "cannot read Entra's OpenID configuration for tenant {tenant}: {e}; using its well-known issuer and keys"
                );
                (
                    format!("https://login.microsoftonline.com/{tenant}/v2.0"),
                    format!("https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys"),
                )
            }
        };
        let jwks: Uri = jwks_uri.parse().map_err(|e| format!("Entra jwks_uri {jwks_uri:?}: {e}"))?;
        let keys = JwksCache::load(JwksSource::Url(jwks), refresh_min_interval).await?;
        // Event Grid's token is v1 or v2 depending on the app registration: accept both issuers.
        Ok(EntraVerifier { audience: self.audience.clone(), issuers: vec![issuer, v1_issuer], keys: Arc::new(keys) })
    }
}

/// Checks Event Grid's Entra ID bearer token.
#[derive(Debug, Clone)]
pub struct EntraVerifier {
    audience: String,
    issuers: Vec<String>,
    keys: Arc<JwksCache>,
}

impl EntraVerifier {
    /// A missing token is 401 (with a challenge); a bad one 403.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        verify_bearer(headers, &self.audience, &self.issuers, &self.keys).await.map_err(|failure| match failure {
            TokenFailure::Missing => Rejection {
                status: StatusCode::UNAUTHORIZED,
                check: AuthCheck::EventGrid,
                reason: "missing-token",
                challenge: Some("Bearer realm=\"acs-relay\""),
            },
            TokenFailure::Invalid(reason) => {
                Rejection { status: StatusCode::FORBIDDEN, check: AuthCheck::EventGrid, reason, challenge: None }
            }
        })
    }
}

impl EventGridSettings {
    /// Checks the subscription name, when names are configured.
    pub fn verify(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        if self.subscription_names.is_empty() {
            return Ok(());
        }
        let reject = |status, reason| Rejection { status, check: AuthCheck::EventGrid, reason, challenge: None };
        let name = headers
            .get("aeg-subscription-name")
            .and_then(|v| v.to_str().ok())
            .ok_or(reject(StatusCode::FORBIDDEN, "missing-subscription"))?;
        if self.subscription_names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            Ok(())
        } else {
            Err(reject(StatusCode::FORBIDDEN, "subscription-mismatch"))
        }
    }
}

/// Whether this is Event Grid's subscription validation request.
pub fn is_validation(headers: &HeaderMap) -> bool {
    headers.get("aeg-event-type").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"SubscriptionValidation"))
}

#[derive(Deserialize)]
struct ValidationEvent {
    data: ValidationData,
}

#[derive(Deserialize)]
struct ValidationData {
    #[serde(rename = "validationCode")]
    validation_code: String,
}

/// The answer to a validation request body (an Event Grid event array), or `None` if the body
/// carries no validation code.
pub fn validation_response(body: &[u8]) -> Option<Response<RelayBody>> {
    let events: Vec<ValidationEvent> = serde_json::from_slice(body).ok()?;
    let code = events.into_iter().next()?.data.validation_code;
    let json = serde_json::json!({ "validationResponse": code }).to_string();
    let mut response = Response::new(full(json));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Some(response)
}

/// The answer to the CloudEvents abuse-protection handshake.
pub fn options_response(headers: &HeaderMap) -> Response<RelayBody> {
    let mut response = Response::new(full(""));
    let out = response.headers_mut();
    out.insert(header::ALLOW, HeaderValue::from_static("POST"));
    if let Some(origin) = headers.get("webhook-request-origin") {
        out.insert("webhook-allowed-origin", origin.clone());
        out.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
    }
    *response.status_mut() = StatusCode::OK;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validation_code_is_echoed() {
        let body = br#"[{"id":"1","eventType":"Microsoft.EventGrid.SubscriptionValidationEvent","data":{"validationCode":"512d38b6-c7b8-40c8-89fe-f46f9e9622b6","validationUrl":"https://x"}}]"#;
        let response = validation_response(body).unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(validation_response(b"[]").is_none());
        assert!(validation_response(b"not json").is_none());
    }

    #[test]
    fn subscription_names_are_checked_case_insensitively() {
        let settings = EventGridSettings { subscription_names: vec!["incoming-calls".into()], entra: None };
        let mut headers = HeaderMap::new();
        assert_eq!(settings.verify(&headers).unwrap_err().reason, "missing-subscription");
        headers.insert("aeg-subscription-name", HeaderValue::from_static("INCOMING-CALLS"));
        assert!(settings.verify(&headers).is_ok());
        headers.insert("aeg-subscription-name", HeaderValue::from_static("OTHER"));
        assert_eq!(settings.verify(&headers).unwrap_err().status, StatusCode::FORBIDDEN);
    }
}
