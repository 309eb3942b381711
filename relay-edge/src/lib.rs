//! relay-edge: the public half of acs-relay.
//!
//! The edge accepts ACS webhooks and media WebSockets on its public listener, answers what it
//! can itself (probes, unknown routes, oversized bodies, no agent), and sends every other
//! exchange down a mutually authenticated tunnel (QUIC, or TLS over TCP where UDP cannot pass)
//! that an agent dialled out to it. It also serves pairing on the tunnel port. [`Edge::start`]
//! builds and runs all of it; the binary only parses configuration and calls it.

/// The tracing target of the access log: one line per relayed webhook and per media session.
/// An operator who has the same figures from metrics, or a load test, can turn it off alone
/// (`RUST_LOG=info,relay_edge::access=off`); at 15,000 webhooks a second it was ~8% of the
/// edge's CPU.
pub const ACCESS_LOG: &str = "relay_edge::access";

pub mod admission;
pub mod affinity;
pub mod agents;
mod answer;
pub mod calls;
pub mod cli;
pub mod config;
mod forward;
pub mod listing;
pub mod metrics;
mod pairing_limit;
mod public;
mod registry;
mod relay;
pub mod routes;
pub mod status;
mod tunnel;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use relay_pki::{EdgeState, EdgeStateError};
use relay_runtime::admin::AdminListener;
use relay_transport::{DialError, TunnelListener};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, EdgeConfig, EdgeSettings};

use crate::agents::AgentSet;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory is missing, unreadable or corrupt.
    #[error(transparent)]
    State(#[from] EdgeStateError),
    /// The public listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The ACS key client could not be built.
    #[error("cannot set up the ACS key client: {0}")]
    Keys(String),
    /// No route authenticates its callers and the public listener is not loopback, and the
    /// operator did not opt in with `allow_unauthenticated` (protected mode).
    #[error(
        "refusing to start: no route has an authenticating check (acs-jwt, shared-secret, source-ip, or event-grid with Entra ID) and {listen} is not a loopback address, so anyone could reach the bot; add checks to the routes (see the README's Security section) or set allow_unauthenticated = true (--allow-unauthenticated, RELAY_EDGE_ALLOW_UNAUTHENTICATED=true)"
    )]
    Unprotected {
        /// The public listener's address.
        listen: SocketAddr,
    },
    /// The tunnel listener could not bind or its TLS setup failed.
    #[error("cannot listen for tunnels on {addr}: {source}")]
    Tunnel {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: DialError,
    },
}

/// Protected mode, as Redis has it: an edge on which no route authenticates its callers refuses
/// to start on a non-loopback listener unless the operator opted in
/// ([`EdgeSettings::allow_unauthenticated`]).
pub fn protected_mode(settings: &EdgeSettings) -> Result<(), StartError> {
    let admission = &settings.admission;
    // No routes relay nothing: all of it is 404 at the edge.
    let nobody_authenticated =
        !settings.routes.is_empty() && settings.routes.iter().all(|route| !admission.route_authenticates(&route.auth));
    if nobody_authenticated && !settings.listen.ip().is_loopback() && !settings.allow_unauthenticated {
        return Err(StartError::Unprotected { listen: settings.listen });
    }
    Ok(())
}

/// Names, in a warning each, the routes that authenticate nobody, and says so once more when
/// that is every route.
fn warn_open_routes(settings: &EdgeSettings) {
    let admission = &settings.admission;
    let mut open = 0;
    for route in settings.routes.iter().filter(|route| !admission.route_authenticates(&route.auth)) {
        open += 1;
        if route.auth.is_empty() {
            tracing::warn!(route = %route.name, "route has no check: anyone who reaches the edge reaches the bot here");
        } else {
            let checks: Vec<&str> = route.auth.iter().map(|c| c.name()).collect();
            tracing::warn!(
                route = %route.name,
                checks = %checks.join(","),
                "route's checks authenticate nobody (event-grid without Entra ID checks only a header anyone can send): add acs-jwt, shared-secret, source-ip or Entra ID"
            );
        }
    }
    if open > 0 && open == settings.routes.len() {
        tracing::warn!(
            listen = %settings.listen,
            "no route authenticates its callers: the edge relays anything from anyone who can reach it"
        );
    }
}

/// A running edge.
#[derive(Debug)]
pub struct Edge {
    public_addr: SocketAddr,
    tunnel_addr: SocketAddr,
    tunnel_tcp_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    agents: Arc<AgentSet>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    draining: CancellationToken,
}

/// Every listener the edge serves, bound before anything starts, so a taken port is a start-up
/// error naming it.
struct Listeners {
    tunnel: Arc<TunnelListener>,
    tunnel_addr: SocketAddr,
    tunnel_tcp_addr: Option<SocketAddr>,
    public: TcpListener,
    public_addr: SocketAddr,
    admin: Option<AdminListener>,
}

impl Listeners {
    async fn bind(settings: &EdgeSettings, tls: &relay_pki::TlsIdentity) -> Result<Self, StartError> {
        let tunnel = TunnelListener::bind(settings.tunnel_listen, settings.tunnel_tcp_listen, tls, &settings.tunnel)
            .map_err(|source| StartError::Tunnel { addr: settings.tunnel_listen, source })?;
        let tunnel_addr =
            tunnel.quic_addr().map_err(|source| StartError::Listen { addr: settings.tunnel_listen, source })?;
        let listen_error = |source| StartError::Listen { addr: settings.listen, source };
        let public = TcpListener::bind(settings.listen).await.map_err(listen_error)?;
        let public_addr = public.local_addr().map_err(listen_error)?;
        let admin = match settings.admin_listen {
            Some(addr) => {
                Some(AdminListener::bind(addr).await.map_err(|e| StartError::Listen { addr, source: e.source })?)
            }
            None => None,
        };
        let tunnel_tcp_addr = tunnel.tcp_addr();
        Ok(Self { tunnel: Arc::new(tunnel), tunnel_addr, tunnel_tcp_addr, public, public_addr, admin })
    }
}

