//! A malformed frame from a peer resets one stream, never the connection.

use std::time::Duration;

use bytes::BufMut;
use http::StatusCode;
use relay_proto::codec::DEFAULT_MAX_HEAD_LEN;
use relay_proto::{ControlMessage, ExchangeHead, Hello, HttpReply, PROTOCOL_VERSION, ResponseHead};
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::{Stack, eventually, over_both_transports};
use relay_transport::{read_frame, write_frame};
use tokio::io::AsyncWriteExt;

over_both_transports! {
    async fn a_malformed_answer_resets_that_exchange_only_while_others_in_flight_and_after_carry_on() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let dir = stack.pair_agent("fake").await.unwrap();
        // A hand-driven agent speaking the protocol, which can misbehave on purpose.
        let conn = stack.dial_as(&dir).await.unwrap().unwrap();
        let mut control = conn.open_bi().await.unwrap();
        let hello = Hello {
            agent_name: "fake".into(),
            software_version: "test".into(),
            protocol_version: PROTOCOL_VERSION,
            capabilities: vec![],
            labels: vec![],
        };
        write_frame(&mut control.send, &ControlMessage::Hello(hello), DEFAULT_MAX_HEAD_LEN).await.unwrap();
        let welcome: ControlMessage = read_frame(&mut control.recv, DEFAULT_MAX_HEAD_LEN).await.unwrap().unwrap();
        assert!(matches!(welcome, ControlMessage::Welcome { .. }));
        stack.wait_connected(1).await.unwrap();

        // The fake agent holds a first exchange open, answers a second with garbage, then finishes
        // the first and serves a third: the garbage must cost only its own stream.
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = conn.clone();
        let fake_agent = tokio::spawn(async move {
            let answer = |mut stream: relay_transport::BiStream| async move {
                let reply = HttpReply::Response(ResponseHead {
                    status: 200,
                    headers: vec![("content-length".into(), b"4".to_vec())],
                });
                write_frame(&mut stream.send, &reply, DEFAULT_MAX_HEAD_LEN).await.unwrap();
                stream.send.write_all(b"fine").await.unwrap();
                stream.send.shutdown().await.unwrap();
            };
            let mut first = serving.accept_bi().await.unwrap();
            let head: ExchangeHead = read_frame(&mut first.recv, DEFAULT_MAX_HEAD_LEN).await.unwrap().unwrap();
            assert!(head.path_and_query.contains("first"));
            held_tx.send(()).unwrap();
            let mut garbage = serving.accept_bi().await.unwrap();
            let head: ExchangeHead = read_frame(&mut garbage.recv, DEFAULT_MAX_HEAD_LEN).await.unwrap().unwrap();
            assert!(head.path_and_query.contains("garbage"));
            // A length prefix followed by bytes that are no HttpReply.
            let mut junk = bytes::BytesMut::new();
            junk.put_u32(6);
            junk.put_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
            garbage.send.write_all(&junk).await.unwrap();
            let _ = garbage.send.shutdown().await;
            release_rx.await.unwrap();
            answer(first).await;
            let mut third = serving.accept_bi().await.unwrap();
            let _: ExchangeHead = read_frame(&mut third.recv, DEFAULT_MAX_HEAD_LEN).await.unwrap().unwrap();
            answer(third).await;
        });

        let public = stack.public();
        let first =
            tokio::spawn(async move { send_collect(public, post_json(public, "/api/callbacks/first", "[]")).await });
        held_rx.await.unwrap();
        let bad = send_collect(public, post_json(public, "/api/callbacks/garbage", "[]")).await.unwrap();
        assert_eq!(bad.status(), StatusCode::BAD_GATEWAY);
        release_tx.send(()).unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!((first.status(), &first.body()[..]), (StatusCode::OK, &b"fine"[..]), "the held exchange is untouched");
        let good = send_collect(public, post_json(public, "/api/callbacks/ok", "[]")).await.unwrap();
        assert_eq!(good.status(), StatusCode::OK);
        assert_eq!(&good.body()[..], b"fine");
        assert_eq!(stack.edge.connected_agents(), ["fake"], "the connection must survive a malformed frame");
        tokio::time::timeout(Duration::from_secs(10), fake_agent).await.unwrap().unwrap();
        assert!(eventually(Duration::from_secs(1), || async { stack.edge.connected_agents().len() == 1 }).await);
        stack.shutdown().await;
    }
}
