//! `invoice stream` against the real broker and database.

use std::time::Duration;

use serde_json::{json, Value};

use crate::events::{cdc, payment, tax};
use crate::support::kafka::{produce, producer, read_all, TestTopics};
use crate::support::{
    insert_provider_config, metric_value, stream_env, unique, wait_until, TestDb, TestStream, DECISIONS,
};

const WAIT: Duration = Duration::from_secs(60);

/// The first column of the first row; -1 when there is no row or it is NULL.
async fn scalar(db: &TestDb, sql: &str) -> i64 {
    let value: Option<Option<i64>> = sqlx::query_scalar(sql).fetch_optional(&db.pool).await.unwrap();
    value.flatten().unwrap_or(-1)
}

async fn wait_scalar(db: &TestDb, sql: &str, expected: i64) {
    let what = format!("`{sql}` to reach {expected}");
    wait_until(WAIT, &what, || async { (scalar(db, sql).await == expected).then_some(()) }).await;
}

async fn send(p: &rdkafka::producer::FutureProducer, topic: &str, key: &str, value: &Value) {
    produce(p, topic, key, Some(value.to_string().as_bytes()), &[]).await;
}

async fn read_events(topic: &str, n: usize) -> Vec<Value> {
    read_events_within(topic, n, WAIT).await
}

