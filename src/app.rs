//! Wiring: builds the shared clients for a mode and runs it until the shutdown token is
//! cancelled. `main` and the integration tests both come through here, so tests exercise
//! the production path.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::producer::FutureProducer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::crypto::Keyring;
use crate::http::{self, HttpState};
use crate::ids::SystemClock;
use crate::metrics::Metrics;
use crate::storage::{self, workers};

/// How long start-up waits for Postgres before giving up with an error naming it.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

/// Resolves on SIGTERM or SIGINT and cancels `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
                    _ = token.cancelled() => return,
                }
            }
            _ => {
                tracing::error!("Cannot install signal handlers; only an internal stop will shut down");
                token.cancelled().await;
                return;
            }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = token.cancelled() => return,
        }
    }
    token.cancel();
}

/// Opens the Postgres pool and waits (bounded) until it answers.
pub async fn database(cfg: &Config, application_name: &str) -> anyhow::Result<sqlx::PgPool> {
    let pool = storage::pool(cfg.database_url.expose(), application_name, cfg.database_max_connections)?;
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    loop {
        match storage::ping(&pool).await {
            Ok(()) => return Ok(pool),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "Postgres is not answering yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context("Postgres (APP_ENV_INVOICE_DATABASE_URL) did not answer"))
            }
        }
    }
}

/// The Redis pool (connections are opened on first use). Bounded waits everywhere: a Redis
/// that does not answer must fail the operation (readiness, the sweeper and leases take it
/// from there), never hang it.
pub fn redis(cfg: &Config) -> anyhow::Result<deadpool_redis::Pool> {
    let mut redis = deadpool_redis::Config::from_url(cfg.redis_url.expose().as_str());
    let bound = Some(Duration::from_secs(5));
    redis.pool = Some(deadpool_redis::PoolConfig {
        timeouts: deadpool_redis::Timeouts { wait: bound, create: bound, recycle: bound },
        ..deadpool_redis::PoolConfig::default()
    });
    redis
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .context("APP_ENV_INVOICE_REDIS_URL: cannot build a Redis pool")
}

/// The issuance queue on the Redis of the configuration.
pub fn queue(cfg: &Config) -> anyhow::Result<crate::queue::Queue> {
    Ok(crate::queue::Queue::new(redis(cfg)?, cfg.queue_partitions, &cfg.issuance.queue_prefix))
}

/// The providers, with the client settings of the configuration.
pub fn providers(cfg: &Config) -> anyhow::Result<crate::providers::Registry> {
    Ok(crate::providers::Registry::new(&crate::providers::viettel::Settings {
        timeout: cfg.issuance.provider_timeout,
        concurrency_per_series: cfg.issuance.series_concurrency,
        max_idle_per_host: cfg.issuance.concurrency,
        allow_private_networks: cfg.issuance.allow_private_networks,
    })?)
}

/// What the issuance workers need, for a process whose role is `mode`.
pub fn issuance_deps(
    cfg: &Config,
    db: sqlx::PgPool,
    metrics: Metrics,
    ids: crate::ids::Snowflake,
    mode: &str,
) -> anyhow::Result<crate::issuance::Deps> {
    let providers = providers(cfg)?;
    metrics.issuance.providers(providers.names());
    Ok(crate::issuance::Deps {
        db,
        ids,
        queue: queue(cfg)?,
        providers,
        keyring: keyring(cfg),
        metrics,
        settings: cfg.issuance.clone(),
        events_topic: cfg.topics.events.clone(),
        identity: format!("{mode}-{}@{}", cfg.worker_id, hostname()),
    })
}

/// A Kafka producer with the settings every output of ours needs: idempotence (no
/// duplicates from internal retries) and acks from all in-sync replicas.
pub fn kafka_producer(cfg: &Config) -> anyhow::Result<FutureProducer> {
    cfg.kafka
        .client_config()
        .set("client.id", format!("{}-{}", cfg.service_code, cfg.worker_id))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        // A send ends within 25 s, delivered or failed (librdkafka's default is 5 minutes):
        // the relay's pass, and so a pod's shutdown, is bounded by it; an undelivered row
        // stays in the outbox and goes out on a later pass.
        .set("message.timeout.ms", "25000")
        .create()
        .context("APP_ENV_INVOICE_KAFKA_BROKERS: cannot build a Kafka producer")
}

