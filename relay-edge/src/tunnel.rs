//! The edge's tunnel listener: authenticates agents, serves pairing, and keeps the agent set
//! current as agents connect and leave.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use relay_pki::{AgentRefusal, EdgeState, RedeemError, RenewError, cert_serial_hex};
use relay_proto::{
    LABEL_AGENT_INSTANCE, LABEL_CONNECTION, LABEL_HOLDS, LABEL_REPLACES, LABEL_REPLACES_CONNECTION, PairRefusal,
    PairResponse, RenewOutcome, code,
};
use relay_transport::{
    HandshakeError, IncomingTunnel, LogThrottle, PeerKind, TunnelConnection, TunnelListener, Verdict,
};
use relay_tunnel::control::{self, AgentRequest, ControlEnd, EdgeControl, Welcome};
use relay_tunnel::pairing;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::agents::{AgentSet, ConnectedAgent, Replaces};
use crate::config::EdgeSettings;
use crate::pairing_limit::FailureLimiter;

/// Longest wait, at shutdown, for closed agent connections to finish draining.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// After answering a pairing request, how long to wait for the agent to read it and close; the
/// connection is closed regardless afterwards.
const PAIRING_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct TunnelService {
    pub settings: Arc<EdgeSettings>,
    pub state: Arc<EdgeState>,
    pub agents: Arc<AgentSet>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub listener: Arc<TunnelListener>,
    pub pairing_failures: std::sync::Mutex<FailureLimiter>,
    /// This edge process's instance id, sent in every welcome.
    pub instance: String,
    /// Refused handshakes and agents, logged once per source or agent, then summarised.
    pub refusal_log: LogThrottle,
    /// Counts refused handshakes (the log summarises them).
    pub metrics: Arc<crate::metrics::EdgeMetrics>,
}

impl TunnelService {
    /// Accepts connections until shutdown.
    pub async fn run(self: Arc<Self>) {
        loop {
            let incoming = tokio::select! {
                () = self.shutdown.cancelled() => break,
                incoming = self.listener.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            let this = self.clone();
            self.tasks.spawn(async move { this.handle(incoming).await });
        }
        self.agents.close_all(code::SHUTDOWN, "edge shutting down");
        self.listener.close(code::SHUTDOWN, "edge shutting down");
        // Bounded: QUIC drains a closed connection within three probe timeouts.
        let _ = tokio::time::timeout(SHUTDOWN_DRAIN, self.listener.wait_idle()).await;
    }

    async fn handle(self: Arc<Self>, incoming: IncomingTunnel) {
        let remote = incoming.remote_addr();
        let transport = incoming.transport();
        let handshake = incoming.handshake().await;
        if handshake.is_err() {
            self.metrics.tunnel_handshakes_refused.inc();
        }
        match handshake {
            Ok((conn, PeerKind::Agent { name, serial })) => self.agent_session(conn, name, serial).await,
            Ok((conn, PeerKind::Pairing)) => self.pairing_session(conn).await,
            // The verifier has logged it with the agent's name and the expiry.
            Err(e @ HandshakeError::CertificateExpired(_)) => {
                debug!(%remote, %transport, "tunnel handshake refused: {e}")
            }
            // Anyone can open a connection to the tunnel port: one line per source, then summaries.
            Err(e) => match self.refusal_log.check(&remote.ip().to_string(), Instant::now()) {
                Verdict::Log => warn!(%remote, %transport, "tunnel handshake refused: {e}"),
                Verdict::Summary(times) => {
                    warn!(source = %remote.ip(), %transport, times, "tunnel handshakes refused from this source: {e}")
                }
                Verdict::Quiet => debug!(%remote, %transport, "tunnel handshake refused: {e}"),
            },
        }
    }

    async fn agent_session(&self, conn: Arc<dyn TunnelConnection>, name: String, serial: String) {
        let remote = conn.remote_addr();
        if let Err(reason) = self.check_agent(&name, &serial, remote).await {
            conn.close(code::UNKNOWN_AGENT, reason);
            return;
        }
        let (mut control, hello) = match control::accept_hello(&conn, self.settings.hello_timeout).await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(agent = %name, %remote, "closing agent connection: {e}");
                return;
            }
        };
        let welcome = Welcome {
            agent_name: name.clone(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            edge_instance: self.instance.clone(),
        };
        if let Err(e) = control.welcome(welcome).await {
            warn!(agent = %name, %remote, "agent left before welcome: {e}");
            return;
        }
        let label = |key: &str| hello.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        // An agent that holds a connection to this instance already is looking for the other
        // replicas behind one address: it closes this one once it has read the welcome, and
        // nothing is routed to it meanwhile.
        let replaces_me = label(LABEL_REPLACES) == Some(self.instance.as_str());
        if !replaces_me && label(LABEL_HOLDS).is_some_and(|held| held.split(',').any(|i| i == self.instance)) {
            debug!(agent = %name, %remote, "agent probe for replicas: it holds this instance already");
            let _ = tokio::time::timeout(self.settings.hello_timeout, conn.closed()).await;
            conn.close(code::OK, "already connected to this edge instance");
            return;
        }
        let ids = (
            label(LABEL_AGENT_INSTANCE).unwrap_or_default().to_owned(),
            label(LABEL_CONNECTION).unwrap_or_default().to_owned(),
        );
        let agent = self.agents.insert(name.clone(), ids, serial, remote, conn.clone());
        let replaces = match (replaces_me, label(LABEL_REPLACES_CONNECTION)) {
            (false, _) => Replaces::Nothing,
            (true, Some(connection)) => Replaces::Connection(connection),
            (true, None) => Replaces::All,
        };
        let retired = self.agents.supersede(&name, agent.id, replaces);
        if retired > 0 {
            info!(agent = %name, %remote, retired, instance = label(LABEL_AGENT_INSTANCE).unwrap_or("-"), "agent reconnected: its older connections take nothing new");
        }
        info!(
            agent = %name,
            %remote,
            transport = conn.transport(),
            version = %hello.software_version,
            protocol = hello.protocol_version,
            "agent connected"
        );
        let reason = self.serve_control(&conn, &mut control, &agent).await;
        self.agents.remove(agent.id);
        info!(agent = %name, %remote, "agent disconnected: {reason}");
    }

