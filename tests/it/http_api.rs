//! `invoice api`: health, readiness, metrics, error shape, graceful stop.

use crate::support::TestApi;

#[tokio::test]
async fn health_answers_ok() {
    let api = TestApi::spawn().await;
    let response = reqwest::get(api.url("/health")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"status": "ok"}));
    api.stop().await.unwrap();
}

#[tokio::test]
async fn ready_is_200_when_postgres_redis_and_kafka_answer() {
    let api = TestApi::spawn().await;
    let response = reqwest::get(api.url("/ready")).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(
        body["checks"],
        serde_json::json!({"postgres": "ok", "redis": "ok", "kafka": "ok", "jwks": "ok"})
    );
    api.stop().await.unwrap();
}

#[tokio::test]
async fn ready_is_503_naming_jwks_until_the_identity_providers_keys_were_loaded_once() {
    // Security R9: nothing answers at this address, so the JWT routes can only answer 503.
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_JWKS_URL".into(), "http://127.0.0.1:9/jwks.json".into());
    })
    .await;
    let response = reqwest::get(api.url("/ready")).await.unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["failed"], serde_json::json!(["jwks"]));
    assert_eq!(body["checks"]["postgres"], "ok");
    assert!(!body.to_string().contains("127.0.0.1:9"), "the URL is not repeated: {body}");
    api.stop().await.unwrap();
}

#[tokio::test]
async fn ready_is_503_naming_redis_when_redis_is_down() {
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_REDIS_URL".into(), "redis://127.0.0.1:1/0".into());
    })
    .await;
    let response = reqwest::get(api.url("/ready")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["failed"], serde_json::json!(["redis"]));
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["kafka"], "ok");
    assert!(body["detail"].as_str().unwrap().contains("redis"), "{body}");
    let metrics = reqwest::get(api.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("invoice_dependency_up{dependency=\"redis\"} 0"), "{metrics}");
    assert!(metrics.contains("invoice_dependency_up{dependency=\"postgres\"} 1"), "{metrics}");
    api.stop().await.unwrap();
}

