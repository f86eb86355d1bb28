//! Issuance end to end: payments in Kafka → stream → Redis queue → workers → the provider
//! simulator, against the real local stack. Every test asserts on invoices, provider-side
//! counts (one invoice per transaction UUID), attempt rows, audit rows and metrics.

use std::collections::HashMap;
use std::time::Duration;

use invoice::providers::sim::Knobs;
use serde_json::{json, Value};

use crate::events::{cdc, payment, tax};
use crate::support::kafka::{produce, producer, TestTopics};
use crate::support::{
    insert_provider_config_at, invoice_cmd, issuance_env, metric_value, queue_of, unique, wait_until,
    wipe_queue, TestDb, TestSim, TestStream, TestWorker,
};

const WAIT: Duration = Duration::from_secs(90);

/// A merchant `M-1` with its provider at `sim`, a stream and the environment for workers.
struct Setup {
    db: TestDb,
    topics: TestTopics,
    env: HashMap<String, String>,
    stream: TestStream,
    sim: TestSim,
}

async fn setup(knobs: Knobs, mode: &str) -> Setup {
    setup_with(knobs, mode, |_| {}).await
}

async fn setup_with(knobs: Knobs, mode: &str, tweak: impl FnOnce(&mut HashMap<String, String>)) -> Setup {
    let db = TestDb::create().await;
    let topics = TestTopics::create(3).await;
    let sim = TestSim::spawn(knobs).await;
    let mut env = issuance_env(&db, &topics.names, &unique("g-"));
    tweak(&mut env);
    let p = producer();
    let mut merchant_tax = tax(mode);
    if mode == "claim_window" {
        merchant_tax["claimWindowMinutes"] = json!(0);
    }
    produce(
        &p,
        &topics.names.merchant_cdc,
        "M-1",
        Some(cdc("c", "M-1", merchant_tax, 10).to_string().as_bytes()),
        &[],
    )
    .await;
    insert_provider_config_at(&db, "M-1", 1, &sim.endpoint()).await;
    let stream = TestStream::spawn(&env).await;
    let s = Setup { db, topics, env, stream, sim };
    s.wait_count("SELECT count(*) FROM merchant_tax_info", 1).await;
    s
}

impl Setup {
    async fn pay(&self, orders: impl IntoIterator<Item = String>) {
        let p = producer();
        for order in orders {
            let value = payment(&uuid::Uuid::new_v4().to_string(), &order, "M-1").to_string();
            produce(&p, &self.topics.names.payment, &order, Some(value.as_bytes()), &[]).await;
        }
    }

    /// A second merchant beside `M-1`: its TaxInfo through CDC and provider configuration
    /// `config_id` at the simulator; returns once the stream has stored the TaxInfo.
    async fn add_merchant(&self, merchant: &str, tax: Value, config_id: i64) {
        let value = cdc("c", merchant, tax, 10 + config_id).to_string();
        produce(&producer(), &self.topics.names.merchant_cdc, merchant, Some(value.as_bytes()), &[]).await;
        insert_provider_config_at(&self.db, merchant, config_id, &self.sim.endpoint()).await;
        self.wait_count("SELECT count(*) FROM merchant_tax_info", 2).await;
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let v: Option<Option<i64>> = sqlx::query_scalar(sql).fetch_optional(&self.db.pool).await.unwrap();
        v.flatten().unwrap_or(-1)
    }

    async fn wait_count(&self, sql: &str, expected: i64) {
        let what = format!("`{sql}` to reach {expected}");
        wait_until(WAIT, &what, || async { (self.scalar(sql).await == expected).then_some(()) }).await;
    }

