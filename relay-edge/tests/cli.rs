//! The `relay-edge` command line: exit codes, one-line errors, and what goes to stdout.

// Test code: a panic is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relay-edge")).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure, got {:?}", output.status);
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "error must be one line, got: {stderr:?}");
    assert!(stderr.starts_with("relay-edge: "), "{stderr:?}");
    stderr
}

#[test]
fn init_creates_private_keys_and_refuses_to_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = edge(&["init", "--state-dir", state.to_str().unwrap(), "--name", "edge.example.com"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for key in ["ca.key", "edge.pem"] {
        let mode = std::fs::metadata(state.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let again = edge(&["init", "--state-dir", state.to_str().unwrap()]);
    assert!(one_line_error(&again).contains("already initialised"));
}

#[test]
fn pair_prints_only_the_token_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    assert!(edge(&["init", "--state-dir", state]).status.success());
    let out = edge(&[
        "pair",
        "--state-dir",
        state,
        "--agent",
        "bot-1",
        "--edge-addr",
        "edge.example.com:4433",
        "--ttl",
        "5m",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let token = relay_pki::PairingToken::parse(stdout.trim()).unwrap();
    assert_eq!(token.edge_addr, "edge.example.com:4433");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains(stdout.trim()), "the token must not be echoed to the log");
}

#[test]
fn bad_input_gets_a_one_line_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    assert!(
        one_line_error(&edge(&["pair", "--state-dir", state, "--agent", "a", "--edge-addr", "x:1"]))
            .contains("relay-edge init")
    );
    assert!(edge(&["init", "--state-dir", state]).status.success());
    assert!(
        one_line_error(&edge(&["pair", "--state-dir", state, "--agent", "a", "--edge-addr", "no-port"]))
            .contains("HOST:PORT")
    );
    assert!(
        one_line_error(&edge(&["pair", "--state-dir", state, "--agent", "../evil", "--edge-addr", "x:1"]))
            .contains("invalid agent name")
    );
    assert!(
        one_line_error(&edge(&["pair", "--state-dir", state, "--agent", "a", "--edge-addr", "x:1", "--ttl", "soon"]))
            .contains("--ttl")
    );
    assert!(one_line_error(&edge(&["frobnicate"])).contains("frobnicate"));

    let config = dir.path().join("edge.toml");
    std::fs::write(&config, format!("state_dir = {state:?}\nlisten = \"127.0.0.1:0\"\nmax_body_bytez = 5\n")).unwrap();
    let err = one_line_error(&edge(&["run", "--config", config.to_str().unwrap()]));
    assert!(err.contains("max_body_bytez") && err.contains("line 3"), "{err}");
}

#[test]
fn run_refuses_a_group_readable_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    assert!(edge(&["init", "--state-dir", state]).status.success());
    std::fs::set_permissions(dir.path().join("ca.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = one_line_error(&edge(&[
        "run",
        "--state-dir",
        state,
        "--listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:0",
    ]));
    assert!(err.contains("ca.key") && err.contains("0600"), "{err}");
}
