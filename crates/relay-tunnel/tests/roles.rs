//! Every stream role of the tunnel protocol, both ends, over an in-memory connection pair: no
//! sockets, no certificates, no bot. Each role is shown working, then each end is shown facing
//! a bad peer (an oversized head, a garbage frame, a peer that vanishes mid-exchange, a peer that
//! says nothing): the failure stays on that stream, or, on the control and pairing streams where
//! nothing else can proceed, closes that connection with the protocol-violation code.
//!
//! Timeouts run on tokio's paused clock, so "nothing in time" takes no wall-clock time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use relay_proto::{
    ControlMessage, ExchangeHead, ExchangeKind, Failure, FailureKind, Hello, HttpReply, PairRefusal, PairRequest,
    PairResponse, RenewOutcome, ResponseHead, WsReply, code,
};
use relay_transport::{BiStream, TunnelConnection, memory};
use relay_tunnel::control::{self, AgentRequest, ControlEnd, GreetError, HelloError, Welcome};
use relay_tunnel::exchange::{self, AcceptError, ReplyError};
use relay_tunnel::pairing::{self, RedeemError, ServeError};
use relay_tunnel::{HEAD_LIMIT, body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(5);

fn hello() -> Hello {
    Hello {
        agent_name: "bot-1".into(),
        software_version: "test".into(),
        protocol_version: relay_proto::PROTOCOL_VERSION,
        capabilities: vec![],
        labels: vec![("instance".into(), "a1".into())],
    }
}

fn welcome() -> Welcome {
    Welcome { agent_name: "bot-1".into(), software_version: "test".into(), edge_instance: "e1".into() }
}

fn head(kind: ExchangeKind) -> ExchangeHead {
    ExchangeHead {
        request_id: 7,
        kind,
        method: "POST".into(),
        path_and_query: "/api/callbacks?x=1".into(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        client_addr: "203.0.113.9:4000".into(),
        affinity_key: Some("call-1".into()),
    }
}

/// Bytes that frame a payload bincode cannot decode as any of the protocol's messages.
fn garbage_frame() -> Vec<u8> {
    let payload = [0xff_u8; 16];
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// A length prefix announcing a frame over the head limit.
fn oversized_prefix() -> Vec<u8> {
    ((HEAD_LIMIT + 1) as u32).to_be_bytes().to_vec()
}

/// The reason the connection closed with, once it has.
async fn closed_reason(conn: &Arc<dyn TunnelConnection>) -> String {
    tokio::time::timeout(TIMEOUT, conn.closed()).await.expect("connection should close").0
}

fn protocol_violation() -> String {
    format!("{:#x}", code::PROTOCOL_VIOLATION)
}

/// A welcomed pair: the agent's and the edge's control ends, and both connections.
async fn welcomed()
-> (Arc<dyn TunnelConnection>, Arc<dyn TunnelConnection>, control::AgentControl, control::EdgeControl) {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let (mut ctl, got) = control::accept_hello(&edge, TIMEOUT).await.unwrap();
        assert_eq!(got, hello());
        ctl.welcome(welcome()).await.unwrap();
        ctl
    };
    let (edge_ctl, greeted) = tokio::join!(edge_side, control::greet(&agent, hello(), TIMEOUT));
    let (agent_ctl, got) = greeted.unwrap();
    assert_eq!(got, welcome());
    (edge, agent, agent_ctl, edge_ctl)
}

// ---- control stream -------------------------------------------------------------------------

#[tokio::test]
async fn an_agent_is_welcomed_then_drains_and_renews_on_its_control_stream() {
    let (_edge, _agent, mut agent_ctl, mut edge_ctl) = welcomed().await;
    let edge_side = async {
        assert_eq!(edge_ctl.next().await.unwrap(), AgentRequest::Drain);
        edge_ctl.drained().await.unwrap();
        assert_eq!(edge_ctl.next().await.unwrap(), AgentRequest::Renew { csr_der: b"csr".to_vec() });
        edge_ctl.renewed(RenewOutcome::Issued { cert_der: b"cert".to_vec() }).await.unwrap();
        edge_ctl
    };
    let agent_side = async {
        agent_ctl.drain(TIMEOUT).await.unwrap();
        agent_ctl.renew(b"csr".to_vec(), TIMEOUT).await.unwrap()
    };
    let (_, renewed) = tokio::join!(edge_side, agent_side);
    assert_eq!(renewed, RenewOutcome::Issued { cert_der: b"cert".to_vec() });
}

#[tokio::test]
async fn an_agent_that_ends_its_control_stream_is_leaving() {
    let (_edge, agent, agent_ctl, mut edge_ctl) = welcomed().await;
    drop(agent_ctl);
    assert_eq!(edge_ctl.next().await.unwrap(), AgentRequest::Leaving);
    drop(agent);
}

#[tokio::test]
async fn a_message_only_the_edge_sends_is_ignored_by_the_edge() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    let mut frames = Vec::new();
    for msg in [ControlMessage::Hello(hello()), ControlMessage::Drained, ControlMessage::Drain] {
        relay_transport::write_frame(&mut frames, &msg, HEAD_LIMIT).await.unwrap();
    }
    stream.send.write_all(&frames).await.unwrap();
    let (mut ctl, _) = control::accept_hello(&edge, TIMEOUT).await.unwrap();
    assert!(matches!(ctl.next().await.unwrap(), AgentRequest::Ignored(_)));
    assert_eq!(ctl.next().await.unwrap(), AgentRequest::Drain);
}

#[tokio::test]
async fn the_edge_closes_a_connection_whose_first_control_frame_is_garbage() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    stream.send.write_all(&garbage_frame()).await.unwrap();
    let err = control::accept_hello(&edge, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, HelloError::Violation(_)), "{err}");
    assert!(closed_reason(&agent).await.contains(&protocol_violation()));
}

