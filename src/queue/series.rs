//! Call slots per (merchant, series), shared by every worker process (DOMAIN §7: providers
//! that number invoices in order must not see more than N calls at once for one series).
//!
//! A semaphore per series is one sorted set, `<prefix>:series:{<merchant>:<series>}`: member =
//! a holder's random token, score = its lease deadline in Redis `TIME` ms. A holder renews its
//! lease while its calls run and removes itself when done; a holder that died (kill -9, lost
//! network) frees its slots when their lease runs out, so a crash costs its slots for at
//! most one lease and never blocks a series for good. One key per script, so the scripts are
//! ready for Redis Cluster (the client here is a single-node connection).

use std::time::Duration;

use deadpool_redis::redis::Script;

use super::{ms, Queue, QueueError};

/// `KEYS: slots ; ARGV: limit lease_ms token...` → how many of the tokens now hold a slot
/// (the first ones, as many as are free; a token that already held one keeps it).
pub(super) const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local granted = 0
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  elseif held < limit then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
    held = held + 1
  else
    break
  end
  granted = granted + 1
end
if granted > 0 and redis.call('PTTL', KEYS[1]) < lease then
  -- the key lives as long as its longest lease, never shorter
  redis.call('PEXPIRE', KEYS[1], lease)
end
return granted
"#;

/// `KEYS: slots ; ARGV: lease_ms token...` → how many were still held. Only tokens still in
/// the set are extended: one reaped after its lease ran out is not taken back (its slot may
/// be someone else's now), and a renewal that reaches Redis after the release cannot bring
/// released tokens back.
pub(super) const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local live = 0
local extended = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score then
    if tonumber(score) > now then
      live = live + 1
    end
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
    extended = extended + 1
  end
end
if extended > 0 and redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return live
"#;

/// `KEYS: slots ; ARGV: token...`.
pub(super) const RELEASE: &str = r#"
return redis.call('ZREM', KEYS[1], unpack(ARGV))
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

    /// Takes slots of the series (at most `limit` held at once, whoever holds them) for as
    /// many of `tokens` as are free, for `lease`; returns how many, the first tokens being the
    /// holders. Each token names one holder (random, never reused).
    pub async fn try_acquire_series(
        &self,
        key: &SeriesKey,
        tokens: &[String],
        limit: usize,
        lease: Duration,
    ) -> Result<usize, QueueError> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let granted = self.run_series(&self.scripts.series.acquire, key, &[limit, ms(lease)], tokens).await?;
        Ok(usize::try_from(granted).unwrap_or(0).min(tokens.len()))
    }

    /// Extends held slots' lease; returns how many were still held (only those are extended).
    pub async fn renew_series(
        &self,
        key: &SeriesKey,
        tokens: &[String],
        lease: Duration,
    ) -> Result<usize, QueueError> {
        let live = self.run_series(&self.scripts.series.renew, key, &[ms(lease)], tokens).await?;
        Ok(usize::try_from(live).unwrap_or(0))
    }

    /// Gives slots back.
    pub async fn release_series(&self, key: &SeriesKey, tokens: &[String]) -> Result<(), QueueError> {
        self.run_series(&self.scripts.series.release, key, &[], tokens).await?;
        Ok(())
    }

    /// Runs one of this module's scripts on `key` with `leading` numbers then `tokens` as
    /// ARGV; nothing to do (0) without tokens.
    async fn run_series(
        &self,
        script: &Script,
        key: &SeriesKey,
        leading: &[i64],
        tokens: &[String],
    ) -> Result<i64, QueueError> {
        if tokens.is_empty() {
            return Ok(0);
        }
        let mut call = script.prepare_invoke();
        call.key(&key.0);
        for number in leading {
            call.arg(*number);
        }
        for token in tokens {
            call.arg(token);
        }
        let mut conn = self.conn().await?;
        Ok(call.invoke_async(&mut conn).await?)
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
