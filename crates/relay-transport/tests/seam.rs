//! The seam's contract, held by both transports: the same test body runs over QUIC and over
//! TLS/TCP. These are the stream semantics the tunnel code relies on: a finish is end-of-file, a
//! reset is an error and never a clean end, a finished stream's bytes arrive even when its
//! owner lets go at once, a stalled stream does not hold up another, either side opens streams,
//! and a close carries its reason.

// Fixture helpers sit outside `#[test]` functions; a failure in them is a broken test setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relay_pki::{PairingCa, TlsIdentity, generate_agent_csr};
use relay_proto::code;
use relay_transport::{
    BiStream, PeerKind, TcpListen, Transport, TunnelConnection, TunnelListener, TunnelSettings, dial_pairing,
    dial_tunnel,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DAY: Duration = Duration::from_secs(86_400);
const DEADLINE: Duration = Duration::from_secs(10);

struct Pki {
    ca: PairingCa,
    edge_chain: Vec<CertificateDer<'static>>,
    edge_key: PrivateKeyDer<'static>,
    agent_chain: Vec<CertificateDer<'static>>,
    agent_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let now = SystemTime::now();
    let ca = PairingCa::generate(now, DAY).unwrap();
    let (cert_pem, key_pem) = ca.issue_edge_cert(&[], now, DAY).unwrap();
    let (agent_key_pem, csr) = generate_agent_csr("agent-1").unwrap();
    let issued = ca.sign_agent_csr(&csr, "agent-1", now, DAY).unwrap();
    Pki {
        // The edge presents its CA after its own certificate, as the edge state does: pairing
        // clients pin the CA.
        edge_chain: vec![
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap(),
            CertificateDer::from(ca.cert_der().to_vec()),
        ],
        edge_key: PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        agent_chain: vec![CertificateDer::from(issued.cert_der)],
        agent_key: PrivateKeyDer::from_pem_slice(agent_key_pem.as_bytes()).unwrap(),
        ca,
    }
}

fn settings() -> TunnelSettings {
    TunnelSettings {
        idle_timeout: Duration::from_millis(1500),
        keep_alive: Duration::from_millis(200),
        ..TunnelSettings::default()
    }
}

/// An edge connection and an agent connection joined over `transport`.
async fn connect(transport: Transport) -> (Arc<dyn TunnelConnection>, Arc<dyn TunnelConnection>, TunnelListener) {
    let pki = pki();
    let ca = CertificateDer::from(pki.ca.cert_der().to_vec());
    let listener = TunnelListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        TcpListen::SamePort,
        &TlsIdentity { cert_chain: pki.edge_chain, key: pki.edge_key, ca_cert: ca.clone() },
        &settings(),
    )
    .unwrap();
    let addr = match transport {
        Transport::Quic => listener.quic_addr().unwrap(),
        Transport::Tcp => listener.tcp_addr().unwrap(),
    };
    let settings = settings();
    let agent = TlsIdentity { cert_chain: pki.agent_chain, key: pki.agent_key, ca_cert: ca };
    let dial = dial_tunnel(transport, addr, "localhost", &agent, &settings);
    let accept = async {
        let incoming = listener.accept().await.unwrap();
        assert_eq!(incoming.transport(), transport);
        incoming.handshake().await.unwrap()
    };
    let (agent, (edge, kind)) = tokio::time::timeout(DEADLINE, async { tokio::join!(dial, accept) }).await.unwrap();
    assert_eq!(kind, PeerKind::Agent { name: "agent-1".into(), serial: kind_serial(&kind) });
    let agent = agent.unwrap();
    assert_eq!(agent.transport(), transport.as_str());
    assert_eq!(edge.transport(), transport.as_str());
    (edge, agent, listener)
}

fn kind_serial(kind: &PeerKind) -> String {
    match kind {
        PeerKind::Agent { serial, .. } => serial.clone(),
        PeerKind::Pairing => String::new(),
    }
}