#[tokio::test]
async fn the_edge_closes_a_connection_whose_hello_is_over_the_head_limit() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    stream.send.write_all(&oversized_prefix()).await.unwrap();
    let err = control::accept_hello(&edge, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, HelloError::Violation(_)), "{err}");
    assert!(closed_reason(&agent).await.contains("expected hello"));
}

#[tokio::test]
async fn the_edge_closes_a_connection_whose_first_message_is_not_a_hello() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    let mut frame = Vec::new();
    relay_transport::write_frame(&mut frame, &ControlMessage::Drain, HEAD_LIMIT).await.unwrap();
    stream.send.write_all(&frame).await.unwrap();
    assert!(matches!(control::accept_hello(&edge, TIMEOUT).await, Err(HelloError::Violation(_))));
    assert!(closed_reason(&agent).await.contains(&protocol_violation()));
}

#[tokio::test(start_paused = true)]
async fn the_edge_closes_a_connection_that_never_says_hello() {
    let (edge, agent) = memory::pair();
    let _silent = agent.open_bi().await.unwrap();
    assert!(matches!(control::accept_hello(&edge, TIMEOUT).await, Err(HelloError::Timeout(_))));
    assert!(closed_reason(&agent).await.contains("hello timeout"));
}

#[tokio::test]
async fn an_agent_that_vanishes_before_its_hello_is_reported_lost() {
    let (edge, agent) = memory::pair();
    let stream = agent.open_bi().await.unwrap();
    drop(stream);
    drop(agent);
    assert!(matches!(control::accept_hello(&edge, TIMEOUT).await, Err(HelloError::Lost(_))));
}

