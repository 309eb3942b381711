//! Media quality of one relayed WebSocket session, from the sizes and arrival times of its data
//! messages only (the audio is never parsed): per direction the frames and bytes, the time from
//! the upgrade to the first frame, gaps longer than a threshold (glitches) and the longest gap,
//! and an interarrival jitter estimate against ACS's 20 ms frame interval. The pump records each
//! data message with a few relaxed atomic stores (each direction has one writer); a live call
//! list may read a snapshot at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// ACS sends one media frame every 20 ms each way for the whole call.
pub const ACS_FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// A gap between two frames longer than this is a glitch: two frames in a row did not arrive on
/// time, which a listener hears. One late frame (a 40 ms gap) is ordinary network jitter that a
/// jitter buffer absorbs; three intervals is the shortest gap that is not.
pub const DEFAULT_GLITCH_GAP: Duration = Duration::from_millis(60);

/// One direction of a session, updated by that direction's pump alone.
#[derive(Debug, Default)]
struct Flow {
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Microseconds from the session's start to the first frame, plus one (0: none yet).
    first_us: AtomicU64,
    /// Microseconds from the session's start to the latest frame.
    last_us: AtomicU64,
    glitches: AtomicU64,
    longest_gap_us: AtomicU64,
    /// RFC 3550's interarrival jitter in microseconds, scaled by 16 (its integer form), with the
    /// frame interval as the expected spacing.
    jitter_us_x16: AtomicU64,
}

impl Flow {
    fn record(&self, now_us: u64, len: usize, glitch_gap_us: u64) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.frames.store(load(&self.frames) + 1, Ordering::Relaxed);
        self.bytes.store(load(&self.bytes).saturating_add(len as u64), Ordering::Relaxed);
        if load(&self.first_us) == 0 {
            self.first_us.store(now_us + 1, Ordering::Relaxed);
        } else {
            let gap = now_us.saturating_sub(load(&self.last_us));
            if gap > glitch_gap_us {
                self.glitches.store(load(&self.glitches) + 1, Ordering::Relaxed);
            }
            if gap > load(&self.longest_gap_us) {
                self.longest_gap_us.store(gap, Ordering::Relaxed);
            }
            let deviation = gap.abs_diff(ACS_FRAME_INTERVAL.as_micros() as u64);
            let jitter = load(&self.jitter_us_x16);
            let next = (jitter + deviation).saturating_sub((jitter + 8) >> 4);
            self.jitter_us_x16.store(next, Ordering::Relaxed);
        }
        self.last_us.store(now_us, Ordering::Relaxed);
    }

    fn snapshot(&self, now_us: u64) -> FlowQuality {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ms = |us: u64| us as f64 / 1000.0;
        let frames = load(&self.frames);
        let first = load(&self.first_us).checked_sub(1);
        let last = load(&self.last_us);
        let span_us = first.map_or(0, |first| last.saturating_sub(first));
        FlowQuality {
            frames,
            bytes: load(&self.bytes),
            first_frame_ms: first.map(ms),
            last_frame_age_ms: first.map(|_| ms(now_us.saturating_sub(last))),
            frames_per_second: if frames > 1 && span_us > 0 { (frames - 1) as f64 * 1e6 / span_us as f64 } else { 0.0 },
            glitches: load(&self.glitches),
            longest_gap_ms: ms(load(&self.longest_gap_us)),
            jitter_ms: ms(load(&self.jitter_us_x16) / 16),
        }
    }
}

/// One direction's figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowQuality {
    /// Data messages (text and binary; pings and pongs are not media).
    pub frames: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Milliseconds from the upgrade to the first frame, if one came.
    pub first_frame_ms: Option<f64>,
    /// Milliseconds since the latest frame, if one came.
    pub last_frame_age_ms: Option<f64>,
    /// Frames per second between the first frame and the latest (ACS: 50).
    pub frames_per_second: f64,
    /// Gaps between frames longer than the glitch threshold.
    pub glitches: u64,
    /// The longest gap between two frames, in milliseconds.
    pub longest_gap_ms: f64,
    /// Interarrival jitter against the 20 ms frame interval (RFC 3550's estimator), in
    /// milliseconds.
    pub jitter_ms: f64,
}

