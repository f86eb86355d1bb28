//! The outbox relay against the real broker: an order's events keep their order even when
//! one of them cannot be published.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use invoice::metrics::Metrics;
use invoice::storage::outbox::PARK_AFTER_ATTEMPTS;

use crate::support::kafka::{producer, read_to_end, TestTopics};
use crate::support::TestDb;

async fn insert(db: &TestDb, topic: &str, key: &str, payload: &[u8]) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (event_id, topic, message_key, payload)
         VALUES (gen_random_uuid(), $1, convert_to($2, 'UTF8'), $3) RETURNING id",
    )
    .bind(topic)
    .bind(key)
    .bind(payload)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn values(topic: &str) -> Vec<String> {
    read_to_end(topic, Duration::from_secs(20))
        .into_iter()
        .map(|m| String::from_utf8(m.value.unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_later_event_of_an_order_waits_for_an_earlier_one_that_failed() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let events = topics.names.events.clone();
    let producer = producer();
    let metrics = Metrics::new();
    let mut leader = PgConnection::connect(&db.url).await.unwrap();

    // Larger than the producer takes (message.max.bytes): it fails on every attempt.
    let too_large = insert(&db, &events, "ORD-1", &vec![b'x'; 2 << 20]).await;
    let later = insert(&db, &events, "ORD-1", b"ORD-1 second").await;
    let other = insert(&db, &events, "ORD-2", b"ORD-2 first").await;

    let published = invoice::outbox::publish_once(&db.pool, &producer, &metrics, &mut leader).await.unwrap();
    assert_eq!(published, 1, "only the other order's event goes out");
    let left: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempts FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(left, vec![(too_large, 1), (later, 0)], "the later event was not even attempted");
    assert!(!left.iter().any(|(id, _)| *id == other));
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    assert_eq!(sent, vec!["ORD-2 first"]);

    // The row at fault is parked after its attempts; only then does its order's next event go.
    let mut passes = 1;
    while scalar(&db, "SELECT count(*) FROM outbox").await > 1 && passes < 3 * PARK_AFTER_ATTEMPTS {
        invoice::outbox::publish_once(&db.pool, &producer, &metrics, &mut leader).await.unwrap();
        passes += 1;
    }
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox WHERE id = $1")
            .bind(too_large)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, PARK_AFTER_ATTEMPTS, "parked after its own failures");
    assert!(error.to_lowercase().contains("too large"), "{error}");
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 1, "the later event is published");
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    assert_eq!(sent, vec!["ORD-2 first", "ORD-1 second"]);
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}
