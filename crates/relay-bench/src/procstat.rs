//! CPU time and memory of other processes, read from `/proc`.

use serde::Serialize;

/// Clock ticks per second in `/proc/PID/stat`. Linux reports CPU times in USER_HZ, which is 100
/// on every architecture it supports for user space (the kernel's own HZ may differ).
const USER_HZ: f64 = 100.0;

/// One reading of one process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// User + system CPU time so far, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory now, in KiB.
    pub rss_kib: u64,
    /// Peak resident memory so far, in KiB.
    pub peak_rss_kib: u64,
}

/// Reads `pid`'s CPU time and memory; `None` when the process is gone or `/proc` unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of the whole line are 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let (rss_kib, peak_rss_kib) = relay_testkit::procs::resident_kib(pid).unwrap_or_default();
    Some(ProcSample { cpu_seconds: (utime + stime) / USER_HZ, rss_kib, peak_rss_kib })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_sampled_and_spending_cpu_shows() {
        let before = sample(std::process::id()).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = sample(std::process::id()).unwrap();
        assert!(after.cpu_seconds > before.cpu_seconds);
        assert!(after.rss_kib > 0 && after.peak_rss_kib >= after.rss_kib);
    }
}