async fn read_all(stream: &mut BiStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.recv.read_to_end(&mut out)).await.expect("read timed out")?;
    Ok(out)
}

async fn both(test: impl AsyncFn(Transport)) {
    for transport in [Transport::Quic, Transport::Tcp] {
        test(transport).await;
    }
}

#[tokio::test]
async fn bytes_cross_both_ways_and_a_finish_is_end_of_file() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        let mut out = edge.open_bi().await.unwrap();
        out.send.write_all(b"request").await.unwrap();
        out.send.shutdown().await.unwrap();
        let mut inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        assert_eq!(read_all(&mut inc).await.unwrap(), b"request", "{transport}");
        inc.send.write_all(b"response").await.unwrap();
        inc.send.shutdown().await.unwrap();
        assert_eq!(read_all(&mut out).await.unwrap(), b"response", "{transport}");
    })
    .await;
}

#[tokio::test]
async fn a_reset_is_an_error_to_the_reader_never_a_clean_end() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        let mut out = edge.open_bi().await.unwrap();
        out.send.write_all(b"partial body").await.unwrap();
        let mut inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        let mut first = [0u8; 12];
        inc.recv.read_exact(&mut first).await.unwrap();
        out.send.reset(code::ABORTED);
        let rest = read_all(&mut inc).await;
        assert!(rest.is_err(), "{transport}: a reset read as a clean end: {rest:?}");
        // The other direction too: the agent resets its response after the edge finished.
        let mut out = edge.open_bi().await.unwrap();
        out.send.shutdown().await.unwrap();
        let mut inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        assert_eq!(read_all(&mut inc).await.unwrap(), b"");
        inc.send.write_all(b"half a response").await.unwrap();
        inc.send.reset(code::ABORTED);
        assert!(read_all(&mut out).await.is_err(), "{transport}: a reset after the peer finished read as a clean end");
    })
    .await;
}

#[tokio::test]
async fn a_finished_stream_is_delivered_even_when_its_owner_lets_go_at_once() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        let out = edge.open_bi().await.unwrap();
        let BiStream { mut send, recv } = out;
        send.write_all(b"hello").await.unwrap();
        let mut inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        let mut hello = [0u8; 5];
        inc.recv.read_exact(&mut hello).await.unwrap();
        // The edge writes a last message and lets go of both halves while the agent is still
        // sending (a WebSocket close frame at the end of a call).
        inc.send.write_all(b"still talking").await.unwrap();
        send.write_all(&vec![7u8; 100_000]).await.unwrap();
        send.shutdown().await.unwrap();
        drop((send, recv));
        let got = read_all(&mut inc).await.unwrap();
        assert_eq!(got.len(), 100_000, "{transport}");
        assert!(got.iter().all(|&b| b == 7));
    })
    .await;
}

#[tokio::test]
async fn a_stream_nobody_reads_does_not_stall_another() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        // Stream 1: the edge writes far more than one stream's window; the agent never reads it.
        let mut stalled = edge.open_bi().await.unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..64 {
                if stalled.send.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            stalled
        });
        let _unread = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        // Stream 2 still carries a full exchange both ways.
        let mut live = edge.open_bi().await.unwrap();
        live.send.write_all(b"ping").await.unwrap();
        live.send.shutdown().await.unwrap();
        let mut inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        assert_eq!(read_all(&mut inc).await.unwrap(), b"ping", "{transport}");
        inc.send.write_all(b"pong").await.unwrap();
        inc.send.shutdown().await.unwrap();
        assert_eq!(read_all(&mut live).await.unwrap(), b"pong", "{transport}");
        assert!(!writer.is_finished(), "{transport}: 4 MiB went into a stream nobody reads");
        writer.abort();
    })
    .await;
}

