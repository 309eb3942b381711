//! Reading a recording back and playing it against a bot: the webhooks in order, each media
//! WebSocket opened with its recorded path and headers, the caller's frames sent with their
//! recorded timing, and a report of what the bot answered against what it answered when the call
//! was recorded (status codes, frame counts, the first place they differ). Redacted header values
//! are not sent (there is nothing to send); [`PlayOptions::headers`] puts credentials back.

use std::io::BufRead;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::format::{CloseInfo, Entry, FORMAT_VERSION, Frame, FrameData, MediaOpen, Meta, Side, Webhook};
use crate::redact::REDACTED;

/// Longest line read from a recording. A line holds one media frame (ACS's are about a
/// kilobyte) or one webhook with its bodies (kept up to the agent's bound, 64 KiB by default);
/// 16 MiB leaves room for any bound an operator sets and keeps a corrupt file from being read
/// whole into memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How long the bot has to answer each replayed webhook or upgrade: the agent's own default.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long after a session's last recorded event the bot may still send frames or close. The
/// bot's answers to the caller's last frames arrive within milliseconds; a few seconds covers a
/// bot that finishes speaking.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(5);

/// Largest answer body read from the bot for comparison.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Headers a replayed request never copies from the recording: the client makes its own
/// connection and framing headers, and the WebSocket handshake's own.
const NOT_REPLAYED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
];

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("cannot read the recording: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not an entry.
    #[error("line {line}: {reason}")]
    Line {
        /// The line's number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The first line is not the recording's description.
    #[error("not a recording: the first line is not a `recording` entry")]
    NoMeta,
    /// Written in a format this player does not know.
    #[error("recording format {0} is not supported (this player reads {FORMAT_VERSION})")]
    Version(u32),
}

/// A recording read back: its description and its entries in time order.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The first line.
    pub meta: Meta,
    /// Every other line, ordered by `at_ms` (lines written in the same millisecond keep their
    /// order).
    pub entries: Vec<Entry>,
}

impl Recording {
    /// Reads JSON lines; a recording cut short (no `end` line) is read as far as it goes.
    pub fn read(mut reader: impl BufRead) -> Result<Self, ReadError> {
        let mut meta = None;
        let mut entries = Vec::new();
        let mut buf = Vec::new();
        for number in 1.. {
            buf.clear();
            let read = std::io::Read::take(&mut reader, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf)?;
            if read == 0 {
                break;
            }
            if buf.len() > MAX_LINE_BYTES {
                return Err(ReadError::Line { line: number, reason: format!("longer than {MAX_LINE_BYTES} bytes") });
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let entry: Entry =
                serde_json::from_slice(&buf).map_err(|e| ReadError::Line { line: number, reason: e.to_string() })?;
            match (entry, &meta) {
                (Entry::Recording(m), None) if m.version != FORMAT_VERSION => {
                    return Err(ReadError::Version(m.version));
                }
                (Entry::Recording(m), None) => meta = Some(m),
                (_, None) => return Err(ReadError::NoMeta),
                (entry, Some(_)) => entries.push(entry),
            }
        }
        let meta = meta.ok_or(ReadError::NoMeta)?;
        entries.sort_by(|a, b| a.at_ms().total_cmp(&b.at_ms()));
        Ok(Self { meta, entries })
    }

    /// Reads the recording at `path`.
    pub fn from_path(path: &std::path::Path) -> Result<Self, ReadError> {
        Self::read(std::io::BufReader::new(std::fs::File::open(path)?))
    }

    /// The webhooks, in time order.
    pub fn webhooks(&self) -> impl Iterator<Item = &Webhook> {
        self.entries.iter().filter_map(|e| if let Entry::Webhook(w) = e { Some(&**w) } else { None })
    }

    /// The frames `from` one side of `session`, in time order.
    pub fn frames(&self, session: u64, from: Side) -> impl Iterator<Item = &Frame> {
        self.entries.iter().filter_map(move |e| match e {
            Entry::Frame(f) if f.session == session && f.from == from => Some(f),
            _ => None,
        })
    }

    /// The media sessions opened, in time order.
    pub fn sessions(&self) -> impl Iterator<Item = &MediaOpen> {
        self.entries.iter().filter_map(|e| if let Entry::MediaOpen(o) = e { Some(o) } else { None })
    }

    /// Why the recording ended, if it says.
    pub fn end(&self) -> Option<&crate::format::End> {
        self.entries.iter().rev().find_map(|e| if let Entry::End(end) = e { Some(end) } else { None })
    }
}

/// Why a replay could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlayError {
    /// The target is not an `http://host:port` base URL.
    #[error("invalid target {0:?}: give the bot's base URL, e.g. http://127.0.0.1:8080")]
    Target(String),
    /// An extra header is not `Name: value`.
    #[error("invalid header {0:?}: expected `Name: value`")]
    Header(String),
}

