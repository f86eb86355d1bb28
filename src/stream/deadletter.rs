//! The one place an input message becomes a dead letter (SPEC §1.4, §2): the original key
//! and value unchanged, the reason and the source in headers, written to the outbox in the
//! batch's transaction so the dead letter exists exactly when the offset moved past it.

use rdkafka::message::{Message, OwnedMessage};
use serde_json::json;

use crate::events::Invalid;
use crate::storage::decisions::NewOutbox;

/// The outbox row carrying `message` to `deadletter_topic` with `reason`.
pub fn dead_letter(deadletter_topic: &str, message: &OwnedMessage, reason: &Invalid) -> NewOutbox {
    NewOutbox {
        event_id: uuid::Uuid::new_v4(),
        topic: deadletter_topic.to_owned(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers: json!({
            "x-error": reason.sanitized(),
            "x-source-topic": message.topic(),
            "x-source-partition": message.partition().to_string(),
            "x-source-offset": message.offset().to_string(),
        }),
        has_secret: false,
    }
}

/// One message of the dead-letter topic, as `invoice deadletters` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in it.
    pub offset: i64,
    /// When it was dead-lettered (broker timestamp, ms).
    pub timestamp_ms: Option<i64>,
    /// The original key (lossy UTF-8).
    pub key: Option<String>,
    /// `x-error`: why it could not be processed.
    pub error: Option<String>,
    /// `x-source-topic`, `x-source-partition`, `x-source-offset`.
    pub source_topic: Option<String>,
    /// Source partition.
    pub source_partition: Option<String>,
    /// Source offset.
    pub source_offset: Option<String>,
    /// Payload size in bytes (the payload itself may hold personal data: not printed).
    pub payload_bytes: usize,
}

/// The newest `limit` messages of each partition of `topic`, oldest first. Blocking: call
/// from `spawn_blocking`.
pub fn recent(kafka: &crate::config::Kafka, topic: &str, limit: i64) -> anyhow::Result<Vec<DeadLetter>> {
    use rdkafka::message::Headers;
    let header = |m: &rdkafka::message::BorrowedMessage<'_>, name: &str| {
        m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    let mut out = Vec::new();
    super::scan::to_end(
        kafka,
        topic,
        |_, high| high - limit.max(1),
        |m| {
            out.push(DeadLetter {
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                error: header(m, "x-error"),
                source_topic: header(m, "x-source-topic"),
                source_partition: header(m, "x-source-partition"),
                source_offset: header(m, "x-source-offset"),
                payload_bytes: m.payload().map_or(0, <[u8]>::len),
            })
        },
    )?;
    out.sort_by_key(|d| (d.timestamp_ms, d.partition, d.offset));
    Ok(out)
}
