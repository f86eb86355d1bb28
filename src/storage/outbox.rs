//! The outbox relay's queries.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use super::StorageError;

/// An unpublished outbox row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    /// Row id (publication order).
    pub id: i64,
    /// Event id.
    pub event_id: uuid::Uuid,
    /// Topic.
    pub topic: String,
    /// Key.
    pub message_key: Option<Vec<u8>>,
    /// Value.
    pub payload: Option<Vec<u8>>,
    /// Headers (string map).
    pub headers: Value,
}

/// Failed attempts after which a row is parked (left for an operator).
pub const PARK_AFTER_ATTEMPTS: i32 = 10;

// The outbox is nearly empty whenever it is analyzed and the relay keeps up, and holds a
// backlog when it does not (a burst, Kafka away). A plan cached while it was empty (a
// sequential scan) stays cached while it grows: `DELETE ... WHERE id = ANY($1)` then read the
// whole backlog once per batch, 1.2-1.5 s per 1,000 rows in `make bench`. So the relay's
// statements are not kept prepared (`persistent(false)`): each is planned with the table's
// current size, and a batch of a thousand events pays one plan per statement.

/// The relay's read (see [`pending`]): the oldest `$1` rows that are neither parked nor held
/// behind a parked row of their (topic, key), nor held by the relay itself (`$2`: their ids),
/// in id order. The attempts bound is written out: only a literal lets the planner use the
/// partial index `outbox_parked` (whose predicate migration 0021 writes with the same bound).
/// Public so that tests can check its plan.
pub static PENDING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT id, event_id, topic, message_key, payload, headers FROM outbox o
         WHERE attempts < {PARK_AFTER_ATTEMPTS}
           AND NOT EXISTS (SELECT 1 FROM outbox p
                           WHERE p.attempts >= {PARK_AFTER_ATTEMPTS} AND p.topic = o.topic
                             AND p.message_key = o.message_key AND p.id < o.id)
           AND o.id <> ALL($2::bigint[])
         ORDER BY id LIMIT $1"
    )
});

/// The oldest `limit` rows to publish, in id order: not parked, not behind a parked row of
/// their key (whose consumers would otherwise get them before it once it is handed back),
/// and not among `held` (rows the relay read and has not settled). Read on the connection
/// holding the relay's lock, so that a relay whose lock went with its connection reads, and
/// so sends, nothing.
pub async fn pending(
    conn: &mut PgConnection,
    limit: i64,
    held: &[i64],
) -> Result<Vec<Pending>, StorageError> {
    Ok(sqlx::query_as(PENDING.as_str()).persistent(false).bind(limit).bind(held).fetch_all(conn).await?)
}

/// Records failed publications: `(row id, error, whether the failure is the row's own and
/// counts toward parking it)`, in one statement.
pub async fn mark_failed(pool: &PgPool, failures: &[(i64, &str, bool)]) -> Result<(), StorageError> {
    let ids: Vec<i64> = failures.iter().map(|f| f.0).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.1).collect();
    let counts: Vec<bool> = failures.iter().map(|f| f.2).collect();
    sqlx::query(
        "UPDATE outbox o SET attempts = o.attempts + CASE WHEN f.counts THEN 1 ELSE 0 END, last_error = f.error
         FROM UNNEST($1::bigint[], $2::text[], $3::bool[]) AS f(id, error, counts) WHERE o.id = f.id",
    )
    .persistent(false)
    .bind(ids)
    .bind(errors)
    .bind(counts)
    .execute(pool)
    .await?;
    Ok(())
}

/// `(unpublished rows, rows parked after too many failed attempts)`, for the gauges: one pass
/// over the table (a backlog can be millions of rows while Kafka is away, and only parked
/// rows have an index besides the primary key), not one per count.
pub async fn backlog_and_parked(pool: &PgPool) -> Result<(i64, i64), StorageError> {
    Ok(sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE attempts >= $1) FROM outbox")
        .persistent(false)
        .bind(PARK_AFTER_ATTEMPTS)
        .fetch_one(pool)
        .await?)
}

/// Removes published rows: the events now live in Kafka, and a clear claim token leaves
/// the database with its row (SPEC §2: the token lives only until it is published).
pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<(), StorageError> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").persistent(false).bind(ids).execute(pool).await?;
    Ok(())
}

/// The `application_name` of every relay connection, leading or standing by.
pub const RELAY_APPLICATION: &str = "invoice-outbox-relay";

/// How many other relays (in this or other processes) stand by on their connection, ready to
/// lead: the leader's own connection is not counted.
pub async fn relays_standing_by(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) - 1 FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(RELAY_APPLICATION)
    .fetch_one(pool)
    .await?)
}

/// Tries to become the single relay (advisory lock on a connection the caller keeps).
pub async fn try_lead(conn: &mut PgConnection) -> Result<bool, StorageError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock(7315003)").fetch_one(conn).await?)
}
