//! `invoice offsets show|reset` against the real broker and database.

use std::collections::HashMap;

use serde_json::Value;

use crate::support::kafka::{produce, producer, TestTopics};
use crate::support::{invoice_cmd, scalar, stream_env, unique, TestDb, TestStream};

fn run(env: &HashMap<String, String>, args: &[&str]) -> (i32, String, String) {
    let output = invoice_cmd(env).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn stored(db: &TestDb, topic: &str) -> Vec<(i32, i64)> {
    sqlx::query_as("SELECT partition, next_offset FROM consumer_offset WHERE topic = $1 ORDER BY partition")
        .bind(topic)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_show_describes_and_reset_moves_the_stored_truth_with_an_audit_row() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(2).await;
    let group = unique("g-off-");
    let env = stream_env(&db, &topics.names, &group);
    let p = producer();
    let mut high = HashMap::new();
    for i in 0..12 {
        let (partition, offset) =
            produce(&p, &topics.names.payment, &format!("k-{i}"), Some(b"{}"), &[]).await;
        high.insert(partition, offset + 1);
    }
    for (partition, h) in &high {
        sqlx::query(
            "INSERT INTO consumer_offset (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)",
        )
        .bind(&group)
        .bind(&topics.names.payment)
        .bind(partition)
        .bind(h - 1)
        .execute(&db.pool)
        .await
        .unwrap();
    }

    let (code, out, err) = run(&env, &["offsets", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4, "two partitions of each consumed topic: {out}");
    for row in rows.iter().filter(|r| r["topic"] == topics.names.payment.as_str()) {
        let partition = row["partition"].as_i64().unwrap() as i32;
        let h = high.get(&partition).copied().unwrap_or(0);
        assert_eq!(row["highWatermark"], h, "{row}");
        if h > 0 {
            assert_eq!(row["stored"], h - 1, "{row}");
            assert_eq!(row["lag"], 1, "{row}");
        }
    }
    let (code, table, _) = run(&env, &["offsets", "show"]);
    assert_eq!(code, 0);
    assert!(table.contains("STORED-OFFSET") && table.contains(&topics.names.payment), "{table}");

    // A dry run changes nothing.
    let before = stored(&db, &topics.names.payment).await;
    let (code, out, _) = run(&env, &["offsets", "reset", "--topic", &topics.names.payment, "--to-earliest"]);
    assert_eq!(code, 0);
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(stored(&db, &topics.names.payment).await, before);

    let (code, out, err) =
        run(&env, &["offsets", "reset", "--topic", &topics.names.payment, "--to-earliest", "--execute"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(stored(&db, &topics.names.payment).await.iter().all(|(_, o)| *o == 0));
    assert_eq!(scalar(&db, "SELECT count(*) FROM audit_log WHERE event_type = 'offsets_reset'").await, 2);

    // Beyond the log: clamped to the high watermark.
    let (code, _, _) = run(
        &env,
        &[
            "offsets",
            "reset",
            "--topic",
            &topics.names.payment,
            "--partition",
            "0",
            "--to-offset",
            "999",
            "--execute",
        ],
    );
    assert_eq!(code, 0);
    let after: HashMap<i32, i64> = stored(&db, &topics.names.payment).await.into_iter().collect();
    assert_eq!(after[&0], high.get(&0).copied().unwrap_or(0));

    // Not a consumed topic, or no target: refused with exit 2.
    assert_eq!(run(&env, &["offsets", "reset", "--topic", &topics.names.events, "--to-latest"]).0, 2);
    assert_eq!(run(&env, &["offsets", "reset", "--topic", &topics.names.payment]).0, 2);

    // While the stream runs: refused unless --force.
    let stream = TestStream::spawn(&env).await;
    crate::support::wait_until(
        std::time::Duration::from_secs(60),
        "the stream to join its group",
        || async {
            let members =
                invoice::stream::offsets::group_members(&crate::support::kafka(), &group).await.ok()?;
            (members > 0).then_some(())
        },
    )
    .await;
    let (code, _, err) =
        run(&env, &["offsets", "reset", "--topic", &topics.names.payment, "--to-latest", "--execute"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("running consumer"), "{err}");
    let (code, _, err) = run(
        &env,
        &["offsets", "reset", "--topic", &topics.names.payment, "--to-latest", "--execute", "--force"],
    );
    assert_eq!(code, 0, "{err}");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tax_drift_finds_a_stored_taxinfo_the_topic_disagrees_with_and_a_replay_repairs_it() {
    use crate::events::{cdc, tax};
    use crate::support::wait_until;
    use std::time::Duration;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let group = unique("g-drift-");
    let env = stream_env(&db, &topics.names, &group);
    let p = producer();
    for merchant in ["M-1", "M-2"] {
        let event = cdc("c", merchant, tax("immediate"), 10).to_string();
        produce(&p, &topics.names.merchant_cdc, merchant, Some(event.as_bytes()), &[]).await;
    }
    let stream = TestStream::spawn(&env).await;
    wait_until(Duration::from_secs(60), "both merchants stored", || async {
        (scalar(&db, "SELECT count(*) FROM merchant_tax_info").await == 2).then_some(())
    })
    .await;
    stream.stop().await.unwrap();
    let (code, out, err) = run(&env, &["tax-drift"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 merchant(s) compared") && out.contains("0 drifted"), "{out}");

    // Someone edits the stored TaxInfo by hand: drift.
    sqlx::query("UPDATE merchant_tax_info SET tax = jsonb_set(tax, '{legalName}', '\"Hand edited\"') WHERE merchant_id = 'M-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, out, _) = run(&env, &["tax-drift", "--json"]);
    assert_eq!(code, 1, "{out}");
    let findings: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let m1 = findings.iter().find(|f| f["merchantId"] == "M-1").unwrap();
    assert_eq!(m1["drift"], "tax_differs");
    assert_eq!(m1["storedTax"]["legalName"], "Hand edited");
    let m2 = findings.iter().find(|f| f["merchantId"] == "M-2").unwrap();
    assert_eq!(m2["drift"], "in_sync");
    assert_eq!(run(&env, &["tax-drift", "--merchant", "M-2"]).0, 0);

    // The runbook's re-sync: replay the CDC topic from the start.
    wait_group_empty(&group).await;
    let (code, _, err) =
        run(&env, &["offsets", "reset", "--topic", &topics.names.merchant_cdc, "--to-earliest", "--execute"]);
    assert_eq!(code, 0, "{err}");
    let stream = TestStream::spawn(&env).await;
    wait_until(Duration::from_secs(60), "the replay to repair M-1", || async {
        (run(&env, &["tax-drift"]).0 == 0).then_some(())
    })
    .await;
    stream.stop().await.unwrap();
}

/// Waits until `group` has no member (a stopped stream's LeaveGroup can take a moment to
/// show in the group description), as an operator would before a reset.
async fn wait_group_empty(group: &str) {
    crate::support::wait_until(std::time::Duration::from_secs(30), "the consumer group to empty", || async {
        let members = invoice::stream::offsets::group_members(&crate::support::kafka(), group).await.ok()?;
        (members == 0).then_some(())
    })
    .await;
}

/// Every stored merchant row, as text, for before/after comparisons.
async fn merchant_rows(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT row_to_json(m)::text FROM merchant_tax_info m ORDER BY merchant_id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_cdc_topic_from_the_start_changes_no_taxinfo_row() {
    use crate::events::{cdc, tax};
    use crate::support::{metric_value, wait_until};
    use std::time::Duration;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let group = unique("g-resync-");
    let env = stream_env(&db, &topics.names, &group);
    let p = producer();
    // Creates, an update, an update that changes nothing, and a delete: every CDC path.
    let mut changed = tax("immediate");
    changed["legalName"] = serde_json::json!("Công ty TNHH Đổi Tên");
    let events = [
        ("M-1", cdc("c", "M-1", tax("immediate"), 10)),
        ("M-2", cdc("c", "M-2", tax("claim_window"), 11)),
        ("M-1", cdc("u", "M-1", changed.clone(), 12)),
        ("M-1", cdc("u", "M-1", changed, 13)),
        ("M-3", cdc("c", "M-3", tax("immediate"), 14)),
        ("M-3", cdc("d", "M-3", tax("immediate"), 15)),
    ];
    let mut end = 0;
    for (key, event) in &events {
        end =
            produce(&p, &topics.names.merchant_cdc, key, Some(event.to_string().as_bytes()), &[]).await.1 + 1;
    }
    let caught_up = || async {
        let offsets = stored(&db, &topics.names.merchant_cdc).await;
        (offsets.first().map(|(_, o)| *o) == Some(end)).then_some(())
    };
    let stream = TestStream::spawn(&env).await;
    wait_until(Duration::from_secs(60), "the CDC topic consumed", caught_up).await;
    stream.stop().await.unwrap();
    let before = merchant_rows(&db).await;
    assert_eq!(before.len(), 3, "{before:?}");
    wait_group_empty(&group).await;

    let (code, out, err) =
        run(&env, &["offsets", "reset", "--topic", &topics.names.merchant_cdc, "--to-earliest", "--execute"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(stored(&db, &topics.names.merchant_cdc).await, vec![(0, 0)]);
    let stream = TestStream::spawn(&env).await;
    wait_until(Duration::from_secs(60), "the replay to finish", caught_up).await;
    // Not one row written: the same bytes, `updated_at` included (diff skip and position
    // ordering, not a rewrite with equal values).
    assert_eq!(merchant_rows(&db).await, before);
    // Every replayed event was counted as a no-write outcome (the counters move just after
    // the commit that moved the offset: polled).
    let count = |metrics: &str, outcome: &str| {
        metric_value(metrics, "invoice_cdc_updates_total", &[&format!("outcome=\"{outcome}\"")])
    };
    let metrics = wait_until(Duration::from_secs(30), "every replayed event counted", || async {
        let metrics = stream.metrics().await;
        let no_write =
            ["skipped", "stale", "already_deleted"].iter().map(|o| count(&metrics, o)).sum::<f64>();
        (no_write >= events.len() as f64).then_some(metrics)
    })
    .await;
    assert_eq!(count(&metrics, "applied") + count(&metrics, "deleted"), 0.0, "{metrics}");
    assert_eq!(merchant_rows(&db).await, before);
    stream.stop().await.unwrap();
    let (code, _, _) = run(&env, &["tax-drift"]);
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_to_a_datetime_lands_where_kafkas_offsets_for_times_says() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use std::time::Duration;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let group = unique("g-dt-");
    let env = stream_env(&db, &topics.names, &group);
    let p = producer();
    for i in 0..3 {
        produce(&p, &topics.names.payment, &format!("early-{i}"), Some(b"{}"), &[]).await;
    }
    // A boundary strictly between the two batches' timestamps (the clock is polled, not slept).
    let boundary = chrono::Utc::now() + chrono::Duration::milliseconds(5);
    crate::support::wait_until(Duration::from_secs(5), "the clock to pass the boundary", || async {
        (chrono::Utc::now() > boundary + chrono::Duration::milliseconds(2)).then_some(())
    })
    .await;
    for i in 0..4 {
        produce(&p, &topics.names.payment, &format!("late-{i}"), Some(b"{}"), &[]).await;
    }
    let (code, out, err) = run(
        &env,
        &[
            "offsets",
            "reset",
            "--topic",
            &topics.names.payment,
            "--to-datetime",
            &boundary.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", crate::support::kafka_brokers())
        .set("group.id", unique("g-oft-"))
        .create()
        .unwrap();
    let mut query = TopicPartitionList::new();
    query
        .add_partition_offset(&topics.names.payment, 0, Offset::Offset(boundary.timestamp_millis()))
        .unwrap();
    let answer = consumer.offsets_for_times(query, Duration::from_secs(10)).unwrap();
    let kafka_says = answer.elements()[0].offset().to_raw().unwrap();
    assert_eq!(kafka_says, 3, "the boundary falls between the batches");
    assert_eq!(stored(&db, &topics.names.payment).await, vec![(0, kafka_says)]);
}

/// A batch's writes carrying one skip decision (and its audit and outbox rows) for `event`.
fn one_decision(event: &str, offset: i64) -> invoice::storage::decisions::Writes {
    use invoice::storage::decisions::{NewAudit, NewDecision, NewOutbox, Writes};
    Writes {
        decisions: vec![NewDecision {
            event_id: event.into(),
            merchant_id: "M-9".into(),
            order_id: format!("ORD-{event}"),
            outcome: "skipped",
            skip_reason: Some("merchant_unknown"),
            invoice_id: None,
            partition: 0,
            offset,
        }],
        audits: vec![NewAudit {
            entity: "offsets",
            entity_id: event.into(),
            invoice_id: None,
            merchant_id: Some("M-9".into()),
            order_id: Some(format!("ORD-{event}")),
            event_type: "payment.skipped",
            outcome: "skipped".into(),
            before: None,
            after: None,
            actor: "stream".into(),
            reason: None,
        }],
        outbox: vec![NewOutbox {
            event_id: uuid::Uuid::new_v4(),
            topic: "t".into(),
            key: None,
            payload: Some(event.as_bytes().to_vec()),
            headers: serde_json::json!({}),
            has_secret: false,
        }],
        ..Writes::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_offset_moved_under_it_writes_nothing_and_two_owners_never_both_write() {
    use invoice::storage::decisions::OffsetMove;
    let db = TestDb::create().await;
    let at = |expected: Option<i64>, next: i64| OffsetMove {
        group: "g",
        topic: "payments",
        partition: 0,
        expected,
        next,
    };
    let written = |event: &'static str| {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM payment_decision WHERE event_id = $1)
                      + (SELECT count(*) FROM audit_log WHERE entity_id = $1)
                      + (SELECT count(*) FROM outbox WHERE payload = convert_to($1, 'UTF8'))",
            )
            .bind(event)
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        }
    };
    let mut conn = db.pool.acquire().await.unwrap();
    // A partition never stored: the first owner creates its row.
    assert!(one_decision("e1", 0).write(&mut conn, at(None, 1)).await.unwrap());
    assert_eq!(written("e1").await, 3);
    // A second owner that also believed it new, or believes another offset: fenced, nothing written.
    assert!(!one_decision("e2", 0).write(&mut conn, at(None, 1)).await.unwrap());
    assert!(!one_decision("e3", 5).write(&mut conn, at(Some(5), 6)).await.unwrap());
    assert_eq!((written("e2").await, written("e3").await), (0, 0));
    assert_eq!(scalar(&db, "SELECT next_offset FROM consumer_offset").await, 1);

    // Two owners of offset 1 at once: the second waits on the first's row lock, then finds the
    // offset moved and writes nothing.
    let mut first = db.pool.begin().await.unwrap();
    assert!(one_decision("e4", 1).write(&mut first, at(Some(1), 2)).await.unwrap());
    let second = tokio::spawn({
        let pool = db.pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            one_decision("e5", 1).write(&mut conn, at(Some(1), 2)).await.unwrap()
        }
    });
    crate::support::wait_until(std::time::Duration::from_secs(30), "the second owner to wait on the lock", || {
        let pool = db.pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;
    first.commit().await.unwrap();
    assert!(!second.await.unwrap(), "the second owner was fenced");
    assert_eq!((written("e4").await, written("e5").await), (3, 0));
    assert_eq!(scalar(&db, "SELECT next_offset FROM consumer_offset").await, 2);
}
