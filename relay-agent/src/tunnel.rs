//! The agent's side of the tunnel: dial the edge, say hello, accept one stream per exchange, and
//! reconnect with capped, jittered exponential backoff when the connection drops.

use std::sync::Arc;
use std::time::Duration;

use std::sync::RwLock;
use std::time::SystemTime;

use relay_pki::{AgentIdentity, AgentState, agent_name_from_cert, cert_validity, generate_agent_csr, renewal_due};
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::{ControlMessage, ExchangeHead, ExchangeKind, Hello, PROTOCOL_VERSION, RenewOutcome, code};
use relay_transport::quic::host_of;
use relay_transport::{BiStream, FrameReadError, FrameReader, TunnelConnection, dial_tunnel, read_frame, write_frame};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::AgentSettings;
use crate::forward::Forwarder;
use crate::metrics::{AgentMetrics, OutcomeLabels};

/// How long the edge has to answer a renewal request.
const RENEW_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest wait before retrying a failed renewal; the retry interval is a tenth of the
/// certificate's remaining life, but never less than this nor more than [`RENEW_RETRY_MAX`].
const RENEW_RETRY_MIN: Duration = Duration::from_secs(1);

/// Longest wait before retrying a failed renewal.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(300);

pub(crate) struct TunnelClient {
    pub settings: Arc<AgentSettings>,
    /// The current key and certificate; replaced by renewals, read by every new connection.
    pub identity: RwLock<AgentIdentity>,
    /// Where renewals are stored (`None` when running from a bundle: renewals live in memory).
    pub state_dir: Option<std::path::PathBuf>,
    pub edge_addr: String,
    pub forwarder: Arc<Forwarder>,
    pub shutdown: CancellationToken,
    /// Cancelled when a drain starts: the edge is told to send nothing new.
    pub draining: CancellationToken,
    /// Exchange tasks, so a drain can wait for them.
    pub exchanges: TaskTracker,
    pub connected: watch::Sender<bool>,
    pub metrics: Arc<AgentMetrics>,
}

/// How one connection attempt ended.
enum Session {
    /// The edge welcomed us and the connection later ended, for this reason.
    Ended(String),
    /// We never got a welcomed connection, for this reason.
    Failed(String),
}

/// Reconnection delays: exponential from `initial` to `max`, reset by a welcomed session, each
/// drawn from half to all of the current step so agents that lost one edge together spread out.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
    /// Attempts since the last welcomed session.
    failures: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, step: initial, failures: 0 }
    }

    /// The delay before the next attempt, given how the last one ended.
    fn after(&mut self, outcome: &Session) -> Duration {
        match outcome {
            Session::Ended(_) => {
                self.step = self.initial;
                self.failures = 0;
            }
            Session::Failed(_) => self.failures += 1,
        }
        let half = self.step / 2;
        let delay = half + half.mul_f64(fastrand::f64());
        if matches!(outcome, Session::Failed(_)) {
            self.step = (self.step * 2).min(self.max);
        }
        delay
    }
}

