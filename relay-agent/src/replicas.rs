//! Finding every edge replica: behind each configured name, every address DNS returns, and
//! behind each address, every edge instance a load balancer spreads new connections over.
//!
//! A *follower* per configured edge resolves it periodically and runs links for each address
//! (see [`crate::tunnel`]). Each edge process names its instance in the welcome; the agent keeps
//! one connection per instance. Behind one address (a cloud load balancer, a Container Apps
//! FQDN), one connection reaches one replica, so the follower dials the address again (a new
//! connection has a new source port, which an L4 balancer hashes anew) until
//! [`REPLICA_PROBE_MISSES`] new connections in a row found only instances it holds, and again
//! whenever a connection is lost and every [`REPLICA_RECHECK_INTERVAL`]; at most
//! `max_edge_replicas` links per address. A connection that finds an instance already held is
//! closed at once (the edge, seeing itself in the hello's `holds` label, does not mistake it for
//! a reconnect).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::link::{Link, LinkEvent};
use crate::metrics::OutcomeLabels;
use crate::tunnel::TunnelClient;

/// New connections in a row that must find only known instances before the agent believes it
/// holds every replica behind an address. With two replicas behind a balancer that spreads
/// connections evenly, eight misses leave a replica unfound in 0.4% of searches (and the
/// periodic re-check finds it then); each probe costs one handshake.
pub const REPLICA_PROBE_MISSES: u32 = 8;

/// How long after a probe's outcome the next probe starts: back to back, but never a busy loop.
const PROBE_GAP: Duration = Duration::from_millis(20);

/// How often an address whose replicas were all found is probed once more, to find a replica
/// that started since (a scale-out, a redeploy the agent did not see as a lost connection).
pub const REPLICA_RECHECK_INTERVAL: Duration = Duration::from_secs(30);

/// One resolved address: its links and where the search for replicas behind it stands.
#[derive(Debug)]
struct Address {
    /// Cancelled when DNS no longer returns the address.
    retired: CancellationToken,
    /// Links running for it.
    links: usize,
    /// Probes in a row that found a known instance.
    misses: u32,
    /// When the next probe starts, if one is due.
    probe_at: Option<Instant>,
    /// When the last probe was scheduled by the periodic re-check.
    rechecked: Instant,
}

/// What the follower must do after an event or a tick.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Nothing.
    None,
    /// Start a link for the address (a probe when `probe`).
    Start {
        /// Whether it probes for another replica.
        probe: bool,
    },
}

impl Address {
    fn new(now: Instant) -> Self {
        Self { retired: CancellationToken::new(), links: 1, misses: 0, probe_at: None, rechecked: now }
    }

    /// Records a link event; says whether a link must be started at once.
    fn on_event(&mut self, event: LinkEvent, now: Instant) -> Action {
        match event {
            LinkEvent::Found { .. } | LinkEvent::Lost { .. } => {
                self.misses = 0;
                self.probe_at.get_or_insert(now + PROBE_GAP);
                Action::None
            }
            LinkEvent::Ended { duplicate, .. } => {
                self.links = self.links.saturating_sub(1);
                if duplicate {
                    self.misses += 1;
                    if self.misses < REPLICA_PROBE_MISSES {
                        self.probe_at.get_or_insert(now + PROBE_GAP);
                    }
                }
                // A link ends as a duplicate only while another holds that instance; should
                // the last one end all the same, the address must not be left without any.
                if self.links == 0 && !self.retired.is_cancelled() {
                    self.links = 1;
                    return Action::Start { probe: false };
                }
                Action::None
            }
        }
    }

    /// Starts a due probe, unless the address has `max` links already; schedules the periodic
    /// re-check of an address whose search has ended.
    fn on_tick(&mut self, now: Instant, max: usize) -> Action {
        if self.probe_at.is_none() && now.duration_since(self.rechecked) >= REPLICA_RECHECK_INTERVAL {
            self.rechecked = now;
            self.misses = REPLICA_PROBE_MISSES.saturating_sub(1);
            self.probe_at = Some(now);
        }
        match self.probe_at {
            Some(at) if at <= now => {
                self.probe_at = None;
                if self.links >= max {
                    return Action::None;
                }
                self.links += 1;
                Action::Start { probe: true }
            }
            _ => Action::None,
        }
    }
}

