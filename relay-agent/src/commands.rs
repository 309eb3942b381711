//! The subcommands that read a running agent through its admin listener: `inspect` (the last
//! exchanges, or one whole), `replay` (one exchange sent to the bot again) and `record` (a whole
//! call written to a file as it happens). Part of the command line, like [`crate::cli`].

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use http_body_util::BodyExt;
use relay_record::Entry;
use relay_record::play::{MAX_LINE_BYTES, PlayOptions, http_client, send_webhook};

use crate::inspect::{EXCHANGES_PATH, ExchangeSummary, Inspected, render_list, render_one};
use crate::record::RECORD_PATH;

/// `inspect`: the list, or exchange `id` whole; JSON with `json`.
pub async fn inspect(admin: SocketAddr, id: Option<u64>, json: bool) -> anyhow::Result<String> {
    let addr = relay_runtime::admin::local(admin);
    match id {
        None => {
            let body = relay_runtime::admin::fetch(addr, EXCHANGES_PATH).await?;
            let list: Vec<ExchangeSummary> = serde_json::from_slice(&body)
                .with_context(|| format!("{addr} answered something other than an exchange list"))?;
            Ok(if json { format!("{}\n", serde_json::to_string_pretty(&list)?) } else { render_list(&list) })
        }
        Some(id) => {
            let whole = fetch_one(addr, id).await?;
            Ok(if json { format!("{}\n", serde_json::to_string_pretty(&whole)?) } else { render_one(&whole) })
        }
    }
}

async fn fetch_one(addr: SocketAddr, id: u64) -> anyhow::Result<Inspected> {
    let body = relay_runtime::admin::fetch(addr, &format!("{EXCHANGES_PATH}/{id}")).await?;
    serde_json::from_slice(&body).with_context(|| format!("{addr} answered something other than an exchange"))
}

/// `replay`: sends exchange `id` to `to` (default: the bot the agent forwards to) with `headers`
/// added, and returns the answer for a terminal.
pub async fn replay(admin: SocketAddr, id: u64, to: Option<&str>, headers: &[String]) -> anyhow::Result<String> {
    let whole = fetch_one(relay_runtime::admin::local(admin), id).await?;
    let hook = &whole.exchange;
    if hook.websocket {
        bail!(
            "exchange {id} is a media upgrade: record the call with `relay-agent record` and play it with `relay-bench replay`"
        );
    }
    let mut options = PlayOptions::new(to.unwrap_or(&whole.bot))?;
    for header in headers {
        options.header(header)?;
    }
    if hook.body.truncated {
        eprintln!(
            "note: the recorded body was cut at {} of {} bytes; the replay sends what was kept",
            hook.body.bytes().map_or(0, |b| b.len()),
            hook.body.len
        );
    }
    let answered = send_webhook(&http_client(), &options, hook)
        .await
        .map_err(|why| anyhow::anyhow!("no answer from {}: {why}", options.target))?;
    let recorded = match (hook.status, &hook.failure) {
        (Some(status), _) => format!("recorded {status} in {:.1} ms", hook.answer_ms),
        (None, failure) => format!("recorded: no answer ({})", failure.as_deref().unwrap_or("unknown")),
    };
    let mut out = format!(
        "{} {} -> {} in {:.1} ms ({recorded})\n",
        hook.method,
        hook.path,
        answered.status,
        answered.elapsed.as_secs_f64() * 1000.0
    );
    for (name, value) in &answered.headers {
        out.push_str(&format!("{name}: {value}\n"));
    }
    if !answered.body.is_empty() {
        out.push('\n');
        out.push_str(&String::from_utf8_lossy(&answered.body));
        out.push('\n');
    }
    Ok(out)
}

/// What `record` wrote.
#[derive(Debug, Default)]
struct Tally {
    call: Option<String>,
    webhooks: u64,
    sessions: u64,
    caller_frames: u64,
    bot_frames: u64,
    end: Option<relay_record::format::End>,
    bytes: u64,
}

impl Tally {
    fn count(&mut self, line: &[u8]) {
        self.bytes += line.len() as u64 + 1;
        let Ok(entry) = serde_json::from_slice::<Entry>(line) else { return };
        match entry {
            Entry::Recording(meta) => {
                eprintln!("recording call {} on agent {}", meta.call, meta.agent);
                self.call = Some(meta.call);
            }
            Entry::Webhook(_) => self.webhooks += 1,
            Entry::MediaOpen(_) => self.sessions += 1,
            Entry::Frame(f) if f.from == relay_record::Side::Caller => self.caller_frames += 1,
            Entry::Frame(_) => self.bot_frames += 1,
            Entry::MediaClose(_) => {}
            Entry::End(end) => self.end = Some(end),
        }
    }

    fn summary(&self, out: &Path) -> String {
        let ended = match &self.end {
            Some(end) if end.dropped > 0 => {
                format!("{} ({} lines dropped: the reader fell behind)", end.reason, end.dropped)
            }
            Some(end) => end.reason.clone(),
            None => "cut short (no end line)".to_owned(),
        };
        format!(
            "recorded call {} to {} ({} KiB): webhooks {}, media sessions {}, frames {} from the caller and {} from the bot; ended: {ended}",
            self.call.as_deref().unwrap_or("(none arrived)"),
            out.display(),
            self.bytes / 1024,
            self.webhooks,
            self.sessions,
            self.caller_frames,
            self.bot_frames,
        )
    }
}

/// `record`: asks the agent for call `call` (or the next call) and writes it to `out` (a new
/// file, 0600: it holds the call's content) until the call ends; Ctrl-C stops early, keeping
/// what was written. Returns the summary line.
pub async fn record(admin: SocketAddr, call: Option<&str>, out: &Path) -> anyhow::Result<String> {
    let path = match call {
        Some(call) => format!("{RECORD_PATH}?call={call}"),
        None => RECORD_PATH.to_owned(),
    };
    let file = relay_record::format::create_file(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut file = std::io::BufWriter::new(file);
    let mut body = match relay_runtime::admin::stream(relay_runtime::admin::local(admin), &path).await {
        Ok(body) => body,
        Err(e) => {
            let _ = std::fs::remove_file(out);
            return Err(e.into());
        }
    };
    match call {
        Some(call) => eprintln!("waiting for call {call}; Ctrl-C stops"),
        None => eprintln!("waiting for the next call; Ctrl-C stops"),
    }
    let mut tally = Tally::default();
    let mut pending: Vec<u8> = Vec::new();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = &mut interrupted => {
                eprintln!("stopped: {} keeps what was recorded so far", out.display());
                break;
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.context("the agent's stream broke")?;
        let Ok(data) = frame.into_data() else { continue };
        file.write_all(&data)?;
        file.flush()?;
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            tally.count(pending.get(..end).unwrap_or_default());
            pending.drain(..=end);
        }
        if pending.len() > MAX_LINE_BYTES {
            bail!("the agent sent a line longer than {MAX_LINE_BYTES} bytes");
        }
    }
    file.flush()?;
    Ok(tally.summary(out))
}
