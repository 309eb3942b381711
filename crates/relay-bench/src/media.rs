//! The call load: N concurrent ACS media WebSockets, each sending `AudioData` frames (640 bytes
//! of PCM16 mono at 16 kHz, base64 in ACS's JSON) at 50 a second on a timer and reading the
//! bot's echoes, plus a few callback POSTs per call. Every frame carries its sequence number and
//! send time inside its audio bytes, so round trip, loss and reordering are measured per frame
//! without parsing the JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use relay_testkit::acs::{FRAME_INTERVAL, audio_frame, callback_body, decode_frame};
pub use relay_testkit::stats::Percentiles;

use crate::webhooks::HttpClient;

/// How long, after the last frame is sent, echoes may still arrive before the rest count as lost.
pub const ECHO_GRACE: Duration = Duration::from_secs(3);

/// Calls connected at once while setting up, so a thousand calls do not arrive as one SYN burst.
const CONNECT_CONCURRENCY: usize = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct MediaLoad {
    /// Where the media WebSocket and the callbacks go (the bot, or an edge).
    pub target: SocketAddr,
    /// Concurrent calls.
    pub calls: usize,
    /// How long each call streams.
    pub duration: Duration,
    /// Callback POSTs each call sends, spread over its duration.
    pub callbacks_per_call: usize,
}

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MediaReport {
    /// Calls that connected.
    pub calls_connected: usize,
    /// Calls that could not connect.
    pub calls_failed: usize,
    /// Frames sent.
    pub frames_sent: u64,
    /// Echoes received.
    pub frames_received: u64,
    /// Frames not echoed within [`ECHO_GRACE`] of the call's last frame (late counts as lost: a
    /// voice frame that late is as good as gone).
    pub frames_lost: u64,
    /// Echoes that arrived after a later frame's echo.
    pub frames_reordered: u64,
    /// Echoes that were not the frame sent (wrong length or undecodable).
    pub frames_corrupt: u64,
    /// Round trip percentiles, in milliseconds.
    pub rtt_ms: Percentiles,
    /// Callbacks answered 2xx.
    pub callbacks_ok: u64,
    /// Callbacks that failed or were answered otherwise.
    pub callbacks_failed: u64,
    /// Seconds the media phase took.
    pub wall_seconds: f64,
}

#[derive(Debug, Default)]
struct CallResult {
    sent: u64,
    received: u64,
    reordered: u64,
    corrupt: u64,
    rtts_us: Vec<u32>,
    callbacks_ok: u64,
    callbacks_failed: u64,
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(target: SocketAddr, call: usize) -> anyhow::Result<Socket> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{target}/ws").into_client_request()?;
    let headers = request.headers_mut();
    headers.insert("x-ms-call-correlation-id", format!("bench-call-{call}").parse()?);
    headers.insert("x-ms-call-connection-id", format!("bench-conn-{call}").parse()?);
    let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    Ok(ws)
}

