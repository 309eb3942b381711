//! `source-ip`: who the client is (believing `X-Forwarded-For` only from trusted proxies) and
//! whether it is in the allow-list, built from CIDRs and Azure Service Tags files.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;
use serde::Deserialize;

/// An allow-list of networks.
#[derive(Debug, Clone, Default)]
pub struct SourceIpSet {
    nets: Vec<IpNet>,
}

impl SourceIpSet {
    /// A set of networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    /// Whether `ip` is in any network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// How many networks the set holds.
    pub fn len(&self) -> usize {
        self.nets.len()
    }

    /// Whether the set is empty (refuses everyone).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

#[derive(Deserialize)]
struct ServiceTags {
    values: Vec<ServiceTag>,
}

#[derive(Deserialize)]
struct ServiceTag {
    name: String,
    properties: ServiceTagProperties,
}

#[derive(Deserialize)]
struct ServiceTagProperties {
    #[serde(rename = "addressPrefixes")]
    address_prefixes: Vec<String>,
}

/// The networks of the named tags in an Azure Service Tags JSON document
/// (`values[].name`, `values[].properties.addressPrefixes`). Every named tag must be present.
pub fn service_tag_networks(json: &str, tags: &[String]) -> Result<Vec<IpNet>, String> {
    let doc: ServiceTags = serde_json::from_str(json).map_err(|e| format!("not a Service Tags document: {e}"))?;
    let mut nets = Vec::new();
    for tag in tags {
        let found =
            doc.values.iter().find(|v| &v.name == tag).ok_or_else(|| format!("no service tag named {tag:?}"))?;
        for prefix in &found.properties.address_prefixes {
            nets.push(prefix.parse::<IpNet>().map_err(|e| format!("tag {tag:?}: {prefix:?}: {e}"))?);
        }
    }
    Ok(nets)
}

fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.trim_start_matches('[').split(']').next().and_then(|ip| ip.parse().ok()))
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address: the peer itself, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not a trusted proxy (entries left of it could be forged by the
/// client). `None` when that entry is not an address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    if !is_trusted(peer, trusted) {
        return Some(peer);
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|e| !e.trim().is_empty())
        .collect();
    for entry in entries.iter().rev() {
        match parse_forwarded_entry(entry) {
            Some(ip) if is_trusted(ip, trusted) => continue,
            other => return other,
        }
    }
    // Every hop was a trusted proxy: the left-most one is the client as far as we can tell.
    entries.first().and_then(|e| parse_forwarded_entry(e)).or(Some(peer))
}

/// Whether the peer is a trusted proxy (so its `X-Forwarded-Proto` is believed).
pub fn peer_is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    is_trusted(peer, trusted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let peer: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(client_ip(peer, &xff("52.112.0.1"), &nets(&["10.0.0.0/8"])), Some(peer));
    }

    #[test]
    fn the_right_most_untrusted_entry_is_the_client_behind_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        // The client forged the first entry; the ingress appended the real one.
        let got = client_ip(peer, &xff("52.112.9.9, 198.51.100.7, 10.2.2.2"), &trusted);
        assert_eq!(got, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), Some(peer));
        assert_eq!(client_ip(peer, &xff("[2603:1063::1]:443"), &trusted), Some("2603:1063::1".parse().unwrap()));
        assert_eq!(client_ip(peer, &xff("garbage"), &trusted), None);
    }

    #[test]
    fn the_allow_list_matches_ipv4_ipv6_and_mapped_addresses() {
        let set = SourceIpSet::new(nets(&["52.112.0.0/14", "2603:1063::/38"]));
        assert!(set.contains("52.113.1.1".parse().unwrap()));
        assert!(set.contains("::ffff:52.112.0.9".parse().unwrap()));
        assert!(set.contains("2603:1063:0:1::5".parse().unwrap()));
        assert!(!set.contains("52.116.0.1".parse().unwrap()));
        assert!(!set.contains("2603:1064::1".parse().unwrap()));
    }

    #[test]
    fn service_tags_are_read_by_name() {
        let json = r#"{"changeNumber": 1, "values": [
            {"name": "AzureCommunicationServices", "id": "x", "properties": {"addressPrefixes": ["52.112.0.0/14", "2603:1063::/38"], "region": ""}},
            {"name": "Other", "properties": {"addressPrefixes": ["1.2.3.0/24"]}}
        ]}"#;
        let got = service_tag_networks(json, &["AzureCommunicationServices".into()]).unwrap();
        assert_eq!(got, nets(&["52.112.0.0/14", "2603:1063::/38"]));
        assert!(service_tag_networks(json, &["Missing".into()]).unwrap_err().contains("Missing"));
        assert!(service_tag_networks("{}", &["x".into()]).is_err());
    }
}
