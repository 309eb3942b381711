//! The edge's live call list: every open media session with its call's correlation id, agent,
//! transport, age and media quality so far. Served as JSON at `/calls` on the admin listener
//! and printed by `relay-edge calls`. A session is listed from its upgrade until it ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use relay_tunnel::quality::{FlowQuality, SessionQuality};
use serde::{Deserialize, Serialize};

/// Where the admin listener serves the list.
pub const CALLS_PATH: &str = "/calls";

/// The open sessions, by request id.
#[derive(Debug, Default)]
pub struct OpenCalls {
    calls: Mutex<BTreeMap<u64, NewCall>>,
}

/// One open call as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    /// The session's request id (as in the access log).
    pub request_id: u64,
    /// The call's correlation id, if the upgrade carried one.
    pub call: Option<String>,
    /// The agent carrying it.
    pub agent: String,
    /// The agent's tunnel transport (`quic` or `tcp`).
    pub transport: String,
    /// The route it came in on.
    pub route: String,
    /// Seconds since the upgrade.
    pub age_s: f64,
    /// The caller's audio, towards the bot.
    pub caller: FlowQuality,
    /// The bot's audio, towards the caller.
    pub bot: FlowQuality,
}

/// Lists a session while it lives; dropping it takes the session off the list.
#[derive(Debug)]
pub struct Listed {
    calls: Arc<OpenCalls>,
    request_id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        if let Ok(mut calls) = self.calls.calls.lock() {
            calls.remove(&self.request_id);
        }
    }
}

/// What a session is listed with.
#[derive(Debug)]
pub struct NewCall {
    /// The session's request id.
    pub request_id: u64,
    /// The call's correlation id, if known.
    pub call: Option<String>,
    /// The agent's name.
    pub agent: String,
    /// The agent's tunnel transport.
    pub transport: &'static str,
    /// The route.
    pub route: String,
    /// The session's quality, as the pump records it.
    pub quality: Arc<SessionQuality>,
}

impl OpenCalls {
    /// Lists `call` until the returned guard drops.
    pub fn list(self: &Arc<Self>, call: NewCall) -> Listed {
        let request_id = call.request_id;
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(request_id, call);
        }
        Listed { calls: self.clone(), request_id }
    }

    /// Every open call now, oldest first.
    pub fn snapshot(&self) -> Vec<CallView> {
        let Ok(calls) = self.calls.lock() else { return Vec::new() };
        calls
            .iter()
            .map(|(request_id, open)| {
                let quality = open.quality.snapshot();
                CallView {
                    request_id: *request_id,
                    call: open.call.clone(),
                    agent: open.agent.clone(),
                    transport: open.transport.to_owned(),
                    route: open.route.clone(),
                    age_s: quality.age_ms / 1000.0,
                    caller: quality.from_socket,
                    bot: quality.to_socket,
                }
            })
            .collect()
    }

    /// The list as JSON, for `/calls`.
    pub fn json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_else(|_| "[]".to_owned())
    }
}

/// The list as a table, one call per line.
pub fn render(calls: &[CallView]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<38} {:<12} {:<5} {:>8} {:>16} {:>16} {:>10} {:>12}\n",
        "CALL", "AGENT", "VIA", "AGE", "FRAMES IN/OUT", "RATE IN/OUT", "GLITCHES", "LAST FRAME"
    );
    for c in calls {
        let last = match (c.caller.last_frame_age_ms, c.bot.last_frame_age_ms) {
            (Some(a), Some(b)) => format!("{:.0} ms", a.min(b)),
            (Some(a), None) | (None, Some(a)) => format!("{a:.0} ms"),
            (None, None) => "none".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<38} {:<12} {:<5} {:>7.0}s {:>16} {:>16} {:>10} {:>12}",
            c.call.as_deref().unwrap_or("-"),
            c.agent,
            c.transport,
            c.age_s,
            format!("{}/{}", c.caller.frames, c.bot.frames),
            format!("{:.0}/{:.0}", c.caller.frames_per_second, c.bot.frames_per_second),
            format!("{}/{}", c.caller.glitches, c.bot.glitches),
            last,
        );
    }
    if calls.is_empty() {
        out.push_str("(no open calls)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_is_listed_while_its_guard_lives_and_renders_one_line() {
        let calls = Arc::new(OpenCalls::default());
        let quality = Arc::new(SessionQuality::new(std::time::Duration::from_millis(60)));
        let listed = calls.list(NewCall {
            request_id: 7,
            call: Some("corr-7".into()),
            agent: "bot-1".into(),
            transport: "quic",
            route: "media".into(),
            quality,
        });
        let now = calls.snapshot();
        assert_eq!(now.len(), 1);
        assert_eq!(
            (now[0].call.as_deref(), now[0].agent.as_str(), now[0].transport.as_str()),
            (Some("corr-7"), "bot-1", "quic")
        );
        let back: Vec<CallView> = serde_json::from_str(&calls.json()).unwrap();
        assert_eq!((back.len(), back[0].call.as_deref(), back[0].request_id), (1, Some("corr-7"), 7));
        let table = render(&now);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.lines().nth(1).unwrap().starts_with("corr-7"), "{table}");
        drop(listed);
        assert!(calls.snapshot().is_empty());
        assert!(render(&[]).contains("no open calls"));
    }
}
