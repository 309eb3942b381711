//! Webhooks through the real edge, agent and bot: exactness, the edge's own answers, failures.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use relay_testkit::client::{TestBody, full, post_json, send_collect};
use relay_testkit::{Stack, acs, eventually, over_both_transports};

fn request(method: Method, path: &str, body: impl Into<Bytes>) -> Request<TestBody> {
    let mut req = Request::new(full(body));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut().insert(header::HOST, HeaderValue::from_static("relay.example.com"));
    req
}

over_both_transports! {
    async fn webhook_round_trip_is_byte_exact_with_headers_query_and_forwarding_headers() {
        let stack = Stack::start().await.unwrap();
        let body = acs::callback_event("CallConnected", "call-1", "corr-1");
        let mut req = request(Method::POST, "/api/callbacks/ctx-42?callerId=abc&x=%20y", body.clone());
        let h = req.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/cloudevents-batch+json"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer acs-jwt"));
        h.append("x-multi", HeaderValue::from_static("one"));
        h.append("x-multi", HeaderValue::from_static("two"));
        h.insert("x-binary", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        // Hop-by-hop headers, which must not cross.
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("secret-to-this-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        h.insert(header::TE, HeaderValue::from_static("trailers"));

        let response = send_collect(stack.public(), req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), body.as_bytes(), "the bot echoes the body; it must come back unchanged");
        assert_eq!(response.headers().get("x-bot").unwrap(), "echo");
        let cookies: Vec<_> = response.headers().get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);

        let seen = stack.bot.requests();
        assert_eq!(seen.len(), 1);
        let seen = &seen[0];
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path_and_query, "/api/callbacks/ctx-42?callerId=abc&x=%20y");
        assert_eq!(seen.body, body.as_bytes());
        assert_eq!(seen.headers.get(header::CONTENT_TYPE).unwrap(), "application/cloudevents-batch+json");
        assert_eq!(seen.headers.get(header::AUTHORIZATION).unwrap(), "Bearer acs-jwt");
        let multi: Vec<_> = seen.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        assert_eq!(seen.headers.get("x-binary").unwrap().as_bytes(), b"caf\xe9");
        assert_eq!(
            seen.headers.get("x-forwarded-for").unwrap(),
            "127.0.0.1",
            "an untrusted client's X-Forwarded-For is replaced, not appended to"
        );
        assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "relay.example.com");
        for hop in ["x-hop", "keep-alive", "proxy-authorization", "te"] {
            assert!(seen.headers.get(hop).is_none(), "hop-by-hop header {hop} reached the bot");
        }
        assert!(
            seen.headers.get(header::CONNECTION).is_none_or(|v| !v.to_str().unwrap().contains("x-hop")),
            "the client's Connection header must not be forwarded"
        );
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn incoming_call_event_reaches_the_bot_and_the_bot_status_comes_back() {
        let stack = Stack::start().await.unwrap();
        let event = acs::incoming_call_event("corr-7");
        let response =
            send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall?status=202", &event)).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(stack.bot.requests()[0].body, event.as_bytes());
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn unknown_paths_get_404_and_wrong_methods_405_without_reaching_the_bot() {
        let stack = Stack::start().await.unwrap();
        for path in ["/", "/admin", "/api/incomingCall/extra", "/api/callbacks", "/wsx"] {
            let response = send_collect(stack.public(), request(Method::POST, path, "x")).await.unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        }
        let response = send_collect(stack.public(), request(Method::GET, "/api/incomingCall", "")).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers().get(header::ALLOW).unwrap(), "POST");
        assert_eq!(stack.bot.hits(), 0, "nothing the edge refuses may reach the bot");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn probes_are_answered_by_the_edge() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let health = send_collect(stack.public(), request(Method::GET, "/healthz", "")).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        let ready = send_collect(stack.public(), request(Method::GET, "/readyz", "")).await.unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(ready.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(stack.bot.hits(), 0);
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn webhook_without_agent_gets_503_with_retry_after() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let retry: u64 = response.headers().get(header::RETRY_AFTER).unwrap().to_str().unwrap().parse().unwrap();
        assert!(retry >= 1);
        assert_eq!(stack.bot.hits(), 0);
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn declared_oversized_body_gets_413_at_the_edge() {
        let stack = Stack::start_with(|s| s.max_body_bytes = 1024).await.unwrap();
        let response =
            send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", &"x".repeat(1025))).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(stack.bot.hits(), 0, "a body refused by its declared length never reaches the bot");
        // At the limit it passes.
        let response =
            send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", &"x".repeat(1024))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn streamed_oversized_body_gets_413_and_the_bot_never_sees_it_complete() {
        let stack = Stack::start_with(|s| s.max_body_bytes = 64 * 1024).await.unwrap();
        // No Content-Length: the edge can only find out while streaming.
        let (body, _) = relay_testkit::client::pattern_body(256 * 1024, 8 * 1024);
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/api/callbacks/big".parse().unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("relay.example.com"));
        let response = send_collect(stack.public(), req).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(stack.bot.requests().is_empty(), "the bot must never receive the truncated body as a whole one");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn unreachable_bot_gets_502_from_the_agent_side() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let state = stack.pair_agent("agent-1").await.unwrap();
        // Point the agent at a port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut settings = stack.agent_settings(&state).unwrap();
        settings.upstream = format!("http://{closed}").parse().unwrap();
        let agent = relay_agent::Agent::start(settings).await.unwrap();
        stack.wait_connected(1).await.unwrap();
        let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        agent.shutdown().await;
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn slow_bot_gets_504_after_the_bot_timeout() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let state = stack.pair_agent("agent-1").await.unwrap();
        let mut settings = stack.agent_settings(&state).unwrap();
        settings.bot_timeout = Duration::from_millis(300);
        let agent = relay_agent::Agent::start(settings).await.unwrap();
        stack.wait_connected(1).await.unwrap();
        let response =
            send_collect(stack.public(), post_json(stack.public(), "/api/callbacks/x?delay_ms=5000", "[]")).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        agent.shutdown().await;
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn after_an_agent_restart_readiness_returns_and_traffic_flows_again() {
        let mut stack = Stack::start().await.unwrap();
        let ok = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[1]")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);

        stack.stop_agents().await;
        let public = stack.public();
        let not_ready = eventually(Duration::from_secs(10), || async {
            send_collect(public, request(Method::GET, "/readyz", ""))
                .await
                .is_ok_and(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
        })
        .await;
        assert!(not_ready, "readiness must drop when the only agent leaves");
        let gap = send_collect(public, post_json(public, "/api/incomingCall", "[2]")).await.unwrap();
        assert_eq!(gap.status(), StatusCode::SERVICE_UNAVAILABLE);

        let state = stack.dir.path().join("agent-agent-1");
        stack.start_agent(&state).await.unwrap();
        let ready = eventually(Duration::from_secs(20), || async {
            send_collect(public, request(Method::GET, "/readyz", "")).await.is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
        assert!(ready, "readiness must return once the agent reconnects");
        let ok = send_collect(public, post_json(public, "/api/incomingCall", "[3]")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let bodies: Vec<Vec<u8>> = stack.bot.requests().into_iter().map(|r| r.body).collect();
        assert_eq!(bodies, [b"[1]".to_vec(), b"[3]".to_vec()], "the request sent during the gap must not be delivered");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stack = Stack::start_with(|s| s.header_read_timeout = Duration::from_millis(300)).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(stack.public()).await.unwrap();
        slow.write_all(b"POST /api/incomingCall HTTP/1.1\r\nHost: relay\r\n").await.unwrap();
        let mut buf = Vec::new();
        // The edge must end the connection itself; the deadline only bounds the test.
        let ended = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
        assert!(ended.is_ok(), "the edge kept a half-sent request open");
        assert_eq!(stack.bot.hits(), 0);
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn the_agent_serves_its_own_metrics() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let dir = stack.pair_agent("metered").await.unwrap();
        let agent = relay_agent::Agent::start(stack.agent_settings(&dir).unwrap()).await.unwrap();
        stack.wait_connected(1).await.unwrap();
        assert_eq!(
            send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap().status(),
            StatusCode::OK
        );
        let failed =
            send_collect(stack.public(), post_json(stack.public(), "/api/callbacks/x?status=503", "[]")).await.unwrap();
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        let mut req = request(Method::GET, "/metrics", "");
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("admin"));
        let text =
            String::from_utf8(send_collect(agent.admin_addr().unwrap(), req).await.unwrap().body().to_vec()).unwrap();
        let connected = format!("relay_agent_connected{{transport=\"{}\"}} 1", relay_testkit::transport::current());
        for expected in [
            r#"relay_agent_exchanges_total{kind="http",outcome="2xx"} 1"#,
            r#"relay_agent_exchanges_total{kind="http",outcome="5xx"} 1"#,
            connected.as_str(),
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        agent.shutdown().await;
        stack.shutdown().await;
    }
}
