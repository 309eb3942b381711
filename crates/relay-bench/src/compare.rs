//! `relay-bench compare`: the same load straight to the bot and through a freshly paired edge +
//! agent on loopback, in one run, with the CPU and memory of each process read from `/proc`.
//! The bot, edge and agent are separate processes (this binary, re-run as `bot`, `edge` and
//! `agent`), so each one's cost is its own and the versions always match.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use relay_agent::TransportChoice;
use relay_testkit::bodies::{self, BodyReport};
use relay_testkit::procs::{Proc, log_field};
use relay_transport::Transport;
use serde::Serialize;

use crate::cost::{self, Cost};
use crate::media::{self, MediaLoad, MediaReport, Percentiles};
use crate::procstat::{self, ProcSample};
use crate::webhooks::{self, HttpClient, WebhookLoad, WebhookReport};

/// The edge's body limit when no body phase asks for more: the edge's own default.
const DEFAULT_BODY_LIMIT: u64 = 4 * 1024 * 1024;

/// How long a child process has to come up.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareSettings {
    /// Concurrent media calls.
    pub calls: usize,
    /// How long the calls stream.
    pub duration: Duration,
    /// Callback POSTs per call during the media phase.
    pub callbacks_per_call: usize,
    /// Concurrent webhook requests in the webhook phase.
    pub webhook_concurrency: usize,
    /// How long the webhook phase runs (zero skips it).
    pub webhook_duration: Duration,
    /// Extra arguments for `relay-edge run`.
    pub edge_args: Vec<String>,
    /// Extra arguments for `relay-agent run`.
    pub agent_args: Vec<String>,
    /// A bot already running there (another implementation, e.g. Python) instead of this tool's
    /// own echo bot; its CPU and memory are then not measured.
    pub bot: Option<SocketAddr>,
    /// The tunnel transport the agent uses.
    pub transport: Transport,
    /// Bytes of the large request body and of the large response body (zero skips them).
    pub body_bytes: u64,
}

/// One target's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    /// The media phase.
    pub media: MediaReport,
    /// The webhook phase.
    pub webhooks: WebhookReport,
    /// CPU cores used during the media phase, per process.
    pub media_cpu_cores: BTreeMap<String, f64>,
    /// Resident memory added per open, idle call, in KiB, per process.
    pub idle_kib_per_call: BTreeMap<String, f64>,
    /// CPU cores used during the webhook phase, per process.
    pub webhook_cpu_cores: BTreeMap<String, f64>,
    /// What a frame, a webhook and an open call cost each process.
    pub costs: BTreeMap<String, Cost>,
    /// Peak resident memory at the end, in KiB, per process.
    pub peak_rss_kib: BTreeMap<String, u64>,
    /// The large-body phase, if it ran.
    pub bodies: Option<BodyReport>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The tunnel transport measured (`quic` or `tcp`).
    pub transport: &'static str,
    /// Concurrent calls.
    pub calls: usize,
    /// Seconds each call streamed.
    pub duration_seconds: f64,
    /// Webhook concurrency.
    pub webhook_concurrency: usize,
    /// Straight to the bot.
    pub direct: Side,
    /// Through edge + agent.
    pub relay: Side,
    /// Round trip the relay adds, in milliseconds.
    pub added_rtt_ms: Percentiles,
    /// Relay webhook requests/s as a fraction of direct.
    pub webhook_ratio: f64,
    /// Edge + agent CPU cores during the media phase.
    pub relay_cpu_cores: f64,
    /// Edge + agent CPU per streaming call, in milliseconds of CPU per second of call.
    pub relay_cpu_ms_per_call_second: f64,
}

/// Starts this binary as `args` and waits for the line containing `wanted` (an error line
/// first is a failed start).
async fn spawn(exe: &Path, args: &[String], wanted: &str) -> anyhow::Result<(Proc, String)> {
    let name = args.first().cloned().unwrap_or_default();
    let os_args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    // The line waited for is logged at info; the level of everything else stays the operator's.
    let filter = std::env::var("RUST_LOG")
        .map_or_else(|_| "info".to_owned(), |level| format!("{level},relay_edge=info,relay_agent=info"));
    let proc = Proc::spawn_logging(&name, &[], exe, &os_args, &filter)
        .with_context(|| format!("cannot start {}", exe.display()))?;
    // A start-up error is logged and the process exits: stop waiting at the first error line,
    // or when it exits without one (a command-line error).
    let settled = |log: &str| log.contains(wanted) || log.contains("ERROR");
    relay_testkit::eventually(START_DEADLINE, || async { settled(&proc.log()) || proc.output_ended() }).await;
    let log = proc.log();
    match log.lines().find(|l| l.contains(wanted)) {
        Some(line) => Ok((proc, line.to_owned())),
        None => bail!("{} {} did not start: {log}", exe.display(), args.join(" ")),
    }
}

