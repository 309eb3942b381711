//! Whole-call recordings. `relay-agent record` asks the admin listener for `/record?call=ID` (or
//! `/record` for the next call that arrives) and is sent the call as JSON lines while it happens:
//! its webhooks with the bot's answers, each media session's upgrade, every frame each way with
//! its time offset, and how each session ended ([`relay_record::format`]). With `record_dir`,
//! every call is recorded the same way into a file of its own, and the directory keeps the
//! newest calls within its bounds. A recording ends when the call does (`CallDisconnected`, or
//! its media ended and no callback came for the linger, or nothing came for the idle time), at
//! its size or duration bound (or the recording directory's byte bound), when the agent stops, or when its reader goes away. Frames are
//! handed over without waiting: a reader that falls behind loses frames, counted, rather than
//! slow the call or grow the agent.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use relay_proto::WsFrame;
use relay_record::format::{CloseInfo, End, FORMAT_VERSION, MediaClose};
use relay_record::{Entry, Frame, FrameData, MediaOpen, Meta, Side, Webhook};
use relay_runtime::admin::{Route, RouteAnswer, RouteRequest};
use relay_tunnel::websocket::{Crossing, FrameTap};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::InspectSettings;
use crate::metrics::AgentMetrics;

/// Where the admin listener serves recordings.
pub const RECORD_PATH: &str = "/record";

/// Lines a recording may hold queued for its reader: about 20 s of a call's media (100 frames a
/// second). A reader that falls further behind loses frames rather than grow the agent.
pub const RECORD_QUEUE_LINES: usize = 2048;

/// Bytes a recording file gathers before it is written: most of a second of a call's frames, so
/// a hundred recorded calls make a few hundred writes a second rather than one per frame (which
/// measured at 2.3 times the agent's CPU per frame), at 64 KiB of memory per recorded call.
const RECORD_FILE_BUFFER: usize = 64 * 1024;

/// How often a recording file is flushed while its call runs, so it can be read (`tail -f`)
/// with at most this much missing.
const RECORD_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes a recording file is written between two checks of the recording directory's byte bound
/// (about 75 s of one call; less under a small bound, see `DirFile::check_every`): often enough
/// that the directory overshoots by a few MiB per recorded call at most, rare enough that a
/// hundred recorded calls list it about once a second.
const DIR_CHECK_BYTES: u64 = 8 * 1024 * 1024;

/// Calls remembered whose directory recording a size bound stopped, so that their later
/// exchanges do not start a new file (which would push older recordings out to make room for
/// the rest of a call already cut): a thousand 36-byte ids, about a day of a busy bot's cut calls.
const CUT_CALLS_REMEMBERED: usize = 1024;

/// How long the last line of a recording may wait for room in the queue.
const END_LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest call id a recording may be asked for (ACS correlation ids are 36-byte GUIDs).
const MAX_CALL_ID_LEN: usize = 128;

/// ACS's event type for a new call, in both Event Grid schemas.
pub(crate) const INCOMING_CALL: &str = "Microsoft.Communication.IncomingCall";

/// ACS's callback for a call that ended.
pub(crate) const CALL_DISCONNECTED: &str = "Microsoft.Communication.CallDisconnected";

/// The events in a webhook body: each one's type and call correlation id. Event Grid posts an
/// array (its own schema and CloudEvents batches); a CloudEvents single delivery is one object.
pub(crate) fn events(body: &[u8]) -> Vec<(String, Option<String>)> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else { return Vec::new() };
    let events = match value {
        serde_json::Value::Array(events) => events,
        event => vec![event],
    };
    events
        .iter()
        .map(|event| {
            let kind =
                event.get("type").or_else(|| event.get("eventType")).and_then(|t| t.as_str()).unwrap_or_default();
            let call = event.pointer("/data/correlationId").and_then(|c| c.as_str()).map(str::to_owned);
            (kind.to_owned(), call)
        })
        .collect()
}

/// Milliseconds since the Unix epoch now, as recordings and the inspection list show times.
pub(crate) fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Which call a recording is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// This correlation id.
    Call(String),
    /// The next call whose IncomingCall arrives.
    Next,
}

