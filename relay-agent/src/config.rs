//! The agent's settings: defaults, the TOML file, and the layering of file < environment < flag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
pub use relay_runtime::config::ConfigError;
use relay_runtime::config::{duration_arg, load_toml, parse_toml, tunnel_liveness, ws_message_limit, ws_write_limits};
pub use relay_transport::TransportChoice;
use relay_transport::TunnelSettings;
use serde::{Deserialize, Serialize};

/// How long the bot has to answer a webhook (response head) or a WebSocket upgrade before the
/// agent answers 504 for it. ACS expects callbacks to be acknowledged quickly; 30 s is the usual
/// proxy default and far beyond what a healthy bot needs.
pub const DEFAULT_BOT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the edge has, after opening a stream, to send the exchange head.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin (metrics) listener default: loopback, and not the edge's 9090, so both can run on one
/// host.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";

/// Threads running the agent's work. One: the agent is a sidecar sharing its pod's CPUs with
/// the bot, and one thread carries hundreds of calls (relay-bench: about a quarter of a core per
/// 100 calls) while spending less per call than two, which wake each other for every frame
/// (measured on a shared 2-core machine: 0.23 vs 0.27-0.30 cores at 100 calls). 0 means one
/// per CPU.
pub const DEFAULT_WORKER_THREADS: usize = 1;

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

/// Webhook exchanges the inspection list keeps (the newest; older ones are dropped). A hundred
/// covers several calls' worth of callbacks (a call makes five to fifteen) while bounding the
/// list to [`DEFAULT_INSPECT_BODY_BYTES`] x 2 x 100 = 12.5 MiB at most.
pub const DEFAULT_INSPECT_EXCHANGES: usize = 100;

/// Bytes of each request and response body an inspection or recording keeps. ACS's IncomingCall
/// event alone is several KiB (its context carries SIP headers and custom context), so a
/// 10 KiB cap would cut exactly the event a bot developer wants to see; 64 KiB holds any ACS
/// event whole.
pub const DEFAULT_INSPECT_BODY_BYTES: usize = 64 * 1024;

/// Bytes one recording may hold before it is ended. A call's media is 50 frames of ~1 KiB each
/// way per second, about 390 MiB an hour as JSON lines (measured: 323 KiB for 3 s); 512 MiB
/// records any ordinary call whole and bounds a forgotten one.
pub const DEFAULT_RECORD_MAX_BYTES: u64 = 512 * 1024 * 1024;

/// How long one recording may run, waiting for its call included. Two hours bounds a
/// forgotten `relay-agent record` without cutting any ordinary call.
pub const DEFAULT_RECORD_MAX_DURATION: Duration = Duration::from_secs(2 * 60 * 60);

/// After a call's media session ends, how long a recording waits for the call's last callbacks
/// (ACS posts `CallDisconnected` within a second or two) before it ends; a `CallDisconnected`
/// ends it at once.
pub const DEFAULT_RECORD_LINGER: Duration = Duration::from_secs(5);

/// Calls a recording directory keeps: the newest hundred (the oldest file goes first), a few
/// days of a small bot's calls, so the one that went wrong is still there when someone looks.
pub const DEFAULT_RECORD_DIR_MAX_CALLS: usize = 100;

/// Bytes a recording directory may hold: a minute of call is about 6.5 MiB as JSON lines, so
/// 2 GiB is about five hours of calls, and bounds the disk whatever the calls' length.
pub const DEFAULT_RECORD_DIR_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// A started recording whose call has no media open and sends nothing for this long ends: a
/// call whose media never came (the bot did not answer it) or a stray late callback. Two minutes
/// is longer than any ringing or answer an ACS call waits through.
pub const DEFAULT_RECORD_IDLE: Duration = Duration::from_secs(120);

/// Recordings that may run at once: each holds a channel of frames and a reader; four lets a
/// team record a few calls side by side and bounds what a loop of `record` calls can take.
pub const DEFAULT_MAX_RECORDINGS: usize = 4;

