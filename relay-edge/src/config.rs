//! The edge's settings: defaults, the TOML file, and the layering of file < environment < flag.
//!
//! Every setting exists once, in [`EdgeConfig`] (all optional, as written in a file or given on
//! the command line). [`EdgeConfig::overlay`] layers one source over another, and
//! [`EdgeConfig::resolve`] validates the result into [`EdgeSettings`] with every default applied.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_runtime::config::duration_arg;
pub use relay_runtime::config::{ConfigError, parse_duration};
use relay_runtime::config::{load_toml, parse_toml, tunnel_liveness, ws_message_limit, ws_write_limits};
use relay_transport::{TcpListen, TunnelSettings};
use serde::{Deserialize, Serialize};

use crate::admission::AdmissionSettings;
pub use crate::admission::config::{AcsConfig, EventGridConfig, SharedSecretConfig, SourceIpConfig};
use crate::routes::{Route, RouteConfig, default_routes};

/// Public listener default: ACS delivers to HTTPS/WSS, normally terminated by an ingress in
/// front of the edge, which forwards to this port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";

/// Admin (metrics) listener default: loopback, so metrics are never public by accident.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Tunnel (QUIC, UDP) listener default.
pub const DEFAULT_TUNNEL_LISTEN: &str = "0.0.0.0:4433";

/// Threads running the edge's work, 0 meaning one per CPU the process may use: the edge is the
/// public side, usually alone on its machine or container, and every call and agent adds work
/// that spreads across threads. A small edge sharing its CPUs can set 1: on the benchmark's
/// shared 2-core machine one thread spent less CPU per call (fewer cross-thread wake-ups).
pub const DEFAULT_WORKER_THREADS: usize = 0;

/// Largest request body relayed. ACS events are a few KiB; 4 MiB is generous for webhooks while
/// bounding what one request can push through the tunnel. Larger bodies get `413` at the edge.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// Largest request head (request line and headers) read. ACS sends about 2 KiB, a JWT
/// included; 32 KiB (nginx's default for all header buffers) leaves room for anything
/// legitimate. Larger heads get 431, measured by the edge before admission.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;

/// What the edge adds to a head on its way to the agent (`X-Forwarded-*`, the client address,
/// the call key, the frame's own encoding) is far below this; `max_header_bytes` may be at most
/// the tunnel's head frame limit less it, so every head the edge admits fits the tunnel.
const HEAD_FRAME_HEADROOM: usize = 4 * 1024;

/// The largest `max_header_bytes` accepted: every admitted head must fit one head frame.
pub const MAX_HEADER_BYTES_LIMIT: usize = relay_proto::codec::DEFAULT_MAX_HEAD_LEN - HEAD_FRAME_HEADROOM;

/// Exchanges one agent may carry at once before the edge answers 503 instead of queueing: room
/// for a thousand concurrent calls plus their webhooks, under the QUIC stream limit (4096).
pub const DEFAULT_MAX_EXCHANGES_PER_AGENT: usize = 2048;

/// How long a draining edge lets in-flight exchanges run after SIGTERM; platforms give 30 s
/// before SIGKILL by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A media WebSocket on which nothing passes either way for this long is closed on both ends
/// with 1001. ACS sends an audio frame every 20 ms for the whole call, so a silent socket is a
/// call whose caller vanished without a close (a half-open TCP connection); a minute leaves room
/// for a bot or platform that pauses media, and still frees the call's resources.
pub const DEFAULT_WS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the edge waits for the agent's answer head. The agent gives the bot 30 s and then
/// answers 504 itself, so this only fires when the agent itself is stuck; it sits just above.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(40);

/// How long an exchange may wait for a stream slot on the agent's connection before it is
/// answered `503`. Slots free up in milliseconds unless the agent is overloaded.
pub const DEFAULT_OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// `Retry-After` on `503` when no agent can take a request. Event Grid and ACS retry on their
/// own schedule; 5 s tells well-behaved clients that an agent usually returns within seconds.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// How long a client has to send a complete request head. ACS sends its head in one packet; 10 s
/// tolerates a slow mobile link while stopping slow-loris clients from holding connections.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Client connections the public listener holds open at once. Each costs a file descriptor and a
/// few KiB; 10,000 carries a thousand calls (one media socket each, plus webhook connections)
/// many times over. The edge also keeps this below its open-file limit, less a reserve for the
/// tunnel and its own files, so a flood of connections can never leave it unable to work.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Client connections one address may hold open at once. ACS delivers from a pool of addresses,
/// each carrying a share of the calls; 2,048 (the exchanges one agent may carry) is above any
/// one address's share of an edge's calls, and stops one host from taking the whole listener.
/// Peers in `trusted_proxies` carry many clients and are not held to it.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 2_048;

