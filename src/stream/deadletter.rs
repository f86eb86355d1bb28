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
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: json!({
            "x-error": reason.sanitized(),
            "x-source-topic": message.topic(),
            "x-source-partition": message.partition().to_string(),
            "x-source-offset": message.offset().to_string(),
        }),
        has_secret: false,
    }
}
