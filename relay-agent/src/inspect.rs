//! The inspection list: the agent's last webhook exchanges (and media upgrades), each with its
//! request head and body, the bot's status, headers, body and timing, redacted, in a ring of
//! bounded length. The admin listener serves summaries at `/exchanges` and one exchange whole at
//! `/exchanges/ID`, for `relay-agent inspect` and `relay-agent replay`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use relay_record::Webhook;
use relay_runtime::admin::{Route, RouteAnswer, RouteRequest};
use serde::{Deserialize, Serialize};

/// Where the admin listener serves the list.
pub const EXCHANGES_PATH: &str = "/exchanges";

/// The last exchanges, newest last.
#[derive(Debug)]
pub(crate) struct Inspector {
    limit: usize,
    /// The bot's base URL, which `replay` sends to unless told otherwise.
    bot: String,
    next_id: AtomicU64,
    ring: Mutex<VecDeque<Arc<Webhook>>>,
}

/// One line of the list: an exchange without its bodies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeSummary {
    /// The id `inspect ID` and `replay ID` take.
    pub id: u64,
    /// When it arrived (ms since the Unix epoch).
    pub unix_ms: u64,
    /// The edge's id for it.
    pub request_id: u64,
    /// The call it belongs to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// A media upgrade rather than a webhook.
    #[serde(default)]
    pub websocket: bool,
    /// Request method.
    pub method: String,
    /// Path, query values redacted.
    pub path: String,
    /// The bot's status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the bot did not answer, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Milliseconds until the bot's answer head.
    pub answer_ms: f64,
    /// Milliseconds until the exchange ended.
    pub duration_ms: f64,
    /// Request body length.
    pub request_bytes: u64,
    /// Response body length.
    pub response_bytes: u64,
}

/// One exchange whole, as `/exchanges/ID` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inspected {
    /// The bot's base URL the agent forwards to.
    pub bot: String,
    /// The exchange.
    #[serde(flatten)]
    pub exchange: Webhook,
}

impl From<&Webhook> for ExchangeSummary {
    fn from(hook: &Webhook) -> Self {
        Self {
            id: hook.id.unwrap_or_default(),
            unix_ms: hook.unix_ms,
            request_id: hook.request_id,
            call: hook.call.clone(),
            websocket: hook.websocket,
            method: hook.method.clone(),
            path: hook.path.clone(),
            status: hook.status,
            failure: hook.failure.clone(),
            answer_ms: hook.answer_ms,
            duration_ms: hook.duration_ms,
            request_bytes: hook.body.len,
            response_bytes: hook.response_body.len,
        }
    }
}

impl Inspector {
    /// A list keeping the last `limit` exchanges.
    pub fn new(limit: usize, bot: String) -> Self {
        Self { limit: limit.max(1), bot, next_id: AtomicU64::new(1), ring: Mutex::new(VecDeque::new()) }
    }

    /// Adds a finished exchange, giving it the next id; the oldest goes when the list is full.
    pub fn push(&self, mut hook: Webhook) {
        hook.id = Some(self.next_id.fetch_add(1, Ordering::Relaxed));
        if let Ok(mut ring) = self.ring.lock() {
            while ring.len() >= self.limit {
                ring.pop_front();
            }
            ring.push_back(Arc::new(hook));
        }
    }

    /// Summaries of the exchanges kept, oldest first.
    pub fn summaries(&self) -> Vec<ExchangeSummary> {
        self.ring.lock().map(|ring| ring.iter().map(|h| ExchangeSummary::from(&**h)).collect()).unwrap_or_default()
    }

    /// One exchange whole, if it is still kept.
    pub fn get(&self, id: u64) -> Option<Arc<Webhook>> {
        self.ring.lock().ok()?.iter().find(|h| h.id == Some(id)).cloned()
    }

    /// The admin route: the list at its path, one exchange below it.
    pub fn route(self: Arc<Self>) -> Route {
        Arc::new(move |asked: RouteRequest<'_>| {
            if asked.rest.is_empty() {
                return RouteAnswer::Json(serde_json::to_string(&self.summaries()).unwrap_or_default());
            }
            let Ok(id) = asked.rest.parse::<u64>() else {
                return RouteAnswer::NotFound(format!("{:?} is not an exchange id", asked.rest));
            };
            match self.get(id) {
                Some(hook) => {
                    let whole = Inspected { bot: self.bot.clone(), exchange: (*hook).clone() };
                    RouteAnswer::Json(serde_json::to_string(&whole).unwrap_or_default())
                }
                None => {
                    RouteAnswer::NotFound(format!("exchange {id} is not kept (the list holds the last {})", self.limit))
                }
            }
        })
    }
}

/// Milliseconds since the Unix epoch as UTC time of day with milliseconds (`08:01:02.123`).
fn time_of_day(unix_ms: u64) -> String {
    let text = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms));
    text.to_string().get(11..23).unwrap_or_default().to_owned()
}