    async fn status_of(&self, order: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT status FROM invoice WHERE order_id = $1 ORDER BY id")
            .bind(order)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    /// Every invoice has exactly one invoice at the simulator under its transaction UUID.
    async fn assert_one_provider_invoice_each(&self) {
        let uuids: Vec<String> =
            sqlx::query_scalar("SELECT transaction_uuid FROM invoice WHERE status = 'ISSUED'")
                .fetch_all(&self.db.pool)
                .await
                .unwrap();
        for uuid in uuids {
            let body: Vec<Value> = reqwest::get(format!("http://{}/sim/invoices/{uuid}", self.sim.addr))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(body.len(), 1, "transaction {uuid}: {body:?}");
        }
        assert_eq!(self.sim.stats().duplicates, 0, "{:?}", self.sim.stats());
        assert_eq!(self.sim.stats().overlaps, 0, "{:?}", self.sim.stats());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_raced_its_payment_reaches_the_consumer_invoice_before_it_is_issued() {
    let s = setup(Knobs::default(), "immediate").await;
    s.pay(["ORD-RACE".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE order_id = 'ORD-RACE' AND status = 'QUEUED'", 1).await;
    // The request committed while the payment's batch was deciding without it: pending.
    sqlx::query(
        "INSERT INTO invoice_request (id, merchant_id, order_id, buyer, source, created_at)
         VALUES (1, 'M-1', 'ORD-RACE', $1, 'merchant_webhook', now() - interval '10 seconds')",
    )
    .bind(crate::support::company_buyer())
    .execute(&s.db.pool)
    .await
    .unwrap();
    let worker = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE order_id = 'ORD-RACE' AND status = 'ISSUED'", 1).await;
    // Issued once, to the company: no consumer invoice to correct with a replacement.
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE order_id = 'ORD-RACE'").await, 1);
    assert_eq!(
        s.scalar("SELECT count(*) FROM invoice WHERE order_id = 'ORD-RACE' AND buyer_kind = 'company'").await,
        1
    );
    assert_eq!(s.scalar("SELECT count(*) FROM invoice_request WHERE joined_at IS NOT NULL").await, 1);
    assert_eq!(s.sim.stats().issued, 1);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_orders_are_issued_once_each_with_attempts_audit_events_and_metrics() {
    let s = setup(Knobs { latency_ms: 5, ..Knobs::default() }, "immediate").await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay((0..40).map(|i| format!("ORD-H-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 40).await;

    assert_eq!(s.sim.stats().issued, 40);
    s.assert_one_provider_invoice_each().await;
    // Number and codes adopted; the consumer wording of the rule set reached the provider.
    assert_eq!(
        s.scalar("SELECT count(*) FROM invoice WHERE provider_invoice_no LIKE 'C26TAA%' AND reservation_code IS NOT NULL AND issued_at IS NOT NULL AND lease_owner IS NULL").await,
        40
    );
    assert_eq!(
        s.scalar("SELECT count(*) FROM issuance_attempt WHERE operation = 'create' AND outcome = 'issued'")
            .await,
        40
    );
    // Attempt rows keep no personal data.
    let leaked = s
        .scalar("SELECT count(*) FROM issuance_attempt WHERE request::text LIKE '%a@example.vn%' OR request::text LIKE '%0901234567%'")
        .await;
    assert_eq!(leaked, 0);
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'invoice.issued'").await, 40);
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'issuance_started'").await, 40);
    // Events go out through the outbox relay of the worker (or the stream's).
    s.wait_count("SELECT count(*) FROM outbox WHERE headers->>'type' = 'invoice.issued'", 0).await;

    let text = worker.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "invoice_issuance_attempts_total",
            &["outcome=\"issued\"", "operation=\"create\""]
        ),
        40.0
    );
    assert_eq!(metric_value(&text, "invoice_issuance_transitions_total", &["status=\"ISSUED\""]), 40.0);
    assert!(metric_value(&text, "invoice_provider_latency_seconds_count", &["operation=\"create\""]) >= 40.0);
    // One enqueue-to-ISSUED latency per invoice issued, whatever else the jobs met.
    assert_eq!(metric_value(&text, "invoice_issuance_latency_seconds_count", &[]), 40.0);
    // The queue is empty afterwards: every job completed.
    let depths = queue_of(&s.env).depths().await.unwrap();
    assert!(
        depths.iter().all(|d| d.waiting == 0 && d.active == 0 && d.delayed == 0 && d.dead == 0),
        "{depths:?}"
    );
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_issuing_is_found_by_lookup_and_never_issued_twice() {
    // The simulator issues, then hangs past the client timeout (1.5 s) for the first 3 creates.
    let s = setup(Knobs { timeout_first: 3, hang_ms: 4_000, ..Knobs::default() }, "immediate").await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay((0..6).map(|i| format!("ORD-T-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 6).await;
    assert_eq!(s.sim.stats().injected_timeouts, 3);
    assert_eq!(s.sim.stats().issued, 6, "{:?}", s.sim.stats());
    s.assert_one_provider_invoice_each().await;
    assert_eq!(s.scalar("SELECT count(*) FROM issuance_attempt WHERE outcome = 'ambiguous'").await, 3);
    // Each ambiguous outcome was followed by a lookup that found the invoice.
    assert_eq!(
        s.scalar("SELECT count(*) FROM issuance_attempt WHERE operation = 'lookup' AND outcome = 'issued'")
            .await,
        3
    );
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'issuance_ambiguous'").await, 3);
    // Attempts count creates sent: the lookups that found the three counted none.
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE attempts = 1").await, 6);
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_503_may_have_been_forwarded_so_it_is_looked_up_before_any_resend() {
    // A proxy's 503 with no provider error body: the request may have reached the provider.
    let s = setup(Knobs { fail_first: 2, fail_bare: true, ..Knobs::default() }, "immediate").await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay((0..2).map(|i| format!("ORD-B-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 2).await;
    assert_eq!(s.sim.stats().injected_failures, 2);
    s.assert_one_provider_invoice_each().await;
    let attempts = |operation: &str, outcome: &str| {
        format!(
            "SELECT count(*) FROM issuance_attempt WHERE operation = '{operation}' AND outcome = '{outcome}'"
        )
    };
    assert_eq!(s.scalar(&attempts("create", "ambiguous")).await, 2);
    // Each was looked up (nothing there) before its one resend.
    assert_eq!(s.scalar(&attempts("lookup", "not_found")).await, 2);
    assert_eq!(s.scalar(&attempts("create", "issued")).await, 2);
    // Two creates sent each; the lookups counted nothing.
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE attempts = 2").await, 2);
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_provider_endpoint_on_loopback_is_never_called() {
    // Production's default: a configuration aiming the workers at this machine (the simulator
    // here, the cluster's own services in production) sends nothing, not even a login.
    let s = setup_with(Knobs::default(), "immediate", |env| {
        env.remove("APP_ENV_INVOICE_PROVIDER_ALLOW_PRIVATE_NETWORKS");
    })
    .await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay(["ORD-E-1".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'FAILED'", 1).await;
    let error: String = sqlx::query_scalar("SELECT last_error FROM invoice WHERE order_id = 'ORD-E-1'")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(error.starts_with("ENDPOINT_NOT_ALLOWED"), "{error}");
    let stats = s.sim.stats();
    assert_eq!((stats.logins, stats.creates, stats.lookups), (0, 0, 0), "{stats:?}");
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_whose_shared_config_snapshot_is_missing_fails_with_that_reason_and_calls_nothing() {
    let s = setup(Knobs::default(), "immediate").await;
    s.pay(["ORD-SN-1".to_owned(), "ORD-SN-2".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 2).await;
    // A damaged database: the invoice points at a shared snapshot that is not there.
    sqlx::query(
        "UPDATE invoice SET config_snapshot = NULL, config_snapshot_digest = sha256('gone'::bytea)
         WHERE order_id = 'ORD-SN-1'",
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    let worker = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status IN ('ISSUED', 'FAILED')", 2).await;
    assert_eq!(s.status_of("ORD-SN-1").await, vec!["FAILED"]);
    assert_eq!(s.status_of("ORD-SN-2").await, vec!["ISSUED"]);
    let error: String = sqlx::query_scalar("SELECT last_error FROM invoice WHERE order_id = 'ORD-SN-1'")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(error.contains("config snapshot is missing"), "{error}");
    assert_eq!(s.sim.stats().creates, 1, "only the intact invoice reached the provider");
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_without_a_number_is_submitted_then_issued() {
    let s = setup(
        Knobs { accept_without_number_first: 2, number_delay_ms: 1_500, latency_ms: 0, ..Knobs::default() },
        "immediate",
    )
    .await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay(["ORD-S-1".to_owned(), "ORD-S-2".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM audit_log WHERE event_type = 'issuance_submitted'", 2).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 2).await;
    assert!(s.scalar("SELECT count(*) FROM invoice WHERE submitted_at IS NOT NULL").await == 2);
    assert!(
        s.scalar("SELECT count(*) FROM issuance_attempt WHERE operation = 'lookup' AND outcome = 'issued'")
            .await
            >= 2
    );
    s.assert_one_provider_invoice_each().await;
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_invoice_the_tax_authority_rejected_is_counted_for_the_alert() {
    let s = setup(
        Knobs {
            accept_without_number_first: 1,
            number_delay_ms: 500,
            tax_authority_rejects: true,
            ..Knobs::default()
        },
        "immediate",
    )
    .await;
    let worker = TestWorker::spawn(&s.env).await;
    // The first create is accepted without a number: its lookup finds it numbered but
    // DIS_APPROVED. The other is issued by its create, whose answer has no such status.
    s.pay(["ORD-T-1".to_owned(), "ORD-T-2".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 2).await;
    assert_eq!(
        s.scalar("SELECT count(*) FROM invoice WHERE provider_status->>'status' = 'DIS_APPROVED'").await,
        1,
        "the lookup's status is kept on the invoice"
    );
    let metrics = worker.metrics().await;
    assert_eq!(
        metric_value(&metrics, "invoice_tax_authority_rejections_total", &["provider=\"viettel\""]),
        1.0,
        "one rejection, the other invoice is fine"
    );
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_with_backoff_and_permanent_ones_fail_to_the_dlq() {
    let s = setup(Knobs { fail_first: 3, ..Knobs::default() }, "immediate").await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay(["ORD-R-1".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 1).await;
    let outcomes: Vec<(String, i32)> =
        sqlx::query_as("SELECT outcome, attempt_no FROM issuance_attempt ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes,
        vec![("retryable".into(), 1), ("retryable".into(), 2), ("retryable".into(), 3), ("issued".into(), 4)]
    );
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'issuance_retry'").await, 3);

    // A permanent error: FAILED at once, dead-lettered, audited with the provider's code.
    s.sim.knobs(json!({"permanentFirst": 1})).await;
    s.pay(["ORD-P-1".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'FAILED'", 1).await;
    assert_eq!(s.scalar("SELECT count(*) FROM issuance_attempt WHERE outcome = 'permanent'").await, 1);
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM audit_log WHERE event_type = 'invoice.failed'")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert!(reason.starts_with("INVOICE_SERIAL_NOT_FOUND"), "{reason}");
    let queue = queue_of(&s.env);
    wait_until(WAIT, "the job in the DLQ", || async {
        (queue.job_state("ORD-P-1").await.unwrap().0.as_deref() == Some("dead")).then_some(())
    })
    .await;

    // `inspect` shows the decision, the invoice, the refused call and the audit trail, and the
    // queue state.
    let inspect = invoice_cmd(&s.env).args(["inspect", "ORD-P-1"]).output().unwrap();
    assert!(inspect.status.success());
    let report: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["decisions"][0]["outcome"], "created");
    assert_eq!(report["decisions"][0]["invoiceId"], report["invoices"][0]["id"]);
    assert_eq!(report["invoices"][0]["status"], "FAILED");
    assert_eq!(report["issuances"][0]["outcome"], "permanent");
    assert_eq!(report["issuances"][0]["errorCode"], "INVOICE_SERIAL_NOT_FOUND");
    assert!(report["audit"].as_array().unwrap().iter().any(|a| a["event"] == "invoice.failed"));
    assert_eq!(report["queue"]["job"], "dead");
    assert_eq!(invoice_cmd(&s.env).args(["inspect", "ORD-NOPE"]).output().unwrap().status.code(), Some(3));
    // The operator sees it, fixes the cause (the simulator now accepts) and requeues.
    let list = invoice_cmd(&s.env).args(["dlq", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success() && listed.contains("ORD-P-1") && listed.contains("dead"), "{listed}");
    let requeue = invoice_cmd(&s.env).args(["dlq", "requeue", "ORD-P-1"]).output().unwrap();
    assert!(requeue.status.success(), "{}", String::from_utf8_lossy(&requeue.stderr));
    assert!(String::from_utf8_lossy(&requeue.stdout).contains("job requeued, partition:"));
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 2).await;
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'replayed'").await, 1);
    // A second requeue has nothing FAILED to act on.
    let again = invoice_cmd(&s.env).args(["dlq", "requeue", "ORD-P-1"]).output().unwrap();
    assert_eq!(again.status.code(), Some(4));
    s.assert_one_provider_invoice_each().await;
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_enqueues_and_a_replay_of_an_issued_invoice_call_the_provider_no_more() {
    let s = setup(Knobs::default(), "immediate").await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay(["ORD-D-1".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 1).await;
    let creates = s.sim.stats().creates;
    // With no worker running (a finished job leaves Redis, so a later enqueue is new again):
    worker.stop().await.unwrap();

    // 100 concurrent enqueues of the same order: one job, and no provider call.
    let queue = queue_of(&s.env);
    let jobs = futures::future::join_all((0..100).map(|_| {
        let queue = queue.clone();
        async move {
            let payload = invoice::queue::JobPayload {
                merchant_id: "M-1".into(),
                enqueued_at_ms: invoice::queue::now_ms(),
                source: "test".into(),
            };
            queue.enqueue(&[("ORD-D-1".into(), payload)]).await.unwrap()[0]
        }
    }))
    .await;
    assert_eq!(jobs.iter().filter(|j| **j == invoice::queue::Enqueued::New).count(), 1);
    let worker = TestWorker::spawn(&s.env).await;
    wait_until(WAIT, "the duplicate job to complete", || async {
        queue.job_state("ORD-D-1").await.unwrap().0.is_none().then_some(())
    })
    .await;
    // A job that found its invoice issued is no enqueue-to-ISSUED latency.
    assert_eq!(metric_value(&worker.metrics().await, "invoice_issuance_latency_seconds_count", &[]), 0.0);
    let replay = invoice_cmd(&s.env).args(["replay", "ORD-D-1"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success() && stdout.contains("ISSUED -> ISSUED") && stdout.contains("nothing to issue"),
        "{stdout}"
    );
    assert_eq!(s.sim.stats().creates, creates);
    assert_eq!(s.scalar("SELECT count(*) FROM issuance_attempt").await, 1);
    // Unknown order: exit 3.
    assert_eq!(invoice_cmd(&s.env).args(["replay", "ORD-NOPE"]).output().unwrap().status.code(), Some(3));
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_deliveries_that_ended_without_a_verdict_make_a_poison_pill() {
    let s = setup(Knobs::default(), "immediate").await;
    let q = queue_of(&s.env);
    // Two orders in different partitions, so each can be claimed on its own.
    let retried = "ORD-PP-RETRIED".to_owned();
    let crashed = (0..)
        .map(|i| format!("ORD-PP-CRASHED-{i}"))
        .find(|o| q.partition_of(o) != q.partition_of(&retried))
        .unwrap();
    s.pay([retried.clone(), crashed.clone()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 2).await;
    let claim = |order: String, lease: Duration| {
        let q = q.clone();
        async move {
            wait_until(WAIT, "the job to be claimable", || {
                let (q, order) = (q.clone(), order.clone());
                async move { q.claim(q.partition_of(&order), 1, lease).await.unwrap().jobs.into_iter().next() }
            })
            .await
        }
    };
    // Handed back 40 times by live workers (as through a long Postgres outage, or waits for a
    // series slot): each retry is a verdict, so the job stays an ordinary one.
    for _ in 0..40 {
        let job = claim(retried.clone(), Duration::from_secs(30)).await;
        assert_eq!(job.order_id, retried);
        let retry =
            invoice::queue::Retry { job: &job, delay: Duration::ZERO, error: "storage unavailable".into() };
        assert_eq!(q.retry(job.partition, &[retry]).await.unwrap(), 0);
    }
    // Claimed 20 times by workers that died (the lease ran out each time): a poison pill.
    let mut last = 0;
    for _ in 0..20 {
        let job = claim(crashed.clone(), Duration::from_millis(1)).await;
        assert_eq!(job.order_id, crashed);
        last = job.delivery;
    }
    assert_eq!(last, 20, "each delivery that ended without a verdict counts");

    let _worker = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status IN ('ISSUED', 'FAILED')", 2).await;
    assert_eq!(s.status_of(&retried).await, vec!["ISSUED"]);
    assert_eq!(s.status_of(&crashed).await, vec!["FAILED"]);
    let error: String = sqlx::query_scalar("SELECT last_error FROM invoice WHERE order_id = $1")
        .bind(&crashed)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(error.contains("redelivered"), "{error}");
    assert_eq!(s.sim.stats().issued, 1, "the poison pill never reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_everything_loses_no_invoice() {
    // Few slots and a slow provider, so most jobs are still waiting in Redis when it is wiped.
    let s = setup_with(Knobs { latency_ms: 40, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_WORKER_CONCURRENCY".into(), "4".into());
        env.insert("APP_ENV_INVOICE_WORKER_BATCH_MAX".into(), "4".into());
    })
    .await;
    s.pay((0..150).map(|i| format!("ORD-F-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 150).await;
    let queue = queue_of(&s.env);
    wait_until(WAIT, "150 jobs waiting in Redis", || async {
        let waiting: u64 = queue.depths().await.unwrap().iter().map(|d| d.waiting).sum();
        (waiting == 150).then_some(())
    })
    .await;
    let worker = TestWorker::spawn(&s.env).await;
    // Wipe the queue while invoices are being issued (what FLUSHALL does to it).
    wait_until(WAIT, "issuance to be under way", || async {
        (s.scalar("SELECT count(*) FROM invoice WHERE status = 'ISSUED'").await >= 10).then_some(())
    })
    .await;
    let wiped = wipe_queue(&s.env).await;
    assert!(wiped > 0);
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 150).await;
    s.assert_one_provider_invoice_each().await;
    assert_eq!(s.sim.stats().issued, 150);
    let text = worker.metrics().await;
    assert!(
        metric_value(&text, "invoice_sweeper_reenqueued_total", &[]) > 0.0,
        "the sweeper did the recovery"
    );
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_queue_without_running_one_key_twice() {
    // Eight slots each, so neither worker can take the whole backlog alone; three calls at
    // once for the merchant's series, whichever process makes them.
    let s = setup_with(Knobs { latency_ms: 15, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_WORKER_CONCURRENCY".into(), "8".into());
        env.insert("APP_ENV_INVOICE_WORKER_BATCH_MAX".into(), "8".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_SERIES_CONCURRENCY".into(), "3".into());
    })
    .await;
    let a = TestWorker::spawn(&s.env).await;
    let b = TestWorker::spawn(&s.env).await;
    s.pay((0..120).map(|i| format!("ORD-W-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 120).await;
    s.assert_one_provider_invoice_each().await;
    let (ta, tb) = (a.metrics().await, b.metrics().await);
    let (ia, ib) = (
        metric_value(&ta, "invoice_issuance_transitions_total", &["status=\"ISSUED\""]),
        metric_value(&tb, "invoice_issuance_transitions_total", &["status=\"ISSUED\""]),
    );
    assert_eq!(ia + ib, 120.0);
    assert!(ia > 0.0 && ib > 0.0, "both workers took jobs: {ia} + {ib}");
    // The limit holds across the two processes (each alone would allow three), and is used.
    assert_eq!(s.sim.stats().peak_series_in_flight, 3, "{:?}", s.sim.stats());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_mixing_two_series_with_one_slot_each_never_wait_on_each_other() {
    // One call at a time per series, two series, two workers whose batches mix both: a batch
    // holding one series' slot while it waits for the other's must not stall the run.
    let s = setup_with(Knobs { latency_ms: 20, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_WORKER_CONCURRENCY".into(), "16".into());
        env.insert("APP_ENV_INVOICE_WORKER_BATCH_MAX".into(), "8".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_SERIES_CONCURRENCY".into(), "1".into());
    })
    .await;
    // A second merchant (its own seller tax code, so the simulator counts its series apart).
    let mut second = tax("immediate");
    second["taxCode"] = json!("0101243150");
    s.add_merchant("M-2", second, 2).await;
    let p = producer();
    let a = TestWorker::spawn(&s.env).await;
    let b = TestWorker::spawn(&s.env).await;
    for i in 0..60 {
        let (order, merchant) = (format!("ORD-S-{i}"), if i % 2 == 0 { "M-1" } else { "M-2" });
        let value = payment(&uuid::Uuid::new_v4().to_string(), &order, merchant).to_string();
        produce(&p, &s.topics.names.payment, &order, Some(value.as_bytes()), &[]).await;
    }
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 60).await;
    s.assert_one_provider_invoice_each().await;
    assert_eq!(s.sim.stats().peak_series_in_flight, 1, "{:?}", s.sim.stats());
    // Every batch's first call for a series asked for slots; the waits are on the dashboard.
    let waits = |text: &str| metric_value(text, "invoice_provider_series_wait_seconds_count", &[]);
    let (ta, tb) = (a.metrics().await, b.metrics().await);
    assert!(waits(&ta) + waits(&tb) >= 2.0, "{} + {}", waits(&ta), waits(&tb));
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_whose_tax_info_has_no_tax_code_is_invoiced_under_its_provider_accounts() {
    // Before, the snapshot's seller held `taxCode: null`, which the worker could not read:
    // every invoice of such a merchant failed for good, its claim token already sent.
    let s = setup(Knobs::default(), "immediate").await;
    let mut untaxed = tax("immediate");
    untaxed.as_object_mut().unwrap().remove("taxCode");
    s.add_merchant("M-3", untaxed, 3).await;
    let p = producer();
    let worker = TestWorker::spawn(&s.env).await;
    let value = payment(&uuid::Uuid::new_v4().to_string(), "ORD-NT-1", "M-3").to_string();
    produce(&p, &s.topics.names.payment, "ORD-NT-1", Some(value.as_bytes()), &[]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE order_id = 'ORD-NT-1' AND status = 'ISSUED'", 1).await;
    let seller: String = sqlx::query_scalar(
        "SELECT invoice_snapshot(config_snapshot, config_snapshot_digest)->'seller'->>'taxCode'
         FROM invoice WHERE order_id = 'ORD-NT-1'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(seller, "0100109106", "the provider configuration's supplierTaxCode");
    s.assert_one_provider_invoice_each().await;
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_claims_queue_the_invoice_exactly_once_with_several_workers() {
    // claim_window with a window of 0 minutes: every claim is past its deadline at once.
    let s = setup(Knobs::default(), "claim_window").await;
    s.pay((0..20).map(|i| format!("ORD-C-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'PENDING_CLAIM'", 20).await;
    let a = TestWorker::spawn(&s.env).await;
    let b = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 20).await;
    assert_eq!(s.scalar("SELECT count(*) FROM claim WHERE status = 'EXPIRED'").await, 20);
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'claim_expired'").await, 20);
    assert_eq!(
        s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'claim_expired' AND outcome = 'QUEUED'")
            .await,
        20
    );
    s.assert_one_provider_invoice_each().await;
    let expired = metric_value(&a.metrics().await, "invoice_claims_total", &["event=\"expired\""])
        + metric_value(&b.metrics().await, "invoice_claims_total", &["event=\"expired\""]);
    assert_eq!(expired, 20.0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_is_issued_with_adjustment_type_3_and_the_original_becomes_replaced() {
    let s = setup(Knobs::default(), "immediate").await;
    let worker = TestWorker::spawn(&s.env).await;
    s.pay(["ORD-X-1".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 1).await;
    let (original_id, original_no): (i64, String) =
        sqlx::query_as("SELECT id, provider_invoice_no FROM invoice WHERE order_id = 'ORD-X-1'")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    let buyer = json!({"legalName": "Công ty TNHH Mua Hàng", "taxCode": "0101243150", "address": "2 Lý Thường Kiệt, Hà Nội"});
    let replacement_id = original_id + 1;
    let events_topic = s.topics.names.events.clone();
    let giver = |replacement_id| invoice::storage::buyers::Giver {
        source: "claim",
        actor: "test".into(),
        events_topic: &events_topic,
        replacement_id,
        now: chrono::Utc::now(),
        asked_at: None,
    };
    let mut tx = s.db.pool.begin().await.unwrap();
    let created = invoice::storage::issuance::create_replacement(
        &mut tx,
        original_id,
        &buyer,
        "company",
        "buyer claimed a company invoice",
        &giver(replacement_id),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(created.is_some());
    let queue = queue_of(&s.env);
    invoice::issuance::enqueue(
        &queue,
        &invoice::metrics::Metrics::new(),
        &[("ORD-X-1".into(), "M-1".into())],
        "claim",
    )
    .await
    .unwrap();
    wait_until(WAIT, "the original to be REPLACED", || async {
        (s.status_of("ORD-X-1").await == ["REPLACED", "ISSUED"]).then_some(())
    })
    .await;
    let uuid: String = sqlx::query_scalar("SELECT transaction_uuid FROM invoice WHERE id = $1")
        .bind(replacement_id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let at_sim: Vec<Value> = reqwest::get(format!("http://{}/sim/invoices/{uuid}", s.sim.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(at_sim.len(), 1);
    assert_eq!(at_sim[0]["adjustmentType"], "3");
    assert_eq!(at_sim[0]["originalInvoiceId"], original_no.as_str());
    assert_eq!(at_sim[0]["buyerTaxCode"], "0101243150");
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'invoice.replaced'").await, 1);
    // The replacement is an invoice of its own: announced as created, then issued, in order.
    let replacement = replacement_id.to_string();
    let types = wait_until(WAIT, "the replacement's events", || async {
        let topic = s.topics.names.events.clone();
        let events = tokio::task::spawn_blocking(move || crate::support::kafka::read_to_end(&topic, WAIT));
        let types: Vec<String> = events
            .await
            .unwrap()
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(m.value.as_deref()?).ok())
            .filter(|v| v["invoiceId"] == replacement.as_str())
            .map(|v| v["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        types.contains(&"invoice.issued".to_owned()).then_some(types)
    })
    .await;
    assert_eq!(types, ["invoice.created", "invoice.issued"]);
    // A second replacement of a REPLACED invoice is refused.
    let mut tx = s.db.pool.begin().await.unwrap();
    let again = invoice::storage::issuance::create_replacement(
        &mut tx,
        original_id,
        &buyer,
        "company",
        "again",
        &giver(replacement_id + 1),
    )
    .await
    .unwrap();
    assert!(again.is_none());
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

fn spawn_worker_process(env: &HashMap<String, String>) -> std::process::Child {
    let mut env = env.clone();
    env.insert("APP_ENV_INVOICE_WORKER_ID".into(), crate::support::next_worker_id().to_string());
    invoice_cmd(&env)
        .arg("worker")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_with_sigkill_during_provider_calls_issue_every_invoice_exactly_once() {
    // 60 ms per call, so kills land in the middle of calls.
    let s = setup(Knobs { latency_ms: 60, ..Knobs::default() }, "immediate").await;
    let total = 300;
    s.pay((0..total).map(|i| format!("ORD-K-{i}"))).await;
    let mut workers = vec![spawn_worker_process(&s.env), spawn_worker_process(&s.env)];
    let mut kills = 0;
    let deadline = std::time::Instant::now() + WAIT;
    while s.scalar("SELECT count(*) FROM invoice WHERE status = 'ISSUED'").await < total && kills < 12 {
        assert!(std::time::Instant::now() < deadline, "issuance did not progress under kills");
        // Wait for some progress, then kill one worker mid-flight and start a fresh one.
        let before = s.sim.stats().creates;
        wait_until(WAIT, "provider calls to be under way", || async {
            (s.sim.stats().creates > before + 5).then_some(())
        })
        .await;
        let victim = kills % workers.len();
        workers[victim].kill().unwrap();
        workers[victim].wait().unwrap();
        workers[victim] = spawn_worker_process(&s.env);
        kills += 1;
    }
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", total).await;
    for mut w in workers {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    assert!(kills >= 3, "only {kills} kills happened");
    s.assert_one_provider_invoice_each().await;
    assert_eq!(s.sim.stats().issued, total as u64, "{:?}", s.sim.stats());
    assert_eq!(s.scalar("SELECT count(DISTINCT transaction_uuid) FROM invoice").await, total);
    crate::support::assert_no_orphans(&s.db).await;
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish_hands_back_the_rest_and_exits_zero() {
    // One call at a time per series, 300 ms each: when SIGTERM comes, most of the batch has
    // not been sent yet.
    let s = setup_with(Knobs { latency_ms: 300, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_PROVIDER_SERIES_CONCURRENCY".into(), "1".into());
    })
    .await;
    s.pay((0..20).map(|i| format!("ORD-G-{i}"))).await;
    // All of them waiting before the worker starts: started earlier, on a slow machine it
    // could take and finish the first job before the stream had queued the next, leaving
    // nothing to hand back.
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 20).await;
    let mut worker = spawn_worker_process(&s.env);
    wait_until(WAIT, "calls in flight", || async { (s.sim.stats().creates > 0).then_some(()) }).await;
    let term = std::process::Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = wait_until(WAIT, "the worker to exit", || {
        let exited = worker.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
    // Whatever it had started was finished, the rest handed back uncounted: nothing is left
    // ISSUING under its lease.
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE status = 'ISSUING'").await, 0);
    let handed_back =
        s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'issuance_handed_back'").await;
    assert!(handed_back > 0, "nothing was handed back");
    assert_eq!(
        s.scalar("SELECT count(*) FROM invoice WHERE status = 'QUEUED' AND attempts <> 0").await,
        0,
        "a handed-back invoice kept its attempt"
    );
    // Their jobs went back to the head of the line, not to a retry delay. (Other jobs may
    // legitimately sit delayed: e.g. a batch that found its rows busy looks again in a second.)
    let queue = queue_of(&s.env);
    let depths = queue.depths().await.unwrap();
    assert_eq!(depths.iter().map(|d| d.active).sum::<u64>(), 0, "a job was left active: {depths:?}");
    let handed_back_orders: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT order_id FROM audit_log WHERE event_type = 'issuance_handed_back'")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    for (order,) in handed_back_orders {
        let (state, _) = queue.job_state(&order).await.unwrap();
        assert_eq!(state.as_deref(), Some("waiting"), "the job of handed-back {order}");
    }
    let worker = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 20).await;
    s.assert_one_provider_invoice_each().await;
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hanging_provider_call_does_not_hold_back_the_rest_of_its_batch() {
    // The first create issues, then hangs until the client gives up (15 s: far from the
    // second or two the others need, even on a loaded machine); every other call answers at
    // once. One queue partition, every job waiting before the worker starts: the hanging call
    // and the nine others share one batch.
    let s = setup_with(Knobs { timeout_first: 1, hang_ms: 30_000, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_QUEUE_PARTITIONS".into(), "1".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_TIMEOUT_MS".into(), "15000".into());
    })
    .await;
    s.pay((0..10).map(|i| format!("ORD-H-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 10).await;
    let worker = TestWorker::spawn(&s.env).await;
    // The nine are settled while the hanging call still runs: its invoice is ISSUING with no
    // attempt recorded yet (a batch settled as a whole records it in the same statement).
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 9).await;
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE status = 'ISSUING'").await, 1);
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM issuance_attempt a JOIN invoice i ON i.id = a.invoice_id WHERE i.status = 'ISSUING'"
        )
        .await,
        0,
        "the hanging call had already ended: the nine waited for it"
    );
    assert_eq!(s.scalar("SELECT count(DISTINCT invoice_id) FROM issuance_attempt").await, 9);
    // Their jobs left the queue too (their slots with them), not at the batch's end.
    let queue = queue_of(&s.env);
    wait_until(WAIT, "only the hanging job to be active", || async {
        let depths = queue.depths().await.unwrap();
        (depths.iter().map(|d| d.active).sum::<u64>() == 1).then_some(())
    })
    .await;
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE status = 'ISSUING'").await, 1);
    // The hanging call ends ambiguous; the lookup finds what it issued.
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 10).await;
    assert_eq!(s.sim.stats().injected_timeouts, 1);
    assert_eq!(s.scalar("SELECT count(*) FROM audit_log WHERE event_type = 'issuance_ambiguous'").await, 1);
    s.assert_one_provider_invoice_each().await;
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_settling_part_of_a_batch_early_loses_and_duplicates_nothing() {
    // As above, with a shorter hang (4 s) so the hanging invoice's lease lapses soon: once
    // the nine are settled early, the worker is killed with SIGKILL mid-batch, its hanging
    // call and its batch's end never recorded. A fresh worker finishes the rest.
    let s = setup_with(Knobs { timeout_first: 1, hang_ms: 30_000, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_QUEUE_PARTITIONS".into(), "1".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_TIMEOUT_MS".into(), "4000".into());
    })
    .await;
    s.pay((0..10).map(|i| format!("ORD-HK-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 10).await;
    let mut first = spawn_worker_process(&s.env);
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 9).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let worker = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 10).await;
    assert_eq!(s.sim.stats().issued, 10, "{:?}", s.sim.stats());
    s.assert_one_provider_invoice_each().await;
    assert_eq!(s.scalar("SELECT count(DISTINCT transaction_uuid) FROM invoice").await, 10);
    crate::support::assert_no_orphans(&s.db).await;
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_wait_too_long_for_a_hanging_series_are_deferred_uncounted_then_issued() {
    // One call at a time for the series; the first create hangs until the client gives up
    // (15 s). The others may wait 1 s for the slot, then are deferred.
    let s = setup_with(Knobs { timeout_first: 1, hang_ms: 30_000, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_QUEUE_PARTITIONS".into(), "1".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_SERIES_CONCURRENCY".into(), "1".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_TIMEOUT_MS".into(), "15000".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_SERIES_WAIT_MS".into(), "1000".into());
    })
    .await;
    s.pay((0..5).map(|i| format!("ORD-W-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 5).await;
    let worker = TestWorker::spawn(&s.env).await;
    // The four waiting calls are deferred while the hanging one still runs (no attempt of
    // anyone is recorded yet), their attempts uncounted. (Deferred for a second, they come
    // back, are taken and deferred again until the hanging call ends.)
    s.wait_count(
        "SELECT count(DISTINCT invoice_id) FROM audit_log WHERE event_type = 'issuance_deferred'",
        4,
    )
    .await;
    assert_eq!(s.scalar("SELECT count(*) FROM issuance_attempt").await, 0, "the hanging call had ended");
    assert_eq!(s.scalar("SELECT count(*) FROM invoice WHERE attempts > 1").await, 0);
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM audit_log WHERE event_type = 'issuance_deferred' ORDER BY id LIMIT 1",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(reason.contains("no call slot for series") && reason.contains("M-1"), "{reason}");
    // Once the hanging call gives up (ambiguous, then found by lookup), everything is issued,
    // once each.
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 5).await;
    assert_eq!(s.sim.stats().issued, 5, "{:?}", s.sim.stats());
    s.assert_one_provider_invoice_each().await;
    // However often they were deferred, each deferred invoice was sent once: one attempt.
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM invoice i WHERE i.attempts = 1 AND EXISTS (SELECT 1 FROM audit_log a
             WHERE a.invoice_id = i.id AND a.event_type = 'issuance_deferred')"
        )
        .await,
        4
    );
    worker.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_catches_concurrent_creates_with_one_key_as_viettel_would_issue_them() {
    use invoice::domain::document::{self, Document, Seller};
    use invoice::domain::money::{self, LineInput, VatRate};
    use invoice::providers::{viettel, Outcome, Provider, Target};
    let sim = TestSim::spawn(Knobs { latency_ms: 200, ..Knobs::default() }).await;
    let provider = viettel::Viettel::new(viettel::Settings {
        allow_private_networks: true,
        ..viettel::Settings::default()
    })
    .unwrap();
    let target = Target {
        endpoint: sim.endpoint(),
        supplier_tax_code: "0100109106".into(),
        username: "0100109106-509".into(),
        password: invoice::config::Secret::new("pw".into()),
    };
    let inputs = vec![LineInput {
        sku: None,
        name: "Bánh mì".into(),
        unit: None,
        quantity: 3.into(),
        unit_price: 25_000.into(),
        vat_rate: VatRate::Ten,
    }];
    let (lines, totals) = money::compute("VND", &inputs).unwrap();
    let now = chrono::Utc::now();
    let doc = Document {
        invoice_id: 1,
        transaction_uuid: invoice::stream::transaction_uuid(1),
        template_code: "1/001".into(),
        series: "C26TAA".into(),
        legal_time: now,
        issued_at: now,
        currency: "VND".into(),
        seller: Seller { tax_code: "0100109106".into(), ..Seller::default() },
        buyer: None,
        paid_total: totals.gross,
        lines,
        totals,
        replaces: None,
        consumer_wording: Default::default(),
    };
    let prepared = document::validate(&doc).unwrap();
    let far = tokio::time::Instant::now() + Duration::from_secs(600);
    // Two concurrent creates with one key: the provider issues twice (what we must never do).
    let (a, b) = tokio::join!(
        provider.create(&target, &doc, &prepared, far),
        provider.create(&target, &doc, &prepared, far)
    );
    assert!(matches!(a.outcome, Outcome::Issued(_)) && matches!(b.outcome, Outcome::Issued(_)));
    assert_eq!((sim.stats().overlaps, sim.stats().duplicates), (1, 1));
    // A repeat after they finished answers with the first invoice; a lookup finds it.
    let c = provider.create(&target, &doc, &prepared, far).await;
    assert_eq!(sim.stats().repeats, 1);
    // Past its send-by instant (the worker's lease would not cover it) a create writes nothing.
    let late =
        provider.create(&target, &doc, &prepared, tokio::time::Instant::now() - Duration::from_secs(1)).await;
    assert_eq!(late.outcome.code(), Some(invoice::providers::NOT_SENT));
    assert_eq!(sim.stats().repeats, 1, "nothing reached the provider");
    let (Outcome::Issued(ia), Outcome::Issued(ib), Outcome::Issued(again)) =
        (&a.outcome, &b.outcome, &c.outcome)
    else {
        panic!("{:?} {:?} {:?}", a.outcome, b.outcome, c.outcome)
    };
    assert_ne!(ia.invoice_no, ib.invoice_no, "two invoices for one key");
    assert!(again.invoice_no == ia.invoice_no || again.invoice_no == ib.invoice_no);
    let found = provider.lookup(&target, &doc.transaction_uuid).await;
    assert!(matches!(found.outcome, Outcome::Issued(ref i) if i.invoice_no == again.invoice_no));
    assert_eq!(provider.lookup(&target, "0000000000-not-there").await.outcome, Outcome::NotFound);
    // The provider drops its sessions: the adapter logs in again once and carries on.
    let logins = sim.stats().logins;
    reqwest::Client::new().post(format!("http://{}/sim/revoke-tokens", sim.addr)).send().await.unwrap();
    let d = provider.lookup(&target, &doc.transaction_uuid).await;
    assert!(matches!(d.outcome, Outcome::Issued(_)), "{:?}", d.outcome);
    assert_eq!(sim.stats().logins, logins + 1);
    assert!(sim.stats().token_refusals >= 1);
    // Refused together, five calls share one new login: each login of its own would have
    // replaced the token the one before had just resent with.
    reqwest::Client::new().post(format!("http://{}/sim/revoke-tokens", sim.addr)).send().await.unwrap();
    let lookups =
        futures::future::join_all((0..5).map(|_| provider.lookup(&target, &doc.transaction_uuid))).await;
    for call in &lookups {
        assert!(matches!(call.outcome, Outcome::Issued(_)), "{:?}", call.outcome);
    }
    assert_eq!(sim.stats().logins, logins + 2);
    // The recorded request carries no credentials and the response no lookup secret.
    assert!(!a.request.unwrap().to_string().contains("pw"));
    assert!(a.response.unwrap().to_string().contains("\"reservationCode\":\"***\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_that_wakes_after_its_leases_sends_nothing_more() {
    // One call at a time per series, 300 ms each: the frozen worker still has calls queued
    // behind the first when it is stopped.
    let s = setup_with(Knobs { latency_ms: 300, ..Knobs::default() }, "immediate", |env| {
        env.insert("APP_ENV_INVOICE_WORKER_CONCURRENCY".into(), "6".into());
        env.insert("APP_ENV_INVOICE_WORKER_BATCH_MAX".into(), "6".into());
        env.insert("APP_ENV_INVOICE_PROVIDER_SERIES_CONCURRENCY".into(), "1".into());
    })
    .await;
    s.pay((0..6).map(|i| format!("ORD-Z-{i}"))).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'QUEUED'", 6).await;
    let mut zombie = spawn_worker_process(&s.env);
    wait_until(WAIT, "the first call to reach the provider", || async {
        (s.sim.stats().creates >= 1).then_some(())
    })
    .await;
    let signal = |sig: &str, pid: u32| {
        assert!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
    };
    signal("-STOP", zombie.id());
    // Another worker takes over once the leases (Redis 2 s, Postgres 6 s) have run out.
    let rescuer = TestWorker::spawn(&s.env).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 6).await;
    // The zombie wakes up with calls it had not sent yet: it must send none of them.
    let creates = s.sim.stats().creates;
    signal("-CONT", zombie.id());
    signal("-TERM", zombie.id());
    let status = wait_until(WAIT, "the zombie to exit", || {
        let exited = zombie.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success());
    assert_eq!(s.sim.stats().creates, creates, "the zombie sent after losing its leases");
    s.assert_one_provider_invoice_each().await;
    assert_eq!(s.sim.stats().issued, 6);
    rescuer.stop().await.unwrap();
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuance_log_markers_name_the_order_merchant_and_partition() {
    let s = setup(Knobs { fail_first: 1, ..Knobs::default() }, "immediate").await;
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut env = s.env.clone();
    env.insert("APP_ENV_INVOICE_LOG_FORMAT".into(), "json".into());
    env.insert("APP_ENV_INVOICE_WORKER_ID".into(), crate::support::next_worker_id().to_string());
    let mut worker = invoice_cmd(&env)
        .arg("worker")
        .stdout(std::process::Stdio::null())
        .stderr(logs.reopen().unwrap())
        .spawn()
        .unwrap();
    // A transient error then success, and a permanent error.
    s.pay(["ORD-LOG-1".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 1).await;
    s.sim.knobs(json!({"permanentFirst": 1})).await;
    s.pay(["ORD-LOG-2".to_owned()]).await;
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'FAILED'", 1).await;
    // The operator's requeue enqueues it again.
    let requeue = invoice_cmd(&env).args(["dlq", "requeue", "ORD-LOG-2"]).output().unwrap();
    assert!(requeue.status.success(), "{}", String::from_utf8_lossy(&requeue.stderr));
    s.wait_count("SELECT count(*) FROM invoice WHERE status = 'ISSUED'", 2).await;
    worker.kill().unwrap();
    worker.wait().unwrap();

    let queue = queue_of(&s.env);
    let mut lines: Vec<Value> = std::fs::read_to_string(logs.path())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    lines.extend(
        String::from_utf8_lossy(&requeue.stderr).lines().filter_map(|l| serde_json::from_str(l).ok()),
    );
    for (marker, order) in [
        ("[_handleIssuanceFailure] Scheduling retry", "ORD-LOG-1"),
        ("[DLQ] invoice-issuance", "ORD-LOG-2"),
        ("[enqueueIssuance]", "ORD-LOG-2"),
    ] {
        // By order: the worker's sweeper may also have enqueued the first order (between the
        // stream's commit and its own hand-off).
        let line = lines
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(marker)) && l["orderId"] == order)
            .unwrap_or_else(|| panic!("no {marker} line for {order} in {lines:?}"));
        assert_eq!(line["orderId"], order, "{line}");
        assert_eq!(line["merchantId"], "M-1", "{line}");
        assert_eq!(line["partition"], queue.partition_of(order), "{line}");
    }
    s.stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_clock_behind_postgres_neither_shortens_its_leases_nor_stretches_its_waits() {
    use invoice::storage::issuance::{ACQUIRE, RENEW_LEASE};
    let db = TestDb::create().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (id, _) = crate::support::seed_invoice(&db, "M-1", "ORD-SKEW-1", "QUEUED", deadline).await;
    let seen: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT updated_at FROM invoice WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let lease_left = || async {
        let seconds: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM lease_until - now())::float8 FROM invoice WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        seconds
    };
    // A worker whose clock is an hour behind Postgres' takes it for 60 s: the lease must not
    // have expired already on Postgres' clock (another worker would take over mid-call).
    let behind = chrono::Utc::now() - chrono::Duration::hours(1);
    let taken: Vec<(i64, String)> = sqlx::query_as(ACQUIRE)
        .bind(vec![id])
        .bind("skewed#1")
        .bind(behind + chrono::Duration::seconds(60))
        .bind(vec![seen])
        .bind("worker")
        .bind(behind)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(taken, vec![(id, "QUEUED".to_owned())]);
    let left = lease_left().await;
    assert!((50.0..=60.0).contains(&left), "{left} s of lease left");
    // Its renewal for 120 s, likewise.
    let renewed = sqlx::query(RENEW_LEASE)
        .bind(id)
        .bind("skewed#1")
        .bind(behind + chrono::Duration::seconds(120))
        .bind(behind)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(renewed.rows_affected(), 1);
    let left = lease_left().await;
    assert!((110.0..=120.0).contains(&left), "{left} s of lease left");
    // Read back by that worker, the lease ends 120 s from now on its own clock (it compares
    // it with that clock: read as stored, it would wait an hour too long).
    let read: Vec<invoice::storage::issuance::WorkInvoice> =
        sqlx::query_as(invoice::storage::issuance::UNFINISHED_FOR_ORDERS)
            .bind(vec!["ORD-SKEW-1".to_owned()])
            .bind(behind)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let until = read[0].lease_until.unwrap();
    let ahead = (until - behind).num_milliseconds();
    assert!((110_000..=120_000).contains(&ahead), "lease read {ahead} ms past the worker's clock");
}
