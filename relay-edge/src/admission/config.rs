//! What the configuration file says about admission: the four check sections (`[acs]`,
//! `[event_grid]`, `[shared_secret]`, `[source_ip]`) and `trusted_proxies`, and how each becomes
//! the settings its check runs with. Secrets are read here, from the environment or a 0600 file,
//! never from the configuration itself.

use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderName;
use relay_runtime::config::ConfigError;
use serde::Deserialize;

use super::acs_jwt::{DEFAULT_ACS_ISSUER, DEFAULT_ACS_JWKS_URL, JWKS_REFRESH_MIN_INTERVAL, JwksSource};
use super::shared_secret::SecretLocation;
use super::source_ip::service_tag_networks;
use super::{AcsJwtConfig, AdmissionSettings, AuthCheck, EntraConfig, EventGridSettings, SharedSecret, SourceIpSet};

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

/// `[acs]`: how ACS's tokens are checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcsConfig {
    /// The ACS resource's immutable id: the tokens' audience. Required.
    pub audience: Option<String>,
    /// The tokens' issuer; ACS Call Automation's by default.
    pub issuer: Option<String>,
    /// Where ACS publishes its keys; ACS's URL by default.
    pub jwks_url: Option<String>,
    /// A JWKS file instead of the URL (offline use and tests).
    pub jwks_file: Option<PathBuf>,
    /// Shortest interval between key refreshes caused by unknown key ids (`"60s"`).
    #[serde(default, with = "relay_runtime::config::duration")]
    pub keys_refresh_min_interval: Option<Duration>,
}

/// `[shared_secret]`: where the secret travels and where the edge reads it from. The secret
/// itself never sits in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedSecretConfig {
    /// The header carrying the secret (e.g. `x-bot-secret`).
    pub header: Option<String>,
    /// Or the query parameter carrying it (e.g. `secret`).
    pub query: Option<String>,
    /// The environment variable holding the secret.
    pub value_env: Option<String>,
    /// Or a file holding it (e.g. a mounted Kubernetes secret); trailing newlines are ignored.
    pub value_file: Option<PathBuf>,
}

/// `[source_ip]`: the allow-list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceIpConfig {
    /// Allowed networks (`52.112.0.0/14`, `2603:1063::/38`).
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// An Azure Service Tags JSON file (`ServiceTags_Public_*.json`).
    pub service_tags_file: Option<PathBuf>,
    /// The tags to take from it (e.g. `AzureCommunicationServices`).
    #[serde(default)]
    pub service_tags: Vec<String>,
}

/// `[event_grid]`: subscription checks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventGridConfig {
    /// When non-empty, `aeg-subscription-name` must be one of these.
    #[serde(default)]
    pub subscription_names: Vec<String>,
    /// With `entra_audience`: require Event Grid's Entra ID token from this tenant.
    pub entra_tenant_id: Option<String>,
    /// The token audience (the app id or app id URI set on the subscription).
    pub entra_audience: Option<String>,
    /// Override of the tenant's OpenID configuration URL (tests, sovereign clouds).
    pub entra_openid_config_url: Option<String>,
}

impl AdmissionSettings {
    /// The settings of every configured check; a section that is present must be complete.
    pub fn from_config(
        trusted_proxies: &[String],
        shared_secret: Option<&SharedSecretConfig>,
        source_ip: Option<&SourceIpConfig>,
        event_grid: Option<&EventGridConfig>,
        acs: Option<&AcsConfig>,
    ) -> Result<Self, ConfigError> {
        let trusted_proxies = trusted_proxies
            .iter()
            .map(|cidr| parse_net(cidr).map_err(|e| invalid("trusted_proxies", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trusted_proxies,
            shared_secret: shared_secret.map(SharedSecretConfig::build).transpose()?,
            source_ip: source_ip.map(SourceIpConfig::build).transpose()?,
            event_grid: event_grid.map(EventGridConfig::build).transpose()?,
            acs: acs.map(AcsConfig::build).transpose()?,
        })
    }
}

impl AdmissionSettings {
    /// Whether `check`'s section is configured.
    pub fn configures(&self, check: AuthCheck) -> bool {
        match check {
            AuthCheck::SharedSecret => self.shared_secret.is_some(),
            AuthCheck::SourceIp => self.source_ip.is_some(),
            AuthCheck::EventGrid => self.event_grid.is_some(),
            AuthCheck::AcsJwt => self.acs.is_some(),
        }
    }
}

impl AuthCheck {
    /// The configuration section that holds the check's settings.
    pub fn section(self) -> &'static str {
        match self {
            AuthCheck::AcsJwt => "acs",
            AuthCheck::EventGrid => "event_grid",
            AuthCheck::SharedSecret => "shared_secret",
            AuthCheck::SourceIp => "source_ip",
        }
    }
}