/// Streams one call from `start` for `duration`, its first frame `offset` into the first 20 ms so
/// calls do not all send in the same instant.
async fn stream_call(
    ws: Socket,
    call: usize,
    load: Arc<MediaLoad>,
    epoch: Instant,
    start: Instant,
    offset: Duration,
) -> CallResult {
    let frames = (load.duration.as_millis() / FRAME_INTERVAL.as_millis()).max(1) as u64;
    let expected_len = audio_frame(0, 0).len();
    let (mut sink, mut source) = ws.split();
    let sender = async move {
        let mut ticker = tokio::time::interval_at(start + offset, FRAME_INTERVAL);
        // Burst: a late tick is sent at once, so a call keeps its average of 50 frames a second.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0;
        for seq in 0..frames {
            ticker.tick().await;
            let nanos = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if sink.send(Message::Text(audio_frame(seq, nanos).into())).await.is_err() {
                break;
            }
            sent += 1;
        }
        (sent, sink)
    };
    let mut result = CallResult { rtts_us: Vec::with_capacity(frames as usize), ..CallResult::default() };
    // Borrows `result`, so what arrived before a timeout still counts.
    let receiver = async {
        let result = &mut result;
        let mut highest: Option<u64> = None;
        while let Some(Ok(msg)) = source.next().await {
            let Message::Text(text) = msg else { continue };
            match decode_frame(text.as_str(), expected_len) {
                Some((seq, sent_nanos)) => {
                    result.received += 1;
                    let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let rtt_us = now.saturating_sub(sent_nanos) / 1000;
                    result.rtts_us.push(u32::try_from(rtt_us).unwrap_or(u32::MAX));
                    if highest.is_some_and(|h| seq < h) {
                        result.reordered += 1;
                    }
                    highest = highest.max(Some(seq));
                }
                None => result.corrupt += 1,
            }
            if result.received + result.corrupt >= frames {
                break;
            }
        }
    };
    let callbacks = send_callbacks(load.clone(), call, start);
    let deadline = start + offset + load.duration + ECHO_GRACE;
    let ((sent, mut sink), (ok, failed), _) =
        tokio::join!(sender, callbacks, tokio::time::timeout_at(deadline, receiver));
    let _ = sink.close().await;
    result.sent = sent;
    result.callbacks_ok = ok;
    result.callbacks_failed = failed;
    result
}

/// Sends this call's callbacks, evenly spread over its duration, on one keep-alive connection.
async fn send_callbacks(load: Arc<MediaLoad>, call: usize, start: Instant) -> (u64, u64) {
    if load.callbacks_per_call == 0 {
        return (0, 0);
    }
    let spacing = load.duration / u32::try_from(load.callbacks_per_call).unwrap_or(u32::MAX);
    let mut client = HttpClient::new(load.target);
    let (mut ok, mut failed) = (0, 0);
    for i in 0..load.callbacks_per_call {
        tokio::time::sleep_until(start + spacing * u32::try_from(i).unwrap_or(0) + spacing / 2).await;
        let path = format!("/api/callbacks/bench-conn-{call}");
        match client.post(&path, callback_body(call, i)).await {
            Ok(status) if status.is_success() => ok += 1,
            _ => failed += 1,
        }
    }
    (ok, failed)
}

/// Connects every call, then calls `connected` (to sample memory with all calls open and idle),
/// then streams them all and reports.
pub async fn run(load: MediaLoad, connected: impl FnOnce()) -> MediaReport {
    let load = Arc::new(load);
    let mut sockets = Vec::with_capacity(load.calls);
    let mut failed = 0;
    let mut pending = futures_util::stream::iter(0..load.calls)
        .map(|call| {
            let target = load.target;
            async move { (call, connect(target, call).await) }
        })
        .buffer_unordered(CONNECT_CONCURRENCY);
    while let Some((call, outcome)) = pending.next().await {
        match outcome {
            Ok(ws) => sockets.push((call, ws)),
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("call {call} could not connect: {e}");
                }
            }
        }
    }
    connected();
    let epoch = Instant::now();
    // Every call starts together after a short settle, spread over one frame interval.
    let start = epoch + Duration::from_millis(100);
    let count = sockets.len().max(1);
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (call, ws))| {
            let offset = FRAME_INTERVAL * u32::try_from(i).unwrap_or(0) / u32::try_from(count).unwrap_or(1);
            tokio::spawn(stream_call(ws, call, load.clone(), epoch, start, offset))
        })
        .collect();
    let mut report = MediaReport { calls_connected: tasks.len(), calls_failed: failed, ..MediaReport::default() };
    let mut rtts = Vec::new();
    for task in tasks {
        let Ok(result) = task.await else { continue };
        report.frames_sent += result.sent;
        report.frames_received += result.received;
        report.frames_reordered += result.reordered;
        report.frames_corrupt += result.corrupt;
        report.callbacks_ok += result.callbacks_ok;
        report.callbacks_failed += result.callbacks_failed;
        rtts.extend(result.rtts_us);
    }
    report.frames_lost = report.frames_sent.saturating_sub(report.frames_received);
    report.rtt_ms = Percentiles::of_micros(&mut rtts);
    report.wall_seconds = start.elapsed().as_secs_f64();
    report
}
