//! Reconnection delays: exponential from an initial step to a cap, reset by a welcomed session,
//! each drawn from half to all of the current step so agents that lost one edge together spread
//! out.

use std::time::Duration;

/// How a connection attempt ended, as far as the delay before the next one cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The edge welcomed us and the connection later ended.
    Welcomed,
    /// The edge answered and refused, or the session failed before its welcome.
    Refused,
    /// The connection reached an edge instance another link holds.
    Duplicate,
    /// Nothing answered the handshakes.
    Unanswered,
}

/// The delay state of one link.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
    /// Attempts since the last welcomed session.
    pub failures: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, step: initial, failures: 0 }
    }

    /// The delay before the next attempt, given how the last one ended.
    pub fn after(&mut self, attempt: Attempt) -> Duration {
        match attempt {
            Attempt::Welcomed => {
                self.step = self.initial;
                self.failures = 0;
            }
            Attempt::Refused | Attempt::Duplicate => self.failures += 1,
            // Unanswered attempts cost the edge nothing, and the next try starts with a fresh
            // handshake: retry at once, jittered up to `initial` so a fleet does not align.
            Attempt::Unanswered => {
                self.failures += 1;
                return self.initial.mul_f64(fastrand::f64());
            }
        }
        let half = self.step / 2;
        let delay = half + half.mul_f64(fastrand::f64());
        if attempt == Attempt::Refused {
            self.step = (self.step * 2).min(self.max);
        }
        delay
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
            let delay = backoff.after(Attempt::Refused);
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
            ceiling = (ceiling * 2).min(MAX);
        }
        assert_eq!(backoff.failures, 20);
    }

    #[test]
    fn a_refused_connection_never_reconnects_without_a_delay() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10 {
            assert!(backoff.after(Attempt::Refused) >= INITIAL / 2);
        }
    }

    #[test]
    fn an_unanswered_try_is_retried_at_once_and_does_not_grow_the_backoff() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10 {
            assert!(backoff.after(Attempt::Unanswered) <= INITIAL);
        }
        assert_eq!(backoff.failures, 10);
        let refused = backoff.after(Attempt::Refused);
        assert!(refused >= INITIAL / 2 && refused <= INITIAL, "{refused:?}");
    }

    #[test]
    fn a_welcomed_session_resets_the_backoff() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10 {
            backoff.after(Attempt::Refused);
        }
        let delay = backoff.after(Attempt::Welcomed);
        assert!(delay <= INITIAL && delay >= INITIAL / 2);
        assert_eq!(backoff.failures, 0);
    }
}
