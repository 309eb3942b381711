//! `relay-edge agents`: one row per agent record and per pending token, joined with the status
//! files of every running edge replica on the state directory, as text or JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_pki::{AgentStatus, EdgeState, EdgeStateError};
use serde::Serialize;

use crate::status::EdgeStatus;

/// One live connection of a listed agent.
#[derive(Debug, Clone, Serialize)]
pub struct ListedConnection {
    /// The edge replica holding the connection (its host name).
    pub edge: String,
    /// Where it connected from.
    pub remote: String,
    /// The transport carrying it.
    pub transport: String,
}

/// One row of the listing.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    /// The agent name.
    pub name: String,
    /// `paired`, `revoked`, `pending token`, `expired token` or `corrupt`.
    pub state: String,
    /// Serial of the newest certificate.
    pub serial: Option<String>,
    /// Expiry of the newest certificate, or of the pending token.
    pub expires_at: Option<String>,
    /// Whether it is connected now; `None` when no edge is running on this state directory.
    pub connected: Option<bool>,
    /// Its live connections.
    pub connections: Vec<ListedConnection>,
    /// Why the record cannot be read (for `corrupt`).
    pub error: Option<String>,
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Builds the rows for a state directory at `now`.
pub fn agent_rows(state: &EdgeState, now: SystemTime) -> Result<Vec<AgentRow>, EdgeStateError> {
    let live = EdgeStatus::read_live(state.dir(), now, false);
    let connections_of = |name: &str| -> (Option<bool>, Vec<ListedConnection>) {
        if live.is_empty() {
            return (None, Vec::new());
        }
        let conns: Vec<ListedConnection> = live
            .iter()
            .flat_map(|status| {
                status.connections.iter().filter(|c| c.agent == name).map(|c| ListedConnection {
                    edge: status.replica.clone(),
                    remote: c.remote.clone(),
                    transport: c.transport.clone(),
                })
            })
            .collect();
        (Some(!conns.is_empty()), conns)
    };
    let mut rows = Vec::new();
    for entry in state.list_agents()? {
        let (connected, connections) = connections_of(&entry.name);
        rows.push(match entry.record {
            Ok(record) => AgentRow {
                state: match record.status {
                    AgentStatus::Paired => "paired".into(),
                    AgentStatus::Revoked => "revoked".into(),
                },
                serial: record.current().map(|c| c.serial.clone()),
                expires_at: record.current().map(|c| rfc3339(c.not_after_unix)),
                name: entry.name,
                connected,
                connections,
                error: None,
            },
            Err(error) => AgentRow {
                name: entry.name,
                state: "corrupt".into(),
                serial: None,
                expires_at: None,
                connected,
                connections,
                error: Some(error),
            },
        });
    }
    let now_unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for token in state.pending_tokens() {
        rows.push(AgentRow {
            name: token.agent,
            state: if token.expires_at_unix > now_unix { "pending token".into() } else { "expired token".into() },
            serial: None,
            expires_at: Some(rfc3339(token.expires_at_unix)),
            connected: None,
            connections: Vec::new(),
            error: None,
        });
    }
    Ok(rows)
}

/// Renders rows as an aligned table with a header.
pub fn render_text(rows: &[AgentRow]) -> String {
    let mut out = format!("{:<20} {:<14} {:<34} {:<22} {}\n", "NAME", "STATE", "SERIAL", "EXPIRES", "CONNECTED");
    for row in rows {
        let connected = match (row.connected, row.connections.as_slice()) {
            (None, _) if row.state == "paired" => "unknown (edge not running)".to_owned(),
            (None, _) | (Some(false), _) => "no".to_owned(),
            (Some(true), conns) => {
                let from: Vec<String> = conns.iter().map(|c| format!("{} ({})", c.remote, c.transport)).collect();
                format!("yes, from {}", from.join(", "))
            }
        };
        let _ = writeln!(
            out,
            "{:<20} {:<14} {:<34} {:<22} {}{}",
            row.name,
            row.state,
            row.serial.as_deref().unwrap_or("-"),
            row.expires_at.as_deref().unwrap_or("-"),
            connected,
            row.error.as_deref().map(|e| format!("  error: {e}")).unwrap_or_default()
        );
    }
    out
}

/// The listing for `state_dir`, as text or JSON.
pub fn list(state_dir: &Path, json: bool, now: SystemTime) -> Result<String, EdgeStateError> {
    let state = EdgeState::open(state_dir)?;
    let rows = agent_rows(&state, now)?;
    if json {
        Ok(serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into()) + "\n")
    } else {
        Ok(render_text(&rows))
    }
}