/// One running recording.
#[derive(Debug)]
struct Recording {
    want: Mutex<Want>,
    /// Written to a file in the recording directory rather than to a reader.
    to_dir: bool,
    created: Instant,
    /// The start the offsets count from: the first recorded exchange's.
    t0: OnceLock<Instant>,
    /// Taken when the recording ends, which ends the reader's stream.
    lines: Mutex<Option<mpsc::Sender<Bytes>>>,
    bytes: AtomicU64,
    max_bytes: u64,
    dropped: AtomicU64,
    /// Set when the recording must stop before its call ends (a size bound was reached).
    full: CancellationToken,
    /// Why, when it is not the recording's own size bound.
    stopped_for: OnceLock<String>,
    open_media: AtomicUsize,
    media_ended: AtomicBool,
    sessions: AtomicU64,
    disconnected: AtomicBool,
    /// Milliseconds from `created` to the last exchange of the call.
    last_activity_ms: AtomicU64,
    changed: Notify,
}

impl Recording {
    fn call(&self) -> Option<String> {
        match &*self.want.lock().ok()? {
            Want::Call(call) => Some(call.clone()),
            Want::Next => None,
        }
    }

    fn is_for(&self, call: Option<&str>) -> bool {
        call.is_some_and(|call| self.call().as_deref() == Some(call))
    }

    /// Makes a recording of the next call record `call`; false if it already records one.
    fn claim(&self, call: &str) -> bool {
        let Ok(mut want) = self.want.lock() else { return false };
        if *want != Want::Next {
            return false;
        }
        *want = Want::Call(call.to_owned());
        true
    }

    /// Milliseconds from the recording's start to `at` (the first call makes `at` the start).
    fn at_ms(&self, at: Instant) -> f64 {
        let t0 = *self.t0.get_or_init(|| at);
        at.saturating_duration_since(t0).as_secs_f64() * 1000.0
    }

