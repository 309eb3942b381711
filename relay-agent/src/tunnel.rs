//! The agent's side of the tunnel: keep one connection to every edge replica, say hello on each,
//! accept one stream per exchange, and reconnect each with capped, jittered exponential backoff
//! when it drops.
//!
//! Each configured edge is a name (or address) that may resolve to several replicas, and each
//! address may lead to several replicas behind a load balancer. A *follower* per name
//! ([`crate::replicas`]) resolves it and runs one *link* per edge instance; a link owns one
//! connection and its reconnect loop and nothing else, so replicas come and go independently.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::RwLock;
use std::time::SystemTime;

use relay_pki::{AgentIdentity, AgentState, agent_name_from_cert, cert_validity, generate_agent_csr, renewal_due};
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::{
    ControlMessage, ExchangeHead, ExchangeKind, Hello, LABEL_AGENT_INSTANCE, LABEL_HOLDS, LABEL_REPLACES,
    PROTOCOL_VERSION, RenewOutcome, code,
};
use relay_transport::{
    BiStream, DialError, FrameReadError, FrameReader, Transport, TunnelConnection, dial_tunnel, host_of, read_frame,
    write_frame,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{AgentSettings, TransportChoice};
use crate::forward::Forwarder;
use crate::metrics::{AgentMetrics, OutcomeLabels, TransportLabels};
use crate::replicas::{HeldInstances, LinkEvent};

/// How long an edge has to confirm a drain notice. It answers as soon as it reads it, within a
/// round trip; two seconds is many round trips and still short against a platform's grace.
pub(crate) const DRAIN_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The configured edges (`host:port`); each may resolve to several replicas.
    pub edges: Vec<String>,
    pub forwarder: Arc<Forwarder>,
    pub shutdown: CancellationToken,
    /// Cancelled when a drain starts: the edge is told to send nothing new.
    pub draining: CancellationToken,
    /// Exchange tasks, so a drain can wait for them.
    pub exchanges: TaskTracker,
    /// How many welcomed connections are open now, one per edge replica.
    pub connected: watch::Sender<usize>,
    /// How many edges have confirmed this agent's drain.
    pub drain_acks: watch::Sender<usize>,
    pub metrics: Arc<AgentMetrics>,
    /// Held while a renewal runs, so connections to several replicas renew the certificate once.
    pub renew_lock: tokio::sync::Mutex<()>,
    /// This process's instance id, random per start, sent in every hello.
    pub instance: String,
    /// The edge instances held now: one connection each.
    pub held: HeldInstances,
}

/// One connection to one address of one configured edge, and its reconnect loop. An address
/// has one link per edge instance behind it ([`crate::replicas`]); a link whose connection
/// reaches an instance another link holds closes it and ends.
pub(crate) struct Link {
    client: Arc<TunnelClient>,
    /// The configured name, for logs and as the TLS server name.
    target: String,
    addr: SocketAddr,
    /// Cancelled when DNS no longer returns this address: the link finishes its current
    /// connection and does not reconnect.
    retired: CancellationToken,
    /// Connections this link moved away from (TCP after QUIC came back), finishing their
    /// exchanges.
    moving: TaskTracker,
    /// Where the link reports what it found to its follower.
    events: mpsc::UnboundedSender<LinkEvent>,
    /// Started to look for another replica behind the address.
    probe: bool,
}

/// A connection the edge welcomed.
struct Welcomed {
    control: BiStream,
    /// The name the edge knows this agent by.
    agent_name: String,
    /// The edge process's instance id.
    edge_instance: String,
}

/// How one connection attempt ended.
enum Session {
    /// The edge welcomed us and the connection later ended, for this reason.
    Ended(String),
    /// We never got a welcomed connection, for this reason.
    Failed(String),
    /// The connection reached an edge instance another link holds; it was closed.
    Duplicate,
    /// Nothing answered our handshakes (the edge is down, or packets are dropped on the way).
    Unanswered(String),
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
            Session::Failed(_) | Session::Duplicate => self.failures += 1,
            // Unanswered attempts cost the edge nothing, and the next try starts with a fresh
            // handshake: retry at once, jittered up to `initial` so a fleet does not align.
            Session::Unanswered(_) => {
                self.failures += 1;
                return self.initial.mul_f64(fastrand::f64());
            }
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
    /// Keeps one connection to every address of every configured edge until shutdown or drain.
    pub async fn run(self: Arc<Self>) {
        let followers = TaskTracker::new();
        for target in self.edges.clone() {
            followers.spawn(self.clone().follow(target));
        }
        followers.close();
        followers.wait().await;
    }

