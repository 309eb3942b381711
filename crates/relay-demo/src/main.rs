//! `cargo run --release -p relay-demo`: an edge, a paired agent and an echo bot on loopback, with
//! a simulated ACS call driven through them, and a short summary. Exits 0 only if every webhook
//! and every media frame arrived intact.

use std::process::ExitCode;
use std::time::Duration;

use relay_testkit::Stack;
use relay_testkit::acs::{self, MediaCall, MediaStats};
use relay_testkit::client::{post_json, send_collect};

/// 150 frames at 50 per second: three seconds of audio each way, per leg.
const FRAMES: u64 = 150;
/// How long to wait for the last echoes after the last frame is sent.
const GRACE: Duration = Duration::from_secs(5);

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".to_owned(), |d| format!("{:.2} ms", d.as_secs_f64() * 1000.0))
}

fn added(relay: Option<Duration>, direct: Option<Duration>) -> String {
    match (relay, direct) {
        (Some(r), Some(d)) => format!("{:+.2} ms", (r.as_secs_f64() - d.as_secs_f64()) * 1000.0),
        _ => "n/a".to_owned(),
    }
}

async fn media_leg(addr: std::net::SocketAddr, path: &str, correlation_id: &str) -> anyhow::Result<MediaStats> {
    let mut call = MediaCall::connect(addr, path, correlation_id).await?;
    let stats = call.stream_audio(FRAMES, GRACE).await?;
    call.close(1000, "call ended").await?;
    Ok(stats)
}

async fn run() -> anyhow::Result<bool> {
    println!("acs-relay demo: pairing an agent with a fresh edge on loopback...");
    let stack = Stack::start().await?;
    let public = stack.public();
    println!(
        "  edge  public http://{public}  tunnel quic://{}\n  agent {:?} (paired with a one-time token, mutual TLS)\n  bot   {} (echo)",
        stack.edge.tunnel_addr(),
        stack.edge.connected_agents().first().cloned().unwrap_or_default(),
        stack.bot.url()
    );

    let correlation_id = "demo-correlation-0001";
    let call_id = "demo-call-0001";
    let mut webhooks = vec![("/api/incomingCall".to_owned(), acs::incoming_call_event(correlation_id))];
    for kind in ["CallConnected", "MediaStreamingStarted", "CallDisconnected"] {
        webhooks.push((format!("/api/callbacks/{call_id}"), acs::callback_event(kind, call_id, correlation_id)));
    }
    let mut intact_webhooks = 0;
    for (path, body) in &webhooks {
        let response = send_collect(public, post_json(public, path, body)).await?;
        if response.status() == http::StatusCode::OK && response.body() == body.as_bytes() {
            intact_webhooks += 1;
        }
    }

    println!("  streaming {FRAMES} AudioData frames (640-byte PCM, 50/s) direct to the bot, then through the relay...");
    let direct = media_leg(stack.bot.addr(), "/ws", "demo-direct").await?;
    let relay = media_leg(public, "/ws", correlation_id).await?;
    let bot_saw_webhooks = stack.bot.requests().len();
    stack.shutdown().await;

    let ok =
        intact_webhooks == webhooks.len() && bot_saw_webhooks == webhooks.len() && relay.intact() && direct.intact();
    println!();
    println!("summary");
    println!("  webhooks relayed     {intact_webhooks}/{} intact (1 IncomingCall, 3 callbacks)", webhooks.len());
    println!(
        "  media frames         {} sent, {} echoed intact and in order, {} corrupt or out of order",
        relay.sent, relay.received, relay.mismatched
    );
    println!(
        "  round trip p50/p99   relay {} / {}   direct {} / {}",
        ms(relay.percentile(0.5)),
        ms(relay.percentile(0.99)),
        ms(direct.percentile(0.5)),
        ms(direct.percentile(0.99))
    );
    println!(
        "  added by the relay   {} p50, {} p99 (edge + agent + QUIC, both directions)",
        added(relay.percentile(0.5), direct.percentile(0.5)),
        added(relay.percentile(0.99), direct.percentile(0.99))
    );
    println!("result: {}", if ok { "OK" } else { "FAILED" });
    Ok(ok)
}

fn main() -> ExitCode {
    // Quiet by default so the summary reads well; RUST_LOG=info shows every exchange.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,relay_edge=error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("relay-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("relay-demo: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
