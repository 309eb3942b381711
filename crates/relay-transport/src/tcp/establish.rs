//! Starting HTTP/2 on a new TLS connection, each side its own way: the edge is the HTTP/2
//! client and opens the session stream; the agent is the server, takes the session stream
//! first, and then serves every stream the edge opens.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use relay_proto::code;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::connection::{Ending, Opener, TcpConnection, keep_alive, read_session, request};
use super::{AGENT_STREAM_PATH, EDGE_STREAM_PATH, SESSION_PATH, STREAM_LINGER, h2_windows};
use crate::h2stream::{H2Recv, H2Send, io_error};
use crate::seam::BiStream;
use crate::settings::{MAX_AGENT_INITIATED_STREAMS, TunnelSettings};

/// What the connection runs over: a TLS stream.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A connection with HTTP/2 running, or why it could not start.
type Established = Result<TcpConnection, String>;

/// The edge's side of a new TLS connection: HTTP/2 client, opens the session stream.
pub(super) async fn establish_edge(io: impl Io, remote: SocketAddr, settings: &TunnelSettings) -> Established {
    let (stream_window, connection_window) = h2_windows();
    let (requests, mut connection) = h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_concurrent_streams(MAX_AGENT_INITIATED_STREAMS)
        .enable_push(false)
        .handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let ending = Ending::new();
    let ping = connection.ping_pong();
    {
        let ending = ending.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    ending.end(match result {
                        Ok(()) => "connection closed by peer".to_owned(),
                        Err(e) => format!("tunnel connection lost: {}", io_error(e)),
                    });
                }
                () = ending.ended.cancelled() => {
                    let _ = tokio::time::timeout(ending.flush_wait(), &mut connection).await;
                }
            }
            ending.finished.cancel();
        });
    }
    if let Some(ping) = ping {
        tokio::spawn(keep_alive(ping, settings.clone(), ending.clone()));
    }
    let mut session_requests = requests.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, session) =
        session_requests.send_request(request(SESSION_PATH).map_err(|e| e.0)?, false).map_err(|e| e.to_string())?;
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    tokio::spawn(read_session(
        H2Recv::response(response, STREAM_LINGER),
        ending.clone(),
        Some((requests.clone(), incoming_tx)),
    ));
    Ok(TcpConnection {
        opener: Opener::Edge(requests),
        session: Mutex::new(session),
        incoming: tokio::sync::Mutex::new(incoming_rx),
        ending,
        remote,
    })
}

/// The agent's side of a new TLS connection: HTTP/2 server; the first stream must be the
/// session stream.
pub(super) async fn establish_agent(io: impl Io, remote: SocketAddr, settings: &TunnelSettings) -> Established {
    let (stream_window, connection_window) = h2_windows();
    let mut connection = h2::server::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_concurrent_streams(settings.max_exchange_streams)
        .handshake(io)
        .await
        .map_err(|e| format!("the edge closed the connection: {}", io_error(e)))?;
    let (request, mut respond) = match connection.accept().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => return Err(format!("the edge closed the connection: {}", io_error(e))),
        None => return Err("the edge closed the connection before the session began".into()),
    };
    if request.uri().path() != SESSION_PATH {
        return Err(format!("the edge opened {} before the session stream", request.uri().path()));
    }
    let session = respond.send_response(http::Response::new(()), false).map_err(|e| e.to_string())?;
    let session_recv = H2Recv::body(request.into_body(), STREAM_LINGER);
    let ending = Ending::new();
    let waiters: Arc<Mutex<VecDeque<oneshot::Sender<BiStream>>>> = Arc::default();
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    if let Some(ping) = connection.ping_pong() {
        tokio::spawn(keep_alive(ping, settings.clone(), ending.clone()));
    }
    tokio::spawn(read_session(session_recv, ending.clone(), None));
    tokio::spawn(serve_agent(connection, ending.clone(), waiters.clone(), incoming_tx));
    Ok(TcpConnection {
        opener: Opener::Agent(waiters),
        session: Mutex::new(session),
        incoming: tokio::sync::Mutex::new(incoming_rx),
        ending,
        remote,
    })
}

/// Gives a stream the edge opened at the agent's request to the oldest `open_bi` still waiting;
/// one nobody waits for any more is refused.
fn hand_to_waiter(waiters: &Mutex<VecDeque<oneshot::Sender<BiStream>>>, stream: BiStream) {
    let mut stream = Some(stream);
    if let Ok(mut waiters) = waiters.lock() {
        while let (Some(waiter), Some(s)) = (waiters.pop_front(), stream.take()) {
            // A waiter whose `open_bi` was cancelled hands the stream back.
            if let Err(back) = waiter.send(s) {
                stream = Some(back);
            }
        }
    }
    if let Some(mut unwanted) = stream {
        unwanted.send.reset(code::REFUSED);
    }
}

/// Drives the agent's HTTP/2 server connection: every stream the edge opens becomes an exchange
/// for `accept_bi`, or the answer to a pending `open_bi`.
async fn serve_agent<T>(
    mut connection: h2::server::Connection<T, Bytes>,
    ending: Arc<Ending>,
    waiters: Arc<Mutex<VecDeque<oneshot::Sender<BiStream>>>>,
    incoming: mpsc::UnboundedSender<BiStream>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = ending.ended.cancelled() => {
                // Keep the connection moving so the close message is written, then drop it.
                let flush = async { while connection.accept().await.is_some_and(|r| r.is_ok()) {} };
                let _ = tokio::time::timeout(ending.flush_wait(), flush).await;
                break;
            }
        };
        let (request, mut respond) = match next {
            Some(Ok(pair)) => pair,
            Some(Err(e)) => {
                ending.end(format!("tunnel connection lost: {}", io_error(e)));
                break;
            }
            None => {
                ending.end("connection closed by peer".into());
                break;
            }
        };
        let path = request.uri().path().to_owned();
        let send = match respond.send_response(http::Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                debug!("could not answer a stream from the edge: {e}");
                continue;
            }
        };
        let stream = BiStream {
            send: Box::new(H2Send::new(send)),
            recv: Box::new(H2Recv::body(request.into_body(), STREAM_LINGER)),
        };
        let handed = match path.as_str() {
            EDGE_STREAM_PATH => incoming.send(stream).is_ok(),
            AGENT_STREAM_PATH => {
                hand_to_waiter(&waiters, stream);
                true
            }
            other => {
                ending.end(format!("protocol violation: the edge opened {other}"));
                false
            }
        };
        // Not handed: nobody accepts any more (the connection is being dropped), or the edge
        // broke the protocol.
        if !handed {
            break;
        }
    }
    ending.finished.cancel();
}
