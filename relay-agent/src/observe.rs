//! What the forwarder shows the inspection list and the recordings: one [`ExchangeWatch`] per
//! exchange while inspection is on (none otherwise, so the data path pays nothing), which
//! captures the bodies as they stream, redacts the heads, and hands the finished exchange on.
//! It also owns the admin routes for both, which refuse with a clear reason while inspection is
//! off.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use relay_proto::ExchangeHead;
use relay_record::{Capture, MediaOpen, Redactor, Webhook};
use relay_runtime::admin::{Route, RouteAnswer};
use tokio_util::sync::CancellationToken;

use crate::config::InspectSettings;
use crate::inspect::{EXCHANGES_PATH, Inspector};
use crate::metrics::AgentMetrics;
use crate::record::{MediaTap, RECORD_PATH, Recorders, events, unix_ms_now};

/// The header ACS's media upgrade carries its call's correlation id in.
const CORRELATION_HEADER: &str = "x-ms-call-correlation-id";

/// Inspection and recording, when on.
#[derive(Debug)]
pub(crate) struct Observer {
    on: Option<On>,
}

#[derive(Debug)]
struct On {
    inspector: Arc<Inspector>,
    recorders: Arc<Recorders>,
    redactor: Redactor,
    body_bytes: usize,
}

impl Observer {
    pub fn new(
        settings: &InspectSettings,
        agent: &str,
        bot: String,
        metrics: Arc<AgentMetrics>,
        shutdown: CancellationToken,
    ) -> Self {
        if !settings.enabled {
            return Self { on: None };
        }
        let redactor = Redactor::new(&settings.redact_headers);
        let recorders =
            Recorders::new(settings.clone(), agent.to_owned(), redactor.names().to_vec(), metrics, shutdown);
        Self {
            on: Some(On {
                inspector: Arc::new(Inspector::new(settings.exchanges, bot)),
                recorders: Arc::new(recorders),
                redactor,
                body_bytes: settings.body_bytes,
            }),
        }
    }

    /// The admin listener's routes for the inspection list and recordings.
    pub fn routes(&self) -> Vec<(&'static str, Route)> {
        match &self.on {
            Some(on) => {
                vec![(EXCHANGES_PATH, on.inspector.clone().route()), (RECORD_PATH, on.recorders.clone().route())]
            }
            None => {
                let off: Route = Arc::new(|_| {
                    RouteAnswer::Refused(
                        StatusCode::FORBIDDEN,
                        "inspection is off: start the agent with inspect = true (--inspect)".into(),
                    )
                });
                vec![(EXCHANGES_PATH, off.clone()), (RECORD_PATH, off)]
            }
        }
    }

    /// Starts watching an exchange, when inspection is on.
    pub fn begin(&self, head: &ExchangeHead) -> Option<ExchangeWatch<'_>> {
        let on = self.on.as_ref()?;
        let unix_ms = unix_ms_now();
        let headers = on.redactor.headers(head.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        let call = head
            .affinity_key
            .clone()
            .or_else(|| headers.iter().find(|(n, _)| n == CORRELATION_HEADER).map(|(_, v)| v.clone()));
        let started = Instant::now();
        on.recorders.began(call.as_deref(), started);
        let request = Capture::new(on.body_bytes);
        if on.recorders.waiting_for_next() {
            let recorders = on.recorders.clone();
            let length = head
                .headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, value)| std::str::from_utf8(value).ok()?.trim().parse().ok());
            request.on_end(length, move |body| {
                // ACS events are JSON, so UTF-8: a body kept as base64 holds none.
                if let Some(text) = &body.text {
                    recorders.request_ended(text.as_bytes(), started);
                }
            });
        }
        let hook = Webhook {
            unix_ms,
            call,
            request_id: head.request_id,
            method: head.method.clone(),
            path: on.redactor.path(&head.path_and_query),
            headers,
            ..Webhook::default()
        };
        Some(ExchangeWatch { on, started, hook, request, response: Capture::new(on.body_bytes) })
    }
}

/// One exchange being watched.
#[derive(Debug)]
pub(crate) struct ExchangeWatch<'a> {
    on: &'a On,
    started: Instant,
    hook: Webhook,
    /// The request body as it streams to the bot.
    pub request: Capture,
    /// The response body as it streams to the edge.
    pub response: Capture,
}

/// What the bot answered, for [`ExchangeWatch::finish`].
#[derive(Debug, Default)]
pub(crate) struct Answer<'h> {
    /// Its status, when it answered.
    pub status: Option<u16>,
    /// Its headers, as they go on the wire.
    pub headers: Option<&'h [(String, Vec<u8>)]>,
    /// Why it did not answer.
    pub failure: Option<String>,
    /// When its head came.
    pub answered_at: Option<Instant>,
}

impl ExchangeWatch<'_> {
    fn fill(&mut self, answer: Answer<'_>) {
        let ms = |at: Instant| at.saturating_duration_since(self.started).as_secs_f64() * 1000.0;
        self.hook.status = answer.status;
        if let Some(headers) = answer.headers {
            self.hook.response_headers =
                self.on.redactor.headers(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        }
        self.hook.failure = answer.failure;
        self.hook.answer_ms = answer.answered_at.map_or(0.0, ms);
        self.hook.duration_ms = ms(Instant::now());
    }

    /// A webhook ended: it goes to the inspection list and to the recordings of its call.
    pub fn finish(mut self, answer: Answer<'_>) {
        self.fill(answer);
        self.hook.body = self.request.body();
        self.hook.response_body = self.response.body();
        // ACS events are JSON, so UTF-8: a body kept as base64 holds none.
        let found = self.hook.body.text.as_deref().map(|text| events(text.as_bytes())).unwrap_or_default();
        if self.hook.call.is_none() {
            self.hook.call = found.iter().find_map(|(_, call)| call.clone());
        }
        self.on.recorders.webhook(&self.hook, self.started, &found);
        self.on.inspector.push(self.hook);
    }

    /// A media upgrade was answered: it goes to the inspection list, and a session the bot
    /// accepted to the recordings of its call, which get its frames through the returned tap.
    pub fn upgraded(mut self, answer: Answer<'_>) -> Option<Arc<MediaTap>> {
        self.fill(answer);
        self.hook.websocket = true;
        let tap = match self.hook.status {
            Some(101) => {
                let open = MediaOpen {
                    at_ms: 0.0,
                    session: 0,
                    path: self.hook.path.clone(),
                    headers: self.hook.headers.clone(),
                    status: 101,
                    response_headers: self.hook.response_headers.clone(),
                };
                self.on.recorders.media(self.hook.call.as_deref(), &open, self.started)
            }
            _ => None,
        };
        self.on.inspector.push(self.hook);
        tap
    }
}