/// Agent settings as they appear in a file, the environment (`RELAY_AGENT_*`) or on `run`'s
/// command line; every field optional. Each setting is declared here once: its doc comment is
/// its help.
#[derive(Debug, Clone, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// State directory written by `relay-agent pair`.
    #[arg(long, env = "RELAY_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Run from a bundle written by `relay-edge pair --bundle` instead of a state directory.
    /// `RELAY_AGENT_BUNDLE` may hold the bundle's text instead.
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// A bundle's PEM text (from `RELAY_AGENT_BUNDLE`); never read from a file.
    #[arg(skip)]
    #[serde(skip)]
    pub bundle_pem: Option<String>,
    /// The bot's base URL, e.g. `http://127.0.0.1:8080`.
    #[arg(long, env = "RELAY_AGENT_UPSTREAM")]
    pub upstream: Option<String>,
    /// Edge tunnel address overriding the one recorded at pairing (`host:port`).
    #[arg(skip)]
    pub edge: Option<String>,
    /// Edge tunnel address (`HOST:PORT`), overriding the one recorded at pairing. Repeat it (or
    /// separate with commas) for several edge replicas; a name that resolves to several addresses
    /// gets one connection per address.
    #[arg(long = "edge", env = "RELAY_AGENT_EDGE", value_delimiter = ',')]
    pub edges: Option<Vec<String>>,
    /// How often edge names are resolved again to find new replicas (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_EDGE_RESOLVE_INTERVAL", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub edge_resolve_interval: Option<Duration>,
    /// While an edge does not answer, how often a fresh connection attempt starts (e.g. `1s`).
    #[arg(long, env = "RELAY_AGENT_REDIAL_INTERVAL", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub redial_interval: Option<Duration>,
    /// Edge replicas looked for behind one address at most (e.g. behind a load balancer).
    #[arg(long, env = "RELAY_AGENT_MAX_EDGE_REPLICAS")]
    pub max_edge_replicas: Option<usize>,
    /// Admin listener serving /metrics (default 127.0.0.1:9091).
    #[arg(long, env = "RELAY_AGENT_ADMIN_LISTEN")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Threads running the agent's work (default 1); 0: one per CPU the container may use.
    #[arg(long, env = "RELAY_AGENT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// How long the bot has to answer (e.g. `30s`).
    #[arg(long, env = "RELAY_AGENT_BOT_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub bot_timeout: Option<Duration>,
    /// How long the edge has, after opening an exchange stream, to send its head (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_HEAD_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub head_timeout: Option<Duration>,
    /// First delay before reconnecting after the tunnel drops (e.g. `100ms`).
    #[arg(long, env = "RELAY_AGENT_RECONNECT_INITIAL", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub reconnect_initial: Option<Duration>,
    /// Longest delay between reconnection attempts (e.g. `1500ms`).
    #[arg(long, env = "RELAY_AGENT_RECONNECT_MAX", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub reconnect_max: Option<Duration>,
    /// Largest WebSocket message relayed, in bytes.
    #[arg(long, env = "RELAY_AGENT_MAX_WS_MESSAGE_BYTES")]
    pub max_ws_message_bytes: Option<usize>,
    /// Bytes a WebSocket may hold queued for writing (default: one largest message + 64 KiB).
    #[arg(long, env = "RELAY_AGENT_MAX_WS_WRITE_BUFFER_BYTES")]
    pub max_ws_write_buffer_bytes: Option<usize>,
    /// How long a WebSocket message may wait for its socket to take it before both ends get
    /// 1008 (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_WS_WRITE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub ws_write_timeout: Option<Duration>,
    /// How long open calls may run after SIGTERM before they are closed (e.g. `30s`).
    #[arg(long, env = "RELAY_AGENT_DRAIN_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub drain_timeout: Option<Duration>,
    /// Tunnel idle timeout (e.g. `5s`).
    #[arg(long, env = "RELAY_AGENT_IDLE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub idle_timeout: Option<Duration>,
    /// Tunnel keep-alive interval (e.g. `1s`).
    #[arg(long, env = "RELAY_AGENT_KEEP_ALIVE", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub keep_alive: Option<Duration>,
    /// How long a tunnel handshake may take (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_HANDSHAKE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub handshake_timeout: Option<Duration>,
    /// Tunnel transport: `auto` (QUIC, else TLS/TCP when UDP does not pass), `quic` or `tcp`.
    #[arg(long, env = "RELAY_AGENT_TRANSPORT")]
    pub transport: Option<String>,
    /// With `auto`: how long QUIC may go unanswered before TCP is used (e.g. `3s`).
    #[arg(long, env = "RELAY_AGENT_QUIC_FALLBACK_AFTER", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub quic_fallback_after: Option<Duration>,
    /// With `auto`: how often QUIC is tried again while on TCP (e.g. `5m`).
    #[arg(long, env = "RELAY_AGENT_QUIC_PROBE_INTERVAL", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub quic_probe_interval: Option<Duration>,
    /// A gap between two media frames longer than this is a glitch (e.g. `60ms`).
    #[arg(long, env = "RELAY_AGENT_MEDIA_GLITCH_GAP", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub media_glitch_gap: Option<Duration>,
    /// Keep the last webhook exchanges for `relay-agent inspect` and `replay`, and allow
    /// `relay-agent record`, through the admin listener. Off by default: callbacks carry phone
    /// numbers and media carries the caller's voice.
    #[arg(long, env = "RELAY_AGENT_INSPECT", num_args = 0..=1, default_missing_value = "true")]
    pub inspect: Option<bool>,
    /// Exchanges the inspection list keeps (default 100).
    #[arg(long, env = "RELAY_AGENT_INSPECT_EXCHANGES")]
    pub inspect_exchanges: Option<usize>,
    /// Bytes of each body an inspection or recording keeps (default 65536).
    #[arg(long, env = "RELAY_AGENT_INSPECT_BODY_BYTES")]
    pub inspect_body_bytes: Option<usize>,
    /// More header names whose values are redacted (besides Authorization, cookies and API
    /// keys), e.g. the bot's own shared-secret header.
    #[arg(long, env = "RELAY_AGENT_REDACT_HEADERS", value_delimiter = ',')]
    pub redact_headers: Option<Vec<String>>,
    /// Bytes one recording may hold before it ends (default 512 MiB).
    #[arg(long, env = "RELAY_AGENT_RECORD_MAX_BYTES")]
    pub record_max_bytes: Option<u64>,
    /// How long one recording may run (e.g. `2h`).
    #[arg(long, env = "RELAY_AGENT_RECORD_MAX_DURATION", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub record_max_duration: Option<Duration>,
    /// After a recorded call's media ends, how long to wait for its last callbacks (e.g. `5s`).
    #[arg(long, env = "RELAY_AGENT_RECORD_LINGER", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub record_linger: Option<Duration>,
    /// Recordings that may run at once (default 4).
    #[arg(long, env = "RELAY_AGENT_MAX_RECORDINGS")]
    pub max_recordings: Option<usize>,
    /// Record every call into this directory, one JSON-lines file per call (needs `inspect`).
    #[arg(long, env = "RELAY_AGENT_RECORD_DIR")]
    pub record_dir: Option<PathBuf>,
    /// Calls the recording directory keeps; the oldest file goes first (default 100).
    #[arg(long, env = "RELAY_AGENT_RECORD_DIR_MAX_CALLS")]
    pub record_dir_max_calls: Option<usize>,
    /// Bytes the recording directory may hold (default 2 GiB).
    #[arg(long, env = "RELAY_AGENT_RECORD_DIR_MAX_BYTES")]
    pub record_dir_max_bytes: Option<u64>,
    /// A started recording whose call has no media open and sends nothing this long ends (e.g. `2m`).
    #[arg(long, env = "RELAY_AGENT_RECORD_IDLE", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub record_idle: Option<Duration>,
}

