//! The webhook load: a fixed number of workers, each POSTing a 1 KB ACS-shaped callback JSON on
//! its own keep-alive connection as fast as answers come back, for a given time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use relay_testkit::acs::callback_body;
use relay_testkit::stats::Percentiles;

/// One keep-alive HTTP/1.1 connection, reconnected when it fails.
#[derive(Debug)]
pub struct HttpClient {
    target: SocketAddr,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    /// A client for `target`; connects on first use.
    pub fn new(target: SocketAddr) -> Self {
        Self { target, sender: None }
    }

    async fn sender(&mut self) -> anyhow::Result<&mut http1::SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.target).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        self.sender.as_mut().ok_or_else(|| anyhow::anyhow!("no connection"))
    }

    /// POSTs `body` as JSON to `path` and reads the whole answer; returns its status.
    pub async fn post(&mut self, path: &str, body: Bytes) -> anyhow::Result<StatusCode> {
        let request = Request::post(path)
            .header(header::HOST, self.target.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let sender = self.sender().await?;
        sender.ready().await?;
        let outcome = sender.send_request(request).await;
        let response = match outcome {
            Ok(response) => response,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct WebhookLoad {
    /// The bot or edge.
    pub target: SocketAddr,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long to send.
    pub duration: Duration,
}

/// What a webhook run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WebhookReport {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests that failed or were answered otherwise.
    pub failed: u64,
    /// Answered requests per second.
    pub requests_per_second: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Percentiles,
}

/// Runs the load and reports.
pub async fn run(load: WebhookLoad) -> WebhookReport {
    let started = Instant::now();
    let deadline = started + load.duration;
    let workers: Vec<_> = (0..load.concurrency)
        .map(|worker| {
            tokio::spawn(async move {
                let mut client = HttpClient::new(load.target);
                let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
                let mut seq = 0;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match client.post("/api/callbacks/bench", callback_body(worker, seq)).await {
                        Ok(status) if status.is_success() => {
                            ok += 1;
                            latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                        }
                        _ => failed += 1,
                    }
                    seq += 1;
                }
                (ok, failed, latencies)
            })
        })
        .collect();
    let mut report = WebhookReport::default();
    let mut latencies = Vec::new();
    for worker in workers {
        if let Ok((ok, failed, mut lat)) = worker.await {
            report.ok += ok;
            report.failed += failed;
            latencies.append(&mut lat);
        }
    }
    report.requests_per_second = report.ok as f64 / started.elapsed().as_secs_f64();
    report.latency_ms = Percentiles::of_micros(&mut latencies);
    report
}