    /// Counts a welcomed connection opening (`true`) or ending, in the watch `Agent` reads and
    /// in the per-transport gauge, updated together so they cannot disagree.
    fn count_connection(&self, opened: bool, transport: &'static str) {
        self.connected.send_modify(|n| {
            *n = if opened { *n + 1 } else { n.saturating_sub(1) };
            let gauge = self.metrics.connected.get_or_create(&TransportLabels { transport });
            if opened {
                gauge.inc();
            } else {
                gauge.dec();
            }
        });
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

    /// Says hello on a new connection and waits for the edge's welcome. The hello names this
    /// process's instance and the edge instances it holds already (see [`crate::replicas`]).
    async fn greet(&self, conn: &Arc<dyn TunnelConnection>, replaces: Option<&str>) -> Result<Welcomed, Session> {
        let agent_name = self.identity.read().map(|id| id.name.clone()).unwrap_or_default();
        let hello = ControlMessage::Hello(Hello {
            agent_name,
            software_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            capabilities: Vec::new(),
            labels: [
                Some((LABEL_AGENT_INSTANCE.to_owned(), self.instance.clone())),
                Some((LABEL_HOLDS.to_owned(), self.held.label())),
                replaces.map(|instance| (LABEL_REPLACES.to_owned(), instance.to_owned())),
            ]
            .into_iter()
            .flatten()
            .collect(),
        });
        let greeting = tokio::time::timeout(self.settings.tunnel.handshake_timeout, async {
            let mut control = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut control.send, &hello, DEFAULT_MAX_HEAD_LEN).await.map_err(|e| e.to_string())?;
            match read_frame::<ControlMessage, _>(&mut control.recv, DEFAULT_MAX_HEAD_LEN).await {
                Ok(Some(ControlMessage::Welcome { agent_name, edge_instance, .. })) => {
                    Ok(Welcomed { control, agent_name, edge_instance })
                }
                Ok(_) => Err("the edge did not welcome us".to_owned()),
                Err(e) => Err(format!("the edge refused us: {e}")),
            }
        })
        .await;
        match greeting {
            Ok(Ok(welcomed)) => Ok(welcomed),
            Ok(Err(e)) => Err(Session::Failed(format!("{e} ({})", conn.closed_reason_now()))),
            Err(_) => {
                conn.close(code::PROTOCOL_VIOLATION, "no welcome");
                Err(Session::Failed("no welcome from the edge in time".into()))
            }
        }
    }

    /// Serves a welcomed connection: accepts one stream per exchange until the connection ends.
    /// When `retire` is cancelled (the link moved to another connection), the edge is told to
    /// send nothing new here, and once the exchanges already here have finished the connection
    /// is closed.
    async fn serve(
        self: Arc<Self>,
        conn: Arc<dyn TunnelConnection>,
        control: BiStream,
        retire: CancellationToken,
    ) -> Session {
        self.count_connection(true, conn.transport());
        // The control stream stays open for the life of the connection; renewals use it.
        let renewal = AbortOnDrop(tokio::spawn(renew_loop(self.clone(), control, retire.clone())));
        let here = TaskTracker::new();
        let mut retiring = false;
        let session = loop {
            let stream = tokio::select! {
                () = self.shutdown.cancelled() => {
                    conn.close_and_flush(code::SHUTDOWN, "agent shutting down").await;
                    break Session::Ended("agent shutting down".into());
                }
                // A whole-agent drain also cancels `retire`; that drain has its own ending.
                () = retire.cancelled(), if !retiring && !self.draining.is_cancelled() => {
                    retiring = true;
                    here.close();
                    continue;
                }
                () = async { here.wait().await; tokio::time::sleep(RETIRE_SETTLE).await }, if retiring => {
                    conn.close_and_flush(code::OK, "moved to another connection").await;
                    break Session::Ended("moved to another connection".into());
                }
                stream = conn.accept_bi() => stream,
            };
            match stream {
                Ok(stream) => {
                    let forwarder = self.forwarder.clone();
                    let head_timeout = self.settings.head_timeout;
                    let exchange = here.track_future(handle_exchange(forwarder, stream, head_timeout));
                    self.exchanges.spawn(exchange);
                }
                Err(lost) => break Session::Ended(lost.0),
            }
        };
        drop(renewal);
        self.count_connection(false, conn.transport());
        session
    }
}

/// After a retiring connection's last exchange ends, how long it stays open before it is closed:
/// an exchange the edge opened just before it read the drain is still on its way, and arrives
/// within a round trip. One second is many round trips on any path the tunnel crosses.
const RETIRE_SETTLE: Duration = Duration::from_secs(1);

