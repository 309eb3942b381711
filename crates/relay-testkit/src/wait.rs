//! Waiting on conditions with a deadline, never with a fixed sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is re-checked.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `true` or `deadline` passes; returns whether it held. The loop
/// is bounded by the deadline (and so by `deadline / POLL_INTERVAL` checks).
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
