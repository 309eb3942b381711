//! The edge under attack from the internet: each test is one thing a hostile caller tried, and
//! asserts the edge's exact answer and that nothing reached the bot where nothing should.
//! Behaviour that belongs to a process (start-up refusal, memory) runs the real binaries.

use std::time::Duration;

use relay_edge::routes::{default_routes, find};
use relay_testkit::bot::EchoBot;
use relay_testkit::procs::{AgentProc, Binaries, EdgeProc, PROC_DEADLINE, metric, pair_agent};
use relay_testkit::raw::{self, RawResponse};
use relay_testkit::{Stack, acs, eventually};

/// How long one raw exchange may take on a loaded debug build.
const RAW_DEADLINE: Duration = Duration::from_secs(10);

fn bins() -> Binaries {
    Binaries { edge: env!("CARGO_BIN_EXE_e2e-edge").into(), agent: env!("CARGO_BIN_EXE_e2e-agent").into() }
}

/// An edge process run with `edge_args`, a paired agent process, and the bot it forwards to.
async fn edge_agent_and_bot(edge_args: &[&str]) -> (tempfile::TempDir, EdgeProc, EchoBot, AgentProc) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge");
    relay_pki::EdgeState::init(&state, &[], std::time::SystemTime::now()).unwrap();
    let edge = EdgeProc::start(&bins(), &[], &state, edge_args).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair_agent(&state, edge.tunnel, "agent-1", dir.path()).await.unwrap();
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[edge.tunnel.to_string()], &[]).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);
    (dir, edge, bot, agent)
}

async fn post_raw(stack: &Stack, target: &str, extra: &[&str], body: &[u8]) -> RawResponse {
    raw::exchange(stack.public(), &raw::post(target, extra, body), RAW_DEADLINE).await.unwrap()
}

async fn rejections(stack: &Stack, check: &str, reason: &str) -> f64 {
    let Some(admin) = stack.edge.admin_addr() else { return 0.0 };
    let name = format!("relay_edge_rejections_total{{route=\"unmatched\",check=\"{check}\",reason=\"{reason}\"}}");
    metric(admin, &name).await.unwrap_or(0.0)
}