#[tokio::test]
async fn the_edge_closes_a_connection_whose_later_control_frame_is_garbage() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    let mut frames = Vec::new();
    relay_transport::write_frame(&mut frames, &ControlMessage::Hello(hello()), HEAD_LIMIT).await.unwrap();
    frames.extend(garbage_frame());
    stream.send.write_all(&frames).await.unwrap();
    let (mut ctl, _) = control::accept_hello(&edge, TIMEOUT).await.unwrap();
    assert!(matches!(ctl.next().await, Err(ControlEnd::Violation(_))));
    assert!(closed_reason(&agent).await.contains(&protocol_violation()));
}

#[tokio::test]
async fn an_agent_vanishing_mid_session_ends_the_edge_control_with_the_reason() {
    let (edge, agent, _agent_ctl, mut edge_ctl) = welcomed().await;
    agent.close(code::SHUTDOWN, "agent shutting down");
    match edge_ctl.next().await {
        Err(ControlEnd::Lost(reason)) => assert!(reason.contains("agent shutting down"), "{reason}"),
        other => panic!("expected a lost connection, got {other:?}"),
    }
    drop(edge);
}

#[tokio::test]
async fn the_agent_closes_a_connection_whose_welcome_is_garbage() {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let mut stream = edge.accept_bi().await.unwrap();
        stream.send.write_all(&garbage_frame()).await.unwrap();
        stream
    };
    let (_stream, greeted) = tokio::join!(edge_side, control::greet(&agent, hello(), TIMEOUT));
    assert!(matches!(greeted, Err(GreetError::Malformed(_))));
    assert!(closed_reason(&edge).await.contains(&protocol_violation()));
}

#[tokio::test]
async fn the_agent_closes_a_connection_whose_welcome_is_over_the_head_limit() {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let mut stream = edge.accept_bi().await.unwrap();
        stream.send.write_all(&oversized_prefix()).await.unwrap();
        stream
    };
    let (_stream, greeted) = tokio::join!(edge_side, control::greet(&agent, hello(), TIMEOUT));
    assert!(matches!(greeted, Err(GreetError::Malformed(_))));
    assert!(closed_reason(&edge).await.contains("expected welcome"));
}

#[tokio::test(start_paused = true)]
async fn the_agent_closes_a_connection_that_never_welcomes_it() {
    let (edge, agent) = memory::pair();
    let edge_side = async { edge.accept_bi().await.unwrap() };
    let (_stream, greeted) = tokio::join!(edge_side, control::greet(&agent, hello(), TIMEOUT));
    assert!(matches!(greeted, Err(GreetError::Timeout(_))));
    assert!(closed_reason(&edge).await.contains("no welcome"));
}

