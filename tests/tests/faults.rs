//! Fault injection with the real edge and agent binaries as separate processes: agents killed
//! with SIGKILL mid-call, an edge restarted, a lossy and slow link through the seeded
//! impairment proxy, a link that goes silent, UDP dropped by the kernel inside a network
//! namespace (QUIC riding it out, and `auto` falling back to TCP and back), and TCP segments
//! dropped at random. Each test asserts exact outcomes; none sleeps for a fixed time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use relay_pki::EdgeState;
use relay_testkit::acs::{self, MediaCall, MediaStats};
use relay_testkit::bot::EchoBot;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::eventually;
use relay_testkit::impair::{Impairment, UdpImpairProxy};
use relay_testkit::netns::{Netns, netns_or_skip};
use relay_testkit::procs::{AgentProc, Binaries, EdgeProc, PROC_DEADLINE};

/// Frames per second ACS sends on a media socket.
const FPS: u64 = 50;

fn bins() -> Binaries {
    Binaries { edge: env!("CARGO_BIN_EXE_e2e-edge").into(), agent: env!("CARGO_BIN_EXE_e2e-agent").into() }
}

/// A fresh edge state directory whose tunnel certificate also names `names`.
fn edge_state(dir: &Path, names: &[&str]) -> PathBuf {
    let state = dir.join("edge");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    EdgeState::init(&state, &names, SystemTime::now()).unwrap();
    state
}

/// Pairs a new agent `name` with the edge listening on `tunnel` and returns its state dir.
async fn pair(state: &Path, tunnel: std::net::SocketAddr, name: &str, dir: &Path) -> PathBuf {
    relay_testkit::procs::pair_agent(state, tunnel, name, dir).await.unwrap()
}

type Calls = Vec<tokio::task::JoinHandle<(String, MediaStats)>>;

/// Starts `count` concurrent media calls streaming `frames` frames each.
fn start_calls(public: std::net::SocketAddr, prefix: &str, count: usize, frames: u64) -> Calls {
    start_counted_calls(public, prefix, count, frames, Arc::default())
}

/// Like [`start_calls`], counting in `upgraded` the calls whose upgrade the caller has seen.
fn start_counted_calls(
    public: std::net::SocketAddr,
    prefix: &str,
    count: usize,
    frames: u64,
    upgraded: Arc<AtomicUsize>,
) -> Calls {
    (0..count)
        .map(|i| {
            let corr = format!("{prefix}-{i}");
            let upgraded = upgraded.clone();
            tokio::spawn(async move {
                let mut call = MediaCall::connect(public, "/ws", &corr).await.unwrap();
                upgraded.fetch_add(1, Ordering::SeqCst);
                let stats = call.stream_audio(frames, Duration::from_secs(15)).await.unwrap();
                (corr, stats)
            })
        })
        .collect()
}

/// An edge process with two paired agent processes (`agent-0`, `agent-1`), each forwarding to
/// its own bot so where an exchange lands is visible; `agent_args` go to both agents.
async fn edge_with_two_agents(agent_args: &[&str]) -> (tempfile::TempDir, EdgeProc, [EchoBot; 2], Vec<AgentProc>) {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
    let bots = [EchoBot::start().await.unwrap(), EchoBot::start().await.unwrap()];
    let mut agents = Vec::new();
    for (i, bot) in bots.iter().enumerate() {
        let agent_dir = pair(&state, edge.tunnel, &format!("agent-{i}"), dir.path()).await;
        let edges = [edge.tunnel.to_string()];
        agents.push(AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, agent_args).await.unwrap());
    }
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 2 }).await);
    (dir, edge, bots, agents)
}

