//! A real edge, paired agents and a bot, in one process, on loopback ports from the OS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use relay_agent::{Agent, AgentSettings, TransportChoice};
use relay_edge::{Edge, EdgeSettings};
use relay_pki::{DEFAULT_TOKEN_TTL, EdgeState};

use crate::bot::EchoBot;
use crate::wait::eventually;

/// How long tests wait for an agent to connect: a loopback handshake takes milliseconds, but
/// debug builds on a loaded 2-core CI machine are slow.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    /// Holds every state directory; removed on drop.
    pub dir: tempfile::TempDir,
    /// The edge.
    pub edge: Edge,
    /// The bot agents forward to.
    pub bot: EchoBot,
    /// Settings the edge was started with (to restart it identically).
    pub edge_settings: EdgeSettings,
    agents: Vec<Agent>,
}

impl Stack {
    /// Inits an edge state directory, starts the edge and the bot; no agent yet.
    pub async fn start_without_agent(tweak: impl FnOnce(&mut EdgeSettings)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let state_dir = dir.path().join("edge");
        EdgeState::init(&state_dir, &[], SystemTime::now())?;
        let mut edge_settings = EdgeSettings::new(state_dir, loopback(), loopback());
        tweak(&mut edge_settings);
        let edge = Edge::start(edge_settings.clone()).await?;
        let bot = EchoBot::start().await?;
        Ok(Self { dir, edge, bot, edge_settings, agents: Vec::new() })
    }

    /// A stack with one paired, connected agent (`agent-1`) and default edge settings.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// A stack with one paired, connected agent and edge settings adjusted by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut EdgeSettings)) -> anyhow::Result<Self> {
        let mut stack = Self::start_without_agent(tweak).await?;
        let state = stack.pair_agent("agent-1").await?;
        stack.start_agent(&state).await?;
        stack.wait_connected(1).await?;
        Ok(stack)
    }

    /// Issues a token for `name` and pairs a new agent state directory with it over the wire.
    pub async fn pair_agent(&self, name: &str) -> anyhow::Result<PathBuf> {
        let token = self.token(name)?;
        let state_dir = self.dir.path().join(format!("agent-{name}"));
        relay_agent::pair(&state_dir, &token, &Default::default(), crate::transport::pairing()).await?;
        Ok(state_dir)
    }

    /// A fresh pairing token for `name`, pointing at this edge's tunnel.
    pub fn token(&self, name: &str) -> anyhow::Result<String> {
        let state = EdgeState::open(&self.edge_settings.state_dir)?;
        let token = state.create_token(
            name,
            &self.edge.tunnel_addr().to_string(),
            DEFAULT_TOKEN_TTL,
            SystemTime::now(),
            false,
        )?;
        Ok(token.encode())
    }

    /// Dials this edge's tunnel by hand with the identity stored in `state_dir`, as a test that
    /// plays the agent itself would, over the test's transport.
    pub async fn dial_as(
        &self,
        state_dir: &std::path::Path,
    ) -> anyhow::Result<Result<std::sync::Arc<dyn relay_transport::TunnelConnection>, relay_transport::DialError>> {
        let id = relay_pki::AgentState::load(state_dir)?;
        let settings = relay_transport::TunnelSettings::default();
        Ok(relay_transport::dial_tunnel(
            crate::transport::current(),
            self.edge.tunnel_addr(),
            "localhost",
            &id.tls(),
            &settings,
        )
        .await)
    }

    /// Agent settings for a paired state directory, forwarding to this stack's bot.
    pub fn agent_settings(&self, state_dir: &std::path::Path) -> anyhow::Result<AgentSettings> {
        let mut settings =
            AgentSettings::new(state_dir.to_owned(), relay_agent::config::parse_upstream(&self.bot.url())?);
        // Tests restart edges on new ports; always dial the current one.
        settings.edges = vec![self.edge.tunnel_addr().to_string()];
        settings.transport = TransportChoice::Only(crate::transport::current());
        Ok(settings)
    }

    /// Starts an agent from a paired state directory.
    pub async fn start_agent(&mut self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        let settings = self.agent_settings(state_dir)?;
        self.agents.push(Agent::start(settings).await?);
        Ok(())
    }

    /// The agents this stack started, in order.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// Stops every agent this stack started.
    pub async fn stop_agents(&mut self) {
        for agent in self.agents.drain(..) {
            agent.shutdown().await;
        }
    }

    /// Waits until `count` agent connections are registered at the edge.
    pub async fn wait_connected(&self, count: usize) -> anyhow::Result<()> {
        if eventually(CONNECT_DEADLINE, || async { self.edge.connected_agents().len() == count }).await {
            Ok(())
        } else {
            anyhow::bail!("expected {count} connected agents, have {:?}", self.edge.connected_agents())
        }
    }

    /// The edge's public address.
    pub fn public(&self) -> SocketAddr {
        self.edge.public_addr()
    }

    /// Stops the edge and starts it again from the same state directory on the same ports, as
    /// an operator's restart would; agents are left to reconnect on their own.
    pub async fn restart_edge(self) -> anyhow::Result<Self> {
        let Stack { dir, edge, bot, mut edge_settings, agents } = self;
        edge_settings.listen = edge.public_addr();
        edge_settings.tunnel_listen = edge.tunnel_addr();
        edge.shutdown().await;
        // quinn releases the UDP socket from its driver task shortly after the last handle goes;
        // retry the bind briefly, as a restarted process would simply find the port free.
        let deadline = std::time::Instant::now() + CONNECT_DEADLINE;
        let edge = loop {
            match Edge::start(edge_settings.clone()).await {
                Ok(edge) => break edge,
                Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("in use") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Stack { dir, edge, bot, edge_settings, agents })
    }

    /// Shuts everything down.
    pub async fn shutdown(mut self) {
        self.stop_agents().await;
        self.edge.shutdown().await;
    }
}
