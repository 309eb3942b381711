//! Transport timeouts: a handshake nobody answers ends with `DialError::Timeout` once the
//! configured handshake timeout has passed, not before and not much after.

use std::time::{Duration, Instant};

use relay_pki::CaPin;
use relay_transport::{DialError, Transport, TunnelSettings, dial_pairing};

#[tokio::test]
async fn a_handshake_nobody_answers_times_out_after_the_configured_timeout() {
    // A bound UDP socket that never reads: packets arrive and vanish, as with a DROP rule.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let settings = TunnelSettings { handshake_timeout: Duration::from_millis(400), ..TunnelSettings::default() };
    let started = Instant::now();
    let outcome = dial_pairing(Transport::Quic, addr, "localhost", CaPin([0; 32]), &settings).await;
    let waited = started.elapsed();
    assert!(matches!(outcome, Err(DialError::Timeout(a)) if a == addr), "{:?}", outcome.err());
    assert!(waited >= Duration::from_millis(400), "gave up early, after {waited:?}");
    // Generous upper bound: the point is that the dial does not hang on to its default 10 s.
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    drop(silent);
}

#[tokio::test]
async fn the_idle_timeout_bounds_a_handshake_too() {
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let settings = TunnelSettings {
        idle_timeout: Duration::from_millis(300),
        keep_alive: Duration::from_millis(100),
        handshake_timeout: Duration::from_secs(30),
        ..TunnelSettings::default()
    };
    let started = Instant::now();
    let outcome = dial_pairing(Transport::Quic, addr, "localhost", CaPin([0; 32]), &settings).await;
    assert!(matches!(outcome, Err(DialError::Timeout(_))), "{:?}", outcome.err());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}
