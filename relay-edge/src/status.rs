//! The running edge's status file, `status.json` in the state directory: which agents are
//! connected, from where, on which certificate. The edge rewrites it atomically while it runs and
//! removes it on shutdown; `relay-edge agents` reads it. A file older than
//! [`STATUS_STALE_AFTER`] belongs to an edge that is no longer running.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file name inside the state directory.
pub const STATUS_FILE: &str = "status.json";

/// How often the running edge rewrites the file even when nothing changed, so readers can tell
/// a live edge from a crashed one.
pub const STATUS_HEARTBEAT: Duration = Duration::from_secs(5);

/// A status file not rewritten for this long (two heartbeats) is treated as left behind by an
/// edge that is no longer running.
pub const STATUS_STALE_AFTER: Duration = Duration::from_secs(10);

/// One live agent connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// The agent name.
    pub agent: String,
    /// Where it connected from.
    pub remote: String,
    /// `"quic"` (or a later transport).
    pub transport: String,
    /// The certificate serial the connection stands on.
    pub serial: String,
    /// When it connected, seconds since the Unix epoch.
    pub connected_at_unix: u64,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStatus {
    /// The edge's process id.
    pub pid: u32,
    /// When the file was written, seconds since the Unix epoch.
    pub updated_at_unix: u64,
    /// Live agent connections.
    pub connections: Vec<ConnectionStatus>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl EdgeStatus {
    /// Writes the file atomically.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        relay_pki::write_atomic(&state_dir.join(STATUS_FILE), &json, 0o644)
    }

    /// Reads the file if a running edge wrote it recently; `None` when there is no running edge
    /// (no file, a stale one, or one that does not parse).
    pub fn read_live(state_dir: &Path, now: SystemTime) -> Option<Self> {
        let text = std::fs::read(state_dir.join(STATUS_FILE)).ok()?;
        let status: EdgeStatus = serde_json::from_slice(&text).ok()?;
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        (now.saturating_sub(status.updated_at_unix) <= STATUS_STALE_AFTER.as_secs()).then_some(status)
    }

    /// Removes the file (the edge is stopping).
    pub fn remove(state_dir: &Path) {
        let _ = std::fs::remove_file(state_dir.join(STATUS_FILE));
    }
}
