//! The test harness: every test gets its own Postgres database (cloned from a template
//! migrated once per run), its own Kafka topics and its own Redis key prefix, so tests run
//! in parallel against the real local stack (`make deps`) without seeing each other.

#![allow(dead_code)]

pub mod idp;
pub mod kafka;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use invoice::config::{Config, Mode};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Server URL (no database) of the local Postgres.
pub fn pg_server_url() -> String {
    std::env::var("INVOICE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}
/// The local Kafka.
pub fn kafka_brokers() -> String {
    std::env::var("INVOICE_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The local broker as the service's Kafka settings (plain text, no authentication).
pub fn kafka() -> invoice::config::Kafka {
    invoice::config::Kafka::plaintext(kafka_brokers())
}
/// The local Redis.
pub fn redis_url() -> String {
    std::env::var("INVOICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// How many payment events the stream has decided: its skips are `payment_decision` rows, its
/// creations the original invoices (which name their event; no decision row is written).
pub const DECISIONS: &str = "SELECT (SELECT count(*) FROM payment_decision)
     + (SELECT count(*) FROM invoice WHERE kind = 'original' AND payment_event_id IS NOT NULL)";

/// A fixed credentials key for tests.
pub const TEST_KEY: &str = "746573742d6f6e6c792d6b65792d746573742d6f6e6c792d6b65792d74657374";

/// A short random suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Polls `check` until it yields `Some`, or fails the test after `timeout` saying what was
/// awaited. The only way tests wait.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Logs of in-process services: silent unless `TEST_LOG` is set (then to stderr).
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        invoice::telemetry::init_with_writer(invoice::config::LogFormat::Text, std::io::stderr);
    } else {
        invoice::telemetry::init_with_writer(invoice::config::LogFormat::Text, std::io::sink);
    }
}

/// A worker id no other running test holds (the advisory lock is server-wide).
pub fn next_worker_id() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    ((base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))) % 900 + 100) as u16
}

/// A private database, dropped when this value is.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// URL to reach it.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
}

impl TestDb {
    /// A new database with the schema and reference data, cloned from the run's template.
    pub async fn create() -> TestDb {
        let template = template().await;
        let name = unique("it_");
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg_server_url())).await.unwrap();
        // Concurrent clones of one template can collide on its lock; retry briefly.
        let mut tries = 0;
        loop {
            match sqlx::query(&format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""))
                .execute(&mut admin)
                .await
            {
                Ok(_) => break,
                Err(e) if tries < 50 && e.to_string().contains("being accessed by other users") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("creating test database {name}: {e}"),
            }
        }
        let url = format!("{}/{name}", pg_server_url());
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect(&url).await.unwrap();
        TestDb { name, url, pool }
    }

    /// An empty database (no migrations), for testing `migrate` itself.
    pub async fn create_empty() -> TestDb {
        let name = unique("it_empty_");
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg_server_url())).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.unwrap();
        let url = format!("{}/{name}", pg_server_url());
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect(&url).await.unwrap();
        TestDb { name, url, pool }
    }

    /// `SELECT count(*) FROM table`.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&self.pool).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; do the async cleanup on a thread of its own.
        // The pool is not touched there: its connections belong to the test's runtime, which
        // is blocked while we join. `WITH (FORCE)` ends them server-side.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&format!("{}/postgres", pg_server_url())).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Name of the template database for the current migrations, created once (under an
