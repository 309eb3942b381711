//! The agent's settings: defaults, the TOML file, and the layering of file < environment < flag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
pub use relay_cli::config::ConfigError;
use relay_cli::config::{load_toml, parse_duration, parse_toml, tunnel_liveness, ws_message_limit, ws_write_limits};
use relay_transport::{Transport, TunnelSettings};
use serde::Deserialize;

/// How long the bot has to answer a webhook (response head) or a WebSocket upgrade before the
/// agent answers 504 for it. ACS expects callbacks to be acknowledged quickly; 30 s is the usual
/// proxy default and far beyond what a healthy bot needs.
pub const DEFAULT_BOT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the edge has, after opening a stream, to send the exchange head.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin (metrics) listener default: loopback, and not the edge's 9090, so both can run on one
/// host.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";

/// How long a draining agent keeps open calls running. Container Apps and Kubernetes give a
/// container 30 s between SIGTERM and SIGKILL by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// First reconnection delay after the tunnel drops.
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_millis(100);

/// Longest reconnection delay. An agent must be back within two seconds of the edge listening
/// again: the longest wait is this cap, plus one handshake (a few milliseconds to a few hundred),
/// so 1.5 s leaves room. Jitter (each delay is drawn from half to all of the current step) keeps
/// a hundred agents from arriving in the same instant.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_millis(1500);

/// While an edge does not answer, a fresh connection attempt starts this often beside the ones
/// still waiting. QUIC retransmits an unanswered handshake with exponential backoff (1 s, 2 s,
/// 4 s...), so an agent that kept dialling one attempt during an edge outage could wait seconds
/// after the edge is back; a fresh attempt each second puts the wait under a second.
pub const DEFAULT_REDIAL_INTERVAL: Duration = Duration::from_secs(1);

/// How often each edge name is resolved again, so an agent finds edge replicas that were added
/// or replaced behind a DNS name (a Kubernetes headless Service returns one address per ready
/// replica). Ten seconds keeps a new replica's wait for agents short at the cost of one DNS query
/// per name per interval.
pub const DEFAULT_EDGE_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);

/// Edge replicas the agent looks for behind one address at most (it dials the address again
/// until new connections only find replicas it holds). Sixteen is more edge replicas than a
/// voice bot's traffic needs, and bounds the connections one address can make the agent hold.
pub const DEFAULT_MAX_EDGE_REPLICAS: usize = 16;

/// In `auto` mode, how long a QUIC handshake may go unanswered before the agent connects over
/// TCP instead. A QUIC handshake takes one round trip, well under a second on any real path;
/// a firewall that drops UDP gives no answer at all, so waiting longer only delays the call
/// traffic. 3 s also covers a lost first packet and its retransmission (quinn retries after 1 s).
pub const DEFAULT_QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// In `auto` mode, while connected over TCP, how often the agent tries QUIC again so it moves
/// back when UDP passes again. Five minutes keeps the cost (one handshake) negligible while a
/// firewall change is picked up within a coffee break; tests set a few seconds.
pub const DEFAULT_QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// Which transport the agent dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// QUIC first; TLS/TCP when no QUIC handshake completes within the fallback deadline, with
    /// QUIC probed again in the background.
    #[default]
    Auto,
    /// Only this transport.
    Only(Transport),
}

impl TransportChoice {
    /// Parses `auto`, `quic` or `tcp`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Only(Transport::Quic)),
            "tcp" => Ok(Self::Only(Transport::Tcp)),
            other => Err(ConfigError::Invalid {
                key: "transport",
                message: format!("{other:?}: expected \"auto\", \"quic\" or \"tcp\""),
            }),
        }
    }
}

