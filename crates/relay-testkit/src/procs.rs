//! The real edge and agent binaries as separate processes, for fault tests that kill them with
//! signals, restart them, or run them inside a network namespace. Output is captured so a test
//! can wait for a log line and print the logs when it fails; every child is killed when its
//! handle drops, so a failing test leaves nothing running.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::send_collect;
use crate::wait::eventually;

/// How long a test waits for a process to start listening or to exit.
pub const PROC_DEADLINE: Duration = Duration::from_secs(20);

/// Bytes of output kept per process: the start-up lines tests wait for come first, and a
/// benchmark's processes log a line per exchange for minutes. Past this, the oldest half goes.
const LOG_LIMIT: usize = 4 * 1024 * 1024;

/// Runs `program` with `args` to its end and returns what it printed and how it exited, on a
/// blocking thread, so a test's runtime keeps serving the edge or agent the command talks to.
pub async fn run_to_end(program: &Path, args: &[String]) -> std::io::Result<std::process::Output> {
    let (program, args) = (program.to_owned(), args.to_vec());
    tokio::task::spawn_blocking(move || std::process::Command::new(program).args(args).output())
        .await
        .map_err(std::io::Error::other)?
}

/// A running child process with its output captured.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    /// How many of the output pipes have closed (both: the process has exited, or at least will
    /// never print again).
    pipes_closed: Arc<AtomicUsize>,
}

impl Proc {
    /// Starts `program` with `args`, prefixed by `wrapper` (for example `ip netns exec NS`).
    pub fn spawn(name: &str, wrapper: &[&str], program: &Path, args: &[OsString]) -> anyhow::Result<Self> {
        Self::spawn_logging(name, wrapper, program, args, "info")
    }

    /// [`Proc::spawn`] with `RUST_LOG` set to `log_filter`.
    pub fn spawn_logging(
        name: &str,
        wrapper: &[&str],
        program: &Path,
        args: &[OsString],
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let log = Arc::new(Mutex::new(String::new()));
        let pipes_closed = Arc::new(AtomicUsize::new(0));
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let (log, closed) = (log.clone(), pipes_closed.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut log) = log.lock() {
                        if log.len() + line.len() > LOG_LIMIT {
                            let mut cut = log.len() / 2;
                            while !log.is_char_boundary(cut) {
                                cut += 1;
                            }
                            log.drain(..cut);
                        }
                        log.push_str(&line);
                        log.push('\n');
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
        Ok(Self { name: name.to_owned(), child, log, pipes_closed })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (`"TERM"`, `"KILL"`, ...) with kill(1).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow::anyhow!("{} has already exited", self.name))?;
        let status = std::process::Command::new("kill").args(["-s", signal, &pid.to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -s {signal} {pid} failed");
        Ok(())
    }

    /// The process's resident memory now, in KiB (`VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> Option<u64> {
        resident_kib(self.pid()?).map(|(now, _)| now)
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether the process will print nothing more: both its output pipes have closed (it has
    /// exited, as one does on a command-line or start-up error).
    pub fn output_ended(&self) -> bool {
        self.pipes_closed.load(Ordering::SeqCst) >= 2
    }

    /// The first line containing `needle`, waiting up to `deadline` for it, or until the process
    /// can print no more.
    pub async fn wait_line(&self, needle: &str, deadline: Duration) -> Option<String> {
        let found = |log: &str| log.lines().find(|l| l.contains(needle)).map(str::to_owned);
        eventually(deadline, || async { self.output_ended() || found(&self.log()).is_some() }).await;
        found(&self.log())
    }

    /// Kills the process and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits up to `deadline` for the process to exit.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(deadline, self.child.wait()).await.ok().and_then(Result::ok)
    }
}

/// The resident set now and its peak (`VmRSS`, `VmHWM` in `/proc/PID/status`) of `pid`, in KiB.
pub fn resident_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// The value of `key=value` in a tracing log line (`Some(addr)` unwrapped).
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix))
        .map(|v| v.trim_start_matches("Some(").trim_end_matches(')').trim_matches('"').to_owned())
}

/// Issues a token for agent `name` from the edge state at `edge_state`, pairs a new agent state
/// directory under `dir` with the edge whose tunnel is at `tunnel`, and returns that directory.
pub async fn pair_agent(edge_state: &Path, tunnel: SocketAddr, name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let edge = relay_pki::EdgeState::open(edge_state)?;
    let token = edge.create_token(
        name,
        &tunnel.to_string(),
        relay_pki::DEFAULT_TOKEN_TTL,
        std::time::SystemTime::now(),
        false,
    )?;
    let agent_dir = dir.join(format!("agent-{name}"));
    relay_agent::pair(&agent_dir, &token.encode(), &Default::default(), crate::transport::pairing()).await?;
    Ok(agent_dir)
}

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The edge.
    pub edge: PathBuf,
    /// The agent.
    pub agent: PathBuf,
}

