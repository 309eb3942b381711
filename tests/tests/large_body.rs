//! A 50 MB body streams through both hops in both directions without being held whole.
//!
//! This file holds one test on purpose: it reads the process's peak resident memory, so no other
//! test may run in the same process.

use http::{HeaderValue, Method, Request, StatusCode, header};
use relay_testkit::Stack;
use relay_testkit::client::{hash_body, pattern_body, send};
use relay_testkit::over_both_transports;

const BODY_BYTES: u64 = 50 * 1024 * 1024;

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// The peak RSS is the process's: the two transports' runs of the test must not overlap.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

over_both_transports! {
    multi_thread async fn fifty_megabyte_body_streams_through_both_ways_without_being_held_whole() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let stack = Stack::start_with(|s| s.max_body_bytes = 64 * 1024 * 1024).await.unwrap();
        let before = peak_rss();

        let (body, sent_hash) = pattern_body(BODY_BYTES, 64 * 1024);
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/api/callbacks/upload".parse().unwrap();
        let headers = req.headers_mut();
        headers.insert(header::HOST, HeaderValue::from_static("relay.example.com"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(BODY_BYTES));
        let response = send(stack.public(), req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // The bot echoes the body as it arrives, so the response is 50 MB too, streamed back.
        let (len, hash) = hash_body(response.into_body()).await.unwrap();
        assert_eq!(len, BODY_BYTES);
        assert_eq!(hash, sent_hash, "the echoed body differs from what was sent");

        let seen = stack.bot.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body_len, BODY_BYTES);
        assert_eq!(seen[0].hash, sent_hash, "the bot received a different body");

        // Client, edge, agent and bot share this process: had any of them held the body, the peak
        // would have grown by at least 50 MB (100 MB for both directions). The promise is under
        // 16 MiB of growth on either side; here all four sides together must stay under it.
        let growth = peak_rss().saturating_sub(before);
        let transport = relay_testkit::transport::current();
        eprintln!("{transport}: peak RSS growth relaying 50 MiB each way: {:.1} MiB", growth as f64 / (1024.0 * 1024.0));
        assert!(
            growth < 16 * 1024 * 1024,
            "peak RSS grew by {} MiB while relaying 50 MiB each way",
            growth / (1024 * 1024)
        );
        stack.shutdown().await;
    }
}