/// Agent settings as they appear in a file or on the command line; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// State directory written by `relay-agent pair`.
    pub state_dir: Option<PathBuf>,
    /// A bundle file from `relay-edge pair --bundle`, used instead of a state directory.
    pub bundle: Option<PathBuf>,
    /// A bundle's PEM text (from `RELAY_AGENT_BUNDLE`); never read from a file.
    #[serde(skip)]
    pub bundle_pem: Option<String>,
    /// The bot's base URL (`http://127.0.0.1:8080`).
    pub upstream: Option<String>,
    /// Edge tunnel address overriding the one recorded at pairing (`host:port`).
    pub edge: Option<String>,
    /// Several edge tunnel addresses (`["host:port", ...]`), one connection to each address
    /// every name resolves to; overrides the address recorded at pairing.
    pub edges: Option<Vec<String>>,
    /// How often edge names are resolved again (`"10s"`).
    pub edge_resolve_interval: Option<String>,
    /// How often a fresh connection attempt starts while an edge does not answer (`"1s"`).
    pub redial_interval: Option<String>,
    /// Edge replicas looked for behind one address at most.
    pub max_edge_replicas: Option<usize>,
    /// Admin listener serving `/metrics` (`ip:port`).
    pub admin_listen: Option<std::net::SocketAddr>,
    /// How long the bot has to answer (`"30s"`).
    pub bot_timeout: Option<String>,
    /// Largest WebSocket message relayed, in bytes.
    pub max_ws_message_bytes: Option<usize>,
    /// Bytes a WebSocket may hold queued for writing (default: one largest message + 64 KiB).
    pub max_ws_write_buffer_bytes: Option<usize>,
    /// How long a WebSocket message may wait for its socket to take it before 1008 (`"10s"`).
    pub ws_write_timeout: Option<String>,
    /// How long open calls may run after SIGTERM (`"30s"`).
    pub drain_timeout: Option<String>,
    /// Tunnel idle timeout (`"5s"`).
    pub idle_timeout: Option<String>,
    /// Tunnel keep-alive interval (`"1s"`).
    pub keep_alive: Option<String>,
    /// How long a tunnel handshake may take (`"10s"`).
    pub handshake_timeout: Option<String>,
    /// `"auto"` (default), `"quic"` or `"tcp"`.
    pub transport: Option<String>,
    /// In `auto` mode, how long QUIC may go unanswered before TCP is used (`"3s"`).
    pub quic_fallback_after: Option<String>,
    /// In `auto` mode, how often QUIC is tried again while on TCP (`"5m"`).
    pub quic_probe_interval: Option<String>,
}

/// Where the agent's key and certificate come from.
#[derive(Clone)]
pub enum IdentitySource {
    /// A state directory written by `relay-agent pair`; renewals are stored back in it.
    StateDir(PathBuf),
    /// A bundle's PEM text; renewals live in memory only.
    Bundle(String),
}

impl std::fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::StateDir(dir) => f.debug_tuple("StateDir").field(dir).finish(),
            Self::Bundle(_) => f.write_str("Bundle(<redacted>)"),
        }
    }
}

/// Fully resolved agent settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Where the identity comes from.
    pub identity: IdentitySource,
    /// The bot's base URL: scheme `http`, an authority, no path.
    pub upstream: Uri,
    /// The edges to keep connections to (`host:port`, each name may resolve to several
    /// replicas); empty means the address recorded at pairing.
    pub edges: Vec<String>,
    /// See [`DEFAULT_EDGE_RESOLVE_INTERVAL`].
    pub edge_resolve_interval: Duration,
    /// See [`DEFAULT_REDIAL_INTERVAL`].
    pub redial_interval: Duration,
    /// See [`DEFAULT_MAX_EDGE_REPLICAS`].
    pub max_edge_replicas: usize,
    /// See [`AgentConfig::admin_listen`]; `None` disables it.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// See [`DEFAULT_BOT_TIMEOUT`].
    pub bot_timeout: Duration,
    /// See [`DEFAULT_HEAD_TIMEOUT`].
    pub head_timeout: Duration,
    /// See [`DEFAULT_DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
    /// See [`relay_tunnel::DEFAULT_MAX_WS_MESSAGE`].
    pub max_ws_message_bytes: usize,
    /// See [`relay_tunnel::websocket::default_write_buffer`].
    pub max_ws_write_buffer_bytes: usize,
    /// See [`relay_tunnel::websocket::DEFAULT_WS_WRITE_TIMEOUT`].
    pub ws_write_timeout: Duration,
    /// See [`DEFAULT_RECONNECT_INITIAL`].
    pub reconnect_initial: Duration,
    /// See [`DEFAULT_RECONNECT_MAX`].
    pub reconnect_max: Duration,
    /// Liveness, handshake and stream settings of the tunnel, either transport.
    pub tunnel: TunnelSettings,
    /// See [`TransportChoice`].
    pub transport: TransportChoice,
    /// See [`DEFAULT_QUIC_FALLBACK_AFTER`].
    pub quic_fallback_after: Duration,
    /// See [`DEFAULT_QUIC_PROBE_INTERVAL`].
    pub quic_probe_interval: Duration,
}

