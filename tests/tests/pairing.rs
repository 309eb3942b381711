//! Pairing over the wire, and who may use the tunnel.

use std::time::{Duration, SystemTime};

use relay_agent::PairError;
use relay_pki::{CaPin, EdgeState, PairingToken, TokenError, generate_agent_csr};
use relay_proto::PairRefusal;
use relay_testkit::Stack;
use relay_testkit::over_both_transports;

fn pair_dir(stack: &Stack, name: &str) -> std::path::PathBuf {
    stack.dir.path().join(name)
}

over_both_transports! {
    async fn a_token_pairs_once_and_a_second_use_is_refused() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let token = stack.token("bot-a").unwrap();
        let paired = relay_agent::pair(&pair_dir(&stack, "a1"), &token, &Default::default(), relay_testkit::transport::pairing()).await.unwrap();
        assert_eq!(paired.agent_name, "bot-a");
        let again = relay_agent::pair(&pair_dir(&stack, "a2"), &token, &Default::default(), relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(again, PairError::Refused(PairRefusal::Spent)), "{again}");
        assert!(!pair_dir(&stack, "a2").join("identity.pem").exists(), "a refused pairing stores nothing");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn the_agent_key_is_private_and_the_certificate_names_the_agent() {
        use std::os::unix::fs::PermissionsExt;
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let dir = stack.pair_agent("bot-b").await.unwrap();
        let mode = std::fs::metadata(dir.join("identity.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let identity = relay_pki::AgentState::load(&dir).unwrap();
        assert_eq!(relay_pki::agent_name_from_cert(&identity.cert_chain[0]).unwrap(), "bot-b");
        assert_eq!(identity.edge_addr, stack.edge.tunnel_addr().to_string());
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_expired_token_is_refused() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let state = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
        let issued_long_ago = SystemTime::now() - Duration::from_secs(3600);
        let token = state
            .create_token("bot-c", &stack.edge.tunnel_addr().to_string(), Duration::from_secs(60), issued_long_ago, false)
            .unwrap();
        let err = relay_agent::pair(&pair_dir(&stack, "c"), &token.encode(), &Default::default(), relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(err, PairError::Refused(PairRefusal::Expired)), "{err}");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_unknown_token_is_refused() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let state = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
        let never_stored = PairingToken::generate(stack.edge.tunnel_addr().to_string(), state.ca().pin().unwrap()).unwrap();
        let err = relay_agent::pair(&pair_dir(&stack, "d"), &never_stored.encode(), &Default::default(), relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(err, PairError::Refused(PairRefusal::UnknownToken)), "{err}");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn a_tampered_token_is_refused_and_the_genuine_one_still_works() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let genuine = stack.token("bot-e").unwrap();
        let mut altered = PairingToken::parse(&genuine).unwrap();
        altered.secret[0] ^= 0x01;
        let err = relay_agent::pair(&pair_dir(&stack, "e1"), &altered.encode(), &Default::default(), relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(err, PairError::Refused(PairRefusal::BadSecret)), "{err}");

        let truncated = &genuine[..genuine.len() - 4];
        let err = relay_agent::pair(&pair_dir(&stack, "e2"), truncated, &Default::default(), relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(err, PairError::Token(TokenError::Corrupt)), "{err}");

        relay_agent::pair(&pair_dir(&stack, "e3"), &genuine, &Default::default(), relay_testkit::transport::pairing()).await.unwrap();
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_edge_that_does_not_match_the_pin_is_refused_before_the_secret_is_sent() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let genuine = stack.token("bot-f").unwrap();
        let mut wrong_pin = PairingToken::parse(&genuine).unwrap();
        wrong_pin.ca_pin = CaPin([0xab; 32]);
        let err = relay_agent::pair(&pair_dir(&stack, "f1"), &wrong_pin.encode(), &Default::default(), relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(err, PairError::PinMismatch(_)), "{err}");
        // The secret never reached the edge, so the token is unspent.
        relay_agent::pair(&pair_dir(&stack, "f2"), &genuine, &Default::default(), relay_testkit::transport::pairing()).await.unwrap();
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_unreachable_edge_is_a_clear_error() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let mut token = PairingToken::parse(&stack.token("bot-g").unwrap()).unwrap();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        token.edge_addr = closed.to_string();
        let settings = relay_transport::TunnelSettings { handshake_timeout: Duration::from_secs(2), ..Default::default() };
        let err = relay_agent::pair(&pair_dir(&stack, "g"), &token.encode(), &settings, relay_testkit::transport::pairing()).await.unwrap_err();
        assert!(matches!(err, PairError::Unreachable { .. }), "{err}");
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn an_agent_certificate_from_another_ca_is_refused_in_the_handshake() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        // A different CA signs a certificate for a name this edge has paired.
        stack.pair_agent("agent-x").await.unwrap();
        let other_dir = stack.dir.path().join("other-edge");
        let other = EdgeState::init(&other_dir, &[], SystemTime::now()).unwrap();
        let (key_pem, csr) = generate_agent_csr("agent-x").unwrap();
        let forged = other.ca().sign_agent_csr(&csr, "agent-x", SystemTime::now(), Duration::from_secs(3600)).unwrap();
        let key = rustls_key(&key_pem);
        let ours = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
        let ca = ours.tls_material().unwrap().ca_cert;

        let dialled = relay_transport::dial_tunnel(
            relay_testkit::transport::current(),
            stack.edge.tunnel_addr(),
            "localhost",
            &relay_pki::TlsIdentity { cert_chain: vec![forged.cert_der.clone().into()], key, ca_cert: ca },
            &Default::default(),
        )
        .await;
        // In TLS 1.3 the client may finish its handshake before the server checks its certificate;
        // either way the connection must end without ever being usable.
        if let Ok(conn) = dialled {
            let lost = tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .expect("the edge must close the connection");
            assert!(lost.0.to_lowercase().contains("certificate") || lost.0.contains("alert"), "{}", lost.0);
        }
        assert!(stack.edge.connected_agents().is_empty());
        stack.shutdown().await;
    }
}

fn rustls_key(pem: &str) -> rustls_pki_types::PrivateKeyDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn repeated_wrong_secrets_from_one_address_are_rate_limited() {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let genuine = stack.token("bot-h").unwrap();
    let mut wrong = PairingToken::parse(&genuine).unwrap();
    wrong.secret[5] ^= 0x40;
    for attempt in 0..5 {
        let err = relay_agent::pair(
            &pair_dir(&stack, "h"),
            &wrong.encode(),
            &Default::default(),
            relay_testkit::transport::pairing(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PairError::Refused(PairRefusal::BadSecret)), "attempt {attempt}: {err}");
    }
    let err =
        relay_agent::pair(&pair_dir(&stack, "h"), &genuine, &Default::default(), relay_testkit::transport::pairing())
            .await
            .unwrap_err();
    assert!(matches!(err, PairError::Refused(PairRefusal::RateLimited)), "{err}");
    let state = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
    assert!(state.pending_tokens().iter().any(|t| t.agent == "bot-h"), "a refused attempt must not spend the token");
    stack.shutdown().await;
}