impl Link {
    /// A link for `addr` of `target`, reporting to its follower on `events`.
    pub(crate) fn new(
        client: Arc<TunnelClient>,
        target: String,
        addr: SocketAddr,
        retired: CancellationToken,
        events: mpsc::UnboundedSender<LinkEvent>,
        probe: bool,
    ) -> Self {
        Self { client, target, addr, retired, moving: TaskTracker::new(), events, probe }
    }

    /// Keeps a connection to this address until shutdown, drain or retirement. Every reconnection
    /// waits a jittered delay; the delay grows after each attempt that did not end in a welcomed
    /// connection and starts over after one that did, so an edge that refuses us is never
    /// hammered.
    pub(crate) async fn run(self) {
        let client = &self.client;
        let mut backoff = Backoff::new(client.settings.reconnect_initial, client.settings.reconnect_max);
        let mut welcomed_once = false;
        let mut duplicate = false;
        // The edge instance this link's last connection went to, once that connection is gone.
        let mut lost: Option<String> = None;
        while !client.shutdown.is_cancelled() {
            let outcome = match self.connect().await {
                Ok(conn) => self.session(conn, &mut welcomed_once, &mut lost).await,
                Err(DialFailure::Unanswered(e)) => Session::Unanswered(format!("the edge does not answer: {e}")),
                Err(DialFailure::Refused(e)) => Session::Failed(format!("cannot connect to the edge: {e}")),
            };
            // A draining agent does not come back: it is on its way out.
            if client.shutdown.is_cancelled() || client.draining.is_cancelled() || self.retired.is_cancelled() {
                break;
            }
            // Another link holds that instance; a probe that never got through found nothing new.
            if matches!(outcome, Session::Duplicate) || (self.probe && !welcomed_once) {
                duplicate = true;
                break;
            }
            client.metrics.reconnects.inc();
            let delay = backoff.after(&outcome);
            match outcome {
                Session::Ended(reason) => {
                    warn!(edge = %self.target, addr = %self.addr, "tunnel lost: {reason}; reconnecting");
                }
                Session::Failed(reason) | Session::Unanswered(reason) => {
                    warn!(edge = %self.target, addr = %self.addr, attempt = backoff.failures, retry_in_ms = delay.as_millis() as u64, "{reason}");
                }
                Session::Duplicate => {}
            }
            tokio::select! {
                () = client.shutdown.cancelled() => break,
                () = self.retired.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        let _ = self.events.send(LinkEvent::Ended { addr: self.addr, duplicate });
        self.moving.close();
        self.moving.wait().await;
    }

    /// Greets the edge on `conn` and, unless another link holds the edge instance it reached,
    /// serves it until it ends. In `auto` mode on TCP, QUIC is tried again every probe interval;
    /// when it answers from the same edge instance, the new connection takes over: new exchanges
    /// go to it while the ones on TCP finish there.
    async fn session(
        &self,
        conn: Arc<dyn TunnelConnection>,
        welcomed_once: &mut bool,
        lost: &mut Option<String>,
    ) -> Session {
        let client = &self.client;
        let Welcomed { control, agent_name, edge_instance } = match client.greet(&conn, lost.as_deref()).await {
            Ok(welcomed) => welcomed,
            Err(session) => return session,
        };
        if !client.held.claim(&edge_instance) {
            debug!(edge = %self.target, addr = %self.addr, %edge_instance, "reached an edge instance already held; closing this connection");
            conn.close_and_flush(code::OK, "already connected to this edge instance").await;
            return Session::Duplicate;
        }
        *welcomed_once = true;
        let _ = self.events.send(LinkEvent::Found { addr: self.addr, probe: self.probe });
        info!(
            edge = %self.target,
            remote = %conn.remote_addr(),
            agent = %agent_name,
            transport = conn.transport(),
            %edge_instance,
            "connected to the edge"
        );
        let session = self.serve_instance(conn, control, &edge_instance).await;
        client.held.release(&edge_instance);
        *lost = Some(edge_instance);
        let _ = self.events.send(LinkEvent::Lost { addr: self.addr });
        session
    }

    /// Serves a welcomed connection to `edge_instance`, moving to QUIC when it passes again.
    async fn serve_instance(&self, conn: Arc<dyn TunnelConnection>, control: BiStream, edge_instance: &str) -> Session {
        let client = &self.client;
        let auto = client.settings.transport == TransportChoice::Auto;
        let mut on_tcp = conn.transport() == Transport::Tcp.as_str();
        let mut retire = client.draining.child_token();
        let mut serving = tokio::spawn(client.clone().serve(conn, control, retire.clone()));
        loop {
            if !(auto && on_tcp) {
                break;
            }
            let quic = tokio::select! {
                session = &mut serving => return session.unwrap_or_else(|e| Session::Ended(e.to_string())),
                quic = self.probe_quic() => quic,
            };
            // The QUIC connection replaces this one: the edge must not take it for a probe.
            let welcomed = match client.greet(&quic, Some(edge_instance)).await {
                Ok(welcomed) if welcomed.edge_instance == edge_instance => welcomed,
                Ok(_) => {
                    // Behind a balancer QUIC may land on another replica: stay on TCP here.
                    quic.close(code::OK, "QUIC reached another edge instance");
                    continue;
                }
                Err(Session::Failed(e) | Session::Ended(e) | Session::Unanswered(e)) => {
                    warn!(edge = %self.target, addr = %self.addr, "QUIC answered again but the session failed: {e}; staying on TCP");
                    continue;
                }
                Err(Session::Duplicate) => continue,
            };
            info!(edge = %self.target, addr = %self.addr, "QUIC passes again: new exchanges move to it; those on TCP finish there");
            retire.cancel();
            let old = std::mem::replace(&mut serving, {
                retire = client.draining.child_token();
                tokio::spawn(client.clone().serve(quic, welcomed.control, retire.clone()))
            });
            self.moving.spawn(async move {
                let _ = old.await;
            });
            on_tcp = false;
        }
        serving.await.unwrap_or_else(|e| Session::Ended(e.to_string()))
    }

    /// Tries QUIC every probe interval until a handshake completes; runs until then.
    async fn probe_quic(&self) -> Arc<dyn TunnelConnection> {
        let settings = &self.client.settings;
        loop {
            tokio::time::sleep(settings.quic_probe_interval).await;
            match tokio::time::timeout(settings.quic_fallback_after, self.connect_over(Transport::Quic)).await {
                Ok(Ok(conn)) => return conn,
                Ok(Err(DialFailure::Refused(e) | DialFailure::Unanswered(e))) => {
                    debug!(edge = %self.target, addr = %self.addr, "QUIC probe failed: {e}; staying on TCP");
                }
                Err(_) => debug!(edge = %self.target, addr = %self.addr, "QUIC probe got no answer; staying on TCP"),
            }
        }
    }

    /// Dials this address over the configured transport. In `auto` mode QUIC goes first; if no
    /// QUIC handshake completes within the fallback deadline, TCP is dialled instead. A QUIC
    /// refusal is not a reason to fall back: the edge answered.
    async fn connect(&self) -> Result<Arc<dyn TunnelConnection>, DialFailure> {
        let settings = &self.client.settings;
        let transport = match settings.transport {
            TransportChoice::Only(transport) => transport,
            TransportChoice::Auto => {
                match tokio::time::timeout(settings.quic_fallback_after, self.connect_over(Transport::Quic)).await {
                    Ok(Ok(conn)) => return Ok(conn),
                    Ok(Err(DialFailure::Refused(e))) => return Err(DialFailure::Refused(e)),
                    Ok(Err(DialFailure::Unanswered(_))) | Err(_) => {
                        info!(
                            edge = %self.target,
                            addr = %self.addr,
                            "no QUIC answer within {:?} (is UDP blocked on the way?); connecting over TLS/TCP",
                            settings.quic_fallback_after
                        );
                        Transport::Tcp
                    }
                }
            }
        };
        self.connect_over(transport).await
    }

    /// Dials this address over `transport`. While no answer comes, a fresh attempt starts every
    /// redial interval beside the ones still waiting; the first to complete wins and the others
    /// are dropped. The try ends when an attempt is refused, or when the first attempt times out
    /// unanswered (the caller then starts a new try at once, so fresh attempts keep coming every
    /// interval).
    async fn connect_over(&self, transport: Transport) -> Result<Arc<dyn TunnelConnection>, DialFailure> {
        use futures_util::StreamExt as _;
        let settings = &self.client.settings;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let started = tokio::time::Instant::now();
        let mut redial = tokio::time::interval_at(started + settings.redial_interval, settings.redial_interval);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pending.push(self.dial_once(transport));
        loop {
            tokio::select! {
                Some(outcome) = pending.next() => return outcome,
                _ = redial.tick() => pending.push(self.dial_once(transport)),
            }
        }
    }

    async fn dial_once(&self, transport: Transport) -> Result<Arc<dyn TunnelConnection>, DialFailure> {
        let (cert_chain, key, ca_cert) = self.client.credentials().map_err(DialFailure::Refused)?;
        let host = host_of(&self.target);
        dial_tunnel(transport, self.addr, host, cert_chain, key, &ca_cert, &self.client.settings.tunnel).await.map_err(
            |e| match e {
                DialError::Timeout(_) => DialFailure::Unanswered(e.to_string()),
                other => DialFailure::Refused(other.to_string()),
            },
        )
    }
}

/// Why a connection try failed.
enum DialFailure {
    /// No answer within the handshake timeout.
    Unanswered(String),
    /// The edge answered and refused, or the attempt could not be made.
    Refused(String),
}

/// Which addresses to start links for and which to retire, given the ones linked now and the
/// ones the name resolves to. An empty answer retires nothing: a name that briefly resolves to
/// nothing (a DNS hiccup, every replica restarting) must not tear down the links.
pub(crate) fn reconcile(
    current: &BTreeSet<SocketAddr>,
    found: &BTreeSet<SocketAddr>,
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    if found.is_empty() {
        return (Vec::new(), Vec::new());
    }
    (found.difference(current).copied().collect(), current.difference(found).copied().collect())
}

/// Aborts a task when dropped, so a connection's helper tasks end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Owns the control stream for the life of a connection: tells the edge when a drain starts
/// (`drain`: the whole agent's, or this connection's when it is being retired),
/// and renews the agent's certificate whenever two thirds of its life have passed. New
/// certificates are stored atomically and used by the next connection; this one, and every
/// exchange on it, carries on untouched.
async fn renew_loop(client: Arc<TunnelClient>, mut control: BiStream, drain: CancellationToken) {
    let mut reader = FrameReader::new(DEFAULT_MAX_HEAD_LEN);
    let mut drain_sent = false;
    loop {
        if drain.is_cancelled() && !drain_sent {
            drain_sent = true;
            if let Err(e) = write_frame(&mut control.send, &ControlMessage::Drain, DEFAULT_MAX_HEAD_LEN).await {
                warn!("could not tell the edge about the drain: {e}");
                return;
            }
            // The edge confirms; until then it may still send a new exchange here.
            let confirmed = tokio::time::timeout(DRAIN_NOTICE_TIMEOUT, async {
                loop {
                    match reader.next::<ControlMessage, _>(&mut control.recv).await {
                        Ok(Some(ControlMessage::Drained)) => return Ok(()),
                        Ok(Some(_)) => continue,
                        Ok(None) => return Err("control stream ended".to_owned()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await;
            match confirmed {
                Ok(Ok(())) => {
                    client.drain_acks.send_modify(|n| *n += 1);
                    info!("draining: the edge sends this agent no new exchanges");
                }
                Ok(Err(e)) => warn!("the edge did not confirm the drain: {e}"),
                Err(_) => warn!("the edge did not confirm the drain within {DRAIN_NOTICE_TIMEOUT:?}"),
            }
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
                    () = drain.cancelled() => {}
                }
            }
            continue;
        }
        // Connections to other replicas run this loop too: the first to take the lock renews, the
        // others find the fresh certificate not due and go back to sleep.
        let guard = client.renew_lock.lock().await;
        let fresh =
            client.identity.read().ok().and_then(|id| id.cert_chain.first().and_then(|c| cert_validity(c).ok()));
        if fresh.is_none_or(|(from, until)| !renewal_due(from, until, SystemTime::now())) {
            drop(guard);
            continue;
        }
        let outcome = renew_once(&client, &mut control, &mut reader).await;
        drop(guard);
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

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn new_replicas_get_links_and_vanished_ones_are_retired() {
        let (start, retire) = reconcile(&addrs(&["10.0.0.1:1", "10.0.0.2:1"]), &addrs(&["10.0.0.2:1", "10.0.0.3:1"]));
        assert_eq!(start, Vec::from_iter(addrs(&["10.0.0.3:1"])));
        assert_eq!(retire, Vec::from_iter(addrs(&["10.0.0.1:1"])));
    }

    #[test]
    fn an_empty_answer_retires_nothing() {
        let (start, retire) = reconcile(&addrs(&["10.0.0.1:1"]), &BTreeSet::new());
        assert!(start.is_empty() && retire.is_empty());
    }

    #[test]
    fn an_unanswered_try_is_retried_at_once_and_does_not_grow_the_backoff() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10 {
            assert!(backoff.after(&Session::Unanswered("timed out".into())) <= INITIAL);
        }
        assert_eq!(backoff.failures, 10);
        let refused = backoff.after(&Session::Failed("refused".into()));
        assert!(refused >= INITIAL / 2 && refused <= INITIAL, "{refused:?}");
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
