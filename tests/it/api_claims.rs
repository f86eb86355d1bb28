//! Buyer claims: the token is the credential; one claim wins; expired is gone; guessing is
//! throttled (R15, R16).

use serde_json::{json, Value};

use crate::support::{company_buyer, metric_value, scalar, seed_invoice, TestApi};

fn claim_url(api: &TestApi, token: &str) -> String {
    api.url(&format!("/v1/api/claims/{token}"))
}

async fn post_claim(api: &TestApi, token: &str, buyer: Value) -> reqwest::Response {
    reqwest::Client::new().post(claim_url(api, token)).json(&json!({"buyer": buyer})).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_sees_the_claim_claims_it_once_and_the_invoice_is_queued_for_them() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (id, token) = seed_invoice(&api.db, "M-1", "ORD-K-1", "PENDING_CLAIM", deadline).await;

    let response = reqwest::get(claim_url(&api, &token)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "OPEN");
    assert_eq!(view["orderId"], "ORD-K-1");
    assert_eq!(view["totalAmount"], "108000");
    assert_eq!(view["currency"], "VND");
    // The GET changed nothing.
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM claim WHERE status = 'OPEN'").await, 1);

    let response = post_claim(&api, &token, company_buyer()).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"status": "QUEUED", "invoiceId": id.to_string()}));
    let (status, tax): (String, Option<String>) =
        sqlx::query_as("SELECT status, buyer->>'taxCode' FROM invoice WHERE id = $1")
            .bind(id)
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), tax.as_deref()), ("QUEUED", Some("0101243150")));
    assert_eq!(api.queue().job_state("ORD-K-1").await.unwrap().0.as_deref(), Some("waiting"));
    api.assert_events_written(1).await;

    // Used once: a second POST is 409, the GET shows it claimed.
    assert_eq!(post_claim(&api, &token, company_buyer()).await.status(), 409);
    let view: Value = reqwest::get(claim_url(&api, &token)).await.unwrap().json().await.unwrap();
    assert_eq!(view["status"], "CLAIMED");
    // The database holds no token text anywhere.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM claim WHERE buyer::text LIKE '%' || $1 || '%')
              + (SELECT count(*) FROM audit_log WHERE coalesce(after::text, '') LIKE '%' || $1 || '%')",
    )
    .bind(&token)
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_claims_exactly_one_wins() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    for round in 0..5 {
        let (_, token) =
            seed_invoice(&api.db, "M-1", &format!("ORD-K-2-{round}"), "PENDING_CLAIM", deadline).await;
        let other = json!({"legalName": "Công ty CP Khác", "taxCode": "0100109106", "address": "1 Tràng Tiền, Hà Nội"});
        let (a, b) = tokio::join!(post_claim(&api, &token, company_buyer()), post_claim(&api, &token, other));
        let mut statuses = vec![a.status().as_u16(), b.status().as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, vec![202, 409], "round {round}");
    }
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM audit_log WHERE event_type = 'invoice.claimed'").await,
        5
    );
    // A claim racing a cancel and a buyer request of the same order: every path locks the
    // invoice before the claim, so none deadlocks (a deadlock would surface as a 503).
    let secret = api.internal_secret();
    for round in 0..10 {
        let order = format!("ORD-K-R-{round}");
        let (_, token) = seed_invoice(&api.db, "M-1", &order, "PENDING_CLAIM", deadline).await;
        let cancel = json!({"type": "invoice.cancel", "data": {"orderId": order, "merchantId": "M-1", "reason": "refunded"}})
            .to_string();
        let request = json!({"type": "invoice.request", "data": {"orderId": order, "merchantId": "M-1", "buyer": company_buyer()}})
            .to_string();
        let (cancel_id, request_id) = (format!("race-c-{round}"), format!("race-r-{round}"));
        let (claimed, cancelled, requested) = tokio::join!(
            post_claim(&api, &token, company_buyer()),
            api.webhook("internal", &secret, &cancel_id, &cancel),
            api.webhook("internal", &secret, &request_id, &request),
        );
        for (what, status) in
            [("claim", claimed.status()), ("cancel", cancelled.status()), ("request", requested.status())]
        {
            assert!(!status.is_server_error(), "round {round}: {what} answered {status}");
        }
    }
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_deadline_a_claim_is_gone_even_before_the_worker_expires_it() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() - chrono::Duration::seconds(1);
    let (id, token) = seed_invoice(&api.db, "M-1", "ORD-K-3", "PENDING_CLAIM", deadline).await;
    assert_eq!(reqwest::get(claim_url(&api, &token)).await.unwrap().status(), 410);
    let response = post_claim(&api, &token, company_buyer()).await;
    assert_eq!(response.status(), 410);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let status: String = sqlx::query_scalar("SELECT status FROM invoice WHERE id = $1")
        .bind(id)
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "PENDING_CLAIM");
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_buyers_are_refused_with_the_field_named_and_change_nothing() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (_, token) = seed_invoice(&api.db, "M-1", "ORD-K-4", "PENDING_CLAIM", deadline).await;
    for (buyer, field) in [
        (json!({"legalName": "A", "taxCode": "0101243151", "address": "B"}), "taxCode"),
        (json!({"legalName": "A", "taxCode": "12345", "address": "B"}), "taxCode"),
        (json!({"taxCode": "0101243150", "address": "B"}), "legalName"),
        (json!({"legalName": "A", "taxCode": "0101243150"}), "address"),
        (json!({"name": "A", "email": "not-an-email"}), "email"),
        // Postgres stores no NUL and the invoice's XML no bell: a 422 naming the field, not a 500.
        (json!({"name": "A\u{0}B"}), "buyer.name contains the character U+0000"),
        (json!({"legalName": "A\u{7}", "taxCode": "0101243150", "address": "B"}), "buyer.legalName contains"),
    ] {
        let response = post_claim(&api, &token, buyer).await;
        assert_eq!(response.status(), 422, "{field}");
        let problem: Value = response.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains(field), "{field}: {problem}");
    }
    let response = reqwest::Client::new()
        .post(claim_url(&api, &token))
        .json(&json!({"buyer": company_buyer(), "invoiceId": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422, "unknown members are refused");
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM claim WHERE status = 'OPEN'").await, 1);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_tokens_is_throttled_with_429() {
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_CLAIM_FAILURE_LIMIT".into(), "20".into());
    })
    .await;
    // GETs and POSTs (with a valid buyer, so the token is looked up) count alike.
    let mut statuses = Vec::new();
    for i in 0..30 {
        let guess = invoice::crypto::random_token();
        let status = if i % 2 == 0 {
            reqwest::get(claim_url(&api, &guess)).await.unwrap().status()
        } else {
            post_claim(&api, &guess, company_buyer()).await.status()
        };
        statuses.push(status.as_u16());
    }
    assert!(statuses[..20].iter().all(|s| *s == 404), "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
    // Also for a real token from the same client, until the window ends.
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (_, token) = seed_invoice(&api.db, "M-1", "ORD-K-5", "PENDING_CLAIM", deadline).await;
    let response = reqwest::get(claim_url(&api, &token)).await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    // Refusals keep the token out of Referer headers and caches too.
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let response = reqwest::Client::new()
        .post(claim_url(&api, &token))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let metrics = api.metrics().await;
    assert_eq!(metric_value(&metrics, "invoice_http_rate_limited_total", &[]), 11.0);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_while_the_invoice_is_being_issued_is_kept_and_applied_once_it_settles_even_past_the_deadline(
) {
    use crate::support::kafka::TestTopics;
    use crate::support::{issuance_env, unique, wait_until, TestWorker};
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (original, token) = seed_invoice(&api.db, "M-1", "ORD-K-9", "ISSUING", deadline).await;
    // The invoice is at the provider right now: the buyer is recorded, not sent away.
    let response = post_claim(&api, &token, company_buyer()).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "PENDING", "{body}");
    assert_eq!(body["invoiceId"], original.to_string());
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM claim WHERE status = 'CLAIMED'").await, 1);
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM invoice_request WHERE source = 'claim' AND joined_at IS NULL")
            .await,
        1
    );
    // A second POST of the same token is refused: the claim is used.
    assert_eq!(post_claim(&api, &token, company_buyer()).await.status(), 409);
    // Nor does a merchant's request replace the buyer's own claim meanwhile.
    let mut other = company_buyer();
    other["legalName"] = json!("Công ty Khác");
    let request = json!({"type": "invoice.request", "data": {"orderId": "ORD-K-9", "merchantId": "M-1", "buyer": other}});
    let response = api.webhook("merchant", &api.merchant_secret(), "evt_k9", &request.to_string()).await;
    assert_eq!(response.status(), 409);
    assert_eq!(
        scalar(&api.db, "SELECT count(*) FROM invoice_request WHERE source = 'claim' AND buyer->>'legalName' <> 'Công ty Khác'").await,
        1
    );
    // The issuance settles (to the consumer) only after the claim's deadline passed. The
    // buyer asked in time: the replacement is made all the same.
    sqlx::query("UPDATE invoice SET status = 'ISSUED', provider_invoice_no = '0000001', issued_at = now() WHERE id = $1")
        .bind(original)
        .execute(&api.db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE invoice_request SET created_at = now() - interval '10 minutes' WHERE order_id = 'ORD-K-9'",
    )
    .execute(&api.db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE claim SET deadline = now() - interval '5 minutes' WHERE invoice_id = $1")
        .bind(original)
        .execute(&api.db.pool)
        .await
        .unwrap();
    let topics = TestTopics::create(1).await;
    let worker = TestWorker::spawn(&issuance_env(&api.db, &topics.names, &unique("g-"))).await;
    wait_until(std::time::Duration::from_secs(30), "the claim's request to be joined", || async {
        (scalar(&api.db, "SELECT count(*) FROM invoice_request WHERE joined_at IS NOT NULL").await == 1)
            .then_some(())
    })
    .await;
    let (kind, replaces, tax): (String, Option<i64>, Option<String>) = sqlx::query_as(
        "SELECT kind, replaces_invoice_id, buyer->>'taxCode' FROM invoice WHERE order_id = 'ORD-K-9' AND id <> $1",
    )
    .bind(original)
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), replaces, tax.as_deref()),
        ("replacement", Some(original), Some("0101243150"))
    );
    worker.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_an_issued_consumer_invoice_within_the_deadline_creates_a_replacement() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (original, token) = seed_invoice(&api.db, "M-1", "ORD-K-6", "ISSUED", deadline).await;
    let response = post_claim(&api, &token, company_buyer()).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let replacement: i64 = body["invoiceId"].as_str().unwrap().parse().unwrap();
    assert_ne!(replacement, original);
    let (kind, status, replaces, tax): (String, String, Option<i64>, Option<String>) = sqlx::query_as(
        "SELECT kind, status, replaces_invoice_id, buyer->>'taxCode' FROM invoice WHERE id = $1",
    )
    .bind(replacement)
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), status.as_str(), replaces, tax.as_deref()),
        ("replacement", "QUEUED", Some(original), Some("0101243150"))
    );
    assert_eq!(api.queue().job_state("ORD-K-6").await.unwrap().0.as_deref(), Some("waiting"));
    api.stop().await.unwrap();
}

