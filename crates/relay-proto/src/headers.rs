//! Header rules shared by both hops: hop-by-hop removal and conversion to and from the wire form.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers as they cross the tunnel: lower-case name and raw value bytes, in order, duplicates kept.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// A header from the peer that is not a valid HTTP header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The name is not a valid header name.
    #[error("invalid header name {0:?}")]
    Name(String),
    /// The value contains bytes not allowed in a header value.
    #[error("invalid value for header {0:?}")]
    Value(String),
}

/// WebSocket handshake headers that belong to one hop (RFC 6455 §4): the key, version and
/// extensions each hop negotiates for itself, so neither the edge nor the agent passes them on.
pub const PER_HOP_WEBSOCKET: [&str; 3] = ["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"];

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1). The `Upgrade`
/// header is handled by [`strip_hop_by_hop`]'s caller for WebSocket upgrades.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers: the fixed list, every `Proxy-*` header, and every header named in
/// `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers.keys().filter(|name| name.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Converts a header map to its wire form, keeping order and duplicates.
pub fn to_wire(headers: &HeaderMap) -> HeaderList {
    headers.iter().map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())).collect()
}

/// Converts wire headers from the peer into a header map, rejecting invalid names and values.
pub fn from_wire(list: HeaderList) -> Result<HeaderMap, HeaderError> {
    let mut map = HeaderMap::with_capacity(list.len());
    for (name, value) in list {
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| HeaderError::Name(name.clone()))?;
        let header_value = HeaderValue::from_bytes(&value).map_err(|_| HeaderError::Value(name))?;
        map.append(header_name, header_value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-private", "1"),
            ("authorization", "Bearer t"),
            ("x-ms-call-correlation-id", "c1"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type", "x-ms-call-correlation-id"]);
    }

    #[test]
    fn wire_round_trip_keeps_order_and_duplicates() {
        let h = map(&[("x-a", "1"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]);
        let back = from_wire(to_wire(&h)).unwrap();
        let cookies: Vec<&[u8]> = back.get_all("set-cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [b"a=1".as_slice(), b"b=2".as_slice()]);
        assert_eq!(back.get("x-a").unwrap(), "1");
    }

    #[test]
    fn invalid_names_and_values_from_the_peer_are_errors() {
        assert!(matches!(from_wire(vec![("bad name".into(), b"v".to_vec())]), Err(HeaderError::Name(_))));
        assert!(matches!(from_wire(vec![("x".into(), b"a\nb".to_vec())]), Err(HeaderError::Value(_))));
    }
}
