//! `invoice offsets show|reset`: the operator's view and control of the consumer's stored
//! positions. Postgres holds the truth (SPEC §1.1); Kafka's committed offsets are a mirror,
//! so `kafka-consumer-groups --reset-offsets` cannot move this service: this does.

use std::time::Duration;

use crate::config::Kafka;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::storage::decisions::{insert_audits, NewAudit};

const TIMEOUT: Duration = Duration::from_secs(10);

/// `(topic, partition, committed mirror, log start, high watermark)` as the broker says.
type KafkaSide = (String, i32, Option<i64>, i64, i64);

/// One partition's positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Our stored next offset (the truth); `None`: never processed.
    pub stored: Option<i64>,
    /// Kafka's committed offset for the group (the mirror).
    pub kafka_committed: Option<i64>,
    /// First offset still in the log.
    pub log_start: i64,
    /// High watermark (next offset to be written).
    pub high_watermark: i64,
    /// Messages not yet processed.
    pub lag: i64,
}

/// Where a reset moves a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The first offset still in the log.
    Earliest,
    /// The high watermark: skip everything not yet processed.
    Latest,
    /// The first message at or after this time (Unix ms); the high watermark if none.
    Datetime(i64),
    /// This offset, clamped into the log.
    Offset(i64),
}

/// The lag of a partition from its positions: from the stored offset if any, else from where
/// a first assignment would start (Kafka's committed offset, else the log start).
pub fn lag(stored: Option<i64>, committed: Option<i64>, log_start: i64, high: i64) -> i64 {
    let from = stored.or(committed).unwrap_or(log_start).max(log_start);
    (high - from).max(0)
}

/// The offset a reset to `target` gives, within `[log_start, high]`; `at_time` is what the
/// broker answered for a datetime target.
pub fn resolve(target: Target, log_start: i64, high: i64, at_time: Option<i64>) -> i64 {
    let wanted = match target {
        Target::Earliest => log_start,
        Target::Latest => high,
        Target::Datetime(_) => at_time.unwrap_or(high),
        Target::Offset(n) => n,
    };
    wanted.clamp(log_start, high.max(log_start))
}

fn consumer(kafka: &Kafka, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(kafka.client_config().set("group.id", group).set("enable.auto.commit", "false").create()?)
}

/// Positions of every partition of `topics` for `group`.
pub async fn show(
    db: &PgPool,
    kafka: &Kafka,
    group: &str,
    topics: &[String],
) -> anyhow::Result<Vec<Position>> {
    let (settings, group_name, topics_owned) = (kafka.clone(), group.to_owned(), topics.to_vec());
    let kafka = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<KafkaSide>> {
        let consumer = consumer(&settings, &group_name)?;
        let mut out = Vec::new();
        for topic in &topics_owned {
            let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                anyhow::bail!("topic {topic} does not exist on the broker");
            }
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(topic, *p);
            }
            let committed = consumer.committed_offsets(tpl, TIMEOUT)?;
            for p in partitions {
                let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
                let mirror = committed.find_partition(topic, p).and_then(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
                out.push((topic.clone(), p, mirror, low, high));
            }
        }
        Ok(out)
    })
    .await??;
    let mut positions = Vec::new();
    for (topic, partition, committed, low, high) in kafka {
        let stored =
            crate::storage::offsets::load(db, group, &topic, &[partition]).await?.get(&partition).copied();
        positions.push(Position {
            lag: lag(stored, committed, low, high),
            topic,
            partition,
            stored,
            kafka_committed: committed,
            log_start: low,
            high_watermark: high,
        });
    }
    Ok(positions)
}

/// The members of `group` the broker knows (a running stream has at least one).
pub async fn group_members(kafka: &Kafka, group: &str) -> anyhow::Result<usize> {
    let (settings, group) = (kafka.clone(), group.to_owned());
    tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let consumer = consumer(&settings, &format!("{group}-admin"))?;
        let list = consumer.fetch_group_list(Some(&group), TIMEOUT)?;
        Ok(list.groups().iter().map(|g| g.members().len()).sum())
    })
    .await?
}

/// One partition's planned move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Move {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Stored next offset before.
    pub from: Option<i64>,
    /// After.
    pub to: i64,
}

