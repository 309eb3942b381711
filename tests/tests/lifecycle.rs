//! The agent certificate lifecycle end to end: renewal under load, expiry, revocation,
//! re-pairing, racing redeemers, edge restarts and damaged state.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use relay_agent::PairError;
use relay_pki::{AgentState, EdgeState, cert_serial_hex, generate_agent_csr};
use relay_proto::PairRefusal;
use relay_testkit::acs::MediaCall;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::{Stack, eventually, over_both_transports};

const DEADLINE: Duration = Duration::from_secs(20);

fn serial_on_disk(dir: &std::path::Path) -> String {
    cert_serial_hex(&AgentState::load(dir).unwrap().cert_chain[0]).unwrap()
}

over_both_transports! {
    multi_thread async fn renewal_while_a_call_streams_loses_no_message_and_the_next_connection_uses_the_new_certificate() {
        // Six-second certificates: the agent renews about four seconds after each issue.
        let mut stack = Stack::start_with(|s| s.agent_cert_validity = Duration::from_secs(6)).await.unwrap();
        let dir = stack.dir.path().join("agent-agent-1");
        let first = serial_on_disk(&dir);

        let mut call = MediaCall::connect(stack.public(), "/ws", "corr-renew").await.unwrap();
        // Ten seconds of audio spans at least one renewal and the first certificate's expiry.
        let stats = call.stream_audio(500, Duration::from_secs(5)).await.unwrap();
        assert!(stats.intact(), "frames lost or reordered across a renewal: {stats:?}");
        call.close(1000, "done").await.unwrap();

        let renewed = serial_on_disk(&dir);
        assert_ne!(renewed, first, "the agent must have stored a renewed certificate");
        let connections = stack.edge.connections();
        assert_eq!(connections.len(), 1, "the renewal must not have dropped the connection");
        let mode = std::fs::metadata(dir.join("identity.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // The next connection presents the newest certificate on disk.
        stack.stop_agents().await;
        stack.wait_connected(0).await.unwrap();
        stack.start_agent(&dir).await.unwrap();
        stack.wait_connected(1).await.unwrap();
        let newest = eventually(DEADLINE, || async {
            stack.edge.connections().first().is_some_and(|c| c.serial == serial_on_disk(&dir))
        })
        .await;
        assert!(newest, "the new connection must stand on the newest certificate on disk");
        stack.shutdown().await;
    }
}

/// Pairs "old" in `state` an hour ago with a one-minute certificate, so it has long expired;
/// returns its key (PEM) and certificate.
fn expired_identity(state: &EdgeState) -> (String, relay_pki::IssuedCert) {
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    let token = state.create_token("old", "127.0.0.1:1", Duration::from_secs(60), long_ago, false).unwrap();
    let (key_pem, csr) = generate_agent_csr("old").unwrap();
    let issued = state.redeem(&token.token_id, &token.secret, &csr, long_ago, Duration::from_secs(60)).unwrap();
    (key_pem, issued)
}

over_both_transports! {
    async fn an_expired_certificate_is_refused_in_the_handshake() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let state = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
        let (key_pem, issued) = expired_identity(&state);
        let dir = stack.dir.path().join("expired");
        AgentState::save(&dir, "old", "127.0.0.1:1", &key_pem, &issued.cert_der, &issued.ca_der).unwrap();
        let dialled = stack.dial_as(&dir).await.unwrap();
        if let Ok(conn) = dialled {
            let lost = tokio::time::timeout(DEADLINE, conn.closed()).await.expect("the edge must close the connection");
            assert!(!lost.0.is_empty());
        }
        assert!(stack.edge.connected_agents().is_empty());
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn the_tunnel_listener_classifies_an_expired_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let state = EdgeState::init(dir.path(), &[], SystemTime::now()).unwrap();
        let (key_pem, issued) = expired_identity(&state);
        let material = state.tls_material().unwrap();
        let settings = relay_transport::TunnelSettings::default();
        let listener = relay_transport::TunnelListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            relay_transport::TcpListen::SamePort,
            &material,
            &settings,
        )
        .unwrap();
        // TCP listens on the QUIC port number.
        let addr = listener.quic_addr().unwrap();
        let transport = relay_testkit::transport::current();
        use rustls_pki_types::pem::PemObject;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let ca = material.ca_cert.clone();
        let dial = tokio::spawn(async move {
            let identity = relay_pki::TlsIdentity { cert_chain: vec![issued.cert_der.into()], key, ca_cert: ca };
            relay_transport::dial_tunnel(transport, addr, "localhost", &identity, &settings).await
        });
        let incoming = tokio::time::timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
        let refused = incoming.handshake().await.err().expect("an expired certificate must be refused");
        assert!(matches!(refused, relay_transport::HandshakeError::CertificateExpired(_)), "{refused}");
        let _ = dial.await;
    }
}