/// advisory lock, so parallel test binaries agree).
async fn template() -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            use sha2::{Digest, Sha256};
            let mut hash = Sha256::new();
            for m in invoice::storage::MIGRATOR.iter() {
                hash.update(m.version.to_le_bytes());
                hash.update(&m.checksum);
            }
            // The reference data is part of the template too.
            hash.update(include_bytes!("../../../data/vn-admin-units/wards.csv"));
            hash.update(include_bytes!("../../../data/vn-admin-units/provinces.csv"));
            let name = format!("invoice_tpl_{}", &hex::encode(hash.finalize())[..16]);
            let mut admin = PgConnection::connect(&format!("{}/postgres", pg_server_url())).await.unwrap();
            sqlx::query("SELECT pg_advisory_lock(7315002)").execute(&mut admin).await.unwrap();
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&name)
                    .fetch_one(&mut admin)
                    .await
                    .unwrap();
            if !exists {
                let building = format!("{name}_building");
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                sqlx::query(&format!("CREATE DATABASE \"{building}\"")).execute(&mut admin).await.unwrap();
                let pool = PgPool::connect(&format!("{}/{building}", pg_server_url())).await.unwrap();
                invoice::storage::migrate(&pool).await.unwrap();
                invoice::storage::seed::reference_data(&pool).await.unwrap();
                pool.close().await;
                // An autovacuum worker may still be connected to the fresh database, which
                // makes the rename fail: end such sessions and try again, within a deadline.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                        .bind(&building)
                        .execute(&mut admin)
                        .await
                        .unwrap();
                    match sqlx::query(&format!("ALTER DATABASE \"{building}\" RENAME TO \"{name}\""))
                        .execute(&mut admin)
                        .await
                    {
                        Ok(_) => break,
                        Err(error) if Instant::now() < deadline => {
                            eprintln!("template rename failed ({error}); retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(error) => panic!("cannot rename the template database: {error}"),
                    }
                }
            }
            sqlx::query("SELECT pg_advisory_unlock(7315002)").execute(&mut admin).await.unwrap();
            name
        })
        .await
        .clone()
}

