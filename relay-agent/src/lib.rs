//! relay-agent: the private half of acs-relay.
//!
//! The agent runs next to the bot. It dials *out* to the edge over mutually authenticated QUIC
//! (so the bot's network accepts no inbound connection), accepts one stream per exchange, and
//! forwards each to the bot on localhost. [`pair`] enrolls it with a one-time token;
//! [`Agent::start`] runs it. The binary only parses configuration and calls these.

pub mod config;
mod forward;
pub mod metrics;
pub mod pairing;
mod tunnel;

use std::sync::Arc;

use relay_pki::{AgentState, AgentStateError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{AgentConfig, AgentSettings, ConfigError, IdentitySource};
pub use pairing::{PairError, Paired, pair};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory holds no usable pairing.
    #[error(transparent)]
    State(#[from] AgentStateError),
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
    connected: watch::Receiver<bool>,
    name: String,
    admin_addr: Option<std::net::SocketAddr>,
}

impl Agent {
    /// Loads the pairing from the state directory and starts keeping a tunnel to the edge.
    pub async fn start(settings: AgentSettings) -> Result<Self, StartError> {
        let (identity, state_dir) = match &settings.identity {
            IdentitySource::StateDir(dir) => (AgentState::load(dir)?, Some(dir.clone())),
            IdentitySource::Bundle(pem) => (AgentState::from_bundle(pem)?, None),
        };
        let edge_addr = settings.edge.clone().unwrap_or_else(|| identity.edge_addr.clone());
        let name = identity.name.clone();
        let settings = Arc::new(settings);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (connected_tx, connected) = watch::channel(false);
        let metrics = Arc::new(metrics::AgentMetrics::default());
        let admin_addr = match settings.admin_listen {
            Some(addr) => {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
                let bound = listener.local_addr().map_err(|source| StartError::Listen { addr, source })?;
                let text_metrics = metrics.clone();
                let text: relay_cli::admin::MetricsText = Arc::new(move || text_metrics.encode());
                tasks.spawn(relay_cli::admin::serve_metrics(listener, text, shutdown.clone()));
                Some(bound)
            }
            None => None,
        };
        let client = Arc::new(tunnel::TunnelClient {
            forwarder: Arc::new(forward::Forwarder::new(settings.clone(), metrics.clone())),
            metrics,
            state_dir,
            settings,
            identity: std::sync::RwLock::new(identity),
            edge_addr: edge_addr.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            connected: connected_tx,
        });
        tracing::info!(agent = %name, edge = %edge_addr, "agent starting");
        tasks.spawn(client.run());
        Ok(Self { shutdown, tasks, connected, name, admin_addr })
    }

    /// The agent's name from its certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin (metrics) listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_addr
    }

    /// Whether the agent holds a welcomed connection to the edge now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Closes the tunnel and waits for every task to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
