//! The snowflake worker-id lease (security notes R17–R19): a process holds a Postgres
//! advisory lock on its worker id, on a connection of its own, for its whole life. A second
//! process with the same id is refused at start-up. If the lease connection drops, id
//! generation stops until the lock is taken again. The newest millisecond used is written
//! back every second so a restarted process waits for its clock to pass it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use super::{connect_options, StorageError};
use crate::ids::{Clock, Snowflake};
use crate::metrics::Metrics;

/// First key of the two-key advisory lock on a worker id (`classid` in `pg_locks`; `objid`
/// is the id).
pub const LOCK_NAMESPACE: i32 = 0x1_1405;
/// How long start-up will wait for the clock to pass the last used millisecond.
const MAX_START_WAIT: Duration = Duration::from_secs(5);
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// The longest a write-back, or a reconnection with its lock, may take. sqlx has no
/// client-side keepalive: after a failover that left the old server's socket open, a
/// statement waits for ever, and the lock it stands for may already be gone. Well under
/// [`RECENT_SECONDS`], so ids are refused before another process may take this one.
const LEASE_IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a lease may stay lost before the process is told to stop.
pub const LOST_AFTER: Duration = Duration::from_secs(30);

/// Why the worker id could not be leased.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another live process holds the id.
    #[error("snowflake worker id {worker_id} is already held by another process (APP_ENV_INVOICE_WORKER_ID must be unique per process)")]
    Taken {
        /// The contested id.
        worker_id: u16,
    },
    /// `auto`: every one of the 1024 ids is held.
    #[error("every snowflake worker id (0–1023) is held by a live process")]
    AllTaken,
    /// The clock is far behind the last id this worker issued.
    #[error("system clock is {behind_ms} ms behind the last id issued with worker id {worker_id}; refusing to start")]
    ClockBehind {
        /// The worker id.
        worker_id: u16,
        /// How far behind.
        behind_ms: u64,
    },
    /// Postgres failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A held worker id and the generator it licenses. Dropping it (or cancelling the token
/// given to [`acquire`]) ends the background task, which writes the last millisecond back
/// and closes the connection, releasing the lock.
pub struct WorkerLease {
    /// The id generator; clones may be handed to every task.
    pub ids: Snowflake,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
    lost: CancellationToken,
}

impl WorkerLease {
    /// Cancelled when the lease is gone for good: another process holds the id now, or it
    /// could not be re-acquired for [`LOST_AFTER`]. Ids stay refused meanwhile, so the
    /// process can do nothing useful: it should stop (and be restarted with an id it can
    /// hold) rather than look alive.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Writes the last used millisecond and releases the lock.
    pub async fn release(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ended = task.await;
        }
    }
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn try_lock(conn: &mut PgConnection, worker_id: u16) -> Result<bool, StorageError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LOCK_NAMESPACE)
        .bind(i32::from(worker_id))
        .fetch_one(conn)
        .await?)
}

/// Writes the last used millisecond back; returns the lease session's server process id
/// (to recognise that session later, should it outlive its connection).
async fn persist(
    conn: &mut PgConnection,
    worker_id: u16,
    last_ms: u64,
    holder: &str,
) -> Result<i32, StorageError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO snowflake_worker (worker_id, last_ms, holder) VALUES ($1, $2, $3)
         ON CONFLICT (worker_id) DO UPDATE
           SET last_ms = GREATEST(snowflake_worker.last_ms, EXCLUDED.last_ms),
               holder = EXCLUDED.holder, updated_at = now()
         RETURNING pg_backend_pid()",
    )
    .bind(i32::from(worker_id))
    .bind(last_ms as i64)
    .bind(holder)
    .fetch_one(conn)
    .await?)
}

/// The server process holding the lock on `worker_id`, if any.
async fn lock_holder(conn: &mut PgConnection, worker_id: u16) -> Result<Option<i32>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND classid = $1::int4::oid AND objid = $2::int4::oid
           AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(LOCK_NAMESPACE)
    .bind(i32::from(worker_id))
    .fetch_optional(conn)
    .await?)
}

