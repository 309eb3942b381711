//! The `relay-agent` command line: parses arguments and configuration, then runs one subcommand.
//! The binary's `main` is [`main`]; the end-to-end tests build the same entry point into their own
//! process so that fault tests run exactly what ships.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::TransportChoice;
use crate::{Agent, AgentConfig, PairTransport};
use clap::{Args, Parser, Subcommand};
use relay_transport::TunnelSettings;

/// The private half of acs-relay: dials out to the edge and forwards each exchange to the bot
/// on localhost, so the bot's network accepts no inbound connection.
#[derive(Debug, Parser)]
#[command(name = "relay-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pair with an edge using a one-time token from `relay-edge pair`.
    Pair {
        /// Where to keep the agent's key and certificate.
        #[arg(long, env = "RELAY_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        /// The token printed by `relay-edge pair`.
        #[arg(long, env = "RELAY_AGENT_TOKEN", hide_env_values = true)]
        token: String,
        /// Transport: `auto` (QUIC, else TLS/TCP when UDP does not pass), `quic` or `tcp`.
        #[arg(long, env = "RELAY_AGENT_TRANSPORT", default_value = "auto")]
        transport: String,
        /// With `auto`: how long QUIC may go unanswered before TCP is used (e.g. `3s`).
        #[arg(long, env = "RELAY_AGENT_QUIC_FALLBACK_AFTER", default_value = "3s")]
        quic_fallback_after: String,
    },
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Check a running agent through its admin listener: exit 0 if `/healthz` (or, with
    /// `--ready`, `/readyz`) answers 200. For container health checks; the images have no shell.
    Health {
        /// The agent's admin listener (an unspecified address means this host).
        #[arg(long, env = "RELAY_AGENT_ADMIN_LISTEN", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: std::net::SocketAddr,
        /// Check readiness (connected to an edge, not draining) instead of liveness.
        #[arg(long)]
        ready: bool,
    },
}

