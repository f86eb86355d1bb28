//! Call slots per (merchant, series), shared by every worker process (DOMAIN §7: providers
//! that number invoices in order must not see more than N calls at once for one series).
//!
//! A semaphore per series is one sorted set, `<prefix>:series:{<merchant>:<series>}`: member =
//! a holder's random token, score = its lease deadline in Redis `TIME` ms. A holder renews its
//! lease while its call runs and removes itself when done; a holder that died (kill -9, lost
//! network) frees its slot when the lease runs out, so a crash costs one slot for at most
//! one lease and never blocks a series for good. One key per script: it runs on Redis
//! Cluster as it is.

use std::time::Duration;

use deadpool_redis::redis::Script;

use super::{ms, Queue, QueueError};

/// `KEYS: slots ; ARGV: token limit lease_ms` → 1 when the caller holds a slot, else 0.
pub(super) const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  -- the key lives as long as its longest lease, never shorter
  if redis.call('PTTL', KEYS[1]) < lease then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  return 1
end
return 0
"#;

/// `KEYS: slots ; ARGV: token lease_ms` → 1 when the slot was still held, 0 when it had
/// expired. Either way the caller holds it afterwards: its call is running, so counting it is
/// the truth even if that briefly puts the series over its limit.
pub(super) const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
if score and tonumber(score) > now then
  return 1
end
return 0
"#;

/// `KEYS: slots ; ARGV: token`.
pub(super) const RELEASE: &str = r#"
return redis.call('ZREM', KEYS[1], ARGV[1])
"#;

/// The scripts of this module, loaded with the queue's.
pub(super) struct SeriesScripts {
    acquire: Script,
    renew: Script,
    release: Script,
}

impl Default for SeriesScripts {
    fn default() -> Self {
        SeriesScripts {
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

/// One series' slot set, as named to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesKey(String);

impl Queue {
    /// The slot set of a merchant's series. Both parts are inside the hash tag, so every
    /// series may live on its own Cluster slot.
    pub fn series_key(&self, merchant_id: &str, series: &str) -> SeriesKey {
        SeriesKey(format!("{}:series:{{{merchant_id}:{series}}}", self.prefix))
    }

    /// Takes one of `limit` slots of the series for `lease` if one is free. `token` names the
    /// holder (random, one per call).
    pub async fn try_acquire_series(
        &self,
        key: &SeriesKey,
        token: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let held: i64 = self
            .scripts
            .series
            .acquire
            .key(&key.0)
            .arg(token)
            .arg(limit.max(1))
            .arg(ms(lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// Extends a held slot's lease; `false` when it had already expired (it is held again
    /// now).
    pub async fn renew_series(
        &self,
        key: &SeriesKey,
        token: &str,
        lease: Duration,
    ) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let held: i64 =
            self.scripts.series.renew.key(&key.0).arg(token).arg(ms(lease)).invoke_async(&mut conn).await?;
        Ok(held == 1)
    }

    /// Gives a slot back.
    pub async fn release_series(&self, key: &SeriesKey, token: &str) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        let _: i64 = self.scripts.series.release.key(&key.0).arg(token).invoke_async(&mut conn).await?;
        Ok(())
    }

    /// How many slots of the series are held now (expired leases not counted), for tests and
    /// operators.
    pub async fn series_holders(&self, key: &SeriesKey) -> Result<u64, QueueError> {
        let mut conn = self.conn().await?;
        let (secs, micros): (i64, i64) = deadpool_redis::redis::cmd("TIME").query_async(&mut conn).await?;
        let now = secs * 1000 + micros / 1000;
        Ok(deadpool_redis::redis::cmd("ZCOUNT")
            .arg(&key.0)
            .arg(format!("({now}"))
            .arg("+inf")
            .query_async(&mut conn)
            .await?)
    }
}