impl SharedSecretConfig {
    /// Where the secret travels, and the secret itself, read now.
    fn build(&self) -> Result<SharedSecret, ConfigError> {
        let location = match (&self.header, &self.query) {
            (Some(header), None) => SecretLocation::Header(
                HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| invalid("shared_secret.header", format!("{header:?} is not a header name")))?,
            ),
            (None, Some(query)) if !query.is_empty() => SecretLocation::Query(query.clone()),
            _ => return Err(invalid("shared_secret", "set exactly one of header or query".into())),
        };
        let value = match (&self.value_env, &self.value_file) {
            (Some(var), None) => std::env::var(var)
                .map_err(|_| invalid("shared_secret.value_env", format!("environment variable {var} is not set")))?,
            (None, Some(path)) => {
                let bytes = relay_pki::read_secret_file(path)
                    .map_err(|error| ConfigError::Read { path: path.clone(), error })?;
                String::from_utf8(bytes)
                    .map_err(|_| invalid("shared_secret.value_file", format!("{} is not UTF-8", path.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
            }
            _ => return Err(invalid("shared_secret", "set exactly one of value_env or value_file".into())),
        };
        if value.is_empty() {
            return Err(invalid("shared_secret", "the secret is empty".into()));
        }
        Ok(SharedSecret::new(location, value.into_bytes()))
    }
}

impl SourceIpConfig {
    /// The allow-list: the CIDRs and the service tags' networks; never empty.
    fn build(&self) -> Result<SourceIpSet, ConfigError> {
        let mut nets = self
            .cidrs
            .iter()
            .map(|c| parse_net(c).map_err(|e| invalid("source_ip.cidrs", e)))
            .collect::<Result<Vec<_>, _>>()?;
        match (&self.service_tags_file, self.service_tags.is_empty()) {
            (Some(path), false) => {
                let json =
                    std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.clone(), error })?;
                let tagged = service_tag_networks(&json, &self.service_tags)
                    .map_err(|e| invalid("source_ip.service_tags_file", format!("{}: {e}", path.display())))?;
                nets.extend(tagged);
            }
            (None, true) => {}
            _ => return Err(invalid("source_ip", "service_tags_file and service_tags go together".into())),
        }
        if nets.is_empty() {
            return Err(invalid("source_ip", "the allow-list is empty: nobody could connect".into()));
        }
        Ok(SourceIpSet::new(nets))
    }
}

impl EventGridConfig {
    /// The subscription names, and Entra ID when both its tenant and audience are set.
    fn build(&self) -> Result<EventGridSettings, ConfigError> {
        let entra = match (&self.entra_tenant_id, &self.entra_audience) {
            (None, None) => None,
            (Some(tenant), Some(audience)) if !tenant.is_empty() && !audience.is_empty() => {
                let url = self
                    .entra_openid_config_url
                    .clone()
                    .unwrap_or_else(|| EntraConfig::default_openid_config_url(tenant));
                let openid_config_url =
                    url.parse().map_err(|e| invalid("event_grid.entra_openid_config_url", format!("{url:?}: {e}")))?;
                Some(EntraConfig { tenant_id: tenant.clone(), audience: audience.clone(), openid_config_url })
            }
            _ => return Err(invalid("event_grid", "entra_tenant_id and entra_audience go together".into())),
        };
        Ok(EventGridSettings { subscription_names: self.subscription_names.clone(), entra })
    }
}

impl AcsConfig {
    /// The audience (required), the issuer, and one source of keys.
    fn build(&self) -> Result<AcsJwtConfig, ConfigError> {
        let audience = self.audience.clone().filter(|a| !a.is_empty()).ok_or(ConfigError::Missing("acs.audience"))?;
        let keys = match (&self.jwks_url, &self.jwks_file) {
            (Some(_), Some(_)) => return Err(invalid("acs", "set jwks_url or jwks_file, not both".into())),
            (None, Some(path)) => JwksSource::File(path.clone()),
            (url, None) => {
                let url = url.as_deref().unwrap_or(DEFAULT_ACS_JWKS_URL);
                let uri: http::Uri = url.parse().map_err(|e| invalid("acs.jwks_url", format!("{url:?}: {e}")))?;
                if !matches!(uri.scheme_str(), Some("https" | "http")) {
                    return Err(invalid("acs.jwks_url", format!("{url:?} must be an https:// URL")));
                }
                JwksSource::Url(uri)
            }
        };
        Ok(AcsJwtConfig {
            audience,
            issuer: self.issuer.clone().unwrap_or_else(|| DEFAULT_ACS_ISSUER.to_owned()),
            keys,
            refresh_min_interval: self.keys_refresh_min_interval.unwrap_or(JWKS_REFRESH_MIN_INTERVAL),
        })
    }
}

/// A network in CIDR notation, or a single address (as a /32 or /128).
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR such as 52.112.0.0/14"))
}