/// The credentials keyring.
pub fn keyring(cfg: &Config) -> Keyring {
    let keyring = Keyring::new(cfg.credentials_key.clone());
    match &cfg.credentials_key_previous {
        Some(previous) => keyring.with_retired(previous.clone()),
        None => keyring,
    }
}

/// What every long-running mode starts with: metrics, the Postgres pool and the leased
/// snowflake worker id.
struct Base {
    metrics: Metrics,
    db: sqlx::PgPool,
    lease: workers::WorkerLease,
}

/// With `worker_id_auto`, `cfg.worker_id` is set to the leased id (it names the process in
/// Kafka client ids and audit actors).
async fn start(cfg: &mut Config, mode: &str) -> anyhow::Result<Base> {
    let metrics = Metrics::new();
    metrics.running(mode);
    if cfg.kafka.password_in_clear() {
        tracing::warn!(
            "Kafka SASL/PLAIN over sasl_plaintext: the password crosses the network unencrypted; use sasl_ssl"
        );
    }
    let db = database(cfg, &format!("invoice-{mode}")).await?;
    let holder = format!("{mode}@{}", hostname());
    let url = cfg.database_url.expose();
    let lease = if cfg.worker_id_auto {
        workers::acquire_any(url, &holder, Arc::new(SystemClock), metrics.clone()).await?
    } else {
        match workers::acquire(url, cfg.worker_id, &holder, Arc::new(SystemClock), metrics.clone()).await {
            // One configuration shared by several processes (api, stream and worker started
            // from one .env, or two replicas) is common; refusing the second would turn a
            // harmless setup into an outage, and sharing the id would duplicate ids.
            Err(workers::LeaseError::Taken { worker_id }) => {
                let lease =
                    workers::acquire_any(url, &holder, Arc::new(SystemClock), metrics.clone()).await?;
                tracing::warn!(
                    configured = worker_id,
                    leased = lease.ids.worker_id(),
                    "snowflake worker id APP_ENV_INVOICE_WORKER_ID is held by another live process; this one uses the lowest free id instead (set a distinct id per process, or auto)"
                );
                lease
            }
            other => other?,
        }
    };
    cfg.worker_id = lease.ids.worker_id();
    Ok(Base { metrics, db, lease })
}

/// The HTTP state of a mode; only `api` (and `all`) serve the `/v1/api` routes.
fn http_state(
    cfg: &Config,
    base: &Base,
    kafka: FutureProducer,
    api: Option<Arc<http::Api>>,
) -> anyhow::Result<Arc<HttpState>> {
    Ok(Arc::new(HttpState {
        metrics: base.metrics.clone(),
        readiness: http::health::Readiness::new(base.db.clone(), redis(cfg)?, kafka, cfg.ready_timeout),
        api,
        in_flight: tokio::sync::Semaphore::new(http::server::MAX_IN_FLIGHT),
    }))
}

