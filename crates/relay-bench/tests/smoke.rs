//! The benchmark's own check, run in CI: a small comparison through a real edge and agent must
//! lose no frame and answer every webhook. It asserts correctness only, never timing.

// The shared body sits outside `#[test]` functions; a failure in it is a failed check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::process::Command;

#[test]
fn a_small_comparison_over_quic_loses_no_frame_and_answers_every_webhook() {
    small_comparison("quic");
}

#[test]
fn a_small_comparison_over_tcp_loses_no_frame_and_answers_every_webhook() {
    small_comparison("tcp");
}

fn small_comparison(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("compare.json");
    let output = Command::new(env!("CARGO_BIN_EXE_relay-bench"))
        .args(["compare", "--transport", transport])
        .args(["--calls", "5", "--duration", "2s", "--callbacks-per-call", "2"])
        .args(["--webhook-concurrency", "4", "--webhook-duration", "1s", "--json"])
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "compare failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("acs-relay") && stdout.contains("RTT p99"), "the table is printed:\n{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["transport"], transport);
    for side in ["direct", "relay"] {
        let media = &report[side]["media"];
        assert_eq!(media["calls_connected"], 5, "{side}: {media}");
        assert_eq!(media["frames_sent"], 5 * 100, "{side}: 2 s at 50 frames/s per call");
        assert_eq!(media["frames_lost"], 0, "{side}: {media}");
        assert_eq!(media["frames_corrupt"], 0, "{side}: {media}");
        assert_eq!(media["callbacks_ok"], 10, "{side}: {media}");
        let hooks = &report[side]["webhooks"];
        assert_eq!(hooks["failed"], 0, "{side}: {hooks}");
        assert!(hooks["ok"].as_u64().unwrap() > 0, "{side}: {hooks}");
    }
    for process in ["edge", "agent"] {
        assert!(report["relay"]["peak_rss_kib"][process].as_u64().unwrap() > 0, "{process} was measured");
    }
}
