//! The `relay-bench` command: parses arguments and runs one subcommand. `relay-bench edge ...`
//! and `relay-bench agent ...` run the edge's and the agent's own command lines, so `compare`
//! can start them as processes from this one binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use relay_bench::compare::{self, CompareSettings};
use relay_bench::media::{self, MediaLoad};
use relay_bench::{procstat, webhooks};
use relay_transport::Transport;

/// Call-load benchmark for acs-relay: ACS-shaped media calls and webhooks, direct vs relayed.
#[derive(Debug, Parser)]
#[command(name = "relay-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the echo bot (webhooks answered with their body, media messages echoed).
    Bot {
        /// Address to listen on; port 0 picks one, printed as `listening on ADDR`.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Run the load against any target (a bot, an edge, another tunnel) and report.
    Load(LoadArgs),
    /// Run the same load direct to a bot and through a fresh edge + agent, and compare.
    Compare(CompareArgs),
    /// Attack a fresh edge + agent as a hostile caller would, and report what it cost the edge.
    Hostile(HostileArgs),
    /// Drive one simulated ACS call at a target (an edge or a bot): IncomingCall, CallConnected,
    /// a media session at 50 frames a second, CallDisconnected. Exits 1 unless every webhook got
    /// 200 and every frame came back (against an echo bot).
    Call {
        /// `HOST:PORT` serving `/api/incomingCall`, `/api/callbacks/*` and `/ws`.
        #[arg(long)]
        target: String,
        /// The call's correlation id.
        #[arg(long, default_value = "5b2f8c1e-7d43-4a9e-b0c6-2e81f9d4a735")]
        call: String,
        /// AudioData frames the caller sends (50 a second).
        #[arg(long, default_value_t = 150)]
        frames: u64,
    },
    /// Play a call recorded by `relay-agent record` against a bot, with its timing, and report
    /// where the bot's answers differ from the recorded ones. Exits 1 when they differ.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The recording (JSON lines from `relay-agent record`).
    file: PathBuf,
    /// The bot's base URL, e.g. `http://127.0.0.1:8080`.
    #[arg(long)]
    target: String,
    /// A header to add to every request, `Name: value` (redacted credentials are not sent);
    /// repeatable.
    #[arg(long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// How long the bot has to answer each webhook and upgrade (e.g. `30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    answer_timeout: Option<Duration>,
    /// How long after a session's last recorded event the bot may still send or close (e.g. `5s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    linger: Option<Duration>,
}

#[derive(Debug, Args)]
struct HostileArgs {
    /// Callers flooding pings at once, never reading.
    #[arg(long, default_value_t = 4)]
    ping_callers: usize,
    /// MiB of pings each of them writes.
    #[arg(long, default_value_t = 50)]
    ping_mib: usize,
    /// Webhooks sent with an oversized call id.
    #[arg(long, default_value_t = 2000)]
    long_ids: usize,
    /// Bytes in each of those call ids.
    #[arg(long, default_value_t = 60_000)]
    id_len: usize,
    /// Requests whose body never arrives, held open at once.
    #[arg(long, default_value_t = 500)]
    stalled_bodies: usize,
    /// The edge's body read timeout for the run (e.g. `3s`).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    body_read_timeout: Duration,
    /// Also write the figures as JSON to this file (`-` for standard output).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct Common {
    /// Concurrent media calls.
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// How long each call streams (e.g. `30s`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Callback POSTs each call sends while it streams.
    #[arg(long, default_value_t = 3)]
    callbacks_per_call: usize,
    /// Webhook requests in flight at once in the webhook phase.
    #[arg(long, default_value_t = 64)]
    webhook_concurrency: usize,
    /// How long the webhook phase runs (`0s` skips it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    webhook_duration: Duration,
    /// Also write the figures as JSON to this file (`-` for standard output).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// `HOST:PORT` serving `/ws` and `/api/callbacks/*` (a name is resolved once, at start).
    #[arg(long)]
    target: String,
    /// Processes to measure, as `NAME=PID` (repeatable).
    #[arg(long = "pid", value_parser = parse_pid)]
    pids: Vec<(String, u32)>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Extra argument for `relay-edge run` (repeatable).
    #[arg(long = "edge-arg", allow_hyphen_values = true)]
    edge_args: Vec<String>,
    /// Extra argument for `relay-agent run` (repeatable).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Use a bot already listening here (e.g. a Python one) instead of the built-in echo bot.
    #[arg(long)]
    bot: Option<SocketAddr>,
    /// The tunnel transport to measure: `quic` or `tcp`.
    #[arg(long, default_value = "quic", value_parser = parse_transport)]
    transport: Transport,
    /// Size of the large request body and of the large response body, each sent once after the
    /// webhooks with each process's memory growth measured (0 skips them; so does `--bot`, whose
    /// bot may not generate or discard bodies).
    #[arg(long, default_value_t = 50 * 1024 * 1024)]
    body_bytes: u64,
    #[command(flatten)]
    common: Common,
}