fn carried_by(bot: &EchoBot, corr: &str) -> bool {
    bot.sessions().iter().any(|s| s.headers.get("x-ms-call-correlation-id").is_some_and(|v| v == corr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_call_spares_the_other_agents_calls_and_new_calls_go_to_the_survivor() {
    let (_dir, edge, bots, agents) = edge_with_two_agents(&[]).await;

    // 20 calls of 8 s each; the first agent is killed once every call is flowing.
    let frames = 8 * FPS;
    let upgraded = Arc::new(AtomicUsize::new(0));
    let calls = start_counted_calls(edge.public, "kill", 20, frames, upgraded.clone());
    // Killed only once every caller holds its upgraded socket: an upgrade the bot accepted but
    // whose answer had not left the agent would rightly fail with 502.
    let all_up = eventually(PROC_DEADLINE, || async { upgraded.load(Ordering::SeqCst) == 20 }).await;
    assert!(all_up, "every call reaches a bot:\n{}\n{}", agents[0].proc.log(), edge.proc.log());
    assert!(!bots[0].sessions().is_empty() && !bots[1].sessions().is_empty(), "calls spread over both agents");
    agents[0].proc.signal("KILL").unwrap();

    for call in calls {
        let (corr, stats) = call.await.unwrap();
        if carried_by(&bots[1], &corr) {
            assert!(stats.intact() && stats.sent == frames, "{corr} on the survivor lost frames: {stats:?}");
            assert_eq!(stats.closed_by_peer, None, "{corr} on the survivor was closed");
        } else {
            assert!(carried_by(&bots[0], &corr));
            assert_eq!(stats.closed_by_peer, Some(1001), "{corr} on the killed agent must end with a close");
            assert_eq!(stats.mismatched, 0, "{corr}: what did arrive arrived in order");
        }
    }

    // Once the edge has noticed (idle timeout), new calls all go to the survivor.
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);
    for call in start_calls(edge.public, "after", 6, FPS / 2) {
        let (corr, stats) = call.await.unwrap();
        assert!(stats.intact(), "{corr}: {stats:?}");
        assert!(carried_by(&bots[1], &corr), "{corr} must go to the surviving agent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_edge_restart_the_agent_is_back_within_two_seconds_and_the_gap_gets_503s() {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    let mut edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair(&state, edge.tunnel, "agent-0", dir.path()).await;
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[edge.tunnel.to_string()], &[]).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { agent.connections().await == 1 }).await);

    edge.proc.signal("TERM").unwrap();
    let status = edge.proc.wait_exit(PROC_DEADLINE).await.expect("the edge exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", edge.proc.log());
    assert!(eventually(PROC_DEADLINE, || async { agent.connections().await == 0 }).await);

    let (public, tunnel) = (edge.public.to_string(), edge.tunnel.to_string());
    let args = ["--listen", public.as_str(), "--tunnel-listen", tunnel.as_str()];
    let edge = EdgeProc::start(&bins(), &[], &state, &args).await.unwrap();
    let listening = Instant::now();
    // Webhooks sent until the agent is back get 503 with Retry-After, or reach the bot; none
    // hangs, none gets anything else. The loop is bounded by count and by the reconnect deadline.
    let mut answered = Vec::new();
    for _ in 0..200 {
        if agent.connections().await == 1 {
            break;
        }
        let request = post_json(edge.public, "/api/incomingCall", &acs::incoming_call_event("gap"));
        let reply = tokio::time::timeout(Duration::from_secs(10), send_collect(edge.public, request))
            .await
            .expect("no webhook hangs")
            .unwrap();
        let retry_after = reply.headers().contains_key(http::header::RETRY_AFTER);
        answered.push((reply.status(), retry_after));
        if listening.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let back_after = listening.elapsed();
    assert!(
        eventually(Duration::from_secs(2).saturating_sub(back_after), || async { agent.connections().await == 1 })
            .await,
        "the agent must be back within 2 s of the edge listening (not back after {back_after:?})"
    );
    for (status, retry_after) in &answered {
        assert!(
            *status == StatusCode::OK || (*status == StatusCode::SERVICE_UNAVAILABLE && *retry_after),
            "a webhook in the gap got {status} (Retry-After: {retry_after})"
        );
    }
    eprintln!("agent back {:?} after the edge listened; {} webhooks in the gap", listening.elapsed(), answered.len());
    let reply =
        send_collect(edge.public, post_json(edge.public, "/api/incomingCall", &acs::incoming_call_event("after")))
            .await
            .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_calls_over_a_lossy_slow_link_arrive_complete_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair(&state, edge.tunnel, "agent-0", dir.path()).await;

    // Baseline in the same run: the same calls straight to the bot.
    let frames = 20 * FPS;
    let mut direct = MediaStats::default();
    for call in start_calls(bot.addr(), "direct", 20, 2 * FPS) {
        direct.merge(&call.await.unwrap().1);
    }

    let impairment = Impairment { loss: 0.05, delay: Duration::from_millis(50), jitter: Duration::from_millis(10) };
    let proxy = UdpImpairProxy::start(edge.tunnel, impairment, 0x5eed).await.unwrap();
    let edges = [proxy.addr().to_string()];
    let _agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &[]).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);

    let mut relayed = MediaStats::default();
    for call in start_calls(edge.public, "lossy", 20, frames) {
        let (corr, stats) = call.await.unwrap();
        assert!(stats.intact() && stats.sent == frames, "{corr}: {stats:?}");
        relayed.merge(&stats);
    }
    let dropped = proxy.stats().dropped.load(Ordering::Relaxed);
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    eprintln!(
        "5% loss, 50±10 ms each way: {} frames, all in order; RTT p50 {:.1} ms, p99 {:.1} ms vs direct p50 {:.2} ms, \
         p99 {:.2} ms: added p99 {:.1} ms (the link itself adds 100 ms); {dropped} datagrams dropped",
        relayed.received,
        ms(relayed.percentile(0.5)),
        ms(relayed.percentile(0.99)),
        ms(direct.percentile(0.5)),
        ms(direct.percentile(0.99)),
        ms(relayed.percentile(0.99)) - ms(direct.percentile(0.99)),
    );
    assert!(dropped > 0, "the proxy must actually have dropped datagrams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_gone_silent_is_dropped_by_the_idle_timeout_and_restored_when_it_heals() {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair(&state, edge.tunnel, "agent-0", dir.path()).await;
    let proxy = UdpImpairProxy::start(edge.tunnel, Impairment::NONE, 1).await.unwrap();
    let edges = [proxy.addr().to_string()];
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &[]).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);

    proxy.blackhole(true);
    let silenced = Instant::now();
    // Both ends give up on the connection after the 5 s idle timeout (plus the edge's 1 s poll).
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 0 }).await);
    assert!(eventually(PROC_DEADLINE, || async { agent.connections().await == 0 }).await);
    let noticed = silenced.elapsed();
    assert!(noticed >= Duration::from_secs(4), "dropped after {noticed:?}, before the idle timeout");
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        send_collect(edge.public, post_json(edge.public, "/api/incomingCall", &acs::incoming_call_event("dark"))),
    )
    .await
    .expect("answered, not hung")
    .unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);

    proxy.blackhole(false);
    let healed = Instant::now();
    assert!(eventually(PROC_DEADLINE, || async { agent.connections().await == 1 }).await);
    eprintln!("silent link noticed after {noticed:?}; agent back {:?} after it healed", healed.elapsed());
    assert!(healed.elapsed() < Duration::from_secs(3), "back {:?} after the link healed", healed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_silently_dropped_by_the_kernel_is_survived_and_the_agent_returns_when_it_passes_again() {
    let Some(ns) = netns_or_skip(1) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (edge, agent_dir) = edge_in_netns(&ns, dir.path()).await;
    let bot = EchoBot::start().await.unwrap();
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[edge.tunnel.to_string()], &[]).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await, "{}", agent.proc.log());
    let webhook = || async {
        let request = post_json(edge.public, "/api/incomingCall", &acs::incoming_call_event("netns"));
        tokio::time::timeout(Duration::from_secs(10), send_collect(edge.public, request))
            .await
            .expect("answered within 10 s, never hung")
            .unwrap()
            .status()
    };
    assert_eq!(webhook().await, StatusCode::OK);

    // Every UDP datagram to the tunnel port now vanishes inside the edge's namespace: no ICMP,
    // no error, just silence (DROP on INPUT, not REJECT).
    let port = edge.tunnel.port().to_string();
    let rule = ["INPUT", "-p", "udp", "--dport", port.as_str(), "-j", "DROP"];
    ns.exec(&[&["iptables", "-A"][..], &rule[..]].concat()).unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 0 }).await);
    assert_eq!(webhook().await, StatusCode::SERVICE_UNAVAILABLE, "no agent: 503 at once");
    assert!(eventually(PROC_DEADLINE, || async { agent.connections().await == 0 }).await);
    assert!(agent.proc.wait_line("does not answer", PROC_DEADLINE).await.is_some(), "{}", agent.proc.log());

    ns.exec(&[&["iptables", "-D"][..], &rule[..]].concat()).unwrap();
    let passing = Instant::now();
    assert!(eventually(PROC_DEADLINE, || async { agent.connections().await == 1 }).await);
    let back = passing.elapsed();
    eprintln!("UDP dropped by the kernel: agent back {back:?} after the rule was removed");
    assert!(back < Duration::from_secs(3), "back only {back:?} after UDP passed again");
    assert!(
        eventually(PROC_DEADLINE, || async { webhook().await == StatusCode::OK }).await,
        "webhooks never got through again; edge:\n{}\nagent:\n{}",
        edge.proc.log(),
        agent.proc.log()
    );
    drop(ns);
}