    /// Queues one line for the reader, or counts it dropped when the reader is behind or the
    /// size bound is reached.
    fn write(&self, entry: &Entry, metrics: &AgentMetrics) {
        if self.full.is_cancelled() {
            return;
        }
        let line = entry.line();
        let len = line.len() as u64;
        if self.bytes.load(Ordering::Relaxed).saturating_add(len) > self.max_bytes {
            self.full.cancel();
            return;
        }
        let Ok(lines) = self.lines.lock() else { return };
        let Some(lines) = lines.as_ref() else { return };
        match lines.try_send(line) {
            Ok(()) => {
                self.bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics.recording_lines_dropped.inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// The recordings running now.
#[derive(Debug)]
pub(crate) struct Recorders {
    settings: InspectSettings,
    agent: String,
    redacted: Vec<String>,
    active: Mutex<Vec<Arc<Recording>>>,
    count: AtomicUsize,
    /// The recording directory's files being written now, which its bounds never remove.
    writing: Arc<Mutex<HashSet<OsString>>>,
    /// Calls whose directory recording a size bound stopped, newest last.
    cut: Mutex<VecDeque<String>>,
    shutdown: CancellationToken,
    metrics: Arc<AgentMetrics>,
}

impl Recorders {
    pub fn new(
        settings: InspectSettings,
        agent: String,
        redacted: Vec<String>,
        metrics: Arc<AgentMetrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let writing = Arc::default();
        Self {
            settings,
            agent,
            redacted,
            active: Mutex::default(),
            count: AtomicUsize::new(0),
            writing,
            cut: Mutex::default(),
            shutdown,
            metrics,
        }
    }

    /// Whether any recording runs (the only check the data path makes when none does).
    fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    fn active(&self) -> Vec<Arc<Recording>> {
        if !self.any() {
            return Vec::new();
        }
        self.active.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn meta(&self, call: &str) -> Entry {
        Entry::Recording(Meta {
            version: FORMAT_VERSION,
            call: call.to_owned(),
            agent: self.agent.clone(),
            started_unix_ms: unix_ms_now(),
            redacted_headers: self.redacted.clone(),
        })
    }

    /// An exchange of `call` began at `started`: the recording directory starts recording the
    /// call, and recordings of it count their offsets from here at the latest, so an exchange
    /// that ends after a later one still comes first.
    pub fn began(self: &Arc<Self>, call: Option<&str>, started: Instant) {
        let Some(call) = call else { return };
        self.record_to_dir(call);
        for recording in self.active().into_iter().filter(|r| r.is_for(Some(call))) {
            recording.t0.get_or_init(|| started);
        }
    }

    /// Whether a recording waits for the next call (so request bodies are worth reading early).
    pub fn waiting_for_next(&self) -> bool {
        self.active().iter().any(|r| r.call().is_none())
    }

    /// A request's body has passed (before the bot answers it): a recording waiting for the
    /// next call takes the call an `IncomingCall` starts now, so that a media session the bot
    /// opens before it answers the webhook is recorded too.
    pub fn request_ended(self: &Arc<Self>, body: &[u8], started: Instant) {
        if !self.waiting_for_next() {
            return;
        }
        let incoming = events(body).into_iter().find_map(|(kind, call)| (kind == INCOMING_CALL).then_some(call));
        if let Some(Some(call)) = incoming {
            self.record_to_dir(&call);
            for recording in self.active() {
                self.claim(&recording, &call, started);
            }
        }
    }

    /// Makes `recording`, if it waits for the next call, record `call` from `started` on.
    fn claim(&self, recording: &Recording, call: &str, started: Instant) -> bool {
        if !recording.claim(call) {
            return false;
        }
        recording.t0.get_or_init(|| started);
        recording.write(&self.meta(call), &self.metrics);
        true
    }

    /// A webhook of `hook.call` finished: recordings of that call get it; a recording of the
    /// next call takes the call it starts (`IncomingCall`), if it did not when the body passed.
    pub fn webhook(self: &Arc<Self>, hook: &Webhook, started: Instant, events: &[(String, Option<String>)]) {
        let incoming = events.iter().find_map(|(kind, call)| (kind == INCOMING_CALL).then_some(call.clone())).flatten();
        let disconnected = events.iter().any(|(kind, _)| kind == CALL_DISCONNECTED);
        let call = hook.call.as_deref().or(incoming.as_deref());
        if let Some(call) = call {
            self.record_to_dir(call);
        }
        for recording in self.active() {
            let claimed = incoming.as_deref().is_some_and(|call| self.claim(&recording, call, started));
            if !claimed && !recording.is_for(call) {
                continue;
            }
            let mut entry = hook.clone();
            entry.at_ms = recording.at_ms(started);
            recording.write(&Entry::Webhook(Box::new(entry)), &self.metrics);
            if disconnected {
                recording.disconnected.store(true, Ordering::Relaxed);
            }
            recording.touch();
        }
    }

    /// A media session of `call` opened: recordings of that call get its upgrade, and a tap
    /// that hands them its frames.
    pub fn media(self: &Arc<Self>, call: Option<&str>, open: &MediaOpen, started: Instant) -> Option<Arc<MediaTap>> {
        if let Some(call) = call {
            self.record_to_dir(call);
        }
        let targets: Vec<(Arc<Recording>, u64)> = self
            .active()
            .into_iter()
            .filter(|r| r.is_for(call))
            .map(|recording| {
                let session = recording.sessions.fetch_add(1, Ordering::Relaxed) + 1;
                let entry = MediaOpen { at_ms: recording.at_ms(started), session, ..open.clone() };
                recording.write(&Entry::MediaOpen(entry), &self.metrics);
                recording.open_media.fetch_add(1, Ordering::Relaxed);
                recording.touch();
                (recording, session)
            })
            .collect();
        (!targets.is_empty()).then(|| Arc::new(MediaTap { targets, metrics: self.metrics.clone() }))
    }

    /// Starts a recording for `want`; its lines come on the returned channel.
    fn start(self: &Arc<Self>, want: Want) -> Result<mpsc::Receiver<Bytes>, (StatusCode, String)> {
        let limit = self.settings.max_recordings;
        let refused = |running: usize| {
            (StatusCode::TOO_MANY_REQUESTS, format!("{running} recordings are running already (max_recordings)"))
        };
        let mut active = self.active.lock().map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into()))?;
        let running = active.iter().filter(|r| !r.to_dir).count();
        if running >= limit {
            return Err(refused(running));
        }
        Ok(self.begin(&mut active, want, false))
    }

    /// Starts recording `call` into the recording directory, if there is one and it is not
    /// recorded there already (bounded like the directory: no more open than it keeps).
    fn record_to_dir(self: &Arc<Self>, call: &str) {
        let Some(dir) = &self.settings.record_dir else { return };
        let Ok(mut active) = self.active.lock() else { return };
        let open = active.iter().filter(|r| r.to_dir).count();
        if open >= self.settings.record_dir_max_calls || active.iter().any(|r| r.to_dir && r.is_for(Some(call))) {
            return;
        }
        if self.cut.lock().is_ok_and(|cut| cut.iter().any(|c| c == call)) {
            return;
        }
        let lines = self.begin(&mut active, Want::Call(call.to_owned()), true);
        let recording = active.last().cloned();
        drop(active);
        let Some(recording) = recording else { return };
        let file = DirFile {
            dir: dir.clone(),
            name: file_name(std::time::SystemTime::now(), call).into(),
            max_calls: self.settings.record_dir_max_calls,
            max_bytes: self.settings.record_dir_max_bytes,
            writing: self.writing.clone(),
        };
        tokio::spawn(file.write(recording, lines));
    }

    /// Registers a new recording in `active` (whose lock the caller holds) and starts watching it.
    fn begin(self: &Arc<Self>, active: &mut Vec<Arc<Recording>>, want: Want, to_dir: bool) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(RECORD_QUEUE_LINES);
        let recording = Arc::new(Recording {
            want: Mutex::new(want.clone()),
            to_dir,
            created: Instant::now(),
            t0: OnceLock::new(),
            lines: Mutex::new(Some(tx)),
            bytes: AtomicU64::new(0),
            max_bytes: self.settings.record_max_bytes,
            dropped: AtomicU64::new(0),
            full: CancellationToken::new(),
            stopped_for: OnceLock::new(),
            open_media: AtomicUsize::new(0),
            media_ended: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            disconnected: AtomicBool::new(false),
            last_activity_ms: AtomicU64::new(0),
            changed: Notify::new(),
        });
        active.push(recording.clone());
        self.count.store(active.len(), Ordering::Relaxed);
        if let Want::Call(call) = &want {
            recording.write(&self.meta(call), &self.metrics);
        }
        self.metrics.recordings.inc();
        tokio::spawn(self.clone().watch(recording));
        rx
    }

    /// Ends `recording` when its call ends or a bound is reached, with its `end` line.
    async fn watch(self: Arc<Self>, recording: Arc<Recording>) {
        let deadline = tokio::time::Instant::from_std(recording.created + self.settings.record_max_duration);
        let closed = recording.lines.lock().ok().and_then(|l| l.clone());
        let reason = loop {
            let fixed = recording.call().is_some();
            let idle = fixed && recording.open_media.load(Ordering::Relaxed) == 0;
            if idle && recording.disconnected.load(Ordering::Relaxed) {
                break "call disconnected".to_owned();
            }
            let mut wake = deadline;
            if idle && recording.t0.get().is_some() {
                let last = Duration::from_millis(recording.last_activity_ms.load(Ordering::Relaxed));
                let idle_end = tokio::time::Instant::from_std(recording.created + last + self.settings.record_idle);
                if tokio::time::Instant::now() >= idle_end {
                    break format!("nothing came for {:?} and no media was open", self.settings.record_idle);
                }
                wake = wake.min(idle_end);
            }
            if idle && recording.media_ended.load(Ordering::Relaxed) {
                let last = Duration::from_millis(recording.last_activity_ms.load(Ordering::Relaxed));
                let linger_end = tokio::time::Instant::from_std(recording.created + last + self.settings.record_linger);
                if tokio::time::Instant::now() >= linger_end {
                    break format!("media ended and no callback came for {:?}", self.settings.record_linger);
                }
                wake = wake.min(linger_end);
            }
            tokio::select! {
                () = async { if let Some(lines) = &closed { lines.closed().await } } => break "reader went away".to_owned(),
                () = self.shutdown.cancelled() => break "agent stopping".to_owned(),
                () = recording.full.cancelled() => break recording.stopped_for.get().cloned()
                    .unwrap_or_else(|| format!("size bound of {} bytes reached", recording.max_bytes)),
                () = recording.changed.notified() => {}
                () = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= deadline {
                        break format!("duration bound of {:?} reached", self.settings.record_max_duration);
                    }
                }
            }
        };
        drop(closed);
        if recording.to_dir
            && recording.full.is_cancelled()
            && let (Some(call), Ok(mut cut)) = (recording.call(), self.cut.lock())
        {
            if cut.len() >= CUT_CALLS_REMEMBERED {
                cut.pop_front();
            }
            cut.push_back(call);
        }
        if let Ok(mut active) = self.active.lock() {
            active.retain(|r| !Arc::ptr_eq(r, &recording));
            self.count.store(active.len(), Ordering::Relaxed);
        }
        self.metrics.recordings.dec();
        let lines = recording.lines.lock().ok().and_then(|mut l| l.take());
        if let Some(lines) = lines {
            let at_ms = recording.t0.get().map_or(0.0, |t0| t0.elapsed().as_secs_f64() * 1000.0);
            let dropped = recording.dropped.load(Ordering::Relaxed);
            let end = Entry::End(End { at_ms, reason: reason.clone(), dropped });
            let _ = tokio::time::timeout(END_LINE_TIMEOUT, lines.send(end.line())).await;
        }
        tracing::info!(call = ?recording.call(), reason, "recording ended");
    }

    /// The admin route: `/record?call=ID` or `/record` (the next call).
    pub fn route(self: Arc<Self>) -> Route {
        Arc::new(move |asked: RouteRequest<'_>| {
            if !asked.rest.is_empty() {
                return RouteAnswer::NotFound("no such path".into());
            }
            let want = match call_asked(asked.query) {
                Ok(Some(call)) => Want::Call(call),
                Ok(None) => Want::Next,
                Err(why) => return RouteAnswer::Refused(StatusCode::BAD_REQUEST, why),
            };
            match self.start(want) {
                Ok(lines) => RouteAnswer::Lines(lines),
                Err((status, why)) => RouteAnswer::Refused(status, why),
            }
        })
    }
}

