//! HTTP API benchmark (`make bench`): the production `run_api` on loopback, driven by a
//! Rust load generator in this process with `BENCH_API_CONCURRENCY` (default 64) requests
//! in flight on keep-alive connections. Two stages, every response checked:
//!
//! - `webhook`: `BENCH_WEBHOOKS` (default 20 000) signed `invoice.request` deliveries, each
//!   new (signature check, dedupe row, request row: one transaction each);
//! - `duplicate`: the same deliveries again (signature check, dedupe hit, rollback).
//!
//! Writes `target/bench/api.json` (requests per second, p50/p99 latency in ms).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use invoice::config::{Config, Mode};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PG: &str = "postgres://postgres@127.0.0.1:5432";
const SECRET: &str = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtbWVyY2hhbnQ=";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Stage {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Sends every body with its id, `concurrency` at a time; asserts each answer.
async fn drive(
    url: &str,
    deliveries: &[(String, String)],
    concurrency: usize,
    expect: &'static str,
) -> Stage {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap();
    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(deliveries.len());
    for (id, body) in deliveries.iter().cloned() {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let ts = chrono::Utc::now().timestamp();
            let signature = invoice::auth::webhook::sign(SECRET, &id, ts, body.as_bytes());
            let sent = Instant::now();
            let response = client
                .post(&url)
                .header("webhook-id", &id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let answer: serde_json::Value = response.json().await.unwrap();
            let elapsed = sent.elapsed();
            drop(permit);
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["status"], expect, "{answer}");
            elapsed
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0
    };
    Stage { rps: deliveries.len() as f64 / secs, p50_ms: at(0.50), p99_ms: at(0.99) }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = env_usize("BENCH_WEBHOOKS", 20_000);
    let concurrency = env_usize("BENCH_API_CONCURRENCY", 64);

    let mut admin = PgConnection::connect(&format!("{PG}/postgres")).await.unwrap();
    sqlx::query("DROP DATABASE IF EXISTS invoice_bench_api WITH (FORCE)").execute(&mut admin).await.unwrap();
    sqlx::query("CREATE DATABASE invoice_bench_api").execute(&mut admin).await.unwrap();
    let url = format!("{PG}/invoice_bench_api");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    invoice::storage::migrate(&pool).await.unwrap();

    let env: HashMap<String, String> = [
        ("APP_ENV_INVOICE_DATABASE_URL", url.as_str()),
        ("APP_ENV_INVOICE_WORKER_ID", "1019"),
        (
            "APP_ENV_INVOICE_CREDENTIALS_KEY",
            "62656e63682d6f6e6c792d6b65792d62656e63682d6f6e6c792d6b65792d2121",
        ),
        ("APP_ENV_INVOICE_HTTP_ADDR", "127.0.0.1:0"),
        ("APP_ENV_INVOICE_QUEUE_PREFIX", "iq-bench-api"),
        ("APP_ENV_INVOICE_LOG_FORMAT", "text"),
        ("WEBHOOK_SECRET", SECRET),
        ("WEBHOOK_INTERNAL_SECRET", "bench-internal-secret-of-sufficient-length"),
        ("APP_ENV_INVOICE_JWKS_URL", "http://127.0.0.1:9/jwks.json"),
        ("APP_ENV_INVOICE_JWT_ISSUER", "https://auth.bench"),
        ("APP_ENV_INVOICE_JWT_AUDIENCE", "invoice"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let cfg = Config::from_source(&env, Mode::Api).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let api = tokio::spawn(invoice::app::run_api(cfg, listener, stop.clone()));
    let health = format!("http://{addr}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(&health).await.map(|r| !r.status().is_success()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "the API did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let webhook_url = format!("http://{addr}/v1/api/webhooks/merchant");
    let buyer = json!({"legalName": "Công ty TNHH Mua Hàng", "taxCode": "0101243150", "address": "2 Lý Thường Kiệt, Hà Nội"});
    let deliveries: Vec<(String, String)> = (0..n)
        .map(|i| {
            let body = json!({"type": "invoice.request", "data": {"orderId": format!("ORD-B-{i}"), "merchantId": "M-1", "buyer": buyer}});
            (format!("msg_bench_{i}"), body.to_string())
        })
        .collect();
    let fresh = drive(&webhook_url, &deliveries, concurrency, "processed").await;
    let duplicate = drive(&webhook_url, &deliveries, concurrency, "duplicate").await;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM invoice_request").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, n as i64, "one request row per delivery");

    let report = json!({
        "webhooks": n,
        "concurrency": concurrency,
        "webhook_per_sec": fresh.rps.round(),
        "webhook_p50_ms": (fresh.p50_ms * 10.0).round() / 10.0,
        "webhook_p99_ms": (fresh.p99_ms * 10.0).round() / 10.0,
        "duplicate_per_sec": duplicate.rps.round(),
        "duplicate_p50_ms": (duplicate.p50_ms * 10.0).round() / 10.0,
        "duplicate_p99_ms": (duplicate.p99_ms * 10.0).round() / 10.0,
        "note": "the load generator shares the machine (and this process) with the API",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/api.json", text).unwrap();
    stop.cancel();
    let _ = api.await;
}
