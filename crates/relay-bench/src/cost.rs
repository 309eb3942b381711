//! The cost model: what one relayed media frame, one webhook and one open call cost a process,
//! from one run's measurements, and what a number of calls would cost at that rate, so an
//! operator can size an edge and an agent without driving the load themselves.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::media::MediaReport;
use crate::webhooks::WebhookReport;

/// Media frames per second each way in one call: ACS sends one every 20 ms.
pub const FRAMES_PER_SECOND_EACH_WAY: f64 = 50.0;

/// One process's costs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cost {
    /// CPU microseconds per media frame the process relayed (either direction).
    pub cpu_us_per_frame: f64,
    /// CPU microseconds per webhook the process relayed.
    pub cpu_us_per_webhook: f64,
    /// Resident memory per open call, in KiB.
    pub kib_per_call: f64,
}

impl Cost {
    /// CPU cores `calls` calls take at 50 frames a second each way, at this per-frame cost.
    pub fn cores_for_calls(&self, calls: f64) -> f64 {
        self.cpu_us_per_frame * calls * 2.0 * FRAMES_PER_SECOND_EACH_WAY / 1e6
    }

    /// Resident memory `calls` open calls take at this per-call cost, in MiB.
    pub fn mib_for_calls(&self, calls: f64) -> f64 {
        self.kib_per_call * calls / 1024.0
    }
}

/// CPU microseconds per frame for a process that used `cores` during `media`: every frame sent
/// and every echo received passed through it once.
pub fn per_frame_us(cores: f64, media: &MediaReport) -> f64 {
    let frames = (media.frames_sent + media.frames_received) as f64;
    if frames == 0.0 { 0.0 } else { cores * media.wall_seconds * 1e6 / frames }
}

/// CPU microseconds per webhook for a process that used `cores` while `hooks` ran.
pub fn per_webhook_us(cores: f64, hooks: &WebhookReport) -> f64 {
    if hooks.requests_per_second == 0.0 { 0.0 } else { cores * 1e6 / hooks.requests_per_second }
}

/// Each named process's costs from one side of a run.
pub fn costs(
    media_cores: &BTreeMap<String, f64>,
    webhook_cores: &BTreeMap<String, f64>,
    kib_per_call: &BTreeMap<String, f64>,
    media: &MediaReport,
    hooks: &WebhookReport,
) -> BTreeMap<String, Cost> {
    media_cores
        .iter()
        .map(|(name, cores)| {
            let cost = Cost {
                cpu_us_per_frame: per_frame_us(*cores, media),
                cpu_us_per_webhook: webhook_cores.get(name).map_or(0.0, |c| per_webhook_us(*c, hooks)),
                kib_per_call: kib_per_call.get(name).copied().unwrap_or(0.0),
            };
            (name.clone(), cost)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_frame_cost_counts_both_directions_and_scales_to_calls() {
        // 100 calls for 10 s: 50,000 frames each way; half a core for 10 s is 5 CPU seconds.
        let media =
            MediaReport { frames_sent: 50_000, frames_received: 50_000, wall_seconds: 10.0, ..Default::default() };
        let us = per_frame_us(0.5, &media);
        assert!((us - 50.0).abs() < 1e-9, "{us}");
        let cost = Cost { cpu_us_per_frame: us, ..Default::default() };
        // 1,000 calls: 100,000 frames a second through the process at 50 µs each.
        assert!((cost.cores_for_calls(1000.0) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn per_webhook_cost_is_cores_over_rate() {
        let hooks = WebhookReport { requests_per_second: 10_000.0, ..Default::default() };
        assert!((per_webhook_us(0.25, &hooks) - 25.0).abs() < 1e-9);
        assert_eq!(per_webhook_us(0.25, &WebhookReport::default()), 0.0);
    }
}