/// The dependencies of the `/v1/api` routes. Starts loading the JWKS (and keeps it fresh
/// until `stop`) without waiting: until the first load succeeds, JWT routes answer 503.
fn api_deps(cfg: &Config, base: &Base, stop: &CancellationToken) -> anyhow::Result<Arc<http::Api>> {
    let auth_cfg = cfg.http_auth.as_ref().context("the HTTP API needs its webhook and JWT settings")?;
    for name in &auth_cfg.weak_webhook_secrets {
        tracing::warn!(
            variable = %name,
            "Webhook secret shorter than 24 bytes; the Standard Webhooks scheme asks for 24-64 random bytes"
        );
    }
    for name in &auth_cfg.internal_secrets_shared {
        tracing::warn!(
            variable = %name,
            "Internal webhook secret equals a merchant webhook secret: whoever holds the merchant secret can also send internal operations (cancel invoices); give internal senders a secret of their own"
        );
    }
    if crate::config::plain_http_off_loopback(&auth_cfg.jwks_url) {
        tracing::warn!(
            "JWKS fetched over plain HTTP from another host: anyone on the path can substitute keys and mint tokens; use https"
        );
    }
    let mut jwt = crate::auth::jwt::Settings::new(
        auth_cfg.jwks_url.clone(),
        auth_cfg.jwt_issuer.clone(),
        auth_cfg.jwt_audience.clone(),
    );
    jwt.refetch_cooldown = auth_cfg.jwks_refetch_cooldown;
    let auth = crate::auth::jwt::Authenticator::new(jwt, base.metrics.clone())?;
    let loader = auth.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        loader.refresh("startup").await;
        loader.run_refresh(stop).await;
    });
    Ok(Arc::new(http::Api {
        db: base.db.clone(),
        queue: queue(cfg)?,
        keyring: keyring(cfg),
        ids: base.lease.ids.clone(),
        events_topic: cfg.topics.events.clone(),
        merchant_webhooks: crate::auth::webhook::Verifier::new(
            &auth_cfg.webhook_secret,
            auth_cfg.webhook_secret_previous.as_ref(),
        ),
        internal_webhooks: crate::auth::webhook::Verifier::new(
            &auth_cfg.webhook_internal_secret,
            auth_cfg.webhook_internal_secret_previous.as_ref(),
        ),
        auth,
        claim_limiter: http::rate_limit::FailureLimiter::new(
            auth_cfg.claim_failure_limit,
            Duration::from_secs(600),
        ),
        trusted_proxies: auth_cfg.trusted_proxies.clone(),
        allow_private_networks: cfg.issuance.allow_private_networks,
        metrics: base.metrics.clone(),
    }))
}

/// Binds the HTTP address of the configuration, naming the variable on failure.
///
/// `metrics_only` modes (`stream`, `worker`) serve only health and metrics: when the address
/// is the default one and already taken (a `stream` and a `worker` started side by side on
/// one machine), they take a free port on the same interface and say which, instead of
/// exiting. An address that was configured is always kept or refused.
pub async fn bind(cfg: &Config, metrics_only: bool) -> anyhow::Result<TcpListener> {
    let refused = |e: std::io::Error| {
        anyhow::anyhow!("APP_ENV_INVOICE_HTTP_ADDR {}: cannot listen: {e}", cfg.http_addr)
    };
    match TcpListener::bind(cfg.http_addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if metrics_only && cfg.http_addr_is_default && e.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = TcpListener::bind((cfg.http_addr.ip(), 0)).await.map_err(refused)?;
            if let Ok(addr) = listener.local_addr() {
                tracing::warn!(
                    taken = %cfg.http_addr, listening = %addr,
                    "The default HTTP address is taken; health and metrics are served on a free port (set APP_ENV_INVOICE_HTTP_ADDR to choose one)"
                );
            }
            Ok(listener)
        }
        Err(e) => Err(refused(e)),
    }
}

/// Runs the HTTP API on `listener` until `shutdown` is cancelled.
pub async fn run_api(
    mut cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let base = start(&mut cfg, "api").await?;
    let producer = kafka_producer(&cfg)?;
    let background_stop = CancellationToken::new();
    let api = api_deps(&cfg, &base, &background_stop)?;
    let state = http_state(&cfg, &base, producer.clone(), Some(api))?;
    let Base { metrics, db, lease } = base;
    let lease_lost = stop_when_lease_lost(&lease, &shutdown);
    // The API writes outbox rows too (claimed, cancelled): a relay must run somewhere, and
    // an API-only deployment has no other process (one leader at a time, advisory lock).
    let (relay_stop, relay) = spawn_relay(&cfg, &db, &producer, &metrics);
    tracing::info!(addr = %listener.local_addr()?, worker_id = cfg.worker_id, "Serving the HTTP API");
    http::server::serve(listener, state, shutdown).await;
    background_stop.cancel();
    relay_stop.cancel();
    let relay_result = relay_outcome(relay.await);
    lease.release().await;
    db.close().await;
    tracing::info!("API stopped");
    relay_result.and(lease_outcome(&lease_lost))
}

