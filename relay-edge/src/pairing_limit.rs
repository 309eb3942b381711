//! Rate limit on failed pairing attempts, per source address: a token secret is 256 bits and
//! cannot be guessed, but token ids and secrets can be probed, and each attempt costs the edge a
//! handshake and a disk read. Time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failed attempts allowed from one address per window. An operator mistyping a token a few
/// times is never locked out; a script probing tokens is stopped at once.
pub const MAX_PAIRING_FAILURES: u32 = 5;

/// The window failures are counted over.
pub const PAIRING_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Addresses tracked at most. Past this, unknown addresses are refused until windows expire,
/// so a flood from many addresses cannot grow the table without bound.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct FailureLimiter {
    windows: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    /// Whether `ip` must be refused without looking at its request.
    pub fn is_limited(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.prune(now);
        match self.windows.get(&ip) {
            Some((_, failures)) => *failures >= MAX_PAIRING_FAILURES,
            None => self.windows.len() >= MAX_TRACKED_ADDRESSES,
        }
    }

    /// Counts a failed attempt from `ip`.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        self.prune(now);
        if self.windows.len() >= MAX_TRACKED_ADDRESSES && !self.windows.contains_key(&ip) {
            return;
        }
        let entry = self.windows.entry(ip).or_insert((now, 0));
        entry.1 = entry.1.saturating_add(1);
    }

    fn prune(&mut self, now: Instant) {
        self.windows.retain(|_, (started, _)| now.duration_since(*started) < PAIRING_FAILURE_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_the_allowed_failures_until_the_window_passes() {
        let mut limiter = FailureLimiter::default();
        let (ip, other) = ("198.51.100.1".parse().unwrap(), "198.51.100.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..MAX_PAIRING_FAILURES {
            assert!(!limiter.is_limited(ip, t0));
            limiter.record_failure(ip, t0);
        }
        assert!(limiter.is_limited(ip, t0));
        assert!(!limiter.is_limited(other, t0), "other addresses are unaffected");
        assert!(!limiter.is_limited(ip, t0 + PAIRING_FAILURE_WINDOW));
    }
}
