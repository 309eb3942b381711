//! How many client connections the public listener holds open: in total, and per source
//! address. A connection over either cap is closed the moment it is accepted, before a byte is
//! read, so a flood from one host or many never starves the connections already served nor
//! leaves the edge without file descriptors for its tunnel. Trusted proxies (an ingress carrying
//! many clients) are held to the total only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

/// File descriptors kept back from client connections when the total cap is derived from the
/// open-file limit: the tunnel's sockets, agent connections, state files, the admin listener,
/// and connections lingering after an answer.
pub const FD_RESERVE: u64 = 256;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its total of connections.
    Total,
    /// The source address holds its share.
    PerSource,
}

impl Refused {
    /// The reason label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Total => "connections",
            Self::PerSource => "connections-per-source",
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The caps and the connections open now.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_source: usize,
    trusted: Vec<IpNet>,
    open: Mutex<Open>,
}

/// One admitted connection; its slot frees when this drops.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    source: Option<IpAddr>,
}

impl ConnectionLimits {
    /// Caps of `max_total` connections and `max_per_source` from one address (peers in `trusted`
    /// exempt from the latter). `fd_limit`, the open-file limit, lowers the total to leave
    /// [`FD_RESERVE`] descriptors free.
    pub fn new(max_total: usize, max_per_source: usize, trusted: Vec<IpNet>, fd_limit: Option<u64>) -> Self {
        let by_fds =
            fd_limit.map_or(usize::MAX, |n| usize::try_from(n.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX));
        Self { max_total: max_total.min(by_fds).max(1), max_per_source, trusted, open: Mutex::default() }
    }

    /// The total cap in force.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Admits a connection from `peer`, or says which cap it would break.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionPermit, Refused> {
        let per_source = !self.trusted.iter().any(|net| net.contains(&peer));
        let Ok(mut open) = self.open.lock() else { return Err(Refused::Total) };
        if open.total >= self.max_total {
            return Err(Refused::Total);
        }
        if per_source {
            let count = open.by_source.entry(peer).or_insert(0);
            if *count >= self.max_per_source {
                return Err(Refused::PerSource);
            }
            *count += 1;
        }
        open.total += 1;
        Ok(ConnectionPermit { limits: self.clone(), source: per_source.then_some(peer) })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().map_or(0, |open| open.total)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let Ok(mut open) = self.limits.open.lock() else { return };
        open.total = open.total.saturating_sub(1);
        if let Some(source) = self.source
            && let Some(count) = open.by_source.get_mut(&source)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_source_gets_its_share_and_others_still_get_in() {
        let limits = Arc::new(ConnectionLimits::new(10, 2, Vec::new(), None));
        let a1 = limits.admit(ip("198.51.100.1")).unwrap();
        let _a2 = limits.admit(ip("198.51.100.1")).unwrap();
        assert_eq!(limits.admit(ip("198.51.100.1")).unwrap_err(), Refused::PerSource);
        let _b = limits.admit(ip("198.51.100.2")).unwrap();
        drop(a1);
        assert!(limits.admit(ip("198.51.100.1")).is_ok(), "a closed connection frees its slot");
    }

    #[test]
    fn the_total_caps_everyone_and_trusted_proxies_skip_the_per_source_cap() {
        let limits = Arc::new(ConnectionLimits::new(3, 1, vec!["10.0.0.0/8".parse().unwrap()], None));
        let permits: Vec<_> = (0..3).map(|_| limits.admit(ip("10.1.2.3")).unwrap()).collect();
        assert_eq!(limits.admit(ip("198.51.100.9")).unwrap_err(), Refused::Total);
        drop(permits);
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn the_total_stays_below_the_open_file_limit() {
        assert_eq!(ConnectionLimits::new(10_000, 10, Vec::new(), Some(1024)).max_total(), 1024 - FD_RESERVE as usize);
        assert_eq!(ConnectionLimits::new(100, 10, Vec::new(), Some(1_000_000)).max_total(), 100);
        assert_eq!(ConnectionLimits::new(100, 10, Vec::new(), None).max_total(), 100);
    }
}
