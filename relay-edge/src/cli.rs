//! The `relay-edge` command line: parses arguments and configuration, then runs one subcommand.
//! The binary's `main` is [`main`]; the end-to-end tests build the same entry point into their own
//! process so that fault tests run exactly what ships.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use crate::Edge;
use crate::config::{EdgeConfig, parse_duration};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use relay_pki::{DEFAULT_BUNDLE_VALIDITY, DEFAULT_TOKEN_TTL, EdgeState};

/// The public half of acs-relay: accepts ACS webhooks and media WebSockets and relays them to
/// agents over a mutually authenticated tunnel (QUIC, or TLS over TCP where UDP cannot pass).
#[derive(Debug, Parser)]
#[command(name = "relay-edge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the pairing CA and the edge's tunnel certificate in a new state directory.
    Init {
        /// State directory to create.
        #[arg(long, env = "RELAY_EDGE_STATE_DIR")]
        state_dir: PathBuf,
        /// DNS name or IP address agents use to reach the tunnel (repeatable); `localhost` and
        /// `127.0.0.1` are always included.
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
        /// Succeed without changing anything when the directory is initialised already (for a
        /// container's first start on an empty volume).
        #[arg(long)]
        if_missing: bool,
    },
    /// Issue a one-time pairing token for an agent; prints only the token.
    Pair {
        /// The edge's state directory.
        #[arg(long, env = "RELAY_EDGE_STATE_DIR")]
        state_dir: PathBuf,
        /// Name of the agent to pair.
        #[arg(long, required_unless_present = "cancel")]
        agent: Option<String>,
        /// Tunnel address agents dial (`HOST:PORT`), written into the token.
        #[arg(long, value_name = "HOST:PORT", required_unless_present = "cancel")]
        edge_addr: Option<String>,
        /// How long the token stays valid (e.g. `15m`, `1h`).
        #[arg(long)]
        ttl: Option<String>,
        /// Pair a name that is paired already; its current certificate stops working once the
        /// new one is issued.
        #[arg(long)]
        replace: bool,
        /// Issue the agent's key and certificate here and write them, with the CA and the edge
        /// address, to FILE (mode 0600) instead of printing a token.
        #[arg(long, value_name = "FILE", conflicts_with = "ttl")]
        bundle: Option<PathBuf>,
        /// Validity of a bundle's certificate (default 30d).
        #[arg(long, requires = "bundle")]
        validity: Option<String>,
        /// Cancel every pending token for this agent instead of issuing one.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["agent", "edge_addr", "ttl", "replace", "bundle"])]
        cancel: Option<String>,
    },
    /// Revoke an agent: its certificates are refused and its live connections closed.
    Revoke {
        /// The edge's state directory.
        #[arg(long, env = "RELAY_EDGE_STATE_DIR")]
        state_dir: PathBuf,
        /// The agent to revoke.
        #[arg(long)]
        agent: String,
    },
    /// List agents: state, certificate, and (with a running edge) live connections.
    Agents {
        /// The edge's state directory.
        #[arg(long, env = "RELAY_EDGE_STATE_DIR")]
        state_dir: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Run the edge.
    Run(Box<RunArgs>),
    /// Check a running edge through its admin listener: exit 0 if `/healthz` (or, with
    /// `--ready`, `/readyz`) answers 200. For container health checks; the images have no shell.
    Health {
        /// The edge's admin listener (an unspecified address means this host).
        #[arg(long, env = "RELAY_EDGE_ADMIN_LISTEN", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: std::net::SocketAddr,
        /// Check readiness (an agent connected, not draining) instead of liveness.
        #[arg(long)]
        ready: bool,
    },
}

