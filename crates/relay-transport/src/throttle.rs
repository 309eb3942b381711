//! Logging what unauthenticated peers cause without letting them write the log. The first event
//! of a kind for a key (a source address, an agent name) is logged; later ones within the
//! interval are only counted, and the next one after it is logged as a summary with the count.
//! Time is passed in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a repeating event is summarised: a minute keeps an attacker's thousand connections,
/// or a revoked agent redialling every second, to one line a minute per source.
pub const DEFAULT_LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Keys tracked at most; past this, events from new keys share one key, so a flood from many
/// addresses cannot grow the table (and is still summarised).
const MAX_KEYS: usize = 4096;

/// The key events from untracked keys share once the table is full.
const OVERFLOW_KEY: &str = "(other sources)";

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it: the first of its kind for this key in a while.
    Log,
    /// Log a summary: this many like it happened (this one included) since the last line.
    Summary(u64),
    /// Count it silently.
    Quiet,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
}

/// Per-key log throttling.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    windows: Mutex<HashMap<String, Window>>,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_LOG_SUMMARY_INTERVAL)
    }
}

impl LogThrottle {
    /// A throttle that summarises at most once per `interval` per key.
    pub fn new(interval: Duration) -> Self {
        Self { interval, windows: Mutex::default() }
    }

    /// Decides what to do with an event for `key` at `now`.
    pub fn check(&self, key: &str, now: Instant) -> Verdict {
        let Ok(mut windows) = self.windows.lock() else { return Verdict::Quiet };
        if !windows.contains_key(key) && windows.len() >= MAX_KEYS {
            let interval = self.interval;
            windows.retain(|_, w| w.suppressed > 0 || now.duration_since(w.started) < interval);
        }
        let key = if windows.contains_key(key) || windows.len() < MAX_KEYS { key } else { OVERFLOW_KEY };
        match windows.get_mut(key) {
            None => {
                windows.insert(key.to_owned(), Window { started: now, suppressed: 0 });
                Verdict::Log
            }
            Some(window) if now.duration_since(window.started) >= self.interval => {
                let verdict =
                    if window.suppressed == 0 { Verdict::Log } else { Verdict::Summary(window.suppressed + 1) };
                *window = Window { started: now, suppressed: 0 };
                verdict
            }
            Some(window) => {
                window.suppressed += 1;
                Verdict::Quiet
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_then_counted_then_summarised_once_per_interval() {
        let throttle = LogThrottle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(throttle.check("198.51.100.1", t0), Verdict::Log);
        for i in 1..=999 {
            assert_eq!(throttle.check("198.51.100.1", t0 + Duration::from_millis(i)), Verdict::Quiet);
        }
        assert_eq!(throttle.check("198.51.100.2", t0), Verdict::Log, "each key has its own window");
        assert_eq!(throttle.check("198.51.100.1", t0 + Duration::from_secs(60)), Verdict::Summary(1000));
        assert_eq!(throttle.check("198.51.100.1", t0 + Duration::from_secs(61)), Verdict::Quiet);
        assert_eq!(throttle.check("198.51.100.2", t0 + Duration::from_secs(300)), Verdict::Log, "quiet keys log again");
    }

    #[test]
    fn a_flood_of_keys_shares_one_window_past_the_table_bound() {
        let throttle = LogThrottle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let logged = (0..MAX_KEYS + 500).filter(|i| throttle.check(&format!("key-{i}"), t0) == Verdict::Log).count();
        assert_eq!(logged, MAX_KEYS + 1, "one line for all the keys past the bound");
    }
}