/// The moves a reset of `topic` (one partition or all) to `target` makes.
pub async fn plan(
    db: &PgPool,
    kafka: &Kafka,
    group: &str,
    topic: &str,
    partition: Option<i32>,
    target: Target,
) -> anyhow::Result<Vec<Move>> {
    let positions = show(db, kafka, group, &[topic.to_owned()]).await?;
    let selected: Vec<Position> =
        positions.into_iter().filter(|p| partition.is_none_or(|want| want == p.partition)).collect();
    if selected.is_empty() {
        anyhow::bail!("topic {topic} has no partition {}", partition.unwrap_or(-1));
    }
    let at_time: Vec<Option<i64>> = match target {
        Target::Datetime(ms) => {
            let (settings, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
            let parts: Vec<i32> = selected.iter().map(|p| p.partition).collect();
            tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Option<i64>>> {
                let consumer = consumer(&settings, &group)?;
                let mut tpl = TopicPartitionList::new();
                for p in &parts {
                    tpl.add_partition_offset(&topic, *p, Offset::Offset(ms))?;
                }
                let found = consumer.offsets_for_times(tpl, TIMEOUT)?;
                Ok(parts
                    .iter()
                    .map(|p| match found.find_partition(&topic, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(n)) => Some(n),
                        _ => None,
                    })
                    .collect())
            })
            .await??
        }
        _ => vec![None; selected.len()],
    };
    Ok(selected
        .into_iter()
        .zip(at_time)
        .map(|(p, at)| Move {
            to: resolve(target, p.log_start, p.high_watermark, at),
            topic: p.topic,
            partition: p.partition,
            from: p.stored,
        })
        .collect())
}

/// Applies `moves` in one transaction with an audit row each, then mirrors them to Kafka's
/// committed offsets (best effort: the group may have members; Postgres is the truth).
pub async fn apply(
    db: &PgPool,
    kafka: &Kafka,
    group: &str,
    moves: &[Move],
    actor: &str,
    forced: bool,
) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    let mut audits = Vec::new();
    for m in moves {
        sqlx::query(
            "INSERT INTO consumer_offset (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(group)
        .bind(&m.topic)
        .bind(m.partition)
        .bind(m.to)
        .execute(&mut *tx)
        .await?;
        audits.push(NewAudit {
            entity: "offsets",
            entity_id: format!("{group}/{}/{}", m.topic, m.partition),
            invoice_id: None,
            merchant_id: None,
            order_id: None,
            event_type: "offsets_reset",
            outcome: m.to.to_string(),
            before: Some(json!({"nextOffset": m.from})),
            after: Some(json!({"nextOffset": m.to})),
            actor: actor.to_owned(),
            reason: Some(
                if forced { "operator reset (--force, consumers were running)" } else { "operator reset" }
                    .into(),
            ),
        });
    }
    insert_audits(&mut tx, &audits).await?;
    tx.commit().await?;
    let (settings, group, moves) = (kafka.clone(), group.to_owned(), moves.to_vec());
    let mirrored = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let consumer = consumer(&settings, &group)?;
        let mut tpl = TopicPartitionList::new();
        for m in &moves {
            tpl.add_partition_offset(&m.topic, m.partition, Offset::Offset(m.to))?;
        }
        consumer.commit(&tpl, CommitMode::Sync)?;
        Ok(())
    })
    .await?;
    if let Err(error) = mirrored {
        tracing::warn!(error = %error, "Stored offsets moved; Kafka's mirror was not updated (it will be on the next commit)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_stored_offset_else_where_a_first_start_would_begin() {
        assert_eq!(lag(Some(40), Some(10), 0, 100), 60);
        assert_eq!(lag(None, Some(10), 0, 100), 90);
        assert_eq!(lag(None, None, 20, 100), 80);
        // Retention deleted what was never processed: counted from the log start.
        assert_eq!(lag(Some(5), None, 20, 100), 80);
        assert_eq!(lag(Some(100), None, 0, 100), 0);
    }

    #[test]
    fn targets_resolve_into_the_log() {
        assert_eq!(resolve(Target::Earliest, 20, 100, None), 20);
        assert_eq!(resolve(Target::Latest, 20, 100, None), 100);
        assert_eq!(resolve(Target::Offset(5), 20, 100, None), 20);
        assert_eq!(resolve(Target::Offset(500), 20, 100, None), 100);
        assert_eq!(resolve(Target::Offset(50), 20, 100, None), 50);
        assert_eq!(resolve(Target::Datetime(1), 20, 100, Some(42)), 42);
        assert_eq!(resolve(Target::Datetime(1), 20, 100, None), 100);
    }
}
