//! Several edge replicas sharing one state directory: each agent keeps a connection to every
//! replica, any replica can serve any exchange, replicas agree on which agent holds a call
//! without sharing state, and an agent returns to a restarted replica within two seconds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use relay_agent::Agent;
use relay_edge::{Edge, EdgeSettings};
use relay_testkit::acs::{self, MediaCall};
use relay_testkit::bot::EchoBot;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::stack::CONNECT_DEADLINE;
use relay_testkit::{Stack, eventually};
use tokio_tungstenite::tungstenite::Message;

/// A second edge on the stack's state directory, on fresh loopback ports (or the given ones).
async fn replica(stack: &Stack, ports: Option<(std::net::SocketAddr, std::net::SocketAddr)>) -> Edge {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let (public, tunnel) = ports.unwrap_or((loopback, loopback));
    let settings = EdgeSettings::new(stack.edge_settings.state_dir.clone(), public, tunnel);
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        match Edge::start(settings.clone()).await {
            Ok(edge) => return edge,
            // A replica restarted on its old ports may find the UDP socket still being released.
            Err(e) if Instant::now() < deadline && e.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("replica did not start: {e}"),
        }
    }
}

/// Starts a paired agent named `name` that keeps connections to every edge in `edges`,
/// forwarding to `bot`.
async fn agent_for(stack: &Stack, name: &str, edges: &[&Edge], bot: &EchoBot) -> Agent {
    let mut settings = stack.agent_settings(&stack.pair_agent(name).await.unwrap()).unwrap();
    settings.edges = edges.iter().map(|e| e.tunnel_addr().to_string()).collect();
    settings.upstream = relay_agent::config::parse_upstream(&bot.url()).unwrap();
    Agent::start(settings).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connects_to_every_replica_and_any_replica_serves_it() {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let second = replica(&stack, None).await;
    let agent = agent_for(&stack, "bot-a", &[&stack.edge, &second], &stack.bot).await;
    assert!(eventually(CONNECT_DEADLINE, || async { agent.connections() == 2 }).await, "one connection per replica");
    assert_eq!(stack.edge.connected_agents(), ["bot-a"]);
    assert_eq!(second.connected_agents(), ["bot-a"]);

    for public in [stack.public(), second.public_addr()] {
        let reply = send_collect(public, post_json(public, "/api/incomingCall", &acs::incoming_call_event("c-1")))
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "through {public}");
    }
    assert_eq!(stack.bot.hits(), 2);

    // Each replica publishes its own status file; the listing joins them.
    let listed = eventually(Duration::from_secs(5), || async {
        let rows = relay_edge::listing::agent_rows(
            &relay_pki::EdgeState::open(&stack.edge_settings.state_dir).unwrap(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        rows.iter().any(|r| r.name == "bot-a" && r.connections.len() == 2)
    })
    .await;
    assert!(listed, "the listing shows the agent's connection to each replica");

    agent.shutdown().await;
    second.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_send_every_exchange_of_a_call_to_the_same_agent_without_sharing_state() {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let second = replica(&stack, None).await;
    let mut bots = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let bot = EchoBot::start().await.unwrap();
        agents.push(agent_for(&stack, &format!("replica-{i}"), &[&stack.edge, &second], &bot).await);
        bots.push(bot);
    }
    let all_connected = eventually(CONNECT_DEADLINE, || async {
        stack.edge.connected_agents().len() == 3 && second.connected_agents().len() == 3
    })
    .await;
    assert!(all_connected);

    // The call arrives at one replica, its callback and media socket at the other, as a public
    // load balancer in front of two replicas would spread them.
    let (a, b) = (stack.public(), second.public_addr());
    for call in 0..30 {
        let corr = format!("corr-{call}");
        let incoming =
            send_collect(a, post_json(a, "/api/incomingCall", &acs::incoming_call_event(&corr))).await.unwrap();
        assert_eq!(incoming.status(), StatusCode::OK);
        let connected = acs::callback_event("CallConnected", &format!("conn-{call}"), &corr);
        let callback = send_collect(b, post_json(b, &format!("/api/callbacks/conn-{call}"), &connected)).await.unwrap();
        assert_eq!(callback.status(), StatusCode::OK);
        let mut media = MediaCall::connect(b, "/ws", &corr).await.unwrap();
        media.socket().send(Message::Text("frame".into())).await.unwrap();
        assert_eq!(media.socket().next().await.unwrap().unwrap(), Message::Text("frame".into()));
        media.close(1000, "done").await.unwrap();
    }

    let mut home: HashMap<String, usize> = HashMap::new();
    for (i, bot) in bots.iter().enumerate() {
        let mut ids: Vec<String> = bot
            .requests()
            .iter()
            .filter_map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
                v.pointer("/0/data/correlationId")?.as_str().map(str::to_owned)
            })
            .collect();
        ids.extend(bot.sessions().iter().filter_map(|s| {
            s.headers.get("x-ms-call-correlation-id").and_then(|v| v.to_str().ok()).map(str::to_owned)
        }));
        for id in &ids {
            if let Some(other) = home.insert(id.clone(), i) {
                assert_eq!(other, i, "call {id} reached two agents");
            }
        }
        let calls: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), calls.len() * 3, "agent {i}: each of its calls sent it all three exchanges");
        assert!(!calls.is_empty(), "agent {i} got no call: calls must spread over agents");
    }
    assert_eq!(home.len(), 30);

    for agent in agents {
        agent.shutdown().await;
    }
    second.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_replica_leaves_the_other_serving_and_the_agent_returns_within_two_seconds() {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let second = replica(&stack, None).await;
    let agent = agent_for(&stack, "bot-a", &[&stack.edge, &second], &stack.bot).await;
    assert!(eventually(CONNECT_DEADLINE, || async { agent.connections() == 2 }).await);

    let ports = (second.public_addr(), second.tunnel_addr());
    second.shutdown().await;
    assert!(eventually(CONNECT_DEADLINE, || async { agent.connections() == 1 }).await);
    let public = stack.public();
    let reply =
        send_collect(public, post_json(public, "/api/incomingCall", &acs::incoming_call_event("c-2"))).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK, "the remaining replica keeps serving");

    // Let one whole try go unanswered first, so the pending handshakes' retransmission timers
    // have backed off as they would during a real outage.
    let failing = eventually(CONNECT_DEADLINE, || async { reconnects(&agent) >= 2 }).await;
    assert!(failing, "the agent keeps retrying the lost replica");
    let second = replica(&stack, Some(ports)).await;
    let listening = Instant::now();
    let back = eventually(Duration::from_secs(2), || async { agent.connections() == 2 }).await;
    assert!(back, "the agent must be back within 2 s of the replica listening (waited {:?})", listening.elapsed());

    agent.shutdown().await;
    second.shutdown().await;
    stack.shutdown().await;
}

fn reconnects(agent: &Agent) -> u64 {
    agent
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("relay_agent_reconnects_total ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}