impl TunnelClient {
    /// Keeps a connection to the edge until shutdown. Every reconnection waits a jittered delay;
    /// the delay grows after each attempt that did not end in a welcomed connection and starts
    /// over after one that did, so an edge that refuses us is never hammered.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.settings.reconnect_initial, self.settings.reconnect_max);
        while !self.shutdown.is_cancelled() {
            let outcome = match self.connect().await {
                Ok(conn) => self.serve(conn).await,
                Err(e) => Session::Failed(format!("cannot connect to the edge: {e}")),
            };
            let _ = self.connected.send(false);
            self.metrics.connected.set(0);
            // A draining agent does not come back: it is on its way out.
            if self.shutdown.is_cancelled() || self.draining.is_cancelled() {
                break;
            }
            self.metrics.reconnects.inc();
            let delay = backoff.after(&outcome);
            match outcome {
                Session::Ended(reason) => warn!(edge = %self.edge_addr, "tunnel lost: {reason}; reconnecting"),
                Session::Failed(reason) => {
                    warn!(edge = %self.edge_addr, attempt = backoff.failures, retry_in_ms = delay.as_millis() as u64, "{reason}");
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The certificate chain, key and CA to dial with, refusing a certificate that has expired.
    fn credentials(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, CertificateDer<'static>), String> {
        let identity = self.identity.read().map_err(|_| "identity lock poisoned".to_owned())?;
        if let Some((_, not_after)) = identity.cert_chain.first().and_then(|c| cert_validity(c).ok())
            && SystemTime::now() >= not_after
        {
            return Err(format!(
                "this agent's certificate expired at {}; it must be paired again (relay-agent pair)",
                humantime::format_rfc3339_seconds(not_after)
            ));
        }
        Ok((identity.cert_chain.clone(), identity.key.clone_key(), identity.ca_cert.clone()))
    }

    async fn connect(&self) -> Result<Arc<dyn TunnelConnection>, String> {
        let (cert_chain, key, ca_cert) = self.credentials()?;
        let addrs: Vec<_> = tokio::net::lookup_host(&self.edge_addr)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.edge_addr))?
            .collect();
        let mut last = format!("{} resolved to no address", self.edge_addr);
        for addr in addrs {
            let dialled = dial_tunnel(
                addr,
                host_of(&self.edge_addr),
                cert_chain.clone(),
                key.clone_key(),
                &ca_cert,
                &self.settings.quic,
            )
            .await;
            match dialled {
                Ok(conn) => return Ok(conn),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Runs one connection: hello, then exchanges until it ends.
    async fn serve(self: &Arc<Self>, conn: Arc<dyn TunnelConnection>) -> Session {
        let agent_name = self.identity.read().map(|id| id.name.clone()).unwrap_or_default();
        let hello = ControlMessage::Hello(Hello {
            agent_name,
            software_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            capabilities: Vec::new(),
            labels: Vec::new(),
        });
        let greeting = tokio::time::timeout(self.settings.quic.handshake_timeout, async {
            let mut control = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut control.send, &hello, DEFAULT_MAX_HEAD_LEN).await.map_err(|e| e.to_string())?;
            match read_frame::<ControlMessage, _>(&mut control.recv, DEFAULT_MAX_HEAD_LEN).await {
                Ok(Some(ControlMessage::Welcome { agent_name, .. })) => Ok((control, agent_name)),
                Ok(_) => Err("the edge did not welcome us".to_owned()),
                Err(e) => Err(format!("the edge refused us: {e}")),
            }
        })
        .await;
        let (control, name) = match greeting {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Session::Failed(format!("{e} ({})", conn.closed_reason_now())),
            Err(_) => {
                conn.close(code::PROTOCOL_VIOLATION, "no welcome");
                return Session::Failed("no welcome from the edge in time".into());
            }
        };
        let _ = self.connected.send(true);
        self.metrics.connected.set(1);
        info!(edge = %self.edge_addr, remote = %conn.remote_addr(), agent = %name, transport = conn.transport(), "connected to the edge");
        // The control stream stays open for the life of the connection; renewals use it.
        let renewal = AbortOnDrop(tokio::spawn(renew_loop(self.clone(), control)));
        loop {
            let stream = tokio::select! {
                () = self.shutdown.cancelled() => {
                    conn.close_and_flush(code::SHUTDOWN, "agent shutting down").await;
                    return Session::Ended("agent shutting down".into());
                }
                stream = conn.accept_bi() => stream,
            };
            match stream {
                Ok(stream) => {
                    let forwarder = self.forwarder.clone();
                    let head_timeout = self.settings.head_timeout;
                    self.exchanges.spawn(async move { handle_exchange(forwarder, stream, head_timeout).await });
                }
                Err(lost) => {
                    drop(renewal);
                    return Session::Ended(lost.0);
                }
            }
        }
    }
}

/// Aborts a task when dropped, so a connection's helper tasks end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Owns the control stream for the life of a connection: tells the edge when a drain starts,
/// and renews the agent's certificate whenever two thirds of its life have passed. New
/// certificates are stored atomically and used by the next connection; this one, and every
/// exchange on it, carries on untouched.
async fn renew_loop(client: Arc<TunnelClient>, mut control: BiStream) {
    let mut reader = FrameReader::new(DEFAULT_MAX_HEAD_LEN);
    let mut drain_sent = false;
    loop {
        if client.draining.is_cancelled() && !drain_sent {
            drain_sent = true;
            if let Err(e) = write_frame(&mut control.send, &ControlMessage::Drain, DEFAULT_MAX_HEAD_LEN).await {
                warn!("could not tell the edge about the drain: {e}");
                return;
            }
            info!("draining: the edge sends this agent no new exchanges");
        }
        let validity =
            client.identity.read().ok().and_then(|id| id.cert_chain.first().and_then(|c| cert_validity(c).ok()));
        let Some((not_before, not_after)) = validity else {
            warn!("cannot read this agent's certificate validity; not renewing");
            return;
        };
        let now = SystemTime::now();
        if !renewal_due(not_before, not_after, now) {
            let lifetime = not_after.duration_since(not_before).unwrap_or_default();
            let due = not_before + lifetime.mul_f64(2.0 / 3.0);
            let until_due = tokio::time::sleep(due.duration_since(now).unwrap_or_default());
            if drain_sent {
                until_due.await;
            } else {
                tokio::select! {
                    () = until_due => {}
                    () = client.draining.cancelled() => {}
                }
            }
            continue;
        }
        let outcome = renew_once(&client, &mut control, &mut reader).await;
        let label = match &outcome {
            Ok(_) => "issued",
            Err(Renewal::ConnectionGone(_)) => "interrupted",
            Err(Renewal::Failed(_)) => "refused",
        };
        client.metrics.renewals.get_or_create(&OutcomeLabels { outcome: label }).inc();
        match outcome {
            Ok(until) => info!(valid_until = %humantime::format_rfc3339_seconds(until), "certificate renewed"),
            Err(Renewal::ConnectionGone(e)) => {
                warn!("renewal interrupted, will retry on the next connection: {e}");
                return;
            }
            Err(Renewal::Failed(e)) => {
                let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
                let retry = (left / 10).clamp(RENEW_RETRY_MIN, RENEW_RETRY_MAX);
                warn!(retry_in_s = retry.as_secs(), "certificate renewal failed: {e}");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

enum Renewal {
    /// The control stream or connection failed; a new connection will retry.
    ConnectionGone(String),
    /// The edge refused, or the result could not be stored; retry later on this connection.
    Failed(String),
}

async fn renew_once(
    client: &TunnelClient,
    control: &mut BiStream,
    reader: &mut FrameReader,
) -> Result<SystemTime, Renewal> {
    let name = client
        .identity
        .read()
        .map(|id| id.name.clone())
        .map_err(|_| Renewal::Failed("identity lock poisoned".into()))?;
    let (key_pem, csr_der) = generate_agent_csr(&name).map_err(|e| Renewal::Failed(e.to_string()))?;
    write_frame(&mut control.send, &ControlMessage::Renew { csr_der }, DEFAULT_MAX_HEAD_LEN)
        .await
        .map_err(|e| Renewal::ConnectionGone(e.to_string()))?;
    let answer = tokio::time::timeout(RENEW_ANSWER_TIMEOUT, reader.next::<ControlMessage, _>(&mut control.recv))
        .await
        .map_err(|_| Renewal::ConnectionGone("no renewal answer in time".into()))?
        .map_err(|e| Renewal::ConnectionGone(e.to_string()))?;
    let cert_der = match answer {
        Some(ControlMessage::Renewed(RenewOutcome::Issued { cert_der })) => cert_der,
        Some(ControlMessage::Renewed(RenewOutcome::Refused(reason))) => {
            return Err(Renewal::Failed(format!("the edge refused: {reason}")));
        }
        Some(other) => return Err(Renewal::ConnectionGone(format!("unexpected control message {other:?}"))),
        None => return Err(Renewal::ConnectionGone("control stream ended".into())),
    };
    if agent_name_from_cert(&cert_der).ok().as_deref() != Some(name.as_str()) {
        return Err(Renewal::Failed("the renewed certificate names another agent".into()));
    }
    let (_, not_after) = cert_validity(&cert_der).map_err(|e| Renewal::Failed(e.to_string()))?;
    if let Some(dir) = &client.state_dir {
        AgentState::save_renewed(dir, &key_pem, &cert_der).map_err(|e| Renewal::Failed(e.to_string()))?;
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Renewal::Failed(e.to_string()))?;
    if let Ok(mut identity) = client.identity.write() {
        identity.cert_chain = vec![CertificateDer::from(cert_der)];
        identity.key = key;
    }
    Ok(not_after)
}

/// Reads one exchange head and hands the exchange to the forwarder. A malformed head resets this
/// stream only.
async fn handle_exchange(forwarder: Arc<Forwarder>, mut stream: BiStream, head_timeout: Duration) {
    let head =
        match tokio::time::timeout(head_timeout, read_frame::<ExchangeHead, _>(&mut stream.recv, DEFAULT_MAX_HEAD_LEN))
            .await
        {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return,
            Ok(Err(FrameReadError::Decode(e))) => {
                warn!("malformed exchange head from the edge: {e}; stream reset");
                stream.recv.stop(code::MALFORMED_FRAME);
                stream.send.reset(code::MALFORMED_FRAME);
                return;
            }
            Ok(Err(FrameReadError::Io(e))) => {
                warn!("exchange stream failed before its head: {e}");
                return;
            }
            Err(_) => {
                warn!("no exchange head within {head_timeout:?}; stream reset");
                stream.recv.stop(code::ABORTED);
                stream.send.reset(code::ABORTED);
                return;
            }
        };
    match head.kind {
        ExchangeKind::Http => forwarder.http(head, stream).await,
        ExchangeKind::WebSocket => forwarder.websocket(head, stream).await,
    }
}

trait ClosedReason {
    fn closed_reason_now(&self) -> String;
}

impl ClosedReason for Arc<dyn TunnelConnection> {
    fn closed_reason_now(&self) -> String {
        // The connection is usually already closed here (the edge refused us with a reason).
        futures_util::FutureExt::now_or_never(self.closed())
            .map_or_else(|| "connection still open".to_owned(), |lost| lost.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    #[test]
    fn failed_attempts_back_off_exponentially_up_to_the_cap() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        let mut ceiling = INITIAL;
        for _ in 0..20 {
            let delay = backoff.after(&Session::Failed("refused".into()));
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
            ceiling = (ceiling * 2).min(MAX);
        }
        assert_eq!(backoff.failures, 20);
    }

    #[test]
    fn a_refused_connection_never_reconnects_without_a_delay() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10 {
            assert!(backoff.after(&Session::Failed("handshake refused".into())) >= INITIAL / 2);
        }
    }

    #[test]
    fn a_welcomed_session_resets_the_backoff() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10 {
            backoff.after(&Session::Failed("down".into()));
        }
        let delay = backoff.after(&Session::Ended("edge restarted".into()));
        assert!(delay <= INITIAL && delay >= INITIAL / 2);
        assert_eq!(backoff.failures, 0);
    }
}
