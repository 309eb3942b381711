//! The state every tunnel connection of this agent process shares: its identity (replaced by
//! renewals), the edge instances it holds, the counts a drain and readiness read, and what it
//! says in each hello. The connections themselves are [`crate::link`]'s; finding the edge
//! replicas is [`crate::replicas`]'.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use relay_pki::{AgentIdentity, TlsIdentity, cert_validity};
use relay_proto::{
    Hello, LABEL_AGENT_INSTANCE, LABEL_CONNECTION, LABEL_HOLDS, LABEL_REPLACES, LABEL_REPLACES_CONNECTION,
    PROTOCOL_VERSION,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentSettings;
use crate::forward::Forwarder;
use crate::metrics::{AgentMetrics, TransportLabels};

/// What the agent process's tunnel connections share.
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

impl TunnelClient {
    /// Counts a welcomed connection opening (`true`) or ending, in the watch `Agent` reads and
    /// in the per-transport gauge, updated together so they cannot disagree.
    pub(crate) fn count_connection(&self, opened: bool, transport: &'static str) {
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
    pub(crate) fn credentials(&self) -> Result<TlsIdentity, String> {
        let identity = self.identity.read().map_err(|_| "identity lock poisoned".to_owned())?;
        if let Some((_, not_after)) = leaf_validity(&identity)
            && SystemTime::now() >= not_after
        {
            return Err(format!(
                "this agent's certificate expired at {}; it must be paired again (relay-agent pair)",
                humantime::format_rfc3339_seconds(not_after)
            ));
        }
        Ok(identity.tls())
    }

    /// The current certificate's validity, `(not_before, not_after)`.
    pub(crate) fn validity(&self) -> Option<(SystemTime, SystemTime)> {
        self.identity.read().ok().and_then(|id| leaf_validity(&id))
    }

    /// The hello for new connection `connection`: it names this process's instance, the edge
    /// instances it holds already (see [`crate::replicas`]), and the connection it replaces, if
    /// any (which edge instance, and which of this process's connections to it).
    pub(crate) fn hello(&self, replaces: Option<&Greeted>, connection: &str) -> Hello {
        Hello {
            agent_name: self.identity.read().map(|id| id.name.clone()).unwrap_or_default(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            capabilities: Vec::new(),
            labels: [
                Some((LABEL_AGENT_INSTANCE.to_owned(), self.instance.clone())),
                Some((LABEL_CONNECTION.to_owned(), connection.to_owned())),
                Some((LABEL_HOLDS.to_owned(), self.held.label())),
                replaces.map(|old| (LABEL_REPLACES.to_owned(), old.instance.clone())),
                replaces.map(|old| (LABEL_REPLACES_CONNECTION.to_owned(), old.connection.clone())),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }
}

/// The edge instances this agent process holds a connection to, across every address.
#[derive(Debug, Default)]
pub(crate) struct HeldInstances {
    held: Mutex<HashSet<String>>,
}

impl HeldInstances {
    /// Claims `instance` for a new connection; `false` if another connection holds it.
    pub fn claim(&self, instance: &str) -> bool {
        self.held.lock().is_ok_and(|mut held| held.insert(instance.to_owned()))
    }

    /// Releases `instance` when its connection ends.
    pub fn release(&self, instance: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(instance);
        }
    }

    /// How many are held.
    pub fn count(&self) -> usize {
        self.held.lock().map_or(0, |held| held.len())
    }

    /// The `holds` hello label: the held instances, comma separated.
    pub fn label(&self) -> String {
        self.held.lock().map(|held| held.iter().cloned().collect::<Vec<_>>().join(",")).unwrap_or_default()
    }
}

/// A connection the edge welcomed: the edge instance it reached and the id this agent gave it.
#[derive(Debug, Clone)]
pub(crate) struct Greeted {
    /// The edge process's instance id.
    pub instance: String,
    /// The connection's id, sent in its hello.
    pub connection: String,
}

/// The validity of the identity's own certificate, `(not_before, not_after)`.
fn leaf_validity(identity: &AgentIdentity) -> Option<(SystemTime, SystemTime)> {
    identity.cert_chain.first().and_then(|c| cert_validity(c).ok())
}