/// Environment for a process or config of the service, pointing at `db` and the local
/// stack, with a fresh worker id.
pub fn base_env(db_url: &str) -> HashMap<String, String> {
    HashMap::from([
        ("APP_ENV_INVOICE_DATABASE_URL".to_owned(), db_url.to_owned()),
        ("APP_ENV_INVOICE_REDIS_URL".to_owned(), redis_url()),
        ("APP_ENV_INVOICE_KAFKA_BROKERS".to_owned(), kafka_brokers()),
        ("APP_ENV_INVOICE_WORKER_ID".to_owned(), next_worker_id().to_string()),
        ("APP_ENV_INVOICE_CREDENTIALS_KEY".to_owned(), TEST_KEY.to_owned()),
        ("APP_ENV_INVOICE_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("WEBHOOK_SECRET".to_owned(), "whsec_dGVzdC13ZWJob29rLXNlY3JldC1tZXJjaGFudA==".to_owned()),
        ("WEBHOOK_INTERNAL_SECRET".to_owned(), "whsec_dGVzdC13ZWJob29rLXNlY3JldC1pbnRlcm5hbA==".to_owned()),
        ("APP_ENV_INVOICE_JWKS_URL".to_owned(), "http://127.0.0.1:9/jwks.json".to_owned()),
        ("APP_ENV_INVOICE_JWT_ISSUER".to_owned(), "https://auth.test".to_owned()),
        ("APP_ENV_INVOICE_JWT_AUDIENCE".to_owned(), "invoice".to_owned()),
        // The provider simulator listens on loopback.
        ("APP_ENV_INVOICE_PROVIDER_ALLOW_PRIVATE_NETWORKS".to_owned(), "true".to_owned()),
    ])
}

/// The API running in this process on an ephemeral port, through the production `run_api`,
/// with its own test identity provider and queue prefix.
pub struct TestApi {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its database.
    pub db: TestDb,
    /// Its identity provider.
    pub idp: idp::TestIdp,
    /// Its environment.
    pub env: HashMap<String, String>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApi {
    /// Starts the API on a fresh database; `tweak` may change the environment first.
    /// Waits until it answers `/health` and, if the IdP is up, until it loaded the keys.
    pub async fn spawn_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApi {
        TestApi::spawn_on(TestDb::create().await, tweak).await
    }

    /// Like [`TestApi::spawn_with`] on an existing database.
    pub async fn spawn_on(db: TestDb, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApi {
        init_logs();
        let idp = idp::TestIdp::spawn().await;
        let mut env = base_env(&db.url);
        env.insert("APP_ENV_INVOICE_JWKS_URL".into(), idp.url());
        env.insert("APP_ENV_INVOICE_QUEUE_PREFIX".into(), unique("iq-api-"));
        tweak(&mut env);
        let cfg = Config::from_source(&env, Mode::Api).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(invoice::app::run_api(cfg, listener, shutdown.clone()));
        let api = TestApi { addr, db, idp, env, shutdown, task };
        let url = api.url("/health");
        wait_until(Duration::from_secs(20), "the API to answer /health", || {
            let url = url.clone();
            async move { reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        if api.env.get("APP_ENV_INVOICE_JWKS_URL") == Some(&api.idp.url()) {
            let metrics = api.url("/metrics");
            wait_until(Duration::from_secs(20), "the API to load the JWKS", || {
                let metrics = metrics.clone();
                async move {
                    let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
                    (metric_value(&text, "invoice_jwks_keys", &[]) > 0.0).then_some(())
                }
            })
            .await;
        }
        api
    }

    /// Starts the API with the default test environment.
    pub async fn spawn() -> TestApi {
        TestApi::spawn_with(|_| {}).await
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap()
    }

    /// A GET with a bearer token.
    pub async fn get_as(&self, token: &str, path: &str) -> reqwest::Response {
        reqwest::Client::new().get(self.url(path)).bearer_auth(token).send().await.unwrap()
    }

    /// A signed webhook delivery: `secret` signs `body` under `id`, sent now.
    pub async fn webhook(&self, endpoint: &str, secret: &str, id: &str, body: &str) -> reqwest::Response {
        let ts = chrono::Utc::now().timestamp();
        self.webhook_at(endpoint, secret, id, ts, body).await
    }

    /// A signed webhook delivery with timestamp `ts`.
    pub async fn webhook_at(
        &self,
        endpoint: &str,
        secret: &str,
        id: &str,
        ts: i64,
        body: &str,
    ) -> reqwest::Response {
        let signature = invoice::auth::webhook::sign(secret, id, ts, body.as_bytes());
        reqwest::Client::new()
            .post(self.url(&format!("/v1/api/webhooks/{endpoint}")))
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// The merchant webhook secret of the test environment.
    pub fn merchant_secret(&self) -> String {
        self.env["WEBHOOK_SECRET"].clone()
    }

    /// The internal webhook secret of the test environment.
    pub fn internal_secret(&self) -> String {
        self.env["WEBHOOK_INTERNAL_SECRET"].clone()
    }

    /// The queue the API enqueues into.
    pub fn queue(&self) -> invoice::queue::Queue {
        queue_of(&self.env)
    }

    /// Waits until exactly `expected` events were written by this API's database (still in
    /// the outbox, or published by this process's relay, which deletes them).
    pub async fn assert_events_written(&self, expected: i64) {
        wait_until(Duration::from_secs(20), &format!("{expected} events to be written"), || async {
            let pending = scalar(&self.db, "SELECT count(*) FROM outbox").await;
            let published = metric_value(&self.metrics().await, "invoice_outbox_published_total", &[]) as i64;
            (pending + published == expected).then_some(())
        })
        .await;
    }

    /// Graceful stop; returns what `run_api` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// An invoice (and its open claim) written directly, as the stream would have decided it:
/// merchant `merchant`, order `order`, status `status`, claim deadline `deadline`.
/// Returns `(invoice id, clear claim token)`.
pub async fn seed_invoice(
    db: &TestDb,
    merchant: &str,
    order: &str,
    status: &str,
    deadline: chrono::DateTime<chrono::Utc>,
) -> (i64, String) {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let id = 7_000_000_000_000_000_000
        + i64::from(NEXT.fetch_add(1, Ordering::SeqCst)) * 10
        + i64::from(std::process::id() % 10);
    let token = invoice::crypto::random_token();
    let hash = invoice::domain::claim::token_hash(&token);
    let snapshot = serde_json::json!({"provider": "viettel", "configId": "1", "series": "C26TAA", "templateCode": "1/001",
        "credentials": {"keyId": "k-test", "nonce": "AAAA", "ciphertext": "AAAA"}});
    let lines = serde_json::json!([{"name": "Cà phê", "quantity": "1", "unitPrice": "100000", "vatRate": "8",
        "net": "100000", "vat": "8000", "gross": "108000"}]);
    let issued = status == "ISSUED";
    sqlx::query(
        "INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, paid_at, currency, lines,
             total_net, total_vat, total_amount, config_snapshot, transaction_uuid, next_attempt_at,
             provider_invoice_no, issued_at)
         VALUES ($1, $2, $3, $4, 'immediate', now(), 'VND', $5, 100000, 8000, 108000, $6, $7, now(),
             CASE WHEN $8 THEN '0000001' END, CASE WHEN $8 THEN now() END)",
    )
    .bind(id)
    .bind(merchant)
    .bind(order)
    .bind(status)
    .bind(&lines)
    .bind(&snapshot)
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(issued)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO claim (id, invoice_id, merchant_id, order_id, token_hash, deadline, status)
         VALUES ($1, $1, $2, $3, $4, $5, 'OPEN')",
    )
    .bind(id)
    .bind(merchant)
    .bind(order)
    .bind(&hash[..])
    .bind(deadline)
    .execute(&db.pool)
    .await
    .unwrap();
    (id, token)
}

/// A company buyer with a valid tax code.
pub fn company_buyer() -> serde_json::Value {
    serde_json::json!({"legalName": "Công ty TNHH Mua Hàng", "taxCode": "0101243150",
                       "address": "2 Lý Thường Kiệt, Hoàn Kiếm, Hà Nội", "email": "ketoan@muahang.vn"})
}

/// One number from SQL (`-1` if NULL or no row).
pub async fn scalar(db: &TestDb, sql: &str) -> i64 {
    let v: Option<Option<i64>> = sqlx::query_scalar(sql).fetch_optional(&db.pool).await.unwrap();
    v.flatten().unwrap_or(-1)
}

/// Fails if a row points at an invoice or provider configuration that does not exist, an
/// invoice's shared config snapshot is missing, or two invoices share a transaction UUID. The schema leaves these to the code (migration 0004):
/// such rows are written with their invoice or after it committed, and neither invoices nor
/// configurations are ever deleted.
pub async fn assert_no_orphans(db: &TestDb) {
    for table in ["claim", "payment_decision", "issuance_attempt", "audit_log"] {
        let orphans = scalar(
            db,
            &format!(
                "SELECT count(*) FROM {table} t
                 WHERE t.invoice_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM invoice i WHERE i.id = t.invoice_id)"
            ),
        )
        .await;
        assert_eq!(orphans, 0, "{table} rows pointing at no invoice");
    }
    let shared = scalar(
        db,
        "SELECT count(*) FROM (SELECT transaction_uuid FROM invoice GROUP BY 1 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(shared, 0, "transaction UUIDs shared by two invoices");
    let unconfigured = scalar(
        db,
        "SELECT count(*) FROM invoice i WHERE i.provider_config_id IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM provider_config c WHERE c.id = i.provider_config_id)",
    )
    .await;
    assert_eq!(unconfigured, 0, "invoices copied from no provider configuration");
    let without_snapshot = scalar(
        db,
        "SELECT count(*) FROM invoice i WHERE invoice_snapshot(i.config_snapshot, i.config_snapshot_digest) IS NULL",
    )
    .await;
    assert_eq!(without_snapshot, 0, "invoices whose config snapshot is missing");
}

/// The `invoice` binary with a clean environment (only `env`), run in an empty directory so
/// no `.env` file is picked up.
pub fn invoice_cmd(env: &HashMap<String, String>) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_invoice"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(env)
        .current_dir(std::env::temp_dir());
    cmd
}

/// `invoice stream` running in this process against `db` and `topics`, through the
/// production `run_stream`.
pub struct TestStream {
    /// Where its health/metrics listener is.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The environment of a stream on `db` with `topics` and consumer group `group`.
pub fn stream_env(db: &TestDb, topics: &invoice::config::Topics, group: &str) -> HashMap<String, String> {
    let mut env = base_env(&db.url);
    env.insert("APP_ENV_INVOICE_TOPIC_PAYMENT".into(), topics.payment.clone());
    env.insert("APP_ENV_INVOICE_TOPIC_MERCHANT_CDC".into(), topics.merchant_cdc.clone());
    env.insert("APP_ENV_INVOICE_TOPIC_EVENTS".into(), topics.events.clone());
    env.insert("APP_ENV_INVOICE_TOPIC_DEADLETTER".into(), topics.deadletter.clone());
    env.insert("APP_ENV_INVOICE_KAFKA_GROUP_ID".into(), group.to_owned());
    env.insert("APP_ENV_INVOICE_KAFKA_SESSION_TIMEOUT_MS".into(), "6000".into());
    env
}

impl TestStream {
    /// Starts the stream with `env` (see [`stream_env`]).
    pub async fn spawn(env: &HashMap<String, String>) -> TestStream {
        init_logs();
        let cfg = Config::from_source(env, Mode::Stream).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(invoice::app::run_stream(cfg, listener, shutdown.clone()));
        TestStream { addr, shutdown, task }
    }

    /// The Prometheus text of its registry.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr)).await.unwrap().text().await.unwrap()
    }

    /// Graceful stop.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// The value of the first sample of `metric` whose labels contain every `label="value"` in
/// `labels`, or 0.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Inserts a live provider configuration for `merchant_id` (credentials sealed with the
/// test key), as the API will.
pub async fn insert_provider_config(db: &TestDb, merchant_id: &str, id: i64) {
    insert_provider_config_at(db, merchant_id, id, "http://127.0.0.1:9/api").await;
}

/// As [`insert_provider_config`], with the provider at `endpoint` (e.g. a [`TestSim`]).
pub async fn insert_provider_config_at(db: &TestDb, merchant_id: &str, id: i64, endpoint: &str) {
    let keyring = invoice::crypto::Keyring::new(invoice::config::Secret::new({
        let mut key = [0u8; 32];
        hex::decode_to_slice(TEST_KEY, &mut key).unwrap();
        key
    }));
    let sealed = keyring.seal(
        br#"{"username":"u","password":"p"}"#,
        &invoice::storage::seed::provider_config_aad(merchant_id, id),
    );
    sqlx::query(
        "INSERT INTO provider_config (id, merchant_id, provider, endpoint, supplier_tax_code, template_code, series,
             credentials_ciphertext, credentials_nonce, key_id, created_by)
         VALUES ($1, $2, 'viettel', $6, '0100109106', '1/001', 'C26TAA', $3, $4, $5, 'test')",
    )
    .bind(id)
    .bind(merchant_id)
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .bind(&sealed.key_id)
    .bind(endpoint)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// The provider simulator running in this process on an ephemeral port.
pub struct TestSim {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state (counters, knobs).
    pub sim: invoice::providers::sim::Sim,
    shutdown: CancellationToken,
}

impl TestSim {
    /// Starts a simulator with `knobs`.
    pub async fn spawn(knobs: invoice::providers::sim::Knobs) -> TestSim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sim = invoice::providers::sim::Sim::new(knobs);
        let shutdown = CancellationToken::new();
        tokio::spawn(invoice::providers::sim::serve(listener, sim.clone(), shutdown.clone()));
        TestSim { addr, sim, shutdown }
    }

    /// The API base URL to put in a provider configuration.
    pub fn endpoint(&self) -> String {
        format!("http://{}/services/einvoiceapplication/api", self.addr)
    }

    /// Its counters.
    pub fn stats(&self) -> invoice::providers::sim::Stats {
        self.sim.stats()
    }

    /// Changes knobs at run time, through its HTTP endpoint as an operator would.
    pub async fn knobs(&self, changes: serde_json::Value) {
        let response = reqwest::Client::new()
            .put(format!("http://{}/sim/knobs", self.addr))
            .json(&changes)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "knobs refused: {}", response.text().await.unwrap());
    }
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The environment of stream and workers on `db` and `topics`, sharing a private queue
/// prefix, with timings shrunk from minutes to a few hundred milliseconds.
pub fn issuance_env(db: &TestDb, topics: &invoice::config::Topics, group: &str) -> HashMap<String, String> {
    let mut env = stream_env(db, topics, group);
    for (k, v) in [
        ("QUEUE_PREFIX", unique("iq-t-")),
        ("QUEUE_LEASE_MS", "2000".into()),
        ("QUEUE_BACKOFF_BASE_MS", "50".into()),
        ("QUEUE_BACKOFF_CAP_MS", "400".into()),
        ("SWEEP_INTERVAL_MS", "500".into()),
        ("PROVIDER_TIMEOUT_MS", "1500".into()),
        ("PROVIDER_SAFE_WAIT_MS", "300".into()),
        ("PROVIDER_LOOKUP_INTERVAL_MS", "300".into()),
        ("WORKER_CONCURRENCY", "32".into()),
    ] {
        env.insert(format!("APP_ENV_INVOICE_{k}"), v);
    }
    env
}

/// `invoice worker` running in this process, through the production `run_worker`.
pub struct TestWorker {
    /// Where its health/metrics listener is.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestWorker {
    /// Starts a worker with `env` (a fresh worker id is drawn).
    pub async fn spawn(env: &HashMap<String, String>) -> TestWorker {
        init_logs();
        let mut env = env.clone();
        env.insert("APP_ENV_INVOICE_WORKER_ID".into(), next_worker_id().to_string());
        let cfg = Config::from_source(&env, Mode::Worker).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(invoice::app::run_worker(cfg, listener, shutdown.clone()));
        TestWorker { addr, shutdown, task }
    }

    /// The Prometheus text of its registry.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr)).await.unwrap().text().await.unwrap()
    }

    /// Graceful stop.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// The queue of `env` (same Redis and prefix as its workers).
pub fn queue_of(env: &HashMap<String, String>) -> invoice::queue::Queue {
    let cfg = Config::from_source(env, Mode::Tool).unwrap();
    invoice::app::queue(&cfg).unwrap()
}

/// Deletes every Redis key of the queue prefix in `env`: what FLUSHALL does to this test's
/// queue, without touching the queues of tests running beside it.
pub async fn wipe_queue(env: &HashMap<String, String>) -> usize {
    let prefix = env.get("APP_ENV_INVOICE_QUEUE_PREFIX").unwrap().clone();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
    }
    keys.len()
}

/// Stores a merchant's TaxInfo directly (as the CDC consumer would), for tests about payments.
pub async fn insert_merchant(db: &TestDb, merchant_id: &str, tax: &serde_json::Value) {
    let canonical = invoice::domain::tax_info::canonicalize(tax);
    let info = invoice::domain::tax_info::parse(tax).unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    invoice::storage::merchants::upsert(
        &mut conn,
        merchant_id,
        Some("Test shop"),
        &canonical,
        &info,
        &invoice::domain::tax_info::CdcPosition { lsn: Some(1), ts_ms: Some(1) },
        invoice::storage::merchants::Source { topic: "test", partition: 0, offset: 0 },
    )
    .await
    .unwrap();
}