/// Checks and normalises the bot's base URL.
pub fn parse_upstream(text: &str) -> Result<Uri, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: "upstream", message };
    let uri: Uri = text.parse().map_err(|e| invalid(format!("{text:?}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(format!("{text:?}: only http:// upstreams are supported (the bot is on localhost)")));
    }
    let authority = uri.authority().ok_or_else(|| invalid(format!("{text:?}: no host")))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid(format!("{text:?}: give the bot's base URL without a path")));
    }
    Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| invalid(e.to_string()))
}

/// Checks that an edge address has the `host:port` shape before anything dials it.
pub fn check_edge_addr(text: &str) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: "edges", message };
    let (host, port) = text.rsplit_once(':').ok_or_else(|| invalid(format!("{text:?}: expected host:port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid(format!("{text:?}: no host")));
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(()),
        _ => Err(invalid(format!("{text:?}: the port must be a number from 1 to 65535"))),
    }
}

impl AgentSettings {
    /// Settings with every default.
    pub fn new(state_dir: PathBuf, upstream: Uri) -> Self {
        Self {
            identity: IdentitySource::StateDir(state_dir),
            upstream,
            edges: Vec::new(),
            edge_resolve_interval: DEFAULT_EDGE_RESOLVE_INTERVAL,
            redial_interval: DEFAULT_REDIAL_INTERVAL,
            max_edge_replicas: DEFAULT_MAX_EDGE_REPLICAS,
            // A port from the OS; the binary's configuration defaults to DEFAULT_ADMIN_LISTEN.
            admin_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            bot_timeout: DEFAULT_BOT_TIMEOUT,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_ws_message_bytes: relay_tunnel::DEFAULT_MAX_WS_MESSAGE,
            max_ws_write_buffer_bytes: relay_tunnel::websocket::default_write_buffer(
                relay_tunnel::DEFAULT_MAX_WS_MESSAGE,
            ),
            ws_write_timeout: relay_tunnel::websocket::DEFAULT_WS_WRITE_TIMEOUT,
            reconnect_initial: DEFAULT_RECONNECT_INITIAL,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            tunnel: TunnelSettings::default(),
            transport: TransportChoice::default(),
            quic_fallback_after: DEFAULT_QUIC_FALLBACK_AFTER,
            quic_probe_interval: DEFAULT_QUIC_PROBE_INTERVAL,
        }
    }
}

impl AgentConfig {
    /// Reads and parses a TOML file, rejecting unknown keys with their name and line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// Parses TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse_toml(text, path)
    }

    /// `other` wins wherever it has a value.
    pub fn overlay(self, other: AgentConfig) -> AgentConfig {
        AgentConfig {
            state_dir: other.state_dir.or(self.state_dir),
            bundle: other.bundle.or(self.bundle),
            bundle_pem: other.bundle_pem.or(self.bundle_pem),
            upstream: other.upstream.or(self.upstream),
            edge: other.edge.or(self.edge),
            edges: other.edges.or(self.edges),
            edge_resolve_interval: other.edge_resolve_interval.or(self.edge_resolve_interval),
            redial_interval: other.redial_interval.or(self.redial_interval),
            max_edge_replicas: other.max_edge_replicas.or(self.max_edge_replicas),
            admin_listen: other.admin_listen.or(self.admin_listen),
            bot_timeout: other.bot_timeout.or(self.bot_timeout),
            max_ws_message_bytes: other.max_ws_message_bytes.or(self.max_ws_message_bytes),
            max_ws_write_buffer_bytes: other.max_ws_write_buffer_bytes.or(self.max_ws_write_buffer_bytes),
            ws_write_timeout: other.ws_write_timeout.or(self.ws_write_timeout),
            drain_timeout: other.drain_timeout.or(self.drain_timeout),
            idle_timeout: other.idle_timeout.or(self.idle_timeout),
            keep_alive: other.keep_alive.or(self.keep_alive),
            handshake_timeout: other.handshake_timeout.or(self.handshake_timeout),
            transport: other.transport.or(self.transport),
            quic_fallback_after: other.quic_fallback_after.or(self.quic_fallback_after),
            quic_probe_interval: other.quic_probe_interval.or(self.quic_probe_interval),
        }
    }

    /// Validates and applies defaults.
    pub fn resolve(self) -> Result<AgentSettings, ConfigError> {
        // A bundle's text (environment) beats a bundle path from the file; a path given as a
        // flag never reaches here with text set (see the binary). Either beats a state dir.
        let identity = if let Some(pem) = self.bundle_pem {
            IdentitySource::Bundle(pem)
        } else if let Some(path) = &self.bundle {
            let bytes = relay_pki::read_private_key_file(path)
                .map_err(|error| ConfigError::Read { path: path.clone(), error })?;
            let text = String::from_utf8(bytes).map_err(|_| ConfigError::Invalid {
                key: "bundle",
                message: format!("{} is not text", path.display()),
            })?;
            IdentitySource::Bundle(text)
        } else {
            IdentitySource::StateDir(self.state_dir.ok_or(ConfigError::Missing("state_dir (or bundle)"))?)
        };
        let upstream = parse_upstream(self.upstream.as_deref().ok_or(ConfigError::Missing("upstream"))?)?;
        let mut settings = AgentSettings::new(PathBuf::new(), upstream);
        settings.identity = identity;
        settings.edges = match (self.edge, self.edges) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "edges",
                    message: "give either `edge` or `edges`, not both".into(),
                });
            }
            (Some(one), None) => vec![one],
            (None, Some(many)) => many,
            (None, None) => Vec::new(),
        };
        for edge in &settings.edges {
            check_edge_addr(edge)?;
        }
        if let Some(max) = self.max_edge_replicas {
            if max == 0 {
                return Err(ConfigError::Invalid { key: "max_edge_replicas", message: "must be at least 1".into() });
            }
            settings.max_edge_replicas = max;
        }
        if let Some(text) = &self.edge_resolve_interval {
            settings.edge_resolve_interval = parse_duration("edge_resolve_interval", text)?;
        }
        settings.admin_listen = Some(match self.admin_listen {
            Some(addr) => addr,
            None => DEFAULT_ADMIN_LISTEN.parse().map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                key: "admin_listen",
                message: e.to_string(),
            })?,
        });
        if let Some(text) = &self.redial_interval {
            settings.redial_interval = parse_duration("redial_interval", text)?;
        }
        if let Some(text) = &self.drain_timeout {
            settings.drain_timeout = parse_duration("drain_timeout", text)?;
        }
        if let Some(text) = &self.bot_timeout {
            settings.bot_timeout = parse_duration("bot_timeout", text)?;
        }
        if let Some(max) = self.max_ws_message_bytes {
            settings.max_ws_message_bytes = ws_message_limit(max)?;
        }
        (settings.max_ws_write_buffer_bytes, settings.ws_write_timeout) = ws_write_limits(
            settings.max_ws_message_bytes,
            self.max_ws_write_buffer_bytes,
            self.ws_write_timeout.as_deref(),
        )?;
        tunnel_liveness(
            &mut settings.tunnel,
            self.idle_timeout.as_deref(),
            self.keep_alive.as_deref(),
            self.handshake_timeout.as_deref(),
        )?;
        if let Some(text) = &self.transport {
            settings.transport = TransportChoice::parse(text)?;
        }
        if let Some(text) = &self.quic_fallback_after {
            settings.quic_fallback_after = parse_duration("quic_fallback_after", text)?;
        }
        if let Some(text) = &self.quic_probe_interval {
            settings.quic_probe_interval = parse_duration("quic_probe_interval", text)?;
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_is_auto_unless_chosen_and_a_bad_choice_is_one_clear_error() {
        let base = "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\n";
        let settings = AgentConfig::parse(base, Path::new("f")).unwrap().resolve().unwrap();
        assert_eq!(settings.transport, TransportChoice::Auto);
        assert_eq!(settings.quic_fallback_after, DEFAULT_QUIC_FALLBACK_AFTER);
        assert_eq!(settings.quic_probe_interval, DEFAULT_QUIC_PROBE_INTERVAL);
        let text = format!("{base}transport = \"TCP\"\nquic_probe_interval = \"4s\"\nquic_fallback_after = \"1s\"\n");
        let settings = AgentConfig::parse(&text, Path::new("f")).unwrap().resolve().unwrap();
        assert_eq!(settings.transport, TransportChoice::Only(Transport::Tcp));
        assert_eq!(
            (settings.quic_probe_interval, settings.quic_fallback_after),
            (Duration::from_secs(4), Duration::from_secs(1))
        );
        let err = AgentConfig::parse(&format!("{base}transport = \"udp\"\n"), Path::new("f"))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("transport") && err.contains("\"udp\"") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn upstream_must_be_a_plain_http_base_url() {
        assert_eq!(parse_upstream("http://127.0.0.1:8080").unwrap().to_string(), "http://127.0.0.1:8080/");
        assert_eq!(parse_upstream("http://localhost:3978/").unwrap().authority().unwrap().as_str(), "localhost:3978");
        for bad in ["https://bot:443", "127.0.0.1:8080", "http://bot/api", "not a url"] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_name_and_line() {
        let err = AgentConfig::parse("upstream = \"http://x:1\"\n\nupstrem = 1\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstrem") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file =
            AgentConfig::parse("state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\n", Path::new("f")).unwrap();
        let flags = AgentConfig { upstream: Some("http://127.0.0.1:2".into()), ..Default::default() };
        let settings = file.overlay(flags).resolve().unwrap();
        assert_eq!(settings.upstream.port_u16(), Some(2));
        assert_eq!(settings.bot_timeout, DEFAULT_BOT_TIMEOUT);
    }

    #[test]
    fn tunnel_timeouts_are_configurable_and_checked() {
        let base = "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\n";
        let text = format!("{base}handshake_timeout = \"2s\"\nidle_timeout = \"3s\"\nkeep_alive = \"500ms\"\n");
        let quic = AgentConfig::parse(&text, Path::new("f")).unwrap().resolve().unwrap().tunnel;
        assert_eq!(
            (quic.handshake_timeout, quic.idle_timeout, quic.keep_alive),
            (Duration::from_secs(2), Duration::from_secs(3), Duration::from_millis(500))
        );
        for bad in ["handshake_timeout = \"0s\"", "keep_alive = \"9s\""] {
            let err = AgentConfig::parse(&format!("{base}{bad}\n"), Path::new("f")).unwrap().resolve().unwrap_err();
            let key = bad.split(' ').next().unwrap();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn several_edges_come_from_the_file_or_the_flags_and_are_checked() {
        let file = AgentConfig::parse(
            "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\nedges = [\"a.example:4433\", \"[::1]:4433\"]\n",
            Path::new("f"),
        )
        .unwrap();
        assert_eq!(file.clone().resolve().unwrap().edges, ["a.example:4433", "[::1]:4433"]);
        let flags = AgentConfig { edges: Some(vec!["b.example:1".into()]), ..Default::default() };
        assert_eq!(file.clone().overlay(flags).resolve().unwrap().edges, ["b.example:1"]);
        for bad in ["no-port", "host:0", "host:99999", ":4433"] {
            let flags = AgentConfig { edges: Some(vec![bad.into()]), ..Default::default() };
            let err = file.clone().overlay(flags).resolve().unwrap_err().to_string();
            assert!(err.contains("edges"), "{bad}: {err}");
        }
        let both = AgentConfig { edge: Some("c:1".into()), ..file }.resolve().unwrap_err().to_string();
        assert!(both.contains("not both"), "{both}");
    }
}