fn size(bytes: u64) -> String {
    if bytes < 10 * 1024 { format!("{bytes} B") } else { format!("{} KiB", bytes / 1024) }
}

/// Widest path column in the list: longer paths are cut with an ellipsis.
const MAX_PATH_COLUMN: usize = 64;

/// `text` cut to `width` characters, with an ellipsis when cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(width.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// The list for a terminal, oldest first.
pub fn render_list(list: &[ExchangeSummary]) -> String {
    use std::fmt::Write as _;
    let path_width = list.iter().map(|e| e.path.chars().count()).max().unwrap_or(0).clamp(4, MAX_PATH_COLUMN);
    let mut out = format!(
        "{:>5}  {:<12}  {:<6}  {:<path_width$}  {:>6}  {:>8}  {:>9}  {:>9}  {}\n",
        "ID", "TIME (UTC)", "METHOD", "PATH", "STATUS", "BOT MS", "IN", "OUT", "CALL"
    );
    for e in list {
        let status = match (e.status, &e.failure) {
            (Some(status), _) => status.to_string(),
            (None, Some(_)) => "failed".to_owned(),
            (None, None) => "-".to_owned(),
        };
        let method = if e.websocket { "WS" } else { e.method.as_str() };
        let _ = writeln!(
            out,
            "{:>5}  {:<12}  {:<6}  {:<path_width$}  {:>6}  {:>8.1}  {:>9}  {:>9}  {}",
            e.id,
            time_of_day(e.unix_ms),
            method,
            cut(&e.path, path_width),
            status,
            e.answer_ms,
            size(e.request_bytes),
            size(e.response_bytes),
            e.call.as_deref().unwrap_or("-"),
        );
    }
    if list.is_empty() {
        out.push_str("(nothing relayed since inspection started)\n");
    }
    out
}

fn render_body(out: &mut String, body: &relay_record::Body) {
    match (&body.text, &body.base64) {
        (Some(text), _) if !text.is_empty() => {
            out.push('\n');
            out.push_str(text);
            out.push('\n');
        }
        (None, Some(b64)) => out.push_str(&format!("\n(binary, base64) {b64}\n")),
        _ => {}
    }
    if body.truncated {
        out.push_str(&format!("(body cut: {} of {} bytes kept)\n", body.bytes().map_or(0, |b| b.len()), body.len));
    }
}

/// One exchange whole for a terminal: the request as the bot got it, then its answer.
pub fn render_one(whole: &Inspected) -> String {
    use std::fmt::Write as _;
    let e = &whole.exchange;
    let mut out = String::new();
    let when = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.unix_ms));
    let _ = writeln!(
        out,
        "exchange {} at {when}, edge request {}, call {}",
        e.id.unwrap_or_default(),
        e.request_id,
        e.call.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "{} {}", e.method, e.path);
    for (name, value) in &e.headers {
        let _ = writeln!(out, "{name}: {value}");
    }
    render_body(&mut out, &e.body);
    match (e.status, &e.failure) {
        (Some(status), _) => {
            let _ = writeln!(
                out,
                "\n<- {} from {} in {:.1} ms (exchange {:.1} ms)",
                status, whole.bot, e.answer_ms, e.duration_ms
            );
        }
        (None, failure) => {
            let _ = writeln!(out, "\n<- no answer from {}: {}", whole.bot, failure.as_deref().unwrap_or("unknown"));
        }
    }
    for (name, value) in &e.response_headers {
        let _ = writeln!(out, "{name}: {value}");
    }
    render_body(&mut out, &e.response_body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_keeps_the_newest_exchanges_up_to_its_bound_with_increasing_ids() {
        let inspector = Inspector::new(2, "http://127.0.0.1:1".into());
        for path in ["/a", "/b", "/c"] {
            inspector.push(Webhook { path: path.into(), ..Default::default() });
        }
        let kept: Vec<(u64, String)> = inspector.summaries().into_iter().map(|s| (s.id, s.path)).collect();
        assert_eq!(kept, vec![(2, "/b".to_owned()), (3, "/c".to_owned())]);
        assert!(inspector.get(1).is_none());
        assert_eq!(inspector.get(3).map(|h| h.path.clone()).as_deref(), Some("/c"));
    }

    #[test]
    fn the_table_keeps_its_columns_for_long_paths() {
        let summary = |id: u64, path: &str| {
            ExchangeSummary::from(&Webhook {
                id: Some(id),
                method: "POST".into(),
                path: path.into(),
                status: Some(200),
                ..Default::default()
            })
        };
        let list = [summary(1, "/a"), summary(2, &format!("/api/callbacks/{}", "x".repeat(100)))];
        let table = render_list(&list);
        // Every column has one width: both rows are as long, the header longer by "CALL" over "-".
        let widths: Vec<usize> = table.lines().map(|l| l.chars().count()).collect();
        assert_eq!(widths, vec![widths[1] + 3, widths[1], widths[1]], "{table}");
        assert!(table.contains('…') && widths[1] < 150, "{table}");
    }
}