/// A session's figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Milliseconds since the session started.
    pub age_ms: f64,
    /// From the socket onto the tunnel (on the edge: the caller's audio).
    pub from_socket: FlowQuality,
    /// From the tunnel onto the socket (on the edge: the bot's audio).
    pub to_socket: FlowQuality,
}

/// The quality of one session as it runs.
#[derive(Debug)]
pub struct SessionQuality {
    started: tokio::time::Instant,
    glitch_gap_us: u64,
    from_socket: Flow,
    to_socket: Flow,
}

impl SessionQuality {
    /// Measurement for a session starting now, counting gaps over `glitch_gap` as glitches.
    pub fn new(glitch_gap: Duration) -> Self {
        Self {
            started: tokio::time::Instant::now(),
            glitch_gap_us: u64::try_from(glitch_gap.as_micros()).unwrap_or(u64::MAX),
            from_socket: Flow::default(),
            to_socket: Flow::default(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// A data message of `len` bytes came from the socket.
    pub(crate) fn socket_frame(&self, len: usize) {
        self.from_socket.record(self.now_us(), len, self.glitch_gap_us);
    }

    /// A data message of `len` bytes came from the tunnel, for the socket.
    pub(crate) fn tunnel_frame(&self, len: usize) {
        self.to_socket.record(self.now_us(), len, self.glitch_gap_us);
    }

    /// The figures now.
    pub fn snapshot(&self) -> Quality {
        let now = self.now_us();
        Quality {
            age_ms: now as f64 / 1000.0,
            from_socket: self.from_socket.snapshot(now),
            to_socket: self.to_socket.snapshot(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: u64 = 60_000;

    fn steady(flow: &Flow, from_us: u64, frames: u64, every_us: u64) -> u64 {
        let mut at = from_us;
        for _ in 0..frames {
            flow.record(at, 100, GAP);
            at += every_us;
        }
        at - every_us
    }

    #[test]
    fn a_steady_stream_has_no_glitch_its_rate_and_no_jitter() {
        let flow = Flow::default();
        let last = steady(&flow, 5_000, 50, 20_000);
        let q = flow.snapshot(last + 1_000);
        assert_eq!((q.frames, q.bytes, q.glitches), (50, 5_000, 0));
        assert_eq!(q.first_frame_ms, Some(5.0));
        assert!((q.frames_per_second - 50.0).abs() < 1e-9);
        assert_eq!(q.jitter_ms, 0.0);
        assert_eq!(q.longest_gap_ms, 20.0);
        assert_eq!(q.last_frame_age_ms, Some(1.0));
    }

    #[test]
    fn a_pause_is_one_glitch_as_long_as_the_pause() {
        let flow = Flow::default();
        let last = steady(&flow, 0, 10, 20_000);
        steady(&flow, last + 200_000, 10, 20_000);
        let q = flow.snapshot(0);
        assert_eq!(q.glitches, 1);
        assert_eq!(q.longest_gap_ms, 200.0);
        assert!(q.jitter_ms > 0.0);
    }

    #[test]
    fn half_the_rate_shows_as_such_without_glitches() {
        let flow = Flow::default();
        steady(&flow, 0, 26, 40_000);
        let q = flow.snapshot(0);
        assert!((q.frames_per_second - 25.0).abs() < 1e-9, "{}", q.frames_per_second);
        assert_eq!(q.glitches, 0);
        // Every gap is 20 ms off the interval: the estimator converges towards 20 ms.
        assert!(q.jitter_ms > 15.0 && q.jitter_ms <= 20.0, "{}", q.jitter_ms);
    }

    #[test]
    fn no_frame_means_no_first_frame_and_no_rate() {
        let q = Flow::default().snapshot(1_000);
        assert_eq!((q.frames, q.first_frame_ms, q.frames_per_second), (0, None, 0.0));
    }
}
