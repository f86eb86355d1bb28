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

/// Whether `ip` is an address provider calls may not reach: loopback, private, shared
/// (carrier-grade NAT), link-local (cloud metadata among them), unspecified, broadcast,
/// multicast, documentation or unique-local, also when written as an IPv4-mapped IPv6 address.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unique_local()
                    || v6.is_unicast_link_local()
            }
        },
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

/// A resolver that keeps only the addresses provider calls may reach, and fails a name that
/// has none.
#[derive(Debug, Default)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found.iter().copied().filter(|a| !forbidden(a.ip())).collect();
            if public.is_empty() {
                let reason = format!(
                    "{host} resolves only to private, loopback or link-local addresses, which provider calls may not reach"
                );
                return Err(reason.into());
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
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.113.131.1", "8.8.8.8", "100.128.0.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"] {
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
        assert!(error.to_string().contains("may not reach"), "{error}");
    }
}
