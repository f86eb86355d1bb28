//! Topics as code (SPEC §2): the files in `topics/` (embedded in the binary) describe each
//! topic; [`apply`] creates the missing ones and reports how existing ones differ.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer};
use serde::Deserialize;

use crate::config::Topics;

const FILES: [&str; 4] = [
    include_str!("../topics/payment.succeeded.v1.json"),
    include_str!("../topics/merchant.cdc.v1.json"),
    include_str!("../topics/invoice.events.v1.json"),
    include_str!("../topics/invoice.deadletter.v1.json"),
];

const TIMEOUT: Duration = Duration::from_secs(15);

/// One topic's definition, as in its file under `topics/`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// Which of the service's topics this is: `payment`, `merchant_cdc`, `events`, `deadletter`.
    pub role: String,
    /// Default name (configuration may override it).
    pub name: String,
    /// Human description.
    pub description: String,
    /// Partition count.
    pub partitions: i32,
    /// Wanted replication factor (capped at the broker count when applied).
    pub replication_factor: i32,
    /// Topic-level configuration.
    pub config: BTreeMap<String, String>,
    /// The key's description and JSON Schema.
    pub key: serde_json::Value,
    /// The value's JSON Schema.
    pub value_schema: serde_json::Value,
    /// An example message value.
    pub example: serde_json::Value,
    /// Headers the messages carry, name → description.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `in` (consumed by the service) or `out` (produced by it).
    pub direction: String,
}

/// The AsyncAPI 3.0 document of the topics (what upstream and downstream teams read):
/// channels with their Kafka bindings, the service's operations on them, and each message's
/// key, headers, payload schema and example. Generated from `topics/`; `docs/asyncapi.json`
/// is this output, and a test keeps the two equal.
pub fn asyncapi(specs: &[TopicSpec]) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for spec in specs {
        let id = camel(&spec.role);
        let message_name =
            spec.value_schema["title"].as_str().map_or_else(|| format!("{id}Message"), str::to_owned);
        // The payload schemas are JSON Schema 2020-12 documents; AsyncAPI's schema object is
        // JSON Schema draft-07 based, so the document-level keywords stay out.
        let mut payload = spec.value_schema.clone();
        if let Some(object) = payload.as_object_mut() {
            object.remove("$schema");
            object.remove("$id");
        }
        let mut message = json!({
            "name": message_name,
            "title": message_name,
            "summary": spec.description,
            "contentType": "application/json",
            "payload": payload,
            "bindings": {"kafka": {
                "key": spec.key.get("schema").cloned().unwrap_or_else(|| json!({})),
                "bindingVersion": "0.5.0"
            }},
            "examples": [{"name": "example", "payload": spec.example}],
        });
        if let Some(key) = spec.key.get("description").and_then(Value::as_str) {
            message["description"] = json!(format!("Key: {key}"));
        }
        if !spec.headers.is_empty() {
            let properties: Map<String, Value> = spec
                .headers
                .iter()
                .map(|(name, description)| {
                    (name.clone(), json!({"type": "string", "description": description}))
                })
                .collect();
            let required: Vec<&String> = spec.headers.keys().collect();
            message["headers"] = json!({"type": "object", "properties": properties, "required": required});
        }
        messages.insert(message_name.clone(), message);
        let mut topic_configuration = Map::new();
        if let Some(policy) = spec.config.get("cleanup.policy") {
            topic_configuration.insert("cleanup.policy".into(), json!(policy.split(',').collect::<Vec<_>>()));
        }
        if let Some(retention) = spec.config.get("retention.ms").and_then(|r| r.parse::<i64>().ok()) {
            topic_configuration.insert("retention.ms".into(), json!(retention));
        }
        channels.insert(
            id.clone(),
            json!({
                "address": spec.name,
                "title": spec.name,
                "description": spec.description,
                "messages": {message_name.clone(): {"$ref": format!("#/components/messages/{message_name}")}},
                "bindings": {"kafka": {
                    "topic": spec.name,
                    "partitions": spec.partitions,
                    "replicas": spec.replication_factor,
                    "topicConfiguration": topic_configuration,
                    "bindingVersion": "0.5.0"
                }},
            }),
        );
        let (action, verb) =
            if spec.direction == "in" { ("receive", "consume") } else { ("send", "publish") };
        operations.insert(
            format!("{verb}{}", upper_first(&id)),
            json!({
                "action": action,
                "channel": {"$ref": format!("#/channels/{id}")},
                "summary": format!("invoice {}s {}", verb, spec.name),
                "messages": [{"$ref": format!("#/channels/{id}/messages/{message_name}")}],
            }),
        );
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "invoice: Kafka topics",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The topics the invoice service consumes (payments, merchant CDC) and produces (invoice lifecycle events, dead letters). Generated by `invoice topics asyncapi` from topics/; partition counts and configuration are what `invoice topics apply` creates.",
        },
        "defaultContentType": "application/json",
        "servers": {"kafka": {
            "host": "kafka-bootstrap:9092",
            "protocol": "kafka",
            "description": "The cluster's bootstrap servers (APP_ENV_INVOICE_KAFKA_BROKERS).",
        }},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    })
}

