//! One link: a connection to one edge instance at one address, and its reconnect loop. A link
//! dials (QUIC first, TLS/TCP when UDP does not pass), greets, serves the exchanges the edge
//! opens until the connection ends, and dials again after a jittered delay
//! ([`crate::backoff`]). On TCP in `auto` mode it keeps trying QUIC and moves to it when it
//! passes again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_proto::{LABEL_HOLDS, code};
use relay_transport::{DialError, Transport, TunnelConnection, dial_tunnel, host_of};
use relay_tunnel::control::{self, AgentControl, GreetError, Welcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::{Attempt, Backoff};
use crate::config::TransportChoice;
use crate::tunnel::{Greeted, TunnelClient};

/// What a link tells its follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// A connection reached an edge instance no other link holds.
    Found {
        /// The address.
        addr: SocketAddr,
        /// Whether the link was started to probe for replicas.
        probe: bool,
    },
    /// A held connection ended (its instance may be gone: look again).
    Lost {
        /// The address.
        addr: SocketAddr,
    },
    /// The link ended.
    Ended {
        /// The address.
        addr: SocketAddr,
        /// Because its connection reached an instance another link holds.
        duplicate: bool,
    },
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

impl Session {
    fn attempt(&self) -> Attempt {
        match self {
            Session::Ended(_) => Attempt::Welcomed,
            Session::Failed(_) => Attempt::Refused,
            Session::Duplicate => Attempt::Duplicate,
            Session::Unanswered(_) => Attempt::Unanswered,
        }
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
        let mut lost: Option<Greeted> = None;
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
            let delay = backoff.after(outcome.attempt());
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
        lost: &mut Option<Greeted>,
    ) -> Session {
        let client = &self.client;
        let (control, Welcome { agent_name, edge_instance, .. }, connection, counted) =
            match greet(client, &conn, lost.as_ref()).await {
                Ok(welcomed) => welcomed,
                Err(session) => return session,
            };
        if !client.held.claim(&edge_instance) {
            debug!(edge = %self.target, addr = %self.addr, %edge_instance, "reached an edge instance already held; retiring this connection");
            if !counted {
                // A probe the edge knew for one: it routes nothing here and waits for the close.
                conn.close_and_flush(code::OK, "already connected to this edge instance").await;
                return Session::Duplicate;
            }
            // The edge counted this connection as soon as it welcomed it (the instance was not
            // held yet when the hello was sent), and may already have sent an exchange down it:
            // retire it like a moved link (tell the edge to send nothing new, answer what it
            // sent, then close), so no webhook sent in that window fails. Closing at once
            // answered such a webhook 502.
            let retired = CancellationToken::new();
            retired.cancel();
            self.moving.spawn(serve(client.clone(), conn, control, retired));
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
        let mut current = Greeted { instance: edge_instance, connection };
        let session = self.serve_instance(conn, control, &mut current).await;
        client.held.release(&current.instance);
        *lost = Some(current);
        let _ = self.events.send(LinkEvent::Lost { addr: self.addr });
        session
    }

    /// Serves a welcomed connection (`current` says which), moving to QUIC when it passes again;
    /// `current` then names the QUIC connection.
    async fn serve_instance(
        &self,
        conn: Arc<dyn TunnelConnection>,
        control: AgentControl,
        current: &mut Greeted,
    ) -> Session {
        let client = &self.client;
        let auto = client.settings.transport == TransportChoice::Auto;
        let mut on_tcp = conn.transport() == Transport::Tcp.as_str();
        let mut retire = client.draining.child_token();
        let mut serving = tokio::spawn(serve(client.clone(), conn, control, retire.clone()));
        loop {
            if !(auto && on_tcp) {
                break;
            }
            let quic = tokio::select! {
                session = &mut serving => return session.unwrap_or_else(|e| Session::Ended(e.to_string())),
                quic = self.probe_quic() => quic,
            };
            // The QUIC connection replaces this one: the edge must not take it for a probe.
            let (quic_control, quic_connection) = match greet(client, &quic, Some(current)).await {
                Ok((control, welcome, connection, _)) if welcome.edge_instance == current.instance => {
                    (control, connection)
                }
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
            current.connection = quic_connection;
            retire.cancel();
            let old = std::mem::replace(&mut serving, {
                retire = client.draining.child_token();
                tokio::spawn(serve(client.clone(), quic, quic_control, retire.clone()))
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

    /// Dials this address over the configured transport: in `auto` mode QUIC first, and TCP if
    /// no QUIC handshake completes within the fallback deadline (a QUIC refusal is final: the
    /// edge answered).
    async fn connect(&self) -> Result<Arc<dyn TunnelConnection>, DialFailure> {
        let settings = &self.client.settings;
        let unanswered = |e: &DialFailure| matches!(e, DialFailure::Unanswered(_));
        let span = tracing::info_span!("dial", edge = %self.target, addr = %self.addr);
        let dial = settings.transport.dial(settings.quic_fallback_after, unanswered, |over| self.connect_over(over));
        tracing::Instrument::instrument(dial, span).await
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
        let identity = self.client.credentials().map_err(DialFailure::Refused)?;
        let host = host_of(&self.target);
        dial_tunnel(transport, self.addr, host, &identity, &self.client.settings.tunnel).await.map_err(|e| match e {
            DialError::Timeout(_) => DialFailure::Unanswered(e.to_string()),
            other => DialFailure::Refused(other.to_string()),
        })
    }
}

/// Says hello on a new connection (naming the connection it replaces, if any) and waits for the
/// edge's welcome; also returns the id the hello gave this connection, and whether the edge
/// counts it as one of the agent's connections (it does not when the hello said the agent
/// already holds the instance that answered: a probe for other replicas).
async fn greet(
    client: &TunnelClient,
    conn: &Arc<dyn TunnelConnection>,
    replaces: Option<&Greeted>,
) -> Result<(AgentControl, Welcome, String, bool), Session> {
    let connection = format!("{:016x}", fastrand::u64(..));
    let hello = client.hello(replaces, &connection);
    let declared_held = hello.labels.iter().find(|(k, _)| k == LABEL_HOLDS).map(|(_, v)| v.clone()).unwrap_or_default();
    match control::greet(conn, hello, client.settings.tunnel.handshake_timeout).await {
        Ok((control, welcome)) => {
            let replaced = replaces.map(|old| old.instance.as_str());
            let counted = edge_counts(&declared_held, replaced, &welcome.edge_instance);
            Ok((control, welcome, connection, counted))
        }
        Err(GreetError::Lost(reason)) => Err(Session::Failed(format!("the edge refused us: {reason}"))),
        Err(other) => Err(Session::Failed(other.to_string())),
    }
}

/// Whether the edge instance `instance` counts a connection whose hello declared `held` (comma-
/// separated instances) and replaced `replaced`: it takes one that says it holds the instance
/// already for a probe, routes nothing to it and waits for its close, unless the connection
/// replaces one to that very instance.
fn edge_counts(held: &str, replaced: Option<&str>, instance: &str) -> bool {
    replaced == Some(instance) || !held.split(',').any(|h| h == instance)
}

/// Serves a welcomed connection: accepts one stream per exchange until the connection ends.
/// When `retire` is cancelled (the link moved to another connection), the edge is told to
/// send nothing new here, and once the exchanges already here have finished the connection
/// is closed.
async fn serve(
    client: Arc<TunnelClient>,
    conn: Arc<dyn TunnelConnection>,
    control: AgentControl,
    retire: CancellationToken,
) -> Session {
    let this = &client;
    // A connection retired from the start (a duplicate) never serves as one of the agent's.
    let counted = !retire.is_cancelled();
    if counted {
        this.count_connection(true, conn.transport());
    }
    // The control stream stays open for the life of the connection; renewals use it.
    let renewal = AbortOnDrop(tokio::spawn(crate::control::run(client.clone(), control, retire.clone())));
    let here = TaskTracker::new();
    let mut retiring = false;
    let session = loop {
        let stream = tokio::select! {
            () = this.shutdown.cancelled() => {
                conn.close_and_flush(code::SHUTDOWN, "agent shutting down").await;
                break Session::Ended("agent shutting down".into());
            }
            // A whole-agent drain also cancels `retire`; that drain has its own ending.
            () = retire.cancelled(), if !retiring && !this.draining.is_cancelled() => {
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
                let forwarder = this.forwarder.clone();
                let head_timeout = this.settings.head_timeout;
                let exchange = here.track_future(forwarder.exchange(stream, head_timeout));
                this.exchanges.spawn(exchange);
            }
            Err(lost) => break Session::Ended(lost.0),
        }
    };
    drop(renewal);
    if counted {
        this.count_connection(false, conn.transport());
    }
    session
}

/// Why a connection try failed.
enum DialFailure {
    /// No answer within the handshake timeout.
    Unanswered(String),
    /// The edge answered and refused, or the attempt could not be made.
    Refused(String),
}

/// Aborts a task when dropped, so a connection's helper tasks end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edge_counts_a_connection_unless_its_hello_said_the_instance_was_held() {
        assert!(edge_counts("", None, "e1"), "a first connection");
        assert!(edge_counts("e2,e3", None, "e1"), "a new replica");
        assert!(!edge_counts("e2,e1", None, "e1"), "a probe that found a held instance");
        assert!(edge_counts("e1", Some("e1"), "e1"), "a connection replacing one to that instance");
    }
}