/// An edge process.
#[derive(Debug)]
pub struct EdgeProc {
    /// The process.
    pub proc: Proc,
    /// Public listener.
    pub public: SocketAddr,
    /// Tunnel listener.
    pub tunnel: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
}

impl EdgeProc {
    /// Runs `relay-edge run` on `state_dir` with `args` added, and waits until it listens.
    pub async fn start(bins: &Binaries, wrapper: &[&str], state_dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut all: Vec<OsString> = vec!["run".into(), "--state-dir".into(), state_dir.into()];
        let has = |flag: &str| args.contains(&flag);
        for (flag, default) in
            [("--listen", "127.0.0.1:0"), ("--tunnel-listen", "127.0.0.1:0"), ("--admin-listen", "127.0.0.1:0")]
        {
            if !has(flag) {
                all.extend([flag.into(), default.into()]);
            }
        }
        all.extend(args.iter().map(OsString::from));
        let proc = Proc::spawn("edge", wrapper, &bins.edge, &all)?;
        let Some(line) = proc.wait_line("edge listening", PROC_DEADLINE).await else {
            anyhow::bail!("the edge did not start:\n{}", proc.log());
        };
        let addr = |key| -> anyhow::Result<SocketAddr> {
            log_field(&line, key).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("no {key} in {line:?}"))
        };
        Ok(Self { public: addr("public_addr")?, tunnel: addr("tunnel_addr")?, admin: addr("admin")?, proc })
    }

    /// The number of agent connections the edge reports on `/metrics` (updated every second).
    pub async fn agents_connected(&self) -> u64 {
        self.agents_connected_over("quic").await + self.agents_connected_over("tcp").await
    }

    /// The number of agent connections over `transport` (`quic` or `tcp`) the edge reports.
    pub async fn agents_connected_over(&self, transport: &str) -> u64 {
        let name = format!("relay_edge_agents_connected{{transport=\"{transport}\"}}");
        metric(self.admin, &name).await.unwrap_or(0.0) as u64
    }
}

/// An agent process.
#[derive(Debug)]
pub struct AgentProc {
    /// The process.
    pub proc: Proc,
    /// Admin listener.
    pub admin: SocketAddr,
}

impl AgentProc {
    /// Runs `relay-agent run` from a paired `state_dir`, forwarding to `upstream`, dialling
    /// `edges`, with `args` added. The transport is QUIC unless `args` chooses one: most fault
    /// tests are about how QUIC survives a bad link, which `auto` would sidestep over TCP.
    pub async fn start(
        bins: &Binaries,
        wrapper: &[&str],
        state_dir: &Path,
        upstream: &str,
        edges: &[String],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut all: Vec<OsString> = vec![
            "run".into(),
            "--state-dir".into(),
            state_dir.into(),
            "--upstream".into(),
            upstream.into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
        ];
        for edge in edges {
            all.extend(["--edge".into(), edge.into()]);
        }
        if !args.contains(&"--transport") {
            all.extend(["--transport".into(), "quic".into()]);
        }
        all.extend(args.iter().map(OsString::from));
        let proc = Proc::spawn("agent", wrapper, &bins.agent, &all)?;
        let Some(line) = proc.wait_line("agent starting", PROC_DEADLINE).await else {
            anyhow::bail!("the agent did not start:\n{}", proc.log());
        };
        let admin = log_field(&line, "admin")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no admin address in {line:?}"))?;
        Ok(Self { proc, admin })
    }

    /// The agent's welcomed connections, from its `/metrics`.
    pub async fn connections(&self) -> u64 {
        self.connections_over("quic").await + self.connections_over("tcp").await
    }

    /// The agent's welcomed connections over `transport` (`quic` or `tcp`).
    pub async fn connections_over(&self, transport: &str) -> u64 {
        let name = format!("relay_agent_connected{{transport=\"{transport}\"}}");
        metric(self.admin, &name).await.unwrap_or(0.0) as u64
    }
}

/// Reads one sample (`name` including any labels) from the Prometheus text at `admin`.
pub async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut req = http::Request::new(crate::client::full(""));
    *req.uri_mut() = "/metrics".parse().ok()?;
    req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("admin"));
    let response = send_collect(admin, req).await.ok()?;
    let text = String::from_utf8_lossy(response.body()).into_owned();
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_a_line_from_a_process_that_exited_ends_when_its_output_does() {
        let args = ["-c", "echo started; exit 2"].map(OsString::from);
        let mut proc = Proc::spawn("sh", &[], Path::new("sh"), &args).unwrap();
        assert_eq!(proc.wait_line("started", PROC_DEADLINE).await.as_deref(), Some("started"));
        let waited = std::time::Instant::now();
        assert_eq!(proc.wait_line("never printed", PROC_DEADLINE).await, None);
        assert!(waited.elapsed() < PROC_DEADLINE / 2, "not the whole deadline: {:?}", waited.elapsed());
        assert!(proc.output_ended());
        assert_eq!(proc.wait_exit(PROC_DEADLINE).await.and_then(|s| s.code()), Some(2));
    }
}
