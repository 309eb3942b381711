//! relay-agent: the private half of acs-relay.
//!
//! The agent runs next to the bot. It dials *out* to the edge over mutually authenticated QUIC,
//! or TLS over TCP where UDP cannot pass (so the bot's network accepts no inbound connection),
//! accepts one stream per exchange, and forwards each to the bot on localhost. [`pair`] enrolls it with a one-time token;
//! [`Agent::start`] runs it. The binary only parses configuration and calls these.

mod backoff;
pub mod cli;
mod commands;
pub mod config;
mod control;
mod forward;
pub mod inspect;
mod link;
pub mod metrics;
mod observe;
pub mod pairing;
mod record;
mod replicas;
mod tunnel;

use std::sync::Arc;

use relay_runtime::admin::AdminListener;

use relay_pki::{AgentState, AgentStateError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{AgentConfig, AgentSettings, ConfigError, IdentitySource, TransportChoice};
pub use pairing::{PairError, PairTransport, Paired, pair};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory holds no usable pairing.
    #[error(transparent)]
    State(#[from] AgentStateError),
    /// The call recording directory could not be made.
    #[error("cannot use {} for call recordings: {source}", path.display())]
    RecordDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The admin listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    shutdown: CancellationToken,
    tasks: TaskTracker,
    connected: watch::Receiver<usize>,
    /// How many edges have confirmed the drain.
    drain_acks: watch::Receiver<usize>,
    name: String,
    admin_addr: Option<std::net::SocketAddr>,
    draining: CancellationToken,
    exchanges: TaskTracker,
    metrics: Arc<metrics::AgentMetrics>,
}

impl Agent {
    /// Loads the pairing from the state directory and starts keeping a tunnel to the edge.
    pub async fn start(settings: AgentSettings) -> Result<Self, StartError> {
        let (identity, state_dir) = match &settings.identity {
            IdentitySource::StateDir(dir) => (AgentState::load(dir)?, Some(dir.clone())),
            IdentitySource::Bundle(pem) => (AgentState::from_bundle(pem)?, None),
        };
        let edges = if settings.edges.is_empty() { vec![identity.edge_addr.clone()] } else { settings.edges.clone() };
        let name = identity.name.clone();
        let settings = Arc::new(settings);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let draining = CancellationToken::new();
        let exchanges = TaskTracker::new();
        let (connected_tx, connected) = watch::channel(0);
        let (drain_acks_tx, drain_acks) = watch::channel(0);
        let metrics = Arc::new(metrics::AgentMetrics::default());
        if let Some(dir) = &settings.inspect.record_dir {
            record::make_dir(dir).map_err(|source| StartError::RecordDir { path: dir.clone(), source })?;
        }
        let observer = Arc::new(observe::Observer::new(
            &settings.inspect,
            &name,
            settings.upstream.to_string().trim_end_matches('/').to_owned(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let admin_addr = match settings.admin_listen {
            Some(addr) => {
                let admin =
                    AdminListener::bind(addr).await.map_err(|e| StartError::Listen { addr, source: e.source })?;
                let bound = admin.addr();
                let text_metrics = metrics.clone();
                // Ready while at least one edge replica has welcomed us and no drain started.
                let (ready_connected, ready_draining) = (connected.clone(), draining.clone());
                let ready = move || !ready_draining.is_cancelled() && *ready_connected.borrow() > 0;
                if settings.inspect.enabled && !bound.ip().is_loopback() {
                    tracing::warn!(
                        admin = %bound,
                        "inspection is on and the admin listener is not on loopback: whoever reaches it can read callbacks and record calls"
                    );
                }
                let routes = observer.routes();
                tasks.spawn(admin.serve_with(move || text_metrics.encode(), ready, routes, shutdown.clone()));
                Some(bound)
            }
            None => None,
        };
        let client = Arc::new(tunnel::TunnelClient {
            forwarder: Arc::new(forward::Forwarder::new(settings.clone(), metrics.clone(), observer)),
            metrics: metrics.clone(),
            state_dir,
            settings,
            identity: std::sync::RwLock::new(identity),
            edges: edges.clone(),
            shutdown: shutdown.clone(),
            draining: draining.clone(),
            exchanges: exchanges.clone(),
            connected: connected_tx,
            drain_acks: drain_acks_tx,
            renew_lock: tokio::sync::Mutex::new(()),
            instance: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            held: Default::default(),
        });
        tracing::info!(agent = %name, edges = ?edges, admin = ?admin_addr, "agent starting");
        tasks.spawn(replicas::run(client));
        Ok(Self { shutdown, tasks, connected, drain_acks, name, admin_addr, draining, exchanges, metrics })
    }

    /// The agent's name from its certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin (metrics) listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_addr
    }

    /// Whether the agent holds a welcomed connection to at least one edge replica now.
    pub fn is_connected(&self) -> bool {
        self.connections() > 0
    }

    /// The agent's metrics in the Prometheus text format, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// How many welcomed connections the agent holds now (one per edge replica).
    pub fn connections(&self) -> usize {
        *self.connected.borrow()
    }

    /// Closes the tunnel at once and waits for every task to end; open calls get 1001.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.exchanges.close();
        self.exchanges.wait().await;
    }

    /// Leaves gracefully: tells the edge to send nothing new, lets in-flight webhooks finish and
    /// open calls run for up to `grace`, then closes whatever is left (calls get 1001 on both
    /// sides) and returns.
    pub async fn drain(self, grace: std::time::Duration) {
        self.draining.cancel();
        // Every edge confirms before anything closes, so none sends a new exchange into a
        // connection about to go (bounded: an edge that does not answer is given up on).
        let (mut acks, mut connected) = (self.drain_acks.clone(), self.connected.clone());
        let _ = tokio::time::timeout(control::DRAIN_NOTICE_TIMEOUT, async {
            while *acks.borrow_and_update() < *connected.borrow_and_update() {
                tokio::select! {
                    changed = acks.changed() => if changed.is_err() { break },
                    changed = connected.changed() => if changed.is_err() { break },
                }
            }
        })
        .await;
        self.exchanges.close();
        if tokio::time::timeout(grace, self.exchanges.wait()).await.is_err() {
            tracing::info!("drain grace period over: closing the remaining calls");
        }
        self.shutdown().await;
    }
}