impl Edge {
    /// Opens the state directory, binds both listeners and starts serving. Refuses to start an
    /// edge that would relay anything from anyone to a non-loopback listener unless the settings
    /// opt in ([`EdgeSettings::allow_unauthenticated`]).
    pub async fn start(settings: EdgeSettings) -> Result<Self, StartError> {
        protected_mode(&settings)?;
        let state = Arc::new(EdgeState::open(&settings.state_dir)?);
        let Listeners { tunnel: listener, tunnel_addr, tunnel_tcp_addr, public, public_addr, admin } =
            Listeners::bind(&settings, &state.tls_material()?).await?;
        let admin_addr = admin.as_ref().map(AdminListener::addr);
        let metrics = Arc::new(metrics::EdgeMetrics::default());
        let verifiers = admission::Verifiers::load(&settings.admission).await.map_err(StartError::Keys)?;
        let settings = Arc::new(settings);
        // Random per start: agents behind a load balancer tell this replica from its siblings.
        let instance = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let agents = Arc::new(AgentSet::default());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let affinity_table = Arc::new(affinity::AffinityTable::default());
        let registry = registry::Registry {
            affinity: affinity_table.clone(),
            affinity_ttl: settings.affinity_ttl,
            state: state.clone(),
            agents: agents.clone(),
            metrics: metrics.clone(),
            listener: listener.clone(),
            shutdown: shutdown.clone(),
        };
        let tunnel = Arc::new(tunnel::TunnelService {
            settings: settings.clone(),
            state,
            agents: agents.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            listener,
            pairing_failures: Default::default(),
            instance: instance.clone(),
            refusal_log: relay_transport::LogThrottle::default(),
            metrics: metrics.clone(),
        });
        let rate_limit = settings.rate_limit_per_source.map(relay_guard::rate_limit::SourceRateLimiter::new);
        let draining = CancellationToken::new();
        let connections = Arc::new(relay_guard::conn_limit::ConnectionLimits::new(
            settings.max_connections,
            settings.max_connections_per_source,
            settings.admission.trusted_proxies.clone(),
            relay_runtime::open_file_limit(),
        ));
        let max_connections = connections.max_total();
        let open_calls = Arc::new(calls::OpenCalls::default());
        let relay = Arc::new(relay::Relay {
            settings,
            agents: agents.clone(),
            affinity: affinity_table,
            metrics: metrics.clone(),
            tasks: tasks.clone(),
            calls: open_calls.clone(),
        });
        let front = Arc::new(public::PublicService {
            relay,
            connections,
            rate_limit,
            draining: draining.clone(),
            verifiers,
            next_request_id: AtomicU64::new(1),
            shutdown: shutdown.clone(),
        });
        tasks.spawn(tunnel.run());
        tasks.spawn(registry.run());
        if let Some(admin) = admin {
            // The same answer as the public `/readyz`: an agent to send to, and not draining.
            let (ready_agents, ready_draining) = (agents.clone(), draining.clone());
            let ready = move || !ready_draining.is_cancelled() && ready_agents.ready();
            let list: relay_runtime::admin::Route =
                Arc::new(move |asked: relay_runtime::admin::RouteRequest<'_>| match asked.rest {
                    "" => relay_runtime::admin::RouteAnswer::Json(open_calls.json()),
                    _ => relay_runtime::admin::RouteAnswer::NotFound("no such document".into()),
                });
            let routes = vec![(calls::CALLS_PATH, list)];
            tasks.spawn(admin.serve_with(move || metrics.encode(), ready, routes, shutdown.clone()));
        }
        warn_open_routes(&front.relay.settings);
        tasks.spawn(front.run(public));
        tracing::info!(
            %public_addr,
            %tunnel_addr,
            tunnel_tcp = ?tunnel_tcp_addr,
            admin = ?admin_addr,
            max_connections,
            %instance,
            "edge listening"
        );
        Ok(Self { public_addr, tunnel_addr, tunnel_tcp_addr, admin_addr, agents, shutdown, tasks, draining })
    }

    /// The public listener's address.
    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// The tunnel's QUIC (UDP) address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// The tunnel's TLS/TCP address, unless TCP is off.
    pub fn tunnel_tcp_addr(&self) -> Option<SocketAddr> {
        self.tunnel_tcp_addr
    }

    /// The admin (metrics) listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Names of the agents connected now, one entry per connection.
    pub fn connected_agents(&self) -> Vec<String> {
        self.agents.names()
    }

    /// Live agent connections, as the status file reports them.
    pub fn connections(&self) -> Vec<status::ConnectionStatus> {
        registry::connection_status(&self.agents)
    }

    /// Starts draining: `/readyz` answers 503 at once so load balancers stop sending, and new
    /// requests get 503 with `Retry-After`; exchanges in flight carry on.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Drains (see [`Edge::begin_drain`]), waits up to `grace` for in-flight exchanges to end,
    /// then shuts down; calls still open get 1001.
    pub async fn drain(self, grace: std::time::Duration) {
        self.begin_drain();
        let drained = tokio::time::timeout(grace, self.agents.exchanges_done()).await;
        if drained.is_err() {
            tracing::info!("drain grace period over: closing the remaining exchanges");
        }
        self.shutdown().await;
    }

    /// Stops accepting, closes agent connections and waits for every task to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
