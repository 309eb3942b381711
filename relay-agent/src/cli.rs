//! The `relay-agent` command line: parses arguments and configuration, then runs one subcommand.
//! The binary's `main` calls [`main_from`]; the end-to-end tests build the same entry point into
//! their own process so that fault tests run exactly what ships.

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
    /// List the last exchanges the agent relayed (needs `inspect = true`), or show one whole.
    Inspect {
        /// An exchange's id from the list: show it whole (head, body, the bot's answer).
        id: Option<u64>,
        /// The agent's admin listener.
        #[arg(long, env = "RELAY_AGENT_ADMIN_LISTEN", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: std::net::SocketAddr,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send an inspected exchange to the bot again (or to another URL) and print the answer.
    Replay {
        /// The exchange's id from `relay-agent inspect`.
        id: u64,
        /// Base URL to send it to (default: the bot the agent forwards to).
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        /// A header to add, `Name: value` (redacted credentials are not sent); repeatable.
        #[arg(long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// The agent's admin listener.
        #[arg(long, env = "RELAY_AGENT_ADMIN_LISTEN", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: std::net::SocketAddr,
    },
    /// Record one whole call (webhooks, media frames each way, with timing) to a JSON-lines
    /// file, for `relay-bench replay` (needs `inspect = true`).
    Record {
        /// The call's correlation id; without it, the next call that arrives.
        #[arg(long, value_name = "CORRELATION-ID")]
        call: Option<String>,
        /// The file to write (created; not overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The agent's admin listener.
        #[arg(long, env = "RELAY_AGENT_ADMIN_LISTEN", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: std::net::SocketAddr,
    },
}

/// Settings for `run`: the file, then `RELAY_AGENT_*`, then flags, each over the one before.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "RELAY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentConfig,
}

type Prepared = relay_runtime::Prepared<crate::config::AgentSettings, Command>;

/// Reads `run`'s configuration before the runtime starts, so that it can size the runtime.
fn prepare(command: Command) -> anyhow::Result<(relay_runtime::Workers, Prepared)> {
    match command {
        Command::Run(args) => {
            relay_runtime::init_logging();
            let mut config = AgentConfig::layered(args.config.as_deref(), &args.settings)?;
            // A bundle path given as a flag wins over bundle text in the environment.
            if args.settings.bundle.is_none() {
                config.bundle_pem = std::env::var("RELAY_AGENT_BUNDLE").ok();
            }
            let settings = config.resolve()?;
            let threads = settings.worker_threads;
            Ok(Prepared::serve(settings, threads))
        }
        command => Ok(Prepared::once(command)),
    }
}

/// `run`: the agent until SIGTERM, then its drain.
async fn serve(settings: crate::config::AgentSettings) -> anyhow::Result<()> {
    let grace = settings.drain_timeout;
    Ok(relay_runtime::serve_until_signalled(Agent::start(settings), grace, Agent::drain).await?)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pair { state_dir, token, transport, quic_fallback_after } => {
            let transport = PairTransport {
                choice: TransportChoice::parse(&transport).map_err(|e| anyhow::anyhow!("invalid --transport {e}"))?,
                quic_fallback_after: relay_runtime::config::parse_duration(
                    "quic_fallback_after",
                    &quic_fallback_after,
                )?,
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
            relay_runtime::admin::probe(relay_runtime::admin::local(admin_listen), path).await?;
        }
        Command::Inspect { id, admin_listen, json } => {
            print!("{}", crate::commands::inspect(admin_listen, id, json).await?);
        }
        Command::Replay { id, to, headers, admin_listen } => {
            print!("{}", crate::commands::replay(admin_listen, id, to.as_deref(), &headers).await?);
        }
        Command::Record { call, out, admin_listen } => {
            eprintln!("{}", crate::commands::record(admin_listen, call.as_deref(), &out).await?);
        }
        Command::Run(_) => anyhow::bail!("run is prepared before the runtime starts"),
    }
    Ok(())
}

/// Runs the command line on `args` (the first names the program) and returns the exit status.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    relay_runtime::main_from("relay-agent", args, |cli: Cli| prepare(cli.command), |p| p.run(serve, run))
}