/// How nginx (and Kestrel, and most frameworks) read a path before routing: percent escapes
/// decoded, `\` taken as `/`, repeated slashes merged, `.` and `..` segments resolved.
fn nginx_normalise(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escape = (b == b'%').then(|| bytes.get(i + 1..i + 3)).flatten();
        match escape.and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()) {
            Some(value) => {
                decoded.push(value);
                i += 3;
            }
            None => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    let trailing = if decoded.ends_with('/') && !out.is_empty() { "/" } else { "" };
    format!("/{}{trailing}", out.join("/"))
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_never_reach_another_route_or_the_bot() {
    let stack = Stack::start().await.unwrap();
    let escapes = [
        "/api/callbacks/../incomingCall",
        "/api/callbacks/../../internal/x",
        "/api/callbacks/./x",
        "/api/callbacks/%2e%2e/incomingCall",
        "/api/callbacks/%2E%2e/incomingCall",
        "/api/callbacks/.%2E/incomingCall",
        "/api/callbacks/..%2fincomingCall",
        "/api/callbacks/..%2F..%2Finternal",
        "/api/callbacks/..%5cincomingCall",
        "/api/callbacks/..\\incomingCall",
        "/api/callbacks/x%00y",
        "/api/callbacks/%c0%ae%c0%ae/incomingCall",
        "/api/callbacks/x%zz",
        "/api/callbacks/..;/incomingCall",
        "/api/callbacks/%252e%252e/incomingCall",
    ];
    // The attack: matched as a callback at the edge, handled as IncomingCall by a normalising bot.
    let routes = default_routes();
    assert_eq!(find(&routes, escapes[0]).unwrap().name, "/api/callbacks/*");
    assert_eq!(find(&routes, &nginx_normalise(escapes[0])).unwrap().name, "/api/incomingCall");
    assert_eq!(find(&routes, &nginx_normalise(escapes[3])).unwrap().name, "/api/incomingCall");
    for target in escapes {
        let answer = post_raw(&stack, target, &[], b"[]").await;
        assert_eq!(answer.status, 400, "{target}: {answer:?}");
    }
    assert_eq!(stack.bot.hits(), 0, "no refused path may reach the bot");
    let counted: f64 = [
        rejections(&stack, "path", "dot-segment").await,
        rejections(&stack, "path", "encoded-separator").await,
        rejections(&stack, "path", "forbidden-byte").await,
        rejections(&stack, "path", "invalid-utf8").await,
        rejections(&stack, "path", "bad-escape").await,
        rejections(&stack, "path", "double-encoded").await,
    ]
    .iter()
    .sum();
    // httparse itself refuses a raw backslash in the request line (hyper answers 400 before the
    // edge sees it); every other refusal is the edge's and is counted.
    assert!(counted >= (escapes.len() - 1) as f64, "refusals counted under check=\"path\": {counted}");

    // What does pass reaches the bot byte for byte, and means the same to a normalising server.
    let ordinary = "/api/callbacks/ctx%20one/x.y?next=..%2f&z=%2e%2e";
    let answer = post_raw(&stack, ordinary, &[], b"[]").await;
    assert_eq!(answer.status, 200);
    let seen = stack.bot.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, ordinary, "the bot receives exactly the path that was matched");
    let path = ordinary.split('?').next().unwrap();
    let routes = default_routes();
    assert_eq!(
        find(&routes, &nginx_normalise(path)).map(|r| r.name.clone()),
        find(&routes, path).map(|r| r.name.clone()),
        "a normalising bot routes it where the edge did"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn heads_just_over_the_limit_get_431_before_admission_never_503() {
    let stack = Stack::start().await.unwrap();
    let limit = stack.edge_settings.max_header_bytes;
    for size in [limit + 100, limit + 2048, 66 * 1024, 80 * 1024] {
        let padding = format!("x-padding: {}", "a".repeat(size));
        let answer = post_raw(&stack, "/api/incomingCall", &[&padding], b"[]").await;
        assert_eq!(answer.status, 431, "a {size}-byte header: {answer:?}");
        assert!(answer.header("retry-after").is_none(), "431 is final: no invitation to retry");
    }
    assert_eq!(stack.bot.hits(), 0);
    let within = format!("x-padding: {}", "a".repeat(limit - 1024));
    assert_eq!(post_raw(&stack, "/api/incomingCall", &[&within], b"[]").await.status, 200, "a head within the limit");
    stack.shutdown().await;
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_replaced_or_dropped() {
    let stack = Stack::start().await.unwrap();
    let spoofed = [
        "x-forwarded-for: 52.112.0.1",
        "x-forwarded-proto: https",
        "x-forwarded-host: evil.example",
        "x-forwarded-port: 443",
        "forwarded: for=52.112.0.1;proto=https",
        "x-real-ip: 52.112.0.1",
        "true-client-ip: 52.112.0.1",
    ];
    assert_eq!(post_raw(&stack, "/api/incomingCall", &spoofed, b"[]").await.status, 200);
    let seen = &stack.bot.requests()[0];
    let header = |name: &str| seen.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("x-forwarded-host").as_deref(), Some("relay.test"));
    for dropped in ["forwarded", "x-real-ip", "true-client-ip", "x-forwarded-port"] {
        assert_eq!(header(dropped), None, "{dropped} from an untrusted client reached the bot");
    }
    stack.shutdown().await;
}

#[tokio::test]
async fn call_ids_that_are_not_acs_correlation_ids_are_relayed_without_a_pin() {
    let stack = Stack::start().await.unwrap();
    for (i, id) in ["x".repeat(129), "a b".into(), "id/with/slash".into(), "\u{e9}".into()].iter().enumerate() {
        let body = acs::incoming_call_event(id);
        let answer = post_raw(&stack, "/api/incomingCall", &[], body.as_bytes()).await;
        assert_eq!(answer.status, 200, "case {i}: relayed, just not pinned");
    }
    assert_eq!(stack.bot.hits(), 4);
    let admin = stack.edge.admin_addr().unwrap();
    let refused = metric(admin, "relay_edge_affinity_keys_refused_total").await;
    assert_eq!(refused, Some(4.0));
    let guid = "4f1c1a52-0000-4000-8000-000000000001";
    let answer = post_raw(&stack, "/api/incomingCall", &[], acs::incoming_call_event(guid).as_bytes()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(metric(admin, "relay_edge_affinity_keys_refused_total").await, Some(4.0), "a GUID is pinned");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_huge_call_ids_does_not_grow_the_edge_process() {
    let (_dir, edge, _bot, agent) = edge_agent_and_bot(&["--rate-limit-per-source", "0"]).await;
    // Warm up allocator and connection state, then measure.
    let public = edge.public;
    let send = move |i: usize| {
        async move {
            // The id once, so the whole event fits the 64 KiB the edge reads to find it.
            let event = format!("[{{\"data\":{{\"correlationId\":\"{i:08}{}\"}}}}]", "k".repeat(60_000));
            let request = raw::post("/api/incomingCall", &[], event.as_bytes());
            raw::exchange(public, &request, RAW_DEADLINE).await.map(|r| r.status)
        }
    };
    for i in 0..50 {
        assert_eq!(send(i).await.unwrap(), 200);
    }
    let before = edge.proc.rss_kib().unwrap();
    // 1,000 ids of 60 KB: 60 MB of keys, had they been pinned.
    let mut handles = Vec::new();
    for worker in 0..8 {
        handles.push(tokio::spawn(async move {
            for i in 0..125 {
                assert_eq!(send(1000 + worker * 125 + i).await.unwrap(), 200);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let grown_mib = edge.proc.rss_kib().unwrap().saturating_sub(before) / 1024;
    println!("edge RSS growth after 1,000 60-KB call ids: {grown_mib} MiB");
    assert!(grown_mib < 24, "the edge grew {grown_mib} MiB: call ids are being stored\n{}", agent.proc.log());
    assert_eq!(metric(edge.admin, "relay_edge_affinity_keys_refused_total").await, Some(1050.0));
}

#[tokio::test]
async fn an_edge_that_authenticates_nobody_refuses_a_public_listener_unless_told_to_allow_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge");
    relay_pki::EdgeState::init(&state, &[], std::time::SystemTime::now()).unwrap();
    let args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut all: Vec<std::ffi::OsString> = vec!["run".into(), "--state-dir".into(), state.clone().into()];
        for (flag, value) in [("--tunnel-listen", "127.0.0.1:0"), ("--admin-listen", "127.0.0.1:0")] {
            all.extend([flag.into(), value.into()]);
        }
        all.extend(extra.iter().map(Into::into));
        all
    };
    let mut refused =
        relay_testkit::procs::Proc::spawn("edge", &[], &bins().edge, &args(&["--listen", "0.0.0.0:0"])).unwrap();
    let status = refused.wait_exit(PROC_DEADLINE).await.expect("an unprotected public edge must exit");
    assert!(!status.success());
    // The output is read by tasks that may still be draining the pipe after the exit.
    let line = refused.wait_line("refusing to start", PROC_DEADLINE).await;
    let line = line.unwrap_or_else(|| panic!("{}", refused.log()));
    assert!(line.contains("allow_unauthenticated") && line.contains("README"), "says how to fix it: {line}");

    let allowed = relay_testkit::procs::Proc::spawn(
        "edge",
        &[],
        &bins().edge,
        &args(&["--listen", "0.0.0.0:0", "--allow-unauthenticated"]),
    )
    .unwrap();
    assert!(allowed.wait_line("edge listening", PROC_DEADLINE).await.is_some(), "{}", allowed.log());
    assert!(allowed.log().contains("relays anything from anyone"), "starts with the warning");

    let loopback =
        relay_testkit::procs::Proc::spawn("edge", &[], &bins().edge, &args(&["--listen", "127.0.0.1:0"])).unwrap();
    assert!(loopback.wait_line("edge listening", PROC_DEADLINE).await.is_some(), "loopback needs no opt-in");
}

#[test]
fn authenticating_checks_are_the_ones_that_prove_who_is_calling() {
    use relay_edge::admission::{AdmissionSettings, AuthCheck, EventGridSettings};
    let mut admission = AdmissionSettings::default();
    assert!(admission.authenticates(AuthCheck::AcsJwt));
    assert!(admission.authenticates(AuthCheck::SharedSecret));
    assert!(admission.authenticates(AuthCheck::SourceIp));
    admission.event_grid = Some(EventGridSettings { subscription_names: vec!["calls".into()], entra: None });
    assert!(!admission.authenticates(AuthCheck::EventGrid), "a subscription name is a header anyone can send");
    assert!(!admission.route_authenticates(&[AuthCheck::EventGrid]));
    assert!(admission.route_authenticates(&[AuthCheck::EventGrid, AuthCheck::SourceIp]));
}

/// Opens a TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8).
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the edge closed `conn` (EOF or reset) within the raw deadline, having sent nothing.
async fn closed_at_once(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(RAW_DEADLINE, conn.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

/// Sends one request on `conn` and returns the status.
async fn request_on(conn: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncWriteExt;
    conn.write_all(&raw::post("/api/incomingCall", &[], b"[]")).await.unwrap();
    tokio::time::timeout(RAW_DEADLINE, raw::read_response(conn)).await.unwrap().unwrap().status
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408_and_nothing_reaches_the_bot() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start_with(|s| s.body_read_timeout = Duration::from_millis(500)).await.unwrap();
    // Withheld within the prefix the edge reads for the call's key.
    let mut conn = tokio::net::TcpStream::connect(stack.public()).await.unwrap();
    let head = "POST /api/incomingCall HTTP/1.1\r\nhost: relay.test\r\ncontent-length: 100\r\n\r\n[{\"data\":";
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(RAW_DEADLINE, raw::read_response(&mut conn)).await.unwrap().unwrap();
    assert_eq!(answer.status, 408);
    assert_eq!(stack.bot.hits(), 0, "nothing of a stalled body reaches the bot");

    // Withheld after the prefix, while the body streams to a bot that has not answered yet: the
    // exchange is abandoned. (A bot that already answered has its answer cut short instead.)
    let mut conn = tokio::net::TcpStream::connect(stack.public()).await.unwrap();
    let head = "POST /api/callbacks/x?delay_ms=3000 HTTP/1.1\r\nhost: relay.test\r\ncontent-length: 200000\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![b' '; 100_000]).await.unwrap();
    let answer = tokio::time::timeout(RAW_DEADLINE, raw::read_response(&mut conn)).await.unwrap().unwrap();
    assert_eq!(answer.status, 408);
    assert!(stack.bot.requests().iter().all(|r| r.body_len < 200_000), "the bot never sees a whole body");
    let admin = stack.edge.admin_addr().unwrap();
    let timeouts = |route: &str| {
        format!("relay_edge_rejections_total{{route=\"{route}\",check=\"limit\",reason=\"body-timeout\"}}")
    };
    assert_eq!(metric(admin, &timeouts("/api/incomingCall")).await, Some(1.0));
    assert_eq!(metric(admin, &timeouts("/api/callbacks/*")).await, Some(1.0));
    stack.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_caps_are_closed_at_once_and_the_others_are_still_served() {
    let stack = Stack::start_with(|s| {
        s.max_connections = 6;
        s.max_connections_per_source = 4;
    })
    .await
    .unwrap();
    let public = stack.public();
    // One host holds its share with idle connections; its next one is closed unread.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 1], public).await);
    }
    let mut over = connect_from([127, 0, 0, 1], public).await;
    assert!(closed_at_once(&mut over).await, "a fifth connection from one source is refused");
    // Another host is still served, up to the total.
    let mut other = connect_from([127, 0, 0, 2], public).await;
    assert_eq!(request_on(&mut other).await, 200);
    let _other_idle = connect_from([127, 0, 0, 2], public).await;
    let mut third = connect_from([127, 0, 0, 3], public).await;
    assert!(closed_at_once(&mut third).await, "the seventh connection overall is refused");
    // A connection that closes frees its slot: the first host gets one back.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        let mut again = connect_from([127, 0, 0, 1], public).await;
        if !closed_at_once_quick(&mut again).await {
            served = request_on(&mut again).await == 200;
            break;
        }
    }
    assert!(served, "a freed slot serves the next connection");
    let admin = stack.edge.admin_addr().unwrap();
    let refused = |reason: &str| {
        format!("relay_edge_rejections_total{{route=\"unmatched\",check=\"limit\",reason=\"{reason}\"}}")
    };
    assert!(metric(admin, &refused("connections-per-source")).await >= Some(1.0));
    assert!(metric(admin, &refused("connections")).await >= Some(1.0));
    stack.shutdown().await;
}

/// Whether the edge closes `conn` within 200 ms (it is refused), without waiting the full
/// deadline for one that is being served.
async fn closed_at_once_quick(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_millis(200), conn.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn the_edge_raises_its_open_file_limit_and_caps_connections_below_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge");
    relay_pki::EdgeState::init(&state, &[], std::time::SystemTime::now()).unwrap();
    // Started with a soft limit of 512 under a hard limit of 4096, as a tight host would.
    let edge = EdgeProc::start(&bins(), &["prlimit", "--nofile=512:4096", "--"], &state, &[]).await.unwrap();
    let line = edge.proc.wait_line("open-file limit", PROC_DEADLINE).await.unwrap();
    assert!(line.contains("open_file_limit=4096") && line.contains("was=512"), "{line}");
    let listening = edge.proc.wait_line("edge listening", PROC_DEADLINE).await.unwrap();
    assert!(listening.contains("max_connections=3840"), "4096 less the reserve: {listening}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_given_before_the_request_was_read_reach_a_client_that_writes_everything_first() {
    let stack = Stack::start().await.unwrap();
    let limit = stack.edge_settings.max_body_bytes as usize;
    // The whole oversized request is written before anything is read, three times over.
    for _ in 0..3 {
        let request = raw::post("/api/incomingCall", &[], &vec![b' '; limit + 1]);
        let answer = raw::exchange(stack.public(), &request, RAW_DEADLINE).await.unwrap();
        assert_eq!(answer.status, 413, "{answer:?}");
        assert_eq!(answer.header("connection"), Some("close"));
        let huge_head = format!("x-padding: {}", "h".repeat(512 * 1024));
        let request = raw::post("/api/incomingCall", &[&huge_head], b"[]");
        let answer = raw::exchange(stack.public(), &request, RAW_DEADLINE).await.unwrap();
        assert_eq!(answer.status, 431, "{answer:?}");
    }
    assert_eq!(stack.bot.hits(), 0);
    stack.shutdown().await;
}

/// Reads the caller's socket until the edge's close frame, then until the connection ends;
/// returns the close's code. A connection that ends without a close frame fails the test.
async fn caller_sees_close(socket: &mut relay_testkit::acs::MediaCall) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Error, Message};
    let mut code = None;
    for _ in 0..1000 {
        match tokio::time::timeout(RAW_DEADLINE, socket.socket().next()).await.expect("no close in time") {
            Some(Ok(Message::Close(frame))) => code = Some(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            None | Some(Err(Error::ConnectionClosed)) => break,
            Some(Err(e)) => panic!("the caller's socket ended without a close handshake: {e}"),
        }
    }
    code.expect("a close frame")
}

relay_testkit::over_both_transports! {
    async fn a_callers_close_is_answered_and_the_bot_completes_its_close_handshake() {
        use futures_util::SinkExt;
        use std::sync::atomic::Ordering;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let stack = Stack::start().await.unwrap();
        let mut call = relay_testkit::acs::MediaCall::connect(stack.public(), "/ws", "corr-close-1").await.unwrap();
        call.socket().send(Message::Text("hello".into())).await.unwrap();
        let close = CloseFrame { code: 1000.into(), reason: "bye".into() };
        call.socket().close(Some(close)).await.unwrap();
        assert_eq!(caller_sees_close(&mut call).await, Some(1000), "the edge answers the caller's close");
        let session = stack.bot.sessions()[0].clone();
        assert!(eventually(RAW_DEADLINE, || async { session.ended.load(Ordering::SeqCst) }).await);
        assert!(session.closed_cleanly.load(Ordering::SeqCst), "the bot's close handshake completed too");
        stack.shutdown().await;
    }
}

relay_testkit::over_both_transports! {
    async fn a_bots_close_is_answered_to_the_bot_and_reaches_the_caller() {
        use futures_util::SinkExt;
        use std::sync::atomic::Ordering;
        use tokio_tungstenite::tungstenite::Message;
        let stack = Stack::start().await.unwrap();
        let mut call = relay_testkit::acs::MediaCall::connect(stack.public(), "/ws", "corr-close-2").await.unwrap();
        call.socket().send(Message::Text("close:4001:done".into())).await.unwrap();
        assert_eq!(caller_sees_close(&mut call).await, Some(4001));
        let session = stack.bot.sessions()[0].clone();
        assert!(eventually(RAW_DEADLINE, || async { session.ended.load(Ordering::SeqCst) }).await);
        assert!(session.closed_cleanly.load(Ordering::SeqCst), "the agent answers the bot's close");
        stack.shutdown().await;
    }
}

#[tokio::test]
async fn websocket_protocol_violations_are_closed_with_the_rfc_6455_codes() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start().await.unwrap();
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("text that is not UTF-8", raw::ws_frame(0x81, &[0xff, 0xfe, 0xfd], true), 1007),
        ("a ping over 125 bytes", raw::ws_frame(0x89, &[b'p'; 126], true), 1002),
        ("a fragmented ping", raw::ws_frame(0x09, b"p", true), 1002),
        ("an unmasked client frame", raw::ws_frame(0x81, b"hello", false), 1002),
        ("reserved bits set", raw::ws_frame(0xc1, b"hello", true), 1002),
    ];
    for (i, (what, frame, code)) in cases.into_iter().enumerate() {
        let mut conn = raw::ws_upgrade(stack.public(), "/ws", &format!("corr-proto-{i}")).await.unwrap();
        conn.write_all(&frame).await.unwrap();
        let closed = tokio::time::timeout(RAW_DEADLINE, raw::ws_read_close(&mut conn)).await;
        assert_eq!(closed.expect("closed in time").expect("a close frame"), Some(code), "{what}");
        let session = stack.bot.sessions()[i].clone();
        let told = eventually(RAW_DEADLINE, || async { session.close.lock().unwrap().is_some() }).await;
        assert!(told, "{what}: the bot learns the call ended");
        assert_eq!(session.close.lock().unwrap().as_ref().map(|c| c.0), Some(code), "{what}: and why");
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_floods_pings_and_never_reads_cannot_grow_the_edge_or_keep_the_call() {
    let (_dir, edge, bot, _agent) = edge_agent_and_bot(&["--ws-idle-timeout", "4s"]).await;
    let before = edge.proc.rss_kib().unwrap();
    // Two callers, each writing up to 24 MiB of 125-byte pings and reading nothing.
    let mut floods = Vec::new();
    for i in 0..2 {
        let mut conn = raw::ws_upgrade(edge.public, "/ws", &format!("corr-ping-{i}")).await.unwrap();
        floods.push(tokio::spawn(async move {
            // Ends early if the edge closes the call (idle) or stops reading.
            let written = raw::flood_pings(&mut conn, 24 * 1024 * 1024, Duration::from_secs(10)).await;
            (written, conn)
        }));
    }
    let mut written = 0;
    let mut held = Vec::new();
    for flood in floods {
        let (bytes, conn) = flood.await.unwrap();
        written += bytes;
        held.push(conn);
    }
    let grown_mib = edge.proc.rss_kib().unwrap().saturating_sub(before) / 1024;
    println!("edge RSS growth after {} MiB of unread pings: {grown_mib} MiB", written / (1024 * 1024));
    assert!(grown_mib < 16, "pongs are queued without bound: the edge grew {grown_mib} MiB");
    let closed = eventually(PROC_DEADLINE, || async {
        metric(edge.admin, "relay_edge_websocket_idle_closes_total").await == Some(2.0)
            && metric(edge.admin, "relay_edge_websocket_sessions").await == Some(0.0)
    })
    .await;
    assert!(closed, "pings alone do not keep a call open past ws_idle_timeout\n{}", edge.proc.log());
    drop(held);
    assert!(
        bot.sessions().iter().all(|s| s.pings.load(std::sync::atomic::Ordering::SeqCst) <= 10),
        "pings reach the bot at most once a second"
    );
}

relay_testkit::over_both_transports! {
    async fn a_caller_that_stops_reading_is_given_up_on_counted_and_its_call_ended() {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let stack = Stack::start_with(|s| s.ws_write_timeout = Duration::from_secs(1)).await.unwrap();
        let mut call = relay_testkit::acs::MediaCall::connect(stack.public(), "/ws", "corr-stall").await.unwrap();
        // The bot echoes every message; the caller sends and never reads, until its sends block.
        let writer = tokio::spawn(async move {
            let message = Message::Binary(vec![7u8; 256 * 1024].into());
            for _ in 0..256 {
                match tokio::time::timeout(Duration::from_secs(5), call.socket().send(message.clone())).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            call
        });
        let admin = stack.edge.admin_addr().unwrap();
        let counted = "relay_edge_rejections_total{route=\"/ws\",check=\"limit\",reason=\"ws-not-reading\"}";
        let gave_up = eventually(Duration::from_secs(30), || async {
            metric(admin, counted).await == Some(1.0)
                && metric(admin, "relay_edge_websocket_sessions").await == Some(0.0)
        })
        .await;
        assert!(gave_up, "the edge closes a caller that does not read, and counts it");
        // The bot's side ends too; it is told 1008 when it still reads (this echo bot may be
        // stuck writing to a caller that reads nothing, and then sees its connection end).
        let session = stack.bot.sessions()[0].clone();
        assert!(eventually(Duration::from_secs(30), || async { session.ended.load(std::sync::atomic::Ordering::SeqCst) }).await);
        let code = session.close.lock().unwrap().as_ref().map(|c| c.0);
        assert!(code.is_none_or(|c| c == 1008), "told why, if told: {code:?}");
        drop(writer.await);
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_and_refused_agents_cannot_flood_the_edge_log() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge");
    relay_pki::EdgeState::init(&state, &[], std::time::SystemTime::now()).unwrap();
    let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();
    let count = |needle: &str| edge.proc.log().lines().filter(|l| l.contains(needle)).count();

    // 200 connections to the tunnel's TCP port that are not TLS: one line, not 200.
    for _ in 0..200 {
        let mut conn = tokio::net::TcpStream::connect(edge.tunnel).await.unwrap();
        let _ = conn.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    }
    let refused = "relay_edge_tunnel_handshakes_refused_total";
    assert!(eventually(PROC_DEADLINE, || async { metric(edge.admin, refused).await == Some(200.0) }).await);
    assert_eq!(count("tunnel handshake refused"), 1, "one line per source, then summaries\n{}", edge.proc.log());

    // A revoked agent redials for as long as it runs: refused once in the log.
    let bot = EchoBot::start().await.unwrap();
    let agent_dir = pair_agent(&state, edge.tunnel, "revoked-bot", dir.path()).await.unwrap();
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[edge.tunnel.to_string()], &[]).await.unwrap();
    assert!(eventually(PROC_DEADLINE, || async { edge.agents_connected().await == 1 }).await);
    relay_pki::EdgeState::open(&state).unwrap().revoke("revoked-bot", std::time::SystemTime::now()).unwrap();
    let refused_again = eventually(Duration::from_secs(30), || async {
        agent.proc.log().lines().filter(|l| l.contains("revoked")).count() >= 4
    })
    .await;
    assert!(refused_again, "the agent keeps redialling:\n{}", agent.proc.log());
    assert_eq!(count("refusing agent"), 1, "{}", edge.proc.log());

    // An agent whose certificate expired is named, with the expiry, once.
    let edge_state = relay_pki::EdgeState::open(&state).unwrap();
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let token =
        edge_state.create_token("expired-bot", "127.0.0.1:1", Duration::from_secs(60), long_ago, false).unwrap();
    let (key_pem, csr) = relay_pki::generate_agent_csr("expired-bot").unwrap();
    let issued = edge_state.redeem(&token.token_id, &token.secret, &csr, long_ago, Duration::from_secs(60)).unwrap();
    let expired_dir = dir.path().join("expired");
    relay_pki::AgentState::save(&expired_dir, "expired-bot", "127.0.0.1:1", &key_pem, &issued.cert_der, &issued.ca_der)
        .unwrap();
    let id = relay_pki::AgentState::load(&expired_dir).unwrap();
    for _ in 0..3 {
        let settings = relay_transport::TunnelSettings::default();
        let dialled = relay_transport::dial_tunnel(
            relay_transport::Transport::Quic,
            edge.tunnel,
            "localhost",
            &id.tls(),
            &settings,
        )
        .await;
        if let Ok(conn) = dialled {
            let _ = tokio::time::timeout(RAW_DEADLINE, conn.closed()).await;
        }
    }
    let named = |l: &&str| l.contains("expired-bot") && l.contains("expired_at=") && l.contains("expired");
    assert!(eventually(PROC_DEADLINE, || async { edge.proc.log().lines().filter(named).count() >= 1 }).await);
    assert_eq!(edge.proc.log().lines().filter(named).count(), 1, "{}", edge.proc.log());
}
