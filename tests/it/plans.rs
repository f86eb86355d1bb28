//! Query plans under stale statistics. Postgres plans from the statistics of its last
//! analyze; the statements that run per job must stay on a key lookup when those statistics
//! say no invoice is unfinished (an analyze in a quiet hour) and a burst has since queued
//! thousands: a plan through an index of unfinished invoices then reads all of them for each
//! lookup, and the slower the lookups get, the longer the backlog they read.

use serde_json::Value;
use sqlx::PgPool;

use crate::support::TestDb;

const BACKLOG: i64 = 20_000;

/// A database whose statistics saw only issued invoices, and which now holds `BACKLOG`
/// queued ones (autovacuum off for the table, so nothing analyzes it meanwhile).
async fn stale_statistics() -> TestDb {
    let db = TestDb::create().await;
    let pool = &db.pool;
    sqlx::query("ALTER TABLE invoice SET (autovacuum_enabled = false)").execute(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, paid_at, currency, lines,
             total_net, total_vat, total_amount, config_snapshot, transaction_uuid, next_attempt_at)
         SELECT n, 'M-' || (n % 100), 'O-' || n, 'ISSUED', 'immediate', now(), 'VND', '[]', 100000, 8000, 108000,
             '{}', 'tx-uuid-' || lpad(n::text, 8, '0'), NULL
         FROM generate_series(1, $1) AS n",
    )
    .bind(BACKLOG)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE invoice").execute(pool).await.unwrap();
    sqlx::query("UPDATE invoice SET status = 'QUEUED', next_attempt_at = now()").execute(pool).await.unwrap();
    db
}

/// Every scan in `plan` (EXPLAIN's JSON) as `(node type, relation, index or "")`.
fn scans(plan: &Value, out: &mut Vec<(String, String, String)>) {
    if let Some(relation) = plan.get("Relation Name").and_then(Value::as_str) {
        let field = |name: &str| plan.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        out.push((field("Node Type"), relation.to_owned(), field("Index Name")));
    }
    for child in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
        scans(child, out);
    }
}

type Bound<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The plan of `explain` (an `EXPLAIN (FORMAT JSON)` with its arguments), and its scans.
async fn plan_of(pool: &PgPool, explain: Bound<'_>) -> (Value, Vec<(String, String, String)>) {
    let row = explain.fetch_one(pool).await.unwrap();
    let plan = sqlx::Row::get::<sqlx::types::Json<Value>, _>(&row, 0).0;
    let mut found = Vec::new();
    scans(&plan[0]["Plan"], &mut found);
    (plan, found)
}

/// The plan of `explain` as `(scan node types, indexes)` on the invoice table.
async fn invoice_plan(pool: &PgPool, explain: Bound<'_>) -> (Vec<String>, Vec<String>, Value) {
    let (plan, found) = plan_of(pool, explain).await;
    let (mut nodes, mut indexes) = (Vec::new(), Vec::new());
    for (node, _, index) in found.into_iter().filter(|(_, relation, _)| relation == "invoice") {
        nodes.push(node);
        if !index.is_empty() {
            indexes.push(index);
        }
    }
    (nodes, indexes, plan)
}

/// The indexes that look invoices up by id or by order.
const KEY_INDEXES: [&str; 2] = ["invoice_pkey", "invoice_by_order"];