/// The lease's own connection (the advisory lock lives and dies with it) and its options,
/// for reconnecting.
async fn lease_connection(
    database_url: &str,
) -> Result<(PgConnection, sqlx::postgres::PgConnectOptions), StorageError> {
    let options = connect_options(database_url, "invoice-worker-id-lease")?;
    let conn = PgConnection::connect_with(&options).await?;
    Ok((conn, options))
}

/// Takes the lease on `worker_id` or fails; `holder` names this process in the table.
pub async fn acquire(
    database_url: &str,
    worker_id: u16,
    holder: &str,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
) -> Result<WorkerLease, LeaseError> {
    let (mut conn, options) = lease_connection(database_url).await?;
    if !try_lock(&mut conn, worker_id).await? {
        return Err(LeaseError::Taken { worker_id });
    }
    hold(conn, options, worker_id, holder, clock, metrics).await
}

/// Takes the lease on the lowest free worker id (`APP_ENV_INVOICE_WORKER_ID=auto`), trying
/// each in turn on one connection: the advisory lock makes two processes racing for the
/// same id end with different ones. Ids used in the last seconds and ids whose last use is
/// ahead of this host's clock are passed over.
pub async fn acquire_any(
    database_url: &str,
    holder: &str,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
) -> Result<WorkerLease, LeaseError> {
    let (mut conn, options) = lease_connection(database_url).await?;
    // An id written back lately may belong to a live process whose lease connection just
    // blipped (it re-takes its id within a second): those come last, so a starting process
    // does not grab it in between.
    let recent: Vec<i32> = sqlx::query_scalar(
        "SELECT worker_id FROM snowflake_worker WHERE updated_at > now() - make_interval(secs => $1)",
    )
    .bind(RECENT_SECONDS)
    .fetch_all(&mut conn)
    .await
    .map_err(StorageError::from)?;
    let (fresh, recent): (Vec<u16>, Vec<u16>) =
        (0..=crate::ids::MAX_WORKER_ID).partition(|id| !recent.contains(&i32::from(*id)));
    for worker_id in fresh.into_iter().chain(recent) {
        if !try_lock(&mut conn, worker_id).await? {
            continue;
        }
        // An id whose last use is ahead of this host's clock would refuse to start: take
        // another one instead.
        if last_used_ms(&mut conn, worker_id).await? > clock.now_ms() + MAX_START_WAIT.as_millis() as u64 {
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(LOCK_NAMESPACE)
                .bind(i32::from(worker_id))
                .execute(&mut conn)
                .await
                .map_err(StorageError::from)?;
            continue;
        }
        return hold(conn, options, worker_id, holder, clock, metrics).await;
    }
    Err(LeaseError::AllTaken)
}

/// The newest millisecond ids were issued in with `worker_id` (0 if never used).
async fn last_used_ms(conn: &mut PgConnection, worker_id: u16) -> Result<u64, StorageError> {
    let last_ms: Option<i64> =
        sqlx::query_scalar("SELECT last_ms FROM snowflake_worker WHERE worker_id = $1")
            .bind(i32::from(worker_id))
            .fetch_optional(conn)
            .await?;
    Ok(last_ms.unwrap_or(0).max(0) as u64)
}

/// How recently an id must have been written back to count as possibly still alive.
const RECENT_SECONDS: f64 = 10.0;

/// With the lock on `worker_id` held on `conn`: waits out a clock behind the last id, records
/// the holder and keeps the lease.
async fn hold(
    mut conn: PgConnection,
    options: sqlx::postgres::PgConnectOptions,
    worker_id: u16,
    holder: &str,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
) -> Result<WorkerLease, LeaseError> {
    let last_ms = last_used_ms(&mut conn, worker_id).await?;
    let now = clock.now_ms();
    if last_ms >= now {
        let behind = last_ms - now;
        if behind > MAX_START_WAIT.as_millis() as u64 {
            return Err(LeaseError::ClockBehind { worker_id, behind_ms: behind });
        }
        tracing::warn!(worker_id, behind_ms = behind, "Clock is behind the last issued id; waiting");
        tokio::time::sleep(Duration::from_millis(behind + 1)).await;
    }
    let ids = Snowflake::new(worker_id, clock.clone(), last_ms);
    let session = persist(&mut conn, worker_id, clock.now_ms().max(last_ms), holder).await?;
    tracing::info!(worker_id, holder, "Holding snowflake worker id");

    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let task = tokio::spawn(keep(
        conn,
        options,
        ids.clone(),
        holder.to_owned(),
        Signals { stop: stop.clone(), lost: lost.clone(), session },
        metrics,
    ));
    Ok(WorkerLease { ids, task: Some(task), stop, lost })
}

