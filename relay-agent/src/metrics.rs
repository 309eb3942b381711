//! The agent's Prometheus metrics, served on its own admin listener (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `relay_agent_exchanges_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// `http` or `websocket`.
    pub kind: &'static str,
    /// The bot's status class (`2xx` ... `5xx`, `101`), or why the bot was not reached
    /// (`bot-unreachable`, `bot-timeout`, `malformed`).
    pub outcome: String,
}

/// Labels with an outcome only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened.
    pub outcome: &'static str,
}

/// Labels with a media direction only: `to_bot` (the caller's audio, as it reaches the bot) or
/// `from_bot` (the bot's, as the bot sends it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Which way.
    pub direction: &'static str,
}

/// Labels with a tunnel transport only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `quic` or `tcp`.
    pub transport: &'static str,
}

/// Labels with an exchange kind only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `http` or `websocket`.
    pub kind: &'static str,
}

type HistogramFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms to ~65 s, as on the edge.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric the agent keeps.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    /// Exchanges forwarded, by kind and outcome.
    pub exchanges: Family<ExchangeLabels, Counter>,
    /// Media sessions open to the bot now.
    pub websocket_sessions: Gauge,
    /// Welcomed tunnel connections open now (one per edge replica), by transport.
    pub connected: Family<TransportLabels, Gauge>,
    /// Tunnel connections that ended or could not be made.
    pub reconnects: Counter,
    /// Certificate renewals by outcome (`issued`, `refused`, `interrupted`).
    pub renewals: Family<OutcomeLabels, Counter>,
    /// Exchange durations at the agent, by kind.
    pub exchange_duration: HistogramFamily,
    /// Edge instances (replicas) this agent holds a connection to now.
    pub edge_instances: Gauge,
    /// Extra dials of an edge address looking for replicas behind it, by what they found
    /// (`new`, `known`).
    pub replica_probes: Family<OutcomeLabels, Counter>,
    /// Call recordings running now.
    pub recordings: Gauge,
    /// Recording lines (media frames, mostly) left out because a reader fell behind.
    pub recording_lines_dropped: Counter,
    /// Media frames between the agent and the bot, counted when their call ends.
    pub media_frames: Family<DirectionLabels, Counter>,
    /// Gaps between media frames longer than `media_glitch_gap`, as the agent sees them next to
    /// the bot: `from_bot` ones are the bot's own; the edge's `out` glitches beyond them come
    /// from the path between.
    pub media_glitches: Family<DirectionLabels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let exchanges = Family::<ExchangeLabels, Counter>::default();
        let websocket_sessions = Gauge::default();
        let connected = Family::<TransportLabels, Gauge>::default();
        for transport in ["quic", "tcp"] {
            let _ = connected.get_or_create(&TransportLabels { transport });
        }
        let reconnects = Counter::default();
        let renewals = Family::<OutcomeLabels, Counter>::default();
        let exchange_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "relay_agent_exchanges",
            "Exchanges forwarded to the bot, by kind and outcome",
            exchanges.clone(),
        );
        registry.register(
            "relay_agent_websocket_sessions",
            "Media sessions open to the bot now",
            websocket_sessions.clone(),
        );
        registry.register(
            "relay_agent_connected",
            "Tunnel connections to edge replicas that are up now, by transport",
            connected.clone(),
        );
        registry.register(
            "relay_agent_reconnects",
            "Tunnel connections that ended or could not be made",
            reconnects.clone(),
        );
        registry.register("relay_agent_renewals", "Certificate renewals by outcome", renewals.clone());
        registry.register(
            "relay_agent_exchange_duration_seconds",
            "Exchange durations at the agent, by kind",
            exchange_duration.clone(),
        );
        let edge_instances = Gauge::default();
        let replica_probes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "relay_agent_edge_instances",
            "Edge instances (replicas) this agent holds a connection to now",
            edge_instances.clone(),
        );
        registry.register(
            "relay_agent_replica_probes",
            "Connections made to find edge replicas behind one address, by whether they found a new one",
            replica_probes.clone(),
        );
        let recordings = Gauge::default();
        let recording_lines_dropped = Counter::default();
        registry.register("relay_agent_recordings", "Call recordings running now", recordings.clone());
        registry.register(
            "relay_agent_recording_lines_dropped",
            "Recording lines left out because the recording's reader fell behind",
            recording_lines_dropped.clone(),
        );
        let media_frames = Family::<DirectionLabels, Counter>::default();
        let media_glitches = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "relay_agent_media_frames",
            "Media frames between the agent and the bot by finished calls, by direction (to_bot, from_bot)",
            media_frames.clone(),
        );
        registry.register(
            "relay_agent_media_glitches",
            "Gaps between media frames longer than media_glitch_gap next to the bot, by direction",
            media_glitches.clone(),
        );
        Self {
            registry,
            media_frames,
            media_glitches,
            recordings,
            recording_lines_dropped,
            exchanges,
            websocket_sessions,
            connected,
            reconnects,
            renewals,
            exchange_duration,
            edge_instances,
            replica_probes,
        }
    }
}

impl AgentMetrics {
    /// Counts a finished exchange.
    pub fn exchange(&self, kind: &'static str, outcome: impl Into<String>, seconds: f64) {
        self.exchanges.get_or_create(&ExchangeLabels { kind, outcome: outcome.into() }).inc();
        self.exchange_duration.get_or_create(&KindLabels { kind }).observe(seconds);
    }

    /// Counts a finished media session's frames and glitches each way.
    pub fn media(&self, quality: &relay_tunnel::quality::Quality) {
        for (direction, flow) in [("to_bot", &quality.to_socket), ("from_bot", &quality.from_socket)] {
            let labels = DirectionLabels { direction };
            self.media_frames.get_or_create(&labels).inc_by(flow.frames);
            self.media_glitches.get_or_create(&labels).inc_by(flow.glitches);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `2xx`-style class of a status code.
pub fn status_class(status: u16) -> String {
    if status == 101 { "101".into() } else { format!("{}xx", status / 100) }
}
