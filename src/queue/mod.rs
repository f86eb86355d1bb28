//! The issuance queue (SPEC §4) on Redis: `P` partitions chosen by the Java hash of the order
//! id, job id = order id with dedupe, a lease per running job, delayed retries, a DLQ per
//! partition.
//!
//! Redis only delivers work; Postgres is the truth. A job carries no decision: the worker
//! re-reads the order's invoices from Postgres, so a duplicate or stale job is harmless and a
//! lost one is re-created by the sweeper. Every move between the lists below is one Lua
//! script (loaded once, called by SHA, reloaded by the client after a Redis restart).
//!
//! Keys of partition `n` share the hash tag `{pn}`, so every script touches one Cluster slot:
//!
//! | key | type | content |
//! |---|---|---|
//! | `wait` | list | order ids ready to run, FIFO |
//! | `active` | zset | order id → lease deadline (ms) |
//! | `delayed` | zset | order id → run-at (ms) |
//! | `dlq` | zset | order id → dead-at (ms) |
//! | `state` | hash | order id → `waiting`, `active`, `delayed` or `dead` (absent: no job) |
//! | `job` | hash | order id → payload JSON |
//! | `att` | hash | order id → deliveries started since a worker last handed the job back with a verdict (a retry): deliveries that ended without one, a worker that died or hung, count up |
//! | `tok` | hash | order id → lease token of the current delivery (a 128-bit random nonce from the client per claim call, and the job's place in that call: never reused, even after Redis lost or rolled back its data) |
//! | `err` | hash | order id → last error |
//!
//! Invariant: an id is in exactly one of `wait`/`active`/`delayed`/`dlq` iff `state` names it
//! (`wait` may also hold stale copies, which `claim` skips).
//!
//! Besides the partitions, `<prefix>:series:{<merchant>:<series>}` holds the leased call
//! slots of one invoice series, shared by every worker process (module `series`).

use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, Script};
use serde::{Deserialize, Serialize};

use crate::ids::partition_of;

mod series;
pub use series::SeriesKey;

/// Why a queue operation failed. Always transient from the caller's point of view: Postgres
/// still holds the work, and the sweeper re-enqueues it.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No connection could be had from the pool.
    #[error("Redis unavailable: {0}")]
    Pool(String),
    /// Redis answered with an error.
    #[error("Redis error: {0}")]
    Redis(String),
    /// A script answered something this code does not expect.
    #[error("unexpected Redis reply: {0}")]
    Protocol(&'static str),
}

impl From<redis::RedisError> for QueueError {
    fn from(error: redis::RedisError) -> Self {
        QueueError::Redis(error.to_string())
    }
}

impl From<deadpool_redis::PoolError> for QueueError {
    fn from(error: deadpool_redis::PoolError) -> Self {
        QueueError::Pool(error.to_string())
    }
}

/// What a job carries besides its id (the order id): enough to log and measure. The work
/// itself is read from Postgres.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobPayload {
    /// The merchant of the order (for logs; the worker serves every merchant's invoice of the
    /// order).
    pub merchant_id: String,
    /// Unix ms of the first enqueue, for queue age and end-to-end latency.
    pub enqueued_at_ms: i64,
    /// Who enqueued it: `stream`, `sweeper`, `replay`, `claim`, `dlq_requeue`.
    pub source: String,
}

/// A job handed to a worker by [`Queue::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The order id.
    pub order_id: String,
    /// Its partition.
    pub partition: u32,
    /// The payload (a default one if it was unreadable).
    pub payload: JobPayload,
    /// Deliveries started since the job was last retried, this one included: above 1, the
    /// deliveries before this one ended without a verdict (their worker died or hung).
    pub delivery: u32,
    /// The lease token: every later move of this delivery must present it.
    pub token: String,
}

/// Depth of one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Ready to run.
    pub waiting: u64,
    /// Running (leased).
    pub active: u64,
    /// Waiting for a retry time.
    pub delayed: u64,
    /// Dead-lettered.
    pub dead: u64,
}