/// Settings for `run`; each overrides the config file and `RELAY_EDGE_*` overrides the file too.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "RELAY_EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// State directory made by `relay-edge init`.
    #[arg(long, env = "RELAY_EDGE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Public HTTP listener address.
    #[arg(long, env = "RELAY_EDGE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Tunnel (QUIC/UDP) listener address.
    #[arg(long, env = "RELAY_EDGE_TUNNEL_LISTEN")]
    tunnel_listen: Option<std::net::SocketAddr>,
    /// Tunnel TLS/TCP listener address, or "off" (default: the QUIC listener's port, on TCP).
    #[arg(long, env = "RELAY_EDGE_TUNNEL_TCP_LISTEN")]
    tunnel_tcp_listen: Option<String>,
    /// Admin listener serving /metrics (default 127.0.0.1:9090).
    #[arg(long, env = "RELAY_EDGE_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Largest request body relayed, in bytes (larger: 413).
    #[arg(long, env = "RELAY_EDGE_MAX_BODY_BYTES")]
    max_body_bytes: Option<u64>,
    /// Largest WebSocket message relayed, in bytes (larger: close 1009).
    #[arg(long, env = "RELAY_EDGE_MAX_WS_MESSAGE_BYTES")]
    max_ws_message_bytes: Option<usize>,
    /// Bytes a WebSocket may hold queued for writing (default: one largest message + 64 KiB).
    #[arg(long, env = "RELAY_EDGE_MAX_WS_WRITE_BUFFER_BYTES")]
    max_ws_write_buffer_bytes: Option<usize>,
    /// How long a WebSocket message may wait for its socket to take it before both ends get
    /// 1008 (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_WS_WRITE_TIMEOUT")]
    ws_write_timeout: Option<String>,
    /// Largest request head, in bytes (larger: 431).
    #[arg(long, env = "RELAY_EDGE_MAX_HEADER_BYTES")]
    max_header_bytes: Option<usize>,
    /// Exchanges one agent may carry at once (more: 503).
    #[arg(long, env = "RELAY_EDGE_MAX_EXCHANGES_PER_AGENT")]
    max_exchanges_per_agent: Option<usize>,
    /// Requests a second from one client address (more: 429); 0 disables.
    #[arg(long, env = "RELAY_EDGE_RATE_LIMIT_PER_SOURCE")]
    rate_limit_per_source: Option<u32>,
    /// How long to wait for the agent's answer (e.g. `40s`).
    #[arg(long, env = "RELAY_EDGE_RESPONSE_TIMEOUT")]
    response_timeout: Option<String>,
    /// How long a media WebSocket may carry no message before both ends get 1001 (e.g. `60s`).
    #[arg(long, env = "RELAY_EDGE_WS_IDLE_TIMEOUT")]
    ws_idle_timeout: Option<String>,
    /// How long in-flight exchanges may run after SIGTERM (e.g. `30s`).
    #[arg(long, env = "RELAY_EDGE_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// How long a call stays pinned to its agent after its last exchange (e.g. `10m`).
    #[arg(long, env = "RELAY_EDGE_AFFINITY_TTL")]
    affinity_ttl: Option<String>,
    /// Largest body prefix read to find a call's key, in bytes.
    #[arg(long, env = "RELAY_EDGE_AFFINITY_PREFIX_BYTES")]
    affinity_prefix_bytes: Option<usize>,
    /// Validity of agent certificates issued at pairing (e.g. `24h`).
    #[arg(long, env = "RELAY_EDGE_AGENT_CERT_VALIDITY")]
    agent_cert_validity: Option<String>,
    /// Tunnel idle timeout (e.g. `5s`).
    #[arg(long, env = "RELAY_EDGE_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// Tunnel keep-alive interval (e.g. `1s`).
    #[arg(long, env = "RELAY_EDGE_KEEP_ALIVE")]
    keep_alive: Option<String>,
    /// How long a tunnel handshake may take (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Option<String>,
    /// How long a client has to send a request head (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_HEADER_READ_TIMEOUT")]
    header_read_timeout: Option<String>,
    /// How long a request body may go without a byte before 408 (e.g. `10s`).
    #[arg(long, env = "RELAY_EDGE_BODY_READ_TIMEOUT")]
    body_read_timeout: Option<String>,
    /// How long a closing connection is read and discarded so the client reads the answer (e.g.
    /// `5s`).
    #[arg(long, env = "RELAY_EDGE_LINGER_TIMEOUT")]
    linger_timeout: Option<String>,
    /// Client connections held open at once; more are refused.
    #[arg(long, env = "RELAY_EDGE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Client connections one address may hold open at once; more are refused.
    #[arg(long, env = "RELAY_EDGE_MAX_CONNECTIONS_PER_SOURCE")]
    max_connections_per_source: Option<usize>,
    /// Proxies whose X-Forwarded-For/-Proto are believed (CIDRs, comma-separated).
    #[arg(long, env = "RELAY_EDGE_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Option<Vec<String>>,
    /// Start even when no route authenticates its callers and the listener is not loopback:
    /// the edge then relays anything from anyone (protected mode off).
    #[arg(long, env = "RELAY_EDGE_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
}