/// How long an agent has, after its handshake, to send its hello on the control stream.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Edge settings as they appear in a file, the environment (`RELAY_EDGE_*`) or on `run`'s command
/// line; every field optional. Each setting is declared here once: its doc comment is its help.
#[derive(Debug, Clone, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// State directory made by `relay-edge init`.
    #[arg(long, env = "RELAY_EDGE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Public HTTP listener address.
    #[arg(long, env = "RELAY_EDGE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Tunnel (QUIC/UDP) listener address.
    #[arg(long, env = "RELAY_EDGE_TUNNEL_LISTEN")]
    pub tunnel_listen: Option<SocketAddr>,
    /// Tunnel TLS/TCP listener address, or "off" (default: the QUIC listener's port, on TCP).
    #[arg(long, env = "RELAY_EDGE_TUNNEL_TCP_LISTEN")]
    pub tunnel_tcp_listen: Option<String>,
    /// Admin listener serving /metrics (default 127.0.0.1:9090).
    #[arg(long, env = "RELAY_EDGE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Threads running the edge's work; 0 (the default): one per CPU the container may use.
    #[arg(long, env = "RELAY_EDGE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Largest request body relayed, in bytes (larger: 413).
    #[arg(long, env = "RELAY_EDGE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Largest WebSocket message relayed, in bytes (larger: close 1009).
    #[arg(long, env = "RELAY_EDGE_MAX_WS_MESSAGE_BYTES")]
    pub max_ws_message_bytes: Option<usize>,
    /// Bytes a WebSocket may hold queued for writing (default: one largest message + 64 KiB).
    #[arg(long, env = "RELAY_EDGE_MAX_WS_WRITE_BUFFER_BYTES")]
    pub max_ws_write_buffer_bytes: Option<usize>,
    /// How long a WebSocket message may wait for its socket to take it before both ends get
    /// 1008 (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_WS_WRITE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub ws_write_timeout: Option<Duration>,
    /// A gap between two media frames longer than this counts as a glitch (e.g. `60ms`).
    #[arg(long, env = "RELAY_EDGE_MEDIA_GLITCH_GAP", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub media_glitch_gap: Option<Duration>,
    /// Largest request head, in bytes (larger: 431).
    #[arg(long, env = "RELAY_EDGE_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Exchanges one agent may carry at once (more: 503).
    #[arg(long, env = "RELAY_EDGE_MAX_EXCHANGES_PER_AGENT")]
    pub max_exchanges_per_agent: Option<usize>,
    /// Requests a second from one client address (more: 429); 0 disables.
    #[arg(long, env = "RELAY_EDGE_RATE_LIMIT_PER_SOURCE")]
    pub rate_limit_per_source: Option<u32>,
    /// How long to wait for the agent's answer (e.g. `40s`).
    #[arg(long, env = "RELAY_EDGE_RESPONSE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub response_timeout: Option<Duration>,
    /// How long an exchange may wait for a stream to the agent before 503 (e.g. `5s`).
    #[arg(long, env = "RELAY_EDGE_OPEN_STREAM_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub open_stream_timeout: Option<Duration>,
    /// `Retry-After` on the edge's own 503s (e.g. `5s`).
    #[arg(long, env = "RELAY_EDGE_RETRY_AFTER", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub retry_after: Option<Duration>,
    /// How long an agent has, after its handshake, to say hello (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_HELLO_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub hello_timeout: Option<Duration>,
    /// How long a media WebSocket may carry no message before both ends get 1001 (e.g. `60s`).
    #[arg(long, env = "RELAY_EDGE_WS_IDLE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub ws_idle_timeout: Option<Duration>,
    /// How long in-flight exchanges may run after SIGTERM (e.g. `30s`).
    #[arg(long, env = "RELAY_EDGE_DRAIN_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub drain_timeout: Option<Duration>,
    /// How long a call stays pinned to its agent after its last exchange (e.g. `10m`).
    #[arg(long, env = "RELAY_EDGE_AFFINITY_TTL", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub affinity_ttl: Option<Duration>,
    /// Largest body prefix read to find a call's key, in bytes.
    #[arg(long, env = "RELAY_EDGE_AFFINITY_PREFIX_BYTES")]
    pub affinity_prefix_bytes: Option<usize>,
    /// Validity of agent certificates issued at pairing (e.g. `24h`).
    #[arg(long, env = "RELAY_EDGE_AGENT_CERT_VALIDITY", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub agent_cert_validity: Option<Duration>,
    /// Tunnel idle timeout (e.g. `5s`).
    #[arg(long, env = "RELAY_EDGE_IDLE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub idle_timeout: Option<Duration>,
    /// Tunnel keep-alive interval (e.g. `1s`).
    #[arg(long, env = "RELAY_EDGE_KEEP_ALIVE", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub keep_alive: Option<Duration>,
    /// How long a tunnel handshake may take (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_HANDSHAKE_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub handshake_timeout: Option<Duration>,
    /// How long a client has to send a request head (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_HEADER_READ_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub header_read_timeout: Option<Duration>,
    /// How long a request body may go without a byte before 408 (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_BODY_READ_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub body_read_timeout: Option<Duration>,
    /// How long a closing connection is read and discarded so the client reads the answer (e.g.
    /// `5s`).
    #[arg(long, env = "RELAY_EDGE_LINGER_TIMEOUT", value_parser = duration_arg)]
    #[serde(default, with = "relay_runtime::config::duration")]
    pub linger_timeout: Option<Duration>,
    /// Client connections held open at once; more are refused.
    #[arg(long, env = "RELAY_EDGE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Client connections one address may hold open at once; more are refused.
    #[arg(long, env = "RELAY_EDGE_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// Proxies whose X-Forwarded-For/-Proto are believed (CIDRs, comma-separated).
    #[arg(long, env = "RELAY_EDGE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Start even when no route authenticates its callers and the listener is not loopback:
    /// the edge then relays anything from anyone (protected mode off).
    #[arg(long, env = "RELAY_EDGE_ALLOW_UNAUTHENTICATED", num_args = 0..=1, default_missing_value = "true")]
    pub allow_unauthenticated: Option<bool>,
    /// Relayed routes; the three ACS endpoints when absent.
    #[arg(skip)]
    #[serde(skip_serializing)]
    #[serde(rename = "route")]
    pub routes: Option<Vec<RouteConfig>>,
    /// Settings of the `shared-secret` check.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub shared_secret: Option<SharedSecretConfig>,
    /// Settings of the `source-ip` check.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub source_ip: Option<SourceIpConfig>,
    /// Settings of the `event-grid` check.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub event_grid: Option<EventGridConfig>,
    /// Settings of the `acs-jwt` check.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub acs: Option<AcsConfig>,
}

