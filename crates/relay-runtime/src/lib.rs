//! The process runtime both acs-relay binaries share: the command-line entry (arguments parsed
//! with clap, every error one line on stderr with a non-zero exit), logging from `RUST_LOG`,
//! process life for `run` (open-file limit, signal handlers, start, drain on SIGTERM, see
//! [`serve_until_signalled`]), layered configuration ([`config`]) and the admin listener
//! ([`admin`]). Binaries stay thin: parse, build the pieces, run.

pub mod admin;
pub mod config;

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;

/// Flattens a clap error to one line: the message and any detail lines, without usage help.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .map(|line| line.trim_start_matches("error: "))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `C` from the process's arguments, prepares the command with `prepare` (for `run`:
/// reads the configuration, which sizes the runtime), runs it with `run` on a runtime of as many
/// worker threads as `prepare` asked for, and turns the outcome into an exit code. `--help` and
/// `--version` print as usual and exit 0; usage errors exit 2; failures exit 1.
pub fn main<C, W, P, F, Fut>(program: &str, prepare: P, run: F) -> ExitCode
where
    C: Parser,
    P: FnOnce(C) -> anyhow::Result<(Workers, W)>,
    F: FnOnce(W) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    main_from(program, std::env::args_os(), prepare, run)
}

/// How many threads run a process's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One per CPU the process may use (its CPU set and cgroup quota, as tokio reads them).
    PerCpu,
    /// This many (at least one).
    Exactly(usize),
}

impl Workers {
    /// The setting's value as written: `0` is one per CPU.
    pub fn from_setting(threads: usize) -> Self {
        if threads == 0 { Self::PerCpu } else { Self::Exactly(threads) }
    }

    fn runtime(self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Self::Exactly(threads) = self {
            builder.worker_threads(threads.max(1));
        }
        builder.enable_all().build()
    }
}

/// A command line ready to run: the long-running service with its settings read (they size the
/// runtime), or a one-shot command.
#[derive(Debug)]
pub enum Prepared<S, C> {
    /// `run`, configured.
    Serve(Box<S>),
    /// Any other command.
    Once(C),
}

impl<S, C> Prepared<S, C> {
    /// The service with `settings`, on `worker_threads` threads (0: one per CPU).
    pub fn serve(settings: S, worker_threads: usize) -> (Workers, Self) {
        (Workers::from_setting(worker_threads), Self::Serve(Box::new(settings)))
    }

    /// A one-shot command: it does one thing at a time, on one thread.
    pub fn once(command: C) -> (Workers, Self) {
        (Workers::Exactly(1), Self::Once(command))
    }

    /// Runs the service with `serve`, or the command with `once`.
    pub async fn run<Fs, Fo>(self, serve: impl FnOnce(S) -> Fs, once: impl FnOnce(C) -> Fo) -> anyhow::Result<()>
    where
        Fs: Future<Output = anyhow::Result<()>>,
        Fo: Future<Output = anyhow::Result<()>>,
    {
        match self {
            Self::Serve(settings) => serve(*settings).await,
            Self::Once(command) => once(command).await,
        }
    }
}

/// [`main`] with the arguments given (the first one names the program), for a binary that
/// embeds another's command line, as `relay-bench` embeds the edge's and the agent's.
pub fn main_from<C, W, P, F, Fut, I, T>(program: &str, args: I, prepare: P, run: F) -> ExitCode
where
    C: Parser,
    P: FnOnce(C) -> anyhow::Result<(Workers, W)>,
    F: FnOnce(W) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match C::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{program}: {} (see --help)", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let outcome = prepare(cli).and_then(|(workers, prepared)| {
        let runtime = workers.runtime().map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
        runtime.block_on(run(prepared))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // The project's errors carry their cause in their own message, so print only the top
        // one: `{:#}` would repeat each cause once more.
        Err(e) => {
            eprintln!("{program}: {}", e.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: container log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Runs a service for the life of the process: raises the open-file limit (every call is a
/// socket or two), installs the signal handlers before anything starts (a SIGTERM during
/// start-up is then a drain, not the default death), starts the service with `start`, and on
/// SIGTERM or SIGINT lets `drain` finish it within `grace`. A start-up error is returned as is,
/// and stays the only line printed.
pub async fn serve_until_signalled<S, E, Fd>(
    start: impl Future<Output = Result<S, E>>,
    grace: std::time::Duration,
    drain: impl FnOnce(S, std::time::Duration) -> Fd,
) -> Result<(), E>
where
    Fd: Future<Output = ()>,
{
    let open_files = raise_open_file_limit();
    let signalled = shutdown_signal();
    let service = start.await?;
    open_files.log();
    signalled.await;
    tracing::info!(grace_s = grace.as_secs(), "draining: not ready, finishing in-flight exchanges");
    drain(service, grace).await;
    Ok(())
}

/// Resolves on SIGTERM (what container platforms send) or SIGINT. The handlers are installed
/// when this is called, not when it is first awaited: call it before starting the service, so a
/// signal that arrives while it starts is a clean shutdown rather than the default (death).
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// The open-file limit after [`raise_open_file_limit`]: what the process may hold.
#[derive(Debug)]
pub struct OpenFileLimit {
    /// The soft limit before start-up (`None`: unlimited).
    pub was: Option<u64>,
    /// The soft limit now (`None`: unlimited).
    pub now: Option<u64>,
    /// Why raising it failed, if it did.
    pub refused: Option<std::io::Error>,
}

/// Raises the process's open-file soft limit to its hard limit. Every client connection, tunnel
/// connection and bot connection is a file descriptor; the soft limit many hosts start processes
/// with (1,024) is far below what a relay serving a thousand calls holds, and running out stops
/// the listener accepting anything at all. Log the outcome with [`OpenFileLimit::log`] once the
/// service has started (so a start-up error stays the only line printed).
pub fn raise_open_file_limit() -> OpenFileLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let was = limit.current;
    let refused = if limit.current != limit.maximum {
        setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum }).err().map(Into::into)
    } else {
        None
    };
    OpenFileLimit { was, now: getrlimit(Resource::Nofile).current, refused }
}

impl OpenFileLimit {
    /// Logs the limit in force and what it was.
    pub fn log(&self) {
        let text = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        match &self.refused {
            None => tracing::info!(open_file_limit = %text(self.now), was = %text(self.was), "open-file limit"),
            Some(e) => tracing::warn!(open_file_limit = %text(self.now), "open-file limit: cannot raise it: {e}"),
        }
    }
}

/// The process's open-file soft limit now (`None`: unlimited).
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_count_builds_that_many_workers_and_zero_one_per_cpu() {
        assert_eq!(Workers::from_setting(0), Workers::PerCpu);
        let runtime = Workers::from_setting(3).runtime().unwrap();
        assert_eq!(runtime.metrics().num_workers(), 3);
        let per_cpu = Workers::PerCpu.runtime().unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(per_cpu.metrics().num_workers(), cpus);
    }
}