/// Keeps one connection to every edge instance behind every configured edge until shutdown or
/// drain.
pub(crate) async fn run(client: Arc<TunnelClient>) {
    let followers = TaskTracker::new();
    for target in client.edges.clone() {
        followers.spawn(follow(client.clone(), target));
    }
    followers.close();
    followers.wait().await;
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

/// Follows one configured edge: resolves it now and every resolve interval, runs links for
/// each address, probes each address for replicas behind it, and retires the links of an
/// address DNS no longer returns (a replica that was replaced). A failed lookup keeps the
/// links there are.
async fn follow(client: Arc<TunnelClient>, target: String) {
    let links = TaskTracker::new();
    let (events_tx, mut events) = mpsc::unbounded_channel::<LinkEvent>();
    let mut addresses: HashMap<SocketAddr, Address> = HashMap::new();
    // An address literal resolves to itself; there is nothing to follow but its replicas.
    let literal = target.parse::<SocketAddr>().is_ok();
    let mut resolve_at = Instant::now();
    let start = |addr: SocketAddr, retired: &CancellationToken, probe: bool| {
        let link = Link::new(client.clone(), target.clone(), addr, retired.clone(), events_tx.clone(), probe);
        links.spawn(link.run());
    };
    loop {
        let now = Instant::now();
        if now >= resolve_at {
            match tokio::net::lookup_host(&target).await {
                Ok(found) => {
                    let found: BTreeSet<SocketAddr> = found.collect();
                    let (new, gone) = reconcile(&addresses.keys().copied().collect(), &found);
                    for addr in gone {
                        if let Some(address) = addresses.remove(&addr) {
                            info!(edge = %target, %addr, "edge address no longer resolves; not reconnecting to it");
                            address.retired.cancel();
                        }
                    }
                    for addr in new {
                        let address = Address::new(now);
                        start(addr, &address.retired, false);
                        addresses.insert(addr, address);
                    }
                    if found.is_empty() {
                        warn!(edge = %target, "edge name resolved to no address");
                    }
                }
                Err(e) => warn!(edge = %target, "cannot resolve the edge: {e}; keeping current connections"),
            }
            // Without a single address yet, retry as soon as a reconnect would.
            resolve_at = match (literal, addresses.is_empty()) {
                (_, true) => now + client.settings.reconnect_max,
                (true, false) => now + Duration::from_secs(365 * 24 * 3600),
                (false, false) => now + client.settings.edge_resolve_interval,
            };
        }
        let max = client.settings.max_edge_replicas;
        for (addr, address) in &mut addresses {
            if let Action::Start { probe } = address.on_tick(now, max) {
                start(*addr, &address.retired, probe);
            }
        }
        let next_probe = addresses.values().filter_map(|a| a.probe_at).min();
        let next_recheck = addresses.values().map(|a| a.rechecked + REPLICA_RECHECK_INTERVAL).min();
        let wake = [Some(resolve_at), next_probe, next_recheck].into_iter().flatten().min().unwrap_or(resolve_at);
        tokio::select! {
            () = client.shutdown.cancelled() => break,
            () = client.draining.cancelled() => break,
            () = tokio::time::sleep_until(wake) => {}
            Some(event) = events.recv() => {
                let (addr, counted) = match event {
                    LinkEvent::Found { addr, probe } => (addr, probe.then_some("new")),
                    LinkEvent::Ended { addr, duplicate } => (addr, duplicate.then_some("known")),
                    LinkEvent::Lost { addr } => (addr, None),
                };
                if let Some(outcome) = counted {
                    client.metrics.replica_probes.get_or_create(&OutcomeLabels { outcome }).inc();
                }
                client.metrics.edge_instances.set(i64::try_from(client.held.count()).unwrap_or(i64::MAX));
                if let Some(address) = addresses.get_mut(&addr)
                    && let Action::Start { probe } = address.on_event(event, Instant::now())
                {
                    start(addr, &address.retired, probe);
                }
            }
        }
    }
    links.close();
    links.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::HeldInstances;

    fn addr() -> SocketAddr {
        "127.0.0.1:4433".parse().unwrap()
    }

    #[test]
    fn an_address_is_probed_until_enough_probes_in_a_row_find_known_replicas() {
        let t0 = Instant::now();
        let mut address = Address::new(t0);
        assert_eq!(address.on_tick(t0, 16), Action::None, "nothing is due before the first connection");
        address.on_event(LinkEvent::Found { addr: addr(), probe: false }, t0);
        let mut now = t0;
        let mut probes = 0;
        // Every probe finds a known replica: the search stops after REPLICA_PROBE_MISSES of them.
        for _ in 0..100 {
            now += PROBE_GAP;
            if address.on_tick(now, 16) == (Action::Start { probe: true }) {
                probes += 1;
                address.on_event(LinkEvent::Ended { addr: addr(), duplicate: true }, now);
            }
        }
        assert_eq!(probes, REPLICA_PROBE_MISSES);
        assert_eq!(address.links, 1, "the first link stays");
        // A probe that finds a new replica starts the count again.
        let mut address = Address::new(t0);
        address.on_event(LinkEvent::Found { addr: addr(), probe: false }, t0);
        assert_eq!(address.on_tick(t0 + PROBE_GAP, 16), Action::Start { probe: true });
        address.on_event(LinkEvent::Found { addr: addr(), probe: true }, t0 + PROBE_GAP);
        assert_eq!(address.links, 2);
        assert_eq!(address.on_tick(t0 + PROBE_GAP * 2, 16), Action::Start { probe: true });
    }

    #[test]
    fn probes_stop_at_the_replica_bound_and_resume_on_a_loss_and_on_the_recheck() {
        let t0 = Instant::now();
        let mut address = Address::new(t0);
        address.on_event(LinkEvent::Found { addr: addr(), probe: false }, t0);
        assert_eq!(address.on_tick(t0 + PROBE_GAP, 1), Action::None, "one link is the bound");
        let mut address = Address::new(t0);
        address.misses = REPLICA_PROBE_MISSES;
        assert_eq!(address.on_tick(t0 + Duration::from_secs(1), 16), Action::None, "the search has ended");
        address.on_event(LinkEvent::Lost { addr: addr() }, t0 + Duration::from_secs(1));
        assert_eq!(
            address.on_tick(t0 + Duration::from_secs(2), 16),
            Action::Start { probe: true },
            "a loss looks again"
        );
        let mut address = Address::new(t0);
        address.misses = REPLICA_PROBE_MISSES;
        let later = t0 + REPLICA_RECHECK_INTERVAL;
        assert_eq!(address.on_tick(later, 16), Action::Start { probe: true }, "the periodic re-check probes once");
        address.on_event(LinkEvent::Ended { addr: addr(), duplicate: true }, later);
        assert_eq!(address.probe_at, None, "and stops if it finds nothing new");
    }

    #[test]
    fn the_last_link_of_an_address_is_replaced_if_it_ends() {
        let t0 = Instant::now();
        let mut address = Address::new(t0);
        assert_eq!(
            address.on_event(LinkEvent::Ended { addr: addr(), duplicate: true }, t0),
            Action::Start { probe: false }
        );
        address.retired.cancel();
        assert_eq!(address.on_event(LinkEvent::Ended { addr: addr(), duplicate: false }, t0), Action::None);
    }

    #[test]
    fn held_instances_are_claimed_once_and_listed_for_the_hello() {
        let held = HeldInstances::default();
        assert!(held.claim("a"));
        assert!(!held.claim("a"), "a second connection to one instance is a duplicate");
        assert!(held.claim("b"));
        let mut listed: Vec<String> = held.label().split(',').map(str::to_owned).collect();
        listed.sort();
        assert_eq!(listed, ["a", "b"]);
        held.release("a");
        assert!(held.claim("a"));
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
}
