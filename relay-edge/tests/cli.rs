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
    // A container's first start runs `init --if-missing` on every start: later ones change nothing.
    let ca_before = std::fs::read(state.join("ca.key")).unwrap();
    let idempotent = edge(&["init", "--if-missing", "--state-dir", state.to_str().unwrap()]);
    assert!(idempotent.status.success(), "{}", String::from_utf8_lossy(&idempotent.stderr));
    assert_eq!(std::fs::read(state.join("ca.key")).unwrap(), ca_before, "the CA must not be replaced");
}

#[test]
fn health_fails_with_one_line_when_nothing_listens() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = edge(&["health", "--admin-listen", &closed]);
    assert!(one_line_error(&out).contains("cannot reach"));
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

/// Pairs `name` directly through the state API, as a redeemed token would.
fn pair_in_state(state_dir: &std::path::Path, name: &str) {
    let state = relay_pki::EdgeState::open(state_dir).unwrap();
    let now = std::time::SystemTime::now();
    let token = state.create_token(name, "127.0.0.1:4433", std::time::Duration::from_secs(60), now, true).unwrap();
    let (_key, csr) = relay_pki::generate_agent_csr(name).unwrap();
    state.redeem(&token.token_id, &token.secret, &csr, now, std::time::Duration::from_secs(3600)).unwrap();
}

#[test]
fn managing_agents_pair_replace_cancel_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    assert!(edge(&["init", "--state-dir", state]).status.success());
    pair_in_state(dir.path(), "bot-1");

    let again = edge(&["pair", "--state-dir", state, "--agent", "bot-1", "--edge-addr", "x:1"]);
    assert!(one_line_error(&again).contains("--replace"));
    let replaced = edge(&["pair", "--state-dir", state, "--agent", "bot-1", "--edge-addr", "x:1", "--replace"]);
    assert!(replaced.status.success());
    assert!(edge(&["pair", "--state-dir", state, "--agent", "bot-2", "--edge-addr", "x:1"]).status.success());

    let listing = edge(&["agents", "--state-dir", state]);
    assert!(listing.status.success());
    let text = String::from_utf8(listing.stdout).unwrap();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("bot-1") && l.contains("paired") && l.contains("edge not running")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("bot-2") && l.contains("pending token")), "{text}");

    let cancel = edge(&["pair", "--state-dir", state, "--cancel", "bot-2"]);
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    assert!(edge(&["revoke", "--state-dir", state, "--agent", "bot-1"]).status.success());
    let json = edge(&["agents", "--state-dir", state, "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let bot1: Vec<_> = rows.iter().filter(|r| r["name"] == "bot-1" && r["state"] == "revoked").collect();
    assert_eq!(bot1.len(), 1, "{rows:?}");
    assert!(!rows.iter().any(|r| r["name"] == "bot-2"), "the cancelled token must be gone: {rows:?}");
    assert!(
        rows.iter().any(|r| r["name"] == "bot-1" && r["state"] == "pending token"),
        "the --replace token is still pending"
    );

    assert!(one_line_error(&edge(&["revoke", "--state-dir", state, "--agent", "nobody"])).contains("nobody"));
}

#[test]
fn pair_with_bundle_writes_a_private_bundle_and_prints_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert!(edge(&["init", "--state-dir", state.to_str().unwrap()]).status.success());
    let file = dir.path().join("bot.bundle.pem");
    let out = edge(&[
        "pair",
        "--state-dir",
        state.to_str().unwrap(),
        "--agent",
        "bot-9",
        "--edge-addr",
        "edge.example.com:4433",
        "--bundle",
        file.to_str().unwrap(),
        "--validity",
        "7d",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "no token is printed for a bundle");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let identity = relay_pki::AgentState::from_bundle(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!((identity.name.as_str(), identity.edge_addr.as_str()), ("bot-9", "edge.example.com:4433"));
}

/// Reads the child's stderr until the "edge listening" line; returns the public address.
fn wait_for_listening(stderr: std::process::ChildStderr) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let (Some(at), Some(sender)) = (line.find("public_addr="), tx.as_ref()) {
                let addr = line[at + "public_addr=".len()..].split_whitespace().next().unwrap_or_default().to_owned();
                let _ = sender.send(addr);
                tx = None;
            }
        }
    });
    let addr = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the edge must report its address");
    (addr.parse().unwrap(), reader)
}

#[test]
fn run_serves_on_os_ports_and_exits_0_on_sigterm() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    assert!(edge(&["init", "--state-dir", state]).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay-edge"))
        .args(["run", "--state-dir", state, "--listen", "127.0.0.1:0", "--tunnel-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--drain-timeout", "2s"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (public, reader) = wait_for_listening(child.stderr.take().unwrap());
    let mut conn = std::net::TcpStream::connect(public).unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the edge must exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    reader.join().unwrap();
}
