//! A session's media quality as the real pump measures it: a caller on a WebSocket, the pump,
//! and a far end on an in-memory tunnel stream, on tokio's paused clock, so a 200 ms pause is
//! exactly 200 ms and takes no wall-clock time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_proto::{CloseFrame, WsFrame};
use relay_transport::{FrameReader, memory, write_frame};
use relay_tunnel::websocket::{PumpReport, SessionLimits, SideEnd, pump, websocket_config};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

const LIMIT: usize = 64 * 1024;

/// Runs a pump between a caller's WebSocket and a far end that reads everything and answers a
/// close with a close; `caller` plays the caller, then its socket is dropped.
async fn session<F, Fut>(caller: F) -> PumpReport
where
    F: FnOnce(WebSocketStream<tokio::io::DuplexStream>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let limits = SessionLimits::new(LIMIT);
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = WebSocketStream::from_raw_socket(server_io, Role::Server, Some(websocket_config(&limits))).await;
    let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let (near, far) = memory::pair();
    let stream = near.open_bi().await.unwrap();
    let mut far_stream = far.accept_bi().await.unwrap();
    let far_end = tokio::spawn(async move {
        let mut reader = FrameReader::new(LIMIT + 64);
        while let Ok(Some(frame)) = reader.next::<WsFrame, _>(&mut far_stream.recv).await {
            if let WsFrame::Close(_) = frame {
                let close = WsFrame::Close(Some(CloseFrame { code: 1000, reason: String::new() }));
                let _ = write_frame(&mut far_stream.send, &close, LIMIT + 64).await;
                let _ = far_stream.send.shutdown().await;
                break;
            }
        }
    });
    let pumped = tokio::spawn(pump(server, stream, limits));
    caller(client).await;
    let report = pumped.await.unwrap();
    far_end.abort();
    report
}

async fn frames(ws: &mut WebSocketStream<tokio::io::DuplexStream>, count: usize, every: Duration) {
    for i in 0..count {
        ws.send(Message::Text(format!("{{\"kind\":\"AudioData\",\"seq\":{i}}}").into())).await.unwrap();
        tokio::time::sleep(every).await;
    }
}

async fn close(mut ws: WebSocketStream<tokio::io::DuplexStream>) {
    ws.close(None).await.unwrap();
    // Read the close answer so the handshake completes.
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_pauses_200_ms_shows_one_glitch_of_200_ms_in_its_direction() {
    let report = session(|mut ws| async move {
        frames(&mut ws, 10, Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(180)).await;
        frames(&mut ws, 10, Duration::from_millis(20)).await;
        close(ws).await;
    })
    .await;
    let caller = report.quality.from_socket;
    assert_eq!(caller.frames, 20);
    assert_eq!(caller.glitches, 1, "{caller:?}");
    assert!((caller.longest_gap_ms - 200.0).abs() < 5.0, "{caller:?}");
    assert_eq!(report.quality.to_socket.frames, 0, "nothing came the other way");
    assert_eq!(report.socket_side, SideEnd::Closed(None));
}

#[tokio::test(start_paused = true)]
async fn a_caller_at_25_frames_a_second_shows_its_rate_and_no_glitch() {
    let report = session(|mut ws| async move {
        frames(&mut ws, 26, Duration::from_millis(40)).await;
        close(ws).await;
    })
    .await;
    let caller = report.quality.from_socket;
    assert_eq!((caller.frames, caller.glitches), (26, 0));
    assert!((caller.frames_per_second - 25.0).abs() < 0.5, "{caller:?}");
    assert!(caller.jitter_ms > 10.0, "each frame is 20 ms off ACS's interval: {caller:?}");
    assert!(caller.first_frame_ms.is_some_and(|ms| ms < 5.0), "{caller:?}");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_says_the_caller_was_lost() {
    let report = session(|mut ws| async move {
        frames(&mut ws, 5, Duration::from_millis(20)).await;
        drop(ws);
    })
    .await;
    assert!(matches!(report.socket_side, SideEnd::Lost(_)), "{:?}", report.socket_side);
    assert_eq!(report.quality.from_socket.frames, 5);
}
