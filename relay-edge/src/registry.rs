//! Keeps the running edge in step with its state directory, which the CLI changes under it:
//! closes connections of agents that were revoked (or whose certificate expired or was replaced)
//! within [`REGISTRY_POLL_INTERVAL`], publishes the status file, and renews the edge's own tunnel
//! certificate when it is due.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use relay_pki::EdgeState;
use relay_proto::code;
use relay_transport::{Transport, TunnelListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agents::AgentSet;
use crate::metrics::{EdgeMetrics, TransportLabels};
use crate::status::{ConnectionStatus, EdgeStatus, STATUS_HEARTBEAT, host_name, unix_now};

/// How often agent records are re-read. A revocation takes effect within this (the operator is
/// promised two seconds); reading a few small files a second costs nothing.
pub const REGISTRY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How often the edge checks whether its own certificate is due for renewal. It lives a year
/// and is renewed with a third of it left, so hourly is plenty.
const EDGE_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

pub(crate) struct Registry {
    pub affinity: Arc<crate::affinity::AffinityTable>,
    pub affinity_ttl: Duration,
    pub state: Arc<EdgeState>,
    pub agents: Arc<AgentSet>,
    pub metrics: Arc<EdgeMetrics>,
    pub listener: Arc<TunnelListener>,
    pub shutdown: CancellationToken,
}

impl Registry {
    pub async fn run(self) {
        let mut last_status: Option<Vec<ConnectionStatus>> = None;
        let mut last_written = Instant::now();
        let mut last_cert_check: Option<Instant> = None;
        let mut tick = tokio::time::interval(REGISTRY_POLL_INTERVAL);
        let replica = host_name();
        let tunnel_port = self.listener.quic_addr().map_or(0, |a| a.port());
        // Files left by edges that crashed (replicas share the directory, so only stale ones).
        EdgeStatus::read_live(self.state.dir(), SystemTime::now(), true);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let state = self.state.clone();
            let agents = self.agents.clone();
            let check_cert = last_cert_check.is_none_or(|at| at.elapsed() >= EDGE_CERT_CHECK_INTERVAL);
            if check_cert {
                last_cert_check = Some(Instant::now());
            }
            // File reads and signing stay off the async workers.
            let outcome = tokio::task::spawn_blocking(move || {
                enforce_records(&state, &agents);
                check_cert.then(|| {
                    state
                        .renew_edge_cert_if_due(SystemTime::now())
                        .and_then(|renewed| renewed.then(|| state.tls_material()).transpose())
                })
            })
            .await;
            match outcome {
                Ok(Some(Ok(Some(material)))) => match self.listener.set_certificate(&material) {
                    Ok(()) => info!("edge tunnel certificate renewed; new connections use it"),
                    Err(e) => warn!("renewed edge certificate could not be loaded: {e}"),
                },
                Ok(Some(Err(e))) => warn!("edge certificate renewal failed: {e}"),
                Ok(_) => {}
                Err(e) => warn!("registry check failed: {e}"),
            }
            self.affinity.expire(self.affinity_ttl, Instant::now());
            let connections = connection_status(&self.agents);
            for transport in [Transport::Quic, Transport::Tcp] {
                let count = connections.iter().filter(|c| c.transport == transport.as_str()).count();
                self.metrics
                    .agents_connected
                    .get_or_create(&TransportLabels { transport: transport.as_str().into() })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            if last_status.as_ref() != Some(&connections) || last_written.elapsed() >= STATUS_HEARTBEAT {
                let status = EdgeStatus {
                    replica: replica.clone(),
                    pid: std::process::id(),
                    tunnel_port,
                    updated_at_unix: unix_now(),
                    connections: connections.clone(),
                };
                if let Err(e) = status.write(self.state.dir()) {
                    warn!("cannot write the status file: {e}");
                }
                last_status = Some(connections);
                last_written = Instant::now();
            }
        }
        let mine =
            EdgeStatus { replica, pid: std::process::id(), tunnel_port, updated_at_unix: 0, connections: Vec::new() };
        mine.remove(self.state.dir());
    }
}

/// Every live connection, as the status file reports it.
pub(crate) fn connection_status(agents: &AgentSet) -> Vec<ConnectionStatus> {
    agents
        .snapshot()
        .iter()
        .map(|a| ConnectionStatus {
            agent: a.name.clone(),
            remote: a.remote.to_string(),
            transport: a.conn.transport().to_owned(),
            serial: a.serial(),
            connected_at_unix: a.connected_at_unix,
        })
        .collect()
}

/// Closes every connection whose agent may no longer connect.
fn enforce_records(state: &EdgeState, agents: &AgentSet) {
    let now = SystemTime::now();
    for agent in agents.snapshot() {
        if let Err(refusal) = state.check_agent(&agent.name, &agent.serial(), now) {
            warn!(agent = %agent.name, remote = %agent.remote, "closing agent connection: {refusal}");
            agent.conn.close(code::REVOKED, &refusal.to_string());
            agents.remove(agent.id);
        }
    }
}