#[tokio::test]
async fn an_edge_that_refuses_the_agent_is_reported_with_its_reason() {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let _stream = edge.accept_bi().await.unwrap();
        edge.close(code::UNKNOWN_AGENT, "certificate revoked");
    };
    let (_, greeted) = tokio::join!(edge_side, control::greet(&agent, hello(), TIMEOUT));
    match greeted {
        Err(GreetError::Lost(reason)) => assert!(reason.contains("certificate revoked"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_unconfirmed_drain_times_out_on_the_agent() {
    let (_edge, _agent, mut agent_ctl, _edge_ctl) = welcomed().await;
    assert!(matches!(agent_ctl.drain(TIMEOUT).await, Err(control::ControlError::Timeout(_))));
}

// ---- exchange stream ------------------------------------------------------------------------

/// Opens an exchange from the edge and sends `head`; returns the edge's stream.
async fn open(edge: &Arc<dyn TunnelConnection>, head: &ExchangeHead) -> BiStream {
    let mut stream = edge.open_bi().await.unwrap();
    exchange::send_head(&mut stream, head).await.unwrap();
    stream
}

#[tokio::test]
async fn a_webhook_exchange_carries_its_head_body_reply_and_response_body() {
    let (edge, agent) = memory::pair();
    let mut outbound = open(&edge, &head(ExchangeKind::Http)).await;
    outbound.send.write_all(b"request body").await.unwrap();
    outbound.send.shutdown().await.unwrap();

    let (got, mut inbound) = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap().unwrap();
    assert_eq!(got, head(ExchangeKind::Http));
    let mut request_body = Vec::new();
    inbound.recv.read_to_end(&mut request_body).await.unwrap();
    assert_eq!(request_body, b"request body");
    let reply = HttpReply::Response(ResponseHead { status: 201, headers: vec![("x-bot".into(), b"1".to_vec())] });
    exchange::reply(&mut inbound.send, &reply).await.unwrap();
    inbound.send.write_all(b"response body").await.unwrap();
    inbound.send.shutdown().await.unwrap();

    let got: HttpReply = exchange::read_reply(&mut outbound.recv, TIMEOUT).await.unwrap();
    let HttpReply::Response(response) = got else { panic!("expected a response") };
    let (status, headers) = exchange::response_parts(response).unwrap();
    assert_eq!((status.as_u16(), headers.get("x-bot").map(|v| v.as_bytes())), (201, Some(&b"1"[..])));
    let body = http_body_util::BodyExt::collect(body::body_from_stream(outbound.recv)).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"response body");
}

#[tokio::test]
async fn an_agent_failure_becomes_the_edge_status_its_class_names() {
    let (edge, agent) = memory::pair();
    let mut outbound = open(&edge, &head(ExchangeKind::WebSocket)).await;
    let (_, mut inbound) = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap().unwrap();
    let failed = WsReply::Failed(Failure { kind: FailureKind::BotTimeout, detail: "upgrade timed out".into() });
    exchange::reply_final(&mut inbound.send, &failed).await;
    let got: WsReply = exchange::read_reply(&mut outbound.recv, TIMEOUT).await.unwrap();
    let WsReply::Failed(failure) = got else { panic!("expected a failure") };
    assert_eq!(exchange::failure_answer(failure.kind).status.as_u16(), 504);
    assert_eq!(exchange::failure_answer(FailureKind::Draining).status.as_u16(), 503);
    assert_eq!(exchange::failure_answer(FailureKind::BotUnreachable).status.as_u16(), 502);
}

/// The agent's end facing `bytes` where a head should be; the other exchange on the same
/// connection is unaffected.
async fn agent_meets(bytes: Vec<u8>) -> (AcceptError, Arc<dyn TunnelConnection>, Arc<dyn TunnelConnection>) {
    let (edge, agent) = memory::pair();
    let mut bad = edge.open_bi().await.unwrap();
    bad.send.write_all(&bytes).await.unwrap();
    let err = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap_err();
    // The edge's side of the bad stream sees the reset.
    let mut rest = Vec::new();
    assert!(bad.recv.read_to_end(&mut rest).await.is_err(), "the bad stream must be reset, not finished");
    // A good exchange on the same connection still works.
    let _good = open(&edge, &head(ExchangeKind::Http)).await;
    let (got, _) = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap().unwrap();
    assert_eq!(got.request_id, 7);
    (err, edge, agent)
}

#[tokio::test]
async fn the_agent_resets_an_exchange_whose_head_is_garbage_and_keeps_the_connection() {
    let (err, _edge, _agent) = agent_meets(garbage_frame()).await;
    assert!(matches!(err, AcceptError::Malformed(_)), "{err}");
}

#[tokio::test]
async fn the_agent_resets_an_exchange_whose_head_is_over_the_limit_and_keeps_the_connection() {
    let (err, _edge, _agent) = agent_meets(oversized_prefix()).await;
    assert!(matches!(err, AcceptError::Malformed(_)), "{err}");
}

#[tokio::test]
async fn the_agent_resets_an_exchange_whose_head_is_cut_short() {
    let (edge, agent) = memory::pair();
    let mut cut = edge.open_bi().await.unwrap();
    let mut frame = Vec::new();
    relay_transport::write_frame(&mut frame, &head(ExchangeKind::Http), HEAD_LIMIT).await.unwrap();
    cut.send.write_all(&frame[..frame.len() / 2]).await.unwrap();
    cut.send.shutdown().await.unwrap();
    let err = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, AcceptError::Malformed(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_agent_resets_an_exchange_whose_head_never_comes() {
    let (edge, agent) = memory::pair();
    let _silent = edge.open_bi().await.unwrap();
    let err = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, AcceptError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn an_edge_that_vanishes_mid_exchange_fails_the_agent_side_of_the_stream() {
    let (edge, agent) = memory::pair();
    let mut outbound = open(&edge, &head(ExchangeKind::Http)).await;
    outbound.send.write_all(b"part of a body").await.unwrap();
    let (_, mut inbound) = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap().unwrap();
    edge.close(code::SHUTDOWN, "edge shutting down");
    drop(outbound);
    let mut body = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, inbound.recv.read_to_end(&mut body)).await.unwrap();
    assert!(read.is_err(), "a lost edge must not look like a finished body: {read:?}");
}

/// The edge's end facing `bytes` where the agent's answer should be.
async fn edge_meets(bytes: Vec<u8>) -> ReplyError {
    let (edge, agent) = memory::pair();
    let mut outbound = open(&edge, &head(ExchangeKind::Http)).await;
    let (_, mut inbound) = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap().unwrap();
    inbound.send.write_all(&bytes).await.unwrap();
    exchange::read_reply::<HttpReply>(&mut outbound.recv, TIMEOUT).await.unwrap_err()
}

#[tokio::test]
async fn the_edge_answers_502_for_a_garbage_reply() {
    let err = edge_meets(garbage_frame()).await;
    assert!(matches!(err, ReplyError::Malformed(_)), "{err}");
    assert_eq!(err.answer().status.as_u16(), 502);
}

#[tokio::test]
async fn the_edge_answers_502_for_a_reply_over_the_head_limit() {
    let err = edge_meets(oversized_prefix()).await;
    assert!(matches!(err, ReplyError::Malformed(_)), "{err}");
    assert_eq!(err.answer().status.as_u16(), 502);
}

#[tokio::test]
async fn the_edge_answers_502_when_the_agent_vanishes_mid_exchange() {
    let (edge, agent) = memory::pair();
    let mut outbound = open(&edge, &head(ExchangeKind::Http)).await;
    let (_, _inbound) = exchange::accept(agent.accept_bi().await.unwrap(), TIMEOUT).await.unwrap().unwrap();
    drop(agent);
    let err = exchange::read_reply::<HttpReply>(&mut outbound.recv, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, ReplyError::Ended), "{err}");
    assert_eq!(err.answer().status.as_u16(), 502);
}

#[tokio::test(start_paused = true)]
async fn the_edge_answers_504_when_the_agent_says_nothing() {
    let (edge, agent) = memory::pair();
    let mut outbound = open(&edge, &head(ExchangeKind::Http)).await;
    let _held = agent.accept_bi().await.unwrap();
    let err = exchange::read_reply::<HttpReply>(&mut outbound.recv, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, ReplyError::Timeout(_)), "{err}");
    assert_eq!(err.answer().status.as_u16(), 504);
}

// ---- pairing stream -------------------------------------------------------------------------

fn pair_request() -> PairRequest {
    PairRequest { token_id: "tok".into(), secret: b"secret".to_vec(), csr_der: b"csr".to_vec() }
}

#[tokio::test]
async fn a_pairing_request_is_answered_and_both_ends_close() {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let (answer, request) = pairing::read_request(&edge, TIMEOUT).await.unwrap();
        assert_eq!(request, pair_request());
        answer.send(&PairResponse::Refused(PairRefusal::Spent), TIMEOUT).await;
    };
    let request = pair_request();
    let (_, redeemed) = tokio::join!(edge_side, pairing::redeem(&agent, &request, TIMEOUT));
    assert_eq!(redeemed.unwrap(), PairResponse::Refused(PairRefusal::Spent));
    assert!(closed_reason(&edge).await.contains("paired"));
}

#[tokio::test]
async fn the_edge_closes_a_pairing_connection_whose_request_is_garbage() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    stream.send.write_all(&garbage_frame()).await.unwrap();
    assert!(matches!(pairing::read_request(&edge, TIMEOUT).await, Err(ServeError::Malformed(_))));
    assert!(closed_reason(&agent).await.contains(&protocol_violation()));
}

