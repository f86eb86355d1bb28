//! Crash tests: `invoice stream` processes killed with SIGKILL at arbitrary moments and
//! restarted, alone and in a group of two; afterwards every count is exact.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;

use crate::events::{cdc, payment, tax};
use crate::support::kafka::{producer, read_to_end, TestTopics};
use crate::support::{
    assert_no_orphans, insert_merchant, insert_provider_config, invoice_cmd, stream_env, unique, wait_until,
    TestDb, DECISIONS,
};

const WAIT: Duration = Duration::from_secs(120);

async fn count(db: &TestDb, sql: &str) -> i64 {
    let v: Option<Option<i64>> = sqlx::query_scalar(sql).fetch_optional(&db.pool).await.unwrap();
    v.flatten().unwrap_or(0)
}

fn spawn(env: &HashMap<String, String>) -> Child {
    let mut env = env.clone();
    env.insert("APP_ENV_INVOICE_WORKER_ID".into(), crate::support::next_worker_id().to_string());
    env.insert("APP_ENV_INVOICE_STREAM_BATCH_MAX".into(), "50".into());
    invoice_cmd(&env).arg("stream").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn kill9(child: &mut Child) {
    // Child::kill sends SIGKILL on Unix: no shutdown code runs.
    child.kill().unwrap();
    child.wait().unwrap();
}

async fn produce_payments(topic: &str, n: usize) -> usize {
    let p = producer();
    let merchants = ["M-1", "M-2", "M-9"]; // M-9 is unknown: skipped
    let mut eligible = 0;
    let values: Vec<(String, String)> = (0..n)
        .map(|i| {
            let merchant = merchants[i % 3];
            if merchant != "M-9" {
                eligible += 1;
            }
            let order = format!("ORD-{i}");
            (order.clone(), payment(&format!("ev-{i}"), &order, merchant).to_string())
        })
        .collect();
    let mut futures = Vec::new();
    for (order, value) in &values {
        let record = rdkafka::producer::FutureRecord::to(topic).key(order.as_str()).payload(value.as_str());
        futures.push(p.send(record, Duration::from_secs(30)));
    }
    for result in join_all(futures).await {
        result.unwrap();
    }
    eligible
}

async fn setup(partitions: i32) -> (TestDb, TestTopics) {
    let db = TestDb::create().await;
    let topics = TestTopics::create(partitions).await;
    // The merchants exist before the payments (CDC has its own tests); the CDC topic still
    // carries their creation, which the restarted streams replay harmlessly.
    let p = producer();
    for (m, lsn) in [("M-1", 1), ("M-2", 2)] {
        insert_merchant(&db, m, &tax("immediate")).await;
        crate::support::kafka::produce(
            &p,
            &topics.names.merchant_cdc,
            m,
            Some(cdc("c", m, tax("immediate"), lsn).to_string().as_bytes()),
            &[],
        )
        .await;
    }
    insert_provider_config(&db, "M-1", 1).await;
    insert_provider_config(&db, "M-2", 2).await;
    (db, topics)
}

/// Exactly one invoice per eligible order, one decision per event, one audit row per
/// invoice, and on the topic exactly one created + one claim_opened event per invoice (a
/// re-publication after a crash carries the same eventId).
async fn assert_exact(db: &TestDb, topics: &TestTopics, total: usize, eligible: usize) {
    let eligible = eligible as i64;
    assert_eq!(count(db, DECISIONS).await, total as i64);
    assert_eq!(count(db, "SELECT count(*) FROM invoice").await, eligible);
    assert_eq!(count(db, "SELECT count(DISTINCT order_id) FROM invoice").await, eligible);
    assert_eq!(count(db, "SELECT count(*) FROM claim").await, eligible);
    assert_eq!(count(db, "SELECT count(*) FROM audit_log WHERE entity = 'invoice'").await, eligible);
    assert_eq!(
        count(
            db,
            &format!(
                "SELECT sum(next_offset)::bigint FROM consumer_offset WHERE topic = '{}'",
                topics.names.payment
            )
        )
        .await,
        total as i64
    );
    wait_until(WAIT, "the outbox to drain", || async {
        (count(db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let topic = topics.names.events.clone();
    let expected = 2 * eligible as usize;
    let events = tokio::task::spawn_blocking(move || read_to_end(&topic, WAIT)).await.unwrap();
    assert!(events.len() >= expected, "{} events read", events.len());
    let mut ids = HashSet::new();
    let mut created_per_order: HashMap<String, HashSet<String>> = HashMap::new();
    for e in &events {
        let v: Value = serde_json::from_slice(e.value.as_deref().unwrap()).unwrap();
        ids.insert(v["eventId"].as_str().unwrap().to_owned());
        if v["type"] == "invoice.created" {
            created_per_order
                .entry(v["orderId"].as_str().unwrap().to_owned())
                .or_default()
                .insert(v["eventId"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(ids.len(), expected, "distinct events on the topic");
    assert_eq!(created_per_order.len(), eligible as usize);
    assert!(created_per_order.values().all(|ids| ids.len() == 1), "one invoice.created per order");
    assert_no_orphans(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_killed_with_sigkill_again_and_again_loses_and_duplicates_nothing() {
    let (db, topics) = setup(3).await;
    let env = stream_env(&db, &topics.names, &unique("g-crash-"));
    let total = 3000;
    let eligible = produce_payments(&topics.names.payment, total).await;
    let mut kills = 0;
    loop {
        let before = count(&db, DECISIONS).await;
        if before >= total as i64 {
            break;
        }
        let mut child = spawn(&env);
        // Kill at a moment chosen by progress, not by the clock: once some batches landed.
        let target = (before + 150 + 97 * kills).min(total as i64);
        wait_until(WAIT, "progress before the kill", || async {
            (count(&db, DECISIONS).await >= target).then_some(())
        })
        .await;
        kill9(&mut child);
        kills += 1;
    }
    assert!(kills >= 3, "the run was killed {kills} times");
    // A last clean run publishes whatever the outbox still holds.
    let mut child = spawn(&env);
    assert_exact(&db, &topics, total, eligible).await;
    kill9(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_in_one_group_with_kills_and_rebalances_decide_each_payment_once() {
    let (db, topics) = setup(6).await;
    let env = stream_env(&db, &topics.names, &unique("g-pair-"));
    let total = 2400;
    let mut a = spawn(&env);
    let mut b = spawn(&env);
    let eligible = produce_payments(&topics.names.payment, total).await;
    // Kill one member mid-run (its partitions move to the other), restart it (they move back
    // in part), then the other.
    for (round, threshold) in [(0, 600i64), (1, 1400)] {
        wait_until(WAIT, "progress before the kill", || async {
            (count(&db, DECISIONS).await >= threshold).then_some(())
        })
        .await;
        if round == 0 {
            kill9(&mut a);
            a = spawn(&env);
        } else {
            kill9(&mut b);
            b = spawn(&env);
        }
    }
    wait_until(WAIT, "every payment decided", || async {
        (count(&db, DECISIONS).await >= total as i64).then_some(())
    })
    .await;
    assert_exact(&db, &topics, total, eligible).await;
    kill9(&mut a);
    kill9(&mut b);
}
