//! Operator endpoints behind ES256 JWTs: token checks (R7–R10), the JWKS cache, merchant
//! scope, and what each endpoint does.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::idp::{self, claims, jwk, sign, token, KEY_A, KEY_B};
use crate::support::{metric_value, scalar, seed_invoice, TestApi};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_for_signature_algorithm_issuer_audience_and_time() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (id, _) = seed_invoice(&api.db, "M-1", "ORD-J-1", "QUEUED", deadline).await;
    let path = format!("/v1/api/invoices/{id}");
    let now = chrono::Utc::now().timestamp();
    let good = claims(&["invoice:read"], &["M-1"]);
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    assert_eq!(api.get_as(&token(&["invoice:read"], &["M-1"]), &path).await.status(), 200);
    assert_eq!(
        api.get_as(&sign(KEY_A, Some("a"), &with(json!({"exp": now - 59}))), &path).await.status(),
        200
    );

    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none_token = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "a"})), b64(&good));
    let hs256_token = {
        // Algorithm confusion: HS256 keyed with the public key's coordinates.
        let header = jsonwebtoken::Header {
            kid: Some("a".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        };
        jsonwebtoken::encode(&header, &good, &jsonwebtoken::EncodingKey::from_secret(KEY_A.x.as_bytes()))
            .unwrap()
    };
    let es384_token = {
        let header = jsonwebtoken::Header {
            kid: Some("a".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384)
        };
        jsonwebtoken::encode(
            &header,
            &good,
            &jsonwebtoken::EncodingKey::from_ec_pem(idp::ES384_PEM.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("garbage", Some("not-a-jwt".into())),
        ("alg none", Some(none_token)),
        ("HS256 with the public key", Some(hs256_token)),
        ("ES384", Some(es384_token)),
        ("expired by 61 s", Some(sign(KEY_A, Some("a"), &with(json!({"exp": now - 61}))))),
        ("not yet valid", Some(sign(KEY_A, Some("a"), &with(json!({"nbf": now + 120}))))),
        ("exp as a string", Some(sign(KEY_A, Some("a"), &with(json!({"exp": (now + 600).to_string()}))))),
        ("wrong issuer", Some(sign(KEY_A, Some("a"), &with(json!({"iss": "https://evil.test"}))))),
        ("wrong audience", Some(sign(KEY_A, Some("a"), &with(json!({"aud": "other"}))))),
        ("no audience", Some(sign(KEY_A, Some("a"), &with(json!({"aud": null}))))),
        ("no subject", Some(sign(KEY_A, Some("a"), &with(json!({"sub": null}))))),
        ("no kid", Some(sign(KEY_A, None, &good))),
        ("signed by an unpublished key", Some(sign(KEY_B, Some("a"), &good))),
    ];
    for (what, bearer) in cases {
        let mut request = reqwest::Client::new().get(api.url(&path));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{what}");
    }
    let metrics = api.metrics().await;
    assert!(metric_value(&metrics, "invoice_auth_failures_total", &[]) >= 14.0, "{metrics}");
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_and_merchant_scope_are_enforced_on_every_route() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let (mine, _) = seed_invoice(&api.db, "M-1", "ORD-J-2", "FAILED", deadline).await;
    let (theirs, _) = seed_invoice(&api.db, "M-2", "ORD-J-3", "FAILED", deadline).await;
    let client = reqwest::Client::new();
    let call = |method: &str, path: String, bearer: String| {
        let request = match method {
            "GET" => client.get(api.url(&path)),
            "PUT" => client.put(api.url(&path)).json(&json!({})),
            _ => client.post(api.url(&path)),
        };
        request.bearer_auth(bearer).send()
    };
    // (method, path, permission, own-merchant path, answer for another merchant)
    let routes = [
        (
            "GET",
            format!("/v1/api/invoices/{mine}"),
            "invoice:read",
            format!("/v1/api/invoices/{theirs}"),
            404,
        ),
        (
            "GET",
            format!("/v1/api/invoices/{mine}/audit"),
            "invoice:read",
            format!("/v1/api/invoices/{theirs}/audit"),
            404,
        ),
        (
            "POST",
            format!("/v1/api/invoices/{mine}/replay"),
            "invoice:replay",
            format!("/v1/api/invoices/{theirs}/replay"),
            404,
        ),
        (
            "GET",
            "/v1/api/merchants/M-1/tax-info".into(),
            "invoice:read",
            "/v1/api/merchants/M-2/tax-info".into(),
            403,
        ),
        (
            "GET",
            "/v1/api/merchants/M-1/provider-config".into(),
            "invoice:config:read",
            "/v1/api/merchants/M-2/provider-config".into(),
            403,
        ),
        (
            "PUT",
            "/v1/api/merchants/M-1/provider-config".into(),
            "invoice:config:write",
            "/v1/api/merchants/M-2/provider-config".into(),
            403,
        ),
    ];
    for (method, path, permission, other, other_status) in &routes {
        let without = token(&["invoice:something-else"], &["M-1"]);
        assert_eq!(
            call(method, path.clone(), without).await.unwrap().status(),
            403,
            "{method} {path} without {permission}"
        );
        let with = token(&[permission], &["M-1"]);
        let status = call(method, path.clone(), with.clone()).await.unwrap().status().as_u16();
        assert!(![401, 403].contains(&status), "{method} {path} with {permission}: {status}");
        assert_eq!(
            call(method, other.clone(), with).await.unwrap().status().as_u16(),
            *other_status,
            "{method} {other} of another merchant"
        );
    }
    for path in ["/v1/api/dlq", "/v1/api/invoices"] {
        let status = client.get(api.url(path)).send().await.unwrap().status();
        assert_eq!(status, 401, "{path} without a token");
    }
    assert_eq!(api.get_as(&token(&["invoice:read"], &["M-1"]), "/v1/api/dlq").await.status(), 403);
    // The DLQ is Postgres' FAILED invoices, newest first, even with nothing in Redis (ORD-J-2
    // was replayed above).
    let admin = token(&["invoice:admin"], &[]);
    let orders_in = |dlq: &Value| -> Vec<String> {
        dlq["items"].as_array().unwrap().iter().map(|i| i["orderId"].as_str().unwrap().to_owned()).collect()
    };
    let dlq: Value = api.get_as(&admin, "/v1/api/dlq").await.json().await.unwrap();
    assert_eq!(orders_in(&dlq), ["ORD-J-3"], "{dlq}");
    assert_eq!(dlq["items"][0]["invoiceId"], theirs.to_string());
    assert_eq!(dlq["items"][0]["merchantId"], "M-2");
    let p = invoice::ids::partition_of("ORD-J-3", 3);
    assert_eq!(dlq["items"][0]["partition"], p);
    let same: Value = api.get_as(&admin, &format!("/v1/api/dlq?partition={p}")).await.json().await.unwrap();
    assert_eq!(orders_in(&same), ["ORD-J-3"]);
    let other: Value =
        api.get_as(&admin, &format!("/v1/api/dlq?partition={}", (p + 1) % 3)).await.json().await.unwrap();
    assert!(orders_in(&other).is_empty(), "{other}");
    // An admin sees every merchant, with the permissions it holds; admin alone is no read.
    assert_eq!(api.get_as(&admin, &format!("/v1/api/invoices/{theirs}")).await.status(), 403);
    let admin_reader = token(&["invoice:admin", "invoice:read"], &[]);
    assert_eq!(api.get_as(&admin_reader, &format!("/v1/api/invoices/{theirs}")).await.status(), 200);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_is_refetched_once_for_unknown_kids_and_cached_keys_survive_an_idp_outage() {
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_JWKS_REFETCH_COOLDOWN_MS".into(), "30000".into());
    })
    .await;
    let path = "/v1/api/invoices";
    let before = api.idp.fetches();
    // A cached kid costs no fetch.
    for _ in 0..5 {
        assert_eq!(api.get_as(&token(&["invoice:read"], &["M-1"]), path).await.status(), 200);
    }
    assert_eq!(api.idp.fetches(), before);
    // 200 distinct bogus kids: at most one fetch.
    for i in 0..200 {
        let bogus = sign(KEY_B, Some(&format!("bogus-{i}")), &claims(&["invoice:read"], &["M-1"]));
        assert_eq!(api.get_as(&bogus, path).await.status(), 401);
    }
    assert!(api.idp.fetches() <= before + 1, "{} fetches", api.idp.fetches() - before);
    // The IdP goes down: the cached key keeps working, no request waits on it.
    api.idp.set_down(true);
    assert_eq!(api.get_as(&token(&["invoice:read"], &["M-1"]), path).await.status(), 200);
    api.stop().await.unwrap();

    // A rotation at the IdP just after start-up: the new kid verifies after one fetch (the
    // start-up fetch does not count toward the 30 s cooldown).
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_JWKS_REFETCH_COOLDOWN_MS".into(), "30000".into());
    })
    .await;
    api.idp.publish(vec![jwk("a", KEY_A), jwk("b", KEY_B)]);
    let before = api.idp.fetches();
    let rotated = sign(KEY_B, Some("b"), &claims(&["invoice:read"], &["M-1"]));
    assert_eq!(api.get_as(&rotated, path).await.status(), 200);
    assert_eq!(api.idp.fetches(), before + 1);
    assert_eq!(api.get_as(&rotated, path).await.status(), 200);
    assert_eq!(api.idp.fetches(), before + 1);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_any_key_is_loaded_jwt_routes_answer_503_and_public_ones_work() {
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_JWKS_URL".into(), "http://127.0.0.1:9/jwks.json".into());
    })
    .await;
    let response = api.get_as(&token(&["invoice:read"], &["M-1"]), "/v1/api/invoices").await;
    assert_eq!(response.status(), 503);
    assert_eq!(reqwest::get(api.url("/v1/api/admin-units/provinces")).await.unwrap().status(), 200);
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_configuration_is_validated_stored_encrypted_masked_and_audited() {
    let api = TestApi::spawn().await;
    let writer = token(&["invoice:config:write", "invoice:config:read"], &["M-1"]);
    let url = api.url("/v1/api/merchants/M-1/provider-config");
    let sentinel = "s3cr3t-SENTINEL-password";
    let body = json!({"provider": "viettel", "endpoint": "https://api-vinvoice.viettel.vn/services/einvoiceapplication/api",
        "supplierTaxCode": "0100109106", "templateCode": "1/001", "series": "C26TAA",
        "credentials": {"username": "0100109106-215", "password": sentinel}});
    let client = reqwest::Client::new();
    let response = client.put(&url).bearer_auth(&writer).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let stored: Value = response.json().await.unwrap();
    assert_eq!(stored["credentials"], json!({"username": "***", "password": "***"}));
    assert!(!stored.to_string().contains(sentinel));
    let read: Value = client.get(&url).bearer_auth(&writer).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["series"], "C26TAA");
    assert_eq!(read["credentials"], json!({"username": "***", "password": "***"}));
    // At rest only ciphertext; the audit trail is masked too.
    let cipher: Vec<u8> = sqlx::query_scalar(
        "SELECT credentials_ciphertext FROM provider_config WHERE merchant_id = 'M-1' AND deleted_at IS NULL",
    )
    .fetch_one(&api.db.pool)
    .await
    .unwrap();
    assert!(!String::from_utf8_lossy(&cipher).contains(sentinel));
    assert_eq!(
        scalar(&api.db, &format!("SELECT count(*) FROM audit_log WHERE after::text LIKE '%{sentinel}%'"))
            .await,
        0
    );
    // A second PUT replaces it: one live row, the old one kept for invoices that point at it.
    assert_eq!(client.put(&url).bearer_auth(&writer).json(&body).send().await.unwrap().status(), 200);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM provider_config WHERE deleted_at IS NULL").await, 1);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM provider_config").await, 2);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM audit_log WHERE entity = 'provider_config'").await, 2);
    // Invalid bodies: the member is named, nothing stored.
    let mut bad = body.clone();
    bad["series"] = json!("Z26TAA");
    let response = client.put(&url).bearer_auth(&writer).json(&bad).send().await.unwrap();
    assert_eq!(response.status(), 422);
    assert!(response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().starts_with("series"));
    for endpoint in ["https://x.vn/api?redirect=", "https://x.vn/api#f", "https://x.vn/api\u{0}"] {
        let mut bad = body.clone();
        bad["endpoint"] = json!(endpoint);
        let response = client.put(&url).bearer_auth(&writer).json(&bad).send().await.unwrap();
        assert_eq!(response.status(), 422, "{endpoint}");
        assert!(response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().starts_with("endpoint"));
    }
    let mut extra = body.clone();
    extra["keyId"] = json!("k-evil");
    assert_eq!(client.put(&url).bearer_auth(&writer).json(&extra).send().await.unwrap().status(), 422);
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM provider_config").await, 2);
    // Concurrent first configurations of one merchant: serialised, every one answered 200,
    // one live row in the end (never a 500 from the uniqueness race).
    let writer_9 = token(&["invoice:config:write"], &["M-9"]);
    let url_9 = api.url("/v1/api/merchants/M-9/provider-config");
    let puts = (0..8).map(|_| client.put(&url_9).bearer_auth(&writer_9).json(&body).send());
    let statuses: Vec<u16> =
        futures::future::join_all(puts).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        scalar(
            &api.db,
            "SELECT count(*) FROM provider_config WHERE merchant_id = 'M-9' AND deleted_at IS NULL"
        )
        .await,
        1
    );
    assert_eq!(scalar(&api.db, "SELECT count(*) FROM provider_config WHERE merchant_id = 'M-9'").await, 8);
    api.stop().await.unwrap();
}