#[tokio::test]
async fn the_edge_closes_a_pairing_connection_whose_request_is_over_the_head_limit() {
    let (edge, agent) = memory::pair();
    let mut stream = agent.open_bi().await.unwrap();
    stream.send.write_all(&oversized_prefix()).await.unwrap();
    assert!(matches!(pairing::read_request(&edge, TIMEOUT).await, Err(ServeError::Malformed(_))));
    assert!(closed_reason(&agent).await.contains("bad pairing request"));
}

#[tokio::test(start_paused = true)]
async fn the_edge_closes_a_pairing_connection_that_sends_nothing() {
    let (edge, agent) = memory::pair();
    let _silent = agent.open_bi().await.unwrap();
    assert!(matches!(pairing::read_request(&edge, TIMEOUT).await, Err(ServeError::Timeout(_))));
    assert!(closed_reason(&agent).await.contains("pairing timeout"));
}

#[tokio::test]
async fn the_agent_reports_a_garbage_pairing_answer() {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let mut stream = edge.accept_bi().await.unwrap();
        stream.send.write_all(&garbage_frame()).await.unwrap();
        stream
    };
    let request = pair_request();
    let (_stream, redeemed) = tokio::join!(edge_side, pairing::redeem(&agent, &request, TIMEOUT));
    assert!(matches!(redeemed, Err(RedeemError::Malformed(_))));
}

