//! The harness itself: isolation between tests and the Kafka helpers work.

use std::time::Duration;

use crate::support::kafka::{produce, producer, read_all, TestTopics};
use crate::support::{wait_until, TestDb};

#[tokio::test]
async fn each_test_database_is_private_and_migrated() {
    let a = TestDb::create().await;
    let b = TestDb::create().await;
    assert_ne!(a.name, b.name);
    assert_eq!(a.count("admin_province").await, 34);
    sqlx::query("INSERT INTO permission (code, description) VALUES ('x:y', 'only in a')")
        .execute(&a.pool)
        .await
        .unwrap();
    assert_eq!(a.count("permission").await, 6);
    assert_eq!(b.count("permission").await, 5);
}

#[tokio::test]
async fn a_dropped_test_database_is_gone() {
    let db = TestDb::create().await;
    let name = db.name.clone();
    let admin =
        sqlx::PgPool::connect(&format!("{}/postgres", crate::support::pg_server_url())).await.unwrap();
    drop(db);
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn private_topics_carry_messages_with_headers() {
    let topics = TestTopics::create(3).await;
    let producer = producer();
    for i in 0..6 {
        let key = format!("ORD-{i}");
        produce(
            &producer,
            &topics.names.payment,
            &key,
            Some(format!("{{\"n\":{i}}}").as_bytes()),
            &[("h", "v")],
        )
        .await;
    }
    produce(&producer, &topics.names.merchant_cdc, "k", None, &[]).await;
    let name = topics.names.payment.clone();
    let got = tokio::task::spawn_blocking(move || read_all(&name, 6, Duration::from_secs(20))).await.unwrap();
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|m| m.headers == vec![("h".to_owned(), "v".to_owned())]));
    let name = topics.names.merchant_cdc.clone();
    let tomb =
        tokio::task::spawn_blocking(move || read_all(&name, 1, Duration::from_secs(20))).await.unwrap();
    assert_eq!(tomb.len(), 1);
    assert!(tomb[0].value.is_none(), "a tombstone has no value");
}

#[tokio::test]
async fn wait_until_returns_the_awaited_value() {
    let mut n = 0;
    let got = wait_until(Duration::from_secs(1), "n to reach 3", || {
        n += 1;
        let n = n;
        async move { (n >= 3).then_some(n) }
    })
    .await;
    assert_eq!(got, 3);
}