/// Asserts that `explain` reads invoices by id or order only.
async fn assert_key_lookups(pool: &PgPool, what: &str, explain: Bound<'_>) {
    let (nodes, indexes, plan) = invoice_plan(pool, explain).await;
    assert!(!nodes.is_empty(), "{what}: no scan of invoice in {plan}");
    assert!(!nodes.iter().any(|n| n == "Seq Scan"), "{what} reads the whole invoice table: {plan}");
    assert!(
        indexes.iter().all(|i| KEY_INDEXES.contains(&i.as_str())),
        "{what} reads invoices through {indexes:?}, not by key: {plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_job_statements_look_invoices_up_by_key_when_statistics_say_none_is_queued() {
    let db = stale_statistics().await;
    let pool = &db.pool;
    let orders: Vec<String> = (1..=137).map(|n| format!("O-{n}")).collect();
    let ids: Vec<i64> = (1..=137).collect();
    let seen: Vec<chrono::DateTime<chrono::Utc>> = vec![chrono::Utc::now(); ids.len()];

    let read = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::issuance::UNFINISHED_FOR_ORDERS);
    assert_key_lookups(pool, "the worker's read", sqlx::query(&read).bind(&orders).bind(chrono::Utc::now()))
        .await;

    // The stream's read of a batch's facts looks each order's invoices up by key.
    let facts = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::decisions::FACTS);
    let events: Vec<String> = (1..=137).map(|n| format!("ev-{n}")).collect();
    let merchants: Vec<String> = (0..100).map(|n| format!("M-{n}")).collect();
    assert_key_lookups(
        pool,
        "the stream's facts",
        sqlx::query(&facts).bind(&events).bind(&orders).bind(&merchants),
    )
    .await;

    let take = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::issuance::ACQUIRE);
    let until = chrono::Utc::now() + chrono::Duration::seconds(60);
    assert_key_lookups(
        pool,
        "the worker's take",
        sqlx::query(&take)
            .bind(&ids)
            .bind("owner")
            .bind(until)
            .bind(&seen)
            .bind("worker")
            .bind(chrono::Utc::now()),
    )
    .await;

    let renew = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::issuance::RENEW_LEASE);
    assert_key_lookups(
        pool,
        "the lease renewal",
        sqlx::query(&renew).bind(7_i64).bind("owner").bind(until).bind(chrono::Utc::now()),
    )
    .await;

    // A buyer given for an order (webhook, claim) looks up the original's replacement.
    let replacement = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::buyers::REPLACEMENT_OF);
    assert_key_lookups(
        pool,
        "the replacement of an original",
        sqlx::query(&replacement).bind(7_i64).bind("M-7").bind("O-7"),
    )
    .await;

    // The operator list reads a page of each merchant in id order, never all of its invoices
    // to sort them: with one merchant, and with several (one index read per merchant).
    use invoice::storage::invoices::{list_query, ListFilter};
    for merchants in [vec!["M-7".to_owned()], vec!["M-7".to_owned(), "M-8".to_owned()]] {
        for before_id in [None, Some(BACKLOG / 2)] {
            let filter = ListFilter {
                merchants: Some(merchants.clone()),
                before_id,
                limit: 50,
                ..ListFilter::default()
            };
            let mut explain = list_query("EXPLAIN (FORMAT JSON) ", &filter);
            let (nodes, indexes, plan) = invoice_plan(pool, explain.build()).await;
            let what = format!("the list of {merchants:?} below {before_id:?}");
            assert_eq!(nodes.len(), 1, "{what}: one read of invoice: {plan}");
            assert_eq!(indexes, ["invoice_merchant_recent"], "{what}: {plan}");
            if merchants.len() == 1 {
                assert!(!plan.to_string().contains("\"Sort\""), "{what} sorts: {plan}");
            }
        }
    }

    // The queries that do want the backlog still get an index of it, not the whole table.
    let due = "EXPLAIN (FORMAT JSON) SELECT id FROM invoice
               WHERE status IN ('QUEUED', 'ISSUING', 'SUBMITTED') AND next_attempt_at <= now()";
    let (_, indexes, plan) = invoice_plan(pool, sqlx::query(due)).await;
    assert_eq!(indexes, ["invoice_due"], "the due scan: {plan}");
    let failed = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::issuance::FAILED_NEWEST);
    let (nodes, indexes, plan) = invoice_plan(pool, sqlx::query(&failed).bind(10_000_i64)).await;
    assert_eq!(indexes, ["invoice_failed_recent"], "the DLQ list: {plan}");
    assert!(!nodes.iter().any(|n| n == "Seq Scan"), "the DLQ list: {plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reads_an_orders_decisions_by_key() {
    let db = TestDb::create().await;
    let pool = &db.pool;
    // Invoices, the created decisions of the odd ones as earlier versions wrote them (a
    // decision row, and an `invoice.created` audit row without the source), those of the
    // even ones as this one does (only the invoice and its audit row, which names the
    // source), and a few skipped decisions; analyzed.
    sqlx::query(
        "INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, payment_event_id, paid_at, currency,
             lines, total_net, total_vat, total_amount, config_snapshot, transaction_uuid)
         SELECT n, 'M-' || (n % 100), 'O-' || n, 'ISSUED', 'immediate', 'ev-' || n, now(), 'VND', '[]', 100000,
             8000, 108000, '{}', 'tx-uuid-' || lpad(n::text, 8, '0')
         FROM generate_series(1, $1) AS n",
    )
    .bind(BACKLOG)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO payment_decision (event_id, merchant_id, order_id, outcome, skip_reason, invoice_id, topic,
             partition, \"offset\")
         SELECT 'ev-' || n, 'M-' || (n % 100), 'O-' || n, 'created', NULL, n, 'payments', 0, n
         FROM generate_series(1, $1, 2) AS n
         UNION ALL
         SELECT 'ev-skip-' || n, 'M-1', 'O-' || n, 'skipped', 'merchant_unknown', NULL, 'payments', 1, n
         FROM generate_series(1, 50) AS n",
    )
    .bind(BACKLOG)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO audit_log (entity, entity_id, invoice_id, merchant_id, order_id, event_type, outcome, after, actor)
         SELECT 'invoice', n::text, n, 'M-' || (n % 100), 'O-' || n, 'invoice.created', 'QUEUED',
             CASE WHEN n % 2 = 0
                  THEN jsonb_build_object('source', jsonb_build_object('topic', 'payments', 'partition', 2, 'offset', n))
                  ELSE jsonb_build_object('status', 'QUEUED') END,
             'stream'
         FROM generate_series(1, $1) AS n",
    )
    .bind(BACKLOG)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE invoice, payment_decision, audit_log").execute(pool).await.unwrap();

    let explain = format!("EXPLAIN (FORMAT JSON) {}", invoice::storage::issuance::ORDER_DECISIONS);
    let (plan, found) = plan_of(pool, sqlx::query(&explain).bind("O-7")).await;
    let decision_reads: Vec<_> =
        found.iter().filter(|(_, relation, _)| relation == "payment_decision").collect();
    assert_eq!(decision_reads.len(), 2, "{plan}");
    assert!(
        found.iter().all(|(node, _, _)| node != "Seq Scan"),
        "an order's decisions read a whole table: {plan}"
    );
    let by_key = ["payment_decision_pkey", "payment_decision_skipped_order"];
    assert!(decision_reads.iter().all(|(_, _, index)| by_key.contains(&index.as_str())), "{plan}");

    let audit_reads: Vec<_> = found.iter().filter(|(_, relation, _)| relation == "audit_log").collect();
    assert!(!audit_reads.is_empty(), "{plan}");
    assert!(audit_reads.iter().all(|(_, _, index)| index == "audit_log_invoice"), "{plan}");

    // And the query answers, for an order decided either way: the created decision, with
    // where its event was read, and the skipped one.
    for (order, partition) in [("O-7", 0), ("O-8", 2)] {
        let decisions: Vec<Value> = sqlx::query_scalar(invoice::storage::issuance::ORDER_DECISIONS)
            .bind(order)
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(decisions.len(), 2, "{order}: {decisions:?}");
        let created = decisions.iter().find(|d| d["outcome"] == "created").expect("the created decision");
        let n: i64 = order[2..].parse().unwrap();
        assert_eq!(created["eventId"], format!("ev-{n}"), "{created}");
        assert_eq!(created["invoiceId"], n.to_string(), "{created}");
        assert_eq!(
            (created["topic"].as_str(), created["partition"].as_i64()),
            (Some("payments"), Some(partition))
        );
        assert_eq!(created["offset"], n, "{created}");
        assert!(decisions.iter().any(|d| d["outcome"] == "skipped"), "{order}: {decisions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reads_the_oldest_rows_by_key_and_parked_ones_through_their_index() {
    use invoice::storage::outbox::PENDING;
    let db = TestDb::create().await;
    let pool = &db.pool;
    // A backlog (Kafka was away): `BACKLOG` rows over 5,000 keys, and two rows without a key.
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, message_key, payload)
         SELECT gen_random_uuid(), 'events', CASE WHEN n <= $1 THEN convert_to('O-' || (n % 5000), 'UTF8') END, '\\x00'
         FROM generate_series(1, $1 + 2) AS n",
    )
    .bind(BACKLOG)
    .execute(pool)
    .await
    .unwrap();
    let explain = format!("EXPLAIN (FORMAT JSON) {}", PENDING.as_str());
    // It reads the oldest rows by key, whether rows are parked or not (the usual case).
    for parked in [false, true] {
        if parked {
            // The second row of key O-77, and the first row without a key.
            sqlx::query("UPDATE outbox SET attempts = 10 WHERE id IN (5077, $1 + 1)")
                .bind(BACKLOG)
                .execute(pool)
                .await
                .unwrap();
        }
        sqlx::query("ANALYZE outbox").execute(pool).await.unwrap();
        // Holding nothing, or (sends in flight, rows waiting for their key) as many rows as
        // the relay may hold.
        for held in [0, 10_000] {
            let ids: Vec<i64> = (1..=held).collect();
            let query = sqlx::query(&explain).bind(1000_i64).bind(ids);
            let (plan, found) = plan_of(pool, query).await;
            assert!(
                found.iter().all(|(node, _, _)| node != "Seq Scan"),
                "the relay reads the whole backlog: {plan}"
            );
            assert!(!plan.to_string().contains("\"Sort\""), "the relay sorts the backlog: {plan}");
            assert!(found.iter().any(|(_, _, index)| index == "outbox_pkey"), "{plan}");
            if parked {
                assert!(found.iter().any(|(_, _, index)| index == "outbox_parked"), "{plan}");
            }
        }
    }

    // And it answers: what comes before a parked row of its key, and every row of another
    // key, in id order; not the parked rows, nor what comes after them in their key. A row
    // without a key orders with nothing.
    let read = |held: Vec<i64>| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT id FROM ({}) r", PENDING.as_str()))
            .bind(BACKLOG + 2)
            .bind(held)
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let ids = read(vec![]).await;
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    for (id, expected) in [(77, true), (5077, false), (10077, false), (15077, false), (78, true)] {
        assert_eq!(ids.contains(&id), expected, "row {id}");
    }
    assert_eq!(ids.last(), Some(&(BACKLOG + 2)), "the row without a key after a parked one");
    assert_eq!(ids.len() as i64, BACKLOG + 2 - 4);
    // What the relay holds is left out, and nothing else.
    let held = vec![78, 5078, BACKLOG + 2];
    let expected: Vec<i64> = ids.iter().copied().filter(|id| !held.contains(id)).collect();
    assert_eq!(read(held).await, expected);
    assert_eq!(expected.len(), ids.len() - 3);
}