/// An edge process inside the namespace `ns`, listening on its inner address, and the state
/// directory of an agent paired with it (`agent-0`).
async fn edge_in_netns(ns: &Netns, dir: &Path) -> (EdgeProc, PathBuf) {
    let state = edge_state(dir, &[&ns.ns_ip]);
    let on_ns = format!("{}:0", ns.ns_ip);
    // The public listener is on the namespace's own address, reached only from this test; its
    // routes carry no checks, so the edge must be told that is intended (protected mode).
    let args = [
        "--listen",
        on_ns.as_str(),
        "--tunnel-listen",
        on_ns.as_str(),
        "--admin-listen",
        on_ns.as_str(),
        "--allow-unauthenticated",
    ];
    let edge = EdgeProc::start(&bins(), &ns.wrapper(), &state, &args).await.unwrap();
    let agent_dir = pair(&state, edge.tunnel, "agent-0", dir).await;
    (edge, agent_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_vanishes_and_moves_back_to_quic_without_dropping_a_call() {
    let Some(ns) = netns_or_skip(3) else { return };
    let dir = tempfile::tempdir().unwrap();
    let bot = EchoBot::start().await.unwrap();
    // UDP to the tunnel vanishes from before the agent's first dial (pairing, over QUIC, is done).
    let (edge, agent_dir) = edge_in_netns(&ns, dir.path()).await;
    let port = edge.tunnel.port().to_string();
    let rule = ["INPUT", "-p", "udp", "--dport", port.as_str(), "-j", "DROP"];
    ns.exec(&[&["iptables", "-A"][..], &rule[..]].concat()).unwrap();

    let started = Instant::now();
    let edges = [edge.tunnel.to_string()];
    let agent_args = ["--transport", "auto", "--quic-probe-interval", "2s"];
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &agent_args).await.unwrap();
    assert!(
        eventually(PROC_DEADLINE, || async { agent.connections_over("tcp").await == 1 }).await,
        "{}",
        agent.proc.log()
    );
    let fell_back = started.elapsed();
    eprintln!("UDP dropped: auto connected over TCP {fell_back:?} after the agent started");
    assert!(fell_back < Duration::from_secs(5), "took {fell_back:?} to fall back to TCP");
    assert!(agent.proc.log().contains("no QUIC answer within"), "the agent must say why it uses TCP");
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected_over("tcp").await == 1 }).await);
    let state = dir.path().join("edge");
    assert!(eventually(PROC_DEADLINE, || async { listed_transports(&state) == ["tcp"] }).await);

    // Calls flow over TCP; while they run, UDP passes again.
    let frames = 8 * FPS;
    let on_tcp = start_calls(edge.public, "on-tcp", 5, frames);
    ns.exec(&[&["iptables", "-D"][..], &rule[..]].concat()).unwrap();
    let passing = Instant::now();
    assert!(
        eventually(PROC_DEADLINE, || async { agent.connections_over("quic").await == 1 }).await,
        "{}",
        agent.proc.log()
    );
    eprintln!("UDP passes again: back on QUIC {:?} later (probe every 2 s)", passing.elapsed());

    // New calls go over QUIC while the TCP ones finish where they are.
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected_over("quic").await == 1 }).await);
    for call in start_calls(edge.public, "on-quic", 3, 2 * FPS) {
        let (corr, stats) = call.await.unwrap();
        assert!(stats.intact() && stats.sent == 2 * FPS, "{corr}: {stats:?}");
    }
    for call in on_tcp {
        let (corr, stats) = call.await.unwrap();
        assert!(stats.intact() && stats.sent == frames, "{corr} was dropped by the move: {stats:?}");
        assert_eq!(stats.closed_by_peer, None, "{corr}");
    }
    // The TCP connection closes once its calls are done.
    assert!(eventually(PROC_DEADLINE, || async { agent.connections_over("tcp").await == 0 }).await);
    assert_eq!(agent.connections_over("quic").await, 1);
    assert!(eventually(PROC_DEADLINE, || async { listed_transports(&state) == ["quic"] }).await);
    drop(ns);
}