    /// Whether the certificate's agent may connect; the reason to close with if not.
    async fn check_agent(&self, name: &str, serial: &str, remote: SocketAddr) -> Result<(), &'static str> {
        let state = self.state.clone();
        let (check_name, check_serial) = (name.to_owned(), serial.to_owned());
        let checked =
            tokio::task::spawn_blocking(move || state.check_agent(&check_name, &check_serial, SystemTime::now()))
                .await
                .unwrap_or_else(|e| Err(AgentRefusal::Corrupt { name: name.to_owned(), reason: e.to_string() }));
        let Err(refusal) = checked else { return Ok(()) };
        // A revoked agent redials for as long as it runs: once, then summaries.
        match self.refusal_log.check(&format!("agent {name}"), Instant::now()) {
            Verdict::Log => warn!(agent = %name, %remote, "refusing agent: {refusal}"),
            Verdict::Summary(times) => warn!(agent = %name, %remote, times, "still refusing agent: {refusal}"),
            Verdict::Quiet => debug!(agent = %name, %remote, "refusing agent: {refusal}"),
        }
        Err(match refusal {
            AgentRefusal::Revoked(_) | AgentRefusal::NotCurrent { .. } => "certificate revoked",
            AgentRefusal::Expired(_) => "certificate expired: pair again",
            _ => "unknown agent",
        })
    }

    /// Answers the agent's drains and renewals until the connection ends; returns why it did.
    async fn serve_control(
        &self,
        conn: &Arc<dyn TunnelConnection>,
        control: &mut EdgeControl,
        agent: &Arc<ConnectedAgent>,
    ) -> String {
        let (name, remote) = (&agent.name, agent.remote);
        loop {
            let request = tokio::select! {
                lost = conn.closed() => return lost.0,
                () = self.shutdown.cancelled() => return "edge shutting down".to_owned(),
                request = control.next() => request,
            };
            let answered = match request {
                Ok(AgentRequest::Drain) => {
                    agent.set_draining();
                    info!(agent = %name, %remote, "agent draining: no new exchanges go to it");
                    control.drained().await
                }
                Ok(AgentRequest::Renew { csr_der }) => control.renewed(self.renew(agent, csr_der).await).await,
                Ok(AgentRequest::Ignored(what)) => {
                    warn!(agent = %name, %remote, "unexpected control message ({what}); ignored");
                    Ok(())
                }
                // The agent ended its control stream: it is leaving; wait for the close.
                Ok(AgentRequest::Leaving) => {
                    agent.set_draining();
                    return conn.closed().await.0;
                }
                Err(ControlEnd::Lost(reason)) => return reason,
                Err(e @ ControlEnd::Violation(_)) => return e.to_string(),
            };
            if let Err(e) = answered {
                return format!("control stream failed: {e}");
            }
        }
    }

    /// Signs a renewed certificate for a connected agent and moves the connection onto it.
    async fn renew(&self, agent: &Arc<ConnectedAgent>, csr_der: Vec<u8>) -> RenewOutcome {
        let state = self.state.clone();
        let (name, validity) = (agent.name.clone(), self.settings.agent_cert_validity);
        let renewed = tokio::task::spawn_blocking(move || state.renew(&name, &csr_der, SystemTime::now(), validity))
            .await
            .unwrap_or_else(|e| Err(RenewError::Internal(e.to_string())));
        match renewed.and_then(|issued| {
            Ok((cert_serial_hex(&issued.cert_der).map_err(|e| RenewError::Internal(e.to_string()))?, issued))
        }) {
            Ok((serial, issued)) => {
                info!(agent = %agent.name, remote = %agent.remote, %serial, "agent certificate renewed");
                agent.set_serial(serial);
                RenewOutcome::Issued { cert_der: issued.cert_der }
            }
            Err(e) => {
                warn!(agent = %agent.name, remote = %agent.remote, "certificate renewal refused: {e}");
                RenewOutcome::Refused(e.to_string())
            }
        }
    }

    async fn pairing_session(&self, conn: Arc<dyn TunnelConnection>) {
        let remote = conn.remote_addr();
        let (answer, request) = match pairing::read_request(&conn, self.settings.hello_timeout).await {
            Ok(read) => read,
            Err(e) => {
                warn!(%remote, "pairing attempt failed: {e}");
                return;
            }
        };
        let limited = self.pairing_failures.lock().is_ok_and(|mut l| l.is_limited(remote.ip(), Instant::now()));
        let state = self.state.clone();
        let validity = self.settings.agent_cert_validity;
        let token_id = request.token_id.clone();
        // Signing and the atomic spend touch the disk: keep them off the async workers.
        let outcome = if limited {
            Err(None)
        } else {
            tokio::task::spawn_blocking(move || {
                state.redeem(&request.token_id, &request.secret, &request.csr_der, SystemTime::now(), validity)
            })
            .await
            .unwrap_or_else(|e| Err(RedeemError::Internal(e.to_string())))
            .map_err(Some)
        };
        if let Err(Some(RedeemError::BadSecret | RedeemError::UnknownToken)) = &outcome
            && let Ok(mut limiter) = self.pairing_failures.lock()
        {
            limiter.record_failure(remote.ip(), Instant::now());
        }
        let response = match outcome {
            Ok(issued) => {
                info!(%remote, agent = %issued.agent_name, token = %token_id, "agent paired: certificate issued");
                PairResponse::Issued { agent_name: issued.agent_name, cert_der: issued.cert_der, ca_der: issued.ca_der }
            }
            Err(None) => {
                warn!(%remote, token = %token_id, "pairing refused: too many failed attempts from this address");
                PairResponse::Refused(PairRefusal::RateLimited)
            }
            Err(Some(e)) => {
                warn!(%remote, token = %token_id, "pairing refused: {e}");
                PairResponse::Refused(match e {
                    RedeemError::UnknownToken => PairRefusal::UnknownToken,
                    RedeemError::Expired => PairRefusal::Expired,
                    RedeemError::Spent => PairRefusal::Spent,
                    RedeemError::BadSecret => PairRefusal::BadSecret,
                    RedeemError::BadCsr(_) => PairRefusal::BadCsr,
                    RedeemError::Internal(_) => PairRefusal::Internal,
                })
            }
        };
        answer.send(&response, PAIRING_LINGER).await;
    }
}
