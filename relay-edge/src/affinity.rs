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
use hyper::body::{Body, Frame};

use crate::agents::{AgentSet, ConnectedAgent, NoAgent};
use relay_guard::request_body::{BodyReadError, TimedBody};

/// How long a call's pin outlives its last exchange when no media session is open. ACS sends
/// callbacks throughout a call; ten minutes of silence means the call is over.
pub const DEFAULT_AFFINITY_TTL: Duration = Duration::from_secs(600);

/// Largest body prefix buffered to find a key in it. ACS events are a few KiB.
pub const DEFAULT_AFFINITY_PREFIX_BYTES: usize = 64 * 1024;

/// Pins kept at most: far above the number of concurrent calls an edge serves; beyond it new
/// calls are spread without a pin rather than growing the table.
pub const DEFAULT_AFFINITY_MAX_PINS: usize = 100_000;

/// Key bytes the table holds at most, whatever the count: room for the 100,000 pins above with
/// ACS's 36-byte correlation ids, twice over. A flood of long keys fills this before the count.
pub const DEFAULT_AFFINITY_MAX_KEY_BYTES: usize = 8 * 1024 * 1024;

/// Longest key pinned. ACS correlation ids are GUIDs (36 bytes); 128 leaves room for any id a
/// custom route may carry. A longer or stranger key routes its exchange without a pin.
pub const MAX_KEY_LEN: usize = 128;

