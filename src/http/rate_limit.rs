//! Anti-automation for claim tokens (ASVS 2.4.1): a client whose lookups keep failing
//! (unknown tokens) is refused with 429 for the rest of the window. Tokens carry 256 bits,
//! so guessing is hopeless anyway; this keeps scanners from costing database reads.
//!
//! Per process, in memory: with several API replicas a client gets a budget per replica,
//! which still bounds guessing to a tiny rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts failures per client in fixed windows.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    clients: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Most clients tracked; beyond it expired windows are dropped first.
const MAX_CLIENTS: usize = 100_000;

impl FailureLimiter {
    /// At most `max_failures` per `window` per client.
    pub fn new(max_failures: u32, window: Duration) -> FailureLimiter {
        FailureLimiter { max_failures, window, clients: Mutex::new(HashMap::new()) }
    }

    /// `Some(retry after)` if the client used up its failures in the current window.
    pub fn blocked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (start, failures) = clients.get(&client)?;
        let ends = *start + self.window;
        (now < ends && *failures >= self.max_failures).then(|| ends - now)
    }

    /// Records a failure of `client`.
    pub fn failed(&self, client: IpAddr, now: Instant) {
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if clients.len() >= MAX_CLIENTS {
            let window = self.window;
            clients.retain(|_, (start, _)| now < *start + window);
        }
        let entry = clients.entry(client).or_insert((now, 0));
        if now >= entry.0 + self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
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
}
