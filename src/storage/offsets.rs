//! Consumer offsets, the truth for where each partition resumes (SPEC §1.1). "Next offset"
//! semantics everywhere: the stored value is the first offset not yet processed.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

use super::StorageError;

/// Stored next offsets of `partitions` of `topic` for `group` (absent: never processed).
pub async fn load(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, StorageError> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offset
         WHERE group_id = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Compare-and-set of a partition's next offset: moves it from `expected` (`None`: no row
/// yet) to `next`. Returns `false` if another owner moved it first; the caller must roll
/// back. Run it first in the batch transaction: the row lock it takes serialises two owners
/// of one partition, so the loser sees the winner's value and is fenced at once.
pub async fn compare_and_set(
    tx: &mut PgConnection,
    group: &str,
    topic: &str,
    partition: i32,
    expected: Option<i64>,
    next: i64,
) -> Result<bool, StorageError> {
    let rows = match expected {
        Some(expected) => {
            sqlx::query(
                "UPDATE consumer_offset SET next_offset = $5, updated_at = now()
                 WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(expected)
            .bind(next)
            .execute(&mut *tx)
            .await?
        }
        None => sqlx::query(
            "INSERT INTO consumer_offset (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (group_id, topic, partition) DO NOTHING",
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(next)
        .execute(&mut *tx)
        .await?,
    };
    Ok(rows.rows_affected() == 1)
}

/// The stored next offset of one partition.
pub async fn current(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offset WHERE group_id = $1 AND topic = $2 AND partition = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .fetch_optional(conn)
    .await?)
}