/// Reads until `n` events or `timeout`: with `n` above what should exist, this is how a
/// test checks that nothing more was published.
async fn read_events_within(topic: &str, n: usize, timeout: Duration) -> Vec<Value> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_all(&topic, n, timeout))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| m.value.and_then(|v| serde_json::from_slice(&v).ok()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_become_invoices_with_claims_audit_events_and_offsets() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(3).await;
    let p = producer();
    for (merchant, mode, lsn) in [("M-1", "immediate", 10), ("M-2", "claim_window", 11)] {
        send(&p, &topics.names.merchant_cdc, merchant, &cdc("c", merchant, tax(mode), lsn)).await;
    }
    insert_provider_config(&db, "M-1", 1).await;
    insert_provider_config(&db, "M-2", 2).await;
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, "SELECT count(*) FROM merchant_tax_info", 2).await;

    for i in 0..20 {
        let order = format!("ORD-A-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-a-{i}"), &order, "M-1")).await;
    }
    for i in 0..10 {
        let order = format!("ORD-B-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-b-{i}"), &order, "M-2")).await;
    }
    send(&p, &topics.names.payment, "ORD-X", &payment("ev-x", "ORD-X", "M-9")).await;
    wait_scalar(&db, DECISIONS, 31).await;

    assert_eq!(
        scalar(&db, "SELECT count(*) FROM invoice WHERE merchant_id = 'M-1' AND status = 'QUEUED'").await,
        20
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM invoice WHERE merchant_id = 'M-2' AND status = 'PENDING_CLAIM'")
            .await,
        10
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM claim WHERE status = 'OPEN'").await, 30);
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE event_type = 'invoice.created'").await, 30);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM payment_decision WHERE outcome = 'skipped' AND skip_reason = 'merchant_unknown'").await,
        1
    );
    // The config snapshot carries ciphertext only.
    let snapshot: Value = sqlx::query_scalar(
        "SELECT invoice_snapshot(config_snapshot, config_snapshot_digest) FROM invoice LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(snapshot["series"], "C26TAA");
    assert!(snapshot["credentials"]["ciphertext"].is_string());
    assert!(!snapshot.to_string().contains("\"password\""));
    // Stored once per merchant and configuration, shared by their invoices (none inline), and
    // each invoice has its own merchant's (a batch sends each distinct one once).
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice_config_snapshot").await, 2);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM invoice WHERE config_snapshot IS NOT NULL OR config_snapshot_digest IS NULL")
            .await,
        0
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM invoice i JOIN invoice_config_snapshot s ON s.digest = i.config_snapshot_digest
             WHERE s.snapshot->>'configId' = i.provider_config_id::text AND s.merchant_id = i.merchant_id"
        )
        .await,
        30
    );
    // The README's recipe for running an older version again copies them inline, unchanged.
    sqlx::query(
        "UPDATE invoice SET config_snapshot = invoice_snapshot(NULL, config_snapshot_digest)
         WHERE config_snapshot IS NULL",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM invoice i JOIN invoice_config_snapshot s ON s.digest = i.config_snapshot_digest
             WHERE i.config_snapshot = s.snapshot"
        )
        .await,
        30
    );
    // Stored offsets cover every payment: 31 messages over 3 partitions.
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT sum(next_offset)::bigint FROM consumer_offset WHERE topic = '{}'",
                topics.names.payment
            )
        )
        .await,
        31
    );

    // Events: created + claim_opened per invoice, claim tokens match the stored hashes.
    let events = read_events(&topics.names.events, 60).await;
    assert_eq!(events.len(), 60);
    let opened: Vec<&Value> = events.iter().filter(|e| e["type"] == "invoice.claim_opened").collect();
    assert_eq!(opened.len(), 30);
    for e in &opened {
        let token = e["claim"]["token"].as_str().unwrap();
        assert!(token.len() >= 43, "{token}");
        let hash = invoice::domain::claim::token_hash(token).to_vec();
        let found: i64 =
            sqlx::query_scalar("SELECT count(*) FROM claim WHERE token_hash = $1 AND invoice_id = $2")
                .bind(&hash)
                .bind(e["invoiceId"].as_str().unwrap().parse::<i64>().unwrap())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(found, 1);
    }
    assert!(events.iter().all(|e| e["invoiceId"].is_string()));
    // Once published, the outbox no longer holds any clear token: published rows are gone.
    wait_scalar(&db, "SELECT count(*) FROM outbox", 0).await;

    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_decisions_total", &["outcome=\"queued\""]), 20.0);
    assert_eq!(metric_value(&metrics, "invoice_decisions_total", &["outcome=\"pending_claim\""]), 10.0);
    assert_eq!(metric_value(&metrics, "invoice_decisions_total", &["reason=\"merchant_unknown\""]), 1.0);
    assert_eq!(metric_value(&metrics, "invoice_claims_total", &["event=\"opened\""]), 30.0);
    assert!(metric_value(&metrics, "invoice_kafka_rebalances_total", &["kind=\"assign\""]) >= 1.0);
    // Lag per partition: high watermark − stored offset, 0 once caught up, for every partition.
    let lag_label = format!("topic=\"{}\"", topics.names.payment);
    let lag_lines = wait_until(WAIT, "lag gauges for the 3 payment partitions", || {
        let stream = &stream;
        let label = lag_label.clone();
        async move {
            let text = stream.metrics().await;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("invoice_kafka_consumer_lag{") && l.contains(&label))
                .map(str::to_owned)
                .collect();
            // Statistics arrive every second: wait until they show the caught-up state.
            (lines.len() == 3 && lines.iter().all(|l| l.ends_with(" 0"))).then_some(lines)
        }
    })
    .await;
    assert_eq!(lag_lines.len(), 3);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_reasons_and_never_stall_a_partition() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    send(&p, &topics.names.merchant_cdc, "M-1", &cdc("c", "M-1", tax("immediate"), 1)).await;
    insert_provider_config(&db, "M-1", 1).await;
    // Payments and CDC are separate topics with no ordering between them: let the merchant
    // arrive first, as it does in production.
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, "SELECT count(*) FROM merchant_tax_info", 1).await;
    let mut float_amount = payment("ev-float", "ORD-F", "M-1");
    float_amount["totalAmount"] = json!(1080000.0);
    let mut bad_total = payment("ev-total", "ORD-T", "M-1");
    bad_total["totalAmount"] = json!("999");
    let mut bad_rate = payment("ev-rate", "ORD-R", "M-1");
    bad_rate["items"][0]["vatRate"] = json!("7");
    // One partition: poison and good messages interleaved in one order.
    send(&p, &topics.names.payment, "ORD-1", &payment("ev-1", "ORD-1", "M-1")).await;
    produce(&p, &topics.names.payment, "ORD-J", Some(b"{not json"), &[]).await;
    send(&p, &topics.names.payment, "ORD-F", &float_amount).await;
    send(&p, &topics.names.payment, "ORD-2", &payment("ev-2", "ORD-2", "M-1")).await;
    send(&p, &topics.names.payment, "ORD-T", &bad_total).await;
    send(&p, &topics.names.payment, "ORD-R", &bad_rate).await;
    send(&p, &topics.names.payment, "ORD-3", &payment("ev-3", "ORD-3", "M-1")).await;
    produce(&p, &topics.names.payment, "ORD-N", None, &[]).await;
    produce(&p, &topics.names.merchant_cdc, "M-2", Some(br#"{"op":"x","after":{"id":"M-2"}}"#), &[]).await;
    produce(&p, &topics.names.merchant_cdc, "M-3", None, &[]).await;
    wait_scalar(&db, "SELECT count(*) FROM invoice", 3).await;
    let dead = {
        let topic = topics.names.deadletter.clone();
        tokio::task::spawn_blocking(move || read_all(&topic, 6, WAIT)).await.unwrap()
    };
    assert_eq!(dead.len(), 6);
    let header = |m: &crate::support::kafka::Received, name: &str| {
        m.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    let mut reasons: Vec<(String, String)> =
        dead.iter().map(|m| (header(m, "x-source-offset"), header(m, "x-error"))).collect();
    reasons.sort();
    let by_key = |key: &str| dead.iter().find(|m| m.key.as_deref() == Some(key.as_bytes())).unwrap();
    assert!(header(by_key("ORD-J"), "x-error").starts_with("not JSON"));
    assert_eq!(
        by_key("ORD-J").value.as_deref(),
        Some(&b"{not json"[..]),
        "the original value is forwarded unchanged"
    );
    assert_eq!(header(by_key("ORD-J"), "x-source-topic"), topics.names.payment);
    assert_eq!(header(by_key("ORD-J"), "x-source-partition"), "0");
    assert_eq!(header(by_key("ORD-J"), "x-source-offset"), "1");
    assert!(header(by_key("ORD-F"), "x-error").contains("floats are refused"));
    assert!(header(by_key("ORD-T"), "x-error").starts_with("totalAmount: 999 does not equal"));
    assert!(header(by_key("ORD-R"), "x-error").contains("unknown VAT rate `7`"));
    assert!(header(by_key("M-2"), "x-error").contains("unknown op `x`"));
    assert_eq!(header(by_key("M-2"), "x-source-topic"), topics.names.merchant_cdc);
    // A payment tombstone is forwarded as it came: a null value, not an empty one.
    assert!(header(by_key("ORD-N"), "x-error").contains("tombstone"));
    assert_eq!(by_key("ORD-N").value, None);
    // Every offset passed: 8 payments (one tombstone) and 3 CDC messages (one tombstone).
    wait_scalar(
        &db,
        &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{}'", topics.names.payment),
        8,
    )
    .await;
    wait_scalar(
        &db,
        &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{}'", topics.names.merchant_cdc),
        3,
    )
    .await;
    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_dead_lettered_total", &[]), 6.0);
    assert_eq!(
        metric_value(&metrics, "invoice_kafka_messages_consumed_total", &["outcome=\"tombstone\""]),
        1.0
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_data_postgres_refuses_is_dead_lettered_alone_and_its_batch_decided() {
    let (db, topics) = with_invoicing_merchant().await;
    // A payment that passes every check of ours but whose row Postgres refuses (as it would
    // a value beyond a column's limit): retried as it is, it would hold the partition for ever.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.order_id = 'ORD-POISON' THEN
             RAISE EXCEPTION 'value out of range for this test' USING ERRCODE = '22003';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON invoice
           FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let p = producer();
    // Produced before the stream starts: they arrive as one batch.
    let orders: Vec<String> =
        (0..20).map(|i| if i == 13 { "ORD-POISON".to_owned() } else { format!("ORD-{i}") }).collect();
    for (i, order) in orders.iter().enumerate() {
        send(&p, &topics.names.payment, order, &payment(&format!("ev-{i}"), order, "M-1")).await;
    }
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(
        &db,
        &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{}'", topics.names.payment),
        20,
    )
    .await;
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 19);
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice WHERE order_id = 'ORD-POISON'").await, 0);
    let dead = {
        let topic = topics.names.deadletter.clone();
        tokio::task::spawn_blocking(move || read_all(&topic, 1, WAIT)).await.unwrap()
    };
    assert_eq!(dead.len(), 1);
    let header = |name: &str| {
        dead[0].headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    assert_eq!(dead[0].key.as_deref(), Some(&b"ORD-POISON"[..]));
    assert_eq!(header("x-source-offset"), "13");
    assert!(header("x-error").starts_with("refused by the database"), "{}", header("x-error"));
    assert!(header("x-error").contains("value out of range for this test"), "{}", header("x-error"));
    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_dead_lettered_total", &[]), 1.0);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_does_not_answer_holds_up_the_stream_once_then_is_left_to_the_sweeper() {
    let (db, topics) = with_invoicing_merchant().await;
    // A Redis whose packets vanish: connections open, nothing ever answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redis_url = format!("redis://{}/0", black_hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            held.push(socket);
        }
    });
    let mut env = stream_env(&db, &topics.names, &unique("g-"));
    env.insert("APP_ENV_INVOICE_REDIS_URL".into(), redis_url);
    let stream = TestStream::spawn(&env).await;
    let p = producer();
    for i in 0..3 {
        let order = format!("ORD-BH-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-bh-{i}"), &order, "M-1")).await;
        // One batch each: the next payment is sent once this one is decided.
        wait_scalar(&db, "SELECT count(*) FROM invoice WHERE status = 'QUEUED'", i + 1).await;
    }
    // The first hand-off waited for its timeout (2 s); the next batches left the queue to the
    // sweeper instead of each waiting on Redis again.
    let metrics = stream.metrics().await;
    assert_eq!(
        metric_value(&metrics, "invoice_queue_errors_total", &["operation=\"enqueue\""]),
        1.0,
        "{metrics}"
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_postgres_does_not_answer_is_abandoned_retried_and_decided_once() {
    let (db, topics) = with_invoicing_merchant().await;
    let mut env = stream_env(&db, &topics.names, &unique("g-"));
    env.insert("APP_ENV_INVOICE_DB_WORK_TIMEOUT_MS".into(), "1000".into());
    let stream = TestStream::spawn(&env).await;
    let p = producer();
    let t = topics.names.payment.clone();
    send(&p, &t, "ORD-H-0", &payment("ev-h-0", "ORD-H-0", "M-1")).await;
    wait_scalar(&db, "SELECT count(*) FROM invoice", 1).await;
    // The partition's offset row held elsewhere: the next batch's statement gets no answer,
    // as one sent to a server gone in a failover would not.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT next_offset FROM consumer_offset WHERE topic = $1 FOR UPDATE")
        .bind(&t)
        .fetch_one(&mut *blocker)
        .await
        .unwrap();
    send(&p, &t, "ORD-H-1", &payment("ev-h-1", "ORD-H-1", "M-1")).await;
    let retries = |metrics: &str| {
        metric_value(metrics, "invoice_stream_transaction_retries_total", &[&format!("topic=\"{t}\"")])
    };
    wait_until(WAIT, "two abandoned attempts", || async {
        (retries(&stream.metrics().await) >= 2.0).then_some(())
    })
    .await;
    blocker.rollback().await.unwrap();
    // The abandoned statements still wait on the server; whichever commits first moves the
    // offset, and the others find it moved: one invoice, one decision.
    wait_scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'"), 2).await;
    wait_scalar(&db, "SELECT count(*) FROM invoice WHERE order_id = 'ORD-H-1'", 1).await;
    assert_eq!(scalar(&db, DECISIONS).await, 2);
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 2);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_postgres_refuses_every_message_the_partition_waits_after_a_few_instead_of_dead_lettering_all() {
    let (db, topics) = with_invoicing_merchant().await;
    // The database refuses every payment (a migration ahead of this build, say): the cause
    // is not the input, and the input must not all go to the dead-letter topic.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'a column this build does not fill' USING ERRCODE = '23502'; END $$;
         CREATE TRIGGER refuse_all BEFORE INSERT ON invoice FOR EACH ROW EXECUTE FUNCTION refuse_all();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let p = producer();
    let t = topics.names.payment.clone();
    for i in 0..10 {
        let order = format!("ORD-S-{i}");
        send(&p, &t, &order, &payment(&format!("ev-s-{i}"), &order, "M-1")).await;
    }
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    let topic_label = format!("topic=\"{t}\"");
    wait_until(WAIT, "the partition to wait after three refusals", || async {
        let metrics = stream.metrics().await;
        let retries = metric_value(&metrics, "invoice_stream_transaction_retries_total", &[&topic_label]);
        (retries >= 2.0).then_some(())
    })
    .await;
    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_dead_lettered_total", &[]), 3.0, "{metrics}");
    assert_eq!(scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'")).await, 3);
    // Fixed: the rest is decided, nothing more dead-lettered.
    sqlx::query("DROP TRIGGER refuse_all ON invoice").execute(&db.pool).await.unwrap();
    wait_scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'"), 10).await;
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 7);
    assert_eq!(metric_value(&stream.metrics().await, "invoice_dead_lettered_total", &[]), 3.0);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_same_events_creates_no_second_invoice_and_no_second_event() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(2).await;
    let p = producer();
    send(&p, &topics.names.merchant_cdc, "M-1", &cdc("c", "M-1", tax("immediate"), 1)).await;
    insert_provider_config(&db, "M-1", 1).await;
    let first = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, "SELECT count(*) FROM merchant_tax_info", 1).await;
    for i in 0..10 {
        let order = format!("ORD-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-{i}"), &order, "M-1")).await;
    }
    wait_scalar(&db, "SELECT count(*) FROM invoice", 10).await;
    wait_scalar(&db, "SELECT count(*) FROM outbox", 0).await;
    // The same events produced again, and a second order event for an order that has one.
    for i in 0..10 {
        let order = format!("ORD-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-{i}"), &order, "M-1")).await;
    }
    send(&p, &topics.names.payment, "ORD-0", &payment("ev-0-again", "ORD-0", "M-1")).await;
    wait_scalar(
        &db,
        &format!(
            "SELECT sum(next_offset)::bigint FROM consumer_offset WHERE topic = '{}'",
            topics.names.payment
        ),
        21,
    )
    .await;
    first.stop().await.unwrap();
    // An invoice cancelled and another deleted since: their payments stay decided (the
    // invoice, whatever its state, is the record of the decision).
    sqlx::query("UPDATE invoice SET status = 'CANCELLED' WHERE order_id = 'ORD-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE invoice SET deleted_at = now() WHERE order_id = 'ORD-2'")
        .execute(&db.pool)
        .await
        .unwrap();
    // A new consumer group reads both topics from offset 0.
    let replay = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-replay-"))).await;
    wait_scalar(
        &db,
        &format!(
            "SELECT count(DISTINCT group_id) FROM consumer_offset WHERE topic = '{}'",
            topics.names.payment
        ),
        2,
    )
    .await;
    wait_scalar(
        &db,
        &format!(
            "SELECT sum(next_offset)::bigint FROM consumer_offset WHERE topic = '{}'",
            topics.names.payment
        ),
        42,
    )
    .await;
    replay.stop().await.unwrap();

    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 10);
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice WHERE order_id IN ('ORD-1', 'ORD-2')").await, 2);
    assert_eq!(scalar(&db, "SELECT count(*) FROM claim").await, 10);
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE entity = 'invoice'").await, 10);
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 0, "everything published");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM payment_decision WHERE skip_reason = 'active_invoice_exists'")
            .await,
        1
    );
    assert_eq!(scalar(&db, DECISIONS).await, 11, "one decision per event id");
    let events = read_events_within(&topics.names.events, 21, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 20, "exactly one created and one claim_opened per order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_reused_for_two_orders_gets_each_its_invoice_whichever_batches_they_fall_in() {
    let (db, topics) = with_invoicing_merchant().await;
    // Upstream reused an event id for two paid orders. Produced before the stream starts, on
    // one partition: the first run reads them in one batch.
    let p = producer();
    for order in ["ORD-R1", "ORD-R2"] {
        send(&p, &topics.names.payment, order, &payment("ev-reused", order, "M-1")).await;
    }
    let offset = format!(
        "SELECT sum(next_offset)::bigint FROM consumer_offset WHERE topic = '{}'",
        topics.names.payment
    );
    let first = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, &offset, 2).await;
    wait_scalar(&db, "SELECT count(*) FROM outbox", 0).await;
    first.stop().await.unwrap();
    let each_invoiced = "SELECT count(DISTINCT order_id) FROM invoice WHERE payment_event_id = 'ev-reused'";
    assert_eq!(scalar(&db, each_invoiced).await, 2);
    // A new group reads them one batch each, and finds both decided.
    let mut env = stream_env(&db, &topics.names, &unique("g-replay-"));
    env.insert("APP_ENV_INVOICE_STREAM_BATCH_MAX".into(), "1".into());
    let replay = TestStream::spawn(&env).await;
    wait_scalar(&db, &offset, 4).await;
    replay.stop().await.unwrap();
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 2);
    assert_eq!(scalar(&db, each_invoiced).await, 2);
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE event_type = 'invoice.created'").await, 2);
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 0);
    let events = read_events_within(&topics.names.events, 5, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 4, "one created and one claim_opened per order");
    assert_eq!(scalar(&db, DECISIONS).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_keeps_the_newest_tax_info_whatever_the_order_and_format() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    let t = &topics.names.merchant_cdc;
    let enabled = tax("immediate");
    let mut disabled = tax("immediate");
    disabled["invoiceEnabled"] = json!(false);
    // M-1: created, updated, then an older update arrives late (stale), then a duplicate.
    send(&p, t, "M-1", &cdc("c", "M-1", enabled.clone(), 100)).await;
    send(&p, t, "M-1", &cdc("u", "M-1", disabled.clone(), 200)).await;
    send(&p, t, "M-1", &cdc("u", "M-1", enabled.clone(), 150)).await;
    send(&p, t, "M-1", &cdc("u", "M-1", disabled.clone(), 200)).await;
    // M-2: metadata as an object, then the same tax as a string with other key order and
    // number format inside the schema wrapper: unchanged, skipped.
    let mut object_form = cdc("c", "M-2", enabled.clone(), 300);
    object_form["after"]["metadata"] = json!({"tax": enabled.clone()});
    send(&p, t, "M-2", &object_form).await;
    let reordered = r#"{"tax": {"provider": "viettel", "claimWindowMinutes": 1.44e3, "issuanceMode": "immediate", "invoiceEnabled": true, "phone": "02812345678", "email": "ketoan@abc.vn", "address": "1 Tràng Tiền, Hà Nội", "legalName": "Công ty TNHH ABC", "taxCode": "0100109106"}}"#;
    let mut string_form = cdc("u", "M-2", enabled.clone(), 301);
    string_form["after"]["metadata"] = json!(reordered);
    send(&p, t, "M-2", &json!({"schema": {"type": "struct"}, "payload": string_form})).await;
    // M-3: created, deleted (tombstone follows), then an older create is stale.
    send(&p, t, "M-3", &cdc("c", "M-3", enabled.clone(), 400)).await;
    send(&p, t, "M-3", &cdc("d", "M-3", enabled.clone(), 500)).await;
    produce(&p, t, "M-3", None, &[]).await;
    send(&p, t, "M-3", &cdc("c", "M-3", enabled.clone(), 450)).await;
    // M-4: deleted before it was ever seen, then an older create replayed: stays deleted.
    send(&p, t, "M-4", &cdc("d", "M-4", enabled.clone(), 600)).await;
    send(&p, t, "M-4", &cdc("c", "M-4", enabled.clone(), 550)).await;
    // M-5: created, deleted and created again, all in one batch: the batch writes the merchant
    // once, and that write is the last change (revived, with its values).
    send(&p, t, "M-5", &cdc("c", "M-5", disabled.clone(), 700)).await;
    send(&p, t, "M-5", &cdc("d", "M-5", disabled.clone(), 800)).await;
    send(&p, t, "M-5", &cdc("c", "M-5", enabled.clone(), 900)).await;

    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'"), 15).await;
    let row = |m: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (bool, Option<i64>, bool)>(
                "SELECT invoice_enabled, source_lsn, deleted_at IS NOT NULL FROM merchant_tax_info WHERE merchant_id = $1",
            )
            .bind(m)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(row("M-1").await, (false, Some(200), false));
    assert_eq!(row("M-2").await, (true, Some(300), false), "the unchanged update wrote nothing");
    assert_eq!(row("M-3").await, (true, Some(500), true));
    assert_eq!(
        row("M-4").await,
        (false, Some(600), true),
        "an older create never revives a deleted merchant"
    );
    assert_eq!(row("M-5").await, (true, Some(900), false), "the last change of the batch wins");
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE entity = 'tax_info'").await, 8);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM audit_log WHERE entity = 'tax_info' AND entity_id = 'M-5'").await,
        3,
        "one audit row per change applied, even when the batch writes the merchant once"
    );
    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_cdc_updates_total", &["outcome=\"applied\""]), 6.0);
    assert_eq!(metric_value(&metrics, "invoice_cdc_updates_total", &["outcome=\"skipped\""]), 2.0);
    assert_eq!(metric_value(&metrics, "invoice_cdc_updates_total", &["outcome=\"stale\""]), 3.0);
    assert_eq!(metric_value(&metrics, "invoice_cdc_updates_total", &["outcome=\"already_deleted\""]), 1.0);
    assert_eq!(metric_value(&metrics, "invoice_cdc_updates_total", &["outcome=\"deleted\""]), 2.0);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tax_info_written_by_another_consumer_is_neither_audited_over_nor_skipped_against() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    let t = &topics.names.merchant_cdc;
    let first = tax("immediate");
    let mut second = tax("immediate");
    second["legalName"] = json!("Công ty TNHH ABC (2)");
    let mut third = tax("immediate");
    third["legalName"] = json!("Công ty TNHH ABC (3)");
    send(&p, t, "M-1", &cdc("c", "M-1", first.clone(), 100)).await;
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'"), 1).await;
    // Another writer this task does not know of (a second consumer group on this database,
    // or the merchant under another key format) stores a newer TaxInfo.
    sqlx::query("UPDATE merchant_tax_info SET tax = $1, legal_name = 'Công ty TNHH ABC (3)', source_lsn = 500 WHERE merchant_id = 'M-1'")
        .bind(&third)
        .execute(&db.pool)
        .await
        .unwrap();
    // Older than the stored row, newer than the task's cache: refused by Postgres, so no audit.
    send(&p, t, "M-1", &cdc("u", "M-1", second.clone(), 300)).await;
    wait_scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'"), 2).await;
    let stored = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT legal_name, source_lsn FROM merchant_tax_info WHERE merchant_id = 'M-1'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(stored(&db).await, ("Công ty TNHH ABC (3)".to_owned(), Some(500)));
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE entity = 'tax_info'").await, 1);
    // The source goes back to the second value: the task compares with the stored (third)
    // value, not with what it had cached, so it writes.
    send(&p, t, "M-1", &cdc("u", "M-1", second.clone(), 600)).await;
    wait_scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{t}'"), 3).await;
    assert_eq!(stored(&db).await, ("Công ty TNHH ABC (2)".to_owned(), Some(600)));
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE entity = 'tax_info'").await, 2);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_request_recorded_before_the_payment_is_joined() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    send(&p, &topics.names.merchant_cdc, "M-1", &cdc("c", "M-1", tax("claim_window"), 1)).await;
    insert_provider_config(&db, "M-1", 1).await;
    sqlx::query(
        "INSERT INTO invoice_request (id, merchant_id, order_id, buyer, source) VALUES (77, 'M-1', 'ORD-REQ', $1, 'merchant_webhook')",
    )
    .bind(json!({"legalName": "Công ty B", "taxCode": "0101243150", "address": "TP HCM", "email": "b@b.vn"}))
    .execute(&db.pool)
    .await
    .unwrap();
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &unique("g-"))).await;
    wait_scalar(&db, "SELECT count(*) FROM merchant_tax_info", 1).await;
    send(&p, &topics.names.payment, "ORD-REQ", &payment("ev-r", "ORD-REQ", "M-1")).await;
    send(&p, &topics.names.payment, "ORD-NONE", &payment("ev-n", "ORD-NONE", "M-1")).await;
    wait_scalar(&db, "SELECT count(*) FROM invoice", 2).await;
    let (status, kind, tax_code): (String, String, Option<String>) = sqlx::query_as(
        "SELECT status, buyer_kind, buyer->>'taxCode' FROM invoice WHERE order_id = 'ORD-REQ'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), kind.as_str(), tax_code.as_deref()),
        ("QUEUED", "company", Some("0101243150"))
    );
    let joined: (Option<i64>, bool) =
        sqlx::query_as("SELECT invoice_id, joined_at IS NOT NULL FROM invoice_request WHERE id = 77")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(joined.0.is_some() && joined.1);
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM claim WHERE order_id = 'ORD-REQ'").await,
        0,
        "no claim for a known buyer"
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM invoice WHERE order_id = 'ORD-NONE' AND status = 'PENDING_CLAIM'")
            .await,
        1
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_gone_from_the_log_before_they_were_decided_are_counted_and_logged() {
    let (db, topics) = with_invoicing_merchant().await;
    let p = producer();
    for i in 0..10 {
        let order = format!("ORD-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-{i}"), &order, "M-1")).await;
    }
    // Retention (here: an explicit delete) removed offsets 0–3 while the stored offset is 2.
    let admin = invoice::topics::admin_client(&crate::support::kafka()).unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topics.names.payment, 0, rdkafka::Offset::Offset(4)).unwrap();
    admin.delete_records(&tpl, &rdkafka::admin::AdminOptions::new()).await.unwrap();
    let group = unique("g-gap-");
    sqlx::query(
        "INSERT INTO consumer_offset (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 2)",
    )
    .bind(&group)
    .bind(&topics.names.payment)
    .execute(&db.pool)
    .await
    .unwrap();
    let stream = TestStream::spawn(&stream_env(&db, &topics.names, &group)).await;
    wait_scalar(&db, DECISIONS, 6).await;
    wait_scalar(
        &db,
        &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{}'", topics.names.payment),
        10,
    )
    .await;
    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_kafka_offset_gap_messages_total", &[]), 2.0);
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice WHERE order_id IN ('ORD-2', 'ORD-3')").await, 0);
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_stops_progressing_is_noticed_recovered_and_loses_nothing() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    let stream = spawn_watched(&db, &topics, &p, &unique("g-stall-")).await;
    send(&p, &topics.names.payment, "ORD-S-0", &payment("ev-s-0", "ORD-S-0", "M-1")).await;
    wait_scalar(&db, "SELECT count(*) FROM invoice", 1).await;

    // The partition stops making progress with messages waiting: its offset row is held, so
    // no batch can commit (a stand-in for any stall: a hung statement, a fetch queue that
    // never wakes its task).
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM consumer_offset WHERE topic = $1 FOR UPDATE")
        .bind(&topics.names.payment)
        .execute(&mut *blocker)
        .await
        .unwrap();
    for i in 1..=20 {
        let order = format!("ORD-S-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-s-{i}"), &order, "M-1")).await;
    }
    let topic_label = format!("topic=\"{}\"", topics.names.payment);
    wait_until(WAIT, "the watchdog to notice the stall", || async {
        let metrics = stream.metrics().await;
        (metric_value(&metrics, "invoice_kafka_partition_stalls_total", &[&topic_label]) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 1, "nothing commits while the row is held");
    let lag = metric_value(&stream.metrics().await, "invoice_kafka_consumer_lag", &[&topic_label]);
    assert!(lag > 0.0, "the stall is visible as lag: {lag}");

    // Released: the recovered partition resumes where its stored offset says, every payment
    // decided once.
    blocker.rollback().await.unwrap();
    wait_scalar(&db, "SELECT count(*) FROM invoice", 21).await;
    wait_scalar(
        &db,
        &format!("SELECT next_offset FROM consumer_offset WHERE topic = '{}'", topics.names.payment),
        21,
    )
    .await;
    assert_eq!(scalar(&db, "SELECT count(DISTINCT order_id) FROM invoice").await, 21);
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM audit_log WHERE entity = 'invoice' AND event_type = 'invoice.created'"
        )
        .await,
        21
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_past_the_end_of_the_log_is_reported_not_passed_over_silently() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    let group = unique("g-past-end-");
    // As after the topic was deleted and created again: the stored offset is far past its end.
    sqlx::query(
        "INSERT INTO consumer_offset (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 1000)",
    )
    .bind(&group)
    .bind(&topics.names.payment)
    .execute(&db.pool)
    .await
    .unwrap();
    let stream = spawn_watched(&db, &topics, &p, &group).await;
    for i in 0..3 {
        let order = format!("ORD-E-{i}");
        send(&p, &topics.names.payment, &order, &payment(&format!("ev-e-{i}"), &order, "M-1")).await;
    }
    let topic_label = format!("topic=\"{}\"", topics.names.payment);
    wait_until(WAIT, "the watchdog to report the offset past the end", || async {
        let metrics = stream.metrics().await;
        (metric_value(&metrics, "invoice_kafka_partition_stalls_total", &[&topic_label]) >= 1.0).then_some(())
    })
    .await;
    // The gauge its alert reads; the healthy partitions of the other topic read 0.
    let metrics = stream.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_kafka_offset_past_end", &[&topic_label]), 1.0, "{metrics}");
    let cdc_label = format!("topic=\"{}\"", topics.names.merchant_cdc);
    assert!(
        metrics.contains(&format!("invoice_kafka_offset_past_end{{partition=\"0\",{cdc_label}}} 0")),
        "{metrics}"
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice").await, 0);
    assert_eq!(
        scalar(&db, &format!("SELECT next_offset FROM consumer_offset WHERE group_id = '{group}'")).await,
        1000,
        "the stored offset stays for an operator to move"
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_marker_at_the_end_of_the_log_is_not_lag() {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    let stream = spawn_watched(&db, &topics, &p, &unique("g-tx-")).await;
    // An upstream producer with transactions (Kafka Streams, Debezium exactly-once): the log
    // ends with a commit marker, an offset no message will ever have.
    let transactional: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", crate::support::kafka_brokers())
        .set("transactional.id", unique("tx-"))
        .create()
        .unwrap();
    let transactional = tokio::task::spawn_blocking(move || {
        transactional.init_transactions(Duration::from_secs(30)).unwrap();
        transactional.begin_transaction().unwrap();
        transactional
    })
    .await
    .unwrap();
    let value = payment("ev-tx-1", "ORD-TX-1", "M-1").to_string();
    transactional
        .send(
            FutureRecord::to(&topics.names.payment).key("ORD-TX-1").payload(&value),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let transactional = tokio::task::spawn_blocking(move || {
        transactional.commit_transaction(Duration::from_secs(30)).unwrap();
        transactional
    })
    .await
    .unwrap();
    wait_scalar(&db, "SELECT count(*) FROM invoice", 1).await;
    let topic_label = format!("topic=\"{}\"", topics.names.payment);
    // Watched over three stall periods (STALL_SECONDS=1, statistics every second): the
    // watchdog used to read the marker as lag 1 and count a stall in each.
    let stalls = || async {
        metric_value(&stream.metrics().await, "invoice_kafka_partition_stalls_total", &[&topic_label])
    };
    let window_end = tokio::time::Instant::now() + Duration::from_millis(3_500);
    while tokio::time::Instant::now() < window_end {
        assert_eq!(stalls().await, 0.0, "a partition with only a commit marker left is not stalled");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lag_line = format!("invoice_kafka_consumer_lag{{partition=\"0\",{topic_label}}} 0");
    wait_until(WAIT, "the payment partition's lag to read 0", || async {
        stream.metrics().await.lines().any(|l| l == lag_line).then_some(())
    })
    .await;
    assert_eq!(stalls().await, 0.0);
    // The next payment comes after the marker's offset: a gap in offsets, but nothing lost.
    send(&p, &topics.names.payment, "ORD-TX-2", &payment("ev-tx-2", "ORD-TX-2", "M-1")).await;
    wait_scalar(&db, "SELECT count(*) FROM invoice", 2).await;
    let metrics = stream.metrics().await;
    // At zero, and present from the start (so an alert's `increase()` sees a first gap).
    assert!(
        metrics
            .contains(&format!("invoice_kafka_offset_gap_messages_total{{partition=\"0\",{topic_label}}} 0")),
        "{metrics}"
    );
    tokio::task::spawn_blocking(move || drop(transactional)).await.unwrap();
    stream.stop().await.unwrap();
}

/// A stream whose watchdog judges a partition idle after one second, started once merchant
/// M-1 (with a provider configuration) is known.
async fn spawn_watched(
    db: &TestDb,
    topics: &TestTopics,
    p: &rdkafka::producer::FutureProducer,
    group: &str,
) -> TestStream {
    send(p, &topics.names.merchant_cdc, "M-1", &cdc("c", "M-1", tax("immediate"), 1)).await;
    insert_provider_config(db, "M-1", 1).await;
    let mut env = stream_env(db, &topics.names, group);
    env.insert("APP_ENV_INVOICE_STREAM_STALL_SECONDS".into(), "1".into());
    let stream = TestStream::spawn(&env).await;
    wait_scalar(db, "SELECT count(*) FROM merchant_tax_info", 1).await;
    stream
}

/// A database where merchant M-1 issues immediately and has a provider configuration, and
/// one-partition topics.
async fn with_invoicing_merchant() -> (TestDb, TestTopics) {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    crate::support::insert_merchant(&db, "M-1", &tax("immediate")).await;
    insert_provider_config(&db, "M-1", 1).await;
    (db, topics)
}

/// The environment of a stream reaching the broker through its SASL/PLAIN listener.
fn over_sasl(env: &mut std::collections::HashMap<String, String>, password: &str) {
    let brokers =
        std::env::var("INVOICE_TEST_KAFKA_SASL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9094".into());
    for (name, value) in [
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
        ("KAFKA_SASL_MECHANISM", "PLAIN"),
        ("KAFKA_SASL_USERNAME", "invoice-test"),
        ("KAFKA_SASL_PASSWORD", password),
    ] {
        env.insert(format!("APP_ENV_INVOICE_{name}"), value.to_owned());
    }
}

/// The environment of a stream reaching the broker through its SASL_SSL listener as the
/// SCRAM-SHA-512 user, trusting `ca` (none: only the system's CAs, which never signed the
/// test broker's certificate).
fn over_sasl_ssl(env: &mut std::collections::HashMap<String, String>, ca: Option<&str>) {
    let brokers = std::env::var("INVOICE_TEST_KAFKA_SSL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9095".into());
    for (name, value) in [
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", "invoice-test"),
        ("KAFKA_SASL_PASSWORD", "invoice-test-password"),
    ] {
        env.insert(format!("APP_ENV_INVOICE_{name}"), value.to_owned());
    }
    match ca {
        Some(ca) => env.insert("APP_ENV_INVOICE_KAFKA_SSL_CA_LOCATION".into(), ca.to_owned()),
        None => env.remove("APP_ENV_INVOICE_KAFKA_SSL_CA_LOCATION"),
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_tls_with_scram_decides_and_publishes_and_an_untrusted_broker_is_not_ready() {
    let ca = std::env::var("INVOICE_TEST_KAFKA_CA").unwrap_or_else(|_| {
        let deps = std::env::var("INVOICE_DEPS_DIR").unwrap_or_else(|_| "/var/tmp/invoice-deps".into());
        format!("{deps}/kafka-tls/ca.pem")
    });
    assert!(std::path::Path::new(&ca).exists(), "{ca} is made by make deps");
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    send(&p, &topics.names.merchant_cdc, "M-1", &cdc("c", "M-1", tax("immediate"), 10)).await;
    insert_provider_config(&db, "M-1", 1).await;

    // The broker's certificate is checked: without the CA that signed it, no connection.
    let mut untrusting = stream_env(&db, &topics.names, &unique("g-"));
    over_sasl_ssl(&mut untrusting, None);
    let mut trusting = untrusting.clone();
    over_sasl_ssl(&mut trusting, Some(&ca));
    refused_then_served(&db, &topics, &untrusting, &trusting, "invoice-test-password", "ORD-TLS-1").await;
}

/// A stream with the settings `refused` is not ready and shows nothing of `secret`; one with
/// `served` decides a payment of `order` and its relay publishes the event, both through
/// those connection settings.
async fn refused_then_served(
    db: &TestDb,
    topics: &TestTopics,
    refused: &std::collections::HashMap<String, String>,
    served: &std::collections::HashMap<String, String>,
    secret: &str,
    order: &str,
) {
    let stream = TestStream::spawn(refused).await;
    let response = reqwest::get(format!("http://{}/ready", stream.addr)).await.unwrap();
    assert_eq!(response.status(), 503);
    let body = response.text().await.unwrap();
    assert!(body.contains("kafka") && !body.contains(secret), "{body}");
    assert!(!stream.metrics().await.contains(secret));
    stream.stop().await.unwrap();
    assert_eq!(scalar(db, "SELECT count(*) FROM merchant_tax_info").await, 0);

    let stream = TestStream::spawn(served).await;
    let response = reqwest::get(format!("http://{}/ready", stream.addr)).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    wait_scalar(db, "SELECT count(*) FROM merchant_tax_info", 1).await;
    let p = producer();
    send(&p, &topics.names.payment, order, &payment(&format!("ev-{order}"), order, "M-1")).await;
    wait_scalar(
        db,
        &format!("SELECT count(*) FROM invoice WHERE order_id = '{order}' AND status = 'QUEUED'"),
        1,
    )
    .await;
    let events = read_events(&topics.names.events, 1).await;
    assert_eq!(events[0]["orderId"], order, "{events:?}");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_authenticated_with_sasl_decides_and_publishes_and_a_wrong_password_is_not_ready() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let p = producer();
    send(&p, &topics.names.merchant_cdc, "M-1", &cdc("c", "M-1", tax("immediate"), 10)).await;
    insert_provider_config(&db, "M-1", 1).await;

    let mut wrong = stream_env(&db, &topics.names, &unique("g-"));
    over_sasl(&mut wrong, "a-wrong-password");
    let mut right = wrong.clone();
    over_sasl(&mut right, "invoice-test-password");
    refused_then_served(&db, &topics, &wrong, &right, "a-wrong-password", "ORD-SASL-1").await;
}
