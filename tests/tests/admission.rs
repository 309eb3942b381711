//! Admission at the edge: only requests that pass every check a route names reach the bot, and
//! Event Grid's handshakes are answered without it.

use http::{HeaderValue, Method, Request, StatusCode, header};
use relay_edge::EdgeSettings;
use relay_edge::admission::shared_secret::SecretLocation;
use relay_edge::admission::{AuthCheck, EventGridSettings, SharedSecret, SourceIpSet};
use relay_testkit::Stack;
use relay_testkit::acs::{self, MediaCall};
use relay_testkit::client::{TestBody, full, post_json, send_collect};

fn guard(settings: &mut EdgeSettings, route: &str, checks: &[AuthCheck]) {
    for r in settings.routes.iter_mut().filter(|r| r.name == route) {
        r.auth = checks.to_vec();
    }
}

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn post(path: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut req = Request::new(full("[]"));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut().insert(header::HOST, HeaderValue::from_static("relay.example.com"));
    for (name, value) in headers {
        req.headers_mut()
            .insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    req
}

#[tokio::test]
async fn a_shared_secret_header_is_required_and_stripped_before_the_bot() {
    let stack = Stack::start_with(|s| {
        guard(s, "/api/callbacks/*", &[AuthCheck::SharedSecret]);
        let name = http::HeaderName::from_static("x-bot-secret");
        s.admission.shared_secret = Some(SharedSecret::new(SecretLocation::Header(name), b"open-sesame".to_vec()));
    })
    .await
    .unwrap();
    let missing = send_collect(stack.public(), post("/api/callbacks/c1", &[])).await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key(header::WWW_AUTHENTICATE));
    let wrong =
        send_collect(stack.public(), post("/api/callbacks/c1", &[("x-bot-secret", "open-sesam")])).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(!String::from_utf8_lossy(wrong.body()).contains("open-sesam"), "a refusal never echoes the credential");
    assert_eq!(stack.bot.hits(), 0, "refused requests never reach the bot");

    let right =
        send_collect(stack.public(), post("/api/callbacks/c1", &[("x-bot-secret", "open-sesame")])).await.unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    assert!(stack.bot.requests()[0].headers.get("x-bot-secret").is_none(), "the secret is stripped before forwarding");
    // Routes without the check are unaffected.
    let open = send_collect(stack.public(), post("/api/incomingCall", &[])).await.unwrap();
    assert_eq!(open.status(), StatusCode::OK);
    stack.shutdown().await;
}

#[tokio::test]
async fn a_media_upgrade_without_the_secret_is_refused_before_any_stream_opens() {
    let stack = Stack::start_with(|s| {
        guard(s, "/ws", &[AuthCheck::SharedSecret]);
        s.admission.shared_secret =
            Some(SharedSecret::new(SecretLocation::Query("token".into()), b"media-key".to_vec()));
    })
    .await
    .unwrap();
    let refused = MediaCall::connect(stack.public(), "/ws?callId=1", "corr-a").await.unwrap_err();
    match refused.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
        Some(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(stack.bot.hits(), 0);
    let mut call = MediaCall::connect(stack.public(), "/ws?callId=1&token=media-key", "corr-a").await.unwrap();
    let stats = call.stream_audio(10, std::time::Duration::from_secs(5)).await.unwrap();
    assert!(stats.intact());
    assert_eq!(stack.bot.sessions()[0].path_and_query, "/ws?callId=1", "the secret never reaches the bot");
    call.close(1000, "bye").await.unwrap();
    stack.shutdown().await;
}

#[tokio::test]
async fn source_ip_allows_the_list_denies_the_rest_and_ignores_spoofed_forwarded_for() {
    // Loopback is not in the ACS ranges: every direct request is denied.
    let denied = Stack::start_with(|s| {
        guard(s, "/api/incomingCall", &[AuthCheck::SourceIp]);
        s.admission.source_ip = Some(SourceIpSet::new(nets(&["52.112.0.0/14"])));
    })
    .await
    .unwrap();
    let direct = send_collect(denied.public(), post("/api/incomingCall", &[])).await.unwrap();
    assert_eq!(direct.status(), StatusCode::FORBIDDEN);
    let spoofed =
        send_collect(denied.public(), post("/api/incomingCall", &[("x-forwarded-for", "52.112.0.1")])).await.unwrap();
    assert_eq!(spoofed.status(), StatusCode::FORBIDDEN, "X-Forwarded-For from an untrusted peer must be ignored");
    assert_eq!(denied.bot.hits(), 0);
    denied.shutdown().await;

    let allowed = Stack::start_with(|s| {
        guard(s, "/api/incomingCall", &[AuthCheck::SourceIp]);
        s.admission.source_ip = Some(SourceIpSet::new(nets(&["127.0.0.0/8"])));
    })
    .await
    .unwrap();
    let ok = send_collect(allowed.public(), post("/api/incomingCall", &[])).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    allowed.shutdown().await;
}

#[tokio::test]
async fn a_trusted_proxy_s_forwarded_for_and_proto_are_believed() {
    let stack = Stack::start_with(|s| {
        guard(s, "/api/incomingCall", &[AuthCheck::SourceIp]);
        s.admission.source_ip = Some(SourceIpSet::new(nets(&["52.112.0.0/14"])));
        s.admission.trusted_proxies = nets(&["127.0.0.0/8"]);
    })
    .await
    .unwrap();
    let via_ingress =
        post("/api/incomingCall", &[("x-forwarded-for", "198.51.100.9, 52.112.0.1"), ("x-forwarded-proto", "https")]);
    let ok = send_collect(stack.public(), via_ingress).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let seen = &stack.bot.requests()[0];
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), "198.51.100.9, 52.112.0.1, 127.0.0.1");
    let outsider =
        send_collect(stack.public(), post("/api/incomingCall", &[("x-forwarded-for", "52.112.0.1, 198.51.100.9")]))
            .await
            .unwrap();
    assert_eq!(outsider.status(), StatusCode::FORBIDDEN, "the right-most untrusted entry is the client");
    stack.shutdown().await;
}

