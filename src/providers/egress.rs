//! Which addresses provider calls may reach. A provider endpoint is configured through the
//! API by whoever holds `invoice:config:write` for a merchant, and the worker then POSTs
//! invoices (and logs in with the stored credentials) there: pointed at loopback, a private
//! network or the cloud metadata address, that is a request forgery from inside the cluster.
//! Unless private networks are allowed (development, the simulator, a provider gateway inside
//! the network), calls reach public addresses only: IP literals are checked before any
//! request, and names are checked after resolution, by the client's resolver, so a name that
//! changes its answer between the check and the connection (DNS rebinding) gains nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// IPv4 ranges provider calls may not reach (IANA special-purpose registry and the like):
/// "this network", private, shared (carrier-grade NAT), loopback, link-local (the cloud
/// metadata address among them), IETF protocol assignments, documentation, 6to4 relay,
/// benchmarking, reserved (some clusters number pods there), multicast and broadcast.
const FORBIDDEN_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 ranges refused outright: unspecified and loopback, local-use NAT64, Teredo,
/// documentation, site-local, unique-local, link-local and multicast. The ranges that embed
/// an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by that address instead.
const FORBIDDEN_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "64:ff9b:1::/48",
    "2001::/32",
    "2001:db8::/32",
    "fec0::/10",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// The ranges, parsed once.
static FORBIDDEN: std::sync::LazyLock<Vec<ipnet::IpNet>> = std::sync::LazyLock::new(|| {
    FORBIDDEN_V4.iter().chain(FORBIDDEN_V6).filter_map(|range| range.parse().ok()).collect()
});

/// The IPv4 address an IPv6 address carries, for the forms that route to it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:AABB:CCDD::/48`).
fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let low =
        |hi: u16, lo: u16| std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

/// Whether `ip` is an address provider calls may not reach: anything but a public unicast
/// address, also when an IPv6 address routes to a forbidden IPv4 one.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => FORBIDDEN.iter().any(|net| net.contains(&ip)),
        },
        IpAddr::V4(_) => FORBIDDEN.iter().any(|net| net.contains(&ip)),
    }
}

/// Why an endpoint's host may not be called, if it is an IP literal that [`forbidden`] names.
/// Names are left to [`PublicOnly`], at connection time.
pub fn literal_refused(endpoint: &str) -> Option<String> {
    let url = reqwest::Url::parse(endpoint).ok()?;
    let host = url.host_str()?;
    if host.eq_ignore_ascii_case("localhost") {
        return Some("the provider endpoint is this machine (localhost)".into());
    }
    // IPv6 literals come bracketed; anything that does not parse is a name.
    let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    forbidden(ip)
        .then(|| format!("the provider endpoint is a private, loopback or link-local address ({ip})"))
}

/// A name that resolves to no address provider calls may reach.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to private, loopback or link-local addresses, which provider calls may not reach")]
pub struct Refused(pub String);

/// Whether `error` (a client error) comes from [`PublicOnly`] refusing a name.
pub fn refused_name(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused.to_string());
        }
        source = e.source();
    }
    None
}

/// A resolver that keeps only the addresses provider calls may reach, and fails a name that
/// has none.
#[derive(Debug, Default)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let public: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| !forbidden(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(Refused(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The resolver for a client, given whether private networks are allowed.
pub fn resolver(allow_private: bool) -> Option<Arc<PublicOnly>> {
    (!allow_private).then(|| Arc::new(PublicOnly))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_mapped_addresses_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.1.2.3",
            "198.18.0.1",
            "192.0.0.8",
            "192.88.99.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "2001:db8::1",
            "2001::1",
            "64:ff9b:1::1",
            "ff02::1",
            // IPv6 forms that route to a forbidden IPv4 address: mapped, compatible, NAT64, 6to4.
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::a9fe:a9fe",
            "64:ff9b::a00:1",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "203.113.131.1",
            "8.8.8.8",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!forbidden(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn literal_endpoints_are_checked_and_names_left_to_the_resolver() {
        assert!(literal_refused("http://127.0.0.1:31150/api").is_some());
        assert!(literal_refused("https://[::1]/api").is_some());
        assert!(literal_refused("https://169.254.169.254/latest").is_some());
        assert!(literal_refused("https://LOCALHOST/api").is_some());
        assert!(literal_refused("https://api-vinvoice.viettel.vn/services/einvoiceapplication/api").is_none());
        assert!(literal_refused("https://203.113.131.1/api").is_none());
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_with_only_private_addresses() {
        use reqwest::dns::Resolve as _;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let error = PublicOnly.resolve(name).await.err().expect("refused");
        assert!(refused_name(error.as_ref()).is_some_and(|r| r.contains("may not reach")), "{error}");
    }
}
