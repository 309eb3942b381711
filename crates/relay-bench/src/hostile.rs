//! `relay-bench hostile`: what the attacks the edge must survive cost the shipped binaries. It
//! starts a bot, an edge and a paired agent as processes (the real allocator, the real
//! settings), then runs each attack against the edge and reads the edge's memory and open files
//! from `/proc` before and after: media sockets flooded with pings by callers that never read,
//! webhooks whose call ids are 60 KB long, and requests whose bodies never come.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use relay_testkit::raw;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::compare::{Relay, RelayOptions};
use crate::procstat;

/// The attacks' sizes.
#[derive(Debug, Clone)]
pub struct HostileSettings {
    /// Callers flooding pings at once.
    pub ping_callers: usize,
    /// Ping bytes each of them writes (without reading).
    pub ping_bytes: usize,
    /// Webhooks with an oversized call id.
    pub long_ids: usize,
    /// Length of each of those ids.
    pub id_len: usize,
    /// Requests whose body never arrives, open at once.
    pub stalled_bodies: usize,
    /// The edge's `--body-read-timeout` for the run.
    pub body_read_timeout: Duration,
}

/// One attack's cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackReport {
    /// What was sent.
    pub sent: String,
    /// Edge resident memory before, in KiB.
    pub edge_rss_before_kib: u64,
    /// Edge resident memory after, in KiB.
    pub edge_rss_after_kib: u64,
    /// Edge open file descriptors at the attack's peak.
    pub edge_fds_peak: usize,
    /// Edge open file descriptors after.
    pub edge_fds_after: usize,
    /// What the edge answered or did.
    pub outcome: String,
}

/// All three attacks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostileReport {
    /// Media sockets flooded with pings, never read.
    pub pings: AttackReport,
    /// Webhooks with oversized call ids.
    pub long_call_ids: AttackReport,
    /// Requests whose body never arrives.
    pub stalled_bodies: AttackReport,
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

fn rss(pid: u32) -> u64 {
    procstat::sample(pid).map_or(0, |s| s.rss_kib)
}

async fn pings(public: SocketAddr, edge: u32, settings: &HostileSettings) -> AttackReport {
    let mut report = AttackReport { edge_rss_before_kib: rss(edge), ..AttackReport::default() };
    let mut floods = Vec::new();
    for i in 0..settings.ping_callers {
        let Ok(mut conn) = raw::ws_upgrade(public, "/ws", &format!("hostile-ping-{i}")).await else { continue };
        let total = settings.ping_bytes;
        floods.push(tokio::spawn(async move {
            let written = raw::flood_pings(&mut conn, total, Duration::from_secs(10)).await;
            (written, conn)
        }));
    }
    let mut written = 0;
    let mut held = Vec::new();
    for flood in floods {
        if let Ok((bytes, conn)) = flood.await {
            written += bytes;
            held.push(conn);
        }
    }
    report.edge_fds_peak = open_fds(edge);
    report.edge_rss_after_kib = rss(edge);
    report.sent = format!("{} MiB of pings from {} callers that never read", written >> 20, held.len());
    drop(held);
    report.edge_fds_after = open_fds(edge);
    report.outcome = "pongs: only the latest unanswered one queued; pings forwarded at most once a second".into();
    report
}

