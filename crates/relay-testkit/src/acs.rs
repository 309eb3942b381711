//! ACS-shaped traffic: Event Grid IncomingCall, Call Automation callbacks, and media calls that
//! stream `AudioData` frames at ACS's pace and measure every echo.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// ACS media frames: 20 ms of 16 kHz mono PCM16 = 640 bytes, 50 frames a second.
pub const PCM_FRAME_BYTES: usize = 640;
/// The interval between media frames.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// An Event Grid `Microsoft.Communication.IncomingCall` event (Event Grid schema, JSON array).
pub fn incoming_call_event(correlation_id: &str) -> String {
    serde_json::json!([{
        "id": format!("evt-{correlation_id}"),
        "topic": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Communication/CommunicationServices/acs",
        "subject": "/caller/4:+15551230000/recipient/8:acs:bot",
        "eventType": "Microsoft.Communication.IncomingCall",
        "data": {
            "to": { "kind": "communicationUser", "rawId": "8:acs:bot" },
            "from": { "kind": "phoneNumber", "rawId": "4:+15551230000" },
            "callerDisplayName": "Test Caller",
            "incomingCallContext": "eyJhbGciOiJub25lIn0.test-context",
            "correlationId": correlation_id
        },
        "dataVersion": "1.0",
        "eventTime": "2026-11-26T09:00:00Z"
    }])
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

/// One ACS `AudioData` media message carrying 640 bytes of PCM; `seq` makes each unique.
pub fn audio_frame(seq: u64) -> String {
    let pcm: Vec<u8> = (0..PCM_FRAME_BYTES).map(|i| (seq as usize).wrapping_mul(7).wrapping_add(i) as u8).collect();
    let millis = seq * 20;
    serde_json::json!({
        "kind": "AudioData",
        "audioData": {
            "timestamp": format!("2026-11-26T09:00:{:02}.{:03}Z", (millis / 1000) % 60, millis % 1000),
            "participantRawID": format!("8:acs:caller-{seq}"),
            "data": base64::engine::general_purpose::STANDARD.encode(pcm),
            "silent": false
        }
    })
    .to_string()
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
        let mut sorted = self.rtts.clone();
        sorted.sort_unstable();
        let last = sorted.len().checked_sub(1)?;
        let index = ((last as f64) * p.clamp(0.0, 1.0)).round() as usize;
        sorted.get(index).copied()
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
        let sender = async move {
            let mut ticker = tokio::time::interval(FRAME_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0;
            for seq in 0..frames {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = sender_stop.cancelled() => break,
                }
                let text = audio_frame(seq);
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