impl RunArgs {
    fn into_config(self) -> (Option<PathBuf>, EdgeConfig) {
        let config = EdgeConfig {
            state_dir: self.state_dir,
            listen: self.listen,
            tunnel_listen: self.tunnel_listen,
            tunnel_tcp_listen: self.tunnel_tcp_listen,
            admin_listen: self.admin_listen,
            max_body_bytes: self.max_body_bytes,
            max_ws_message_bytes: self.max_ws_message_bytes,
            max_ws_write_buffer_bytes: self.max_ws_write_buffer_bytes,
            ws_write_timeout: self.ws_write_timeout,
            max_header_bytes: self.max_header_bytes,
            max_exchanges_per_agent: self.max_exchanges_per_agent,
            rate_limit_per_source: self.rate_limit_per_source,
            response_timeout: self.response_timeout,
            ws_idle_timeout: self.ws_idle_timeout,
            drain_timeout: self.drain_timeout,
            affinity_ttl: self.affinity_ttl,
            affinity_prefix_bytes: self.affinity_prefix_bytes,
            agent_cert_validity: self.agent_cert_validity,
            idle_timeout: self.idle_timeout,
            keep_alive: self.keep_alive,
            handshake_timeout: self.handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            linger_timeout: self.linger_timeout,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            trusted_proxies: self.trusted_proxies,
            allow_unauthenticated: self.allow_unauthenticated.then_some(true),
            ..EdgeConfig::default()
        };
        (self.config, config)
    }
}

fn parse_edge_addr(text: &str) -> anyhow::Result<()> {
    let (host, port) = text.rsplit_once(':').with_context(|| format!("--edge-addr {text:?} must be HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("--edge-addr {text:?} must be HOST:PORT with a numeric port");
    }
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { state_dir, if_missing: true, .. } if EdgeState::open(&state_dir).is_ok() => {
            eprintln!("{} is initialised already; nothing changed", state_dir.display());
        }
        Command::Init { state_dir, names, .. } => {
            let state = EdgeState::init(&state_dir, &names, SystemTime::now())?;
            let pin = state.ca().pin()?;
            eprintln!("initialised {}; CA pin sha256:{}", state_dir.display(), pin.to_hex());
        }
        Command::Pair { state_dir, cancel: Some(agent), .. } => {
            let cancelled = EdgeState::open(&state_dir)?.cancel_tokens(&agent)?;
            eprintln!("cancelled {cancelled} pending token(s) for {agent:?}");
        }
        Command::Pair { state_dir, agent, edge_addr, bundle: Some(file), validity, replace, .. } => {
            let (Some(agent), Some(edge_addr)) = (agent, edge_addr) else {
                bail!("--agent and --edge-addr are required")
            };
            parse_edge_addr(&edge_addr)?;
            let validity = match validity {
                Some(text) => parse_duration("--validity", &text)?,
                None => DEFAULT_BUNDLE_VALIDITY,
            };
            let bundle =
                EdgeState::open(&state_dir)?.issue_bundle(&agent, &edge_addr, validity, SystemTime::now(), replace)?;
            relay_pki::write_atomic(&file, bundle.as_bytes(), 0o600)
                .with_context(|| format!("cannot write {}", file.display()))?;
            eprintln!(
                "wrote the bundle for {agent:?} to {} (mode 0600): it holds a private key, keep it secret",
                file.display()
            );
        }
        Command::Pair { state_dir, agent, edge_addr, ttl, replace, cancel: None, bundle: None, .. } => {
            let (Some(agent), Some(edge_addr)) = (agent, edge_addr) else {
                bail!("--agent and --edge-addr are required")
            };
            parse_edge_addr(&edge_addr)?;
            let ttl = match ttl {
                Some(text) => parse_duration("--ttl", &text)?,
                None => DEFAULT_TOKEN_TTL,
            };
            let state = EdgeState::open(&state_dir)?;
            let token = state.create_token(&agent, &edge_addr, ttl, SystemTime::now(), replace)?;
            println!("{}", token.encode());
        }
        Command::Revoke { state_dir, agent } => {
            EdgeState::open(&state_dir)?.revoke(&agent, SystemTime::now())?;
            eprintln!("revoked {agent:?}; a running edge closes its connections within seconds");
        }
        Command::Health { admin_listen, ready } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            relay_cli::admin::probe(relay_cli::admin::local(admin_listen), path).await?;
        }
        Command::Agents { state_dir, json } => {
            print!("{}", crate::listing::list(&state_dir, json, SystemTime::now())?);
        }
        Command::Run(args) => {
            relay_cli::init_logging();
            let (file, flags) = args.into_config();
            let base = match &file {
                Some(path) => EdgeConfig::load(path)?,
                None => EdgeConfig::default(),
            };
            let settings = base.overlay(flags).resolve()?;
            let grace = settings.drain_timeout;
            let open_files = relay_cli::raise_open_file_limit();
            let signalled = relay_cli::shutdown_signal();
            let edge = Edge::start(settings).await?;
            open_files.log();
            signalled.await;
            tracing::info!(grace_s = grace.as_secs(), "draining: not ready, finishing in-flight exchanges");
            edge.drain(grace).await;
        }
    }
    Ok(())
}

/// Runs the command line and returns the exit status.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs the command line on `args` (the first names the program) and returns the exit status.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    relay_cli::main_from("relay-edge", args, |cli: Cli| run(cli.command))
}
