//! ACS-shaped traffic: Event Grid IncomingCall, Call Automation callbacks, and media calls that
//! stream `AudioData` frames at ACS's pace and measure every echo.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// ACS media frames: 20 ms of 16 kHz mono PCM16 = 640 bytes, 50 frames a second.
pub const PCM_FRAME_BYTES: usize = 640;
/// The interval between media frames.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// The `data` of an IncomingCall event, the same in both Event Grid delivery schemas.
fn incoming_call_data(correlation_id: &str) -> serde_json::Value {
    serde_json::json!({
        "to": { "kind": "communicationUser", "rawId": "8:acs:bot" },
        "from": { "kind": "phoneNumber", "rawId": "4:+15551230000" },
        "callerDisplayName": "Test Caller",
        "incomingCallContext": "eyJhbGciOiJub25lIn0.test-context",
        "correlationId": correlation_id
    })
}

/// An Event Grid `Microsoft.Communication.IncomingCall` event (Event Grid schema, JSON array).
pub fn incoming_call_event(correlation_id: &str) -> String {
    serde_json::json!([{
        "id": format!("evt-{correlation_id}"),
        "topic": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Communication/CommunicationServices/acs",
        "subject": "/caller/4:+15551230000/recipient/8:acs:bot",
        "eventType": "Microsoft.Communication.IncomingCall",
        "data": incoming_call_data(correlation_id),
        "dataVersion": "1.0",
        "eventTime": "2026-11-26T09:00:00Z"
    }])
    .to_string()
}

/// The same IncomingCall as an Event Grid subscription with the CloudEvents 1.0 delivery schema
/// sends it: one JSON object per request (`application/cloudevents+json`), not an array.
pub fn incoming_call_cloud_event(correlation_id: &str) -> String {
    serde_json::json!({
        "id": format!("evt-{correlation_id}"),
        "source": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Communication/CommunicationServices/acs",
        "specversion": "1.0",
        "type": "Microsoft.Communication.IncomingCall",
        "subject": "/caller/4:+15551230000/recipient/8:acs:bot",
        "time": "2026-11-26T09:00:00Z",
        "data": incoming_call_data(correlation_id)
    })
    .to_string()
}

/// A Call Automation mid-call callback (CloudEvents schema, JSON array).
pub fn callback_event(kind: &str, call_connection_id: &str, correlation_id: &str) -> String {
    serde_json::json!([{
        "id": format!("{kind}-{call_connection_id}"),
        "source": format!("calling/callConnections/{call_connection_id}"),
        "type": format!("Microsoft.Communication.{kind}"),
        "specversion": "1.0",
        "time": "2026-11-26T09:00:01Z",
        "data": {
            "callConnectionId": call_connection_id,
            "serverCallId": "server-call-1",
            "correlationId": correlation_id
        }
    }])
    .to_string()
}

/// One ACS `AudioData` message (640 bytes of PCM16 mono at 16 kHz, base64 in ACS's JSON) whose
/// audio bytes start with `seq` and `sent_nanos`, so a receiver can tell which frame an echo is
/// and when it was sent without parsing the JSON ([`decode_frame`]).
pub fn audio_frame(seq: u64, sent_nanos: u64) -> String {
    let mut pcm = [0u8; PCM_FRAME_BYTES];
    let (head, rest) = pcm.split_at_mut(16);
    head.copy_from_slice(&[seq.to_le_bytes(), sent_nanos.to_le_bytes()].concat());
    // A repeating ramp, like a quiet tone, rather than all zeros.
    for (i, b) in rest.iter_mut().enumerate() {
        *b = (i % 64) as u8;
    }
    format!(
        "{{\"kind\":\"AudioData\",\"audioData\":{{\"timestamp\":\"2026-01-01T00:00:00.000Z\",\
         \"participantRawID\":\"8:acs:caller\",\"data\":\"{}\",\"silent\":false}}}}",
        BASE64.encode(pcm)
    )
}