/// The address in `key=address` of a log line.
fn field(line: &str, key: &str) -> Option<SocketAddr> {
    log_field(line, key)?.parse().ok()
}

fn pid(proc: &Proc) -> anyhow::Result<u32> {
    proc.pid().context("child already exited")
}

/// Runs the media, webhook and body phases against `target`, sampling `procs` around them.
async fn measure(settings: &CompareSettings, target: SocketAddr, procs: &[(&str, u32)]) -> anyhow::Result<Side> {
    let sample_all = || -> BTreeMap<String, ProcSample> {
        procs.iter().filter_map(|(name, pid)| Some(((*name).to_owned(), procstat::sample(*pid)?))).collect()
    };
    let before = sample_all();
    let mut at_start = BTreeMap::new();
    let load = MediaLoad {
        target,
        calls: settings.calls,
        duration: settings.duration,
        callbacks_per_call: settings.callbacks_per_call,
    };
    let media = media::run(load, || at_start = sample_all()).await;
    let at_end = sample_all();
    let mut side = Side { media, ..Side::default() };
    let calls = side.media.calls_connected.max(1) as f64;
    for (name, end) in &at_end {
        if let (Some(start), Some(zero)) = (at_start.get(name), before.get(name)) {
            let cores = (end.cpu_seconds - start.cpu_seconds) / side.media.wall_seconds.max(f64::EPSILON);
            side.media_cpu_cores.insert(name.clone(), cores);
            side.idle_kib_per_call.insert(name.clone(), (start.rss_kib as f64 - zero.rss_kib as f64) / calls);
        }
    }
    if !settings.webhook_duration.is_zero() {
        let before = sample_all();
        let started = std::time::Instant::now();
        side.webhooks = webhooks::run(WebhookLoad {
            target,
            concurrency: settings.webhook_concurrency,
            duration: settings.webhook_duration,
        })
        .await;
        let wall = started.elapsed().as_secs_f64().max(f64::EPSILON);
        for (name, end) in sample_all() {
            if let Some(start) = before.get(&name) {
                side.webhook_cpu_cores.insert(name, (end.cpu_seconds - start.cpu_seconds) / wall);
            }
        }
    }
    side.costs = cost::costs(
        &side.media_cpu_cores,
        &side.webhook_cpu_cores,
        &side.idle_kib_per_call,
        &side.media,
        &side.webhooks,
    );
    for (name, sample) in sample_all() {
        side.peak_rss_kib.insert(name, sample.peak_rss_kib);
    }
    if settings.body_bytes > 0 {
        side.bodies = Some(bodies::run(target, settings.body_bytes, procs).await?);
    }
    Ok(side)
}

