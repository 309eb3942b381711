//! The recording format: JSON lines, one [`Entry`] each. A recording starts with its
//! [`Meta`] line; then come webhooks (request and the bot's answer), media sessions opened
//! ([`MediaOpen`]), their frames each way ([`Frame`]), their ends ([`MediaClose`]), and an
//! [`End`] line saying why the recording stopped. Every entry carries `at_ms`, its offset from
//! the recording's start, so a player can keep the call's timing; lines are written as exchanges
//! complete, so a webhook's line may come after frames that followed its start (a player sorts
//! by `at_ms`). The agent's inspected exchanges are [`Webhook`]s too.
//!
//! Text that is UTF-8 is kept as text (an ACS event or media frame stays readable); anything else
//! is base64.

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The version written in each recording's first line; a player refuses others.
pub const FORMAT_VERSION: u32 = 1;

/// One line of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// The first line: what was recorded, where, when.
    Recording(Meta),
    /// A webhook and the bot's answer (boxed: it is most of an entry's size, frames the most
    /// of a recording's lines).
    Webhook(Box<Webhook>),
    /// A media WebSocket the caller opened, and the bot's answer to the upgrade.
    MediaOpen(MediaOpen),
    /// One message of a media session.
    Frame(Frame),
    /// How a media session ended.
    MediaClose(MediaClose),
    /// The last line: why the recording stopped.
    End(End),
}

impl Entry {
    /// The entry as one JSON line, newline included.
    pub fn line(&self) -> Bytes {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    /// The entry's offset from the recording's start, in milliseconds (0 for the first line).
    pub fn at_ms(&self) -> f64 {
        match self {
            Self::Recording(_) => 0.0,
            Self::Webhook(w) => w.at_ms,
            Self::MediaOpen(o) => o.at_ms,
            Self::Frame(f) => f.at_ms,
            Self::MediaClose(c) => c.at_ms,
            Self::End(e) => e.at_ms,
        }
    }
}

/// A recording's first line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT_VERSION`] when written.
    pub version: u32,
    /// The call's correlation id.
    pub call: String,
    /// The agent that recorded it.
    pub agent: String,
    /// Wall-clock time of the recording's start (ms since the Unix epoch).
    pub started_unix_ms: u64,
    /// Header names whose values were replaced before recording.
    pub redacted_headers: Vec<String>,
}

/// A body as far as it was kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// The body's whole length in bytes, kept or not.
    pub len: u64,
    /// What was kept, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// What was kept, base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
    /// Whether the body was longer than what was kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl Body {
    /// A body of `len` bytes of which `kept` were kept.
    pub fn new(kept: &[u8], len: u64) -> Self {
        let truncated = (kept.len() as u64) < len;
        match std::str::from_utf8(kept) {
            Ok(text) => Self { len, text: Some(text.to_owned()), base64: None, truncated },
            Err(_) => Self { len, text: None, base64: Some(base64_encode(kept)), truncated },
        }
    }

    /// The kept bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        match (&self.text, &self.base64) {
            (Some(text), _) => Ok(text.as_bytes().to_vec()),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD.decode(encoded),
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// An exchange of a webhook (or, in the agent's inspection list, a media upgrade) and what the
/// bot answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    /// The inspection list's id for it (not in recordings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Offset from the recording's start (inspection: 0).
    #[serde(default)]
    pub at_ms: f64,
    /// Wall-clock time it arrived (ms since the Unix epoch).
    pub unix_ms: u64,
    /// The call it belongs to, when the edge or its body said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// The edge's id for it, which the edge's access log shows too.
    pub request_id: u64,
    /// A media upgrade rather than a webhook (inspection only: recordings have [`MediaOpen`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub websocket: bool,
    /// The request method.
    pub method: String,
    /// Path and query, query values redacted.
    pub path: String,
    /// End-to-end request headers, credentials redacted.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Body,
    /// The bot's status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The bot's response headers, credentials redacted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers: Vec<(String, String)>,
    /// The bot's response body.
    #[serde(default)]
    pub response_body: Body,
    /// Why the bot gave no answer (unreachable, timeout), when it gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Milliseconds until the bot's answer head.
    #[serde(default)]
    pub answer_ms: f64,
    /// Milliseconds until the exchange ended (answer body relayed).
    #[serde(default)]
    pub duration_ms: f64,
}