fn parse_transport(text: &str) -> Result<Transport, String> {
    match text {
        "quic" => Ok(Transport::Quic),
        "tcp" => Ok(Transport::Tcp),
        other => Err(format!("{other:?}: expected quic or tcp")),
    }
}

fn parse_pid(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text.split_once('=').ok_or("expected NAME=PID")?;
    Ok((name.to_owned(), pid.parse().map_err(|_| format!("{pid:?} is not a process id"))?))
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    if path.as_os_str() == "-" {
        print!("{text}");
        Ok(())
    } else {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Bot { listen } => {
            let bot = relay_testkit::bot::EchoBot::start_quiet_on(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("listening on {}", bot.addr());
            tokio::signal::ctrl_c().await?;
        }
        Command::Load(args) => {
            let c = &args.common;
            let target: SocketAddr = tokio::net::lookup_host(&args.target)
                .await
                .with_context(|| format!("cannot resolve --target {}", args.target))?
                .next()
                .with_context(|| format!("--target {} resolves to no address", args.target))?;
            let sample = || -> BTreeMap<String, procstat::ProcSample> {
                args.pids.iter().filter_map(|(n, p)| Some((n.clone(), procstat::sample(*p)?))).collect()
            };
            let before = sample();
            let load =
                MediaLoad { target, calls: c.calls, duration: c.duration, callbacks_per_call: c.callbacks_per_call };
            let media = media::run(load, || {}).await;
            let after = sample();
            let hooks_started = std::time::Instant::now();
            let hooks = if c.webhook_duration.is_zero() {
                webhooks::WebhookReport::default()
            } else {
                webhooks::run(webhooks::WebhookLoad {
                    target,
                    concurrency: c.webhook_concurrency,
                    duration: c.webhook_duration,
                })
                .await
            };
            let cpu: BTreeMap<String, f64> = after
                .iter()
                .filter_map(|(n, a)| {
                    let b = before.get(n)?;
                    Some((n.clone(), (a.cpu_seconds - b.cpu_seconds) / media.wall_seconds.max(f64::EPSILON)))
                })
                .collect();
            println!(
                "{} calls: {} frames sent, {} lost, {} reordered; RTT p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms; \
                 callbacks {} ok {} failed",
                media.calls_connected,
                media.frames_sent,
                media.frames_lost,
                media.frames_reordered,
                media.rtt_ms.p50,
                media.rtt_ms.p90,
                media.rtt_ms.p99,
                media.rtt_ms.max,
                media.callbacks_ok,
                media.callbacks_failed
            );
            for (name, cores) in &cpu {
                println!(
                    "{name}: {:.1}% of a core during the calls, {:.1} us per frame relayed",
                    cores * 100.0,
                    relay_bench::cost::per_frame_us(*cores, &media)
                );
            }
            if hooks.ok + hooks.failed > 0 {
                println!(
                    "webhooks: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} failed",
                    hooks.requests_per_second, hooks.latency_ms.p50, hooks.latency_ms.p99, hooks.failed
                );
                let wall = hooks_started.elapsed().as_secs_f64().max(f64::EPSILON);
                for (name, end) in sample() {
                    if let Some(start) = after.get(&name) {
                        let cores = (end.cpu_seconds - start.cpu_seconds) / wall;
                        let us = relay_bench::cost::per_webhook_us(cores, &hooks);
                        println!("{name}: {:.1}% of a core during the webhooks, {us:.1} us per webhook", cores * 100.0);
                    }
                }
            }
            if let Some(path) = &c.json {
                let report = serde_json::json!({ "media": media, "webhooks": hooks, "media_cpu_cores": cpu });
                write_json(path, &report)?;
            }
            // The figures are out; a run that lost anything still fails, so scripts can rely on it.
            let failures = media.frames_lost + media.frames_corrupt + media.callbacks_failed + hooks.failed;
            if (media.calls_connected as usize) < c.calls || failures > 0 {
                bail!(
                    "{} of {} calls connected; {} frames lost, {} corrupt; {} callbacks and {} webhooks failed",
                    media.calls_connected,
                    c.calls,
                    media.frames_lost,
                    media.frames_corrupt,
                    media.callbacks_failed,
                    hooks.failed
                );
            }
        }
        Command::Call { target, call, frames } => {
            let addr: SocketAddr = tokio::net::lookup_host(&target)
                .await
                .with_context(|| format!("cannot resolve --target {target}"))?
                .next()
                .with_context(|| format!("--target {target} resolves to no address"))?;
            let done = relay_testkit::acs::simulated_call(addr, &call, frames).await?;
            let statuses: Vec<String> = done.webhooks.iter().map(|(_, s)| s.to_string()).collect();
            println!(
                "call {call}: webhooks answered {}; media {} frames sent, {} echoed intact, closed 1000",
                statuses.join(" "),
                done.media.sent,
                done.media.received
            );
            if done.webhooks.iter().any(|(_, s)| *s != 200) || !done.media.intact() {
                bail!("the call did not go through intact");
            }
        }
        Command::Replay(args) => {
            let recording = relay_record::Recording::from_path(&args.file)
                .with_context(|| format!("cannot play {}", args.file.display()))?;
            let mut options = relay_record::PlayOptions::new(&args.target)?;
            for header in &args.headers {
                options.header(header)?;
            }
            options.answer_timeout = args.answer_timeout.unwrap_or(options.answer_timeout);
            options.linger = args.linger.unwrap_or(options.linger);
            let report = relay_record::play(&recording, &options).await;
            print!("{}", report.render());
            if !report.matches() {
                bail!("the bot answered differently from the recording");
            }
        }
        Command::Hostile(args) => {
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            let settings = relay_bench::hostile::HostileSettings {
                ping_callers: args.ping_callers,
                ping_bytes: args.ping_mib << 20,
                long_ids: args.long_ids,
                id_len: args.id_len,
                stalled_bodies: args.stalled_bodies,
                body_read_timeout: args.body_read_timeout,
            };
            let report = relay_bench::hostile::run(&exe, settings).await?;
            print!("{}", relay_bench::hostile::render(&report));
            if let Some(path) = &args.json {
                write_json(path, &report)?;
            }
        }
        Command::Compare(args) => {
            let c = args.common;
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            let settings = CompareSettings {
                calls: c.calls,
                duration: c.duration,
                callbacks_per_call: c.callbacks_per_call,
                webhook_concurrency: c.webhook_concurrency,
                webhook_duration: c.webhook_duration,
                edge_args: args.edge_args,
                agent_args: args.agent_args,
                bot: args.bot,
                transport: args.transport,
                body_bytes: if args.bot.is_some() { 0 } else { args.body_bytes },
            };
            let comparison = compare::run(&exe, settings).await?;
            print!("{}", compare::render(&comparison));
            if let Some(path) = &c.json {
                write_json(path, &comparison)?;
            }
        }
    }
    Ok(())
}

/// The same allocator as the shipped edge and agent, which this binary embeds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next() {
        // The embedded command lines: `relay-bench edge run ...` is `relay-edge run ...`.
        Some(sub) if sub == "edge" => relay_edge::cli::main_from(std::iter::once("relay-edge".into()).chain(args)),
        Some(sub) if sub == "agent" => relay_agent::cli::main_from(std::iter::once("relay-agent".into()).chain(args)),
        _ => relay_runtime::main("relay-bench", |cli: Cli| Ok((relay_runtime::Workers::PerCpu, cli.command)), run),
    }
}
