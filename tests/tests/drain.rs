//! Graceful drain: deploys take replicas away without cutting webhooks short or dropping calls
//! before their grace period.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode, header};
use relay_agent::Agent;
use relay_testkit::acs::MediaCall;
use relay_testkit::bot::EchoBot;
use relay_testkit::client::{full, post_json, send_collect};
use relay_testkit::{Stack, eventually, over_both_transports};
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(20);

fn get(path: &str) -> Request<relay_testkit::client::TestBody> {
    let mut req = Request::new(full(""));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut().insert(header::HOST, "relay".parse().unwrap());
    req
}

over_both_transports! {
    multi_thread async fn a_draining_agent_finishes_webhooks_keeps_calls_for_the_grace_period_and_gets_nothing_new() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let leaving =
            Agent::start(stack.agent_settings(&stack.pair_agent("leaving").await.unwrap()).unwrap()).await.unwrap();
        stack.wait_connected(1).await.unwrap();
        let public = stack.public();

        // Work in flight on the leaving agent: a slow webhook and a call.
        let slow = tokio::spawn(async move {
            send_collect(public, post_json(public, "/api/callbacks/slow?delay_ms=1500", "[]")).await
        });
        let mut call = MediaCall::connect(public, "/ws?call=1", "corr-drain").await.unwrap();
        assert!(eventually(DEADLINE, || async { stack.bot.hits() == 2 }).await);

        // The replacement comes up next to its own bot, so where requests land is visible.
        let other_bot = EchoBot::start().await.unwrap();
        let mut staying_settings = stack.agent_settings(&stack.pair_agent("staying").await.unwrap()).unwrap();
        staying_settings.upstream = relay_agent::config::parse_upstream(&other_bot.url()).unwrap();
        let staying = Agent::start(staying_settings).await.unwrap();
        stack.wait_connected(2).await.unwrap();

        let grace = Duration::from_secs(3);
        let started = Instant::now();
        let drain = tokio::spawn(leaving.drain(grace));
        // New exchanges go to the staying agent at once (the drain notice is one control frame).
        let moved = eventually(DEADLINE, || async {
            let before = other_bot.requests().len();
            let r = send_collect(public, post_json(public, "/api/incomingCall", "[]")).await;
            r.is_ok_and(|r| r.status() == StatusCode::OK) && other_bot.requests().len() == before + 1
        })
        .await;
        assert!(moved, "new exchanges must go to the other agent");
        for _ in 0..5 {
            assert_eq!(
                send_collect(public, post_json(public, "/api/incomingCall", "[]")).await.unwrap().status(),
                StatusCode::OK
            );
        }
        let to_leaving = stack.bot.requests().iter().filter(|r| r.path_and_query.starts_with("/api/incomingCall")).count();
        assert_eq!(to_leaving, 0, "nothing new may reach the draining agent's bot");

        // The slow webhook finishes with the bot's answer; the call still works during the grace.
        assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
        call.socket().send(Message::Text("still here".into())).await.unwrap();
        assert_eq!(call.socket().next().await.unwrap().unwrap(), Message::Text("still here".into()));

        // At the end of the grace period the call is closed with 1001 on both sides.
        let close = loop {
            match tokio::time::timeout(DEADLINE, call.socket().next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        };
        assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
        assert!(started.elapsed() >= grace, "calls run for the whole grace period");
        let session = stack.bot.sessions()[0].clone();
        assert!(eventually(DEADLINE, || async { session.ended.load(Ordering::SeqCst) }).await);
        assert_eq!(session.close.lock().unwrap().as_ref().map(|c| c.0), Some(1001));
        tokio::time::timeout(DEADLINE, drain).await.expect("drain returns after its grace period").unwrap();
        stack.wait_connected(1).await.unwrap();
        staying.shutdown().await;
        stack.shutdown().await;
    }
}

over_both_transports! {
    multi_thread async fn a_draining_edge_is_not_ready_refuses_new_requests_and_lets_in_flight_ones_finish() {
        let stack = Stack::start().await.unwrap();
        let public = stack.public();
        let slow = tokio::spawn(async move {
            send_collect(public, post_json(public, "/api/callbacks/slow?delay_ms=1500", "[]")).await
        });
        assert!(eventually(DEADLINE, || async { stack.bot.hits() == 1 }).await);

        stack.edge.begin_drain();
        let ready = send_collect(public, get("/readyz")).await.unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE, "readiness drops at once");
        let refused = send_collect(public, post_json(public, "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(send_collect(public, get("/healthz")).await.unwrap().status(), StatusCode::OK, "still alive");
        assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK, "in-flight exchanges finish");
        assert_eq!(stack.bot.hits(), 1);
        stack.shutdown().await;
    }
}
