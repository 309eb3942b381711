//! The health checks container platforms run: `relay-edge health` and `relay-agent health` (the
//! images have no shell or curl) against the admin listeners' `/healthz` and `/readyz`, with the
//! real binaries as processes.

use std::path::Path;
use std::process::Output;
use std::time::SystemTime;

use relay_pki::{DEFAULT_TOKEN_TTL, EdgeState};
use relay_testkit::bot::EchoBot;
use relay_testkit::eventually;
use relay_testkit::procs::{AgentProc, Binaries, EdgeProc, PROC_DEADLINE};

fn bins() -> Binaries {
    Binaries { edge: env!("CARGO_BIN_EXE_e2e-edge").into(), agent: env!("CARGO_BIN_EXE_e2e-agent").into() }
}

fn health(program: &Path, admin: std::net::SocketAddr, ready: bool) -> Output {
    let mut command = std::process::Command::new(program);
    command.args(["health", "--admin-listen", &admin.to_string()]);
    if ready {
        command.arg("--ready");
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_liveness_and_ready_waits_for_the_tunnel_on_both_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge");
    EdgeState::init(&state, &[], SystemTime::now()).unwrap();
    let edge = EdgeProc::start(&bins(), &[], &state, &[]).await.unwrap();

    // Alive at once; not ready while no agent is connected.
    assert!(health(&bins().edge, edge.admin, false).status.success());
    let not_ready = health(&bins().edge, edge.admin, true);
    assert!(!not_ready.status.success());
    assert!(String::from_utf8_lossy(&not_ready.stderr).contains("503"), "{not_ready:?}");

    let token = EdgeState::open(&state)
        .unwrap()
        .create_token("agent-0", &edge.tunnel.to_string(), DEFAULT_TOKEN_TTL, SystemTime::now(), false)
        .unwrap();
    let agent_dir = dir.path().join("agent");
    relay_agent::pair(&agent_dir, &token.encode(), &Default::default(), Default::default()).await.unwrap();
    let bot = EchoBot::start().await.unwrap();
    let agent = AgentProc::start(&bins(), &[], &agent_dir, &bot.url(), &[edge.tunnel.to_string()], &[]).await.unwrap();
    assert!(health(&bins().agent, agent.admin, false).status.success());
    assert!(
        eventually(PROC_DEADLINE, || async { health(&bins().agent, agent.admin, true).status.success() }).await,
        "the agent never became ready: {}",
        agent.proc.log()
    );
    assert!(eventually(PROC_DEADLINE, || async { health(&bins().edge, edge.admin, true).status.success() }).await);
}
