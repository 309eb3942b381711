//! The shipped binaries relay a 50 MB request body and a 50 MB response body in bounded memory:
//! each of the edge and agent processes (with their own allocator) grows by less than 16 MiB for
//! either direction, over both tunnel transports. The in-process test (`large_body.rs`) checks
//! the bytes; this one checks what the real processes hold.

use std::time::SystemTime;

use relay_pki::EdgeState;
use relay_testkit::bodies;
use relay_testkit::bot::EchoBot;
use relay_testkit::eventually;
use relay_testkit::procs::{AgentProc, Binaries, EdgeProc, PROC_DEADLINE, pair_agent};

const BODY_BYTES: u64 = 50 * 1024 * 1024;

/// The bound from the performance targets. Measured on the release binaries: 1-4 MiB.
const MAX_GROWTH_KIB: u64 = 16 * 1024;

fn bins() -> Binaries {
    Binaries { edge: env!("CARGO_BIN_EXE_e2e-edge").into(), agent: env!("CARGO_BIN_EXE_e2e-agent").into() }
}

async fn fifty_megabytes_each_way_within_bound(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge");
    EdgeState::init(&state, &[], SystemTime::now()).unwrap();
    let limit = (BODY_BYTES + 1).to_string();
    let edge = EdgeProc::start(&bins(), &[], &state, &["--max-body-bytes", &limit]).await.unwrap();
    let agent_dir = pair_agent(&state, edge.tunnel, "agent-1", dir.path()).await.unwrap();
    let bot = EchoBot::start_quiet_on("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let edges = [edge.tunnel.to_string()];
    let agent =
        AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &edges, &["--transport", transport]).await.unwrap();
    assert!(
        eventually(PROC_DEADLINE, || async { edge.agents_connected_over(transport).await == 1 }).await,
        "the agent did not connect over {transport}: {}",
        agent.proc.log()
    );

    let procs = [("edge", edge.proc.pid().unwrap()), ("agent", agent.proc.pid().unwrap())];
    let report = bodies::run(edge.public, BODY_BYTES, &procs).await.unwrap();
    for (direction, transfer) in [("request", &report.request), ("response", &report.response)] {
        assert_eq!(transfer.bytes, BODY_BYTES, "{direction} body arrived short");
        for (process, growth) in &transfer.growth_kib {
            eprintln!("{transport}: {direction} body: {process} grew by {:.1} MiB", *growth as f64 / 1024.0);
            assert!(
                *growth < MAX_GROWTH_KIB,
                "{transport}: relaying a 50 MiB {direction} body grew the {process} by {:.1} MiB",
                *growth as f64 / 1024.0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_agent_processes_relay_fifty_megabytes_each_way_in_bounded_memory_over_quic() {
    fifty_megabytes_each_way_within_bound("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_agent_processes_relay_fifty_megabytes_each_way_in_bounded_memory_over_tcp() {
    fifty_megabytes_each_way_within_bound("tcp").await;
}
