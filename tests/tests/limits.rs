//! Limits at the edge: each exceeded limit has its own answer and never costs the bot anything.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, StatusCode, header};
use relay_testkit::acs::MediaCall;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::{Stack, eventually, over_both_transports};
use tokio_tungstenite::tungstenite::Message;

over_both_transports! {
    async fn an_oversized_request_head_gets_431() {
        let stack = Stack::start_with(|s| s.max_header_bytes = 8192).await.unwrap();
        let mut req = post_json(stack.public(), "/api/incomingCall", "[]");
        req.headers_mut().insert("x-padding", HeaderValue::from_str(&"a".repeat(20_000)).unwrap());
        let response = send_collect(stack.public(), req).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(stack.bot.hits(), 0);
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_oversized_media_message_closes_both_sockets_with_1009() {
        let stack = Stack::start_with(|s| s.max_ws_message_bytes = 1024).await.unwrap();
        let mut call = MediaCall::connect(stack.public(), "/ws", "corr-big").await.unwrap();
        call.socket().send(Message::Text("small".into())).await.unwrap();
        assert_eq!(call.socket().next().await.unwrap().unwrap(), Message::Text("small".into()));
        call.socket().send(Message::Text("x".repeat(4096).into())).await.unwrap();
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(10), call.socket().next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        };
        assert_eq!(close.map(|c| u16::from(c.code)), Some(1009));
        let session = stack.bot.sessions()[0].clone();
        assert!(eventually(Duration::from_secs(10), || async { session.close.lock().unwrap().is_some() }).await);
        assert_eq!(session.close.lock().unwrap().as_ref().map(|c| c.0), Some(1009), "the bot learns why the call ended");
        assert_eq!(session.received.load(Ordering::SeqCst), 1, "the oversized message never reached the bot");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_agent_at_its_exchange_limit_gets_no_more_and_the_caller_gets_503() {
        let stack = Stack::start_with(|s| s.max_exchanges_per_agent = 1).await.unwrap();
        let public = stack.public();
        let slow = tokio::spawn(async move {
            send_collect(public, post_json(public, "/api/callbacks/slow?delay_ms=3000", "[]")).await
        });
        assert!(
            eventually(Duration::from_secs(10), || async { stack.bot.hits() == 1 }).await,
            "the slow request must be in flight"
        );
        let refused = send_collect(public, post_json(public, "/api/callbacks/second", "[]")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
        let after = send_collect(public, post_json(public, "/api/callbacks/third", "[]")).await.unwrap();
        assert_eq!(after.status(), StatusCode::OK, "capacity returns when the exchange ends");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn a_source_over_its_request_rate_gets_429() {
        // One request a second with a burst of two: the third back-to-back request is refused.
        let stack = Stack::start_with(|s| s.rate_limit_per_source = Some(1)).await.unwrap();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses
                .push(send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap());
        }
        assert_eq!(statuses[0].status(), StatusCode::OK);
        assert_eq!(statuses[1].status(), StatusCode::OK);
        assert_eq!(statuses[2].status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(statuses[2].headers().get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(stack.bot.hits(), 2);
        stack.shutdown().await;
    }
}