/// What [`keep`] listens to and tells.
struct Signals {
    stop: CancellationToken,
    lost: CancellationToken,
    /// The lease session's server process id.
    session: i32,
}

/// `op` within [`LEASE_IO_TIMEOUT`].
async fn bounded<T>(
    op: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    tokio::time::timeout(LEASE_IO_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| Err(StorageError::Unavailable(format!("no answer within {LEASE_IO_TIMEOUT:?}"))))
}

async fn keep(
    conn: PgConnection,
    options: sqlx::postgres::PgConnectOptions,
    ids: Snowflake,
    holder: String,
    signals: Signals,
    metrics: Metrics,
) {
    let Signals { stop, lost, session } = signals;
    // The server process of the last session that held the lock: it may outlive a
    // connection dropped on a timeout (busy, or not yet aware its client left), lock held.
    let mut session = session;
    let worker_id = ids.worker_id();
    let mut conn = Some(conn);
    let mut unleased_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(PERSIST_EVERY);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        match conn.as_mut() {
            Some(c) => {
                match bounded(persist(c, worker_id, ids.last_used_ms(), &holder)).await {
                    Ok(pid) => session = pid,
                    Err(error) => {
                        // The lock lived on that connection (or may have: one that does not
                        // answer may be to a server that is gone); another process may take
                        // the id now.
                        ids.set_leased(false);
                        unleased_since = Some(tokio::time::Instant::now());
                        metrics.worker_id_lease_lost(worker_id);
                        tracing::error!(worker_id, %error, "Lost the worker-id lease; refusing to issue ids until it is re-acquired");
                        conn = None;
                    }
                }
            }
            None => {
                let attempt = bounded(async {
                    let mut c = PgConnection::connect_with(&options).await?;
                    if try_lock(&mut c, worker_id).await? {
                        let pid = persist(&mut c, worker_id, ids.last_used_ms(), &holder).await?;
                        return Ok((c, Ok(pid)));
                    }
                    let holder = lock_holder(&mut c, worker_id).await?;
                    if holder == Some(session) {
                        // Our own earlier session: ended, so the next try can take the lock.
                        sqlx::query("SELECT pg_terminate_backend($1)").bind(session).execute(&mut c).await?;
                    }
                    Ok((c, Err(holder)))
                })
                .await;
                match attempt {
                    Ok((c, Ok(pid))) => {
                        ids.set_leased(true);
                        unleased_since = None;
                        session = pid;
                        tracing::info!(worker_id, "Re-acquired the worker-id lease");
                        conn = Some(c);
                    }
                    Ok((_, Err(Some(pid)))) if pid == session => {
                        tracing::warn!(
                            worker_id,
                            pid,
                            "The lease's previous session still held the lock; ended it"
                        );
                    }
                    Ok((_, Err(Some(_)))) => {
                        tracing::error!(
                            worker_id,
                            "Worker id is now held by another process; ids stay refused and the process stops"
                        );
                        lost.cancel();
                    }
                    // Released between the try and the look: the next tick tries again.
                    Ok((_, Err(None))) => {}
                    Err(error) => {
                        tracing::warn!(worker_id, %error, "Re-acquiring the worker-id lease failed");
                    }
                }
                if conn.is_none()
                    && unleased_since.is_some_and(|since| since.elapsed() >= LOST_AFTER)
                    && !lost.is_cancelled()
                {
                    tracing::error!(
                        worker_id,
                        lost_for_s = LOST_AFTER.as_secs(),
                        "Worker-id lease not re-acquired; the process stops"
                    );
                    lost.cancel();
                }
            }
        }
        if stopping {
            if let Some(c) = conn.take() {
                // Closing the connection releases the advisory lock.
                if let Err(error) = c.close().await {
                    tracing::warn!(worker_id, %error, "Closing the worker-id lease connection failed");
                }
            }
            return;
        }
    }
}
