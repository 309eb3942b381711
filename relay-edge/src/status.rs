//! The running edges' status files, `status/HOST-PID-PORT.json` in the state directory: which agents
//! are connected to each edge replica, from where, on which certificate. Each edge process
//! rewrites its own file atomically while it runs and removes it on shutdown, so replicas that
//! share a state directory never write the same file; `relay-edge agents` reads them all. A file
//! older than [`STATUS_STALE_AFTER`] belongs to an edge that is no longer running.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The directory of status files inside the state directory.
pub const STATUS_DIR: &str = "status";

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
    /// `"quic"` or `"tcp"`.
    pub transport: String,
    /// The certificate serial the connection stands on.
    pub serial: String,
    /// When it connected, seconds since the Unix epoch.
    pub connected_at_unix: u64,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStatus {
    /// The edge replica: its host name.
    pub replica: String,
    /// The edge's process id.
    pub pid: u32,
    /// The edge's tunnel port (several edges may run in one process, as tests do).
    pub tunnel_port: u16,
    /// When the file was written, seconds since the Unix epoch.
    pub updated_at_unix: u64,
    /// Live agent connections.
    pub connections: Vec<ConnectionStatus>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// This host's name, which names the replica in listings (a pod's name on Kubernetes).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "edge".to_owned())
}

impl EdgeStatus {
    /// This process's file.
    fn path(&self, state_dir: &Path) -> PathBuf {
        // Host names are [A-Za-z0-9.-]; anything else is replaced so the name stays one file.
        let host: String = self
            .replica
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        state_dir.join(STATUS_DIR).join(format!("{host}-{}-{}.json", self.pid, self.tunnel_port))
    }

    /// Writes this process's file atomically.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::create_dir_all(state_dir.join(STATUS_DIR))?;
        relay_pki::write_atomic(&self.path(state_dir), &json, 0o644)
    }

    /// Every file a running edge wrote recently, sorted by replica and pid. Stale and unreadable
    /// files are skipped (and stale ones removed when `prune`).
    pub fn read_live(state_dir: &Path, now: SystemTime, prune: bool) -> Vec<Self> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let Ok(entries) = std::fs::read_dir(state_dir.join(STATUS_DIR)) else {
            return Vec::new();
        };
        let mut live = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let Some(status) =
                std::fs::read(&path).ok().and_then(|text| serde_json::from_slice::<EdgeStatus>(&text).ok())
            else {
                continue;
            };
            if now.saturating_sub(status.updated_at_unix) <= STATUS_STALE_AFTER.as_secs() {
                live.push(status);
            } else if prune {
                let _ = std::fs::remove_file(&path);
            }
        }
        live.sort_by(|a, b| (&a.replica, a.pid, a.tunnel_port).cmp(&(&b.replica, b.pid, b.tunnel_port)));
        live
    }

    /// Removes this process's file (the edge is stopping).
    pub fn remove(&self, state_dir: &Path) {
        let _ = std::fs::remove_file(self.path(state_dir));
    }
}