over_both_transports! {
    async fn revoking_closes_a_live_connection_within_two_seconds_and_refuses_it_after() {
        let stack = Stack::start().await.unwrap();
        let dir = stack.dir.path().join("agent-agent-1");
        EdgeState::open(&stack.edge_settings.state_dir).unwrap().revoke("agent-1", SystemTime::now()).unwrap();
        // The edge re-reads records every second; two seconds is the promise, with half a second
        // of slack for a loaded test machine.
        let closed = eventually(Duration::from_millis(2500), || async { stack.edge.connected_agents().is_empty() }).await;
        assert!(closed, "a revoked agent must be disconnected within two seconds");

        // Its certificate is refused from now on.
        let conn = stack.dial_as(&dir).await.unwrap().unwrap();
        let lost = tokio::time::timeout(DEADLINE, conn.closed()).await.unwrap();
        assert!(lost.0.contains("revoked"), "{}", lost.0);
        let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        stack.shutdown().await;
    }
}

over_both_transports! {
    async fn a_revoked_agent_can_be_paired_again_without_replace() {
        let mut stack = Stack::start().await.unwrap();
        stack.stop_agents().await;
        EdgeState::open(&stack.edge_settings.state_dir).unwrap().revoke("agent-1", SystemTime::now()).unwrap();
        let fresh = stack.dir.path().join("agent-1-again");
        relay_agent::pair(&fresh, &stack.token("agent-1").unwrap(), &Default::default(), relay_testkit::transport::pairing()).await.unwrap();
        stack.start_agent(&fresh).await.unwrap();
        stack.wait_connected(1).await.unwrap();
        let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        stack.shutdown().await;
    }
}

over_both_transports! {
    multi_thread async fn two_agents_racing_with_one_token_have_exactly_one_winner() {
        let stack = Stack::start_without_agent(|_| {}).await.unwrap();
        let token = stack.token("contested").unwrap();
        let (a, b) = (stack.dir.path().join("racer-a"), stack.dir.path().join("racer-b"));
        let quic = relay_transport::TunnelSettings::default();
        let (ra, rb) = tokio::join!(relay_agent::pair(&a, &token, &quic, relay_testkit::transport::pairing()), relay_agent::pair(&b, &token, &quic, relay_testkit::transport::pairing()));
        let outcomes = [ra.is_ok(), rb.is_ok()];
        assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "{ra:?} / {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert!(matches!(loser, Err(PairError::Refused(PairRefusal::Spent))), "{loser:?}");
        stack.shutdown().await;
    }
}

over_both_transports! {
    multi_thread async fn an_edge_restart_keeps_paired_agents() {
        let stack = Stack::start().await.unwrap();
        let stack = stack.restart_edge().await.unwrap();
        // The agent was never paired again: it reconnects with the identity it had.
        stack.wait_connected(1).await.unwrap();
        let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        stack.shutdown().await;
    }
}