#[tokio::test]
async fn the_agent_reports_an_edge_that_vanishes_before_answering() {
    let (edge, agent) = memory::pair();
    let edge_side = async {
        let stream = edge.accept_bi().await.unwrap();
        drop(stream);
        edge.close(code::SHUTDOWN, "edge shutting down");
    };
    let request = pair_request();
    let (_, redeemed) = tokio::join!(edge_side, pairing::redeem(&agent, &request, TIMEOUT));
    assert!(matches!(redeemed, Err(RedeemError::Stream(_) | RedeemError::Unanswered)), "{redeemed:?}");
}

#[tokio::test(start_paused = true)]
async fn the_agent_gives_up_on_an_edge_that_never_answers() {
    let (edge, agent) = memory::pair();
    let edge_side = async { edge.accept_bi().await.unwrap() };
    let request = pair_request();
    let (_stream, redeemed) = tokio::join!(edge_side, pairing::redeem(&agent, &request, TIMEOUT));
    assert!(matches!(redeemed, Err(RedeemError::Timeout)));
}

#[tokio::test]
async fn a_large_body_arrives_whole_in_chunks_that_grow_from_small_to_at_most_64_kib() {
    let (edge, agent) = memory::pair();
    let mut outbound = edge.open_bi().await.unwrap();
    let inbound = agent.accept_bi().await.unwrap();
    let sent: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            outbound.send.write_all(&sent).await.unwrap();
            outbound.send.shutdown().await.unwrap();
        })
    };
    let mut body = body::body_from_stream(inbound.recv);
    let (mut got, mut sizes) = (Vec::new(), Vec::new());
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let data = frame.unwrap().into_data().unwrap();
        sizes.push(data.len());
        got.extend_from_slice(&data);
    }
    writer.await.unwrap();
    assert_eq!(got, sent);
    assert!(sizes[0] <= 4 * 1024, "the first read reserves a small buffer: {sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 64 * 1024), "{sizes:?}");
    assert!(sizes.len() < 300 / 4, "reads grow past the first size: {} reads", sizes.len());
    drop(inbound.send);
}