/// The sequence number and send time an [`audio_frame`] of `expected_len` bytes carries; `None`
/// for anything else (another length, not a frame).
pub fn decode_frame(text: &str, expected_len: usize) -> Option<(u64, u64)> {
    if text.len() != expected_len {
        return None;
    }
    let data = text.split_once("\"data\":\"")?.1;
    // 24 base64 characters carry the first 18 bytes; the first 16 are the header.
    let bytes = BASE64.decode(data.get(..24)?).ok()?;
    let seq = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

/// Size callback bodies are padded to by [`callback_body`]: about what ACS's callback events
/// weigh.
pub const CALLBACK_BYTES: usize = 1024;

/// A 1 KiB CloudEvents-style callback body for call number `call`, event `seq`.
pub fn callback_body(call: usize, seq: usize) -> bytes::Bytes {
    let head = format!(
        "[{{\"id\":\"{call}-{seq}\",\"source\":\"calling/callConnections/bench-conn-{call}\",\
         \"type\":\"Microsoft.Communication.PlayCompleted\",\"data\":{{\"callConnectionId\":\"bench-conn-{call}\",\
         \"correlationId\":\"bench-call-{call}\",\"padding\":\""
    );
    let tail = "\"}}]";
    let pad = CALLBACK_BYTES.saturating_sub(head.len() + tail.len());
    bytes::Bytes::from(format!("{head}{}{tail}", "x".repeat(pad)))
}

/// What one media call measured.
#[derive(Debug, Clone, Default)]
pub struct MediaStats {
    /// Frames sent.
    pub sent: u64,
    /// Echoes received, byte-exact and in order.
    pub received: u64,
    /// Echoes that did not match the frame expected next (corrupt or out of order).
    pub mismatched: u64,
    /// Round-trip time of every matched echo.
    pub rtts: Vec<Duration>,
    /// The close code the other end (relay or bot) ended the call with, if it closed it.
    pub closed_by_peer: Option<u16>,
}

impl MediaStats {
    /// Merges another call's figures.
    pub fn merge(&mut self, other: &MediaStats) {
        self.sent += other.sent;
        self.received += other.received;
        self.mismatched += other.mismatched;
        self.rtts.extend_from_slice(&other.rtts);
    }

    /// The `p`-th percentile round trip (0.0-1.0), if any echo arrived.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        crate::stats::percentile(&mut self.rtts.clone(), p)
    }

    /// Whether every frame came back intact and in order.
    pub fn intact(&self) -> bool {
        self.sent > 0 && self.received == self.sent && self.mismatched == 0
    }
}

/// A simulated ACS media WebSocket.
#[derive(Debug)]
pub struct MediaCall {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The bot's (or relay's) `101` response headers.
    pub response_headers: http::HeaderMap,
}

impl MediaCall {
    /// Opens a media WebSocket to `addr` at `path_and_query` with ACS's headers.
    pub async fn connect(addr: SocketAddr, path_and_query: &str, correlation_id: &str) -> anyhow::Result<Self> {
        let mut request = format!("ws://{addr}{path_and_query}").into_client_request()?;
        let headers = request.headers_mut();
        headers.insert("authorization", "Bearer test-acs-token".parse()?);
        headers.insert("x-ms-call-connection-id", format!("conn-{correlation_id}").parse()?);
        headers.insert("x-ms-call-correlation-id", correlation_id.parse()?);
        headers.insert("sec-websocket-protocol", "acs-media".parse()?);
        let (ws, response) = tokio_tungstenite::connect_async(request).await?;
        Ok(Self { ws, response_headers: response.headers().clone() })
    }

    /// The socket, for tests that send their own messages.
    pub fn socket(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }

    /// Sends `frames` AudioData messages at ACS's pace and checks that every echo comes back
    /// byte-exact and in order, waiting at most `grace` after the last frame for stragglers.
    /// A close from the other end stops the call early; `sent` and `closed_by_peer` then say
    /// how far it got and how it was ended.
    pub async fn stream_audio(&mut self, frames: u64, grace: Duration) -> anyhow::Result<MediaStats> {
        let in_flight: Arc<Mutex<VecDeque<(String, Instant)>>> = Arc::default();
        let (mut sink, mut source) = (&mut self.ws).split();
        let queue = in_flight.clone();
        let closed = tokio_util::sync::CancellationToken::new();
        let sender_stop = closed.clone();
        let started = Instant::now();
        let sender = async move {
            let mut ticker = tokio::time::interval(FRAME_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0;
            for seq in 0..frames {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = sender_stop.cancelled() => break,
                }
                let sent_nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let text = audio_frame(seq, sent_nanos);
                if let Ok(mut q) = queue.lock() {
                    q.push_back((text.clone(), Instant::now()));
                }
                if let Err(e) = sink.send(Message::Text(text.into())).await {
                    if sender_stop.is_cancelled() {
                        break;
                    }
                    return Err(e.into());
                }
                sent += 1;
            }
            anyhow::Ok(sent)
        };
        let mut stats = MediaStats::default();
        let receiver = async {
            while stats.received + stats.mismatched < frames {
                let Some(msg) = source.next().await else { break };
                let text = match msg? {
                    Message::Text(text) => text,
                    Message::Close(frame) => {
                        stats.closed_by_peer = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        closed.cancel();
                        break;
                    }
                    _ => continue,
                };
                let expected = in_flight.lock().ok().and_then(|mut q| q.pop_front());
                match expected {
                    Some((sent, at)) if sent == text.as_str() => {
                        stats.received += 1;
                        stats.rtts.push(at.elapsed());
                    }
                    _ => stats.mismatched += 1,
                }
            }
            anyhow::Ok(())
        };
        let send_for = FRAME_INTERVAL * u32::try_from(frames).unwrap_or(u32::MAX) + grace;
        let (sent, received) = tokio::time::timeout(send_for, async { tokio::join!(sender, receiver) })
            .await
            .unwrap_or((Ok(frames), Ok(())));
        let sent = sent?;
        received?;
        stats.sent = sent;
        Ok(stats)
    }

    /// Closes with `code` and `reason` and waits for the close to complete.
    pub async fn close(mut self, code: u16, reason: &str) -> anyhow::Result<()> {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        self.ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() })).await?;
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(())
    }
}

/// What [`simulated_call`] saw.
#[derive(Debug, Clone, Default)]
pub struct SimulatedCall {
    /// Each webhook's path and the status it got, in order.
    pub webhooks: Vec<(String, u16)>,
    /// The media session's figures.
    pub media: MediaStats,
}

/// Drives one ACS call at `addr` (an edge, or a bot directly) as ACS would: IncomingCall,
/// `CallConnected`, a media session of `frames` AudioData frames at 50 a second closed with
/// 1000, then `CallDisconnected`. Webhooks go to `/api/incomingCall` and
/// `/api/callbacks/conn-X` (X: the correlation id up to its first `-`), media to `/ws`.
pub async fn simulated_call(addr: SocketAddr, correlation_id: &str, frames: u64) -> anyhow::Result<SimulatedCall> {
    let call_connection = format!("conn-{}", correlation_id.split('-').next().unwrap_or(correlation_id));
    let connection = format!("/api/callbacks/{call_connection}");
    let mut call = SimulatedCall::default();
    let mut post = async |path: &str, body: String| -> anyhow::Result<()> {
        let answer = crate::client::send_collect(addr, crate::client::post_json(addr, path, &body)).await?;
        call.webhooks.push((path.to_owned(), answer.status().as_u16()));
        Ok(())
    };
    post("/api/incomingCall", incoming_call_event(correlation_id)).await?;
    post(&connection, callback_event("CallConnected", &call_connection, correlation_id)).await?;
    let mut media = MediaCall::connect(addr, "/ws", correlation_id).await?;
    let stats = media.stream_audio(frames, Duration::from_secs(5)).await?;
    media.close(1000, "call ended").await?;
    post(&connection, callback_event("CallDisconnected", &call_connection, correlation_id)).await?;
    call.media = stats;
    Ok(call)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_carries_its_sequence_and_send_time_and_is_acs_shaped() {
        let frame = audio_frame(42, 123_456_789);
        let json: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(json["kind"], "AudioData");
        let pcm = BASE64.decode(json["audioData"]["data"].as_str().unwrap()).unwrap();
        assert_eq!(pcm.len(), PCM_FRAME_BYTES);
        assert_eq!(decode_frame(&frame, frame.len()), Some((42, 123_456_789)));
        assert_eq!(decode_frame(&frame, frame.len() + 1), None, "a frame of another length is corrupt");
    }

    #[test]
    fn callback_bodies_are_one_kilobyte_of_json() {
        let body = callback_body(7, 3);
        assert_eq!(body.len(), CALLBACK_BYTES);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json[0]["data"]["correlationId"], "bench-call-7");
    }
}
