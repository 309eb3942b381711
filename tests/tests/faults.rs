//! Fault injection with the real edge and agent binaries as separate processes: agents killed
//! with SIGKILL mid-call, an edge restarted, a lossy and slow link through the seeded
//! impairment proxy, a link that goes silent, and UDP dropped by the kernel inside a network
//! namespace. Each test asserts exact outcomes; none sleeps for a fixed time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use relay_pki::{DEFAULT_TOKEN_TTL, EdgeState};
use relay_testkit::acs::{self, MediaCall, MediaStats};
use relay_testkit::bot::EchoBot;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::eventually;
use relay_testkit::impair::{Impairment, UdpImpairProxy};
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
    let edge = EdgeState::open(state).unwrap();
    let token = edge.create_token(name, &tunnel.to_string(), DEFAULT_TOKEN_TTL, SystemTime::now(), false).unwrap();
    let agent_dir = dir.join(format!("agent-{name}"));
    relay_agent::pair(&agent_dir, &token.encode(), &Default::default()).await.unwrap();
    agent_dir
}

/// Starts `count` concurrent media calls streaming `frames` frames each.
fn start_calls(
    public: std::net::SocketAddr,
    prefix: &str,
    count: usize,
    frames: u64,
) -> Vec<tokio::task::JoinHandle<(String, MediaStats)>> {
    (0..count)
        .map(|i| {
            let corr = format!("{prefix}-{i}");
            tokio::spawn(async move {
                let mut call = MediaCall::connect(public, "/ws", &corr).await.unwrap();
                let stats = call.stream_audio(frames, Duration::from_secs(15)).await.unwrap();
                (corr, stats)
            })
        })
        .collect()
}

fn carried_by(bot: &EchoBot, corr: &str) -> bool {
    bot.sessions().iter().any(|s| s.headers.get("x-ms-call-correlation-id").is_some_and(|v| v == corr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_call_spares_the_other_agents_calls_and_new_calls_go_to_the_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[]);
    let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
    let bots = [EchoBot::start().await.unwrap(), EchoBot::start().await.unwrap()];
    let mut agents = Vec::new();
    for (i, bot) in bots.iter().enumerate() {
        let agent_dir = pair(&state, edge.tunnel, &format!("agent-{i}"), dir.path()).await;
        let edges = [edge.tunnel.to_string()];
        agents.push(AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &[]).await.unwrap());
    }
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 2 }).await);

    // 20 calls of 8 s each; the first agent is killed once every call is flowing.
    let frames = 8 * FPS;
    let calls = start_calls(edge.public, "kill", 20, frames);
    let all_up =
        eventually(PROC_DEADLINE, || async { bots[0].sessions().len() + bots[1].sessions().len() == 20 }).await;
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
    let dropped = proxy.stats().dropped.load(std::sync::atomic::Ordering::Relaxed);
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

/// A network namespace with a veth pair to the host, `ns_ip` on its inner end. Deleted (with
/// its veth pair) on drop.
struct Netns {
    name: String,
    ns_ip: String,
}

fn run(cmd: &[&str]) -> Result<(), String> {
    let (program, args) = cmd.split_first().ok_or("empty command")?;
    let out = std::process::Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Creates the namespace, or says why it cannot (not root, no `ip` or `iptables`).
    fn create(tag: u8) -> Result<Self, String> {
        let uid = std::process::Command::new("id").arg("-u").output().map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root".into());
        }
        run(&["iptables", "--version"])?;
        let id = std::process::id() % 10_000;
        let name = format!("acsr-{id}-{tag}");
        let (host_if, ns_if) = (format!("acsrh{id}{tag}"), format!("acsrn{id}{tag}"));
        // A /30 per test from a private range used for nothing else here.
        let subnet = (id % 250) as u8;
        let (host_ip, ns_ip) = (format!("10.213.{subnet}.{}", tag * 4 + 1), format!("10.213.{subnet}.{}", tag * 4 + 2));
        let ns = Self { name: name.clone(), ns_ip: ns_ip.clone() };
        run(&["ip", "netns", "add", &name])?;
        run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        run(&["ip", "link", "set", &ns_if, "netns", &name])?;
        run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        ns.exec(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        ns.exec(&["ip", "link", "set", &ns_if, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run(&full)
    }

    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.name.as_str()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_silently_dropped_by_the_kernel_is_survived_and_the_agent_returns_when_it_passes_again() {
    let ns = match Netns::create(1) {
        Ok(ns) => ns,
        Err(reason) => {
            eprintln!("skipped: this test needs root, ip and iptables for a network namespace ({reason})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let state = edge_state(dir.path(), &[&ns.ns_ip]);
    let on_ns = format!("{}:0", ns.ns_ip);
    let args = ["--listen", on_ns.as_str(), "--tunnel-listen", on_ns.as_str(), "--admin-listen", on_ns.as_str()];
    let edge = EdgeProc::start(&bins(), &ns.wrapper(), &state, &args).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair(&state, edge.tunnel, "agent-0", dir.path()).await;
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
    assert!(eventually(PROC_DEADLINE, || async { webhook().await == StatusCode::OK }).await);
    drop(ns);
}
