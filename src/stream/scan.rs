//! Reading a topic to its current end outside the consumer group (operator commands:
//! `tax-drift`, `deadletters`): a throwaway group id, nothing committed, every partition from
//! a chosen offset up to the high watermark seen at the start.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};

/// Calls `each` for every message of `topic` from `start(low, high)` (per partition) to the
/// high watermark each partition had when the scan began; returns how many were read.
/// Blocking: call from `spawn_blocking`. Fails if the topic does not exist or reading makes
/// no progress for 30 s.
pub fn to_end(
    kafka: &crate::config::Kafka,
    topic: &str,
    start: impl Fn(i64, i64) -> i64,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", format!("invoice-scan-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        // The end of a partition is reported even when its last offset is never delivered
        // (a transaction marker, a record compacted away).
        .set("enable.partition.eof", "true")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    if metadata.topics().iter().all(|t| t.error().is_some()) {
        anyhow::bail!("topic {topic} does not exist on the broker");
    }
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            if high > low {
                ends.insert(p.id(), high);
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(start(low, high).clamp(low, high)))?;
            }
        }
    }
    consumer.assign(&tpl)?;
    let mut read = 0u64;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                read += 1;
                each(&message);
                if ends.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                    ends.remove(&message.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                last_progress = Instant::now();
                ends.remove(&partition);
            }
            Some(Err(error)) => anyhow::bail!("reading {topic}: {error}"),
            None if last_progress.elapsed() > Duration::from_secs(30) => {
                anyhow::bail!("reading {topic}: no progress for 30 s")
            }
            None => {}
        }
    }
    Ok(read)
}