/// Where and how to play a recording.
#[derive(Debug, Clone)]
pub struct PlayOptions {
    /// The bot's base URL (`http://host:port`).
    pub target: Uri,
    /// Headers added to every replayed request, over recorded ones (credentials that were
    /// redacted).
    pub headers: Vec<(String, String)>,
    /// See [`DEFAULT_ANSWER_TIMEOUT`].
    pub answer_timeout: Duration,
    /// See [`DEFAULT_LINGER`].
    pub linger: Duration,
}

impl PlayOptions {
    /// Options for the bot at `target`, with the default timeouts.
    pub fn new(target: &str) -> Result<Self, PlayError> {
        let bad = || PlayError::Target(target.to_owned());
        let uri: Uri = target.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() || !matches!(uri.path(), "" | "/") {
            return Err(bad());
        }
        Ok(Self { target: uri, headers: Vec::new(), answer_timeout: DEFAULT_ANSWER_TIMEOUT, linger: DEFAULT_LINGER })
    }

    /// Adds a `Name: value` header to every replayed request.
    pub fn header(&mut self, text: &str) -> Result<(), PlayError> {
        let (name, value) = text.split_once(':').ok_or_else(|| PlayError::Header(text.to_owned()))?;
        let (name, value) = (name.trim(), value.trim());
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || http::HeaderValue::from_str(value).is_err() {
            return Err(PlayError::Header(name.to_owned()));
        }
        self.headers.push((name.to_ascii_lowercase(), value.to_owned()));
        Ok(())
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        let authority = self.target.authority().map(|a| a.as_str()).unwrap_or_default();
        let path = if path.starts_with('/') { path } else { "/" };
        format!("{scheme}://{authority}{path}")
    }