/// Fully resolved edge settings.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// See [`EdgeConfig::state_dir`].
    pub state_dir: PathBuf,
    /// See [`EdgeConfig::listen`].
    pub listen: SocketAddr,
    /// See [`EdgeConfig::tunnel_listen`].
    pub tunnel_listen: SocketAddr,
    /// See [`EdgeConfig::tunnel_tcp_listen`].
    pub tunnel_tcp_listen: TcpListen,
    /// See [`EdgeConfig::admin_listen`]; `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// See [`DEFAULT_WORKER_THREADS`]; 0 is one per CPU.
    pub worker_threads: usize,
    /// See [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: u64,
    /// See [`relay_tunnel::DEFAULT_MAX_WS_MESSAGE`].
    pub max_ws_message_bytes: usize,
    /// See [`relay_tunnel::websocket::default_write_buffer`].
    pub max_ws_write_buffer_bytes: usize,
    /// See [`relay_tunnel::websocket::DEFAULT_WS_WRITE_TIMEOUT`].
    pub ws_write_timeout: Duration,
    /// See [`relay_tunnel::quality::DEFAULT_GLITCH_GAP`].
    pub media_glitch_gap: Duration,
    /// See [`DEFAULT_MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// See [`DEFAULT_MAX_EXCHANGES_PER_AGENT`].
    pub max_exchanges_per_agent: usize,
    /// See [`relay_guard::rate_limit::DEFAULT_RATE_PER_SOURCE`]; `None` disables the limit.
    pub rate_limit_per_source: Option<u32>,
    /// See [`DEFAULT_RESPONSE_TIMEOUT`].
    pub response_timeout: Duration,
    /// See [`DEFAULT_WS_IDLE_TIMEOUT`].
    pub ws_idle_timeout: Duration,
    /// See [`DEFAULT_DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
    /// See [`crate::affinity::DEFAULT_AFFINITY_TTL`].
    pub affinity_ttl: Duration,
    /// See [`crate::affinity::DEFAULT_AFFINITY_PREFIX_BYTES`].
    pub affinity_prefix_bytes: usize,
    /// See [`DEFAULT_OPEN_STREAM_TIMEOUT`].
    pub open_stream_timeout: Duration,
    /// See [`DEFAULT_RETRY_AFTER`].
    pub retry_after: Duration,
    /// See [`DEFAULT_HELLO_TIMEOUT`].
    pub hello_timeout: Duration,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`relay_guard::request_body::DEFAULT_BODY_READ_TIMEOUT`].
    pub body_read_timeout: Duration,
    /// See [`relay_guard::linger::DEFAULT_LINGER_TIMEOUT`].
    pub linger_timeout: Duration,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_MAX_CONNECTIONS_PER_SOURCE`].
    pub max_connections_per_source: usize,
    /// See [`relay_pki::DEFAULT_AGENT_CERT_VALIDITY`].
    pub agent_cert_validity: Duration,
    /// QUIC transport settings.
    pub tunnel: TunnelSettings,
    /// Relayed routes.
    pub routes: Vec<Route>,
    /// Settings of the admission checks routes name.
    pub admission: AdmissionSettings,
    /// The operator's choice to run an edge that authenticates nobody on a non-loopback listener
    /// (protected mode is off). `false` by default: such an edge refuses to start.
    pub allow_unauthenticated: bool,
}

impl EdgeSettings {
    /// Settings with every default, for `state_dir`, listening on the given addresses, with the
    /// admin listener on a loopback port from the OS (the binary's default is
    /// [`DEFAULT_ADMIN_LISTEN`]).
    pub fn new(state_dir: PathBuf, listen: SocketAddr, tunnel_listen: SocketAddr) -> Self {
        let mut settings = EdgeConfig::default().with_defaults(state_dir, listen, tunnel_listen);
        settings.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        settings
    }
}

impl EdgeConfig {
    /// Reads and parses a TOML file, rejecting unknown keys with their name and line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// Parses TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse_toml(text, path)
    }

    /// The file at `file` (if any) with `upper` (flags and environment) over it.
    pub fn layered(file: Option<&Path>, upper: &EdgeConfig) -> Result<Self, ConfigError> {
        relay_runtime::config::load_layered(file, upper)
    }

    /// Validates and applies defaults.
    pub fn resolve(self) -> Result<EdgeSettings, ConfigError> {
        let state_dir = self.state_dir.clone().ok_or(ConfigError::Missing("state_dir"))?;
        let listen = self.listen.map_or_else(|| default_addr("listen", DEFAULT_LISTEN), Ok)?;
        let tunnel_listen =
            self.tunnel_listen.map_or_else(|| default_addr("tunnel_listen", DEFAULT_TUNNEL_LISTEN), Ok)?;
        let mut settings = self.with_defaults(state_dir, listen, tunnel_listen);
        settings.tunnel_tcp_listen = match self.tunnel_tcp_listen.as_deref().map(str::trim) {
            None | Some("") => TcpListen::SamePort,
            Some("off") => TcpListen::Off,
            Some(text) => TcpListen::At(text.parse().map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                key: "tunnel_tcp_listen",
                message: format!("{e} (expected ip:port or \"off\")"),
            })?),
        };
        settings.admin_listen =
            Some(self.admin_listen.map_or_else(|| default_addr("admin_listen", DEFAULT_ADMIN_LISTEN), Ok)?);
        check_limits(&settings)?;
        (settings.max_ws_write_buffer_bytes, settings.ws_write_timeout) =
            ws_write_limits(settings.max_ws_message_bytes, self.max_ws_write_buffer_bytes, self.ws_write_timeout)?;
        tunnel_liveness(&mut settings.tunnel, self.idle_timeout, self.keep_alive, self.handshake_timeout)?;
        if let Some(routes) = &self.routes {
            settings.routes = routes
                .iter()
                .map(|r| r.build().map_err(|message| ConfigError::Invalid { key: "route", message }))
                .collect::<Result<_, _>>()?;
        }
        settings.admission = AdmissionSettings::from_config(
            self.trusted_proxies.as_deref().unwrap_or_default(),
            self.shared_secret.as_ref(),
            self.source_ip.as_ref(),
            self.event_grid.as_ref(),
            self.acs.as_ref(),
        )?;
        check_sections(&settings.routes, &settings.admission)?;
        Ok(settings)
    }

    /// The settings this configuration gives, each default filled in where it gives none; the
    /// values are checked by [`EdgeConfig::resolve`].
    fn with_defaults(&self, state_dir: PathBuf, listen: SocketAddr, tunnel_listen: SocketAddr) -> EdgeSettings {
        let max_ws_message_bytes = self.max_ws_message_bytes.unwrap_or(relay_tunnel::DEFAULT_MAX_WS_MESSAGE);
        EdgeSettings {
            state_dir,
            listen,
            tunnel_listen,
            tunnel_tcp_listen: TcpListen::SamePort,
            admin_listen: self.admin_listen,
            worker_threads: self.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS),
            max_body_bytes: self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            max_ws_message_bytes,
            max_ws_write_buffer_bytes: relay_tunnel::websocket::default_write_buffer(max_ws_message_bytes),
            ws_write_timeout: relay_tunnel::websocket::DEFAULT_WS_WRITE_TIMEOUT,
            media_glitch_gap: self.media_glitch_gap.unwrap_or(relay_tunnel::quality::DEFAULT_GLITCH_GAP),
            max_header_bytes: self.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES),
            max_exchanges_per_agent: self.max_exchanges_per_agent.unwrap_or(DEFAULT_MAX_EXCHANGES_PER_AGENT),
            // 0 disables the limit.
            rate_limit_per_source: match self.rate_limit_per_source {
                Some(0) => None,
                rate => Some(rate.unwrap_or(relay_guard::rate_limit::DEFAULT_RATE_PER_SOURCE)),
            },
            response_timeout: self.response_timeout.unwrap_or(DEFAULT_RESPONSE_TIMEOUT),
            ws_idle_timeout: self.ws_idle_timeout.unwrap_or(DEFAULT_WS_IDLE_TIMEOUT),
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            affinity_ttl: self.affinity_ttl.unwrap_or(crate::affinity::DEFAULT_AFFINITY_TTL),
            affinity_prefix_bytes: self.affinity_prefix_bytes.unwrap_or(crate::affinity::DEFAULT_AFFINITY_PREFIX_BYTES),
            open_stream_timeout: self.open_stream_timeout.unwrap_or(DEFAULT_OPEN_STREAM_TIMEOUT),
            retry_after: self.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            hello_timeout: self.hello_timeout.unwrap_or(DEFAULT_HELLO_TIMEOUT),
            header_read_timeout: self.header_read_timeout.unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
            body_read_timeout: self.body_read_timeout.unwrap_or(relay_guard::request_body::DEFAULT_BODY_READ_TIMEOUT),
            linger_timeout: self.linger_timeout.unwrap_or(relay_guard::linger::DEFAULT_LINGER_TIMEOUT),
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_connections_per_source: self.max_connections_per_source.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_SOURCE),
            agent_cert_validity: self.agent_cert_validity.unwrap_or(relay_pki::DEFAULT_AGENT_CERT_VALIDITY),
            tunnel: TunnelSettings::default(),
            routes: default_routes(),
            admission: AdmissionSettings::default(),
            allow_unauthenticated: self.allow_unauthenticated.unwrap_or(false),
        }
    }
}

/// Checks the sizes and counts against their bounds.
fn check_limits(settings: &EdgeSettings) -> Result<(), ConfigError> {
    ws_message_limit(settings.max_ws_message_bytes)?;
    // hyper needs room for at least one read buffer; the tunnel's head frame bounds the top.
    within("max_header_bytes", settings.max_header_bytes, 8192, MAX_HEADER_BYTES_LIMIT)?;
    let streams = settings.tunnel.max_exchange_streams as usize;
    within("max_exchanges_per_agent", settings.max_exchanges_per_agent, 1, streams)?;
    within("max_connections", settings.max_connections, 1, usize::MAX)?;
    within("max_connections_per_source", settings.max_connections_per_source, 1, usize::MAX)
}

/// `value` must lie in `low..=high`.
fn within(key: &'static str, value: usize, low: usize, high: usize) -> Result<(), ConfigError> {
    if (low..=high).contains(&value) {
        return Ok(());
    }
    let message = if high == usize::MAX {
        format!("must be at least {low}")
    } else {
        format!("must be between {low} and {high}")
    };
    Err(ConfigError::Invalid { key, message })
}

/// A default listener address (a constant, so a failure here is a programming error that the
/// tests catch; it is still reported, never a panic).
fn default_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|e: std::net::AddrParseError| ConfigError::Invalid { key, message: e.to_string() })
}

/// Every check a route names must have its section in the file.
fn check_sections(routes: &[Route], admission: &AdmissionSettings) -> Result<(), ConfigError> {
    let mut missing = routes.iter().flat_map(|r| r.auth.iter().map(move |check| (r, *check)));
    match missing.find(|(_, check)| !admission.configures(*check)) {
        Some((route, check)) => Err(ConfigError::Invalid {
            key: "route",
            message: format!(
                "route {:?} uses check {:?} but the [{}] section is missing",
                route.name,
                check.name(),
                check.section()
            ),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_is_rejected_with_its_name_and_line() {
        let err =
            EdgeConfig::parse("listen = \"127.0.0.1:1\"\nlisten_adress = \"x\"\n", Path::new("edge.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listen_adress") && text.contains("line 2"), "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn later_sources_win_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(&file, "state_dir = \"/a\"\nmax_body_bytes = 10\nlisten = \"127.0.0.1:1\"").unwrap();
        let flags = EdgeConfig { max_body_bytes: Some(20), ..Default::default() };
        let settings = EdgeConfig::layered(Some(&file), &flags).unwrap().resolve().unwrap();
        assert_eq!(settings.max_body_bytes, 20);
        assert_eq!(settings.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(settings.tunnel_listen, DEFAULT_TUNNEL_LISTEN.parse().unwrap());
        assert_eq!(settings.state_dir, PathBuf::from("/a"));
        assert_eq!(settings.routes.len(), 3);
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        let err = resolve_text("keep_alive = \"45s\"").unwrap_err().to_string();
        assert!(err.contains("keep_alive") && !err.contains('\n'), "{err}");
        let err = resolve_text("response_timeout = \"soon\"").unwrap_err().to_string();
        assert!(err.contains("response_timeout") && err.contains("line 2") && !err.contains('\n'), "{err}");
        assert!(matches!(EdgeConfig::default().resolve(), Err(ConfigError::Missing("state_dir"))));
    }

    fn resolve_text(text: &str) -> Result<EdgeSettings, ConfigError> {
        EdgeConfig::parse(&format!("state_dir = \"/s\"\n{text}"), Path::new("edge.toml"))?.resolve()
    }

    #[test]
    fn a_check_without_its_section_is_a_startup_error_naming_the_section() {
        let err = resolve_text("[[route]]\npath = \"/a\"\nauth = [\"shared-secret\"]\n").unwrap_err().to_string();
        assert!(err.contains("[shared_secret]") && err.contains("/a"), "{err}");
        let err = resolve_text("[[route]]\npath = \"/a\"\nauth = [\"magic\"]\n").unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }

    #[test]
    fn shared_secrets_come_from_a_file_or_the_environment_never_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        relay_pki::write_atomic(&file, b"from-file\n", 0o644).unwrap();
        let text = format!(
            "[[route]]\npath = \"/a\"\nauth = [\"shared-secret\"]\n[shared_secret]\nheader = \"x-s\"\nvalue_file = {:?}\n",
            file.display().to_string()
        );
        let err = resolve_text(&text).unwrap_err().to_string();
        assert!(err.contains("0600"), "a secret file others can read is refused like a key: {err}");
        relay_pki::write_atomic(&file, b"from-file\n", 0o600).unwrap();
        let settings = resolve_text(&text).unwrap();
        let mut req = http::Request::new(());
        req.headers_mut().insert("x-s", "from-file".parse().unwrap());
        assert!(settings.admission.shared_secret.unwrap().verify(&req).is_ok(), "trailing newline ignored");
        let err = resolve_text("[shared_secret]\nheader = \"x\"\nquery = \"y\"\nvalue_env = \"V\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one of header or query"), "{err}");
        let err = resolve_text("[shared_secret]\nheader = \"x\"\nvalue = \"inline\"\n").unwrap_err().to_string();
        assert!(err.contains("value"), "{err}");
        let err = resolve_text("[shared_secret]\nheader = \"x\"\nvalue_env = \"ACS_RELAY_TEST_UNSET_VARIABLE\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ACS_RELAY_TEST_UNSET_VARIABLE"), "{err}");
    }

    #[test]
    fn source_ip_lists_join_cidrs_and_service_tags_and_refuse_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let tags = dir.path().join("ServiceTags_Public.json");
        std::fs::write(
            &tags,
            r#"{"values":[{"name":"AzureCommunicationServices","properties":{"addressPrefixes":["52.112.0.0/14"]}}]}"#,
        )
        .unwrap();
        let text = format!(
            "trusted_proxies = [\"10.0.0.0/8\"]\n[source_ip]\ncidrs = [\"2603:1063::/38\"]\nservice_tags_file = {:?}\nservice_tags = [\"AzureCommunicationServices\"]\n",
            tags.display().to_string()
        );
        let settings = resolve_text(&text).unwrap();
        let set = settings.admission.source_ip.unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.contains("52.113.0.1".parse().unwrap()));
        assert_eq!(settings.admission.trusted_proxies.len(), 1);
        assert!(resolve_text("[source_ip]\ncidrs = []\n").unwrap_err().to_string().contains("empty"));
        assert!(resolve_text("[source_ip]\ncidrs = [\"52.112.0.0/99\"]\n").unwrap_err().to_string().contains("CIDR"));
        assert!(resolve_text("trusted_proxies = [\"nope\"]\n").unwrap_err().to_string().contains("trusted_proxies"));
    }

    #[test]
    fn the_acs_section_needs_an_audience_and_one_key_source() {
        let ok =
            resolve_text("[[route]]\npath = \"/cb/*\"\nauth = [\"acs-jwt\"]\n[acs]\naudience = \"abc\"\n").unwrap();
        let acs = ok.admission.acs.unwrap();
        assert_eq!(acs.issuer, "https://acscallautomation.communication.azure.com");
        assert!(
            matches!(acs.keys, crate::admission::acs_jwt::JwksSource::Url(ref u) if u.to_string().ends_with("/calling/keys"))
        );
        assert!(resolve_text("[acs]\nissuer = \"x\"\n").unwrap_err().to_string().contains("acs.audience"));
        let both = "[acs]\naudience = \"a\"\njwks_url = \"https://k\"\njwks_file = \"k.json\"\n";
        assert!(resolve_text(both).unwrap_err().to_string().contains("not both"));
        let err = resolve_text("[[route]]\npath = \"/a\"\nauth = [\"acs-jwt\"]\n").unwrap_err().to_string();
        assert!(err.contains("[acs]"), "{err}");
    }

    #[test]
    fn entra_settings_go_together_and_default_to_the_tenants_discovery_url() {
        let ok = resolve_text("[event_grid]\nentra_tenant_id = \"t1\"\nentra_audience = \"api://bot\"\n").unwrap();
        let entra = ok.admission.event_grid.unwrap().entra.unwrap();
        assert_eq!(
            entra.openid_config_url.to_string(),
            "https://login.microsoftonline.com/t1/v2.0/.well-known/openid-configuration"
        );
        let err = resolve_text("[event_grid]\nentra_tenant_id = \"t1\"\n").unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
    }
}