/// Makes the recording directory (0700: it holds callbacks and audio) if it is missing, and
/// checks that it is a directory.
pub(crate) fn make_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    if !std::fs::metadata(dir)?.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok(())
}

/// A recording's file name: its start time (so names sort in time order) and its call.
fn file_name(at: std::time::SystemTime, call: &str) -> String {
    let stamp: String =
        humantime::format_rfc3339_millis(at).to_string().chars().filter(|c| !matches!(c, '-' | ':')).collect();
    format!("{stamp}-{call}.jsonl")
}

/// One recording's file in the recording directory, and the directory's bounds.
struct DirFile {
    dir: PathBuf,
    name: OsString,
    max_calls: usize,
    max_bytes: u64,
    writing: Arc<Mutex<HashSet<OsString>>>,
}

impl DirFile {
    /// Makes room for the file (the oldest finished recordings go), then writes `lines` to it
    /// (a new file, 0600) as they come. Every [`DIR_CHECK_BYTES`] written, the directory's byte
    /// bound is checked again; when the recordings being written fill it on their own, this one
    /// is stopped (its last line says why) rather than let the directory grow past it.
    async fn write(self, recording: Arc<Recording>, mut lines: mpsc::Receiver<Bytes>) {
        use tokio::io::AsyncWriteExt;
        if let Ok(mut writing) = self.writing.lock() {
            writing.insert(self.name.clone());
        }
        let path = self.dir.join(&self.name);
        let made = tokio::task::spawn_blocking({
            let (dir, path, writing) = (self.dir.clone(), path.clone(), self.writing.clone());
            let (max_calls, max_bytes) = (self.max_calls.saturating_sub(1), self.max_bytes);
            move || {
                prune(&dir, max_calls, max_bytes, &writing);
                relay_record::format::create_file(&path)
            }
        })
        .await
        .map_err(std::io::Error::other)
        .flatten();
        let file = match made {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!("cannot create a call recording: {e}");
                self.done();
                return;
            }
        };
        let mut out = tokio::io::BufWriter::with_capacity(RECORD_FILE_BUFFER, tokio::fs::File::from_std(file));
        let mut flush = tokio::time::interval(RECORD_FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unchecked: u64 = 0;
        loop {
            let written = tokio::select! {
                line = lines.recv() => match line {
                    Some(line) => {
                        unchecked = unchecked.saturating_add(line.len() as u64);
                        out.write_all(&line).await
                    }
                    None => break,
                },
                _ = flush.tick() => out.flush().await,
            };
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), "call recording stopped: {e}");
                self.done();
                return;
            }
            if unchecked >= self.check_every() {
                unchecked = 0;
                // What the buffer holds counts too.
                if out.flush().await.is_ok() && !self.room().await {
                    let why =
                        format!("the recording directory reached record_dir_max_bytes ({} bytes)", self.max_bytes);
                    tracing::warn!(path = %path.display(), "{why}: this call's recording stops");
                    let _ = recording.stopped_for.set(why);
                    recording.full.cancel();
                }
            }
        }
        if let Err(e) = out.flush().await {
            tracing::warn!(path = %path.display(), "call recording not fully written: {e}");
        }
        self.done();
    }

    /// Bytes written between two checks of the byte bound: [`DIR_CHECK_BYTES`], or a sixteenth
    /// of a bound so small that it would overshoot it by more than that.
    fn check_every(&self) -> u64 {
        (self.max_bytes / 16).clamp(1, DIR_CHECK_BYTES)
    }

    /// Removes the oldest finished recordings until the directory fits its byte bound; false
    /// when the recordings being written exceed it on their own.
    async fn room(&self) -> bool {
        let (dir, writing, max_calls, max_bytes) =
            (self.dir.clone(), self.writing.clone(), self.max_calls, self.max_bytes);
        tokio::task::spawn_blocking(move || prune(&dir, max_calls, max_bytes, &writing) <= max_bytes)
            .await
            .unwrap_or(true)
    }

    fn done(&self) {
        if let Ok(mut writing) = self.writing.lock() {
            writing.remove(&self.name);
        }
    }
}