/// The transports of `agent-0`'s live connections, as `relay-edge agents --json` lists them.
fn listed_transports(state: &Path) -> Vec<String> {
    let out =
        std::process::Command::new(bins().edge).arg("agents").arg("--state-dir").arg(state).arg("--json").output();
    let rows: serde_json::Value = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default();
    let agent = rows.as_array().into_iter().flatten().find(|row| row["name"] == "agent-0");
    let connections = agent.and_then(|row| row["connections"].as_array().cloned()).unwrap_or_default();
    connections.iter().filter_map(|c| c["transport"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_calls_over_tcp_with_two_percent_packet_loss_lose_and_reorder_no_frame() {
    let Some(ns) = netns_or_skip(4) else { return };
    let dir = tempfile::tempdir().unwrap();
    let bot = EchoBot::start().await.unwrap();
    let (edge, agent_dir) = edge_in_netns(&ns, dir.path()).await;
    let edges = [edge.tunnel.to_string()];
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &["--transport", "tcp"]).await.unwrap();
    assert!(
        eventually(PROC_DEADLINE, || async { edge.agents_connected_over("tcp").await == 1 }).await,
        "{}",
        agent.proc.log()
    );

    // 2% of the tunnel's TCP segments vanish, each way, inside the edge's namespace.
    let port = edge.tunnel.port().to_string();
    let loss = ["-m", "statistic", "--mode", "random", "--probability", "0.02", "-j", "DROP"];
    let inbound = [&["INPUT", "-p", "tcp", "--dport", port.as_str()][..], &loss[..]].concat();
    let outbound = [&["OUTPUT", "-p", "tcp", "--sport", port.as_str()][..], &loss[..]].concat();
    for rule in [&inbound, &outbound] {
        ns.exec(&[&["iptables", "-A"][..], &rule[..]].concat()).unwrap();
    }
    let frames = 10 * FPS;
    let mut total = MediaStats::default();
    for call in start_calls(edge.public, "lossy-tcp", 10, frames) {
        let (corr, stats) = call.await.unwrap();
        assert!(stats.intact() && stats.sent == frames, "{corr}: {stats:?}");
        total.merge(&stats);
    }
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    eprintln!(
        "TCP transport, 2% loss each way: {} frames, all in order; RTT p50 {:.1} ms, p99 {:.1} ms",
        total.received,
        ms(total.percentile(0.5)),
        ms(total.percentile(0.99))
    );
    let mut dropped = std::process::Command::new("ip");
    dropped.args(["netns", "exec", ns.name(), "iptables", "-L", "INPUT", "-v", "-x", "-n"]);
    let listing = String::from_utf8_lossy(&dropped.output().unwrap().stdout).into_owned();
    let drops: u64 = listing
        .lines()
        .filter(|l| l.contains("statistic"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(drops > 0, "the rule must actually have dropped segments:\n{listing}");
    drop(ns);
}

/// `count` correlation ids whose calls rendezvous hashing gives to `wanted` rather than `other`.
fn keys_for(wanted: &str, other: &str, prefix: &str, count: usize) -> Vec<String> {
    use relay_edge::agents::rendezvous_weight;
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|key| rendezvous_weight(key, wanted) > rendezvous_weight(key, other))
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_an_agent_finishes_its_webhooks_keeps_its_calls_for_the_grace_and_routes_nothing_new_to_it() {
    let (_dir, edge, bots, mut agents) = edge_with_two_agents(&["--drain-timeout", "3s"]).await;

    // Ten slow webhooks and five calls, all of calls that belong to agent-0.
    let keys = keys_for("agent-0", "agent-1", "drain", 15);
    let public = edge.public;
    let webhooks: Vec<_> = keys[..10]
        .iter()
        .map(|key| {
            let body = acs::incoming_call_event(key);
            tokio::spawn(async move {
                let reply =
                    send_collect(public, post_json(public, "/api/incomingCall?delay_ms=1500", &body)).await.unwrap();
                (reply.status(), reply.body().clone(), body)
            })
        })
        .collect();
    let calls: Vec<_> = keys[10..]
        .iter()
        .map(|key| {
            let key = key.clone();
            tokio::spawn(async move {
                let mut call = MediaCall::connect(public, "/ws", &key).await.unwrap();
                call.stream_audio(10 * FPS, Duration::from_secs(15)).await.unwrap()
            })
        })
        .collect();
    let all_in = eventually(PROC_DEADLINE, || async { bots[0].hits() == 15 }).await;
    assert!(all_in, "every webhook and call reached agent-0's bot (it got {})", bots[0].hits());

    agents[0].proc.signal("TERM").unwrap();
    let signalled = Instant::now();
    // New exchanges, even of agent-0's calls, go to agent-1 once the drain notice is in.
    let moved = eventually(PROC_DEADLINE, || async {
        let before = bots[1].hits();
        let reply = send_collect(public, post_json(public, "/api/incomingCall", &acs::incoming_call_event(&keys[0])))
            .await
            .unwrap();
        reply.status() == StatusCode::OK && bots[1].hits() == before + 1
    })
    .await;
    assert!(moved);
    let hits_on_leaving = bots[0].hits();
    for key in &keys[..5] {
        let reply =
            send_collect(public, post_json(public, "/api/incomingCall", &acs::incoming_call_event(key))).await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
    }
    assert_eq!(bots[0].hits(), hits_on_leaving, "nothing new reaches the draining agent");

    for webhook in webhooks {
        let (status, body, sent) = webhook.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], sent.as_bytes(), "each webhook completes with the bot's answer");
    }
    for call in calls {
        let stats = call.await.unwrap();
        assert_eq!(stats.closed_by_peer, Some(1001), "{stats:?}");
        assert_eq!(stats.mismatched, 0);
        assert!(stats.received >= 3 * FPS - FPS / 2, "the call ran through the 3 s grace: {stats:?}");
    }
    assert!(signalled.elapsed() >= Duration::from_secs(3));
    let status = agents[0].proc.wait_exit(PROC_DEADLINE).await.expect("the agent exits after its grace");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_name_resolving_to_two_replicas_gets_one_connection_to_each() {
    let Some(ns) = netns_or_skip(2) else { return };
    let dir = tempfile::tempdir().unwrap();
    // The agent dials the name; pairing (from the host) dials the first address.
    let state = edge_state(dir.path(), &["edges.test", &ns.host_ips[0]]);
    // Two replicas on one state directory, on the two host addresses, same tunnel port.
    let first_tunnel = format!("{}:0", ns.host_ips[0]);
    let first = EdgeProc::start(&bins(), &[], &state, &["--tunnel-listen", first_tunnel.as_str()]).await.unwrap();
    let port = first.tunnel.port();
    let second_tunnel = format!("{}:{port}", ns.host_ips[1]);
    let second = EdgeProc::start(&bins(), &[], &state, &["--tunnel-listen", second_tunnel.as_str()]).await.unwrap();
    ns.hosts("edges.test", &ns.host_ips).unwrap();

    // The bot listens where the namespace can reach it; the agent runs inside the namespace.
    let bot = EchoBot::start_on(format!("{}:0", ns.host_ips[0]).parse().unwrap()).await.unwrap();
    let agent_dir = pair(&state, first.tunnel, "agent-0", dir.path()).await;
    let edges = [format!("edges.test:{port}")];
    let agent = AgentProc::start(&bins(), &ns.wrapper(), &agent_dir, &bot.url(), &edges, &[]).await.unwrap();
    let both = eventually(PROC_DEADLINE, || async {
        first.agents_connected().await == 1 && second.agents_connected().await == 1
    })
    .await;
    assert!(both, "one connection to each address of the name:\n{}", agent.proc.log());
    for edge in [&first, &second] {
        let reply =
            send_collect(edge.public, post_json(edge.public, "/api/incomingCall", &acs::incoming_call_event("dns")))
                .await
                .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
    }
    assert_eq!(bot.hits(), 2);
}

/// Two edge processes behind one flow-hashing balancer address, two agents (each with its own
/// bot) dialling that one address over `transport`; returns once each agent holds both edges.
async fn two_edges_behind_one_address(
    transport: &str,
) -> (tempfile::TempDir, [EdgeProc; 2], relay_testkit::balancer::FlowBalancer, [EchoBot; 2], Vec<AgentProc>) {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    let edges = [
        EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap(),
        EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap(),
    ];
    let balancer = relay_testkit::balancer::FlowBalancer::start(vec![edges[0].tunnel, edges[1].tunnel]).await.unwrap();
    let bots = [EchoBot::start().await.unwrap(), EchoBot::start().await.unwrap()];
    let started = Instant::now();
    let mut agents = Vec::new();
    for (i, bot) in bots.iter().enumerate() {
        let agent_dir = pair(&state, edges[0].tunnel, &format!("agent-{i}"), dir.path()).await;
        let through = [balancer.addr().to_string()];
        let args = ["--transport", transport];
        agents.push(AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &through, &args).await.unwrap());
    }
    let both = eventually(PROC_DEADLINE, || async {
        edges[0].agents_connected_over(transport).await == 2 && edges[1].agents_connected_over(transport).await == 2
    })
    .await;
    assert!(
        both,
        "each agent holds both edges behind the one address:\n{}\n{}",
        agents[0].proc.log(),
        agents[1].proc.log()
    );
    eprintln!(
        "{transport}: both agents hold both edges {:?} after starting (balancer flows per edge: {:?})",
        started.elapsed(),
        balancer.flows()
    );
    (dir, edges, balancer, bots, agents)
}

/// Thirty calls whose IncomingCall, callbacks and media each go to either edge; returns how
/// many calls reached more than one bot.
async fn split_calls(edges: &[EdgeProc; 2], bots: &[EchoBot; 2]) -> usize {
    let mut media = Vec::new();
    for i in 0..30usize {
        let corr = format!("4f1c1a52-0000-4000-8000-{i:012}");
        let via = |n: usize| edges[(i + n) % 2].public;
        let incoming = send_collect(via(0), post_json(via(0), "/api/incomingCall", &acs::incoming_call_event(&corr)));
        assert_eq!(incoming.await.unwrap().status(), StatusCode::OK, "IncomingCall of {corr}");
        for (n, kind) in [(1, "CallConnected"), (2, "PlayCompleted")] {
            let body = acs::callback_event(kind, &format!("conn-{i}"), &corr);
            let reply = send_collect(via(n), post_json(via(n), &format!("/api/callbacks/conn-{i}"), &body)).await;
            assert_eq!(reply.unwrap().status(), StatusCode::OK, "{kind} of {corr}");
        }
        let public = via(1);
        media.push(tokio::spawn(async move {
            let mut call = MediaCall::connect(public, "/ws", &corr).await.unwrap();
            call.stream_audio(10, Duration::from_secs(5)).await.unwrap()
        }));
    }
    for call in media {
        assert!(call.await.unwrap().intact());
    }
    (0..30usize)
        .filter(|i| {
            let corr = format!("4f1c1a52-0000-4000-8000-{i:012}");
            let reached = |bot: &EchoBot| {
                bot.requests().iter().any(|r| String::from_utf8_lossy(&r.body).contains(&corr))
                    || bot
                        .sessions()
                        .iter()
                        .any(|s| s.headers.get("x-ms-call-correlation-id").is_some_and(|v| v == corr.as_str()))
            };
            reached(&bots[0]) && reached(&bots[1])
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_behind_one_balanced_address_reach_every_edge_and_calls_never_split_over_quic() {
    let (_dir, edges, _balancer, bots, _agents) = two_edges_behind_one_address("quic").await;
    assert_eq!(split_calls(&edges, &bots).await, 0, "a call's exchanges reached two bots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_behind_one_balanced_address_reach_every_edge_and_calls_never_split_over_tcp() {
    let (_dir, edges, _balancer, bots, _agents) = two_edges_behind_one_address("tcp").await;
    assert_eq!(split_calls(&edges, &bots).await, 0, "a call's exchanges reached two bots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_is_served_at_once_not_after_its_dead_connection_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    // A long tunnel idle timeout, so the dead connection lingers unless it is retired.
    let edge = EdgeProc::start(&bins(), &[], &state, &["--idle-timeout", "30s"]).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair(&state, edge.tunnel, "agent-0", dir.path()).await;
    // The first process reaches the edge through a link that then goes silent, as a killed
    // pod's address does: the edge hears nothing more and sends into the void.
    let link = UdpImpairProxy::start(edge.tunnel, Impairment::NONE, 7).await.unwrap();
    let args = ["--idle-timeout", "30s"];
    let first =
        AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[link.addr().to_string()], &args).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);
    link.blackhole(true);
    first.proc.signal("KILL").unwrap();
    let second =
        AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[edge.tunnel.to_string()], &args).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { second.connections().await == 1 }).await);
    let ready = Instant::now();
    // Webhooks without a call id go to the least loaded connection: the dead one half the time,
    // unless the new connection retired it.
    for i in 0..8 {
        let public = edge.public;
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            send_collect(public, post_json(public, "/api/callbacks/restart", "[]")),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("webhook {i} hung on the dead connection, {:?} after the new one was ready", ready.elapsed())
        })
        .unwrap();
        assert_eq!(
            reply.status(),
            StatusCode::OK,
            "webhook {i}, {:?} after the new connection was ready",
            ready.elapsed()
        );
    }
    assert_eq!(bot.hits(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_given_sigterm_tells_every_edge_of_its_drain_before_it_goes() {
    for transport in ["quic", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let state = edge_state(dir.path(), &[]);
        let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
        let bot = EchoBot::start().await.unwrap();
        let agent_dir = pair(&state, edge.tunnel, "agent-0", dir.path()).await;
        let edges = [edge.tunnel.to_string()];
        let mut agent =
            AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &["--transport", transport]).await.unwrap();
        assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);
        agent.proc.signal("TERM").unwrap();
        assert!(agent.proc.wait_exit(PROC_DEADLINE).await.is_some_and(|s| s.success()));
        let gone = edge.proc.wait_line("agent disconnected", PROC_DEADLINE).await;
        assert!(gone.is_some(), "{transport}: {}", edge.proc.log());
        let log = edge.proc.log();
        let drained = log.lines().position(|l| l.contains("agent draining"));
        let left = log.lines().position(|l| l.contains("agent disconnected"));
        assert!(drained.is_some() && drained < left, "{transport}: the edge learnt of the drain first:\n{log}");
        assert!(!agent.proc.log().contains("could not tell the edge"), "{transport}: {}", agent.proc.log());
    }
}
