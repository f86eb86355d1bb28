//! Postgres, the system of record. All SQL of the service lives under this module; callers
//! get typed functions. Functions that must be atomic with others take a `&mut PgConnection`
//! (a transaction dereferences to one), so the caller owns the transaction boundary.

pub mod admin_units;
pub mod buyers;
pub mod claims;
pub mod decisions;
pub mod error;
pub mod invoices;
pub mod issuance;
pub mod merchants;
pub mod offsets;
pub mod outbox;
pub mod provider_configs;
pub mod seed;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use error::StorageError;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// `idle_in_transaction_session_timeout` of every connection of the service, in ms.
const IDLE_IN_TRANSACTION_TIMEOUT_MS: &str = "10000";

/// Connection options from a URL, with the application name set so `pg_stat_activity`
/// shows who is connected.
pub fn connect_options(url: &str, application_name: &str) -> Result<PgConnectOptions, StorageError> {
    let options: PgConnectOptions = url.parse().map_err(|_| StorageError::InvalidUrl)?;
    // No transaction of ours waits on anything outside Postgres (provider calls happen between
    // transactions), so one idle for 10 s belongs to a frozen or partitioned process: Postgres
    // ends it, and its row locks stop blocking the workers that took over its leases.
    // Keepalives from Postgres' side: a process that vanished (a lost node) leaves its
    // session, and any advisory lock it held (the outbox relay's, a worker id's), until the
    // server notices; with the system default that is two hours, here about a minute.
    Ok(options.application_name(application_name).options([
        ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_TIMEOUT_MS),
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
    ]))
}

/// A pooled connection idle for less than this is handed out without a PING first.
const ALIVE_BYPASS: Duration = Duration::from_secs(1);

/// Opens a pool. Does not wait for the database to answer: start-up checks it explicitly
/// so the error names the dependency.
///
/// sqlx PINGs every connection it hands out; on the hot paths, which check out a connection
/// per transaction, that round trip cost as much as the transaction's own statements. As
/// HikariCP does, a connection used within the last second is trusted: one that broke in
/// that second fails its statement, which every caller already treats as transient (the
/// stream retries its batch, the worker its job, the API answers 503).
pub fn pool(url: &str, application_name: &str, max_connections: u32) -> Result<PgPool, StorageError> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Some(Duration::from_secs(300)))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= ALIVE_BYPASS {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(connect_options(url, application_name)?))
}

/// Runs `work` on a connection of `pool` within `deadline`. Work that passes it is dropped
/// and its connection [abandoned](abandon): sqlx has no client-side keepalive, and a
/// statement sent to a server gone in a failover, its socket left open, waits for ever.
/// The work may still have committed on the server: callers must be able to tell (a fence,
/// a lease) when they retry.
pub async fn with_deadline<T, E>(
    pool: &PgPool,
    deadline: Duration,
    work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StorageError>,
{
    let mut conn = pool.acquire().await.map_err(|e| E::from(StorageError::from(e)))?;
    match tokio::time::timeout(deadline, work(&mut conn)).await {
        Ok(result) => result,
        Err(_) => Err(E::from(abandon(conn, deadline))),
    }
}

/// The error for work on `conn` that passed `deadline`. The connection leaves the pool and
/// is closed: returned, sqlx would ping it first, and a peer gone in a failover (sqlx has no
/// client-side keepalive) never answers, holding a pool slot until TCP gives up (minutes).
pub fn abandon(conn: sqlx::pool::PoolConnection<sqlx::Postgres>, deadline: Duration) -> StorageError {
    drop(conn.detach());
    StorageError::Unavailable(format!("no answer from Postgres within {} s", deadline.as_secs()))
}

/// Applies every migration not yet applied. Safe to run concurrently from several processes
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StorageError> {
    MIGRATOR.run(pool).await.map_err(StorageError::from)
}

/// The transaction's start time on Postgres' clock: decisions about deadlines that
/// Postgres also enforces (claim expiry runs on its `now()`) are taken on the same clock, not
/// on this process's, which may be off by any skew.
pub async fn transaction_time(
    conn: &mut sqlx::PgConnection,
) -> Result<chrono::DateTime<chrono::Utc>, StorageError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(conn).await?)
}

/// A round trip, for readiness: also refused while the server only reads (a standby, or a
/// primary caught mid-failover), where every write of ours would fail.
pub async fn ping(pool: &PgPool) -> Result<(), StorageError> {
    let read_only: String = sqlx::query_scalar("SHOW transaction_read_only").fetch_one(pool).await?;
    if read_only == "on" {
        return Err(StorageError::Unavailable("the database accepts no writes (read-only)".into()));
    }
    Ok(())
}