    /// The headers to send for recorded `headers`: redacted and connection-level ones left out,
    /// the extra ones over them.
    fn request_headers<'a>(&'a self, headers: &'a [(String, String)]) -> impl Iterator<Item = (&'a str, &'a str)> {
        let replaced = |name: &str| self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        headers
            .iter()
            .filter(move |(name, value)| value != REDACTED && !NOT_REPLAYED.contains(&name.as_str()) && !replaced(name))
            .chain(self.headers.iter())
            .map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// The HTTP client replays use.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client for [`send_webhook`].
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The bot's answer to a replayed webhook.
#[derive(Debug, Clone)]
pub struct Answered {
    /// Its status.
    pub status: u16,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its body (up to [`MAX_ANSWER_BYTES`]).
    pub body: Bytes,
    /// Time from sending to the whole answer.
    pub elapsed: Duration,
}

/// Sends one recorded webhook to the bot and reads its whole answer; `Err` says why there was
/// none.
pub async fn send_webhook(client: &HttpClient, options: &PlayOptions, hook: &Webhook) -> Result<Answered, String> {
    let body = hook.body.bytes().map_err(|e| format!("the recorded body is not valid base64: {e}"))?;
    let mut request = Request::builder().method(hook.method.as_str()).uri(options.url("http", &hook.path));
    for (name, value) in options.request_headers(&hook.headers) {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| format!("cannot make the request: {e}"))?;
    let started = Instant::now();
    let exchange = async {
        let response = client.request(request).await.map_err(|e| error_chain(&e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES);
        let body = limited.collect().await.map_err(|e| format!("answer body: {e}"))?.to_bytes();
        Ok(Answered { status, headers, body, elapsed: started.elapsed() })
    };
    tokio::time::timeout(options.answer_timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", options.answer_timeout)))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What happened to one replayed webhook.
#[derive(Debug, Clone)]
pub struct WebhookResult {
    /// Offset in the recording.
    pub at_ms: f64,
    /// Method and path as recorded.
    pub method: String,
    /// Path (query values redacted).
    pub path: String,
    /// The status the bot answered when recorded (none if it failed then).
    pub recorded: Option<u16>,
    /// The status it answered now, or why it did not.
    pub got: Result<u16, String>,
    /// Whether the answer's body matched the recorded one (as far as it was kept).
    pub same_body: bool,
}

impl WebhookResult {
    /// How it differs from the recording, if it does.
    fn divergence(&self) -> Option<String> {
        let what = format!("webhook {} {} at {:.0} ms", self.method, self.path, self.at_ms);
        match (&self.got, self.recorded) {
            (Err(why), _) => Some(format!("{what}: no answer ({why})")),
            (Ok(got), Some(recorded)) if *got != recorded => Some(format!("{what}: recorded {recorded}, got {got}")),
            (Ok(got), None) => Some(format!("{what}: the bot failed when recorded, answered {got} now")),
            (Ok(_), Some(_)) if !self.same_body => Some(format!("{what}: same status, different body")),
            _ => None,
        }
    }
}

/// What happened to one replayed media session.
#[derive(Debug, Clone)]
pub struct SessionResult {
    /// The session's number in the recording.
    pub session: u64,
    /// Offset in the recording.
    pub at_ms: f64,
    /// Path (query values redacted).
    pub path: String,
    /// The upgrade's status when recorded.
    pub recorded_status: u16,
    /// The upgrade's status now, or why there was none.
    pub status: Result<u16, String>,
    /// Caller frames in the recording, and how many were sent now.
    pub caller_frames: (usize, usize),
    /// Bot data frames in the recording, and how many it sent now.
    pub bot_frames: (usize, usize),
    /// The bot's close (code) when recorded, and now (`None`: it did not close).
    pub bot_close: (Option<Option<u16>>, Option<Option<u16>>),
    /// Where the bot's frames first differ from the recorded ones.
    pub frame_divergence: Option<String>,
}

impl SessionResult {
    fn divergence(&self) -> Option<String> {
        let what = format!("media session {} ({}) at {:.0} ms", self.session, self.path, self.at_ms);
        match &self.status {
            Err(why) => return Some(format!("{what}: no answer to the upgrade ({why})")),
            Ok(status) if *status != self.recorded_status => {
                return Some(format!("{what}: upgrade recorded {}, got {status}", self.recorded_status));
            }
            Ok(_) => {}
        }
        if let Some(frame) = &self.frame_divergence {
            return Some(format!("{what}: {frame}"));
        }
        if self.caller_frames.1 < self.caller_frames.0 {
            return Some(format!(
                "{what}: only {} of {} caller frames could be sent",
                self.caller_frames.1, self.caller_frames.0
            ));
        }
        if self.bot_close.0.is_some() && self.bot_close.0 != self.bot_close.1 {
            return Some(format!(
                "{what}: the bot closed with {}, recorded {}",
                show_close(self.bot_close.1),
                show_close(self.bot_close.0)
            ));
        }
        None
    }
}

fn show_close(close: Option<Option<u16>>) -> String {
    match close {
        None => "no close".into(),
        Some(None) => "a close without a code".into(),
        Some(Some(code)) => code.to_string(),
    }
}

/// What a replay found.
#[derive(Debug, Clone)]
pub struct PlayReport {
    /// The recording's description.
    pub meta: Meta,
    /// The bot's base URL.
    pub target: String,
    /// Each webhook, in order.
    pub webhooks: Vec<WebhookResult>,
    /// Each media session, in order.
    pub sessions: Vec<SessionResult>,
    /// How long the replay took.
    pub elapsed: Duration,
}

impl PlayReport {
    /// The first place, in the recording's time order, where the bot answered differently.
    pub fn first_divergence(&self) -> Option<String> {
        let hooks = self.webhooks.iter().filter_map(|w| w.divergence().map(|d| (w.at_ms, d)));
        let sessions = self.sessions.iter().filter_map(|s| s.divergence().map(|d| (s.at_ms, d)));
        hooks.chain(sessions).min_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, d)| d)
    }

    /// Whether the bot answered everything as recorded.
    pub fn matches(&self) -> bool {
        self.first_divergence().is_none()
    }

    /// The report for a terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let started = std::time::UNIX_EPOCH + Duration::from_millis(self.meta.started_unix_ms);
        let _ = writeln!(
            out,
            "replayed call {} (recorded by {} at {}) against {} in {:.1} s",
            self.meta.call,
            self.meta.agent,
            humantime::format_rfc3339_seconds(started),
            self.target,
            self.elapsed.as_secs_f64()
        );
        for hook in &self.webhooks {
            let recorded = hook.recorded.map_or_else(|| "failed".to_owned(), |s| s.to_string());
            let got = match &hook.got {
                Ok(status) => status.to_string(),
                Err(why) => format!("no answer ({why})"),
            };
            let body = if hook.same_body { "same body" } else { "different body" };
            let _ = writeln!(
                out,
                "  webhook  {:>8.0} ms  {} {}  recorded {recorded}, got {got}, {body}",
                hook.at_ms, hook.method, hook.path
            );
        }
        for s in &self.sessions {
            let status = match &s.status {
                Ok(status) => status.to_string(),
                Err(why) => format!("no answer ({why})"),
            };
            let _ = writeln!(
                out,
                "  media    {:>8.0} ms  session {} {}  upgrade recorded {}, got {status}; caller frames sent {}/{}; bot frames {} (recorded {}); bot close {} (recorded {})",
                s.at_ms,
                s.session,
                s.path,
                s.recorded_status,
                s.caller_frames.1,
                s.caller_frames.0,
                s.bot_frames.1,
                s.bot_frames.0,
                show_close(s.bot_close.1),
                show_close(s.bot_close.0),
            );
        }
        match self.first_divergence() {
            None => out.push_str("result: the bot answered as recorded\n"),
            Some(first) => {
                let _ = writeln!(out, "result: first divergence: {first}");
            }
        }
        out
    }
}

fn offset(at_ms: f64) -> Duration {
    Duration::try_from_secs_f64(at_ms / 1000.0).unwrap_or_default()
}

/// Plays `recording` against the bot in `options`, keeping the recorded timing, and reports.
pub async fn play(recording: &Recording, options: &PlayOptions) -> PlayReport {
    let start = Instant::now();
    let sessions = recording.sessions().map(|open| play_session(recording, open, options, start));
    let webhooks = async {
        let client = http_client();
        let mut results = Vec::new();
        for hook in recording.webhooks() {
            tokio::time::sleep_until(start + offset(hook.at_ms)).await;
            let got = send_webhook(&client, options, hook).await;
            let same_body = match &got {
                Ok(answer) => same_prefix(&hook.response_body, &answer.body),
                Err(_) => false,
            };
            results.push(WebhookResult {
                at_ms: hook.at_ms,
                method: hook.method.clone(),
                path: hook.path.clone(),
                recorded: hook.status,
                got: got.map(|a| a.status),
                same_body,
            });
        }
        results
    };
    let (webhooks, sessions) = tokio::join!(webhooks, futures_util::future::join_all(sessions));
    PlayReport {
        meta: recording.meta.clone(),
        target: options.target.to_string().trim_end_matches('/').to_owned(),
        webhooks,
        sessions,
        elapsed: start.elapsed(),
    }
}

/// Whether `got` matches the recorded body as far as the recording kept it.
fn same_prefix(recorded: &crate::format::Body, got: &[u8]) -> bool {
    let Ok(kept) = recorded.bytes() else { return false };
    if recorded.truncated { got.len() as u64 == recorded.len && got.starts_with(&kept) } else { kept == got }
}

/// The WebSocket message for a recorded caller frame (`None` if its payload is not valid base64).
fn to_message(data: &FrameData) -> Option<Message> {
    use base64::Engine;
    let decode = |b64: &str| base64::engine::general_purpose::STANDARD.decode(b64).ok();
    Some(match data {
        FrameData::Text(text) => Message::Text(text.as_str().into()),
        FrameData::Binary(b64) => Message::Binary(decode(b64)?.into()),
        FrameData::Ping(b64) => Message::Ping(decode(b64)?.into()),
        FrameData::Close(close) => Message::Close(close.as_ref().and_then(|c| {
            let code = CloseCode::from(c.code);
            code.is_allowed().then(|| CloseFrame { code, reason: c.reason.as_str().into() })
        })),
    })
}

/// A bot message as the recording would show it (`None` for pings and pongs).
fn from_message(msg: &Message) -> Option<FrameData> {
    Some(match msg {
        Message::Text(text) => FrameData::Text(text.as_str().to_owned()),
        Message::Binary(bytes) => FrameData::binary(bytes),
        Message::Close(close) => {
            FrameData::Close(close.as_ref().map(|c| CloseInfo { code: c.code.into(), reason: c.reason.to_string() }))
        }
        _ => return None,
    })
}

fn close_code(data: &FrameData) -> Option<Option<u16>> {
    match data {
        FrameData::Close(close) => Some(close.as_ref().map(|c| c.code)),
        _ => None,
    }
}

/// Where the bot's data frames first differ from the recorded ones.
fn frame_divergence(recorded: &[&Frame], got: &[FrameData]) -> Option<String> {
    for (index, expected) in recorded.iter().enumerate() {
        match got.get(index) {
            None => {
                return Some(format!(
                    "the bot sent {} frames, recorded {} (first missing: frame {} at {:.0} ms)",
                    got.len(),
                    recorded.len(),
                    index + 1,
                    expected.at_ms
                ));
            }
            Some(frame) if *frame != expected.data => {
                return Some(format!(
                    "bot frame {} (recorded at {:.0} ms): recorded {} of {} bytes, got {} of {} bytes",
                    index + 1,
                    expected.at_ms,
                    expected.data.kind(),
                    expected.data.len(),
                    frame.kind(),
                    frame.len()
                ));
            }
            Some(_) => {}
        }
    }
    (got.len() > recorded.len()).then(|| format!("the bot sent {} frames, recorded {}", got.len(), recorded.len()))
}

/// Replays one media session: opens it at its recorded time, sends the caller's frames on their
/// recorded schedule while reading what the bot sends, and compares.
async fn play_session(recording: &Recording, open: &MediaOpen, options: &PlayOptions, start: Instant) -> SessionResult {
    let caller: Vec<&Frame> = recording.frames(open.session, Side::Caller).collect();
    let bot_all: Vec<&Frame> = recording.frames(open.session, Side::Bot).collect();
    let bot_data: Vec<&Frame> = bot_all.iter().copied().filter(|f| close_code(&f.data).is_none()).collect();
    let recorded_close = bot_all.iter().find_map(|f| close_code(&f.data));
    let last_event = caller.iter().chain(bot_all.iter()).map(|f| f.at_ms).fold(open.at_ms, f64::max);
    let mut result = SessionResult {
        session: open.session,
        at_ms: open.at_ms,
        path: open.path.clone(),
        recorded_status: open.status,
        status: Err("not attempted".into()),
        caller_frames: (caller.len(), 0),
        bot_frames: (bot_data.len(), 0),
        bot_close: (recorded_close, None),
        frame_divergence: None,
    };
    tokio::time::sleep_until(start + offset(open.at_ms)).await;
    let mut request = match options.url("ws", &open.path).into_client_request() {
        Ok(request) => request,
        Err(e) => {
            result.status = Err(e.to_string());
            return result;
        }
    };
    for (name, value) in options.request_headers(&open.headers) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value))
        {
            request.headers_mut().append(name, value);
        }
    }
    let connected = tokio::time::timeout(options.answer_timeout, tokio_tungstenite::connect_async(request)).await;
    let ws = match connected {
        Ok(Ok((ws, response))) => {
            result.status = Ok(response.status().as_u16());
            ws
        }
        Ok(Err(WsError::Http(response))) => {
            result.status = Ok(response.status().as_u16());
            return result;
        }
        Ok(Err(e)) => {
            result.status = Err(e.to_string());
            return result;
        }
        Err(_) => {
            result.status = Err(format!("no answer within {:?}", options.answer_timeout));
            return result;
        }
    };
    let (mut sink, mut source) = ws.split();
    let writer = async {
        let mut sent = 0;
        for frame in &caller {
            tokio::time::sleep_until(start + offset(frame.at_ms)).await;
            let Some(msg) = to_message(&frame.data) else { break };
            let closing = matches!(msg, Message::Close(_));
            if sink.send(msg).await.is_err() {
                break;
            }
            sent += 1;
            if closing {
                break;
            }
        }
        sent
    };
    let reader = async {
        let (mut got, mut close) = (Vec::new(), None);
        while let Some(Ok(msg)) = source.next().await {
            match from_message(&msg) {
                Some(data) if close_code(&data).is_some() => close = close_code(&data),
                Some(data) => got.push(data),
                None => {}
            }
        }
        (got, close)
    };
    let deadline = start + offset(last_event) + options.linger;
    let mut read = (Vec::new(), None);
    let sent = {
        tokio::pin!(reader);
        let (sent, done) = tokio::join!(writer, tokio::time::timeout_at(deadline, &mut reader));
        if let Ok(done) = done {
            read = done;
        }
        sent
    };
    let _ = tokio::time::timeout(options.linger, sink.close()).await;
    let (got, close) = read;
    result.caller_frames.1 = sent;
    result.bot_frames.1 = got.len();
    result.bot_close.1 = close;
    result.frame_divergence = frame_divergence(&bot_data, &got);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Body, End};

    fn meta() -> Entry {
        Entry::Recording(Meta {
            version: FORMAT_VERSION,
            call: "c".into(),
            agent: "a".into(),
            started_unix_ms: 0,
            redacted_headers: vec![],
        })
    }

    fn text(entries: &[Entry]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.line().to_vec()).collect()
    }

    #[test]
    fn a_recording_reads_back_in_time_order_and_bad_files_are_refused_with_their_line() {
        let late = Entry::Webhook(Box::new(Webhook { at_ms: 50.0, method: "POST".into(), ..Default::default() }));
        let early =
            Entry::Frame(Frame { at_ms: 10.0, session: 1, from: Side::Caller, data: FrameData::Text("a".into()) });
        let end = Entry::End(End { at_ms: 60.0, reason: "done".into(), dropped: 0 });
        let rec = Recording::read(&text(&[meta(), late.clone(), early.clone(), end])[..]).unwrap();
        assert_eq!(rec.entries[0], early);
        assert_eq!(rec.entries[1], late);
        assert_eq!(rec.end().map(|e| e.reason.as_str()), Some("done"));

        let err = Recording::read(&text(std::slice::from_ref(&early))[..]).unwrap_err();
        assert!(matches!(err, ReadError::NoMeta), "{err}");
        let mut bad = text(&[meta()]);
        bad.extend_from_slice(b"{\"type\":\"frame\"}\n");
        let err = Recording::read(&bad[..]).unwrap_err().to_string();
        assert!(err.starts_with("line 2:"), "{err}");
        let newer = Entry::Recording(Meta {
            version: FORMAT_VERSION + 1,
            call: "c".into(),
            agent: "a".into(),
            started_unix_ms: 0,
            redacted_headers: vec![],
        });
        assert!(matches!(Recording::read(&text(&[newer])[..]), Err(ReadError::Version(_))));
    }

    #[test]
    fn replayed_requests_leave_out_redacted_and_connection_headers_and_take_extra_ones() {
        let mut options = PlayOptions::new("http://127.0.0.1:9").unwrap();
        options.header("Authorization: Bearer new").unwrap();
        let recorded: Vec<(String, String)> = [
            ("authorization", REDACTED),
            ("content-length", "12"),
            ("x-ms-call-correlation-id", "c-1"),
            ("x-secret", REDACTED),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
        let sent: Vec<_> = options.request_headers(&recorded).collect();
        assert_eq!(sent, vec![("x-ms-call-correlation-id", "c-1"), ("authorization", "Bearer new")]);
        assert!(PlayOptions::new("https://bot").is_err() && PlayOptions::new("http://bot/api").is_err());
        assert!(options.header("no colon").is_err());
    }

    #[test]
    fn the_first_divergence_names_the_frame_and_the_counts() {
        let frame = |n: u8| Frame {
            at_ms: f64::from(n) * 20.0,
            session: 1,
            from: Side::Bot,
            data: FrameData::Text(n.to_string()),
        };
        let recorded = [frame(1), frame(2), frame(3)];
        let refs: Vec<&Frame> = recorded.iter().collect();
        let same: Vec<FrameData> = recorded.iter().map(|f| f.data.clone()).collect();
        assert_eq!(frame_divergence(&refs, &same), None);
        let other = vec![same[0].clone(), FrameData::Text("22".into()), same[2].clone()];
        let found = frame_divergence(&refs, &other).unwrap();
        assert!(found.starts_with("bot frame 2 (recorded at 40 ms)"), "{found}");
        let short = frame_divergence(&refs, &same[..1]).unwrap();
        assert!(short.contains("sent 1 frames, recorded 3"), "{short}");
        assert!(same_prefix(&Body::new(b"ab", 4), b"abcd") && !same_prefix(&Body::new(b"ab", 2), b"abc"));
    }
}
