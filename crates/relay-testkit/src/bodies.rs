//! Large bodies through a target: one large request body and one large response body, each on
//! its own, with the memory each process needed for it (for the benchmark and for the test that
//! holds the real binaries to their memory bound). The bot must be the test kit's echo bot,
//! which discards (`discard=1`) and generates (`bytes=N`) bodies.
//!
//! Memory is the growth of each process's peak resident set over its resident set just before
//! the transfer: the peak is reset first (`5` into `/proc/PID/clear_refs`), so what the media and
//! webhook phases did before does not count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::{TestBody, full, hash_body, pattern_stream, send};
use crate::procs::resident_kib;
use anyhow::{Context, bail};
use http::{Method, Request, StatusCode, header};
use serde::Serialize;

/// Bytes per chunk of the request body the load sends: what an HTTP client writes per call.
const UPLOAD_CHUNK: usize = 64 * 1024;

/// Longest a transfer may take before it counts as failed: 50 MB takes well under a second on
/// loopback; a stalled relay must not hang the benchmark.
pub const TRANSFER_DEADLINE: Duration = Duration::from_secs(120);

/// One direction's transfer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Transfer {
    /// Bytes that arrived at the far end.
    pub bytes: u64,
    /// Seconds the transfer took.
    pub seconds: f64,
    /// Megabytes (10^6) per second.
    pub mb_per_second: f64,
    /// Peak resident memory growth during the transfer, in KiB, per process.
    pub growth_kib: BTreeMap<String, u64>,
}

/// Both directions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BodyReport {
    /// A request body to a bot that reads and discards it.
    pub request: Transfer,
    /// A response body a bot generates for a small request.
    pub response: Transfer,
}

/// Resets the peak resident set of `pid` to its current resident set.
fn reset_peak(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// Runs `transfer` with the peak memory of `procs` reset before and read after.
async fn measured<F>(procs: &[(&str, u32)], transfer: F) -> anyhow::Result<Transfer>
where
    F: std::future::Future<Output = anyhow::Result<u64>>,
{
    let mut before = BTreeMap::new();
    for (name, pid) in procs {
        reset_peak(*pid).with_context(|| format!("cannot reset the peak memory of {name} ({pid})"))?;
        let (rss, _) = resident_kib(*pid).with_context(|| format!("{name} ({pid}) is gone"))?;
        before.insert((*name).to_owned(), rss);
    }
    let started = Instant::now();
    let bytes = tokio::time::timeout(TRANSFER_DEADLINE, transfer)
        .await
        .with_context(|| format!("the transfer took over {TRANSFER_DEADLINE:?}"))??;
    let seconds = started.elapsed().as_secs_f64();
    let mut growth_kib = BTreeMap::new();
    for (name, pid) in procs {
        let (_, peak) = resident_kib(*pid).with_context(|| format!("{name} ({pid}) is gone"))?;
        let start = before.get(*name).copied().unwrap_or(0);
        growth_kib.insert((*name).to_owned(), peak.saturating_sub(start));
    }
    Ok(Transfer { bytes, seconds, mb_per_second: bytes as f64 / 1e6 / seconds.max(f64::EPSILON), growth_kib })
}

fn request(
    method: Method,
    target: SocketAddr,
    path: &str,
    body: TestBody,
    len: u64,
) -> anyhow::Result<Request<TestBody>> {
    Ok(Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, target.to_string())
        .header(header::CONTENT_LENGTH, len)
        .body(body)?)
}

/// Sends a `len`-byte request body to a bot that discards it; returns the length the bot read.
pub async fn upload(target: SocketAddr, len: u64) -> anyhow::Result<u64> {
    let req = request(Method::POST, target, "/api/callbacks/upload?discard=1", pattern_stream(len, UPLOAD_CHUNK), len)?;
    let response = send(target, req).await?;
    let status = response.status();
    let (_, body) = response.into_parts();
    let text = http_body_util::BodyExt::collect(body).await?.to_bytes();
    if status != StatusCode::OK {
        bail!("upload answered {status}: {}", String::from_utf8_lossy(&text));
    }
    let received: u64 = std::str::from_utf8(&text)?.trim().parse().context("the bot's answer is not a length")?;
    Ok(received)
}

/// Asks the bot for a `len`-byte response body; returns the length that arrived.
pub async fn download(target: SocketAddr, len: u64) -> anyhow::Result<u64> {
    let path = format!("/api/callbacks/download?bytes={len}");
    let req = request(Method::POST, target, &path, full(Vec::new()), 0)?;
    let response = send(target, req).await?;
    if response.status() != StatusCode::OK {
        bail!("download answered {}", response.status());
    }
    let (received, _) = hash_body(response.into_body()).await?;
    Ok(received)
}

/// Runs both directions, one after the other, against `target`, measuring `procs`.
pub async fn run(target: SocketAddr, len: u64, procs: &[(&str, u32)]) -> anyhow::Result<BodyReport> {
    let request = measured(procs, upload(target, len)).await.context("request body")?;
    let response = measured(procs, download(target, len)).await.context("response body")?;
    for (what, transfer) in [("request", &request), ("response", &response)] {
        if transfer.bytes != len {
            bail!("{what} body: {} of {len} bytes arrived", transfer.bytes);
        }
    }
    Ok(BodyReport { request, response })
}
