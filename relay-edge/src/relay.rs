//! What relaying an exchange needs from the edge, and the steps webhooks and WebSockets share:
//! the call key to pin by, the agent and stream to use, and the head that goes down the stream.
//! [`crate::forward`] relays webhooks and [`crate::websocket`] media sessions on top of this;
//! neither sees the public listener.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Request, Response, header};
use relay_proto::headers::{strip_hop_by_hop, to_wire};
use relay_proto::{ExchangeHead, ExchangeKind};
use relay_transport::BiStream;
use relay_tunnel::body::RelayBody;
use relay_tunnel::exchange::EdgeAnswer;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::admission::source_ip::peer_is_trusted;
use crate::affinity::AffinityTable;
use crate::agents::{AgentSet, InFlight, NoAgent};
use crate::answer;
use crate::config::EdgeSettings;
use crate::metrics::EdgeMetrics;

/// What a relayed exchange uses: the settings, the agents and the calls pinned to them, the
/// metrics, and the task set that outlives a request (media sessions run on after their 101).
pub(crate) struct Relay {
    pub settings: Arc<EdgeSettings>,
    pub agents: Arc<AgentSet>,
    /// Calls pinned to agents.
    pub affinity: Arc<AffinityTable>,
    pub metrics: Arc<EdgeMetrics>,
    pub tasks: TaskTracker,
    /// Media sessions open now, for the live call list.
    pub calls: Arc<crate::calls::OpenCalls>,
}

impl Relay {
    /// `503` with the configured `Retry-After`.
    pub(crate) fn unavailable(&self, text: &str) -> Response<RelayBody> {
        answer::unavailable(text, self.settings.retry_after)
    }

    /// The response for an answer the tunnel protocol decided.
    pub(crate) fn protocol_answer(&self, answer: EdgeAnswer) -> Response<RelayBody> {
        answer::from_protocol(answer, self.settings.retry_after)
    }

    /// The call key to pin an exchange by: `found` if it looks like an ACS correlation id
    /// ([`crate::affinity::is_pinnable`]); anything else is counted and the exchange goes without
    /// a pin, so a client cannot make the edge store keys of its choosing.
    pub(crate) fn call_key(&self, route: &str, found: Option<String>) -> Option<String> {
        let key = found?;
        if crate::affinity::is_pinnable(&key) {
            return Some(key);
        }
        self.metrics.affinity_keys_refused.inc();
        debug!(route, key_len = key.len(), "call key not pinned: not an ACS correlation id");
        None
    }

    /// Picks an agent (the call's pinned one when `key` names a call) and opens a stream to it,
    /// or says why not (as the `503` to send).
    pub(crate) async fn open_exchange(
        &self,
        route: &str,
        key: Option<&str>,
    ) -> Result<(InFlight, BiStream), &'static str> {
        // Two tries: an agent whose connection just died is removed when its session notices;
        // the second pick then finds another agent if there is one.
        for _ in 0..2 {
            let limit = self.settings.max_exchanges_per_agent;
            let chosen = match key {
                None => self.agents.pick(limit),
                Some(key) => self.affinity.choose(key, &self.agents, limit, std::time::Instant::now()).map(|pinned| {
                    if let Some(gone) = pinned.moved_from {
                        self.metrics.affinity_moves.inc();
                        warn!(call = %key, from_agent_connection = gone, to = %pinned.agent.name, "call moved: its agent is gone");
                    }
                    pinned.agent
                }),
            };
            let agent = match chosen {
                Ok(agent) => agent,
                Err(NoAgent::NoneConnected) => return Err("no agent connected"),
                Err(NoAgent::AtCapacity) => {
                    self.metrics.rejection(route, "limit", "agent-capacity");
                    return Err("agents at capacity");
                }
            };
            let in_flight = agent.begin_exchange();
            match tokio::time::timeout(self.settings.open_stream_timeout, agent.conn.open_bi()).await {
                Ok(Ok(stream)) => return Ok((in_flight, stream)),
                Ok(Err(e)) => {
                    warn!(agent = %agent.name, "cannot open an exchange stream: {e}");
                    self.agents.remove(agent.id);
                }
                Err(_) => return Err("agent busy: no stream slot free"),
            }
        }
        Err("no agent reachable")
    }

    /// The head frame for an exchange of `kind` from `peer`: the request's method and target,
    /// its headers as they leave the edge ([`forwarded_headers`]) less `drop`, and the call key.
    pub(crate) fn exchange_head<B>(
        &self,
        req: &Request<B>,
        kind: ExchangeKind,
        peer: SocketAddr,
        request_id: u64,
        drop: &[&str],
        affinity_key: Option<String>,
    ) -> ExchangeHead {
        let mut headers = forwarded_headers(req.headers(), peer, &self.settings.admission.trusted_proxies);
        for name in drop {
            headers.remove(*name);
        }
        ExchangeHead {
            request_id,
            kind,
            method: req.method().as_str().to_owned(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
            headers: to_wire(&headers),
            client_addr: peer.to_string(),
            affinity_key,
        }
    }
}

/// Headers a client may use to claim where a request came from. From a peer that is not a
/// trusted proxy they are dropped (the `X-Forwarded-*` three are then rewritten from what the edge
/// itself saw), so a bot that believes them believes only the edge.
const CLIENT_ORIGIN_HEADERS: [&str; 4] = ["forwarded", "x-real-ip", "true-client-ip", "x-forwarded-port"];

/// Request headers as they leave the edge: hop-by-hop removed, `Host` replaced by
/// `X-Forwarded-Host`, and `X-Forwarded-For`/`-Proto` describing the client.
///
/// From a trusted proxy (`trusted_proxies`): its `X-Forwarded-For` is kept and the proxy's
/// address appended, and its `X-Forwarded-Proto` and `-Host` are kept (the ingress terminated TLS
/// for that host), as are `Forwarded` and the like. From anyone else: `X-Forwarded-For` is
/// replaced by the peer's address, `-Proto` by `http`, `-Host` by the `Host` header, and
/// `Forwarded`, `X-Real-IP`, `True-Client-IP` and `X-Forwarded-Port` are dropped.
pub(crate) fn forwarded_headers(original: &HeaderMap, peer: SocketAddr, trusted: &[ipnet::IpNet]) -> HeaderMap {
    let mut headers = original.clone();
    strip_hop_by_hop(&mut headers);
    let from_proxy = peer_is_trusted(peer.ip(), trusted);
    let proto = headers.remove("x-forwarded-proto").filter(|_| from_proxy);
    let forwarded_host = headers.remove("x-forwarded-host").filter(|_| from_proxy);
    let host = forwarded_host.or(headers.remove(header::HOST));
    let peer_ip = peer.ip().to_string();
    let claimed: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    let xff = if from_proxy && !claimed.is_empty() { format!("{}, {peer_ip}", claimed.join(", ")) } else { peer_ip };
    if !from_proxy {
        for name in CLIENT_ORIGIN_HEADERS {
            headers.remove(name);
        }
    }
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", proto.unwrap_or(HeaderValue::from_static("http")));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
    headers
}