/// Every item of the invoice list for `query`, page after page (following `nextCursor`).
async fn all_pages(api: &TestApi, token: &str, query: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/api/invoices?{query}&cursor={c}"),
            None => format!("/v1/api/invoices?{query}"),
        };
        let page: Value = api.get_as(token, &path).await.json().await.unwrap();
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    items
}

/// The items' ids, asserting they come newest first.
fn newest_first_ids(items: &[Value]) -> Vec<i64> {
    let ids: Vec<i64> = items.iter().map(|item| item["id"].as_str().unwrap().parse().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| std::cmp::Reverse(*id));
    assert_eq!(ids, sorted, "newest first");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_list_by_cursor_show_masked_snapshots_audit_trails_and_replay() {
    let api = TestApi::spawn().await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(seed_invoice(&api.db, "M-1", &format!("ORD-L-{i}"), "ISSUED", deadline).await.0);
    }
    let (failed, _) = seed_invoice(&api.db, "M-1", "ORD-L-F", "FAILED", deadline).await;
    seed_invoice(&api.db, "M-2", "ORD-L-X", "ISSUED", deadline).await;
    let reader = token(&["invoice:read", "invoice:replay"], &["M-1"]);

    let items = all_pages(&api, &reader, "limit=2").await;
    assert!(items.iter().all(|item| item["merchantId"] == "M-1"), "{items:?}");
    let seen = newest_first_ids(&items);
    assert_eq!(seen.len(), 6, "{seen:?}");
    // A reader of two merchants pages through both (each read on its own index), newest
    // first, and never sees a third merchant's invoice.
    seed_invoice(&api.db, "M-3", "ORD-L-Y", "ISSUED", deadline).await;
    let two = token(&["invoice:read"], &["M-1", "M-2"]);
    let items = all_pages(&api, &two, "limit=3").await;
    assert_eq!(newest_first_ids(&items).len(), 7, "{items:?}");
    assert_eq!(items.iter().filter(|item| item["merchantId"] == "M-2").count(), 1, "{items:?}");
    assert!(items.iter().all(|item| item["merchantId"] != "M-3"), "{items:?}");
    let items = all_pages(&api, &two, "limit=3&orderId=ORD-L-X").await;
    assert_eq!(items.len(), 1, "{items:?}");
    let items = all_pages(&api, &two, "limit=1&status=FAILED").await;
    assert_eq!(items.len(), 1, "{items:?}");
    let page: Value = api.get_as(&reader, "/v1/api/invoices?status=FAILED").await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(api.get_as(&reader, "/v1/api/invoices?status=NOPE").await.status(), 400);
    assert_eq!(api.get_as(&reader, "/v1/api/invoices?cursor=%%%").await.status(), 400);
    // Empty values are absent filters.
    let page: Value =
        api.get_as(&reader, "/v1/api/invoices?orderId=&status=&limit=&cursor=").await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 6, "{page}");
    assert_eq!(api.get_as(&reader, "/v1/api/invoices?colour=red").await.status(), 400);
    // A NUL in a filter is a 400, not a database error; ids in paths are percent-decoded.
    assert_eq!(api.get_as(&reader, "/v1/api/invoices?orderId=A%00B").await.status(), 400);
    let page: Value = api.get_as(&reader, "/v1/api/invoices?orderId=ORD-L-F").await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    let encoded: String = ids[0].to_string().bytes().map(|b| format!("%{b:02X}")).collect();
    let one: Value = api.get_as(&reader, &format!("/v1/api/invoices/{encoded}")).await.json().await.unwrap();
    assert_eq!(one["id"], ids[0].to_string(), "{one}");
    assert_eq!(api.get_as(&reader, "/v1/api/invoices/%FF").await.status(), 400);
    assert_eq!(api.get_as(&reader, "/v1/api/invoices/1%00").await.status(), 400);
    // A declared body over 1 MiB is refused before authentication, on a route that reads none.
    let response = reqwest::Client::new()
        .post(api.url(&format!("/v1/api/invoices/{failed}/replay")))
        .body(vec![b'x'; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["content-type"], "application/problem+json");

    let one: Value = api.get_as(&reader, &format!("/v1/api/invoices/{}", ids[0])).await.json().await.unwrap();
    assert_eq!(one["configSnapshot"]["credentials"], "***");
    assert_eq!(one["configSnapshot"]["series"], "C26TAA");

    // Replay: FAILED → QUEUED with a job; an issued invoice is left alone.
    let response = reqwest::Client::new()
        .post(api.url(&format!("/v1/api/invoices/{failed}/replay")))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["before"].as_str(), body["status"].as_str(), body["replayed"].as_bool()),
        (Some("FAILED"), Some("QUEUED"), Some(true))
    );
    assert_eq!(api.queue().job_state("ORD-L-F").await.unwrap().0.as_deref(), Some("waiting"));
    let response = reqwest::Client::new()
        .post(api.url(&format!("/v1/api/invoices/{}/replay", ids[0])))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["status"].as_str(), body["replayed"].as_bool()), (Some("ISSUED"), Some(false)));

    let audit: Value =
        api.get_as(&reader, &format!("/v1/api/invoices/{failed}/audit")).await.json().await.unwrap();
    let events: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|a| a["event"].as_str().unwrap()).collect();
    assert_eq!(events, vec!["replayed"]);
    assert_eq!(audit["items"][0]["actor"], "jwt:operator-1");
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_and_lists_every_route() {
    let api = TestApi::spawn().await;
    let doc: Value = reqwest::get(api.url("/v1/api/openapi.json")).await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for route in invoice::http::routes::ROUTES {
        let method = route.method.to_lowercase();
        assert!(doc["paths"][route.template][&method].is_object(), "{} {}", route.method, route.template);
    }
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_logs_or_answers_even_in_bad_requests() {
    use crate::support::{base_env, invoice_cmd, wait_until, TestDb};
    use std::io::Read as _;
    let db = TestDb::create().await;
    let idp = idp::TestIdp::spawn().await;
    let port = crate::cli::free_port();
    let mut env = base_env(&db.url);
    env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), format!("127.0.0.1:{port}"));
    env.insert("APP_ENV_INVOICE_JWKS_URL".into(), idp.url());
    let mut child = invoice_cmd(&env)
        .env("RUST_LOG", "debug")
        .arg("api")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let writer = token(&["invoice:config:write", "invoice:config:read"], &["M-1"]);
    let url = format!("{base}/v1/api/merchants/M-1/provider-config");
    let client = reqwest::Client::new();
    wait_until(std::time::Duration::from_secs(30), "the api process to take tokens", || {
        let (client, url, writer) = (client.clone(), url.clone(), writer.clone());
        async move {
            let status = client.get(&url).bearer_auth(&writer).send().await.ok()?.status();
            (status == 404).then_some(())
        }
    })
    .await;
    let sentinel = "SENTINEL-9f2c-credential";
    let good = json!({"provider": "viettel", "endpoint": "https://api-vinvoice.viettel.vn/services/einvoiceapplication/api",
        "supplierTaxCode": "0100109106", "templateCode": "1/001", "series": "C26TAA",
        "credentials": {"username": "0100109106-215", "password": sentinel}});
    let mut answers = String::new();
    let response = client.put(&url).bearer_auth(&writer).json(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
    answers += &response.text().await.unwrap();
    // Wrong types around the secret: the error detail must not quote it.
    for bad in [
        json!({"provider": "viettel", "endpoint": sentinel, "supplierTaxCode": "0100109106", "templateCode": "1/001",
               "series": "C26TAA", "credentials": {"username": "u", "password": sentinel}}),
        json!({"provider": "viettel", "endpoint": "https://x.vn/api", "supplierTaxCode": "0100109106", "templateCode": 1,
               "series": "C26TAA", "credentials": {"username": "u", "password": [sentinel]}}),
        json!({"credentials": sentinel}),
    ] {
        let response = client.put(&url).bearer_auth(&writer).json(&bad).send().await.unwrap();
        assert_eq!(response.status(), 422);
        answers += &response.text().await.unwrap();
    }
    answers += &client.get(&url).bearer_auth(&writer).send().await.unwrap().text().await.unwrap();
    assert!(!answers.contains(sentinel), "{answers}");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut logs = String::new();
    child.stdout.take().unwrap().read_to_string(&mut logs).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(logs.contains("Provider configuration replaced"), "the logs were captured: {logs}");
    assert!(!logs.contains(sentinel), "a credential reached the logs");
}