#[tokio::test]
async fn a_group_readable_agent_key_is_refused_at_start() {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let dir = stack.pair_agent("loose").await.unwrap();
    std::fs::set_permissions(dir.join("identity.pem"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = relay_agent::Agent::start(stack.agent_settings(&dir).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("identity.pem") && err.contains("0600"), "{err}");
    stack.shutdown().await;
}

over_both_transports! {
    multi_thread async fn a_corrupt_agent_record_refuses_that_agent_only() {
        let mut stack = Stack::start().await.unwrap();
        let second = stack.pair_agent("agent-2").await.unwrap();
        stack.start_agent(&second).await.unwrap();
        stack.wait_connected(2).await.unwrap();

        let record = stack.edge_settings.state_dir.join("agents/agent-2.toml");
        std::fs::write(&record, "name = \"agent-2\"\nstatus = \"pai").unwrap();
        let only_first = eventually(DEADLINE, || async { stack.edge.connected_agents() == ["agent-1"] }).await;
        assert!(
            only_first,
            "the agent with the corrupt record must be refused, the other kept: {:?}",
            stack.edge.connected_agents()
        );
        let rows =
            relay_edge::listing::agent_rows(&EdgeState::open(&stack.edge_settings.state_dir).unwrap(), SystemTime::now())
                .unwrap();
        let broken = rows.iter().find(|r| r.name == "agent-2").unwrap();
        assert_eq!(broken.state, "corrupt");
        assert!(broken.error.as_deref().unwrap().contains("agent-2.toml"));
        let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        stack.shutdown().await;
    }
}

#[tokio::test]
async fn a_corrupt_ca_stops_the_edge_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    EdgeState::init(dir.path(), &[], SystemTime::now()).unwrap();
    std::fs::write(dir.path().join("ca.crt"), "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let settings = relay_edge::EdgeSettings::new(dir.path().to_owned(), loopback, loopback);
    let err = relay_edge::Edge::start(settings).await.unwrap_err().to_string();
    assert!(err.contains("ca.crt"), "{err}");
}

#[tokio::test]
async fn the_listing_shows_paired_agents_with_their_connection_and_pending_tokens() {
    let stack = Stack::start().await.unwrap();
    let _pending = stack.token("later").unwrap();
    let state = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
    // The running edge publishes its status file within a poll interval.
    let listed = eventually(DEADLINE, || async {
        relay_edge::listing::agent_rows(&state, SystemTime::now())
            .unwrap()
            .iter()
            .any(|r| r.name == "agent-1" && r.connected == Some(true))
    })
    .await;
    assert!(listed);
    let rows = relay_edge::listing::agent_rows(&state, SystemTime::now()).unwrap();
    let paired = rows.iter().find(|r| r.name == "agent-1").unwrap();
    assert_eq!(paired.state, "paired");
    assert_eq!(paired.connections[0].transport, "quic");
    assert!(paired.serial.is_some() && paired.expires_at.is_some());
    assert!(rows.iter().any(|r| r.name == "later" && r.state == "pending token"));
    let text = relay_edge::listing::render_text(&rows);
    assert!(text.lines().any(|l| l.starts_with("agent-1") && l.contains("yes, from 127.0.0.1")), "{text}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_from_a_bundle_file_or_from_bundle_text() {
    let mut stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let state = EdgeState::open(&stack.edge_settings.state_dir).unwrap();
    let tunnel = stack.edge.tunnel_addr().to_string();
    let bundle = state.issue_bundle("bundled", &tunnel, Duration::from_secs(3600), SystemTime::now(), false).unwrap();
    assert!(
        state.issue_bundle("bundled", &tunnel, Duration::from_secs(3600), SystemTime::now(), false).is_err(),
        "a paired name needs replace"
    );
    let file = stack.dir.path().join("bundle.pem");
    relay_pki::write_atomic(&file, bundle.as_bytes(), 0o600).unwrap();

    let from_file =
        relay_agent::AgentConfig { bundle: Some(file), upstream: Some(stack.bot.url()), ..Default::default() };
    let agent = relay_agent::Agent::start(from_file.resolve().unwrap()).await.unwrap();
    assert_eq!(agent.name(), "bundled");
    stack.wait_connected(1).await.unwrap();
    let response = send_collect(stack.public(), post_json(stack.public(), "/api/incomingCall", "[]")).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    agent.shutdown().await;
    stack.wait_connected(0).await.unwrap();

    let from_text =
        relay_agent::AgentConfig { bundle_pem: Some(bundle), upstream: Some(stack.bot.url()), ..Default::default() };
    let agent = relay_agent::Agent::start(from_text.resolve().unwrap()).await.unwrap();
    stack.wait_connected(1).await.unwrap();
    agent.shutdown().await;
    stack.stop_agents().await;
    stack.shutdown().await;
}