#[tokio::test]
async fn the_agent_opens_streams_the_edge_accepts() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        for i in 0..3u8 {
            let mut control = tokio::time::timeout(DEADLINE, agent.open_bi()).await.unwrap().unwrap();
            control.send.write_all(&[i]).await.unwrap();
            control.send.shutdown().await.unwrap();
            let mut accepted = tokio::time::timeout(DEADLINE, edge.accept_bi()).await.unwrap().unwrap();
            assert_eq!(read_all(&mut accepted).await.unwrap(), [i], "{transport}");
            accepted.send.write_all(b"welcome").await.unwrap();
            accepted.send.shutdown().await.unwrap();
            assert_eq!(read_all(&mut control).await.unwrap(), b"welcome", "{transport}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_close_reaches_the_peer_with_its_reason_and_ends_its_streams() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        let mut open = edge.open_bi().await.unwrap();
        open.send.write_all(b"x").await.unwrap();
        let _inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        edge.close(code::REVOKED, "certificate revoked");
        let lost = tokio::time::timeout(DEADLINE, agent.closed()).await.unwrap();
        assert!(lost.0.contains("certificate revoked"), "{transport}: {}", lost.0);
        assert!(tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().is_err());
        assert!(edge.open_bi().await.is_err(), "{transport}: opened a stream on a closed connection");
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_stays_up_past_the_idle_timeout() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        // Three idle timeouts with nothing but keep-alives.
        let outcome = tokio::time::timeout(Duration::from_millis(4500), edge.closed()).await;
        assert!(outcome.is_err(), "{transport}: idle connection closed: {:?}", outcome.map(|l| l.0));
        let mut out = edge.open_bi().await.unwrap();
        out.send.shutdown().await.unwrap();
        let mut inc = tokio::time::timeout(DEADLINE, agent.accept_bi()).await.unwrap().unwrap();
        assert_eq!(read_all(&mut inc).await.unwrap(), b"");
    })
    .await;
}

#[tokio::test]
async fn pairing_needs_no_client_certificate_and_tcp_shares_the_quic_port() {
    both(async |transport| {
        let pki = pki();
        let ca = CertificateDer::from(pki.ca.cert_der().to_vec());
        let listener = TunnelListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            TcpListen::SamePort,
            &TlsIdentity { cert_chain: pki.edge_chain, key: pki.edge_key, ca_cert: ca.clone() },
            &settings(),
        )
        .unwrap();
        let addr = listener.quic_addr().unwrap();
        assert_eq!(listener.tcp_addr().map(|a| a.port()), Some(addr.port()), "TCP listens on QUIC's port number");
        let pin = pki.ca.pin().unwrap();
        let settings = settings();
        let dial = dial_pairing(transport, addr, "localhost", pin, &settings);
        let accept = async { listener.accept().await.unwrap().handshake().await };
        let (client, accepted) = tokio::time::timeout(DEADLINE, async { tokio::join!(dial, accept) }).await.unwrap();
        assert!(client.is_ok(), "{transport}: {:?}", client.err());
        assert_eq!(accepted.map(|(_, kind)| kind).ok(), Some(PeerKind::Pairing), "{transport}");
    })
    .await;
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection_for_the_peer() {
    both(async |transport| {
        let (edge, agent, _listener) = connect(transport).await;
        drop(edge);
        let lost = tokio::time::timeout(DEADLINE, agent.closed()).await;
        assert!(lost.is_ok(), "{transport}: the peer never learned the connection was dropped");
    })
    .await;
}

#[tokio::test]
async fn closing_the_listener_closes_its_connections_with_the_reason() {
    both(async |transport| {
        let (_edge, agent, listener) = connect(transport).await;
        listener.close(code::SHUTDOWN, "edge shutting down");
        let lost = tokio::time::timeout(DEADLINE, agent.closed()).await.unwrap();
        assert!(lost.0.contains("edge shutting down"), "{transport}: {}", lost.0);
    })
    .await;
}
