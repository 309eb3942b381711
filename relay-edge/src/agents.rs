//! The set of connected agents and how a new exchange picks one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use relay_transport::TunnelConnection;

/// One connected, authenticated agent.
pub struct ConnectedAgent {
    /// Unique per edge process, to remove exactly this connection when it ends.
    pub id: u64,
    /// The agent name from its certificate.
    pub name: String,
    /// The agent process's instance id from its hello (empty if it sent none).
    pub instance: String,
    /// This connection's id from its hello (empty if it sent none).
    pub connection: String,
    /// Where it connected from.
    pub remote: SocketAddr,
    /// The tunnel connection.
    pub conn: Arc<dyn TunnelConnection>,
    /// When it connected, seconds since the Unix epoch.
    pub connected_at_unix: u64,
    /// Serial of the certificate this connection stands on: the one it authenticated with, or
    /// the last one renewed over it (the renewal proved the new key over this connection).
    serial: Mutex<String>,
    in_flight: AtomicUsize,
    /// Every agent's exchanges together, for the drain to wait on.
    all: Arc<Exchanges>,
    draining: AtomicBool,
    /// A newer connection of the same agent replaced this one: it takes nothing new, and calls
    /// pinned to it follow the agent to its newer connection.
    superseded: AtomicBool,
}

impl std::fmt::Debug for ConnectedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectedAgent")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("remote", &self.remote)
            .finish()
    }
}

impl ConnectedAgent {
    /// Marks the agent as draining: it receives no new exchanges.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether a newer connection of the same agent replaced this one.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::SeqCst)
    }

    /// The serial this connection stands on now.
    pub fn serial(&self) -> String {
        self.serial.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Records a certificate renewed over this connection.
    pub fn set_serial(&self, serial: String) {
        if let Ok(mut current) = self.serial.lock() {
            *current = serial;
        }
    }

    /// Counts an exchange as in flight on this agent until the guard drops.
    pub fn begin_exchange(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.all.open.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// Exchanges in flight across every agent, including those of connections already gone (they
/// end within their timeouts), with a signal when the last one ends.
#[derive(Debug, Default)]
struct Exchanges {
    open: AtomicUsize,
    none_open: tokio::sync::Notify,
}

/// An exchange in flight on an agent; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<ConnectedAgent>);

impl InFlight {
    /// The agent carrying the exchange.
    pub fn agent(&self) -> &Arc<ConnectedAgent> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.0.all.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all.none_open.notify_waiters();
        }
    }
}

/// Which of its own process's connections a new connection replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaces<'a> {
    /// None: a first connection, or one to another replica.
    Nothing,
    /// Every one (an agent that names no connection).
    All,
    /// The one with this id.
    Connection(&'a str),
}

/// Why no agent can take an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAgent {
    /// No agent is connected (or all are draining).
    NoneConnected,
    /// Every agent carries its maximum of concurrent exchanges.
    AtCapacity,
}

