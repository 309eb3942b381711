//! The `relay-edge` command line: parses arguments and configuration, then runs one subcommand.
//! The binary's `main` calls [`main_from`]; the end-to-end tests build the same entry point into
//! their own process so that fault tests run exactly what ships.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use crate::Edge;
use crate::config::{EdgeConfig, EdgeSettings, parse_duration};
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
    /// List the calls open now on a running edge (from its admin listener): each call's id,
    /// agent, transport, age, frames and rate each way, glitches so far and last frame's age.
    Calls {
        /// The edge's admin listener (an unspecified address means this host).
        #[arg(long, env = "RELAY_EDGE_ADMIN_LISTEN", default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
        admin_listen: std::net::SocketAddr,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
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

/// Settings for `run`: the file, then `RELAY_EDGE_*`, then flags, each over the one before.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "RELAY_EDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: EdgeConfig,
}

fn parse_edge_addr(text: &str) -> anyhow::Result<()> {
    let (host, port) = text.rsplit_once(':').with_context(|| format!("--edge-addr {text:?} must be HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("--edge-addr {text:?} must be HOST:PORT with a numeric port");
    }
    Ok(())
}

type Prepared = relay_runtime::Prepared<EdgeSettings, Command>;

/// Reads `run`'s configuration before the runtime starts, so that it can size the runtime.
fn prepare(command: Command) -> anyhow::Result<(relay_runtime::Workers, Prepared)> {
    match command {
        Command::Run(args) => {
            relay_runtime::init_logging();
            let settings = EdgeConfig::layered(args.config.as_deref(), &args.settings)?.resolve()?;
            let threads = settings.worker_threads;
            Ok(Prepared::serve(settings, threads))
        }
        command => Ok(Prepared::once(command)),
    }
}

/// `run`: the edge until SIGTERM, then its drain.
async fn serve(settings: EdgeSettings) -> anyhow::Result<()> {
    let grace = settings.drain_timeout;
    Ok(relay_runtime::serve_until_signalled(Edge::start(settings), grace, Edge::drain).await?)
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
            relay_runtime::admin::probe(relay_runtime::admin::local(admin_listen), path).await?;
        }
        Command::Calls { admin_listen, json } => {
            let addr = relay_runtime::admin::local(admin_listen);
            let body = relay_runtime::admin::fetch(addr, crate::calls::CALLS_PATH).await?;
            let calls: Vec<crate::calls::CallView> = serde_json::from_slice(&body)
                .with_context(|| format!("{addr} answered something other than a call list"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&calls)?);
            } else {
                print!("{}", crate::calls::render(&calls));
            }
        }
        Command::Agents { state_dir, json } => {
            print!("{}", crate::listing::list(&state_dir, json, SystemTime::now())?);
        }
        Command::Run(_) => bail!("run is prepared before the runtime starts"),
    }
    Ok(())
}

/// Runs the command line on `args` (the first names the program) and returns the exit status.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    relay_runtime::main_from("relay-edge", args, |cli: Cli| prepare(cli.command), |p| p.run(serve, run))
}
