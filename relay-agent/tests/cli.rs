//! The `relay-agent` command line against a real edge: exit codes and one-line errors.

// Test code: a panic is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::SystemTime;

use relay_edge::{Edge, EdgeSettings};
use relay_pki::{DEFAULT_TOKEN_TTL, EdgeState};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relay-agent")).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure, got {:?}", output.status);
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "error must be one line, got: {stderr:?}");
    assert!(stderr.starts_with("relay-agent: "), "{stderr:?}");
    stderr
}

/// A running in-process edge with a state directory under `dir`, and a pairing token for `name`.
async fn edge_with_token(dir: &std::path::Path, name: &str) -> (Edge, String) {
    let edge_dir = dir.join("edge");
    let state = EdgeState::init(&edge_dir, &[], SystemTime::now()).unwrap();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let edge = Edge::start(EdgeSettings::new(edge_dir, loopback, loopback)).await.unwrap();
    let token =
        state.create_token(name, &edge.tunnel_addr().to_string(), DEFAULT_TOKEN_TTL, SystemTime::now(), false).unwrap();
    (edge, token.encode())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_succeeds_once_then_reports_the_spent_token_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (edge, token) = edge_with_token(dir.path(), "cli-agent").await;

    let agent_dir = dir.path().join("agent");
    let first = {
        let (dir, token) = (agent_dir.clone(), token.clone());
        tokio::task::spawn_blocking(move || agent(&["pair", "--state-dir", dir.to_str().unwrap(), "--token", &token]))
            .await
            .unwrap()
    };
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stderr = String::from_utf8(first.stderr).unwrap();
    assert!(stderr.contains("cli-agent") && !stderr.contains(&token), "{stderr}");

    let second = {
        let dir = dir.path().join("agent2");
        tokio::task::spawn_blocking(move || agent(&["pair", "--state-dir", dir.to_str().unwrap(), "--token", &token]))
            .await
            .unwrap()
    };
    assert!(one_line_error(&second).contains("already used"));
    edge.shutdown().await;
}

#[test]
fn bad_input_gets_a_one_line_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    assert!(one_line_error(&agent(&["pair", "--state-dir", state, "--token", "hello"])).contains("invalid token"));
    assert!(
        one_line_error(&agent(&["run", "--state-dir", state, "--upstream", "http://127.0.0.1:1"]))
            .contains("relay-agent pair")
    );
    assert!(
        one_line_error(&agent(&["run", "--state-dir", state, "--upstream", "https://bot:443"])).contains("upstream")
    );
    assert!(one_line_error(&agent(&["run", "--state-dir", state])).contains("upstream"));
    assert!(one_line_error(&agent(&["pair", "--state-dir", state])).contains("--token"));
}

#[test]
fn a_missing_or_invalid_bundle_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err =
        one_line_error(&agent(&["run", "--bundle", missing.to_str().unwrap(), "--upstream", "http://127.0.0.1:1"]));
    assert!(err.contains("missing.pem"), "{err}");
    let bogus = Command::new(env!("CARGO_BIN_EXE_relay-agent"))
        .args(["run", "--upstream", "http://127.0.0.1:1"])
        .env("RELAY_AGENT_BUNDLE", "not a bundle")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(one_line_error(&bogus).contains("invalid agent bundle"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_connects_and_exits_0_on_sigterm_after_draining() {
    let dir = tempfile::tempdir().unwrap();
    let (edge, token) = edge_with_token(dir.path(), "proc").await;
    let agent_dir = dir.path().join("agent");
    relay_agent::pair(&agent_dir, &token, &Default::default(), Default::default()).await.unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_relay-agent"))
        .args(["run", "--state-dir", agent_dir.to_str().unwrap(), "--upstream", "http://127.0.0.1:9"])
        .args(["--admin-listen", "127.0.0.1:0", "--drain-timeout", "1s"])
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while edge.connected_agents() != ["proc"] {
        assert!(std::time::Instant::now() < deadline, "the agent process must connect");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the agent must exit after SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    while !edge.connected_agents().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the edge must see the agent leave");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    edge.shutdown().await;
}