/// `merchant_cdc` → `merchantCdc`.
fn camel(role: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in role.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn upper_first(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
}

/// Errors of topic administration.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// A file in `topics/` is malformed (a build defect; tests catch it).
    #[error("topic definition {file}: {reason}")]
    Definition {
        /// Which file.
        file: usize,
        /// What is wrong.
        reason: String,
    },
    /// The broker refused or did not answer.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Creating one topic failed.
    #[error("creating topic {topic}: {code:?}")]
    Create {
        /// The topic.
        topic: String,
        /// Kafka's error code.
        code: RDKafkaErrorCode,
    },
}

/// The topic definitions, with names taken from the configuration.
pub fn specs(names: &Topics) -> Result<Vec<TopicSpec>, TopicsError> {
    FILES
        .iter()
        .enumerate()
        .map(|(file, text)| {
            let mut spec: TopicSpec = serde_json::from_str(text)
                .map_err(|e| TopicsError::Definition { file, reason: e.to_string() })?;
            spec.name = match spec.role.as_str() {
                "payment" => names.payment.clone(),
                "merchant_cdc" => names.merchant_cdc.clone(),
                "events" => names.events.clone(),
                "deadletter" => names.deadletter.clone(),
                other => {
                    return Err(TopicsError::Definition { file, reason: format!("unknown role `{other}`") })
                }
            };
            Ok(spec)
        })
        .collect()
}

/// What `apply` found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    /// Created as defined.
    Created {
        /// Replication factor actually used (capped at the broker count).
        replication: i32,
    },
    /// Exists and matches.
    Unchanged,
    /// Exists and differs; each string is one difference.
    Differs(Vec<String>),
}

/// The result of `apply` for every topic, in definition order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// `(topic name, outcome)`.
    pub topics: Vec<(String, TopicOutcome)>,
}