/// Result of [`Queue::claim`].
#[derive(Debug, Default)]
pub struct Claimed {
    /// The jobs now leased to the caller.
    pub jobs: Vec<Job>,
    /// Jobs whose lease had expired and that went back to the head of the line.
    pub reclaimed: u64,
    /// Delayed jobs whose time had come.
    pub promoted: u64,
}

/// Outcome of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job.
    New,
    /// A job for this order already exists (waiting, active, delayed or dead): nothing changed.
    Duplicate,
}

/// A job to move to `delayed` (retry later) by [`Queue::retry`].
#[derive(Debug, Clone)]
pub struct Retry<'a> {
    /// The job.
    pub job: &'a Job,
    /// How long from now.
    pub delay: Duration,
    /// Why, for `dlq list` and logs (never a secret).
    pub error: String,
}

const ENQUEUE: &str = r#"
-- KEYS: wait state job att dlq err ; ARGV: id payload [id payload ...] ; returns 1/0 per id
-- A dead job is revived: whoever enqueues read Postgres, which says the order is due again.
-- A new job has no `att` field (HINCRBY counts from nothing). The payloads and the line are
-- written with one command each, not one per job: every write is also an AOF entry (the
-- state stays one HSETNX per job: it is the dedupe).
local out = {}
local payloads = {}
local ids = {}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local new = redis.call('HSETNX', KEYS[2], id, 'waiting') == 1
  if not new and redis.call('HGET', KEYS[2], id) == 'dead' then
    redis.call('ZREM', KEYS[5], id)
    redis.call('HDEL', KEYS[6], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HSET', KEYS[2], id, 'waiting')
    new = true
  end
  if new then
    payloads[#payloads + 1] = id
    payloads[#payloads + 1] = ARGV[i + 1]
    ids[#ids + 1] = id
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
-- In slices: Lua's unpack has a bounded stack.
for s = 1, #payloads, 1000 do
  redis.call('HSET', KEYS[3], unpack(payloads, s, math.min(s + 999, #payloads)))
end
for s = 1, #ids, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ids, s, math.min(s + 999, #ids)))
end
return out
"#;

const CLAIM: &str = r#"
-- KEYS: wait active delayed state job att tok ; ARGV: lease_ms housekeeping_max n nonce
-- (a fresh random nonce per call: job i's token is nonce.i) ; returns {reclaimed, promoted, id, payload, delivery, token, ...}
-- Redis's clock, not the caller's: workers' clocks may disagree, and a lease judged by a
-- fast one would be reaped while its worker still runs.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local hk = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
-- Leases that expired: their worker died or hung. Back to the head of the line.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, hk)
for i = #expired, 1, -1 do
  local id = expired[i]
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[7], id)
  redis.call('HSET', KEYS[4], id, 'waiting')
  redis.call('LPUSH', KEYS[1], id)
end
-- Retries whose time has come.
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, hk)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('HSET', KEYS[4], id, 'waiting')
  redis.call('RPUSH', KEYS[1], id)
end
local out = {#expired, #due}
-- Popped in bulk and written in bulk, one command per key per slice, not one per job: every
-- write is also an AOF entry. A copy of an id already taken here is stale, like one whose
-- state is not `waiting`.
local ids = {}
local seen = {}
while #ids < n do
  local popped = redis.call('LPOP', KEYS[1], n - #ids)
  if not popped then break end
  for _, id in ipairs(popped) do
    if not seen[id] and redis.call('HGET', KEYS[4], id) == 'waiting' then
      seen[id] = true
      ids[#ids + 1] = id
    end
  end
end
for s = 1, #ids, 500 do
  local slice = {unpack(ids, s, math.min(s + 499, #ids))}
  local deliveries = redis.call('HMGET', KEYS[6], unpack(slice))
  local payloads = redis.call('HMGET', KEYS[5], unpack(slice))
  local att, tok, lease_until, state = {}, {}, {}, {}
  for j, id in ipairs(slice) do
    local delivery = (tonumber(deliveries[j]) or 0) + 1
    local token = ARGV[4] .. '.' .. (s + j - 2)
    att[#att + 1] = id
    att[#att + 1] = delivery
    tok[#tok + 1] = id
    tok[#tok + 1] = token
    lease_until[#lease_until + 1] = now + lease
    lease_until[#lease_until + 1] = id
    state[#state + 1] = id
    state[#state + 1] = 'active'
    out[#out + 1] = id
    out[#out + 1] = payloads[j] or ''
    out[#out + 1] = delivery
    out[#out + 1] = token
  end
  redis.call('HSET', KEYS[6], unpack(att))
  redis.call('HSET', KEYS[7], unpack(tok))
  redis.call('ZADD', KEYS[2], unpack(lease_until))
  redis.call('HSET', KEYS[4], unpack(state))
end
return out
"#;

const EXTEND: &str = r#"
-- KEYS: active state tok ; ARGV: lease_ms id token [id token ...] ; returns the ids whose lease is lost
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == 'active' and redis.call('HGET', KEYS[3], id) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"#;

const COMPLETE: &str = r#"
-- KEYS: active state job att tok err ; ARGV: id token [id token ...] ; returns the count of stale tokens
-- Removed with one command per key per slice (every write is also an AOF entry); an id
-- presented twice counts as stale the second time, as if the first had already removed it.
local stale = 0
local done = {}
local seen = {}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if not seen[id] and redis.call('HGET', KEYS[2], id) == 'active'
      and redis.call('HGET', KEYS[5], id) == ARGV[i + 1] then
    seen[id] = true
    done[#done + 1] = id
  else
    stale = stale + 1
  end
end
for s = 1, #done, 1000 do
  local last = math.min(s + 999, #done)
  redis.call('ZREM', KEYS[1], unpack(done, s, last))
  for k = 2, 6 do
    redis.call('HDEL', KEYS[k], unpack(done, s, last))
  end
end
return stale
"#;

const RETRY: &str = r#"
-- KEYS: active delayed state tok err att ; ARGV: id token delay_ms error [...] ; returns stale count
-- A retry is a verdict from a live worker: the count of deliveries that ended without one
-- (what tells a poison pill) starts again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = 0
for i = 1, #ARGV, 4 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == 'active' and redis.call('HGET', KEYS[4], id) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[i + 2]), id)
    redis.call('HSET', KEYS[3], id, 'delayed')
    redis.call('HSET', KEYS[5], id, ARGV[i + 3])
    redis.call('HSET', KEYS[6], id, 0)
  else
    stale = stale + 1
  end
end
return stale
"#;

const DEAD: &str = r#"
-- KEYS: active dlq state tok err job att ; ARGV: id token error cap ; returns 1 if moved, 0 if stale
if redis.call('HGET', KEYS[3], ARGV[1]) == 'active' and redis.call('HGET', KEYS[4], ARGV[1]) == ARGV[2] then
  local t = redis.call('TIME')
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], 'dead')
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
  -- Bounded: the oldest dead jobs leave Redis (Postgres keeps their FAILED invoices, which
  -- is what `dlq list` shows and `dlq requeue` moves).
  local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
  if excess > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[2], excess)
    for i = 1, #popped, 2 do
      local id = popped[i]
      if redis.call('HGET', KEYS[3], id) == 'dead' then
        redis.call('HDEL', KEYS[3], id)
        redis.call('HDEL', KEYS[5], id)
        redis.call('HDEL', KEYS[6], id)
        redis.call('HDEL', KEYS[7], id)
      end
    end
  end
  return 1
end
return 0
"#;

const RELEASE: &str = r#"
-- KEYS: wait active state att tok ; ARGV: id token [...] ; hands jobs back to the head, uncounted
for i = #ARGV - 1, 1, -2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == 'active' and redis.call('HGET', KEYS[5], id) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[5], id)
    redis.call('HINCRBY', KEYS[4], id, -1)
    redis.call('HSET', KEYS[3], id, 'waiting')
    redis.call('LPUSH', KEYS[1], id)
  end
end
return 0
"#;

const REQUEUE: &str = r#"
-- KEYS: wait dlq state job att err ; ARGV: id payload
-- dead -> waiting (attempts reset); absent -> a new job; else unchanged.
-- returns 'requeued', 'enqueued' or the current state
local state = redis.call('HGET', KEYS[3], ARGV[1])
if state == 'dead' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], 'waiting')
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[5], ARGV[1], 0)
  redis.call('HDEL', KEYS[6], ARGV[1])
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return 'requeued'
elseif not state then
  redis.call('HSET', KEYS[3], ARGV[1], 'waiting')
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[5], ARGV[1], 0)
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return 'enqueued'
end
return state
"#;

struct Scripts {
    enqueue: Script,
    claim: Script,
    extend: Script,
    complete: Script,
    retry: Script,
    dead: Script,
    release: Script,
    requeue: Script,
    series: series::SeriesScripts,
}

/// The queue: a Redis pool, the partition count and the key prefix.
#[derive(Clone)]
pub struct Queue {
    pool: deadpool_redis::Pool,
    /// One multiplexed connection taken from the pool and shared by every operation. A
    /// checkout from the pool costs a PING round trip (deadpool's health check), as much as
    /// the operation itself; a multiplexed connection pipelines concurrent operations on one
    /// socket anyway. Forgotten on a connection error, so the next operation gets a fresh
    /// one through the pool.
    shared: std::sync::Arc<std::sync::Mutex<Shared>>,
    partitions: u32,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
    dlq_cap: usize,
}

/// Dead jobs kept in Redis per partition; older ones leave it (their FAILED invoices stay in
/// Postgres). Unbounded, a merchant failing thousands of invoices a day grew Redis for good.
pub const DLQ_CAP: usize = 10_000;

/// How long any queue operation may wait for Redis's answer. Without it a Redis that stops
/// answering (paused, or a network that drops packets) would hang every worker for good;
/// with it the operation fails, the connection is replaced, and leases and the sweeper
/// repair whatever the lost answer concerned.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared connection and its generation (bumped at each replacement).
#[derive(Default)]
struct Shared {
    connection: Option<MultiplexedConnection>,
    generation: u64,
}

/// A queue operation's connection: the shared one, which it forgets on a connection error
/// (only if it is still the shared one: a late error of a replaced connection must not throw
/// away its healthy successor).
struct Conn {
    inner: MultiplexedConnection,
    generation: u64,
    shared: std::sync::Arc<std::sync::Mutex<Shared>>,
}

/// Whether an error means the connection itself must be replaced. Besides broken
/// connections: a failover that demotes the old primary leaves clients connected to a
/// replica, which answers every write `READONLY` (or `MASTERDOWN`) on the same healthy
/// connection forever; only a new connection reaches the new primary (through DNS or the
/// proxy in front).
fn connection_is_useless(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.is_timeout()
        || matches!(error.kind(), redis::ErrorKind::ReadOnly | redis::ErrorKind::MasterDown)
        || demoted_inside_a_script(error)
}

/// Redis before 7 wraps a write refused inside a script as `ERR Error running script ...
/// -READONLY You can't write against a read only replica.`: the same demoted primary, only
/// worded as a script error (every queue operation is a script).
fn demoted_inside_a_script(error: &redis::RedisError) -> bool {
    if !matches!(error.kind(), redis::ErrorKind::ResponseError | redis::ErrorKind::ExtensionError) {
        return false;
    }
    let text = error.to_string();
    text.contains("READONLY You can't write") || text.contains("-MASTERDOWN")
}

impl Conn {
    fn check<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(error) = &result {
            if connection_is_useless(error) {
                if let Ok(mut shared) = self.shared.lock() {
                    if shared.generation == self.generation {
                        shared.connection = None;
                    }
                }
            }
        }
        result
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let result = self.inner.req_packed_command(cmd).await;
            self.check(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let result = self.inner.req_packed_commands(cmd, offset, count).await;
            self.check(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("partitions", &self.partitions).field("prefix", &self.prefix).finish()
    }
}

/// The keys of one partition.
struct Keys {
    wait: String,
    active: String,
    delayed: String,
    dlq: String,
    state: String,
    job: String,
    att: String,
    tok: String,
    err: String,
}

/// Unix time in ms.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Queue {
    /// A queue of `partitions` partitions whose keys start with `prefix` (`iq` in production;
    /// tests use their own).
    pub fn new(pool: deadpool_redis::Pool, partitions: u32, prefix: &str) -> Queue {
        Queue {
            pool,
            shared: Default::default(),
            partitions: partitions.max(1),
            prefix: prefix.to_owned(),
            dlq_cap: DLQ_CAP,
            scripts: std::sync::Arc::new(Scripts {
                enqueue: Script::new(ENQUEUE),
                claim: Script::new(CLAIM),
                extend: Script::new(EXTEND),
                complete: Script::new(COMPLETE),
                retry: Script::new(RETRY),
                dead: Script::new(DEAD),
                release: Script::new(RELEASE),
                requeue: Script::new(REQUEUE),
                series: series::SeriesScripts::default(),
            }),
        }
    }

    /// The same queue keeping at most `cap` dead jobs per partition in Redis.
    pub fn with_dlq_cap(mut self, cap: usize) -> Queue {
        self.dlq_cap = cap.max(1);
        self
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of an order (SPEC §4).
    pub fn partition_of(&self, order_id: &str) -> u32 {
        partition_of(order_id, self.partitions)
    }

    fn keys(&self, partition: u32) -> Keys {
        let base = format!("{}:{{p{partition}}}", self.prefix);
        Keys {
            wait: format!("{base}:wait"),
            active: format!("{base}:active"),
            delayed: format!("{base}:delayed"),
            dlq: format!("{base}:dlq"),
            state: format!("{base}:state"),
            job: format!("{base}:job"),
            att: format!("{base}:att"),
            tok: format!("{base}:tok"),
            err: format!("{base}:err"),
        }
    }

    async fn conn(&self) -> Result<Conn, QueueError> {
        let cached = self
            .shared
            .lock()
            .ok()
            .and_then(|shared| shared.connection.clone().map(|c| (c, shared.generation)));
        let (inner, generation) = match cached {
            Some(cached) => cached,
            None => {
                // Bounded whatever the pool's own settings: a new connection's handshake is
                // a round trip too.
                let pooled =
                    tokio::time::timeout(RESPONSE_TIMEOUT, self.pool.get()).await.map_err(|_| {
                        QueueError::Pool("no Redis connection within the response timeout".into())
                    })??;
                let mut inner = MultiplexedConnection::clone(&pooled);
                inner.set_response_timeout(RESPONSE_TIMEOUT);
                let mut generation = 0;
                if let Ok(mut shared) = self.shared.lock() {
                    shared.generation += 1;
                    generation = shared.generation;
                    shared.connection = Some(inner.clone());
                }
                (inner, generation)
            }
        };
        Ok(Conn { inner, generation, shared: self.shared.clone() })
    }

    /// Enqueues jobs (order id, payload); an order that already has a job is left as it is.
    /// Returns one answer per job, in order.
    pub async fn enqueue(&self, jobs: &[(String, JobPayload)]) -> Result<Vec<Enqueued>, QueueError> {
        let mut by_partition: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, (order_id, _)) in jobs.iter().enumerate() {
            by_partition.entry(self.partition_of(order_id)).or_default().push(i);
        }
        let mut answers = vec![Enqueued::Duplicate; jobs.len()];
        let mut conn = self.conn().await?;
        for (partition, indexes) in by_partition {
            let k = self.keys(partition);
            let mut call = self.scripts.enqueue.prepare_invoke();
            call.key(&k.wait).key(&k.state).key(&k.job).key(&k.att).key(&k.dlq).key(&k.err);
            for &i in &indexes {
                let payload = serde_json::to_string(&jobs[i].1).unwrap_or_default();
                call.arg(&jobs[i].0).arg(payload);
            }
            let created: Vec<i64> = call.invoke_async(&mut conn).await?;
            if created.len() != indexes.len() {
                return Err(QueueError::Protocol("enqueue answered a different number of jobs"));
            }
            for (&i, new) in indexes.iter().zip(created) {
                answers[i] = if new == 1 { Enqueued::New } else { Enqueued::Duplicate };
            }
        }
        Ok(answers)
    }

    /// Leases up to `n` jobs of `partition` for `lease`. Expired leases and due retries of the
    /// partition are moved first (bounded per call), so every claimer is also the reaper.
    pub async fn claim(&self, partition: u32, n: usize, lease: Duration) -> Result<Claimed, QueueError> {
        let k = self.keys(partition);
        let mut call = self.scripts.claim.prepare_invoke();
        call.key(&k.wait).key(&k.active).key(&k.delayed).key(&k.state).key(&k.job).key(&k.att).key(&k.tok);
        // One nonce per call, not a token per job it may hand out: an idle worker polls with
        // `n` at its free slots (hundreds), and sending as many tokens with every empty poll
        // made polling most of Redis's and a good part of the service's work at 500 jobs/s.
        call.arg(ms(lease)).arg(1000).arg(n.max(1)).arg(uuid::Uuid::new_v4().simple().to_string());
        let mut conn = self.conn().await?;
        let reply: Vec<redis::Value> = call.invoke_async(&mut conn).await?;
        parse_claim(partition, reply)
    }

    /// Renews the leases of running jobs of one partition; returns the order ids whose lease
    /// was lost (reaped after expiry, or taken over): their worker must stop before any write.
    pub async fn extend(
        &self,
        partition: u32,
        jobs: &[&Job],
        lease: Duration,
    ) -> Result<Vec<String>, QueueError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys(partition);
        let mut call = self.scripts.extend.prepare_invoke();
        call.key(&k.active).key(&k.state).key(&k.tok).arg(ms(lease));
        for job in jobs {
            call.arg(&job.order_id).arg(&job.token);
        }
        let mut conn = self.conn().await?;
        Ok(call.invoke_async(&mut conn).await?)
    }

    /// Removes finished jobs (their invoices are settled in Postgres). Returns how many
    /// presented a stale token (another delivery owns the job now) and were left alone.
    pub async fn complete(&self, partition: u32, jobs: &[&Job]) -> Result<u64, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let k = self.keys(partition);
        let mut call = self.scripts.complete.prepare_invoke();
        call.key(&k.active).key(&k.state).key(&k.job).key(&k.att).key(&k.tok).key(&k.err);
        for job in jobs {
            call.arg(&job.order_id).arg(&job.token);
        }
        let mut conn = self.conn().await?;
        Ok(call.invoke_async(&mut conn).await?)
    }

    /// Moves running jobs to `delayed`, each for its own delay. Returns the stale count.
    pub async fn retry(&self, partition: u32, retries: &[Retry<'_>]) -> Result<u64, QueueError> {
        if retries.is_empty() {
            return Ok(0);
        }
        let k = self.keys(partition);
        let mut call = self.scripts.retry.prepare_invoke();
        call.key(&k.active).key(&k.delayed).key(&k.state).key(&k.tok).key(&k.err).key(&k.att);
        for r in retries {
            call.arg(&r.job.order_id).arg(&r.job.token).arg(ms(r.delay)).arg(&r.error);
        }
        let mut conn = self.conn().await?;
        Ok(call.invoke_async(&mut conn).await?)
    }

    /// Moves a running job to its partition's DLQ. `false`: the token was stale.
    pub async fn dead(&self, job: &Job, error: &str) -> Result<bool, QueueError> {
        let k = self.keys(job.partition);
        let mut conn = self.conn().await?;
        let moved: i64 = self
            .scripts
            .dead
            .key(&k.active)
            .key(&k.dlq)
            .key(&k.state)
            .key(&k.tok)
            .key(&k.err)
            .key(&k.job)
            .key(&k.att)
            .arg(&job.order_id)
            .arg(&job.token)
            .arg(error)
            .arg(self.dlq_cap)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }

    /// Hands running jobs back to the head of their line without counting a delivery (a
    /// worker stopping on SIGTERM).
    pub async fn release(&self, partition: u32, jobs: &[&Job]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let k = self.keys(partition);
        let mut call = self.scripts.release.prepare_invoke();
        call.key(&k.wait).key(&k.active).key(&k.state).key(&k.att).key(&k.tok);
        for job in jobs {
            call.arg(&job.order_id).arg(&job.token);
        }
        let mut conn = self.conn().await?;
        let _: i64 = call.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Requeues an order's dead job (attempts reset), or enqueues a new one if Redis has
    /// none. Returns `requeued`, `enqueued`, or the state of a live job left alone.
    pub async fn requeue(&self, order_id: &str, payload: &JobPayload) -> Result<String, QueueError> {
        let k = self.keys(self.partition_of(order_id));
        let mut conn = self.conn().await?;
        Ok(self
            .scripts
            .requeue
            .key(&k.wait)
            .key(&k.dlq)
            .key(&k.state)
            .key(&k.job)
            .key(&k.att)
            .key(&k.err)
            .arg(order_id)
            .arg(serde_json::to_string(payload).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?)
    }

    /// The state of an order's job (`waiting`, `active`, `delayed`, `dead`) and its last error.
    pub async fn job_state(&self, order_id: &str) -> Result<(Option<String>, Option<String>), QueueError> {
        let k = self.keys(self.partition_of(order_id));
        let mut conn = self.conn().await?;
        let (state, error): (Option<String>, Option<String>) =
            redis::pipe().hget(&k.state, order_id).hget(&k.err, order_id).query_async(&mut conn).await?;
        Ok((state, error))
    }

    /// The dead jobs of every partition: `(order id, partition, dead-at ms, last error)`.
    pub async fn dead_jobs(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, u32, i64, Option<String>)>, QueueError> {
        let mut out = Vec::new();
        let mut conn = self.conn().await?;
        for partition in 0..self.partitions {
            let k = self.keys(partition);
            let ids: Vec<(String, i64)> = redis::cmd("ZRANGE")
                .arg(&k.dlq)
                .arg(0)
                .arg(limit.saturating_sub(1) as i64)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            for (id, at) in ids {
                let error: Option<String> =
                    redis::cmd("HGET").arg(&k.err).arg(&id).query_async(&mut conn).await?;
                out.push((id, partition, at, error));
            }
        }
        out.sort_by_key(|(_, _, at, _)| *at);
        out.truncate(limit);
        Ok(out)
    }

    /// Depth of every partition, in one round trip.
    pub async fn depths(&self) -> Result<Vec<Depth>, QueueError> {
        let mut pipe = redis::pipe();
        for partition in 0..self.partitions {
            let k = self.keys(partition);
            pipe.llen(&k.wait).zcard(&k.active).zcard(&k.delayed).zcard(&k.dlq);
        }
        let mut conn = self.conn().await?;
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(counts
            .chunks(4)
            .map(|c| Depth { waiting: c[0], active: c[1], delayed: c[2], dead: c[3] })
            .collect())
    }

    /// Unix ms of the oldest waiting job's first enqueue per partition (`None`: empty).
    pub async fn oldest_waiting(&self) -> Result<Vec<Option<i64>>, QueueError> {
        let mut conn = self.conn().await?;
        let mut out = Vec::with_capacity(self.partitions as usize);
        for partition in 0..self.partitions {
            let k = self.keys(partition);
            let head: Option<String> =
                redis::cmd("LINDEX").arg(&k.wait).arg(0).query_async(&mut conn).await?;
            let payload: Option<String> = match head {
                Some(id) => redis::cmd("HGET").arg(&k.job).arg(id).query_async(&mut conn).await?,
                None => None,
            };
            out.push(
                payload.and_then(|p| serde_json::from_str::<JobPayload>(&p).ok()).map(|p| p.enqueued_at_ms),
            );
        }
        Ok(out)
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

fn parse_claim(partition: u32, reply: Vec<redis::Value>) -> Result<Claimed, QueueError> {
    use redis::FromRedisValue as _;
    let mut items = reply.into_iter();
    let next_int = |items: &mut std::vec::IntoIter<redis::Value>| -> Result<i64, QueueError> {
        items
            .next()
            .map(|v| i64::from_redis_value(&v))
            .transpose()?
            .ok_or(QueueError::Protocol("claim reply too short"))
    };
    let reclaimed = next_int(&mut items)? as u64;
    let promoted = next_int(&mut items)? as u64;
    let mut jobs = Vec::new();
    while let Some(id) = items.next() {
        let order_id = String::from_redis_value(&id)?;
        let payload = items.next().ok_or(QueueError::Protocol("claim reply missing payload"))?;
        let payload = String::from_redis_value(&payload)?;
        let delivery = next_int(&mut items)?;
        let token = items.next().ok_or(QueueError::Protocol("claim reply missing token"))?;
        let token = String::from_redis_value(&token)?;
        let payload = serde_json::from_str(&payload).unwrap_or_else(|_| JobPayload {
            merchant_id: String::new(),
            enqueued_at_ms: now_ms(),
            source: "unknown".into(),
        });
        jobs.push(Job { order_id, partition, payload, delivery: delivery.max(0) as u32, token });
    }
    Ok(Claimed { jobs, reclaimed, promoted })
}

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base × 2^(attempt−1))]`,
/// never below `floor` (so a retry never spins).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, floor: Duration) -> Duration {
    use rand::Rng as _;
    let exp = attempt.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1u32 << exp).min(cap);
    let jittered = rand::rng().random_range(0..=ms(ceiling).max(0) as u64);
    Duration::from_millis(jittered).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_demoted_primary_or_a_broken_connection_gets_a_new_connection_and_script_errors_do_not() {
        let error = |kind, text: &'static str| redis::RedisError::from((kind, text));
        assert!(connection_is_useless(&error(redis::ErrorKind::ReadOnly, "READONLY")));
        assert!(connection_is_useless(&error(redis::ErrorKind::MasterDown, "MASTERDOWN")));
        assert!(connection_is_useless(&redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!connection_is_useless(&error(redis::ErrorKind::ResponseError, "ERR Error running script")));
        // Redis 6's wording of the same refusal inside a script.
        let wrapped = redis::RedisError::from((
            redis::ErrorKind::ResponseError,
            "An error was signalled by the server",
            "Error running script (call to f_0b8f): @user_script:3: @user_script: 3: -READONLY You can't write against a read only replica.".to_owned(),
        ));
        assert!(connection_is_useless(&wrapped));
        assert!(!connection_is_useless(&error(redis::ErrorKind::TypeError, "WRONGTYPE")));
    }

    proptest! {
        #[test]
        fn backoff_stays_within_the_full_jitter_bounds(attempt in 1u32..40, base_ms in 1u64..10_000, cap_ms in 1u64..1_000_000) {
            let base = Duration::from_millis(base_ms);
            let cap = Duration::from_millis(cap_ms);
            let floor = Duration::from_millis(10);
            let d = backoff(attempt, base, cap, floor);
            let ceiling = base.saturating_mul(1u32 << (attempt - 1).min(30)).min(cap);
            prop_assert!(d <= ceiling.max(floor));
            prop_assert!(d >= floor);
        }
    }

    #[test]
    fn backoff_ceiling_doubles_until_the_cap() {
        let base = Duration::from_secs(2);
        let cap = Duration::from_secs(600);
        // Many draws: the largest approaches the ceiling, none passes it.
        for (attempt, ceiling) in [(1, 2), (2, 4), (3, 8), (8, 256), (9, 512), (10, 600), (20, 600)] {
            let max = (0..2000).map(|_| backoff(attempt, base, cap, Duration::ZERO)).max().unwrap();
            assert!(max <= Duration::from_secs(ceiling), "attempt {attempt}: {max:?}");
            assert!(max >= Duration::from_secs(ceiling) * 8 / 10, "attempt {attempt}: {max:?}");
        }
    }
}
