//! The agent's side of the tunnel: dial the edge, say hello, accept one stream per exchange, and
//! reconnect with capped, jittered exponential backoff when the connection drops.

use std::sync::Arc;
use std::time::Duration;

use relay_pki::AgentIdentity;
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::{ControlMessage, ExchangeHead, ExchangeKind, Hello, PROTOCOL_VERSION, code};
use relay_transport::quic::host_of;
use relay_transport::{BiStream, FrameReadError, TunnelConnection, dial_tunnel, read_frame, write_frame};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::AgentSettings;
use crate::forward::Forwarder;

pub(crate) struct TunnelClient {
    pub settings: Arc<AgentSettings>,
    pub identity: AgentIdentity,
    pub edge_addr: String,
    pub forwarder: Arc<Forwarder>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub connected: watch::Sender<bool>,
}

/// A delay drawn uniformly from half to all of `step`, so agents that lost the same edge at the
/// same moment spread out.
fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

impl TunnelClient {
    /// Keeps a connection to the edge until shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut step = self.settings.reconnect_initial;
        let mut attempt: u64 = 0;
        while !self.shutdown.is_cancelled() {
            attempt += 1;
            match self.connect().await {
                Ok(conn) => {
                    step = self.settings.reconnect_initial;
                    attempt = 0;
                    let reason = self.serve(conn).await;
                    let _ = self.connected.send(false);
                    if self.shutdown.is_cancelled() {
                        break;
                    }
                    warn!(edge = %self.edge_addr, "tunnel lost: {reason}; reconnecting");
                }
                Err(e) => {
                    let delay = jittered(step);
                    warn!(edge = %self.edge_addr, attempt, retry_in_ms = delay.as_millis() as u64, "cannot connect to the edge: {e}");
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    step = (step * 2).min(self.settings.reconnect_max);
                }
            }
        }
    }

    async fn connect(&self) -> Result<Arc<dyn TunnelConnection>, String> {
        let addrs: Vec<_> = tokio::net::lookup_host(&self.edge_addr)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.edge_addr))?
            .collect();
        let mut last = format!("{} resolved to no address", self.edge_addr);
        for addr in addrs {
            let dialled = dial_tunnel(
                addr,
                host_of(&self.edge_addr),
                self.identity.cert_chain.clone(),
                self.identity.key.clone_key(),
                &self.identity.ca_cert,
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

    /// Runs one connection: hello, then exchanges until it ends. Returns why it ended.
    async fn serve(&self, conn: Arc<dyn TunnelConnection>) -> String {
        let hello = ControlMessage::Hello(Hello {
            agent_name: self.identity.name.clone(),
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
            Ok(Err(e)) => return format!("{e} ({})", conn.closed_reason_now()),
            Err(_) => return "no welcome from the edge in time".into(),
        };
        let _ = self.connected.send(true);
        info!(edge = %self.edge_addr, remote = %conn.remote_addr(), agent = %name, transport = conn.transport(), "connected to the edge");
        // The control stream stays open for the life of the connection.
        let _control = control;
        loop {
            let stream = tokio::select! {
                () = self.shutdown.cancelled() => {
                    conn.close(code::SHUTDOWN, "agent shutting down");
                    return "agent shutting down".into();
                }
                stream = conn.accept_bi() => stream,
            };
            match stream {
                Ok(stream) => {
                    let forwarder = self.forwarder.clone();
                    let head_timeout = self.settings.head_timeout;
                    self.tasks.spawn(async move { handle_exchange(forwarder, stream, head_timeout).await });
                }
                Err(lost) => return lost.0,
            }
        }
    }
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
