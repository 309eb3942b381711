//! Webhook inspection and replay on the agent: off unless asked; when on, the agent's admin
//! listener lists its last exchanges (head, body, the bot's answer and timing) with credentials
//! and query values redacted, `relay-agent inspect` prints them, and `relay-agent replay` sends
//! one to the bot again.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use relay_agent::Agent;
use relay_agent::inspect::{ExchangeSummary, Inspected};
use relay_testkit::client::{full, send_collect};
use relay_testkit::{Stack, acs, eventually};

const DEADLINE: Duration = Duration::from_secs(10);

/// A stack whose agent runs with `inspect` adjusted by `tweak`; the agent is returned to the
/// test (its admin address is what the commands read).
async fn stack_with_agent(tweak: impl FnOnce(&mut relay_agent::config::InspectSettings)) -> (Stack, Agent) {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let state = stack.pair_agent("agent-1").await.unwrap();
    let mut settings = stack.agent_settings(&state).unwrap();
    tweak(&mut settings.inspect);
    let agent = Agent::start(settings).await.unwrap();
    stack.wait_connected(1).await.unwrap();
    (stack, agent)
}

/// Runs the agent's command line (the binary the tests build from the shipped entry point).
async fn agent_cli(args: Vec<String>) -> std::process::Output {
    let agent = std::path::Path::new(env!("CARGO_BIN_EXE_e2e-agent"));
    relay_testkit::procs::run_to_end(agent, &args).await.unwrap()
}