/// Whether `key` looks like a call id worth pinning: 1 to [`MAX_KEY_LEN`] bytes of
/// `[A-Za-z0-9._:-]`. Anything else comes from a client, not from ACS, and must not cost the
/// edge memory.
pub fn is_pinnable(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Where a route finds a call's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinitySource {
    /// A request header (the media upgrade's `x-ms-call-correlation-id`).
    Header(HeaderName),
    /// A JSON pointer into the body (`/0/data/correlationId` for Event Grid and CloudEvents); a
    /// pointer into an array's first element also reads a body that is one object.
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

    /// The key from a complete JSON body. A pointer into the first event of an array (`/0/...`)
    /// also finds the key in a body that is one event object: Event Grid delivers an array in its
    /// own schema but a single object with the CloudEvents schema, and ACS's default pointer
    /// must find the call in both, or the call's IncomingCall and callbacks split across agents.
    pub fn from_body(&self, body: &[u8]) -> Option<String> {
        let Self::JsonPointer(pointer) = self else { return None };
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let in_single_event = || {
            let rest = pointer.strip_prefix("/0").filter(|rest| rest.starts_with('/'))?;
            value.as_object()?;
            value.pointer(rest)
        };
        match value.pointer(pointer).or_else(in_single_event)? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Reads up to `limit` bytes of `body`. Returns the bytes read, whether the body ended within
/// them, and the rest of the body to forward after them.
pub async fn read_prefix(mut body: TimedBody, limit: usize) -> Result<(Bytes, bool, TimedBody), BodyReadError> {
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
    rest: TimedBody,
}

impl PrefixedBody {
    /// Joins a prefix read by [`read_prefix`] and the rest.
    pub fn new(prefix: Bytes, rest: TimedBody) -> Self {
        Self { prefix: (!prefix.is_empty()).then_some(prefix), rest }
    }
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
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

/// The pins of calls to agents, bounded in count and in key bytes.
#[derive(Debug)]
pub struct AffinityTable {
    pins: Mutex<Pins>,
    max_pins: usize,
    max_key_bytes: usize,
}

#[derive(Debug, Default)]
struct Pins {
    by_key: HashMap<String, Pin>,
    /// The sum of the keys' lengths.
    key_bytes: usize,
}

impl Default for AffinityTable {
    fn default() -> Self {
        Self::new(DEFAULT_AFFINITY_MAX_PINS, DEFAULT_AFFINITY_MAX_KEY_BYTES)
    }
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
    /// An empty table holding at most `max_pins` pins and `max_key_bytes` bytes of keys.
    pub fn new(max_pins: usize, max_key_bytes: usize) -> Self {
        Self { pins: Mutex::new(Pins::default()), max_pins, max_key_bytes }
    }

    /// The agent for an exchange of call `key`: its pinned agent while connected, otherwise the
    /// agent rendezvous hashing gives the key ([`AgentSet::pick_for_key`], so every edge replica
    /// agrees), which becomes the pin.
    pub fn choose(&self, key: &str, agents: &AgentSet, limit: usize, now: Instant) -> Result<Pinned, NoAgent> {
        let Ok(mut pins) = self.pins.lock() else {
            return agents.pick_for_key(key, limit).map(|agent| Pinned { agent, moved_from: None });
        };
        let mut moved_from = None;
        if let Some(pin) = pins.by_key.get_mut(key) {
            // A superseded connection's calls follow the agent to its newer connection.
            if let Some(agent) = agents.by_id(pin.agent_id).filter(|a| !a.is_superseded()) {
                pin.last_seen = now;
                return Ok(Pinned { agent, moved_from: None });
            }
            moved_from = Some(pin.agent_id);
        }
        let agent = agents.pick_for_key(key, limit)?;
        if let Some(pin) = pins.by_key.get_mut(key) {
            pin.agent_id = agent.id;
            pin.last_seen = now;
        } else if pins.by_key.len() < self.max_pins && pins.key_bytes + key.len() <= self.max_key_bytes {
            pins.key_bytes += key.len();
            pins.by_key.insert(key.to_owned(), Pin { agent_id: agent.id, last_seen: now, open_sessions: 0 });
        }
        Ok(Pinned { agent, moved_from })
    }

    /// A media session of call `key` opened (`true`) or closed (`false`); an open session keeps
    /// the pin however long the call lasts.
    pub fn session(&self, key: &str, open: bool, now: Instant) {
        if let Ok(mut pins) = self.pins.lock()
            && let Some(pin) = pins.by_key.get_mut(key)
        {
            pin.open_sessions = if open { pin.open_sessions + 1 } else { pin.open_sessions.saturating_sub(1) };
            pin.last_seen = now;
        }
    }

    /// Drops pins of calls that ended: no open session and no exchange for `ttl`.
    pub fn expire(&self, ttl: Duration, now: Instant) {
        if let Ok(mut pins) = self.pins.lock() {
            let Pins { by_key, key_bytes } = &mut *pins;
            by_key.retain(|key, pin| {
                let keep = pin.open_sessions > 0 || now.duration_since(pin.last_seen) < ttl;
                if !keep {
                    *key_bytes = key_bytes.saturating_sub(key.len());
                }
                keep
            });
        }
    }

    /// How many calls are pinned.
    pub fn len(&self) -> usize {
        self.pins.lock().map_or(0, |p| p.by_key.len())
    }

    /// The bytes of keys held.
    pub fn key_bytes(&self) -> usize {
        self.pins.lock().map_or(0, |p| p.key_bytes)
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
    fn only_ids_shaped_like_acs_correlation_ids_are_pinnable() {
        assert!(is_pinnable("4f1c1a52-0000-4000-8000-000000000001"));
        assert!(is_pinnable("call_1.leg:2"));
        assert!(is_pinnable(&"a".repeat(MAX_KEY_LEN)));
        assert!(!is_pinnable(&"a".repeat(MAX_KEY_LEN + 1)));
        for bad in ["", "a b", "a/b", "caf\u{e9}", "a\nb", "{}"] {
            assert!(!is_pinnable(bad), "{bad:?}");
        }
    }

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
        // CloudEvents schema: one event object instead of an array of events.
        assert_eq!(pointer.from_body(br#"{"data":{"correlationId":"obj"}}"#).as_deref(), Some("obj"));
        // Only an object stands for the first event: a pointer past an array's end finds nothing.
        assert_eq!(pointer.from_body(br#"[[{"data":{"correlationId":"x"}}]]"#), None);
        let custom = AffinitySource::JsonPointer("/data/id".into());
        assert_eq!(custom.from_body(br#"{"data":{"id":"plain"}}"#).as_deref(), Some("plain"));
    }
}