#[tokio::test]
async fn ready_is_503_naming_kafka_when_no_broker_answers() {
    let api = TestApi::spawn_with(|env| {
        env.insert("APP_ENV_INVOICE_KAFKA_BROKERS".into(), "127.0.0.1:1".into());
    })
    .await;
    let response = reqwest::get(api.url("/ready")).await.unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["failed"], serde_json::json!(["kafka"]));
    api.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_invoice_prefix() {
    let api = TestApi::spawn().await;
    reqwest::get(api.url("/health")).await.unwrap();
    let response = reqwest::get(api.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    assert!(text.contains("# TYPE invoice_http_request_duration_seconds histogram"), "{text}");
    assert!(
        text.contains(
            "invoice_http_request_duration_seconds_count{method=\"GET\",route=\"/health\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(text.contains("invoice_build_info{mode=\"api\""), "{text}");
    api.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_get_problem_json() {
    let api = TestApi::spawn().await;
    let response = reqwest::get(api.url("/v1/api/nothing-here/42")).await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], 404);
    assert_eq!(body["title"], "Not Found");
    assert!(body["type"].as_str().unwrap().starts_with("https://"));
    assert!(body["detail"].as_str().unwrap().contains("/v1/api/nothing-here/42"));

    let response = reqwest::Client::new().post(api.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("GET"), "{body}");
    // The raw path never becomes a metric label.
    let metrics = reqwest::get(api.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("nothing-here"), "{metrics}");
    assert!(metrics.contains("route=\"unmatched\",status=\"404\""), "{metrics}");
    // Nor does a made-up method: any token is a method to hyper.
    for i in 0..3 {
        let method = reqwest::Method::from_bytes(format!("RND{i}").as_bytes()).unwrap();
        let response = reqwest::Client::new().request(method, api.url("/health")).send().await.unwrap();
        assert_eq!(response.status(), 405);
    }
    let metrics = reqwest::get(api.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("RND"), "{metrics}");
    assert!(metrics.contains("method=\"other\",route=\"/health\",status=\"405\"} 3"), "{metrics}");
    api.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_releases_the_listener_and_returns_ok() {
    let api = TestApi::spawn().await;
    let addr = api.addr;
    api.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still listening after stop");
}

#[tokio::test]
async fn administrative_units_are_served_after_the_2025_reform() {
    let api = TestApi::spawn().await;
    let body: serde_json::Value =
        reqwest::get(api.url("/v1/api/admin-units/provinces")).await.unwrap().json().await.unwrap();
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 34);
    assert_eq!(
        items[0],
        serde_json::json!({"code": "01", "name": "Thành phố Hà Nội", "kind": "municipality"})
    );
    let wards: serde_json::Value =
        reqwest::get(api.url("/v1/api/admin-units/provinces/01/wards")).await.unwrap().json().await.unwrap();
    assert_eq!(wards["provinceCode"], "01");
    assert!(wards["items"].as_array().unwrap().iter().any(|w| w["name"] == "Phường Hoàn Kiếm"));
    let missing = reqwest::get(api.url("/v1/api/admin-units/provinces/99/wards")).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
    let bad = reqwest::get(api.url("/v1/api/admin-units/provinces/1x/wards")).await.unwrap();
    assert_eq!(bad.status(), 400);
    let metrics = reqwest::get(api.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("route=\"/v1/api/admin-units/provinces/{code}/wards\""), "{metrics}");
    api.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_trickling_its_request_head_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = TestApi::spawn().await;
    let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // The head never ends: the server closes the connection after its header read timeout
    // (30 s) instead of holding it, and its file descriptor, forever.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(60), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection is still open after 60 s");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "{}", String::from_utf8_lossy(&buf));
    api.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usable_request_id_is_echoed_and_any_other_is_replaced_by_a_fresh_one() {
    let api = TestApi::spawn().await;
    let client = reqwest::Client::new();
    let echoed = |id: &str| {
        let request = client.get(api.url("/health")).header("x-request-id", id);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(echoed("trace-7f3a:9.b_c").await, "trace-7f3a:9.b_c");
    for unusable in ["a b", "x\"y", "k=v status=200", &"a".repeat(129)] {
        let got = echoed(unusable).await;
        assert_ne!(got, unusable);
        assert!(uuid::Uuid::parse_str(&got).is_ok(), "{unusable:?} gave {got:?}");
    }
    api.stop().await.unwrap();
}

#[tokio::test]
async fn a_postgres_that_accepts_no_writes_is_not_ready_and_its_refusals_are_unavailability() {
    use invoice::storage::{self, StorageError};
    use sqlx::Connection as _;
    let db = crate::support::TestDb::create().await;
    // A session of its own, writable whatever the database's default becomes.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let read_only = |on: bool| {
        format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = {}",
            db.name,
            if on { "on" } else { "off" }
        )
    };
    // As a primary caught mid-failover, or a standby behind the service's address: SELECT 1
    // answers, every write fails.
    sqlx::query(&read_only(true)).execute(&mut admin).await.unwrap();
    let pool = storage::pool(&db.url, "invoice-test-read-only", 2).unwrap();
    let error = storage::ping(&pool).await.unwrap_err();
    assert!(matches!(error, StorageError::Unavailable(ref m) if m.contains("read-only")), "{error}");
    let refused = sqlx::query("INSERT INTO webhook_seen (endpoint, webhook_id) VALUES ('merchant', 'ro')")
        .execute(&pool)
        .await
        .unwrap_err();
    // Unavailable: the API answers 503 (the sender retries), the stream and workers retry.
    assert!(matches!(StorageError::from(refused), StorageError::Unavailable(_)));
    pool.close().await;

    sqlx::query(&read_only(false)).execute(&mut admin).await.unwrap();
    let pool = storage::pool(&db.url, "invoice-test-writable", 2).unwrap();
    storage::ping(&pool).await.unwrap();
}