/// Settings for `run`; each overrides the config file, and `RELAY_AGENT_*` overrides the file too.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "RELAY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// State directory written by `relay-agent pair`.
    #[arg(long, env = "RELAY_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Run from a bundle written by `relay-edge pair --bundle` instead of a state directory.
    /// `RELAY_AGENT_BUNDLE` may hold the bundle's text instead.
    #[arg(long, value_name = "FILE")]
    bundle: Option<PathBuf>,
    /// The bot's base URL, e.g. `http://127.0.0.1:8080`.
    #[arg(long, env = "RELAY_AGENT_UPSTREAM")]
    upstream: Option<String>,
    /// Edge tunnel address (`HOST:PORT`), overriding the one recorded at pairing. Repeat it (or
    /// separate with commas) for several edge replicas; a name that resolves to several addresses
    /// gets one connection per address.
    #[arg(long = "edge", env = "RELAY_AGENT_EDGE", value_delimiter = ',')]
    edges: Vec<String>,
    /// How often edge names are resolved again to find new replicas (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_EDGE_RESOLVE_INTERVAL")]
    edge_resolve_interval: Option<String>,
    /// While an edge does not answer, how often a fresh connection attempt starts (e.g. `1s`).
    #[arg(long, env = "RELAY_AGENT_REDIAL_INTERVAL")]
    redial_interval: Option<String>,
    /// Edge replicas looked for behind one address at most (e.g. behind a load balancer).
    #[arg(long, env = "RELAY_AGENT_MAX_EDGE_REPLICAS")]
    max_edge_replicas: Option<usize>,
    /// Admin listener serving /metrics (default 127.0.0.1:9091).
    #[arg(long, env = "RELAY_AGENT_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// How long the bot has to answer (e.g. `30s`).
    #[arg(long, env = "RELAY_AGENT_BOT_TIMEOUT")]
    bot_timeout: Option<String>,
    /// Largest WebSocket message relayed, in bytes.
    #[arg(long, env = "RELAY_AGENT_MAX_WS_MESSAGE_BYTES")]
    max_ws_message_bytes: Option<usize>,
    /// Bytes a WebSocket may hold queued for writing (default: one largest message + 64 KiB).
    #[arg(long, env = "RELAY_AGENT_MAX_WS_WRITE_BUFFER_BYTES")]
    max_ws_write_buffer_bytes: Option<usize>,
    /// How long a WebSocket message may wait for its socket to take it before both ends get
    /// 1008 (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_WS_WRITE_TIMEOUT")]
    ws_write_timeout: Option<String>,
    /// How long open calls may run after SIGTERM before they are closed (e.g. `30s`).
    #[arg(long, env = "RELAY_AGENT_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// Tunnel idle timeout (e.g. `5s`).
    #[arg(long, env = "RELAY_AGENT_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// Tunnel keep-alive interval (e.g. `1s`).
    #[arg(long, env = "RELAY_AGENT_KEEP_ALIVE")]
    keep_alive: Option<String>,
    /// How long a tunnel handshake may take (e.g. `10s`).
    #[arg(long, env = "RELAY_AGENT_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Option<String>,
    /// Tunnel transport: `auto` (QUIC, else TLS/TCP when UDP does not pass), `quic` or `tcp`.
    #[arg(long, env = "RELAY_AGENT_TRANSPORT")]
    transport: Option<String>,
    /// With `auto`: how long QUIC may go unanswered before TCP is used (e.g. `3s`).
    #[arg(long, env = "RELAY_AGENT_QUIC_FALLBACK_AFTER")]
    quic_fallback_after: Option<String>,
    /// With `auto`: how often QUIC is tried again while on TCP (e.g. `5m`).
    #[arg(long, env = "RELAY_AGENT_QUIC_PROBE_INTERVAL")]
    quic_probe_interval: Option<String>,
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pair { state_dir, token, transport, quic_fallback_after } => {
            let transport = PairTransport {
                choice: TransportChoice::parse(&transport)?,
                quic_fallback_after: relay_cli::config::parse_duration("quic_fallback_after", &quic_fallback_after)?,
            };
            let paired = crate::pair(&state_dir, &token, &TunnelSettings::default(), transport).await?;
            eprintln!(
                "paired as {:?} with the edge at {}; identity stored in {}",
                paired.agent_name,
                paired.edge_addr,
                state_dir.display()
            );
        }
        Command::Health { admin_listen, ready } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            relay_cli::admin::probe(relay_cli::admin::local(admin_listen), path).await?;
        }
        Command::Run(args) => {
            relay_cli::init_logging();
            // A bundle path given as a flag wins over bundle text in the environment.
            let bundle_pem = if args.bundle.is_none() { std::env::var("RELAY_AGENT_BUNDLE").ok() } else { None };
            let flags = AgentConfig {
                state_dir: args.state_dir,
                bundle: args.bundle,
                bundle_pem,
                upstream: args.upstream,
                edge: None,
                edges: (!args.edges.is_empty()).then_some(args.edges),
                edge_resolve_interval: args.edge_resolve_interval,
                redial_interval: args.redial_interval,
                max_edge_replicas: args.max_edge_replicas,
                admin_listen: args.admin_listen,
                bot_timeout: args.bot_timeout,
                max_ws_message_bytes: args.max_ws_message_bytes,
                max_ws_write_buffer_bytes: args.max_ws_write_buffer_bytes,
                ws_write_timeout: args.ws_write_timeout,
                drain_timeout: args.drain_timeout,
                idle_timeout: args.idle_timeout,
                keep_alive: args.keep_alive,
                handshake_timeout: args.handshake_timeout,
                transport: args.transport,
                quic_fallback_after: args.quic_fallback_after,
                quic_probe_interval: args.quic_probe_interval,
            };
            let base = match &args.config {
                Some(path) => AgentConfig::load(path)?,
                None => AgentConfig::default(),
            };
            let settings = base.overlay(flags).resolve()?;
            let grace = settings.drain_timeout;
            // Every call is a tunnel stream and a socket to the bot: room for as many as allowed.
            let open_files = relay_cli::raise_open_file_limit();
            let signalled = relay_cli::shutdown_signal();
            let agent = Agent::start(settings).await?;
            open_files.log();
            signalled.await;
            tracing::info!(grace_s = grace.as_secs(), "draining: finishing in-flight exchanges");
            agent.drain(grace).await;
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
    relay_cli::main_from("relay-agent", args, |cli: Cli| run(cli.command))
}