/// Stops the mode (through `shutdown`) when its worker-id lease is gone for good: with ids
/// refused it can decide, issue and accept nothing, while it would still look alive.
/// Returns the token to ask [`lease_outcome`] with.
fn stop_when_lease_lost(lease: &workers::WorkerLease, shutdown: &CancellationToken) -> CancellationToken {
    let lost = lease.lost();
    let (watched, stop) = (lost.clone(), shutdown.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = watched.cancelled() => stop.cancel(),
            _ = stop.cancelled() => {}
        }
    });
    lost
}

/// An error (a non-zero exit, so the orchestrator restarts the process) if the mode stopped
/// because its worker-id lease was lost.
fn lease_outcome(lost: &CancellationToken) -> anyhow::Result<()> {
    if lost.is_cancelled() {
        anyhow::bail!(
            "the snowflake worker-id lease was lost (another process holds the id, or it could not be re-acquired within {} s); stopped so that a restart leases an id",
            workers::LOST_AFTER.as_secs()
        );
    }
    Ok(())
}

/// What the stream's tasks need, for a process whose role is `mode`.
fn stream_deps(
    cfg: &Config,
    db: &sqlx::PgPool,
    lease: &workers::WorkerLease,
    metrics: &Metrics,
    mode: &str,
) -> anyhow::Result<crate::stream::Deps> {
    metrics.input_topics(&[&cfg.topics.payment, &cfg.topics.merchant_cdc]);
    Ok(crate::stream::Deps {
        db: db.clone(),
        ids: lease.ids.clone(),
        metrics: metrics.clone(),
        topics: cfg.topics.clone(),
        group_id: cfg.kafka_group_id.clone(),
        kafka: cfg.kafka.clone(),
        client_id: format!("{}-{mode}-{}", cfg.service_code, cfg.worker_id),
        settings: crate::stream::Settings {
            batch_max: cfg.stream_batch_max,
            batch_linger: cfg.stream_batch_linger,
            stall_after: cfg.stream_stall_after,
            session_timeout: cfg.kafka_session_timeout,
            consumer_wording: cfg.issuance.consumer_wording,
            work_deadline: cfg.db_work_timeout,
            ..crate::stream::Settings::default()
        },
        queue: Some(queue(cfg)?),
    })
}

/// Runs the stream processor (and the outbox relay, and an HTTP listener for health,
/// readiness and metrics) until `shutdown` is cancelled.
pub async fn run_stream(
    mut cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let base = start(&mut cfg, "stream").await?;
    let producer = kafka_producer(&cfg)?;
    let state = http_state(&cfg, &base, producer.clone(), None)?;
    let Base { metrics, db, lease } = base;
    let lease_lost = stop_when_lease_lost(&lease, &shutdown);
    let deps = stream_deps(&cfg, &db, &lease, &metrics, "stream")?;
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(http::server::serve(listener, state, http_stop.clone()));
    let (relay_stop, relay) = spawn_relay(&cfg, &db, &producer, &metrics);
    tracing::info!(group = %cfg.kafka_group_id, worker_id = cfg.worker_id, "Stream starting");
    let result = crate::stream::run(deps, shutdown).await;
    // The relay goes last so that what the final batches wrote is published if it can be.
    relay_stop.cancel();
    let relay_result = relay_outcome(relay.await);
    http_stop.cancel();
    let _ended = http.await;
    lease.release().await;
    db.close().await;
    tracing::info!("Stream stopped");
    result.and(relay_result).and(lease_outcome(&lease_lost))
}

