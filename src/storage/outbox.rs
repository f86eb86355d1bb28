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

/// The oldest `limit` unpublished, not parked rows, in id order.
pub async fn pending(pool: &PgPool, limit: i64) -> Result<Vec<Pending>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT id, event_id, topic, message_key, payload, headers FROM outbox
         WHERE published_at IS NULL AND attempts < $2 ORDER BY id LIMIT $1",
    )
    .bind(limit)
    .bind(PARK_AFTER_ATTEMPTS)
    .fetch_all(pool)
    .await?)
}

/// Records a failed publication of a row.
pub async fn mark_failed(pool: &PgPool, id: i64, error: &str) -> Result<(), StorageError> {
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

/// Rows parked after too many failed attempts.
pub async fn parked(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND attempts >= $1")
        .bind(PARK_AFTER_ATTEMPTS)
        .fetch_one(pool)
        .await?)
}

/// Marks rows published; rows that carried a secret lose their payload now (SPEC §2: the
/// clear claim token lives only until it is published).
pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<(), StorageError> {
    sqlx::query(
        "UPDATE outbox SET published_at = now(),
             payload = CASE WHEN has_secret THEN NULL ELSE payload END, has_secret = FALSE
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Unpublished rows (for the backlog gauge).
pub async fn backlog(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetch_one(pool).await?)
}

/// Deletes published rows older than `hours` hours, at most `limit` at a time.
pub async fn prune(pool: &PgPool, hours: i32, limit: i64) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
             WHERE published_at < now() - make_interval(hours => $1) ORDER BY id LIMIT $2)",
    )
    .bind(hours)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Tries to become the single relay (advisory lock on a connection the caller keeps).
pub async fn try_lead(conn: &mut PgConnection) -> Result<bool, StorageError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock(7315003)").fetch_one(conn).await?)
}