/// Removes the oldest recordings in `dir` until at most `max_calls` remain and they hold at most
/// `max_bytes`, and returns how many bytes the recordings left hold. Only files named like
/// recordings (`*.jsonl`) are touched, and never one in `writing` (it counts, but stays).
fn prune(dir: &Path, max_calls: usize, max_bytes: u64, writing: &Mutex<HashSet<OsString>>) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut files: Vec<(OsString, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let meta = entry.metadata().ok()?;
            (meta.is_file() && name.to_str()?.ends_with(".jsonl")).then_some((name, meta.len()))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|(_, len)| len).sum();
    let mut count = files.len();
    for (name, len) in files {
        if count <= max_calls && total <= max_bytes {
            break;
        }
        if writing.lock().is_ok_and(|w| w.contains(&name)) {
            continue;
        }
        if std::fs::remove_file(dir.join(&name)).is_ok() {
            count -= 1;
            total = total.saturating_sub(len);
        }
    }
    total
}

/// The call id in a `/record` query (`call=ID`), checked: ids are GUID-like.
fn call_asked(query: Option<&str>) -> Result<Option<String>, String> {
    let Some(query) = query else { return Ok(None) };
    let mut call = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("call", id)) => call = Some(id),
            _ => return Err(format!("unknown parameter {pair:?} (expected call=ID)")),
        }
    }
    let Some(call) = call else { return Ok(None) };
    let shaped = !call.is_empty()
        && call.len() <= MAX_CALL_ID_LEN
        && call.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !shaped {
        return Err(format!("{call:?} is not a call id (letters, digits, - _ . :, at most {MAX_CALL_ID_LEN})"));
    }
    Ok(Some(call.to_owned()))
}