async fn list(admin: SocketAddr) -> Vec<ExchangeSummary> {
    let body = relay_runtime::admin::fetch(admin, "/exchanges").await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The list once `ok` holds for it (or the last one seen at the deadline).
async fn list_when(admin: SocketAddr, ok: impl Fn(&[ExchangeSummary]) -> bool) -> Vec<ExchangeSummary> {
    let seen = std::sync::Mutex::new(Vec::new());
    eventually(DEADLINE, || async {
        let now = list(admin).await;
        let good = ok(&now);
        *seen.lock().unwrap() = now;
        good
    })
    .await;
    seen.into_inner().unwrap()
}

/// An IncomingCall event padded past 10 KiB, as ACS's are with a large custom context.
fn large_incoming_call(correlation_id: &str) -> String {
    let mut events: serde_json::Value = serde_json::from_str(&acs::incoming_call_event(correlation_id)).unwrap();
    events[0]["data"]["customContext"] = serde_json::json!({ "voipHeaders": { "x-context": "c".repeat(20_000) } });
    events.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_is_off_by_default_and_the_agent_says_how_to_turn_it_on() {
    let (stack, agent) = stack_with_agent(|_| {}).await;
    let admin = agent.admin_addr().unwrap();
    let err = relay_runtime::admin::fetch(admin, "/exchanges").await.unwrap_err().to_string();
    assert!(err.contains("403") && err.contains("inspect = true"), "{err}");
    let out = agent_cli(vec!["inspect".into(), "--admin-listen".into(), admin.to_string()]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("inspection is off") && stderr.lines().count() == 1, "{stderr}");
    agent.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inspected_webhook_shows_its_whole_body_and_the_bots_answer_with_secrets_redacted() {
    let (stack, agent) = stack_with_agent(|inspect| {
        inspect.enabled = true;
        inspect.redact_headers = vec!["x-bot-secret".into()];
    })
    .await;
    let admin = agent.admin_addr().unwrap();
    let event = large_incoming_call("3f6c1a2e-0b7d-4c55-9a61-2d8e5f4b7c90");
    let request = Request::post(format!("http://{}/api/incomingCall?code=s3cret&callerId=4255550100", stack.public()))
        .header("content-type", "application/json")
        .header("authorization", "Bearer acs-jwt-secret-token")
        .header("x-bot-secret", "hunter2")
        .body(full(event.clone()))
        .unwrap();
    let answer = send_collect(stack.public(), request).await.unwrap();
    assert_eq!(answer.status(), 200);

    let kept = list_when(admin, |l| l.len() == 1).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let summary = &kept[0];
    assert_eq!(summary.path, "/api/incomingCall?code=REDACTED&callerId=REDACTED");
    assert_eq!((summary.status, summary.request_bytes), (Some(200), event.len() as u64));
    assert_eq!(summary.call.as_deref(), Some("3f6c1a2e-0b7d-4c55-9a61-2d8e5f4b7c90"));

    let body = relay_runtime::admin::fetch(admin, &format!("/exchanges/{}", summary.id)).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    for secret in ["s3cret", "4255550100", "acs-jwt-secret", "hunter2"] {
        assert!(!text.contains(secret), "{secret} leaked into the inspection list: {text:.3000}");
    }
    let whole: Inspected = serde_json::from_slice(&body).unwrap();
    assert_eq!(whole.bot, stack.bot.url().trim_end_matches('/'));
    let hook = &whole.exchange;
    assert_eq!(hook.body.text.as_deref(), Some(event.as_str()), "bodies over 10 KB are kept whole");
    assert!(!hook.body.truncated);
    let header = |name: &str| hook.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!((header("authorization"), header("x-bot-secret")), (Some("REDACTED"), Some("REDACTED")));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(hook.response_body.text.as_deref(), Some(event.as_str()), "the echo bot's answer");
    assert!(hook.answer_ms > 0.0 && hook.duration_ms >= hook.answer_ms, "{hook:?}");

    // The command line: the list as a table, one exchange whole, and a replay to the bot.
    let admin_arg = admin.to_string();
    let out = agent_cli(vec!["inspect".into(), "--admin-listen".into(), admin_arg.clone()]).await;
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.contains("POST") && row.contains("/api/incomingCall?code=REDACTED") && row.contains("200"), "{table}");
    let out =
        agent_cli(vec!["inspect".into(), summary.id.to_string(), "--admin-listen".into(), admin_arg.clone()]).await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("authorization: REDACTED") && shown.contains("<- 200 from"), "{shown}");

    let hits = stack.bot.hits();
    let out = agent_cli(vec![
        "replay".into(),
        summary.id.to_string(),
        "--header".into(),
        "Authorization: Bearer replayed".into(),
        "--admin-listen".into(),
        admin_arg,
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let replayed = String::from_utf8_lossy(&out.stdout);
    assert!(replayed.starts_with("POST /api/incomingCall?code=REDACTED&callerId=REDACTED -> 200"), "{replayed}");
    assert!(replayed.contains("(recorded 200"), "{replayed}");
    assert_eq!(stack.bot.hits(), hits + 1, "the replay went straight to the bot");
    let again = stack.bot.requests().last().cloned().unwrap();
    assert_eq!(again.body, event.as_bytes(), "the replay sends the kept body");
    assert_eq!(again.headers.get("authorization").unwrap(), "Bearer replayed");
    assert!(again.headers.get("x-bot-secret").is_none(), "a redacted value is not sent");
    agent.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_keeps_only_the_newest_exchanges_and_cuts_bodies_at_its_bound() {
    let (stack, agent) = stack_with_agent(|inspect| {
        inspect.enabled = true;
        inspect.exchanges = 3;
        inspect.body_bytes = 100;
    })
    .await;
    let admin = agent.admin_addr().unwrap();
    for n in 0..5 {
        let body = format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(200));
        let request = relay_testkit::client::post_json(stack.public(), &format!("/api/callbacks/c{n}"), &body);
        assert_eq!(send_collect(stack.public(), request).await.unwrap().status(), 200);
    }
    let newest = ["/api/callbacks/c2", "/api/callbacks/c3", "/api/callbacks/c4"];
    let kept = list_when(admin, |l| l.iter().map(|e| e.path.as_str()).eq(newest)).await;
    assert!(kept.iter().map(|e| e.path.as_str()).eq(newest), "{kept:?}");
    let body = relay_runtime::admin::fetch(admin, &format!("/exchanges/{}", kept[2].id)).await.unwrap();
    let whole: Inspected = serde_json::from_slice(&body).unwrap();
    assert!(whole.exchange.body.truncated);
    assert_eq!(whole.exchange.body.text.as_ref().map(String::len), Some(100));
    assert_eq!(whole.exchange.body.len, kept[2].request_bytes);
    let gone = relay_runtime::admin::fetch(admin, &format!("/exchanges/{}", kept[0].id - 1)).await.unwrap_err();
    assert!(gone.to_string().contains("404") && gone.to_string().contains("not kept"), "{gone}");
    agent.shutdown().await;
    stack.shutdown().await;
}
