//! The edge's Prometheus metrics, served as text on the admin listener (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `relay_edge_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route as configured, or `unmatched`.
    pub route: String,
    /// The status answered.
    pub status: u16,
}

/// Labels of `relay_edge_rejections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// The route, or `unmatched`.
    pub route: String,
    /// The check or limit (`acs-jwt`, `source-ip`, `limit`, ...).
    pub check: String,
    /// The fixed reason class (`missing`, `expired`, `body-size`, ...).
    pub reason: String,
}

/// Labels of the per-transport agent gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `quic` or `tcp`.
    pub transport: String,
}

/// Labels of `relay_edge_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` (client to bot) or `out` (bot to client).
    pub direction: &'static str,
}

/// Labels of the duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route as configured.
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms to ~65 s: webhooks take milliseconds, media sessions last minutes (the top bucket
    // then only says "long"; the session log line has the exact duration).
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Labels of `relay_edge_media_calls_ended_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    /// How the call's media session ended (`closed`, `caller-lost`, `bot-lost`, `idle`, ...).
    pub end: &'static str,
}

type DirectionHistograms = Family<DirectionLabels, Histogram, fn() -> Histogram>;

fn gap_histogram() -> Histogram {
    // 10 ms to ~20 s: a steady call's longest gap and jitter sit at 20 ms and below; a pause or
    // an outage shows where it falls.
    Histogram::new(exponential_buckets(0.01, 2.0, 12))
}

/// Per-call media quality, aggregated without a per-call label (the session's log line and the
/// live call list have each call's own figures). Direction `in` is the caller's audio towards
/// the bot, `out` the bot's towards the caller.
#[derive(Debug)]
pub struct MediaMetrics {
    /// Media frames relayed, counted when their call ends.
    pub frames: Family<DirectionLabels, Counter>,
    /// Gaps between frames over `media_glitch_gap`.
    pub glitches: Family<DirectionLabels, Counter>,
    /// Each finished call's longest gap between frames.
    pub longest_gap: DirectionHistograms,
    /// Each finished call's interarrival jitter against the 20 ms frame interval.
    pub jitter: DirectionHistograms,
    /// From the upgrade to the caller's first frame.
    pub first_frame: Histogram,
    /// Finished media sessions, by how they ended.
    pub ended: Family<EndLabels, Counter>,
}

impl MediaMetrics {
    fn new() -> Self {
        Self {
            frames: Family::default(),
            glitches: Family::default(),
            longest_gap: Family::new_with_constructor(gap_histogram),
            jitter: Family::new_with_constructor(gap_histogram),
            first_frame: duration_histogram(),
            ended: Family::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "relay_edge_media_frames",
            "Media frames relayed by finished calls, by direction",
            self.frames.clone(),
        );
        registry.register(
            "relay_edge_media_glitches",
            "Gaps between media frames longer than media_glitch_gap, by direction",
            self.glitches.clone(),
        );
        registry.register(
            "relay_edge_media_longest_gap_seconds",
            "Each finished call's longest gap between media frames, by direction",
            self.longest_gap.clone(),
        );
        registry.register(
            "relay_edge_media_jitter_seconds",
            "Each finished call's interarrival jitter against ACS's 20 ms frame interval, by direction",
            self.jitter.clone(),
        );
        registry.register(
            "relay_edge_media_first_frame_seconds",
            "Time from a media upgrade to the caller's first frame",
            self.first_frame.clone(),
        );
        registry.register(
            "relay_edge_media_calls_ended",
            "Finished media sessions, by how they ended",
            self.ended.clone(),
        );
    }

    /// Counts one finished call's media.
    pub fn call_ended(&self, quality: &relay_tunnel::quality::Quality, end: &'static str) {
        self.ended.get_or_create(&EndLabels { end }).inc();
        for (direction, flow) in [("in", &quality.from_socket), ("out", &quality.to_socket)] {
            let labels = DirectionLabels { direction };
            self.frames.get_or_create(&labels).inc_by(flow.frames);
            self.glitches.get_or_create(&labels).inc_by(flow.glitches);
            if flow.frames > 1 {
                self.longest_gap.get_or_create(&labels).observe(flow.longest_gap_ms / 1000.0);
                self.jitter.get_or_create(&labels).observe(flow.jitter_ms / 1000.0);
            }
        }
        if let Some(first) = quality.from_socket.first_frame_ms {
            self.first_frame.observe(first / 1000.0);
        }
    }
}

/// Every metric the edge keeps.
#[derive(Debug)]
pub struct EdgeMetrics {
    registry: Registry,
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests refused at the edge, by route, check and reason.
    pub rejections: Family<RejectionLabels, Counter>,
    /// Media WebSocket sessions open now.
    pub websocket_sessions: Gauge,
    /// Agent connections now, by transport.
    pub agents_connected: Family<TransportLabels, Gauge>,
    /// HTTP body bytes relayed, by direction.
    pub bytes: Family<DirectionLabels, Counter>,
    /// Exchange durations (webhooks: until the response body ends; media: the session).
    pub exchange_duration: HistogramFamily,
    /// Calls moved to another agent because theirs went away.
    pub affinity_moves: Counter,
    /// Media WebSockets closed by the edge because nothing passed for `ws_idle_timeout`.
    pub websocket_idle_closes: Counter,
    /// Call keys found but not pinned because they do not look like an ACS correlation id.
    pub affinity_keys_refused: Counter,
    /// Per-call media quality.
    pub media: MediaMetrics,
    /// Tunnel handshakes refused (not TLS, no or a bad certificate, unknown protocol, timeout).
    pub tunnel_handshakes_refused: Counter,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let rejections = Family::<RejectionLabels, Counter>::default();
        let websocket_sessions = Gauge::default();
        let agents_connected = Family::<TransportLabels, Gauge>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();
        let exchange_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let affinity_moves = Counter::default();
        let websocket_idle_closes = Counter::default();
        let affinity_keys_refused = Counter::default();
        let tunnel_handshakes_refused = Counter::default();
        let media = MediaMetrics::new();
        media.register(&mut registry);
        registry.register(
            "relay_edge_tunnel_handshakes_refused",
            "Tunnel handshakes refused: not TLS, a missing, bad or expired certificate, a timeout",
            tunnel_handshakes_refused.clone(),
        );
        registry.register(
            "relay_edge_affinity_keys_refused",
            "Call keys not pinned because they do not look like an ACS correlation id",
            affinity_keys_refused.clone(),
        );
        registry.register(
            "relay_edge_websocket_idle_closes",
            "Media WebSockets closed because nothing passed either way for ws_idle_timeout",
            websocket_idle_closes.clone(),
        );
        registry.register(
            "relay_edge_affinity_moves",
            "Calls moved to another agent because theirs went away",
            affinity_moves.clone(),
        );
        registry.register("relay_edge_requests", "Requests answered, by route and status", requests.clone());
        registry.register(
            "relay_edge_rejections",
            "Requests refused at the edge, by route, check and reason",
            rejections.clone(),
        );
        registry.register(
            "relay_edge_websocket_sessions",
            "Media WebSocket sessions open now",
            websocket_sessions.clone(),
        );
        registry.register(
            "relay_edge_agents_connected",
            "Agent connections now, by transport",
            agents_connected.clone(),
        );
        registry.register("relay_edge_bytes", "HTTP body bytes relayed, by direction", bytes.clone());
        registry.register(
            "relay_edge_exchange_duration_seconds",
            "Exchange durations by route (webhook until its response ends; media: the session)",
            exchange_duration.clone(),
        );
        Self {
            registry,
            requests,
            rejections,
            websocket_sessions,
            agents_connected,
            bytes,
            exchange_duration,
            affinity_moves,
            websocket_idle_closes,
            affinity_keys_refused,
            tunnel_handshakes_refused,
            media,
        }
    }
}

impl EdgeMetrics {
    /// Counts a request answered on `route` with `status`.
    pub fn request(&self, route: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route: route.to_owned(), status }).inc();
    }

    /// Counts a refusal.
    pub fn rejection(&self, route: &str, check: &str, reason: &str) {
        self.rejections
            .get_or_create(&RejectionLabels {
                route: route.to_owned(),
                check: check.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