/// The rendezvous ("highest random weight") weight of agent `name` for call `key`: FNV-1a over
/// both, finished with the SplitMix64 mixer. It must be the same in every edge process and every
/// build, so it is written out here rather than taken from `std`'s hasher, whose algorithm may
/// change between releases.
pub fn rendezvous_weight(key: &str, name: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    // The 0xff separator cannot occur in UTF-8, so ("ab", "c") and ("a", "bc") differ.
    for byte in key.bytes().chain(std::iter::once(0xff)).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The connected agents.
#[derive(Debug, Default)]
pub struct AgentSet {
    agents: Mutex<Vec<Arc<ConnectedAgent>>>,
    next_id: AtomicU64,
    exchanges: Arc<Exchanges>,
}

impl AgentSet {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<ConnectedAgent>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent, so recover it.
        self.agents.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a connection that completed hello.
    pub fn insert(
        &self,
        name: String,
        (instance, connection): (String, String),
        serial: String,
        remote: SocketAddr,
        conn: Arc<dyn TunnelConnection>,
    ) -> Arc<ConnectedAgent> {
        let connected_at_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let agent = Arc::new(ConnectedAgent {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name,
            instance,
            connection,
            remote,
            conn,
            connected_at_unix,
            serial: Mutex::new(serial),
            in_flight: AtomicUsize::new(0),
            all: self.exchanges.clone(),
            draining: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
        });
        self.lock().push(agent.clone());
        agent
    }

    /// Retires the connections of agent `name` that connection `keep` replaces: those of other
    /// agent processes (a killed and restarted agent), and those of the same one that `replaces`
    /// names (its earlier connection was lost, or moves from TCP to QUIC). They take no new
    /// exchanges, and calls pinned to them move to the agent's newest connection. One still
    /// alive finishes what it carries; a dead one receives nothing more while it waits for its
    /// idle timeout. Returns how many were retired.
    pub fn supersede(&self, name: &str, keep: u64, replaces: Replaces<'_>) -> usize {
        let agents = self.lock();
        let Some(instance) = agents.iter().find(|a| a.id == keep).map(|a| a.instance.clone()) else { return 0 };
        let replaced = |a: &ConnectedAgent| match replaces {
            Replaces::Nothing => false,
            Replaces::All => true,
            Replaces::Connection(id) => a.connection == id,
        };
        let mut retired = 0;
        for agent in agents.iter().filter(|a| a.name == name && a.id != keep && (a.instance != instance || replaced(a)))
        {
            if !agent.superseded.swap(true, Ordering::SeqCst) {
                agent.draining.store(true, Ordering::SeqCst);
                retired += 1;
            }
        }
        retired
    }

    /// Removes the connection with `id`.
    pub fn remove(&self, id: u64) {
        self.lock().retain(|agent| agent.id != id);
    }

    /// The agent for a new exchange: the one with the fewest exchanges in flight among those not
    /// draining and below `limit`, ties broken at random so equal agents share load.
    pub fn pick(&self, limit: usize) -> Result<Arc<ConnectedAgent>, NoAgent> {
        let agents = self.lock();
        // One reading of each load: exchanges on other tasks start and end while this runs, and
        // comparing a second reading against the minimum of the first could leave no candidate.
        let loads: Vec<(usize, &Arc<ConnectedAgent>)> = agents
            .iter()
            .filter(|a| !a.draining.load(Ordering::SeqCst))
            .map(|a| (a.in_flight.load(Ordering::SeqCst), a))
            .collect();
        let least = loads.iter().map(|(load, _)| *load).min().ok_or(NoAgent::NoneConnected)?;
        if least >= limit {
            return Err(NoAgent::AtCapacity);
        }
        let best: Vec<&Arc<ConnectedAgent>> =
            loads.iter().filter(|(load, _)| *load == least).map(|(_, agent)| *agent).collect();
        match best.len() {
            0 => Err(NoAgent::NoneConnected),
            n => best.get(fastrand::usize(..n)).map(|a| Arc::clone(a)).ok_or(NoAgent::NoneConnected),
        }
    }

    /// The agent for the first exchange of a call with affinity key `key`: the agent with the
    /// highest rendezvous weight for the key among those not draining and below `limit` (the
    /// least loaded connection of it, when it has several). Every edge replica sees the same
    /// agents, so every replica picks the same agent for a call without sharing any state; when
    /// that agent is gone, each picks the same next one. Falls back to [`AgentSet::pick`] when no
    /// agent has room.
    pub fn pick_for_key(&self, key: &str, limit: usize) -> Result<Arc<ConnectedAgent>, NoAgent> {
        let chosen = self
            .lock()
            .iter()
            .filter(|a| !a.draining.load(Ordering::SeqCst) && a.in_flight.load(Ordering::SeqCst) < limit)
            .max_by_key(|a| (rendezvous_weight(key, &a.name), std::cmp::Reverse(a.in_flight.load(Ordering::SeqCst))))
            .cloned();
        match chosen {
            Some(agent) => Ok(agent),
            None => self.pick(limit),
        }
    }

    /// The connection with `id`, if it is still connected.
    pub fn by_id(&self, id: u64) -> Option<Arc<ConnectedAgent>> {
        self.lock().iter().find(|a| a.id == id).cloned()
    }

    /// Resolves once no exchange is in flight on any agent (at once if none is).
    pub async fn exchanges_done(&self) {
        loop {
            let notified = self.exchanges.none_open.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so an exchange ending in between still wakes us.
            notified.as_mut().enable();
            if self.exchanges.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Whether any agent can take exchanges.
    pub fn ready(&self) -> bool {
        self.lock().iter().any(|a| !a.draining.load(Ordering::SeqCst))
    }

    /// Every connection, for status reports and revocation checks.
    pub fn snapshot(&self) -> Vec<Arc<ConnectedAgent>> {
        self.lock().clone()
    }

    /// Names of connected agents (one entry per connection).
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|a| a.name.clone()).collect()
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self, code: u32, reason: &str) {
        for agent in self.lock().drain(..) {
            agent.conn.close(code, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that never carries anything, for tests of how agents are picked.
    struct Idle;

    impl TunnelConnection for Idle {
        fn open_bi(
            &self,
        ) -> relay_transport::BoxFuture<'_, Result<relay_transport::BiStream, relay_transport::ConnectionLost>>
        {
            Box::pin(async { Err(relay_transport::ConnectionLost("idle".into())) })
        }
        fn accept_bi(
            &self,
        ) -> relay_transport::BoxFuture<'_, Result<relay_transport::BiStream, relay_transport::ConnectionLost>>
        {
            Box::pin(std::future::pending())
        }
        fn closed(&self) -> relay_transport::BoxFuture<'_, relay_transport::ConnectionLost> {
            Box::pin(std::future::pending())
        }
        fn close(&self, _code: u32, _reason: &str) {}
        fn close_and_flush(&self, _code: u32, _reason: &str) -> relay_transport::BoxFuture<'_, ()> {
            Box::pin(async {})
        }
        fn remote_addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], 1))
        }
        fn transport(&self) -> &'static str {
            "quic"
        }
    }

    #[test]
    fn a_connection_that_names_what_it_replaces_retires_only_that_one_of_its_processs() {
        let set = AgentSet::default();
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let ids = |instance: &str, connection: &str| (instance.to_owned(), connection.to_owned());
        let lost = set.insert("a".into(), ids("p1", "c1"), "01".into(), addr, Arc::new(Idle));
        let sibling = set.insert("a".into(), ids("p1", "c2"), "01".into(), addr, Arc::new(Idle));
        let restarted_from = set.insert("a".into(), ids("p0", "c0"), "01".into(), addr, Arc::new(Idle));
        let new = set.insert("a".into(), ids("p1", "c3"), "01".into(), addr, Arc::new(Idle));
        assert_eq!(set.supersede("a", new.id, Replaces::Connection("c1")), 2);
        assert!(lost.is_superseded() && restarted_from.is_superseded());
        assert!(!sibling.is_superseded(), "a connection made meanwhile by the same process stays");
        assert!(!new.is_superseded());
        // An agent that names no connection retires every other one of its process's.
        let newest = set.insert("a".into(), ids("p1", "c4"), "01".into(), addr, Arc::new(Idle));
        assert_eq!(set.supersede("a", newest.id, Replaces::All), 2);
        assert!(sibling.is_superseded() && new.is_superseded());
        // A probe-like newcomer that replaces nothing retires only other processes' connections.
        let other = set.insert("a".into(), ids("p2", "c5"), "01".into(), addr, Arc::new(Idle));
        assert_eq!(set.supersede("a", other.id, Replaces::Nothing), 1, "only p1's live one, c4");
    }

    #[tokio::test]
    async fn the_drain_wakes_when_the_last_exchange_ends_even_one_on_a_removed_agent() {
        let set = AgentSet::default();
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let a = set.insert("a".into(), Default::default(), "01".into(), addr, Arc::new(Idle));
        let b = set.insert("b".into(), Default::default(), "02".into(), addr, Arc::new(Idle));
        let (first, second) = (a.begin_exchange(), b.begin_exchange());
        set.remove(b.id);
        let done = set.exchanges_done();
        tokio::pin!(done);
        assert!(futures_util::FutureExt::now_or_never(done.as_mut()).is_none(), "two exchanges are open");
        drop(first);
        assert!(futures_util::FutureExt::now_or_never(done.as_mut()).is_none(), "one exchange is open");
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), done).await.expect("the last exchange ended");
        tokio::time::timeout(std::time::Duration::from_secs(5), set.exchanges_done()).await.expect("none open");
    }

    #[test]
    fn picking_while_exchanges_start_and_end_on_other_threads_never_fails_or_panics() {
        let set = Arc::new(AgentSet::default());
        let agents: Vec<_> = (0..3)
            .map(|i| {
                set.insert(
                    format!("agent-{i}"),
                    Default::default(),
                    String::new(),
                    SocketAddr::from(([127, 0, 0, 1], 1)),
                    Arc::new(Idle),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        // Loads change under the picker all the time, as exchanges do on a busy edge.
        let churn: Vec<_> = agents
            .iter()
            .cloned()
            .map(|agent| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let held: Vec<InFlight> = (0..3).map(|_| agent.begin_exchange()).collect();
                        drop(held);
                    }
                })
            })
            .collect();
        for _ in 0..200_000 {
            assert!(set.pick(usize::MAX).is_ok());
        }
        stop.store(true, Ordering::Relaxed);
        for thread in churn {
            thread.join().unwrap();
        }
    }

    #[test]
    fn rendezvous_weights_are_stable_and_spread_calls_evenly() {
        // Fixed values: a change here would split calls between edge replicas of two versions.
        assert_eq!(rendezvous_weight("call-1", "agent-a"), 7_696_585_507_065_820_219);
        assert_ne!(rendezvous_weight("ab", "c"), rendezvous_weight("a", "bc"));
        let names = ["agent-a", "agent-b", "agent-c"];
        let mut wins = [0usize; 3];
        for call in 0..3000 {
            let key = format!("{call:08x}-correlation");
            let best = (0..3).max_by_key(|&i| rendezvous_weight(&key, names[i])).unwrap();
            wins[best] += 1;
        }
        assert!(wins.iter().all(|&w| (800..1200).contains(&w)), "{wins:?}");
    }
}
