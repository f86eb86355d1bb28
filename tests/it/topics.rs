//! `invoice topics apply` against the real broker.

use std::time::Duration;

use invoice::topics::{self, TopicOutcome};

use crate::support::kafka::read_all;
use crate::support::{base_env, invoice_cmd, kafka_brokers, unique};

fn names(prefix: &str) -> invoice::config::Topics {
    invoice::config::Topics::prefixed(prefix)
}

async fn delete(names: &invoice::config::Topics) {
    let admin = topics::admin_client(&crate::support::kafka()).unwrap();
    let list = [&names.payment, &names.merchant_cdc, &names.events, &names.deadletter];
    let list: Vec<&str> = list.iter().map(|s| s.as_str()).collect();
    admin.delete_topics(&list, &rdkafka::admin::AdminOptions::new()).await.unwrap();
}

#[tokio::test]
async fn apply_creates_missing_topics_then_finds_them_unchanged() {
    let names = names(&unique("it-apply-"));
    let specs = topics::specs(&names).unwrap();
    let first = topics::apply(&crate::support::kafka(), &specs).await.unwrap();
    assert_eq!(first.topics.len(), 4);
    for (name, outcome) in &first.topics {
        assert_eq!(outcome, &TopicOutcome::Created { replication: 1 }, "{name}");
    }
    let second = topics::apply(&crate::support::kafka(), &specs).await.unwrap();
    for (name, outcome) in &second.topics {
        assert_eq!(outcome, &TopicOutcome::Unchanged, "{name}");
    }
    assert!(!second.has_differences());

    // The partition counts and the compaction of the CDC topic are the defined ones.
    let consumer: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().unwrap();
    use rdkafka::consumer::Consumer;
    let md = consumer.fetch_metadata(Some(&names.payment), Duration::from_secs(10)).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 12);
    let md = consumer.fetch_metadata(Some(&names.merchant_cdc), Duration::from_secs(10)).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 3);
    delete(&names).await;
}

#[tokio::test]
async fn apply_reports_an_existing_topic_that_differs_and_the_cli_exits_1() {
    let prefix = unique("it-drift-");
    let names = names(&prefix);
    // Someone created the payment topic by hand with 2 partitions and a short retention.
    let mut specs = topics::specs(&names).unwrap();
    specs[0].partitions = 2;
    specs[0].config.insert("retention.ms".into(), "3600000".into());
    topics::apply(&crate::support::kafka(), &specs[..1]).await.unwrap();

    let mut env = base_env("postgres://postgres@127.0.0.1:5432/unused");
    env.insert("APP_ENV_INVOICE_TOPIC_PAYMENT".into(), names.payment.clone());
    env.insert("APP_ENV_INVOICE_TOPIC_MERCHANT_CDC".into(), names.merchant_cdc.clone());
    env.insert("APP_ENV_INVOICE_TOPIC_EVENTS".into(), names.events.clone());
    env.insert("APP_ENV_INVOICE_TOPIC_DEADLETTER".into(), names.deadletter.clone());
    let out =
        tokio::task::spawn_blocking(move || invoice_cmd(&env).args(["topics", "apply"]).output().unwrap())
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("differs   {}: partitions 2, defined 12", names.payment)), "{stdout}");
    assert!(
        stdout.contains(&format!("differs   {}: retention.ms = 3600000, defined 604800000", names.payment)),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("created   {}", names.merchant_cdc)), "{stdout}");
    // Nothing is read from the new topics: they exist and are empty.
    assert!(read_all(&names.events, 1, Duration::from_millis(500)).is_empty());
    delete(&names).await;
}
