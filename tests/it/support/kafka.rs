//! Kafka helpers: private topics per test, produce, and read back.

use std::time::Duration;

use invoice::config::Topics;
use rdkafka::admin::AdminOptions;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::kafka_brokers;

/// The service's four topics under names private to one test; deleted on drop.
pub struct TestTopics {
    /// The names, to put into the service's configuration.
    pub names: Topics,
}

impl TestTopics {
    /// Creates the four topics with `partitions` partitions each (through `topics::apply`).
    pub async fn create(partitions: i32) -> TestTopics {
        let prefix = super::unique("it-");
        let names = Topics::prefixed(&prefix);
        let mut specs = invoice::topics::specs(&names).unwrap();
        for spec in &mut specs {
            spec.partitions = partitions;
        }
        invoice::topics::apply(&crate::support::kafka(), &specs).await.unwrap();
        TestTopics { names }
    }

    fn all(&self) -> [String; 4] {
        [
            self.names.payment.clone(),
            self.names.merchant_cdc.clone(),
            self.names.events.clone(),
            self.names.deadletter.clone(),
        ]
    }
}

impl Drop for TestTopics {
    fn drop(&mut self) {
        let topics = self.all();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(admin) = invoice::topics::admin_client(&crate::support::kafka()) {
                    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
                }
            });
        })
        .join();
    }
}

/// A producer for tests.
pub fn producer() -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", kafka_brokers()).set("acks", "all").create().unwrap()
}

/// Produces one message (value `None` = tombstone) and waits for the ack.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    value: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> (i32, i64) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header { key: k, value: Some(*v) });
    }
    let mut record = FutureRecord::<str, [u8]>::to(topic).key(key).headers(owned);
    if let Some(value) = value {
        record = record.payload(value);
    }
    producer.send(record, Duration::from_secs(10)).await.map(|d| (d.partition, d.offset)).unwrap()
}

/// A message read back.
#[derive(Debug, Clone)]
pub struct Received {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers as (name, value).
    pub headers: Vec<(String, String)>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A consumer outside any real group, for reading topics back.
fn reader() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", super::unique("it-reader-"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Reads every partition of `topic` from the beginning until `expected` messages arrived or
/// `timeout` passed; returns what arrived (the caller asserts).
pub fn read_all(topic: &str, expected: usize, timeout: Duration) -> Vec<Received> {
    let consumer = reader();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Received {
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
                partition: m.partition(),
                offset: m.offset(),
            });
        }
    }
    out
}

/// Reads every message of `topic` up to its current high watermarks (all partitions).
pub fn read_to_end(topic: &str, timeout: Duration) -> Vec<Received> {
    let consumer = reader();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut expected = 0usize;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
            expected += (high - low) as usize;
        }
    }
    drop(consumer);
    read_all(topic, expected, timeout)
}