/// Hands a media session's frames to the recordings of its call.
#[derive(Debug)]
pub(crate) struct MediaTap {
    targets: Vec<(Arc<Recording>, u64)>,
    metrics: Arc<AgentMetrics>,
}

impl MediaTap {
    /// The session ended: each recording gets how, and may end after the linger.
    pub fn closed(&self, caller_end: String, bot_end: String) {
        let now = Instant::now();
        for (recording, session) in &self.targets {
            let entry = MediaClose {
                at_ms: recording.at_ms(now),
                session: *session,
                caller_end: caller_end.clone(),
                bot_end: bot_end.clone(),
            };
            recording.write(&Entry::MediaClose(entry), &self.metrics);
            recording.open_media.fetch_sub(1, Ordering::Relaxed);
            recording.media_ended.store(true, Ordering::Relaxed);
            recording.touch();
        }
    }
}

impl FrameTap for MediaTap {
    fn frame(&self, crossing: Crossing, frame: &WsFrame) {
        let from = match crossing {
            // On the agent the tunnel is the caller's side and the socket the bot's.
            Crossing::TunnelToSocket => Side::Caller,
            Crossing::SocketToTunnel => Side::Bot,
        };
        let data = match frame {
            WsFrame::Text(bytes) => FrameData::Text(String::from_utf8_lossy(bytes).into_owned()),
            WsFrame::Binary(bytes) => FrameData::binary(bytes),
            WsFrame::Ping(bytes) => FrameData::Ping(relay_record::format::base64_encode(bytes)),
            WsFrame::Pong(_) => return,
            WsFrame::Close(close) => {
                FrameData::Close(close.as_ref().map(|c| CloseInfo { code: c.code, reason: c.reason.clone() }))
            }
        };
        let now = Instant::now();
        for (recording, session) in &self.targets {
            let entry = Frame { at_ms: recording.at_ms(now), session: *session, from, data: data.clone() };
            recording.write(&Entry::Frame(entry), &self.metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_found_in_event_grid_arrays_and_cloud_event_objects() {
        let grid = br#"[{"eventType":"Microsoft.Communication.IncomingCall","data":{"correlationId":"c-1"}}]"#;
        assert_eq!(events(grid), vec![(INCOMING_CALL.to_owned(), Some("c-1".to_owned()))]);
        let cloud = br#"{"type":"Microsoft.Communication.CallDisconnected","data":{"correlationId":"c-2"}}"#;
        assert_eq!(events(cloud), vec![(CALL_DISCONNECTED.to_owned(), Some("c-2".to_owned()))]);
        assert!(events(b"not json").is_empty());
    }

    #[test]
    fn recordings_being_written_count_toward_the_bound_but_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (open, done, newer) =
            ("20260101T000000.000Z-a.jsonl", "20260102T000000.000Z-b.jsonl", "20260103T000000.000Z-c.jsonl");
        for (name, len) in [(open, 30), (done, 10), (newer, 30)] {
            std::fs::write(dir.path().join(name), vec![b'x'; len]).unwrap();
        }
        let writing = Mutex::new(HashSet::from([OsString::from(open), OsString::from(newer)]));
        assert_eq!(prune(dir.path(), 10, 50, &writing), 60, "only the finished one could go, and it was not enough");
        assert!(dir.path().join(open).exists() && dir.path().join(newer).exists());
        assert!(!dir.path().join(done).exists());
    }

    #[test]
    fn recording_files_sort_by_time_and_the_oldest_go_first() {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_796_544_000_123);
        assert_eq!(file_name(at, "c-1"), "20261206T080000.123Z-c-1.jsonl");
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in [
            ("20260101T000000.000Z-a.jsonl", 10),
            ("20260102T000000.000Z-b.jsonl", 10),
            ("20260103T000000.000Z-c.jsonl", 30),
        ] {
            std::fs::write(dir.path().join(name), vec![b'x'; len]).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "kept").unwrap();
        let left = |dir: &Path| {
            let mut names: Vec<String> =
                std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
            names.sort();
            names
        };
        let none = Mutex::default();
        assert_eq!(prune(dir.path(), 2, u64::MAX, &none), 40);
        assert_eq!(left(dir.path()), ["20260102T000000.000Z-b.jsonl", "20260103T000000.000Z-c.jsonl", "notes.txt"]);
        assert_eq!(prune(dir.path(), 10, 35, &none), 30);
        assert_eq!(left(dir.path()), ["20260103T000000.000Z-c.jsonl", "notes.txt"]);
    }

    #[test]
    fn a_recording_is_asked_for_by_a_plain_call_id_or_for_the_next_call() {
        assert_eq!(call_asked(None), Ok(None));
        assert_eq!(call_asked(Some("call=7e1f-aa")), Ok(Some("7e1f-aa".to_owned())));
        assert!(call_asked(Some("call=a%20b")).is_err());
        assert!(call_asked(Some("cal=x")).is_err());
        assert!(call_asked(Some(&format!("call={}", "a".repeat(200)))).is_err());
    }
}