impl ApplyReport {
    /// Whether any existing topic differs from its definition.
    pub fn has_differences(&self) -> bool {
        self.topics.iter().any(|(_, o)| matches!(o, TopicOutcome::Differs(_)))
    }
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, outcome) in &self.topics {
            match outcome {
                TopicOutcome::Created { replication } => {
                    writeln!(f, "created   {name} (replication {replication})")?
                }
                TopicOutcome::Unchanged => writeln!(f, "ok        {name}")?,
                TopicOutcome::Differs(diffs) => {
                    for diff in diffs {
                        writeln!(f, "differs   {name}: {diff}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// An admin client for the cluster `kafka` names.
pub fn admin_client(kafka: &crate::config::Kafka) -> Result<AdminClient<DefaultClientContext>, TopicsError> {
    Ok(kafka.client_config().create()?)
}

/// Creates the missing topics and compares the existing ones with their definitions.
/// The replication factor is capped at the number of brokers, so a single local broker works.
pub async fn apply(kafka: &crate::config::Kafka, specs: &[TopicSpec]) -> Result<ApplyReport, TopicsError> {
    let admin = admin_client(kafka)?;
    // Metadata requests block; they run on a client of their own off the async threads.
    let probe: BaseProducer = kafka.client_config().create()?;
    let probe = std::sync::Arc::new(probe);
    let brokers_count = metadata(&probe, None).await?.brokers().len().max(1) as i32;
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
    let mut report = Vec::new();
    for spec in specs {
        let replication = spec.replication_factor.min(brokers_count);
        let outcome = match describe(&probe, &spec.name).await? {
            Some(existing) => compare(&admin, &options, spec, replication, existing).await?,
            None => match create(&admin, &options, spec, replication).await? {
                Created::Now => {
                    wait_until_visible(&probe, spec).await?;
                    tracing::info!(topic = %spec.name, partitions = spec.partitions, replication, "Created topic");
                    TopicOutcome::Created { replication }
                }
                // Created concurrently by someone else: compare like any existing topic.
                Created::AlreadyExisted => {
                    let existing = wait_until_visible(&probe, spec).await?;
                    compare(&admin, &options, spec, replication, existing).await?
                }
            },
        };
        report.push((spec.name.clone(), outcome));
    }
    Ok(ApplyReport { topics: report })
}

/// Partition count and replication factor of a topic as the broker reports it.
#[derive(Debug, Clone, Copy)]
struct Existing {
    partitions: i32,
    replication: i32,
}

async fn metadata(
    probe: &std::sync::Arc<BaseProducer>,
    topic: Option<&str>,
) -> Result<rdkafka::metadata::Metadata, TopicsError> {
    let probe = probe.clone();
    let topic = topic.map(str::to_owned);
    Ok(tokio::task::spawn_blocking(move || probe.client().fetch_metadata(topic.as_deref(), TIMEOUT))
        .await
        .map_err(|_| rdkafka::error::KafkaError::Canceled)??)
}

/// The topic as the broker sees it, or `None` if it does not exist. A topic whose metadata
/// is not settled yet (just created, leader not elected) counts as existing only once
/// every partition has a leader.
async fn describe(probe: &std::sync::Arc<BaseProducer>, name: &str) -> Result<Option<Existing>, TopicsError> {
    let md = metadata(probe, Some(name)).await?;
    let Some(topic) = md.topics().iter().find(|t| t.name() == name) else { return Ok(None) };
    if topic.error().is_some()
        || topic.partitions().is_empty()
        || topic.partitions().iter().any(|p| p.leader() < 0)
    {
        return Ok(None);
    }
    Ok(Some(Existing {
        partitions: topic.partitions().len() as i32,
        replication: topic.partitions().first().map(|p| p.replicas().len() as i32).unwrap_or(0),
    }))
}

async fn wait_until_visible(
    probe: &std::sync::Arc<BaseProducer>,
    spec: &TopicSpec,
) -> Result<Existing, TopicsError> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(existing) = describe(probe, &spec.name).await? {
            return Ok(existing);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TopicsError::Create {
                topic: spec.name.clone(),
                code: RDKafkaErrorCode::LeaderNotAvailable,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

enum Created {
    Now,
    AlreadyExisted,
}

async fn create(
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    spec: &TopicSpec,
    replication: i32,
) -> Result<Created, TopicsError> {
    // min.insync.replicas above the replication factor would make every produce fail; it is
    // capped like the replication factor.
    let min_isr = wanted_value(spec, "min.insync.replicas", replication);
    let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(replication));
    for key in spec.config.keys() {
        if let Some(value) = min_isr.as_ref().filter(|_| key == "min.insync.replicas") {
            topic = topic.set(key, value);
        } else if let Some(value) = spec.config.get(key) {
            topic = topic.set(key, value);
        }
    }
    for result in admin.create_topics([&topic], options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(Created::AlreadyExisted),
            Err((topic, code)) => return Err(TopicsError::Create { topic, code }),
        }
    }
    Ok(Created::Now)
}

/// The value a topic should have for `key`, after capping `min.insync.replicas`.
fn wanted_value(spec: &TopicSpec, key: &str, replication: i32) -> Option<String> {
    let value = spec.config.get(key)?;
    if key == "min.insync.replicas" {
        return Some(
            value.parse::<i32>().map(|v| v.min(replication).to_string()).unwrap_or_else(|_| value.clone()),
        );
    }
    Some(value.clone())
}

async fn compare(
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    spec: &TopicSpec,
    replication: i32,
    existing: Existing,
) -> Result<TopicOutcome, TopicsError> {
    let mut diffs = Vec::new();
    if existing.partitions != spec.partitions {
        diffs.push(format!("partitions {}, defined {}", existing.partitions, spec.partitions));
    }
    if existing.replication != replication {
        diffs.push(format!("replication {}, defined {replication}", existing.replication));
    }
    let configs = admin.describe_configs([&ResourceSpecifier::Topic(&spec.name)], options).await?;
    if let Some(Ok(resource)) = configs.into_iter().next() {
        for key in spec.config.keys() {
            let wanted = wanted_value(spec, key, replication).unwrap_or_default();
            let actual = resource.get(key).and_then(|entry| entry.value.clone());
            if actual.as_deref() != Some(wanted.as_str()) {
                diffs.push(format!("{key} = {}, defined {wanted}", actual.as_deref().unwrap_or("(unset)")));
            }
        }
    }
    Ok(if diffs.is_empty() { TopicOutcome::Unchanged } else { TopicOutcome::Differs(diffs) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_definition_parses_and_follows_the_configured_names() {
        let names = Topics {
            payment: "a".into(),
            merchant_cdc: "b".into(),
            events: "c".into(),
            deadletter: "d".into(),
        };
        let specs = specs(&names).unwrap();
        let got: Vec<(&str, &str)> = specs.iter().map(|s| (s.role.as_str(), s.name.as_str())).collect();
        assert_eq!(got, vec![("payment", "a"), ("merchant_cdc", "b"), ("events", "c"), ("deadletter", "d")]);
        let cdc = &specs[1];
        assert_eq!(cdc.config.get("cleanup.policy").map(String::as_str), Some("compact"));
        for spec in &specs {
            assert!(spec.partitions > 0 && spec.replication_factor > 0, "{}", spec.role);
            assert!(spec.config.contains_key("retention.ms"), "{}", spec.role);
        }
    }

    #[test]
    fn default_names_match_the_spec() {
        let names: Vec<String> = specs(&Topics::default()).unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["payment.succeeded.v1", "merchant.cdc.v1", "invoice.events.v1", "invoice.deadletter.v1"]
        );
    }
}
