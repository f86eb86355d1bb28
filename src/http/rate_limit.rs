//! Anti-automation for claim tokens (ASVS 2.4.1): a client whose lookups keep failing
//! (unknown tokens) is refused with 429 for the rest of the window. Tokens carry 256 bits,
//! so guessing is hopeless anyway; this keeps scanners from costing database reads.
//!
//! Per process, in memory: with several API replicas a client gets a budget per replica,
//! which still bounds guessing to a tiny rate.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts failures per client in fixed windows.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    clients: Mutex<Clients>,
}

#[derive(Debug)]
struct Clients {
    counts: HashMap<IpAddr, (Instant, u32)>,
    last_purge: Option<Instant>,
}

/// Most clients tracked. A full table drops its expired windows at most once a second
/// (a scan per request would let a crowd of addresses make every failure cost 100,000 steps);
/// while it is still full, new clients go untracked: memory stays bounded, and guessing
/// 256-bit tokens stays hopeless without the limit.
const MAX_CLIENTS: usize = 100_000;
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// The unit a client is counted in: an IPv4 address (also when written IPv4-mapped), or an
/// IPv6 /64, the smallest block a subscriber is given: keyed by address, one host holding
/// a /64 would have 2^64 fresh budgets.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

impl FailureLimiter {
    /// At most `max_failures` per `window` per client.
    pub fn new(max_failures: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            max_failures,
            window,
            clients: Mutex::new(Clients { counts: HashMap::new(), last_purge: None }),
        }
    }

    /// `Some(retry after)` if the client used up its failures in the current window.
    pub fn blocked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (start, failures) = clients.counts.get(&client_key(client))?;
        let ends = *start + self.window;
        (now < ends && *failures >= self.max_failures).then(|| ends - now)
    }

    /// Records a failure of `client`.
    pub fn failed(&self, client: IpAddr, now: Instant) {
        let key = client_key(client);
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if clients.counts.len() >= MAX_CLIENTS && !clients.counts.contains_key(&key) {
            let due = clients.last_purge.is_none_or(|last| now >= last + PURGE_EVERY);
            if due {
                let window = self.window;
                clients.counts.retain(|_, (start, _)| now < *start + window);
                clients.last_purge = Some(now);
            }
            if clients.counts.len() >= MAX_CLIENTS {
                return;
            }
        }
        let entry = clients.counts.entry(key).or_insert((now, 0));
        if now >= entry.0 + self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// How many clients are tracked.
    pub fn tracked(&self) -> usize {
        self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_blocked_after_its_failures_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60));
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.blocked(client, t0), None);
            limiter.failed(client, t0);
        }
        assert_eq!(limiter.blocked(client, t0 + Duration::from_secs(10)), Some(Duration::from_secs(50)));
        assert_eq!(limiter.blocked(other, t0), None);
        assert_eq!(limiter.blocked(client, t0 + Duration::from_secs(60)), None);
        limiter.failed(client, t0 + Duration::from_secs(61));
        assert_eq!(limiter.blocked(client, t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_a_mapped_ipv4_address_is_the_address() {
        let limiter = FailureLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        limiter.failed("2001:db8:1:2::1".parse().unwrap(), t0);
        limiter.failed("2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap(), t0);
        assert!(limiter.blocked("2001:db8:1:2:abcd::9".parse().unwrap(), t0).is_some());
        assert_eq!(limiter.blocked("2001:db8:1:3::1".parse().unwrap(), t0), None);

        limiter.failed("::ffff:192.0.2.7".parse().unwrap(), t0);
        limiter.failed("192.0.2.7".parse().unwrap(), t0);
        assert!(limiter.blocked("192.0.2.7".parse().unwrap(), t0).is_some());
        assert_eq!(limiter.blocked("192.0.2.8".parse().unwrap(), t0), None);
    }

    #[test]
    fn the_table_stays_bounded_and_makes_room_from_expired_windows() {
        let limiter = FailureLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let v4 = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..MAX_CLIENTS as u32 + 10 {
            limiter.failed(v4(i), t0);
        }
        assert_eq!(limiter.tracked(), MAX_CLIENTS);
        // Clients already tracked are still counted and blocked while the table is full.
        assert!(limiter.blocked(v4(5), t0).is_some());
        assert_eq!(limiter.blocked(v4(MAX_CLIENTS as u32 + 5), t0), None);
        // Once the windows end, a new client's failure makes room.
        let later = t0 + Duration::from_secs(61);
        limiter.failed(v4(MAX_CLIENTS as u32 + 5), later);
        assert_eq!(limiter.tracked(), 1);
        assert!(limiter.blocked(v4(MAX_CLIENTS as u32 + 5), later).is_some());
    }
}