async fn long_call_ids(public: SocketAddr, edge: u32, settings: &HostileSettings) -> AttackReport {
    let mut report = AttackReport { edge_rss_before_kib: rss(edge), ..AttackReport::default() };
    let (mut ok, mut failed) = (0usize, 0usize);
    let workers = 8;
    let per_worker = settings.long_ids.div_ceil(workers);
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let id_len = settings.id_len;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            for i in 0..per_worker {
                let id = format!("{worker:02}{i:08}{}", "k".repeat(id_len));
                let event = format!("[{{\"data\":{{\"correlationId\":\"{id}\"}}}}]");
                let request = raw::post("/api/incomingCall", &[], event.as_bytes());
                match raw::exchange(public, &request, Duration::from_secs(10)).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    for task in tasks {
        if let Ok((o, f)) = task.await {
            ok += o;
            failed += f;
        }
    }
    report.edge_fds_peak = open_fds(edge);
    report.edge_rss_after_kib = rss(edge);
    report.edge_fds_after = report.edge_fds_peak;
    report.sent = format!("{} IncomingCall webhooks with {}-byte call ids", ok + failed, settings.id_len);
    report.outcome = format!("{ok} relayed without a pin, {failed} failed");
    report
}

async fn stalled_bodies(public: SocketAddr, edge: u32, settings: &HostileSettings) -> AttackReport {
    let mut report = AttackReport { edge_rss_before_kib: rss(edge), ..AttackReport::default() };
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..settings.stalled_bodies {
        let Ok(mut conn) = tokio::net::TcpStream::connect(public).await else { break };
        let head = "POST /api/incomingCall HTTP/1.1\r\nhost: relay\r\ncontent-length: 1000\r\n\r\n[";
        if conn.write_all(head.as_bytes()).await.is_ok() {
            conns.push(conn);
        }
    }
    report.edge_fds_peak = open_fds(edge);
    let sent = conns.len();
    let wait = settings.body_read_timeout + Duration::from_secs(10);
    let answers = conns.into_iter().map(|mut conn| async move {
        tokio::time::timeout(wait, raw::read_response(&mut conn)).await.ok().and_then(Result::ok).map(|r| r.status)
    });
    let statuses = futures_util::future::join_all(answers).await;
    let timed_out = statuses.iter().filter(|s| **s == Some(408)).count();
    report.edge_rss_after_kib = rss(edge);
    report.edge_fds_after = open_fds(edge);
    report.sent = format!("{sent} requests whose body never comes");
    report.outcome = format!(
        "{timed_out} answered 408 within {:.1} s (body_read_timeout {:?})",
        started.elapsed().as_secs_f64(),
        settings.body_read_timeout
    );
    report
}

/// Runs the three attacks against a fresh bot, edge and agent; `exe` is this binary.
pub async fn run(exe: &Path, settings: HostileSettings) -> anyhow::Result<HostileReport> {
    let echo = relay_testkit::bot::EchoBot::start_quiet_on(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let bot = echo.addr();
    let timeout = humantime::format_duration(settings.body_read_timeout).to_string();
    let options = RelayOptions {
        bot,
        transport: relay_transport::Transport::Quic,
        edge_args: vec!["--body-read-timeout".into(), timeout, "--ws-idle-timeout".into(), "5s".into()],
        agent_args: Vec::new(),
    };
    let relay = Relay::start(exe, options).await?;
    let edge = relay.edge_pid()?;
    eprintln!("hostile: pings");
    let pings = pings(relay.public, edge, &settings).await;
    eprintln!("hostile: long call ids");
    let long_call_ids = long_call_ids(relay.public, edge, &settings).await;
    eprintln!("hostile: stalled bodies");
    let stalled_bodies = stalled_bodies(relay.public, edge, &settings).await;
    relay.stop().await;
    Ok(HostileReport { pings, long_call_ids, stalled_bodies })
}

/// The report as a table.
pub fn render(report: &HostileReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "| attack | edge RSS before -> after | edge fds peak / after | outcome |\n| --- | --- | --- | --- |\n",
    );
    for attack in [&report.pings, &report.long_call_ids, &report.stalled_bodies] {
        let _ = writeln!(
            out,
            "| {} | {:.1} -> {:.1} MiB | {} / {} | {} |",
            attack.sent,
            attack.edge_rss_before_kib as f64 / 1024.0,
            attack.edge_rss_after_kib as f64 / 1024.0,
            attack.edge_fds_peak,
            attack.edge_fds_after,
            attack.outcome
        );
    }
    out
}