#[tokio::test]
async fn event_grid_handshakes_are_answered_at_the_edge_and_subscriptions_checked() {
    let stack = Stack::start_with(|s| {
        guard(s, "/api/incomingCall", &[AuthCheck::EventGrid]);
        s.admission.event_grid =
            Some(EventGridSettings { subscription_names: vec!["incoming-calls".into()], entra: None });
    })
    .await
    .unwrap();
    let validation = r#"[{"id":"v1","topic":"t","subject":"","eventType":"Microsoft.EventGrid.SubscriptionValidationEvent","data":{"validationCode":"6f1c5a2e-code","validationUrl":"https://example.invalid"},"dataVersion":"2","eventTime":"2026-11-26T09:00:00Z"}]"#;
    let mut req = post_json(stack.public(), "/api/incomingCall", validation);
    req.headers_mut().insert("aeg-event-type", HeaderValue::from_static("SubscriptionValidation"));
    req.headers_mut().insert("aeg-subscription-name", HeaderValue::from_static("INCOMING-CALLS"));
    let answered = send_collect(stack.public(), req).await.unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(answered.body()).unwrap();
    assert_eq!(json["validationResponse"], "6f1c5a2e-code");

    let mut options = Request::new(full(""));
    *options.method_mut() = Method::OPTIONS;
    *options.uri_mut() = "/api/incomingCall".parse().unwrap();
    options.headers_mut().insert(header::HOST, HeaderValue::from_static("relay.example.com"));
    options.headers_mut().insert("webhook-request-origin", HeaderValue::from_static("eventgrid.azure.net"));
    let handshake = send_collect(stack.public(), options).await.unwrap();
    assert_eq!(handshake.status(), StatusCode::OK);
    assert_eq!(handshake.headers().get("webhook-allowed-origin").unwrap(), "eventgrid.azure.net");
    assert_eq!(handshake.headers().get(header::ALLOW).unwrap(), "POST");
    assert_eq!(stack.bot.hits(), 0, "the bot never sees Event Grid's handshakes");

    let event = acs::incoming_call_event("corr-eg");
    let mut wrong = post_json(stack.public(), "/api/incomingCall", &event);
    wrong.headers_mut().insert("aeg-subscription-name", HeaderValue::from_static("SOMEONE-ELSES"));
    assert_eq!(send_collect(stack.public(), wrong).await.unwrap().status(), StatusCode::FORBIDDEN);
    let missing = post_json(stack.public(), "/api/incomingCall", &event);
    assert_eq!(send_collect(stack.public(), missing).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(stack.bot.hits(), 0);

    let mut right = post_json(stack.public(), "/api/incomingCall", &event);
    right.headers_mut().insert("aeg-subscription-name", HeaderValue::from_static("INCOMING-CALLS"));
    assert_eq!(send_collect(stack.public(), right).await.unwrap().status(), StatusCode::OK);
    assert_eq!(stack.bot.requests()[0].body, event.as_bytes());

    // The CloudEvents schema: one event object with the same delivery headers, checked the same.
    let cloud = acs::incoming_call_cloud_event("corr-ce");
    let cloud_post = |name: &'static str| {
        let mut req = post_json(stack.public(), "/api/incomingCall", &cloud);
        req.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/cloudevents+json"));
        req.headers_mut().insert("aeg-event-type", HeaderValue::from_static("Notification"));
        req.headers_mut().insert("aeg-metadata-version", HeaderValue::from_static("1.0"));
        req.headers_mut().insert("aeg-subscription-name", HeaderValue::from_static(name));
        req
    };
    assert_eq!(
        send_collect(stack.public(), cloud_post("SOMEONE-ELSES")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(send_collect(stack.public(), cloud_post("INCOMING-CALLS")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(stack.bot.requests()[1].body, cloud.as_bytes());
    assert_eq!(stack.bot.hits(), 2);
    stack.shutdown().await;
}

mod acs_jwt {
    use super::*;
    use base64::Engine;
    use relay_edge::admission::AcsJwtConfig;
    use relay_edge::admission::acs_jwt::{JWKS_REFRESH_MIN_INTERVAL, JwksSource};
    use relay_testkit::acs_signer::{self, ACS_ISSUER, JwksServer, TEST_AUDIENCE, TEST_KID};
    use relay_testkit::eventually;
    use std::time::Duration;

    async fn jwt_stack(keys: JwksSource, refresh: Duration) -> Stack {
        Stack::start_with(move |s| {
            guard(s, "/api/callbacks/*", &[AuthCheck::AcsJwt]);
            guard(s, "/ws", &[AuthCheck::AcsJwt]);
            guard(s, "/api/incomingCall", &[AuthCheck::SharedSecret]);
            let name = http::HeaderName::from_static("x-bot-secret");
            s.admission.shared_secret = Some(SharedSecret::new(SecretLocation::Header(name), b"eg-secret".to_vec()));
            s.admission.acs = Some(AcsJwtConfig {
                audience: TEST_AUDIENCE.into(),
                issuer: ACS_ISSUER.into(),
                keys,
                refresh_min_interval: refresh,
            });
        })
        .await
        .unwrap()
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn b64(json: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
    }

    #[tokio::test]
    async fn a_valid_acs_token_passes_on_callbacks_and_media() {
        let stack = jwt_stack(JwksSource::File(acs_signer::jwks_file()), JWKS_REFRESH_MIN_INTERVAL).await;
        let token = acs_signer::valid_token(TEST_AUDIENCE).unwrap();
        let ok = send_collect(stack.public(), post("/api/callbacks/c", &[("authorization", &bearer(&token))]))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(stack.bot.requests()[0].headers.get("authorization").unwrap().to_str().unwrap(), bearer(&token));

        let refused = MediaCall::connect(stack.public(), "/ws", "corr-noauth").await.unwrap_err();
        assert!(refused.to_string().contains("401"), "{refused}");
        assert!(stack.bot.sessions().is_empty(), "a refused upgrade opens no stream");
        // MediaCall sends "Bearer test-acs-token"; a call with a real token goes through.
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            stack.public()
        ))
        .unwrap();
        request.headers_mut().insert("authorization", bearer(&token).parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        use futures_util::{SinkExt, StreamExt};
        ws.send(tokio_tungstenite::tungstenite::Message::Text("hello".into())).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echo, tokio_tungstenite::tungstenite::Message::Text("hello".into()));
        stack.shutdown().await;
    }

    #[tokio::test]
    async fn every_kind_of_bad_token_is_refused_with_401_and_never_reaches_the_bot() {
        let stack = jwt_stack(JwksSource::File(acs_signer::jwks_file()), JWKS_REFRESH_MIN_INTERVAL).await;
        let now = acs_signer::unix_now();
        let with = |patch: serde_json::Value| {
            let mut claims = acs_signer::claims(TEST_AUDIENCE);
            for (k, v) in patch.as_object().unwrap() {
                claims[k] = v.clone();
            }
            acs_signer::sign(&claims, TEST_KID).unwrap()
        };
        let alg_none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(&acs_signer::claims(TEST_AUDIENCE))
        );
        let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        hs_header.kid = Some(TEST_KID.into());
        let hs256_with_public_key = jsonwebtoken::encode(
            &hs_header,
            &acs_signer::claims(TEST_AUDIENCE),
            &jsonwebtoken::EncodingKey::from_secret(acs_signer::jwks_json().as_bytes()),
        )
        .unwrap();
        let cases: Vec<(&str, Option<String>)> = vec![
            ("missing header", None),
            ("garbage", Some(bearer("not.a.jwt"))),
            ("wrong scheme", Some(format!("Basic {}", acs_signer::valid_token(TEST_AUDIENCE).unwrap()))),
            ("expired", Some(bearer(&with(serde_json::json!({"exp": now - 300, "nbf": now - 900}))))),
            ("not yet valid", Some(bearer(&with(serde_json::json!({"nbf": now + 300}))))),
            ("wrong audience", Some(bearer(&with(serde_json::json!({"aud": "someone-else"}))))),
            ("wrong issuer", Some(bearer(&with(serde_json::json!({"iss": "https://evil.example.com"}))))),
            (
                "unknown kid",
                Some(bearer(&acs_signer::sign(&acs_signer::claims(TEST_AUDIENCE), "unknown-kid").unwrap())),
            ),
            ("alg none", Some(bearer(&alg_none))),
            ("HS256 with the public key", Some(bearer(&hs256_with_public_key))),
        ];
        for (what, authorization) in cases {
            let headers: Vec<(&str, &str)> = authorization.iter().map(|a| ("authorization", a.as_str())).collect();
            let response = send_collect(stack.public(), post("/api/callbacks/c", &headers)).await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
            assert!(response.headers().get(header::WWW_AUTHENTICATE).is_some(), "{what}: 401 needs a challenge");
        }
        // A genuine ACS token does not open a route guarded by another check.
        let token = acs_signer::valid_token(TEST_AUDIENCE).unwrap();
        let other_route =
            send_collect(stack.public(), post("/api/incomingCall", &[("authorization", &bearer(&token))]))
                .await
                .unwrap();
        assert_eq!(other_route.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(stack.bot.hits(), 0, "no refused request may reach the bot");
        stack.shutdown().await;
    }

    #[tokio::test]
    async fn keys_refresh_on_an_unknown_kid_and_are_served_from_cache_while_the_url_is_down() {
        let server = JwksServer::start(Some(r#"{"keys":[]}"#.into())).await.unwrap();
        let uri = server.url().parse().unwrap();
        let stack = jwt_stack(JwksSource::Url(uri), Duration::from_millis(200)).await;
        let token = acs_signer::valid_token(TEST_AUDIENCE).unwrap();
        let auth = bearer(&token);
        let refused =
            send_collect(stack.public(), post("/api/callbacks/c", &[("authorization", &auth)])).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "the key is not published yet");

        // ACS publishes the key: the next unknown-kid request after the interval refreshes.
        server.set(Some(acs_signer::jwks_json().into()));
        let public = stack.public();
        let accepted = eventually(Duration::from_secs(10), || async {
            let r = send_collect(public, post("/api/callbacks/c", &[("authorization", auth.as_str())])).await;
            r.is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
        assert!(accepted, "the key must be fetched once an unknown kid arrives");

        // The key URL goes down: cached keys keep working.
        server.set(None);
        let cached = send_collect(stack.public(), post("/api/callbacks/c", &[("authorization", &auth)])).await.unwrap();
        assert_eq!(cached.status(), StatusCode::OK);
        stack.shutdown().await;
    }

    #[tokio::test]
    async fn made_up_kids_do_not_cause_a_fetch_storm() {
        let server = JwksServer::start(Some(acs_signer::jwks_json().into())).await.unwrap();
        let stack = jwt_stack(JwksSource::Url(server.url().parse().unwrap()), JWKS_REFRESH_MIN_INTERVAL).await;
        assert_eq!(server.fetches(), 1, "keys are fetched once at start-up");
        for i in 0..20 {
            let token = acs_signer::sign(&acs_signer::claims(TEST_AUDIENCE), &format!("made-up-{i}")).unwrap();
            let r = send_collect(stack.public(), post("/api/callbacks/c", &[("authorization", &bearer(&token))]))
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        assert_eq!(server.fetches(), 1, "at most one refresh per interval");
        stack.shutdown().await;
    }
}

#[tokio::test]
async fn requests_rejections_and_agents_show_in_the_metrics() {
    let stack = Stack::start_with(|s| {
        guard(s, "/api/callbacks/*", &[AuthCheck::SharedSecret]);
        let name = http::HeaderName::from_static("x-bot-secret");
        s.admission.shared_secret = Some(SharedSecret::new(SecretLocation::Header(name), b"k".to_vec()));
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let r = send_collect(stack.public(), post("/api/callbacks/c", &[])).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let ok = send_collect(stack.public(), post("/api/callbacks/c", &[("x-bot-secret", "k")])).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let admin = stack.edge.admin_addr().unwrap();
    let scrape = || async move {
        let mut req = Request::new(full(""));
        *req.uri_mut() = "/metrics".parse().unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("admin"));
        String::from_utf8(send_collect(admin, req).await.unwrap().body().to_vec()).unwrap()
    };
    let text = scrape().await;
    for expected in [
        r#"relay_edge_rejections_total{route="/api/callbacks/*",check="shared-secret",reason="missing"} 2"#,
        r#"relay_edge_requests_total{route="/api/callbacks/*",status="401"} 2"#,
        r#"relay_edge_requests_total{route="/api/callbacks/*",status="200"} 1"#,
        r#"relay_edge_bytes_total{direction="in"} 2"#,
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(text.contains("relay_edge_exchange_duration_seconds_count{route=\"/api/callbacks/*\"} 1"), "{text}");
    let agent_gauge = relay_testkit::eventually(std::time::Duration::from_secs(10), || async {
        scrape().await.contains(r#"relay_edge_agents_connected{transport="quic"} 1"#)
    })
    .await;
    assert!(agent_gauge, "the agent gauge must show the connected agent");
    stack.shutdown().await;
}

#[tokio::test]
async fn event_grid_entra_tokens_are_required_when_configured() {
    use relay_edge::admission::EntraConfig;
    use relay_testkit::acs_signer::{self, JwksServer, TEST_KID};
    let keys = JwksServer::start(Some(acs_signer::jwks_json().into())).await.unwrap();
    let tenant = "72f988bf-0000-0000-0000-2d7cd011db47";
    let v2_issuer = format!("https://login.microsoftonline.com/{tenant}/v2.0");
    let discovery =
        JwksServer::start(Some(serde_json::json!({ "issuer": v2_issuer, "jwks_uri": keys.url() }).to_string()))
            .await
            .unwrap();
    let openid_config_url = discovery.url().parse().unwrap();
    let stack = Stack::start_with(move |s| {
        guard(s, "/api/incomingCall", &[AuthCheck::EventGrid]);
        s.admission.event_grid = Some(EventGridSettings {
            subscription_names: vec![],
            entra: Some(EntraConfig {
                tenant_id: tenant.into(),
                audience: "api://acs-relay".into(),
                openid_config_url,
            }),
        });
    })
    .await
    .unwrap();
    let token = |aud: &str, iss: &str| {
        let mut claims = acs_signer::claims(aud);
        claims["iss"] = iss.into();
        format!("Bearer {}", acs_signer::sign(&claims, TEST_KID).unwrap())
    };
    let event = acs::incoming_call_event("corr-entra");
    let send = |authorization: Option<String>| {
        let mut req = post_json(stack.public(), "/api/incomingCall", &event);
        if let Some(value) = authorization {
            req.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
        }
        send_collect(stack.public(), req)
    };
    let missing = send(None).await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(send(Some(token("api://someone-else", &v2_issuer))).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(
        send(Some(token("api://acs-relay", "https://evil.example.com/"))).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(stack.bot.hits(), 0);
    assert_eq!(send(Some(token("api://acs-relay", &v2_issuer))).await.unwrap().status(), StatusCode::OK);
    let v1_issuer = format!("https://sts.windows.net/{tenant}/");
    assert_eq!(send(Some(token("api://acs-relay", &v1_issuer))).await.unwrap().status(), StatusCode::OK);
    stack.shutdown().await;
}