#[tokio::test]
async fn the_schema_refuses_a_second_open_claim_or_a_second_live_configuration() {
    use crate::support::{insert_provider_config, TestDb};
    let db = TestDb::create().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let (id, _) = seed_invoice(&db, "M-1", "ORD-K-7", "PENDING_CLAIM", deadline).await;
    let second_claim = sqlx::query(
        "INSERT INTO claim (id, invoice_id, merchant_id, order_id, token_hash, deadline, status)
         VALUES ($1 + 1, $1, 'M-1', 'ORD-K-7', $2, now(), 'OPEN')",
    )
    .bind(id)
    .bind(&invoice::domain::claim::token_hash("another")[..])
    .execute(&db.pool)
    .await;
    let error = second_claim.unwrap_err().to_string();
    assert!(error.contains("claim_one_per_invoice"), "{error}");

    insert_provider_config(&db, "M-1", 1).await;
    let copy = "INSERT INTO provider_config (id, merchant_id, provider, endpoint, supplier_tax_code, template_code,
                    series, credentials_ciphertext, credentials_nonce, key_id, created_by)
                SELECT $1, merchant_id, provider, endpoint, supplier_tax_code, template_code, series,
                    credentials_ciphertext, credentials_nonce, key_id, 'test' FROM provider_config WHERE id = 1";
    let error = sqlx::query(copy).bind(2i64).execute(&db.pool).await.unwrap_err().to_string();
    assert!(error.contains("provider_config_one_live_per_merchant"), "{error}");
    // Soft-deleted, the key is free again.
    sqlx::query("UPDATE provider_config SET deleted_at = now() WHERE id = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(copy).bind(2i64).execute(&db.pool).await.unwrap();
    assert_eq!(scalar(&db, "SELECT count(*) FROM provider_config WHERE deleted_at IS NULL").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_keeps_one_active_invoice_of_each_kind_per_order() {
    use crate::support::TestDb;
    let db = TestDb::create().await;
    let insert = |id: i64, merchant: &'static str| {
        sqlx::query(
            "INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, paid_at, currency, lines,
                 total_net, total_vat, total_amount, config_snapshot, transaction_uuid)
             VALUES ($1, $2, 'ORD-U-1', 'QUEUED', 'immediate', now(), 'VND', '[]', 100, 8, 108, '{}',
                 'tx-uuid-' || lpad($1::text, 8, '0'))",
        )
        .bind(id)
        .bind(merchant)
    };
    insert(1, "M-1").execute(&db.pool).await.unwrap();
    let error = insert(2, "M-1").execute(&db.pool).await.unwrap_err().to_string();
    assert!(error.contains("invoice_by_order"), "{error}");
    // Another merchant's order of the same id is another order.
    insert(3, "M-2").execute(&db.pool).await.unwrap();
    // Once the first is cancelled (or deleted), the order may have a new one, and then the
    // cancelled one cannot come back.
    sqlx::query("UPDATE invoice SET status = 'CANCELLED' WHERE id = 1").execute(&db.pool).await.unwrap();
    insert(2, "M-1").execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE invoice SET deleted_at = now() WHERE id = 2").execute(&db.pool).await.unwrap();
    insert(4, "M-1").execute(&db.pool).await.unwrap();
    let error = sqlx::query("UPDATE invoice SET status = 'QUEUED' WHERE id = 1")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("invoice_by_order"), "{error}");
    assert_eq!(scalar(&db, "SELECT count(*) FROM invoice WHERE order_id = 'ORD-U-1'").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_a_claim_from_the_event_turns_a_held_payment_into_a_company_invoice() {
    use crate::events::{cdc, payment, tax};
    use crate::support::kafka::{produce, producer, read_all, TestTopics};
    use crate::support::{
        insert_provider_config_at, issuance_env, unique, wait_until, TestDb, TestSim, TestStream, TestWorker,
    };
    use std::time::Duration;
    let topics = TestTopics::create(1).await;
    let sim = TestSim::spawn(invoice::providers::sim::Knobs::default()).await;
    let db = TestDb::create().await;
    let worker_env = issuance_env(&db, &topics.names, &unique("g-"));
    let api = TestApi::spawn_on(db, |env| {
        env.insert("APP_ENV_INVOICE_QUEUE_PREFIX".into(), worker_env["APP_ENV_INVOICE_QUEUE_PREFIX"].clone());
        env.insert("APP_ENV_INVOICE_TOPIC_EVENTS".into(), topics.names.events.clone());
    })
    .await;
    insert_provider_config_at(&api.db, "M-1", 1, &sim.endpoint()).await;
    let p = producer();
    let mut held = tax("claim_window");
    held["claimWindowMinutes"] = json!(60);
    produce(
        &p,
        &topics.names.merchant_cdc,
        "M-1",
        Some(cdc("c", "M-1", held, 10).to_string().as_bytes()),
        &[],
    )
    .await;
    let stream = TestStream::spawn(&worker_env).await;
    let worker = TestWorker::spawn(&worker_env).await;
    wait_until(Duration::from_secs(60), "the merchant's TaxInfo", || async {
        (scalar(&api.db, "SELECT count(*) FROM merchant_tax_info").await == 1).then_some(())
    })
    .await;
    let mut paid = payment(&uuid::Uuid::new_v4().to_string(), "ORD-E2E-1", "M-1");
    paid["paidAt"] = json!(chrono::Utc::now().to_rfc3339());
    produce(&p, &topics.names.payment, "ORD-E2E-1", Some(paid.to_string().as_bytes()), &[]).await;

    // The claim token exists only in the `invoice.claim_opened` event.
    let events_topic = topics.names.events.clone();
    let token = wait_until(Duration::from_secs(60), "the claim_opened event", || {
        let topic = events_topic.clone();
        async move {
            let events = tokio::task::spawn_blocking(move || read_all(&topic, 2, Duration::from_secs(2)))
                .await
                .unwrap();
            events.iter().find_map(|e| {
                let v: Value = serde_json::from_slice(e.value.as_deref()?).ok()?;
                (v["type"] == "invoice.claim_opened")
                    .then(|| v["claim"]["token"].as_str().map(str::to_owned))
                    .flatten()
            })
        }
    })
    .await;
    let view: Value = reqwest::get(claim_url(&api, &token)).await.unwrap().json().await.unwrap();
    assert_eq!(view["status"], "OPEN");
    assert_eq!(view["orderId"], "ORD-E2E-1");
    assert_eq!(view["totalAmount"], "1080000");
    assert_eq!(view["invoiceStatus"], "PENDING_CLAIM");

    assert_eq!(post_claim(&api, &token, company_buyer()).await.status(), 202);
    wait_until(Duration::from_secs(60), "the invoice to be issued", || async {
        (scalar(&api.db, "SELECT count(*) FROM invoice WHERE order_id = 'ORD-E2E-1' AND status = 'ISSUED'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    let uuid: String =
        sqlx::query_scalar("SELECT transaction_uuid FROM invoice WHERE order_id = 'ORD-E2E-1'")
            .fetch_one(&api.db.pool)
            .await
            .unwrap();
    let at_sim: Vec<Value> =
        reqwest::get(format!("http://{}/sim/invoices/{uuid}", sim.addr)).await.unwrap().json().await.unwrap();
    assert_eq!(at_sim.len(), 1);
    assert_eq!(at_sim[0]["buyerTaxCode"], "0101243150");

    // The metrics the dashboard and the alerts query are all exported by these running
    // processes (after a rejected webhook, a refused operator call and a readiness check).
    let rejected = api.webhook("merchant", "a-wrong-secret-that-is-long-enough", "evt_x", "{}").await;
    assert_eq!(rejected.status(), 401);
    assert_eq!(reqwest::get(api.url("/v1/api/invoices")).await.unwrap().status(), 401);
    for addr in [stream.addr.to_string(), worker.addr.to_string()] {
        reqwest::get(format!("http://{addr}/ready")).await.unwrap();
    }
    reqwest::get(api.url("/ready")).await.unwrap();
    // Lag gauges appear once the stream's watchdog has seen each partition's high watermark.
    wait_until(Duration::from_secs(30), "the stream's lag gauges", || async {
        stream.metrics().await.contains("invoice_kafka_consumer_offset{").then_some(())
    })
    .await;
    let scrapes = [api.metrics().await, stream.metrics().await, worker.metrics().await];
    crate::operations::assert_dashboard_and_alert_metrics_exported(&scrapes);
    worker.stop().await.unwrap();
    stream.stop().await.unwrap();
    api.stop().await.unwrap();
}
