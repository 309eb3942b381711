//! Per-source request rate: a token bucket per client address. ACS delivers every call's
//! callbacks and media from a few shared addresses, so the default is generous; the limit is
//! there to stop a flood from one address, not to shape ACS. Time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Requests per second allowed from one address by default: enough for a thousand concurrent
/// calls' callbacks and media upgrades arriving through one ACS front end.
pub const DEFAULT_RATE_PER_SOURCE: u32 = 1000;

/// Addresses tracked at most; full (idle) buckets are dropped first, so only a flood from more
/// addresses than this could make the limiter refuse new ones.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// A token bucket per source address: `rate` tokens a second, holding at most two seconds' worth.
#[derive(Debug)]
pub struct SourceRateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl SourceRateLimiter {
    /// A limiter allowing `rate` requests a second per address, with bursts of twice that.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, burst: rate * 2.0, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `ip` at `now`; `false` means the request must be refused.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else { return true };
        if buckets.len() >= MAX_TRACKED_SOURCES && !buckets.contains_key(&ip) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + rate * now.duration_since(*at).as_secs_f64() < burst);
            if buckets.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + self.rate * now.duration_since(*at).as_secs_f64()).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let limiter = SourceRateLimiter::new(10);
        let (a, b): (IpAddr, IpAddr) = ("198.51.100.1".parse().unwrap(), "198.51.100.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..30).filter(|_| limiter.allow(a, t0)).count(), 20, "a burst of two seconds' worth");
        assert!(!limiter.allow(a, t0));
        assert!(limiter.allow(b, t0), "another source has its own bucket");
        let later = t0 + Duration::from_millis(500);
        assert_eq!((0..30).filter(|_| limiter.allow(a, later)).count(), 5, "then the rate: 10/s for 0.5 s");
    }
}