/// Runs the whole comparison; `exe` is this binary.
pub async fn run(exe: &Path, settings: CompareSettings) -> anyhow::Result<Comparison> {
    let mut bot = match settings.bot {
        Some(_) => None,
        None => Some(spawn(exe, &["bot".into(), "--listen".into(), "127.0.0.1:0".into()], "listening on").await?),
    };
    let (bot_addr, bot_procs): (SocketAddr, Vec<(&str, u32)>) = match (&bot, settings.bot) {
        (_, Some(addr)) => (addr, Vec::new()),
        (Some((own, line)), None) => {
            let addr = line
                .rsplit(' ')
                .next()
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("bot printed {line:?}"))?;
            (addr, vec![("bot", pid(own)?)])
        }
        (None, None) => bail!("no bot"),
    };
    eprintln!("direct: {} calls for {:?} against the bot at {bot_addr}", settings.calls, settings.duration);
    let direct = measure(&settings, bot_addr, &bot_procs).await?;

    let options = RelayOptions {
        bot: bot_addr,
        transport: settings.transport,
        edge_args: [
            // The body phase sends one body of this size; the default limit is for webhooks.
            vec!["--max-body-bytes".to_owned(), settings.body_bytes.max(DEFAULT_BODY_LIMIT).to_string()],
            settings.edge_args.clone(),
        ]
        .concat(),
        agent_args: settings.agent_args.clone(),
    };
    let relay_run = Relay::start(exe, options).await?;
    let public = relay_run.public;
    let (edge_pid, agent_pid) = (relay_run.edge_pid()?, relay_run.agent_pid()?);
    eprintln!("relay: the same load through the edge at {public} (agent pid {agent_pid}, edge pid {edge_pid})");
    let mut relay_procs = vec![("edge", edge_pid), ("agent", agent_pid)];
    relay_procs.extend(bot_procs.iter().copied());
    let relay = measure(&settings, public, &relay_procs).await?;

    relay_run.stop().await;
    if let Some((own, _)) = bot.as_mut() {
        own.kill().await;
    }
    let diff = |a: f64, b: f64| a - b;
    let relay_cpu_cores = relay.media_cpu_cores.get("edge").copied().unwrap_or(0.0)
        + relay.media_cpu_cores.get("agent").copied().unwrap_or(0.0);
    Ok(Comparison {
        transport: settings.transport.as_str(),
        calls: settings.calls,
        duration_seconds: settings.duration.as_secs_f64(),
        webhook_concurrency: settings.webhook_concurrency,
        added_rtt_ms: Percentiles {
            p50: diff(relay.media.rtt_ms.p50, direct.media.rtt_ms.p50),
            p90: diff(relay.media.rtt_ms.p90, direct.media.rtt_ms.p90),
            p99: diff(relay.media.rtt_ms.p99, direct.media.rtt_ms.p99),
            max: diff(relay.media.rtt_ms.max, direct.media.rtt_ms.max),
        },
        webhook_ratio: if direct.webhooks.requests_per_second > 0.0 {
            relay.webhooks.requests_per_second / direct.webhooks.requests_per_second
        } else {
            0.0
        },
        relay_cpu_cores,
        relay_cpu_ms_per_call_second: relay_cpu_cores * 1000.0 / relay.media.calls_connected.max(1) as f64,
        direct,
        relay,
    })
}

/// How to start a relay in front of a bot.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The bot the agent forwards to.
    pub bot: SocketAddr,
    /// The tunnel transport the agent uses.
    pub transport: Transport,
    /// Extra arguments for `relay-edge run`.
    pub edge_args: Vec<String>,
    /// Extra arguments for `relay-agent run`.
    pub agent_args: Vec<String>,
}

