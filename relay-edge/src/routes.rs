//! Which public paths the edge relays, and how. Anything not matched here is answered `404` at
//! the edge and never reaches an agent.

use http::Method;
use serde::Deserialize;

use crate::admission::AuthCheck;
use crate::affinity::AffinitySource;
use http::HeaderName;

/// How a route's path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// The path must be exactly this.
    Exact(String),
    /// The path must start with this (configured as `"/prefix/*"`; stored without the `*`).
    Prefix(String),
}

impl PathPattern {
    /// Parses `"/exact"` or `"/prefix/*"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("route path {text:?} must start with '/'"));
        }
        match text.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') => Ok(Self::Prefix(prefix.to_owned())),
            Some(_) => Err(format!("route path {text:?}: '*' is only allowed as a whole last segment (\"/prefix/*\")")),
            None if text.contains('*') => Err(format!("route path {text:?}: '*' is only allowed at the end")),
            None => Ok(Self::Exact(text.to_owned())),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }
}

/// A relayed route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The path as configured, for logs and metrics.
    pub name: String,
    /// How the path matches.
    pub pattern: PathPattern,
    /// Methods accepted (others get `405`). WebSocket routes accept `GET` upgrades only.
    pub methods: Vec<Method>,
    /// Whether this is a WebSocket (media) route.
    pub websocket: bool,
    /// Checks every request must pass (all of them), decided at the edge.
    pub auth: Vec<AuthCheck>,
    /// Where a call's correlation id is, to keep the call on one agent.
    pub affinity: Option<AffinitySource>,
}

/// A route as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `"/exact"` or `"/prefix/*"`.
    pub path: String,
    /// Accepted methods; default `["POST"]` for webhooks.
    #[serde(default)]
    pub methods: Vec<String>,
    /// A WebSocket route.
    #[serde(default)]
    pub websocket: bool,
    /// Checks every request must pass: `acs-jwt`, `event-grid`, `shared-secret`, `source-ip`.
    #[serde(default)]
    pub auth: Vec<AuthCheck>,
    /// Where the call's key is (one of `header`, `json_pointer`, `path_segment`); ACS's
    /// correlation id by default on the default paths, none elsewhere.
    pub affinity: Option<AffinityConfig>,
}

/// `affinity = { ... }` on a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityConfig {
    /// A request header.
    pub header: Option<String>,
    /// A JSON pointer into the body.
    pub json_pointer: Option<String>,
    /// A path segment, counted from 0.
    pub path_segment: Option<usize>,
}

impl AffinityConfig {
    fn build(&self, route: &str) -> Result<AffinitySource, String> {
        match (&self.header, &self.json_pointer, self.path_segment) {
            (Some(h), None, None) => HeaderName::from_bytes(h.as_bytes())
                .map(AffinitySource::Header)
                .map_err(|_| format!("route {route:?}: affinity header {h:?} is not a header name")),
            (None, Some(p), None) if p.starts_with('/') => Ok(AffinitySource::JsonPointer(p.clone())),
            (None, None, Some(n)) => Ok(AffinitySource::PathSegment(n)),
            _ => Err(format!(
                "route {route:?}: affinity needs exactly one of header, json_pointer (starting with '/'), path_segment"
            )),
        }
    }
}

/// ACS's correlation id where each default route carries it.
fn default_affinity(path: &str, websocket: bool) -> Option<AffinitySource> {
    if websocket {
        Some(AffinitySource::Header(HeaderName::from_static("x-ms-call-correlation-id")))
    } else if path == "/api/incomingCall" || path.starts_with("/api/callbacks/") {
        Some(AffinitySource::JsonPointer("/0/data/correlationId".into()))
    } else {
        None
    }
}

impl RouteConfig {
    /// Validates and converts to a [`Route`].
    pub fn build(&self) -> Result<Route, String> {
        let pattern = PathPattern::parse(&self.path)?;
        let methods = if self.websocket {
            if self.methods.iter().any(|m| !m.eq_ignore_ascii_case("GET")) {
                return Err(format!("route {:?}: a WebSocket route accepts GET only", self.path));
            }
            vec![Method::GET]
        } else if self.methods.is_empty() {
            vec![Method::POST]
        } else {
            self.methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("route {:?}: invalid method {m:?}", self.path))
                })
                .collect::<Result<_, _>>()?
        };
        let affinity = match &self.affinity {
            Some(cfg) => Some(cfg.build(&self.path)?),
            None => default_affinity(&self.path, self.websocket),
        };
        Ok(Route {
            name: self.path.clone(),
            pattern,
            methods,
            websocket: self.websocket,
            auth: self.auth.clone(),
            affinity,
        })
    }
}

/// The three ACS endpoints: Event Grid's IncomingCall, Call Automation callbacks, media. They
/// carry no checks: configuration adds them.
pub fn default_routes() -> Vec<Route> {
    let route = |path: &str, pattern: PathPattern, websocket: bool| Route {
        name: path.to_owned(),
        pattern,
        methods: vec![if websocket { Method::GET } else { Method::POST }],
        websocket,
        auth: Vec::new(),
        affinity: default_affinity(path, websocket),
    };
    vec![
        route("/api/incomingCall", PathPattern::Exact("/api/incomingCall".into()), false),
        route("/api/callbacks/*", PathPattern::Prefix("/api/callbacks/".into()), false),
        route("/ws", PathPattern::Exact("/ws".into()), true),
    ]
}

/// The first route whose pattern matches `path`.
pub fn find<'a>(routes: &'a [Route], path: &str) -> Option<&'a Route> {
    routes.iter().find(|route| route.pattern.matches(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_the_acs_endpoints_only() {
        let routes = default_routes();
        assert_eq!(find(&routes, "/api/incomingCall").unwrap().name, "/api/incomingCall");
        assert_eq!(find(&routes, "/api/callbacks/abc/def").unwrap().name, "/api/callbacks/*");
        assert!(find(&routes, "/ws").unwrap().websocket);
        for other in ["/", "/api/incomingCall/x", "/api/callbacks", "/wsx", "/admin"] {
            assert!(find(&routes, other).is_none(), "{other}");
        }
    }

    #[test]
    fn route_patterns_reject_misplaced_wildcards() {
        assert!(PathPattern::parse("api").is_err());
        assert!(PathPattern::parse("/a*").is_err());
        assert!(PathPattern::parse("/a/*/b").is_err());
        assert_eq!(PathPattern::parse("/a/*").unwrap(), PathPattern::Prefix("/a/".into()));
    }
}