/// What the agent keeps of the exchanges it relays, when asked to (`inspect = true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectSettings {
    /// Whether inspection and recording are on.
    pub enabled: bool,
    /// See [`DEFAULT_INSPECT_EXCHANGES`].
    pub exchanges: usize,
    /// See [`DEFAULT_INSPECT_BODY_BYTES`].
    pub body_bytes: usize,
    /// Header names redacted besides [`relay_record::redact::DEFAULT_REDACTED_HEADERS`].
    pub redact_headers: Vec<String>,
    /// See [`DEFAULT_RECORD_MAX_BYTES`].
    pub record_max_bytes: u64,
    /// See [`DEFAULT_RECORD_MAX_DURATION`].
    pub record_max_duration: Duration,
    /// See [`DEFAULT_RECORD_LINGER`].
    pub record_linger: Duration,
    /// See [`DEFAULT_MAX_RECORDINGS`].
    pub max_recordings: usize,
    /// Where every call is recorded, when set.
    pub record_dir: Option<PathBuf>,
    /// See [`DEFAULT_RECORD_DIR_MAX_CALLS`].
    pub record_dir_max_calls: usize,
    /// See [`DEFAULT_RECORD_DIR_MAX_BYTES`].
    pub record_dir_max_bytes: u64,
    /// See [`DEFAULT_RECORD_IDLE`].
    pub record_idle: Duration,
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
    /// See [`DEFAULT_WORKER_THREADS`]; 0 is one per CPU.
    pub worker_threads: usize,
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
    /// See [`relay_tunnel::quality::DEFAULT_GLITCH_GAP`].
    pub media_glitch_gap: Duration,
    /// Inspection and recording.
    pub inspect: InspectSettings,
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
    /// Settings with every default, with the admin listener on a loopback port from the OS (the
    /// binary's default is [`DEFAULT_ADMIN_LISTEN`]).
    pub fn new(state_dir: PathBuf, upstream: Uri) -> Self {
        let mut settings = AgentConfig::default().with_defaults(IdentitySource::StateDir(state_dir), upstream);
        settings.admin_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        settings
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

    /// The file at `file` (if any) with `upper` (flags and environment) over it.
    pub fn layered(file: Option<&Path>, upper: &AgentConfig) -> Result<Self, ConfigError> {
        relay_runtime::config::load_layered(file, upper)
    }

    /// Validates and applies defaults.
    pub fn resolve(mut self) -> Result<AgentSettings, ConfigError> {
        // A bundle's text (environment) beats a bundle path from the file; a path given as a
        // flag never reaches here with text set (see the binary). Either beats a state dir.
        let identity = if let Some(pem) = self.bundle_pem.take() {
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
            IdentitySource::StateDir(self.state_dir.clone().ok_or(ConfigError::Missing("state_dir (or bundle)"))?)
        };
        let upstream = parse_upstream(self.upstream.as_deref().ok_or(ConfigError::Missing("upstream"))?)?;
        let mut settings = self.with_defaults(identity, upstream);
        settings.edges = match (&self.edge, &self.edges) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "edges",
                    message: "give either `edge` or `edges`, not both".into(),
                });
            }
            (Some(one), None) => vec![one.clone()],
            (None, Some(many)) => many.clone(),
            (None, None) => Vec::new(),
        };
        for edge in &settings.edges {
            check_edge_addr(edge)?;
        }
        if settings.max_edge_replicas == 0 {
            return Err(ConfigError::Invalid { key: "max_edge_replicas", message: "must be at least 1".into() });
        }
        let admin = self.admin_listen.map_or_else(|| DEFAULT_ADMIN_LISTEN.parse(), Ok);
        settings.admin_listen = Some(admin.map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
            key: "admin_listen",
            message: e.to_string(),
        })?);
        ws_message_limit(settings.max_ws_message_bytes)?;
        (settings.max_ws_write_buffer_bytes, settings.ws_write_timeout) =
            ws_write_limits(settings.max_ws_message_bytes, self.max_ws_write_buffer_bytes, self.ws_write_timeout)?;
        tunnel_liveness(&mut settings.tunnel, self.idle_timeout, self.keep_alive, self.handshake_timeout)?;
        if let Some(text) = &self.transport {
            settings.transport =
                TransportChoice::parse(text).map_err(|message| ConfigError::Invalid { key: "transport", message })?;
        }
        for (key, value) in [
            ("inspect_exchanges", settings.inspect.exchanges),
            ("inspect_body_bytes", settings.inspect.body_bytes),
            ("max_recordings", settings.inspect.max_recordings),
            ("record_dir_max_calls", settings.inspect.record_dir_max_calls),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        if settings.inspect.record_dir.is_some() && !settings.inspect.enabled {
            return Err(ConfigError::Invalid {
                key: "record_dir",
                message: "recording every call needs inspect = true (recordings hold callbacks and audio)".into(),
            });
        }
        for name in &settings.inspect.redact_headers {
            if http::HeaderName::from_bytes(name.trim().as_bytes()).is_err() {
                return Err(ConfigError::Invalid {
                    key: "redact_headers",
                    message: format!("{name:?} is not a header name"),
                });
            }
        }
        if settings.reconnect_initial > settings.reconnect_max {
            return Err(ConfigError::Invalid {
                key: "reconnect_initial",
                message: "must not be longer than reconnect_max".into(),
            });
        }
        Ok(settings)
    }

    /// The settings this configuration gives, each default filled in where it gives none; the
    /// values are checked by [`AgentConfig::resolve`].
    fn with_defaults(&self, identity: IdentitySource, upstream: Uri) -> AgentSettings {
        let max_ws_message_bytes = self.max_ws_message_bytes.unwrap_or(relay_tunnel::DEFAULT_MAX_WS_MESSAGE);
        AgentSettings {
            identity,
            upstream,
            edges: Vec::new(),
            edge_resolve_interval: self.edge_resolve_interval.unwrap_or(DEFAULT_EDGE_RESOLVE_INTERVAL),
            redial_interval: self.redial_interval.unwrap_or(DEFAULT_REDIAL_INTERVAL),
            max_edge_replicas: self.max_edge_replicas.unwrap_or(DEFAULT_MAX_EDGE_REPLICAS),
            admin_listen: self.admin_listen,
            worker_threads: self.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS),
            bot_timeout: self.bot_timeout.unwrap_or(DEFAULT_BOT_TIMEOUT),
            head_timeout: self.head_timeout.unwrap_or(DEFAULT_HEAD_TIMEOUT),
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            max_ws_message_bytes,
            max_ws_write_buffer_bytes: relay_tunnel::websocket::default_write_buffer(max_ws_message_bytes),
            ws_write_timeout: relay_tunnel::websocket::DEFAULT_WS_WRITE_TIMEOUT,
            reconnect_initial: self.reconnect_initial.unwrap_or(DEFAULT_RECONNECT_INITIAL),
            reconnect_max: self.reconnect_max.unwrap_or(DEFAULT_RECONNECT_MAX),
            tunnel: TunnelSettings::default(),
            transport: TransportChoice::default(),
            quic_fallback_after: self.quic_fallback_after.unwrap_or(DEFAULT_QUIC_FALLBACK_AFTER),
            quic_probe_interval: self.quic_probe_interval.unwrap_or(DEFAULT_QUIC_PROBE_INTERVAL),
            media_glitch_gap: self.media_glitch_gap.unwrap_or(relay_tunnel::quality::DEFAULT_GLITCH_GAP),
            inspect: InspectSettings {
                enabled: self.inspect.unwrap_or(false),
                exchanges: self.inspect_exchanges.unwrap_or(DEFAULT_INSPECT_EXCHANGES),
                body_bytes: self.inspect_body_bytes.unwrap_or(DEFAULT_INSPECT_BODY_BYTES),
                redact_headers: self.redact_headers.clone().unwrap_or_default(),
                record_max_bytes: self.record_max_bytes.unwrap_or(DEFAULT_RECORD_MAX_BYTES),
                record_max_duration: self.record_max_duration.unwrap_or(DEFAULT_RECORD_MAX_DURATION),
                record_linger: self.record_linger.unwrap_or(DEFAULT_RECORD_LINGER),
                max_recordings: self.max_recordings.unwrap_or(DEFAULT_MAX_RECORDINGS),
                record_dir: self.record_dir.clone(),
                record_dir_max_calls: self.record_dir_max_calls.unwrap_or(DEFAULT_RECORD_DIR_MAX_CALLS),
                record_dir_max_bytes: self.record_dir_max_bytes.unwrap_or(DEFAULT_RECORD_DIR_MAX_BYTES),
                record_idle: self.record_idle.unwrap_or(DEFAULT_RECORD_IDLE),
            },
        }
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
        assert_eq!(settings.transport, TransportChoice::Only(relay_transport::Transport::Tcp));
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
    fn the_agent_runs_on_one_thread_unless_the_file_asks_for_more() {
        let base = "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\n";
        let settings = AgentConfig::parse(base, Path::new("f")).unwrap().resolve().unwrap();
        assert_eq!(settings.worker_threads, 1);
        let text = format!("{base}worker_threads = 0\n");
        let settings = AgentConfig::parse(&text, Path::new("f")).unwrap().resolve().unwrap();
        assert_eq!(relay_runtime::Workers::from_setting(settings.worker_threads), relay_runtime::Workers::PerCpu);
    }

    #[test]
    fn inspection_is_off_unless_asked_and_its_bounds_are_checked() {
        let base = "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\n";
        let settings = AgentConfig::parse(base, Path::new("f")).unwrap().resolve().unwrap();
        assert!(!settings.inspect.enabled);
        assert_eq!(settings.inspect.body_bytes, DEFAULT_INSPECT_BODY_BYTES);
        let text = format!("{base}inspect = true\ninspect_exchanges = 5\nredact_headers = [\"X-Bot-Secret\"]\n");
        let settings = AgentConfig::parse(&text, Path::new("f")).unwrap().resolve().unwrap();
        assert!(settings.inspect.enabled);
        assert_eq!((settings.inspect.exchanges, settings.inspect.redact_headers.len()), (5, 1));
        for bad in [
            "inspect_body_bytes = 0",
            "redact_headers = [\"bad header\"]",
            "max_recordings = 0",
            "record_dir = \"/tmp/calls\"",
        ] {
            let err = AgentConfig::parse(&format!("{base}{bad}\n"), Path::new("f"))
                .and_then(AgentConfig::resolve)
                .unwrap_err()
                .to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key) && !err.contains('\n'), "{bad}: {err}");
        }
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

    /// The file `text` with `flags` over it, as `run` layers them.
    fn layered(text: &str, flags: &AgentConfig) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, text).unwrap();
        AgentConfig::layered(Some(&file), flags)
    }

    #[test]
    fn flags_override_the_file() {
        let file = "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\n";
        let flags = AgentConfig { upstream: Some("http://127.0.0.1:2".into()), ..Default::default() };
        let settings = layered(file, &flags).unwrap().resolve().unwrap();
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
            let err = AgentConfig::parse(&format!("{base}{bad}\n"), Path::new("f"))
                .and_then(AgentConfig::resolve)
                .unwrap_err();
            let key = bad.split(' ').next().unwrap();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn several_edges_come_from_the_file_or_the_flags_and_are_checked() {
        let text =
            "state_dir = \"/s\"\nupstream = \"http://127.0.0.1:1\"\nedges = [\"a.example:4433\", \"[::1]:4433\"]\n";
        let file = AgentConfig::parse(text, Path::new("f")).unwrap();
        assert_eq!(file.clone().resolve().unwrap().edges, ["a.example:4433", "[::1]:4433"]);
        let flags = AgentConfig { edges: Some(vec!["b.example:1".into()]), ..Default::default() };
        assert_eq!(layered(text, &flags).unwrap().resolve().unwrap().edges, ["b.example:1"]);
        for bad in ["no-port", "host:0", "host:99999", ":4433"] {
            let flags = AgentConfig { edges: Some(vec![bad.into()]), ..Default::default() };
            let err = layered(text, &flags).unwrap().resolve().unwrap_err().to_string();
            assert!(err.contains("edges"), "{bad}: {err}");
        }
        let both = AgentConfig { edge: Some("c:1".into()), ..file }.resolve().unwrap_err().to_string();
        assert!(both.contains("not both"), "{both}");
    }
}