/// Runs the issuance workers, the sweeper and claim expiry (and an HTTP listener for health,
/// readiness and metrics) until `shutdown` is cancelled.
pub async fn run_worker(
    mut cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let base = start(&mut cfg, "worker").await?;
    let producer = kafka_producer(&cfg)?;
    let state = http_state(&cfg, &base, producer.clone(), None)?;
    let Base { metrics, db, lease } = base;
    let lease_lost = stop_when_lease_lost(&lease, &shutdown);
    let deps = issuance_deps(&cfg, db.clone(), metrics.clone(), lease.ids.clone(), "worker")?;
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(http::server::serve(listener, state, http_stop.clone()));
    // Workers write outbox rows too (issued, failed, claim expired): a relay publishes them.
    // Only one relay in the whole deployment is active at a time (advisory lock).
    let (relay_stop, relay) = spawn_relay(&cfg, &db, &producer, &metrics);
    let result = crate::issuance::run(deps, shutdown).await;
    relay_stop.cancel();
    let relay_result = relay_outcome(relay.await);
    http_stop.cancel();
    let _ended = http.await;
    lease.release().await;
    db.close().await;
    result.and(relay_result).and(lease_outcome(&lease_lost))
}

/// Runs the API, the stream processor, the workers and the relay in one process (`invoice
/// all`, for development and small installations).
pub async fn run_all(
    mut cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let base = start(&mut cfg, "all").await?;
    let producer = kafka_producer(&cfg)?;
    let background_stop = CancellationToken::new();
    let api = api_deps(&cfg, &base, &background_stop)?;
    let state = http_state(&cfg, &base, producer.clone(), Some(api))?;
    let Base { metrics, db, lease } = base;
    let lease_lost = stop_when_lease_lost(&lease, &shutdown);
    let stream_deps = stream_deps(&cfg, &db, &lease, &metrics, "all")?;
    let worker_deps = issuance_deps(&cfg, db.clone(), metrics.clone(), lease.ids.clone(), "all")?;
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(http::server::serve(listener, state, http_stop.clone()));
    let (relay_stop, relay) = spawn_relay(&cfg, &db, &producer, &metrics);
    let workers = tokio::spawn(crate::issuance::run(worker_deps, shutdown.clone()));
    tracing::info!(addr = %cfg.http_addr, worker_id = cfg.worker_id, "Running api + stream + worker");
    let stream_result = crate::stream::run(stream_deps, shutdown.clone()).await;
    // The stream may end on its own (an error): take the rest down with it.
    shutdown.cancel();
    background_stop.cancel();
    // A panicked worker task still lets the relay, the server, the lease and the pool stop.
    let worker_result = workers.await.map_err(|e| anyhow::anyhow!("worker task: {e}")).and_then(|r| r);
    relay_stop.cancel();
    let relay_result = relay_outcome(relay.await);
    http_stop.cancel();
    let _ended = http.await;
    lease.release().await;
    db.close().await;
    stream_result.and(worker_result).and(relay_result).and(lease_outcome(&lease_lost))
}

/// Starts the outbox relay (one leader per deployment: the others wait on its advisory lock);
/// cancel the token to stop it.
fn spawn_relay(
    cfg: &Config,
    db: &sqlx::PgPool,
    producer: &FutureProducer,
    metrics: &Metrics,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let rebuild_cfg = cfg.clone();
    let rebuild: crate::outbox::Rebuild =
        std::sync::Arc::new(move || kafka_producer(&rebuild_cfg).map_err(|error| format!("{error:#}")));
    let relay = tokio::spawn(crate::outbox::run(
        db.clone(),
        cfg.database_url.expose().clone(),
        producer.clone(),
        rebuild,
        metrics.clone(),
        stop.clone(),
    ));
    (stop, relay)
}

/// An error (a non-zero exit) if the relay's task ended abnormally (a panic).
fn relay_outcome(joined: Result<(), tokio::task::JoinError>) -> anyhow::Result<()> {
    joined.map_err(|error| anyhow::anyhow!("the outbox relay task ended abnormally: {error}"))
}

/// This host's name, for lease holders and client ids.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
        + &format!(":{}", std::process::id())
}
