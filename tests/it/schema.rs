//! The invoice table's write path as Postgres sees it (migrations 0007–0013): taking an
//! invoice for a call is a HOT update, the sweeper's due scan still finds what it must, and
//! the rules the indexes used to carry through `status` still hold.

use std::time::Duration;

use chrono::{DateTime, Utc};
use invoice::storage::issuance;

use crate::support::{seed_invoice, unique, wait_until, TestDb};

async fn row(db: &TestDb, id: i64) -> (String, Option<DateTime<Utc>>, DateTime<Utc>) {
    sqlx::query_as("SELECT status, next_attempt_at, updated_at FROM invoice WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn due_ids(db: &TestDb) -> Vec<i64> {
    issuance::due_page(&db.pool, 0, 100).await.unwrap().into_iter().map(|(id, ..)| id).collect()
}

#[tokio::test]
async fn taking_an_invoice_is_a_hot_update_and_the_sweeper_finds_it_again_only_when_its_lease_ends() {
    let db = TestDb::create().await;
    let order = unique("ORD-HOT-");
    let (id, _) = seed_invoice(&db, "M-HOT", &order, "QUEUED", Utc::now()).await;
    // Due an hour ago: the gauge must measure an expired lease from the lease's end, not from this.
    sqlx::query("UPDATE invoice SET next_attempt_at = now() - interval '1 hour' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, due_at, version) = row(&db, id).await;
    assert_eq!(due_ids(&db).await, vec![id], "a QUEUED invoice past its time is due");

    let hot_before: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(n_tup_hot_upd), 0)::bigint FROM pg_stat_user_tables WHERE relname = 'invoice'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let lease_until = Utc::now() + chrono::Duration::seconds(60);
    let taken = issuance::acquire(&mut tx, &[(id, version)], "w-test", lease_until, "test").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(taken, vec![(id, "QUEUED".to_owned())]);
    // This session's counters reach the shared statistics at its next report, not later.
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(&mut *conn).await.unwrap();
    drop(conn);

    let (status, due_after, _) = row(&db, id).await;
    assert_eq!(status, "ISSUING");
    assert_eq!(due_after, due_at, "taking the invoice leaves next_attempt_at (and its index) alone");
    wait_until(Duration::from_secs(30), "the take counted as a HOT update", || async {
        let hot: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(n_tup_hot_upd), 0)::bigint FROM pg_stat_user_tables WHERE relname = 'invoice'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (hot > hot_before).then_some(())
    })
    .await;
    assert!(due_ids(&db).await.is_empty(), "not due while its call lease runs");
    assert_eq!(issuance::oldest_due_seconds(&db.pool).await.unwrap(), 0.0);

    // The lease ran out (the worker died mid-call): due again, aged from the lease's end.
    sqlx::query("UPDATE invoice SET lease_until = now() - interval '5 seconds' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(due_ids(&db).await, vec![id], "an ISSUING invoice whose lease ended is due");
    let age = issuance::oldest_due_seconds(&db.pool).await.unwrap();
    assert!((5.0..600.0).contains(&age), "aged from the lease's end, not from an hour ago: {age}");

    // Settled: out of the due index for good.
    sqlx::query(
        "UPDATE invoice SET status = 'ISSUED', next_attempt_at = NULL, issued_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(due_ids(&db).await.is_empty());
}

#[tokio::test]
async fn one_live_invoice_per_order_and_a_cancelled_invoice_always_says_why() {
    let db = TestDb::create().await;
    let order = unique("ORD-LIVE-");
    let (id, _) = seed_invoice(&db, "M-LIVE", &order, "QUEUED", Utc::now()).await;
    let copy = |new_id: i64| {
        sqlx::query(
            "INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, paid_at, currency, lines,
                 total_net, total_vat, total_amount, config_snapshot, transaction_uuid, next_attempt_at)
             SELECT $2, merchant_id, order_id, 'QUEUED', issuance_mode, paid_at, currency, lines, total_net,
                 total_vat, total_amount, config_snapshot, $3, now()
             FROM invoice WHERE id = $1",
        )
        .bind(id)
        .bind(new_id)
        .bind(uuid::Uuid::new_v4().to_string())
    };
    let second = copy(id + 1).execute(&db.pool).await.unwrap_err();
    assert!(second.to_string().contains("invoice_one_live_per_order"), "{second}");

    let reasonless =
        sqlx::query("UPDATE invoice SET status = 'CANCELLED', next_attempt_at = NULL WHERE id = $1")
            .bind(id)
            .execute(&db.pool)
            .await
            .unwrap_err();
    assert!(reasonless.to_string().contains("invoice_cancelled_has_reason"), "{reasonless}");
    assert_eq!(row(&db, id).await.0, "QUEUED", "the refused update changed nothing");

    sqlx::query(
        "UPDATE invoice SET status = 'CANCELLED', cancel_reason = 'order refunded', next_attempt_at = NULL
         WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    copy(id + 1).execute(&db.pool).await.unwrap();
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM invoice WHERE order_id = $1 AND cancel_reason IS NULL")
            .bind(&order)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(live, 1, "after a cancellation the order may have a new live invoice, one");
}
