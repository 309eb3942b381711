//! Property tests: the header and token parsing paths at the edge never panic, whatever a client
//! sends, and keep their promises on arbitrary input.

// Test code: a panic is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request};
use proptest::prelude::*;
use relay_edge::admission::acs_jwt::{JwksCache, JwksSource};
use relay_edge::admission::shared_secret::{SecretLocation, SharedSecret};
use relay_edge::admission::source_ip::client_ip;
use relay_edge::admission::{AcsJwtSettings, event_grid};

fn header_value() -> impl Strategy<Value = HeaderValue> {
    proptest::collection::vec(any::<u8>(), 0..200)
        .prop_filter_map("valid header value", |b| HeaderValue::from_bytes(&b).ok())
}

fn jwt_settings(runtime: &tokio::runtime::Runtime) -> AcsJwtSettings {
    let jwks =
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/relay-testkit/fixtures/acs-test-jwks.json"));
    let cache = runtime.block_on(JwksCache::load(JwksSource::File(jwks), Duration::from_secs(3600))).unwrap();
    AcsJwtSettings { audience: "aud".into(), issuer: "iss".into(), keys: Arc::new(cache) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn forwarded_for_from_an_untrusted_peer_never_changes_the_client(xff in header_value(), a in any::<[u8; 4]>()) {
        let peer = IpAddr::from(a);
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", xff);
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        if !trusted[0].contains(&peer) {
            prop_assert_eq!(client_ip(peer, &headers, &trusted), Some(peer));
        }
        // Behind a trusted proxy any value parses to an address or to None, without panicking.
        let _ = client_ip("10.1.2.3".parse().unwrap(), &headers, &trusted);
    }

    #[test]
    fn a_stripped_query_never_carries_the_secret_parameter(query in "[a-z=&%0-9]{0,60}") {
        let secret = SharedSecret::new(SecretLocation::Query("k".into()), b"v".to_vec());
        let mut req = Request::new(());
        if let Ok(uri) = format!("/cb?{query}").parse() {
            *req.uri_mut() = uri;
            let _ = secret.verify(&req);
            secret.strip(&mut req);
            let left = req.uri().query().unwrap_or_default();
            prop_assert!(!left.split('&').any(|pair| pair.split('=').next() == Some("k")), "{}", left);
        }
    }

    #[test]
    fn event_grid_validation_parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = event_grid::validation_response(&body);
    }

    #[test]
    fn wire_headers_from_a_peer_never_panic(name in ".{0,20}", value in proptest::collection::vec(any::<u8>(), 0..50)) {
        let _ = relay_proto::headers::from_wire(vec![(name, value)]);
    }
}

#[test]
fn arbitrary_authorization_headers_are_refused_without_panicking() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let settings = jwt_settings(&runtime);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 512, ..ProptestConfig::default() });
    let strategy = prop_oneof![
        header_value(),
        "Bearer [A-Za-z0-9_.=-]{0,400}".prop_filter_map("header", |s| HeaderValue::from_str(&s).ok()),
        "Bearer e[A-Za-z0-9_-]{10,60}\\.e[A-Za-z0-9_-]{10,60}\\.[A-Za-z0-9_-]{0,80}"
            .prop_filter_map("header", |s| HeaderValue::from_str(&s).ok()),
    ];
    runner
        .run(&strategy, |value| {
            let mut headers = HeaderMap::new();
            headers.insert("authorization", value);
            let verdict = runtime.block_on(settings.verify(&headers));
            prop_assert!(verdict.is_err(), "no arbitrary token may pass");
            Ok(())
        })
        .unwrap();
}
