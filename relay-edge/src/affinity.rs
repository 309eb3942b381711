//! Call affinity: every exchange of one call reaches the agent (bot replica) that took the
//! call's first exchange, because that replica holds the call's state. The key is ACS's
//! correlation id, which IncomingCall events, callbacks and the media upgrade all carry; each
//! route says where to find it. A pin lasts while the call's media session is open and for a
//! while after its last exchange; if its agent goes away the call moves to another one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderName;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};

use crate::agents::{AgentSet, ConnectedAgent, NoAgent};

/// How long a call's pin outlives its last exchange when no media session is open. ACS sends
/// callbacks throughout a call; ten minutes of silence means the call is over.
pub const DEFAULT_AFFINITY_TTL: Duration = Duration::from_secs(600);

/// Largest body prefix buffered to find a key in it. ACS events are a few KiB.
pub const DEFAULT_AFFINITY_PREFIX_BYTES: usize = 64 * 1024;

/// Pins kept at most: far above the number of concurrent calls an edge serves; beyond it new
/// calls are spread without a pin rather than growing the table.
const MAX_PINS: usize = 100_000;

/// Where a route finds a call's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinitySource {
    /// A request header (the media upgrade's `x-ms-call-correlation-id`).
    Header(HeaderName),
    /// A JSON pointer into the body (`/0/data/correlationId` for Event Grid and CloudEvents).
    JsonPointer(String),
    /// A path segment, counted from 0 after the leading `/`.
    PathSegment(usize),
}

impl AffinitySource {
    /// The key from the request head, for sources that do not need the body.
    pub fn from_head<B>(&self, req: &http::Request<B>) -> Option<String> {
        match self {
            Self::Header(name) => req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned),
            Self::PathSegment(n) => {
                req.uri().path().trim_start_matches('/').split('/').nth(*n).filter(|s| !s.is_empty()).map(str::to_owned)
            }
            Self::JsonPointer(_) => None,
        }
    }

    /// The key from a complete JSON body.
    pub fn from_body(&self, body: &[u8]) -> Option<String> {
        let Self::JsonPointer(pointer) = self else { return None };
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        match value.pointer(pointer)? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Reads up to `limit` bytes of `body`. Returns the bytes read, whether the body ended within
/// them, and the rest of the body to forward after them.
pub async fn read_prefix(mut body: Incoming, limit: usize) -> Result<(Bytes, bool, Incoming), hyper::Error> {
    let mut prefix = BytesMut::new();
    while prefix.len() <= limit {
        match body.frame().await {
            None => return Ok((prefix.freeze(), true, body)),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
        }
        if body.is_end_stream() {
            return Ok((prefix.freeze(), true, body));
        }
    }
    Ok((prefix.freeze(), false, body))
}

/// A body that yields a buffered prefix, then the rest of the original body.
#[derive(Debug)]
pub struct PrefixedBody {
    prefix: Option<Bytes>,
    rest: Incoming,
}

impl PrefixedBody {
    /// Joins a prefix read by [`read_prefix`] and the rest.
    pub fn new(prefix: Bytes, rest: Incoming) -> Self {
        Self { prefix: (!prefix.is_empty()).then_some(prefix), rest }
    }
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

#[derive(Debug)]
struct Pin {
    agent_id: u64,
    last_seen: Instant,
    open_sessions: usize,
}

/// The pins of calls to agents.
#[derive(Debug, Default)]
pub struct AffinityTable {
    pins: Mutex<HashMap<String, Pin>>,
}

/// What choosing an agent for a keyed exchange did.
#[derive(Debug)]
pub struct Pinned {
    /// The agent.
    pub agent: Arc<ConnectedAgent>,
    /// The call was pinned to an agent that is gone and moved to this one.
    pub moved_from: Option<u64>,
}

impl AffinityTable {
    /// The agent for an exchange of call `key`: its pinned agent while connected, otherwise the
    /// agent rendezvous hashing gives the key ([`AgentSet::pick_for_key`], so every edge replica
    /// agrees), which becomes the pin.
    pub fn choose(&self, key: &str, agents: &AgentSet, limit: usize, now: Instant) -> Result<Pinned, NoAgent> {
        let Ok(mut pins) = self.pins.lock() else {
            return agents.pick_for_key(key, limit).map(|agent| Pinned { agent, moved_from: None });
        };
        let mut moved_from = None;
        if let Some(pin) = pins.get_mut(key) {
            if let Some(agent) = agents.by_id(pin.agent_id) {
                pin.last_seen = now;
                return Ok(Pinned { agent, moved_from: None });
            }
            moved_from = Some(pin.agent_id);
        }
        let agent = agents.pick_for_key(key, limit)?;
        if pins.len() < MAX_PINS || pins.contains_key(key) {
            let open_sessions = pins.get(key).map_or(0, |p| p.open_sessions);
            pins.insert(key.to_owned(), Pin { agent_id: agent.id, last_seen: now, open_sessions });
        }
        Ok(Pinned { agent, moved_from })
    }

    /// A media session of call `key` opened (`true`) or closed (`false`); an open session keeps
    /// the pin however long the call lasts.
    pub fn session(&self, key: &str, open: bool, now: Instant) {
        if let Ok(mut pins) = self.pins.lock()
            && let Some(pin) = pins.get_mut(key)
        {
            pin.open_sessions = if open { pin.open_sessions + 1 } else { pin.open_sessions.saturating_sub(1) };
            pin.last_seen = now;
        }
    }

    /// Drops pins of calls that ended: no open session and no exchange for `ttl`.
    pub fn expire(&self, ttl: Duration, now: Instant) {
        if let Ok(mut pins) = self.pins.lock() {
            pins.retain(|_, pin| pin.open_sessions > 0 || now.duration_since(pin.last_seen) < ttl);
        }
    }

    /// How many calls are pinned.
    pub fn len(&self) -> usize {
        self.pins.lock().map_or(0, |p| p.len())
    }

    /// Whether no call is pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_in_headers_paths_and_json_bodies() {
        let mut req = http::Request::new(());
        *req.uri_mut() = "/api/callbacks/ctx-7/x".parse().unwrap();
        req.headers_mut().insert("x-ms-call-correlation-id", "c-1".parse().unwrap());
        assert_eq!(
            AffinitySource::Header(HeaderName::from_static("x-ms-call-correlation-id")).from_head(&req).as_deref(),
            Some("c-1")
        );
        assert_eq!(AffinitySource::PathSegment(2).from_head(&req).as_deref(), Some("ctx-7"));
        let pointer = AffinitySource::JsonPointer("/0/data/correlationId".into());
        assert_eq!(pointer.from_body(br#"[{"data":{"correlationId":"abc"}}]"#).as_deref(), Some("abc"));
        assert_eq!(pointer.from_body(b"[]"), None);
        assert_eq!(pointer.from_body(b"not json"), None);
    }
}