/// A media WebSocket the caller opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaOpen {
    /// Offset from the recording's start.
    pub at_ms: f64,
    /// Numbers the sessions of one recording (a call has one; a reconnect makes another).
    pub session: u64,
    /// Path and query, query values redacted.
    pub path: String,
    /// The upgrade's end-to-end headers, credentials redacted.
    pub headers: Vec<(String, String)>,
    /// The bot's status (101 when it accepted).
    pub status: u16,
    /// The bot's handshake response headers.
    pub response_headers: Vec<(String, String)>,
}

/// Which end of a media session sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// ACS, through the edge.
    Caller,
    /// The bot.
    Bot,
}

/// One message of a media session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// Offset from the recording's start.
    pub at_ms: f64,
    /// The session it belongs to.
    pub session: u64,
    /// Who sent it.
    pub from: Side,
    /// What it was.
    #[serde(flatten)]
    pub data: FrameData,
}

/// A media message's kind and payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameData {
    /// A text message (ACS's JSON audio frames).
    Text(String),
    /// A binary message, base64.
    Binary(String),
    /// A ping, its payload base64.
    Ping(String),
    /// A close, with its code and reason when it had them.
    Close(Option<CloseInfo>),
}

impl FrameData {
    /// A binary message.
    pub fn binary(bytes: &[u8]) -> Self {
        Self::Binary(base64_encode(bytes))
    }

    /// What kind of message it is, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Text(_) => "text",
            Self::Binary(_) => "binary",
            Self::Ping(_) => "ping",
            Self::Close(_) => "close",
        }
    }

    /// The payload's length in bytes (base64 payloads decoded).
    pub fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Binary(b64) | Self::Ping(b64) => b64.len() / 4 * 3,
            Self::Close(close) => close.as_ref().map_or(0, |c| c.reason.len() + 2),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A close frame's code and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseInfo {
    /// The close code.
    pub code: u16,
    /// The reason text.
    pub reason: String,
}

/// How a media session ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaClose {
    /// Offset from the recording's start.
    pub at_ms: f64,
    /// The session.
    pub session: u64,
    /// How the caller's side ended (as the relay describes it).
    pub caller_end: String,
    /// How the bot's side ended.
    pub bot_end: String,
}

/// The last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    /// Offset from the recording's start.
    pub at_ms: f64,
    /// Why the recording stopped.
    pub reason: String,
    /// Entries left out because the reader fell behind or a bound was reached.
    #[serde(default)]
    pub dropped: u64,
}

/// Creates a new recording file at `path`: never over an existing one (an earlier recording is
/// never lost), readable by its owner only (0600: it holds callbacks and the caller's audio).
pub fn create_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_reads_back_as_written() {
        let entries = vec![
            Entry::Recording(Meta {
                version: FORMAT_VERSION,
                call: "c-1".into(),
                agent: "bot-1".into(),
                started_unix_ms: 1,
                redacted_headers: vec!["authorization".into()],
            }),
            Entry::Webhook(Box::new(Webhook {
                method: "POST".into(),
                path: "/api?x=REDACTED".into(),
                body: Body::new(b"{}", 2),
                status: Some(200),
                ..Default::default()
            })),
            Entry::Frame(Frame { at_ms: 20.5, session: 1, from: Side::Caller, data: FrameData::Text("{}".into()) }),
            Entry::Frame(Frame { at_ms: 21.0, session: 1, from: Side::Bot, data: FrameData::binary(&[0, 255]) }),
            Entry::Frame(Frame {
                at_ms: 40.0,
                session: 1,
                from: Side::Caller,
                data: FrameData::Close(Some(CloseInfo { code: 1000, reason: "bye".into() })),
            }),
            Entry::Frame(Frame { at_ms: 41.0, session: 1, from: Side::Bot, data: FrameData::Close(None) }),
            Entry::End(End { at_ms: 50.0, reason: "call ended".into(), dropped: 0 }),
        ];
        for entry in entries {
            let line = entry.line();
            assert_eq!(line.last(), Some(&b'\n'));
            let back: Entry = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, entry, "{}", String::from_utf8_lossy(&line));
        }
    }

    #[test]
    fn a_body_keeps_text_as_text_and_anything_else_as_base64_and_says_when_it_was_cut() {
        let text = Body::new(b"{\"a\":1}", 7);
        assert_eq!((text.text.as_deref(), text.truncated), (Some("{\"a\":1}"), false));
        let binary = Body::new(&[0xff, 0x00], 10);
        assert!(binary.text.is_none() && binary.truncated);
        assert_eq!(binary.bytes().unwrap(), vec![0xff, 0x00]);
    }
}
