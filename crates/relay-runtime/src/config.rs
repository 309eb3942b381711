//! Configuration plumbing both binaries share: reading a TOML file strictly (unknown keys are
//! errors naming the key and line), layering file < environment < flag, parsing durations, and
//! the one error type for all of it.
//!
//! Each binary declares every setting once, as a field of one struct that is both its TOML
//! schema (serde) and its `run` flags with their environment variables (clap): the doc comment
//! is the help text. clap already puts a flag over its environment variable; [`load_layered`]
//! puts both over the file by letting toml merge the two: whatever the command line set replaces
//! the file's value, key by key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a configuration is unusable. Each message is one line naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, ...).
    #[error("{path}: line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A required setting has no value from any source.
    #[error("missing setting {0}: set it in the config file, the environment or on the command line")]
    Missing(&'static str),
}

/// Reads and parses a TOML file into `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
    parse_toml(&text, path)
}

/// Parses TOML text into `T`; `path` names it in errors, with the line and the key.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |span| line_of(text, span.start));
        let message = e.message().replace('\n', " ");
        // A bad value's message says what is wrong with it; name the key it was given for.
        let key = text.lines().nth(line - 1).and_then(|l| l.split_once('=')).map(|(k, _)| k.trim());
        let message = match key {
            Some(key) if !key.is_empty() && !message.contains(key) => format!("{key}: {message}"),
            _ => message,
        };
        ConfigError::Parse { path: path.to_owned(), line, message }
    })
}

/// The settings from the file at `file` (if any) with `upper` over it: every key `upper` sets
/// (the command line and the environment, as clap parsed them) replaces the file's. `T`'s
/// sections that only a file can hold are marked `skip_serializing` so `upper` never clears them.
pub fn load_layered<T: Serialize + DeserializeOwned>(file: Option<&Path>, upper: &T) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: "configuration", message };
    let mut merged = match file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
            // Checked against the schema first, so errors name the line.
            parse_toml::<T>(&text, path)?;
            toml::from_str::<toml::Table>(&text).map_err(|e| invalid(e.to_string()))?
        }
        None => toml::Table::new(),
    };
    merged.extend(toml::Table::try_from(upper).map_err(|e| invalid(e.to_string()))?);
    T::deserialize(merged).map_err(|e| invalid(e.to_string().replace('\n', " ")))
}

/// 1-based line of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |before| before.matches('\n').count() + 1)
}

/// serde for an optional duration written as `90s`, `15m`, `24h` or `7d` (zero is refused):
/// `#[serde(default, with = "relay_runtime::config::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration the way it is read.
    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_some(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    /// Reads an optional duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::duration_arg(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Parses a flag's or environment variable's duration, for clap's `value_parser`.
pub fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration("duration", text).map_err(|e| match e {
        ConfigError::Invalid { message, .. } => message,
        other => other.to_string(),
    })
}

/// Parses a positive duration such as `90s`, `15m`, `24h` or `7d`.
pub fn parse_duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let value = humantime::parse_duration(text.trim())
        .map_err(|e| ConfigError::Invalid { key, message: format!("{text:?}: {e} (use e.g. 90s, 15m, 24h, 7d)") })?;
    if value.is_zero() {
        return Err(ConfigError::Invalid { key, message: "must be greater than zero".into() });
    }
    Ok(value)
}

/// Resolves the WebSocket write bounds: `max_ws_write_buffer_bytes` (by default one largest
/// message plus slack, see [`relay_tunnel::websocket::default_write_buffer`]; it must hold one
/// largest message) and `ws_write_timeout`.
pub fn ws_write_limits(
    max_message: usize,
    write_buffer: Option<usize>,
    write_timeout: Option<Duration>,
) -> Result<(usize, std::time::Duration), ConfigError> {
    let buffer = match write_buffer {
        None => relay_tunnel::websocket::default_write_buffer(max_message),
        Some(bytes) if bytes >= max_message.saturating_add(1024) => bytes,
        Some(_) => {
            return Err(ConfigError::Invalid {
                key: "max_ws_write_buffer_bytes",
                message: format!(
                    "must hold one largest message: at least max_ws_message_bytes + 1024 ({})",
                    max_message.saturating_add(1024)
                ),
            });
        }
    };
    Ok((buffer, write_timeout.unwrap_or(relay_tunnel::websocket::DEFAULT_WS_WRITE_TIMEOUT)))
}

/// Checks a `max_ws_message_bytes` setting: a message must fit one frame under the codec's
/// hard ceiling (16 MiB leaves room for the frame around it).
pub fn ws_message_limit(max: usize) -> Result<usize, ConfigError> {
    if max == 0 || max > relay_proto::codec::MAX_FRAME_LEN_CEILING - 1024 * 1024 {
        return Err(ConfigError::Invalid {
            key: "max_ws_message_bytes",
            message: "must be between 1 and 16 MiB".into(),
        });
    }
    Ok(max)
}

/// Applies the tunnel's `idle_timeout` and `keep_alive` settings, both sides alike: keep-alives
/// must come more often than the idle timeout, or idle tunnels would time out.
pub fn tunnel_liveness(
    tunnel: &mut relay_transport::TunnelSettings,
    idle_timeout: Option<Duration>,
    keep_alive: Option<Duration>,
    handshake_timeout: Option<Duration>,
) -> Result<(), ConfigError> {
    tunnel.handshake_timeout = handshake_timeout.unwrap_or(tunnel.handshake_timeout);
    tunnel.idle_timeout = idle_timeout.unwrap_or(tunnel.idle_timeout);
    tunnel.keep_alive = keep_alive.unwrap_or(tunnel.keep_alive);
    if tunnel.keep_alive >= tunnel.idle_timeout {
        return Err(ConfigError::Invalid { key: "keep_alive", message: "must be shorter than idle_timeout".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: Option<String>,
    }

    #[test]
    fn an_unknown_key_is_a_one_line_error_with_its_name_and_line() {
        let err = parse_toml::<Sample>("listen = \"x\"\n\nlisten_adress = \"y\"\n", Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_adress") && err.contains("line 3") && err.starts_with("f.toml"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn durations_accept_the_documented_forms_and_refuse_zero() {
        for (text, secs) in [("90s", 90), ("15m", 900), ("24h", 86_400), ("7d", 604_800)] {
            assert_eq!(parse_duration("x", text).unwrap(), Duration::from_secs(secs));
        }
        assert!(parse_duration("x", "0s").is_err());
        assert!(parse_duration("x", "soon").unwrap_err().to_string().contains("invalid setting x"));
    }
}
