//! Signed webhooks: Standard Webhooks verification at the door, exactly-once effects behind
//! it (R1–R6 of the security notes).

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::{company_buyer, metric_value, scalar, seed_invoice, TestApi};

fn request_body(order: &str, buyer: Value) -> String {
    json!({"type": "invoice.request", "data": {"orderId": order, "merchantId": "M-1", "buyer": buyer}})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_pending_claim_queues_it_and_one_before_its_payment_is_kept() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (id, _token) = seed_invoice(&api.db, "M-1", "ORD-W-1", "PENDING_CLAIM", deadline).await;

    let response = api
        .webhook("merchant", &api.merchant_secret(), "evt_1", &request_body("ORD-W-1", company_buyer()))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"], "queued", "{body}");
    assert_eq!(body["invoiceId"], id.to_string());
    let (status, kind, tax): (String, String, Option<String>) =
        sqlx::query_as("SELECT status, buyer_kind, buyer->>'taxCode' FROM invoice WHERE id = $1")
            .bind(id)
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), kind.as_str(), tax.as_deref()), ("QUEUED", "company", Some("0101243150")));
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM claim WHERE status = 'CLAIMED'").await, 1);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM invoice_request WHERE joined_at IS NOT NULL").await, 1);
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM audit_log WHERE event_type = 'invoice.claimed'").await,
        1
    );
    // The request closed the open claim: counted as claimed, as a buyer's own claim is.
    assert_eq!(metric_value(&api.metrics().await, "invoice_claims_total", &["event=\"claimed\""]), 1.0);
    // The job is in the queue for a worker.
    let (state, _) = api.queue().job_state("ORD-W-1").await.unwrap();
    assert_eq!(state.as_deref(), Some("waiting"));

    // No invoice yet: the request is kept for the payment to join.
    let response = api
        .webhook("merchant", &api.merchant_secret(), "evt_2", &request_body("ORD-W-2", company_buyer()))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["result"], "pending");
    assert_eq!(
        scalar(
            &api.db,
            "SELECT count(*) FROM invoice_request WHERE order_id = 'ORD-W-2' AND joined_at IS NULL"
        )
        .await,
        1
    );
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_sent_ten_times_at_once_and_again_later_takes_effect_once() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    seed_invoice(&api.db, "M-1", "ORD-W-3", "PENDING_CLAIM", deadline).await;
    let body = request_body("ORD-W-3", company_buyer());
    let secret = api.merchant_secret();
    let sends = (0..10).map(|_| api.webhook("merchant", &secret, "evt_same", &body));
    let mut answers = Vec::new();
    for response in futures::future::join_all(sends).await {
        assert_eq!(response.status(), 200);
        answers.push(response.json::<Value>().await.unwrap());
    }
    let processed = answers.iter().filter(|a| a["status"] == "processed").count();
    assert_eq!(processed, 1, "{answers:?}");
    let again = api.webhook("merchant", &api.merchant_secret(), "evt_same", &body).await;
    assert_eq!(again.json::<Value>().await.unwrap()["status"], "duplicate");
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM invoice_request").await, 1);
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM audit_log WHERE event_type = 'invoice.claimed'").await,
        1
    );
    api.assert_events_written(1).await;
    let metrics = api.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "invoice_webhook_requests_total",
            &["endpoint=\"merchant\"", "result=\"duplicate\""]
        ),
        10.0
    );
    // Ids are remembered a week, past the 75 h over which senders retry a delivery (signed
    // afresh, same id), then forgotten by the sweeper: the table does not grow for ever.
    sqlx::query(
        "INSERT INTO webhook_seen (endpoint, webhook_id, received_at)
         VALUES ('merchant', 'evt_80h', now() - interval '80 hours'), ('merchant', 'evt_8d', now() - interval '8 days')",
    )
    .execute(&api.db.pool)
    .await
    .unwrap();
    let kept = invoice::issuance::sweeper::WEBHOOK_IDS_KEPT_SECONDS;
    assert_eq!(invoice::storage::buyers::forget_webhooks(&api.db.pool, kept, 100).await.unwrap(), 1);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM webhook_seen WHERE webhook_id = 'evt_8d'").await, 0);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM webhook_seen WHERE webhook_id = 'evt_80h'").await, 1);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM webhook_seen WHERE webhook_id = 'evt_same'").await, 1);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_are_401_with_their_reason_and_change_nothing() {
    let api = TestApi::spawn().await;
    let url = api.url("/v1/api/webhooks/merchant");
    let body = request_body("ORD-W-4", company_buyer());
    let secret = api.merchant_secret();
    let now = chrono::Utc::now().timestamp();
    let client = reqwest::Client::new();
    let send = |headers: Vec<(&'static str, String)>, body: String| {
        let mut request = client.post(&url).body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        request.send()
    };
    let signed =
        |id: &str, ts: i64, body: &str| invoice::auth::webhook::sign(&secret, id, ts, body.as_bytes());
    // (what, headers, body, expected reason)
    type Case<'a> = (&'a str, Vec<(&'static str, String)>, String, &'a str);
    let cases: Vec<Case> = vec![
        (
            "tampered body",
            vec![
                ("webhook-id", "e1".into()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", signed("e1", now, &body)),
            ],
            body.replace("ORD-W-4", "ORD-W-5"),
            "bad_signature",
        ),
        (
            "reformatted JSON",
            vec![
                ("webhook-id", "e1".into()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", signed("e1", now, &body)),
            ],
            serde_json::to_string_pretty(&serde_json::from_str::<Value>(&body).unwrap()).unwrap(),
            "bad_signature",
        ),
        (
            "internal secret on the merchant endpoint",
            vec![
                ("webhook-id", "e1".into()),
                ("webhook-timestamp", now.to_string()),
                (
                    "webhook-signature",
                    invoice::auth::webhook::sign(&api.internal_secret(), "e1", now, body.as_bytes()),
                ),
            ],
            body.clone(),
            "bad_signature",
        ),
        (
            "stale timestamp",
            vec![
                ("webhook-id", "e1".into()),
                ("webhook-timestamp", (now - 301).to_string()),
                ("webhook-signature", signed("e1", now - 301, &body)),
            ],
            body.clone(),
            "stale_timestamp",
        ),
        (
            "future timestamp",
            vec![
                ("webhook-id", "e1".into()),
                ("webhook-timestamp", (now + 301).to_string()),
                ("webhook-signature", signed("e1", now + 301, &body)),
            ],
            body.clone(),
            "future_timestamp",
        ),
        (
            "missing signature",
            vec![("webhook-id", "e1".into()), ("webhook-timestamp", now.to_string())],
            body.clone(),
            "missing_header",
        ),
        (
            "missing id",
            vec![("webhook-timestamp", now.to_string()), ("webhook-signature", signed("e1", now, &body))],
            body.clone(),
            "missing_header",
        ),
        (
            "truncated signature",
            vec![
                ("webhook-id", "e1".into()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", "v1,".into()),
            ],
            body.clone(),
            "bad_signature",
        ),
    ];
    for (what, headers, body, reason) in cases {
        let response = send(headers, body).await.unwrap();
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{what}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["reason"], reason, "{what}: {problem}");
        assert!(!problem["detail"].as_str().unwrap().contains(&secret), "{what}");
    }
    // An unsigned request with an id does not mark the id as seen: the real one goes through.
    let response = api.webhook("merchant", &secret, "e1", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "processed");

    // Security R5: webhook bodies up to 256 KiB are read (this one then fails its signature);
    // over: 413 before any HMAC work, read to the end (within bounds) so that the client,
    // still uploading, gets the answer rather than a broken pipe. A full-length (wrong) MAC,
    // so that the headers pass the checks made before the body is read.
    let wrong_mac = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
    for (size, status) in [(256 * 1024, 401), (256 * 1024 + 1, 413), (3 * 1024 * 1024, 413)] {
        let response = send(
            vec![
                ("webhook-id", "e9".into()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", wrong_mac.clone()),
            ],
            "x".repeat(size),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), status, "{size} bytes");
    }
    // A request whose headers fail is refused on them, its body dropped unread: 401, not 413.
    let response = send(vec![("webhook-timestamp", now.to_string())], "x".repeat(300 * 1024)).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.json::<Value>().await.unwrap()["reason"], "missing_header");
    // Signed but not JSON: 400; signed unknown type: 422; signed bad buyer: 422.
    assert_eq!(api.webhook("merchant", &secret, "e10", "not json").await.status(), 400);
    let unknown =
        json!({"type": "invoice.cancel", "data": {"orderId": "O", "merchantId": "M-1"}}).to_string();
    let response = api.webhook("merchant", &secret, "e11", &unknown).await;
    assert_eq!(response.status(), 422);
    assert!(response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("invoice.cancel"));
    let bad_buyer =
        request_body("ORD-W-6", json!({"legalName": "X", "taxCode": "0101243151", "address": "Y"}));
    let response = api.webhook("merchant", &secret, "e12", &bad_buyer).await;
    assert_eq!(response.status(), 422);
    assert!(response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("taxCode"));
    // A NUL anywhere in the data is a 422 (Postgres could not store it), not a 500 the
    // sender would retry for days; nothing is recorded, not even the id.
    let nul = request_body("ORD-W-7", json!({"name": "A\u{0}"}));
    let response = api.webhook("merchant", &secret, "e13", &nul).await;
    assert_eq!(response.status(), 422);
    let cancel =
        json!({"type": "invoice.cancel", "data": {"orderId": "O", "merchantId": "M-1", "reason": "x\u{0}"}});
    let response = api.webhook("internal", &api.internal_secret(), "e14", &cancel.to_string()).await;
    assert_eq!(response.status(), 422);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM invoice_request").await, 1);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM webhook_seen").await, 1);

    let metrics = api.metrics().await;
    for (reason, count) in
        [("bad_signature", 5.0), ("stale_timestamp", 1.0), ("missing_header", 3.0), ("too_large", 2.0)]
    {
        assert_eq!(
            metric_value(
                &metrics,
                "invoice_webhook_requests_total",
                &["result=\"rejected\"", &format!("reason=\"{reason}\"")]
            ),
            count,
            "{reason}"
        );
    }
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_secret_is_accepted_only_while_configured() {
    let old = "whsec_b2xkLXdlYmhvb2stc2VjcmV0LW1lcmNoYW50LTI0Ynl0ZXM=";
    let api = TestApi::spawn_with(|env| {
        env.insert("WEBHOOK_SECRET_PREVIOUS".into(), old.into());
    })
    .await;
    let body = request_body("ORD-W-7", company_buyer());
    assert_eq!(api.webhook("merchant", old, "r1", &body).await.status(), 200);
    assert_eq!(api.webhook("merchant", &api.merchant_secret(), "r2", &body).await.status(), 200);
    api.stop().await.unwrap();
    let api = TestApi::spawn().await;
    assert_eq!(api.webhook("merchant", old, "r3", &body).await.status(), 401);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_cancel_and_provider_status_apply_only_where_they_may() {
    let api = TestApi::spawn().await;
    let secret = api.internal_secret();
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (queued, _) = seed_invoice(&api.db, "M-1", "ORD-C-1", "QUEUED", deadline).await;
    let (issued, _) = seed_invoice(&api.db, "M-1", "ORD-C-2", "ISSUED", deadline).await;
    let cancel = |order: &str| {
        json!({"type": "invoice.cancel", "data": {"orderId": order, "merchantId": "M-1", "reason": "order refunded"}})
            .to_string()
    };
    let response = api.webhook("internal", &secret, "c1", &cancel("ORD-C-1")).await;
    assert_eq!(response.status(), 200);
    let status: String = sqlx::query_scalar("SELECT status FROM invoice WHERE id = $1")
        .bind(queued)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "CANCELLED");
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM claim WHERE status = 'CANCELLED'").await, 1);
    api.assert_events_written(1).await;
    // Issued: too late to cancel, nothing changes.
    let response = api.webhook("internal", &secret, "c2", &cancel("ORD-C-2")).await;
    assert_eq!(response.status(), 409);
    // Unknown order: 404.
    assert_eq!(api.webhook("internal", &secret, "c3", &cancel("ORD-NONE")).await.status(), 404);

    let status_body = |order: &str| {
        json!({"type": "provider.status", "data": {"orderId": order, "merchantId": "M-1",
               "status": {"code": "00", "message": "accepted by the tax authority"}, "taxAuthorityCode": "M1-26-ABCDE-00000000001"}})
        .to_string()
    };
    assert_eq!(api.webhook("internal", &secret, "s1", &status_body("ORD-C-2")).await.status(), 200);
    let code: Option<String> = sqlx::query_scalar("SELECT tax_authority_code FROM invoice WHERE id = $1")
        .bind(issued)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(code.as_deref(), Some("M1-26-ABCDE-00000000001"));
    // A status for a cancelled invoice is refused.
    assert_eq!(api.webhook("internal", &secret, "s2", &status_body("ORD-C-1")).await.status(), 404);
    // A SUBMITTED invoice takes it (the tax authority may answer before our lookup); one
    // still QUEUED does not (409).
    let (submitted, _) = seed_invoice(&api.db, "M-1", "ORD-C-3", "SUBMITTED", deadline).await;
    assert_eq!(api.webhook("internal", &secret, "s3", &status_body("ORD-C-3")).await.status(), 200);
    let stored: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT provider_status FROM invoice WHERE id = $1")
            .bind(submitted)
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    assert_eq!(stored.unwrap()["code"], "00");
    seed_invoice(&api.db, "M-1", "ORD-C-4", "QUEUED", deadline).await;
    assert_eq!(api.webhook("internal", &secret, "s4", &status_body("ORD-C-4")).await.status(), 409);
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM audit_log WHERE event_type = 'provider_status'").await,
        2
    );
    // A cancel is not a merchant webhook type.
    assert_eq!(api.webhook("merchant", &api.merchant_secret(), "c4", &cancel("ORD-C-2")).await.status(), 422);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_an_order_whose_replacement_failed_queues_that_replacement_again_for_the_new_buyer() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (original, _) = seed_invoice(&api.db, "M-1", "ORD-W-R", "ISSUED", deadline).await;
    // Its replacement for a first buyer was refused by the provider (say, for the address).
    sqlx::query(
        "INSERT INTO invoice SELECT (jsonb_populate_record(NULL::invoice, to_jsonb(i) || jsonb_build_object(
             'id', i.id + 1, 'status', 'FAILED', 'kind', 'replacement', 'replaces_invoice_id', i.id,
             'buyer_kind', 'company', 'last_error', 'ADDRESS_INVALID', 'attempts', 1,
             'provider_invoice_no', NULL, 'issued_at', NULL))).*
         FROM invoice i WHERE i.id = $1",
    )
    .bind(original)
    .execute(&api.db.pool)
    .await
    .unwrap();
    let key: String = sqlx::query_scalar("SELECT transaction_uuid FROM invoice WHERE id = $1")
        .bind(original + 1)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    let mut corrected = company_buyer();
    corrected["address"] = json!("3 Tràng Tiền, Hoàn Kiếm, Hà Nội");
    let response =
        api.webhook("merchant", &api.merchant_secret(), "evt_r1", &request_body("ORD-W-R", corrected)).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let (status, attempts, address, uuid): (String, i32, Option<String>, String) = sqlx::query_as(
        "SELECT status, attempts, buyer->>'address', transaction_uuid FROM invoice WHERE id = $1",
    )
    .bind(original + 1)
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), attempts, address.as_deref()),
        ("QUEUED", 0, Some("3 Tràng Tiền, Hoàn Kiếm, Hà Nội"))
    );
    assert_eq!(uuid, key, "the provider created nothing under its key: it is kept");
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM invoice WHERE order_id = 'ORD-W-R'").await, 2);
    let original_status: String = sqlx::query_scalar("SELECT status FROM invoice WHERE id = $1")
        .bind(original)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(original_status, "ISSUED");
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM audit_log WHERE event_type = 'replacement_retried'").await,
        1
    );
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_raced_its_payment_is_joined_by_the_sweeper() {
    use crate::support::kafka::TestTopics;
    use crate::support::{issuance_env, unique, wait_until, TestWorker};
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (id, _) = seed_invoice(&api.db, "M-1", "ORD-W-9", "PENDING_CLAIM", deadline).await;
    // As if the request committed while the payment's batch was deciding without it.
    sqlx::query(
        "INSERT INTO invoice_request (id, merchant_id, order_id, buyer, source, created_at)
         VALUES (1, 'M-1', 'ORD-W-9', $1, 'merchant_webhook', now() - interval '10 seconds')",
    )
    .bind(company_buyer())
    .execute(&api.db.pool)
    .await
    .unwrap();
    let topics = TestTopics::create(1).await;
    let env = issuance_env(&api.db, &topics.names, &unique("g-"));
    let worker = TestWorker::spawn(&env).await;
    wait_until(std::time::Duration::from_secs(30), "the request to be joined", || async {
        (scalar(
            &api.db,
            "SELECT count(*) FROM invoice_request WHERE joined_at IS NOT NULL AND invoice_id IS NOT NULL",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    let kind: String = sqlx::query_scalar("SELECT buyer_kind FROM invoice WHERE id = $1")
        .bind(id)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(kind, "company");
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM claim WHERE status = 'CLAIMED'").await, 1);
    worker.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_database_outage_a_webhook_gets_a_5xx_and_its_redelivery_takes_effect_once() {
    use sqlx::Connection as _;
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (id, _) = seed_invoice(&api.db, "M-1", "ORD-W-10", "PENDING_CLAIM", deadline).await;
    let name: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&api.db.pool).await.unwrap();
    let mut admin =
        sqlx::PgConnection::connect(&format!("{}/postgres", crate::support::pg_server_url())).await.unwrap();
    let outage = |allow: bool| format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {allow}");
    sqlx::query(&outage(false)).execute(&mut admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .unwrap();
    let body = request_body("ORD-W-10", company_buyer());
    let response = api.webhook("merchant", &api.merchant_secret(), "evt_outage", &body).await;
    let status = response.status();
    assert!(status.is_server_error(), "{status}");
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    sqlx::query(&outage(true)).execute(&mut admin).await.unwrap();
    // The sender retries: processed once, as if the first attempt never happened.
    let mut processed = 0;
    for _ in 0..3 {
        let response = api.webhook("merchant", &api.merchant_secret(), "evt_outage", &body).await;
        if response.status() == 200 && response.json::<Value>().await.unwrap()["status"] == "processed" {
            processed += 1;
        }
    }
    assert_eq!(processed, 1);
    let status: String = sqlx::query_scalar("SELECT status FROM invoice WHERE id = $1")
        .bind(id)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "QUEUED");
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM invoice_request").await, 1);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_webhook_is_still_recorded_and_the_sweeper_will_enqueue_it() {
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_REDIS_URL".into(), "redis://127.0.0.1:1/0".into());
    })
    .await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (id, _) = seed_invoice(&api.db, "M-1", "ORD-W-11", "PENDING_CLAIM", deadline).await;
    let response = api
        .webhook("merchant", &api.merchant_secret(), "evt_redis", &request_body("ORD-W-11", company_buyer()))
        .await;
    assert_eq!(response.status(), 200, "Postgres holds the truth; the queue is only delivery");
    let (status, due): (String, bool) =
        sqlx::query_as("SELECT status, next_attempt_at <= now() FROM invoice WHERE id = $1")
            .bind(id)
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), due), ("QUEUED", true));
    api.stop().await.unwrap();
}
