//! Call affinity: all exchanges of one call reach the same agent (the bot replica holding it).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use relay_agent::Agent;
use relay_testkit::acs::{self, MediaCall};
use relay_testkit::bot::EchoBot;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::{Stack, eventually};
use tokio_tungstenite::tungstenite::Message;

/// The correlation id of an event array (Event Grid schema, ACS callbacks) or of one event
/// object (CloudEvents schema).
fn correlation_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = v.pointer("/0/data/correlationId").or_else(|| v.pointer("/data/correlationId"))?;
    id.as_str().map(str::to_owned)
}

/// Correlation ids each bot saw, from webhook bodies and media upgrade headers.
fn seen_by(bot: &EchoBot) -> Vec<String> {
    let mut ids: Vec<String> = bot.requests().iter().filter_map(|r| correlation_of(&r.body)).collect();
    ids.extend(
        bot.sessions()
            .iter()
            .filter_map(|s| s.headers.get("x-ms-call-correlation-id").and_then(|v| v.to_str().ok()).map(str::to_owned)),
    );
    ids
}

/// An edge with three agents (bot replicas), each forwarding to its own bot.
async fn three_replicas() -> (Stack, Vec<EchoBot>, Vec<Agent>) {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let mut bots = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let bot = EchoBot::start().await.unwrap();
        let mut settings = stack.agent_settings(&stack.pair_agent(&format!("replica-{i}")).await.unwrap()).unwrap();
        settings.upstream = relay_agent::config::parse_upstream(&bot.url()).unwrap();
        agents.push(Agent::start(settings).await.unwrap());
        bots.push(bot);
    }
    stack.wait_connected(3).await.unwrap();
    (stack, bots, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exchange_of_a_call_lands_on_one_agent_and_a_call_moves_when_its_agent_leaves() {
    let (stack, bots, mut agents) = three_replicas().await;
    let public = stack.public();

    for call in 0..50 {
        let corr = format!("corr-{call}");
        let conn_id = format!("conn-{call}");
        let incoming = send_collect(public, post_json(public, "/api/incomingCall", &acs::incoming_call_event(&corr)))
            .await
            .unwrap();
        assert_eq!(incoming.status(), StatusCode::OK);
        let connected = acs::callback_event("CallConnected", &conn_id, &corr);
        assert_eq!(
            send_collect(public, post_json(public, &format!("/api/callbacks/{conn_id}"), &connected))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
        let mut media = MediaCall::connect(public, "/ws", &corr).await.unwrap();
        media.socket().send(Message::Text("frame".into())).await.unwrap();
        assert_eq!(media.socket().next().await.unwrap().unwrap(), Message::Text("frame".into()));
        media.close(1000, "done").await.unwrap();
        let ended = acs::callback_event("CallDisconnected", &conn_id, &corr);
        assert_eq!(
            send_collect(public, post_json(public, &format!("/api/callbacks/{conn_id}"), &ended))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }

    let mut home: HashMap<String, usize> = HashMap::new();
    for (i, bot) in bots.iter().enumerate() {
        let ids = seen_by(bot);
        for id in &ids {
            if let Some(other) = home.insert(id.clone(), i) {
                assert_eq!(other, i, "call {id} reached two replicas");
            }
        }
        let calls: HashSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), calls.len() * 4, "replica {i}: every call it holds sent it all four exchanges");
        assert!(!calls.is_empty(), "replica {i} got no call: new calls must spread over agents");
    }
    assert_eq!(home.len(), 50);

    // The replica holding corr-0 goes away: its next callback goes to another one, counted.
    let holder = home["corr-0"];
    agents.remove(holder).shutdown().await;
    stack.wait_connected(2).await.unwrap();
    let late = acs::callback_event("PlayCompleted", "conn-0", "corr-0");
    assert_eq!(
        send_collect(public, post_json(public, "/api/callbacks/conn-0", &late)).await.unwrap().status(),
        StatusCode::OK
    );
    let moved = bots
        .iter()
        .enumerate()
        .any(|(i, bot)| i != holder && seen_by(bot).iter().filter(|id| *id == "corr-0").count() == 1);
    assert!(moved, "the call must move to a connected replica");
    let admin = stack.edge.admin_addr().unwrap();
    let counted = eventually(Duration::from_secs(5), || async {
        let mut req = http::Request::new(relay_testkit::client::full(""));
        *req.uri_mut() = "/metrics".parse().unwrap();
        req.headers_mut().insert(http::header::HOST, "admin".parse().unwrap());
        let text =
            send_collect(admin, req).await.map(|r| String::from_utf8_lossy(r.body()).into_owned()).unwrap_or_default();
        text.contains("relay_edge_affinity_moves_total 1")
    })
    .await;
    assert!(counted, "the move is counted");
    for agent in agents {
        agent.shutdown().await;
    }
    stack.shutdown().await;
}

/// An Event Grid subscription with the CloudEvents delivery schema posts IncomingCall as one
/// object, not an array; the call's callbacks (arrays) and media must still follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_incoming_call_is_a_cloud_event_object_stays_on_one_agent() {
    let (stack, bots, agents) = three_replicas().await;
    let public = stack.public();

    for call in 0..30 {
        let corr = format!("cloud-{call}");
        let conn_id = format!("conn-{call}");
        let mut incoming = post_json(public, "/api/incomingCall", &acs::incoming_call_cloud_event(&corr));
        incoming.headers_mut().insert(http::header::CONTENT_TYPE, "application/cloudevents+json".parse().unwrap());
        assert_eq!(send_collect(public, incoming).await.unwrap().status(), StatusCode::OK);
        for kind in ["CallConnected", "PlayCompleted"] {
            let event = acs::callback_event(kind, &conn_id, &corr);
            let answer = send_collect(public, post_json(public, &format!("/api/callbacks/{conn_id}"), &event));
            assert_eq!(answer.await.unwrap().status(), StatusCode::OK);
        }
        let mut media = MediaCall::connect(public, "/ws", &corr).await.unwrap();
        media.socket().send(Message::Text("frame".into())).await.unwrap();
        assert_eq!(media.socket().next().await.unwrap().unwrap(), Message::Text("frame".into()));
        media.close(1000, "done").await.unwrap();
    }

    let mut home: HashMap<String, usize> = HashMap::new();
    for (i, bot) in bots.iter().enumerate() {
        for id in seen_by(bot) {
            if let Some(other) = home.insert(id.clone(), i) {
                assert_eq!(other, i, "call {id} reached two replicas");
            }
        }
    }
    assert_eq!(home.len(), 30, "every call's exchanges were seen");
    for agent in agents {
        agent.shutdown().await;
    }
    stack.shutdown().await;
}