/// A running edge and paired agent (this binary, re-run as `edge` and `agent`), in front of a
/// bot, ready: a webhook through the edge has reached the bot. Both are killed when this drops.
pub struct Relay {
    /// The edge's public listener.
    pub public: SocketAddr,
    edge: Proc,
    agent: Proc,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Relay {
    /// Initialises an edge state, starts the edge on loopback ports from the OS, pairs an agent
    /// over the wire and starts it; `exe` is this binary.
    pub async fn start(exe: &Path, options: RelayOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("edge");
        let edge_state = relay_pki::EdgeState::init(&state, &[], SystemTime::now())?;
        let state_arg = state.display().to_string();
        let mut edge_args: Vec<String> = [
            "edge",
            "run",
            "--state-dir",
            &state_arg,
            "--listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            // One load generator on one address would trip the per-source limit meant for floods.
            "--rate-limit-per-source",
            "0",
        ]
        .map(str::to_owned)
        .to_vec();
        edge_args.extend(options.edge_args.iter().cloned());
        let (edge, listening) = spawn(exe, &edge_args, "edge listening").await?;
        let (public, tunnel) = match (field(&listening, "public_addr"), field(&listening, "tunnel_addr")) {
            (Some(p), Some(t)) => (p, t),
            _ => bail!("cannot read the edge's addresses from {listening:?}"),
        };
        let token = edge_state.create_token(
            "bench-agent",
            &tunnel.to_string(),
            relay_pki::DEFAULT_TOKEN_TTL,
            SystemTime::now(),
            false,
        )?;
        let agent_dir = dir.path().join("agent");
        let pairing =
            relay_agent::PairTransport { choice: TransportChoice::Only(options.transport), ..Default::default() };
        relay_agent::pair(&agent_dir, &token.encode(), &Default::default(), pairing).await?;
        let agent_state = agent_dir.display().to_string();
        let upstream = format!("http://{}", options.bot);
        let mut agent_args: Vec<String> = [
            "agent",
            "run",
            "--state-dir",
            &agent_state,
            "--upstream",
            &upstream,
            "--admin-listen",
            "127.0.0.1:0",
            "--transport",
            options.transport.as_str(),
        ]
        .map(str::to_owned)
        .to_vec();
        agent_args.extend(options.agent_args.iter().cloned());
        let (agent, _) = spawn(exe, &agent_args, "agent starting").await?;
        wait_ready(public).await?;
        Ok(Self { public, edge, agent, _dir: dir })
    }

    /// The edge's process id.
    pub fn edge_pid(&self) -> anyhow::Result<u32> {
        pid(&self.edge)
    }

    /// The agent's process id.
    pub fn agent_pid(&self) -> anyhow::Result<u32> {
        pid(&self.agent)
    }

    /// Kills both processes and waits for them.
    pub async fn stop(mut self) {
        self.agent.kill().await;
        self.edge.kill().await;
    }
}

/// Waits until a webhook through the edge reaches the bot (the agent is connected).
async fn wait_ready(public: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_DEADLINE;
    let mut client = HttpClient::new(public);
    while tokio::time::Instant::now() < deadline {
        if client
            .post("/api/callbacks/ready", relay_testkit::acs::callback_body(0, 0))
            .await
            .is_ok_and(|s| s.is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the agent did not connect to the edge within {START_DEADLINE:?}")
}

/// The comparison as a table.
pub fn render(c: &Comparison) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let (d, r) = (&c.direct, &c.relay);
    let _ = writeln!(
        out,
        "{} calls x {:.0} s at 50 frames/s each way, {} webhook workers, tunnel over {}",
        c.calls, c.duration_seconds, c.webhook_concurrency, c.transport
    );
    let _ = writeln!(out, "{:<34} {:>14} {:>14} {:>16}", "", "direct", "acs-relay", "relay cost");
    let row = |out: &mut String, name: &str, a: String, b: String, cost: String| {
        let _ = writeln!(out, "{name:<34} {a:>14} {b:>14} {cost:>16}");
    };
    row(
        &mut out,
        "calls connected",
        d.media.calls_connected.to_string(),
        r.media.calls_connected.to_string(),
        String::new(),
    );
    row(&mut out, "frames sent", d.media.frames_sent.to_string(), r.media.frames_sent.to_string(), String::new());
    row(&mut out, "frames lost", d.media.frames_lost.to_string(), r.media.frames_lost.to_string(), String::new());
    row(
        &mut out,
        "frames reordered / corrupt",
        format!("{} / {}", d.media.frames_reordered, d.media.frames_corrupt),
        format!("{} / {}", r.media.frames_reordered, r.media.frames_corrupt),
        String::new(),
    );
    for (name, a, b, added) in [
        ("RTT p50 (ms)", d.media.rtt_ms.p50, r.media.rtt_ms.p50, c.added_rtt_ms.p50),
        ("RTT p90 (ms)", d.media.rtt_ms.p90, r.media.rtt_ms.p90, c.added_rtt_ms.p90),
        ("RTT p99 (ms)", d.media.rtt_ms.p99, r.media.rtt_ms.p99, c.added_rtt_ms.p99),
        ("RTT max (ms)", d.media.rtt_ms.max, r.media.rtt_ms.max, c.added_rtt_ms.max),
    ] {
        row(&mut out, name, format!("{a:.2}"), format!("{b:.2}"), format!("{added:+.2}"));
    }
    row(
        &mut out,
        "callbacks during calls ok / failed",
        format!("{} / {}", d.media.callbacks_ok, d.media.callbacks_failed),
        format!("{} / {}", r.media.callbacks_ok, r.media.callbacks_failed),
        String::new(),
    );
    let cores = |s: &Side, p: &str| s.media_cpu_cores.get(p).copied().unwrap_or(0.0);
    row(
        &mut out,
        "media CPU, cores (edge + agent)",
        String::new(),
        format!("{:.3} + {:.3}", cores(r, "edge"), cores(r, "agent")),
        format!("{:.1}% of a core", c.relay_cpu_cores * 100.0),
    );
    row(
        &mut out,
        "relay CPU per call (edge + agent)",
        String::new(),
        format!("{:.2} ms/s", c.relay_cpu_ms_per_call_second),
        String::new(),
    );
    row(
        &mut out,
        "media CPU, cores (bot)",
        format!("{:.3}", cores(d, "bot")),
        format!("{:.3}", cores(r, "bot")),
        String::new(),
    );
    let idle = |s: &Side, p: &str| s.idle_kib_per_call.get(p).copied().unwrap_or(0.0);
    row(
        &mut out,
        "idle memory per call, KiB (e / a)",
        String::new(),
        format!("{:.1} / {:.1}", idle(r, "edge"), idle(r, "agent")),
        String::new(),
    );
    let peak = |s: &Side, p: &str| s.peak_rss_kib.get(p).copied().unwrap_or(0) / 1024;
    row(
        &mut out,
        "peak RSS, MiB (edge / agent / bot)",
        format!("- / - / {}", peak(d, "bot")),
        format!("{} / {} / {}", peak(r, "edge"), peak(r, "agent"), peak(r, "bot")),
        String::new(),
    );
    if d.webhooks.ok + r.webhooks.ok > 0 {
        row(
            &mut out,
            "webhooks/s (1 KB JSON POST)",
            format!("{:.0}", d.webhooks.requests_per_second),
            format!("{:.0}", r.webhooks.requests_per_second),
            format!("{:.2}x direct", c.webhook_ratio),
        );
        row(
            &mut out,
            "webhook latency p50 / p99 (ms)",
            format!("{:.2} / {:.2}", d.webhooks.latency_ms.p50, d.webhooks.latency_ms.p99),
            format!("{:.2} / {:.2}", r.webhooks.latency_ms.p50, r.webhooks.latency_ms.p99),
            String::new(),
        );
        row(&mut out, "webhooks failed", d.webhooks.failed.to_string(), r.webhooks.failed.to_string(), String::new());
    }
    render_costs(&mut out, r, d, c.calls);
    if let (Some(db), Some(rb)) = (&d.bodies, &r.bodies) {
        for (what, dt, rt) in [("request", &db.request, &rb.request), ("response", &db.response, &rb.response)] {
            let mb = rt.bytes as f64 / 1e6;
            row(
                &mut out,
                &format!("{mb:.0} MB {what} body, MB/s"),
                format!("{:.0}", dt.mb_per_second),
                format!("{:.0}", rt.mb_per_second),
                format!("{:.2}x direct", rt.mb_per_second / dt.mb_per_second.max(f64::EPSILON)),
            );
            let grew = |t: &bodies::Transfer, p: &str| {
                t.growth_kib.get(p).map_or_else(|| "-".to_owned(), |k| format!("{:.1}", *k as f64 / 1024.0))
            };
            row(
                &mut out,
                "  peak growth, MiB (edge / agent / bot)",
                format!("- / - / {}", grew(dt, "bot")),
                format!("{} / {} / {}", grew(rt, "edge"), grew(rt, "agent"), grew(rt, "bot")),
                String::new(),
            );
        }
    }
    out
}

/// The cost model block: each relay process's cost per frame, per webhook and per open call, and
/// what this run's call count and 1,000 calls come to at those rates.
fn render_costs(out: &mut String, relay: &Side, direct: &Side, calls: usize) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "cost model (CPU per relayed media frame and per webhook; memory per open call):");
    if let Some(bot) = direct.costs.get("bot") {
        let _ = writeln!(
            out,
            "  {:<6} {:>7.1} us/frame {:>8.1} us/webhook   (the bot itself, direct: the scale)",
            "bot", bot.cpu_us_per_frame, bot.cpu_us_per_webhook
        );
    }
    for name in ["edge", "agent"] {
        let Some(cost) = relay.costs.get(name) else { continue };
        let _ = writeln!(
            out,
            "  {name:<6} {:>7.1} us/frame {:>8.1} us/webhook {:>7.1} KiB/call   {} calls: {:.2} cores, 1,000 calls: {:.2} cores, {:.0} MiB",
            cost.cpu_us_per_frame,
            cost.cpu_us_per_webhook,
            cost.kib_per_call,
            calls,
            cost.cores_for_calls(calls as f64),
            cost.cores_for_calls(1000.0),
            cost.mib_for_calls(1000.0),
        );
    }
}
