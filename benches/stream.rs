//! End-to-end benchmark (`make bench`): pre-fills fresh topics on the local broker, runs the
//! production `run_stream` against them and measures how fast payments are decided and CDC
//! events applied or skipped, next to the ceiling of a bare rdkafka consumer reading the
//! same topic; then runs the production `run_worker` against the provider simulator and
//! measures invoices issued per second at 0 ms and 50 ms provider latency, and the latency
//! from payment to ISSUED at a steady event rate. For the decide and issue stages it also
//! gives the CPU time each payment or invoice cost, per process (service, Postgres, Redis,
//! Kafka): steadier than the rates on a shared machine. Writes `target/bench/e2e.json`.
//!
//! Needs the local stack (`make deps`). Sizes: `BENCH_EVENTS` (default 100 000 payments: at
//! 50 000 the decide stage lasted about two seconds, and Postgres' CPU per payment read some
//! 8 % above that of longer runs, as what a stage pays once weighs more in a short one),
//! `BENCH_CDC` (default 50 000 CDC events per path), `BENCH_PARTITIONS` (default 6),
//! `BENCH_ISSUE_SLOW` (default 20 000 invoices at 50 ms), `BENCH_RATE` (default 2 000
//! events/s) for `BENCH_STEADY_SECS` (default 15 s). `BENCH_STOP_AFTER=stream` (or `issue`) ends after
//! that stage (for profiling it), writing nothing. Last, Postgres' own ceiling for the stream's
//! writes: the same rows inserted by SQL alone, with nothing else running.
//! `BENCH_PG_STATEMENTS=1` prints, after each steady run, what each statement cost in it
//! (needs `pg_stat_statements` in the server's `shared_preload_libraries`). The run starts and
//! ends by timing a fixed piece of work (`machine_speed_ns`): the figures of two runs compare
//! only when those agree.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use invoice::config::{Config, Mode, Topics};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::writer::MakeWriterExt as _;

// The allocator of the `invoice` binary, so the benchmark measures what production runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PG: &str = "postgres://postgres@127.0.0.1:5432";
const BROKERS: &str = "127.0.0.1:9092";
/// The worker's counter of invoices it moved to ISSUED.
const ISSUED: &str = "invoice_issuance_transitions_total{status=\"ISSUED\"}";
const KEY: &str = "62656e63682d6f6e6c792d6b65792d62656e63682d6f6e6c792d6b65792d2121";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time (ms) used so far by each part of the machine, from `/proc` (Linux, like the
/// rest of the bench): this process (the services and the load generator), the provider
/// simulator (a process of its own: in production the provider is someone else's),
/// Postgres (its processes, and the children its postmaster reaped: backends and autovacuum
/// workers that exited), Redis (with its reaped children: AOF rewrites and snapshots) and
/// Kafka. A stage's difference divided by its work is what the work costs,
/// which the machine's noise moves less than a rate.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    service: f64,
    provider: f64,
    postgres: f64,
    redis: f64,
    kafka: f64,
}

impl Cpu {
    fn now() -> Cpu {
        // USER_HZ: 100 ticks a second on Linux.
        const MS_PER_TICK: f64 = 10.0;
        let me = std::process::id().to_string();
        let sim = SIM_PID.get().map(u32::to_string);
        let mut cpu = Cpu::default();
        let Ok(dir) = std::fs::read_dir("/proc") else { return cpu };
        for entry in dir.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let fields: Vec<f64> =
                stat[close + 1..].split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
            // After the name: state, ppid, …; utime, stime, cutime, cstime are fields 14–17.
            let ticks =
                |from: usize, to: usize| fields.get(from - 3..=to - 3).map_or(0.0, |f| f.iter().sum());
            let ms = MS_PER_TICK * ticks(14, 15);
            match &stat[open + 1..close] {
                _ if pid == me => cpu.service += ms,
                _ if sim.as_deref() == Some(pid.as_str()) => cpu.provider += ms,
                "postgres" => cpu.postgres += MS_PER_TICK * ticks(14, 17),
                // With its children: an AOF rewrite or snapshot forks one.
                "redis-server" => cpu.redis += MS_PER_TICK * ticks(14, 17),
                "java" => cpu.kafka += ms,
                _ => {}
            }
        }
        cpu
    }

    /// Milliseconds per unit of work since `before`, as a JSON object.
    fn per_unit_since(&self, before: Cpu, units: usize) -> serde_json::Value {
        let per = |now: f64, then: f64| ((now - then) / units.max(1) as f64 * 1000.0).round() / 1000.0;
        let parts = [
            ("service", per(self.service, before.service)),
            ("provider", per(self.provider, before.provider)),
            ("postgres", per(self.postgres, before.postgres)),
            ("redis", per(self.redis, before.redis)),
            ("kafka", per(self.kafka, before.kafka)),
        ];
        let total = (parts.iter().map(|(_, v)| v).sum::<f64>() * 1000.0).round() / 1000.0;
        let mut out = serde_json::Map::new();
        for (name, v) in parts {
            out.insert(name.to_owned(), json!(v));
        }
        out.insert("total".to_owned(), json!(total));
        serde_json::Value::Object(out)
    }
}

/// The simulator's pid, for [`Cpu`].
static SIM_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// `invoice provider-sim` in a process of its own (killed when dropped), driven over its
/// HTTP knobs and stats.
struct SimProcess {
    addr: std::net::SocketAddr,
    _child: tokio::process::Child,
}

impl SimProcess {
    async fn start() -> SimProcess {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_invoice"))
            .args(["provider-sim", "--addr", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the provider simulator starts");
        SIM_PID.set(child.id().unwrap_or(0)).ok();
        let sim = SimProcess { addr, _child: child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(sim.url("stats")).await.is_err() {
            assert!(Instant::now() < deadline, "the provider simulator did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sim
    }

    fn url(&self, what: &str) -> String {
        format!("http://{}/sim/{what}", self.addr)
    }

    async fn set_knobs(&self, knobs: serde_json::Value) {
        let status =
            reqwest::Client::new().put(self.url("knobs")).json(&knobs).send().await.unwrap().status();
        assert!(status.is_success(), "the simulator refused knobs {knobs}: {status}");
    }

    async fn stats(&self) -> invoice::providers::sim::Stats {
        reqwest::get(self.url("stats")).await.unwrap().json().await.unwrap()
    }
}

async fn produce_all(producer: &FutureProducer, topic: &str, messages: Vec<(String, String)>) {
    for chunk in messages.chunks(10_000) {
        let sends = chunk
            .iter()
            .map(|(k, v)| producer.send(FutureRecord::to(topic).key(k).payload(v), Duration::from_secs(60)));
        for r in join_all(sends).await {
            r.expect("produce");
        }
    }
}

fn tax(window: u64) -> serde_json::Value {
    json!({"taxCode": "0100109106", "legalName": "Công ty TNHH ABC", "address": "1 Tràng Tiền, Hà Nội",
           "invoiceEnabled": true, "issuanceMode": "immediate", "claimWindowMinutes": window, "provider": "viettel"})
}

fn cdc(merchant: &str, window: u64, lsn: i64) -> String {
    json!({"before": null, "after": {"id": merchant, "name": merchant, "metadata": json!({"tax": tax(window)}).to_string()},
           "source": {"lsn": lsn, "ts_ms": lsn}, "op": "u", "ts_ms": lsn})
    .to_string()
}

/// Seconds a bare consumer needs to read `n` messages of `topic` (the ceiling).
fn bare_consumer_secs(topic: &str, partitions: i32, n: usize) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", format!("bench-bare-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    // Connected first: the stream's rate does not count its start-up either.
    consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut read = 0;
    while read < n {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            read += 1;
        }
    }
    started.elapsed().as_secs_f64()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    let v: Option<Option<i64>> = sqlx::query_scalar(sql).fetch_optional(pool).await.unwrap();
    v.flatten().unwrap_or(0)
}

/// Where a stage's progress is read. A counter of the process doing the work costs the
/// database nothing; a `count(*)` of a growing table polled every few milliseconds took a
/// good part of the two cores it measures.
enum Progress<'a> {
    /// A cheap query (the stored offsets).
    Sql(&'a PgPool, String),
    /// A Prometheus counter series (exact text of its name and labels) at a metrics URL.
    Metric(&'a str, &'a str),
}

impl Progress<'_> {
    async fn read(&self) -> i64 {
        match self {
            Progress::Sql(pool, sql) => count(pool, sql).await,
            Progress::Metric(url, series) => {
                // Bounded: a worker that holds its port but never answers must fail the run.
                let scrape = async { reqwest::get(*url).await?.text().await };
                let text = tokio::time::timeout(Duration::from_secs(30), scrape)
                    .await
                    .expect("the service's metrics did not answer within 30 s")
                    .expect("the service's metrics");
                text.lines()
                    .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok()))
                    .map(|v| v as i64)
                    .unwrap_or(0)
            }
        }
    }
}

/// Ends a stage that stopped moving: a service that gave up (its warnings are on stderr)
/// must fail the benchmark within a minute, not leave it polling.
struct Stall {
    last: i64,
    since: Instant,
}

impl Default for Stall {
    fn default() -> Self {
        Stall { last: -1, since: Instant::now() }
    }
}

impl Stall {
    fn check(&mut self, progress: i64, target: i64) {
        if progress != self.last {
            self.last = progress;
            self.since = Instant::now();
        }
        assert!(
            self.since.elapsed() < Duration::from_secs(60),
            "benchmark stalled at {progress}/{target}: no progress for 60 s"
        );
    }
}

/// Seconds from the first to the `target`-th progress count, polling every 20 ms.
async fn measure(progress: &Progress<'_>, baseline: i64, target: i64) -> f64 {
    let mut first: Option<Instant> = None;
    let mut stall = Stall::default();
    loop {
        let c = progress.read().await - baseline;
        if c > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if c >= target {
            return first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0).max(0.001);
        }
        stall.check(c, target);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A drained backlog: its rate and what it cost.
struct Drained {
    per_sec: f64,
    /// CPU ms per unit of work by process (see [`Cpu`]), over the same window as the rate.
    cpu_ms: serde_json::Value,
}

/// Events per second while a pre-filled backlog drains: the progress made between the first
/// poll that sees any (so start-up and the group join are not counted) and the poll that sees
/// `target`, with the CPU used between the same two polls. Polls every 5 ms until the first
/// progress, then every 50 ms (each scrape of the service's metrics costs the service CPU).
async fn drain_rate(progress: &Progress<'_>, baseline: i64, target: i64) -> Drained {
    let mut first: Option<(Instant, i64, Cpu)> = None;
    let mut stall = Stall::default();
    loop {
        let c = progress.read().await - baseline;
        if c > 0 && first.is_none() {
            first = Some((Instant::now(), c, Cpu::now()));
        }
        if c >= target {
            let (at, seen, cpu_before) = first.unwrap_or((Instant::now(), 0, Cpu::now()));
            let secs = at.elapsed().as_secs_f64();
            assert!(
                secs > 0.05 && seen < target / 2,
                "the backlog drained within two polls ({seen} of {target} at the first): raise its size"
            );
            let units = (target - seen).max(1) as usize;
            let cpu_ms = Cpu::now().per_unit_since(cpu_before, units);
            return Drained { per_sec: units as f64 / secs, cpu_ms };
        }
        stall.check(c, target);
        let pause = if first.is_some() { 50 } else { 5 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Waits, at most two minutes, until `count_sql` counts nothing; otherwise says on stderr
/// that the next stage shares the machine with `what`.
async fn until_none(pool: &PgPool, count_sql: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if count(pool, count_sql).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("still busy after 2 minutes; the next stage shares the machine with {what}");
}

/// Waits until the outbox relay has published every event.
async fn outbox_drained(pool: &PgPool) {
    until_none(pool, "SELECT count(*) FROM outbox", "the outbox relay").await;
}

/// Whether to report per-statement costs of the steady runs (`BENCH_PG_STATEMENTS=1`).
fn statements_wanted() -> bool {
    std::env::var("BENCH_PG_STATEMENTS").as_deref() == Ok("1")
}

/// Forgets the statement statistics gathered so far (see [`print_statements`]).
async fn reset_statements(pool: &PgPool) {
    if statements_wanted() {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(pool).await.unwrap();
        sqlx::query("SELECT pg_stat_statements_reset()").execute(pool).await.unwrap();
    }
}

/// Prints the statements that took the most time since [`reset_statements`], per `payments`
/// (the steady run's): calls and rows per call show the batch sizes, and time per payment
/// where Postgres spends it (planning time only with `pg_stat_statements.track_planning`).
async fn print_statements(pool: &PgPool, payments: usize) {
    if !statements_wanted() {
        return;
    }
    let rows: Vec<(String, i64, i64, f64, i64, f64)> = sqlx::query_as(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 80), calls, rows, total_exec_time, plans,
                total_plan_time
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time + total_plan_time DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let n = payments.max(1) as f64;
    println!(
        "{:>9} {:>9} {:>8} {:>8} {:>9}  statement",
        "exec ms/p", "plan ms/p", "calls/p", "plans/p", "rows/call"
    );
    for (query, calls, rows, exec_ms, plans, plan_ms) in rows {
        let per_call = if calls > 0 { rows as f64 / calls as f64 } else { 0.0 };
        println!(
            "{:>9.4} {:>9.4} {:>8.3} {:>8.3} {per_call:>9.1}  {query}",
            exec_ms / n,
            plan_ms / n,
            calls as f64 / n,
            plans as f64 / n
        );
    }
}

/// Pays the previous stage's vacuum and analyze debt before the next stage starts (a manual
/// `VACUUM (ANALYZE)`, then waits until no autovacuum worker runs), so that a stage neither
/// shares the machine with it nor has its CPU charged with it. A stage's own debt is paid
/// after its window, as production pays it in the background.
async fn vacuum_before_stage(pool: &PgPool) {
    sqlx::query("VACUUM (ANALYZE)").execute(pool).await.unwrap();
    let workers = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'";
    until_none(pool, workers, "autovacuum").await;
}

/// The database's own ceiling for the stream stage: Postgres alone inserting the rows the
/// stream writes for a consumer payment (invoice, claim, audit row and two outbox rows, their
/// JSON sent as text and parsed per row as the stream's is), 1,000 payments per
/// transaction from `sessions` connections, in a scratch database, with no Kafka, no lookups
/// and no service on the CPU. Payments decided per second can at best approach it.
async fn write_ceiling(sample: &PgPool, sessions: usize, secs: u64) -> f64 {
    let (snapshot, lines): (String, String) =
        sqlx::query_as(
            "SELECT invoice_snapshot(config_snapshot, config_snapshot_digest)::text, lines::text FROM invoice LIMIT 1",
        )
            .fetch_one(sample)
            .await
            .unwrap();
    let after: String =
        sqlx::query_scalar("SELECT after::text FROM audit_log WHERE entity = 'invoice' LIMIT 1")
            .fetch_one(sample)
            .await
            .unwrap();
    let mut admin = PgConnection::connect(&format!("{PG}/postgres")).await.unwrap();
    sqlx::query("DROP DATABASE IF EXISTS invoice_ceiling WITH (FORCE)").execute(&mut admin).await.unwrap();
    sqlx::query("CREATE DATABASE invoice_ceiling").execute(&mut admin).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(sessions as u32)
        .connect(&format!("{PG}/invoice_ceiling"))
        .await
        .unwrap();
    invoice::storage::migrate(&pool).await.unwrap();
    // `CASE WHEN g > 0` keeps Postgres from parsing a parameter's JSON once for all rows: the
    // stream sends each row's lines and audit document. It sends each distinct config snapshot
    // once per batch (one per merchant), stored once and referenced by its digest, which the
    // one shared snapshot row here stands for.
    const STATEMENTS: [&str; 4] = [
        "WITH snapshot AS (
             INSERT INTO invoice_config_snapshot (digest, merchant_id, snapshot)
             VALUES (sha256('ceiling'::bytea), 'M-0', $3::jsonb) ON CONFLICT (digest) DO NOTHING)
         INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, payment_event_id, paid_at, currency,
             buyer_kind, lines, total_net, total_vat, total_amount, provider_config_id, config_snapshot_digest,
             transaction_uuid, next_attempt_at)
         SELECT $1 + g, 'M-' || g % 100, 'ORD-' || ($1 + g), 'QUEUED', 'immediate', 'ev-' || ($1 + g), now(), 'VND',
             'consumer', (CASE WHEN g > 0 THEN $2 END)::jsonb, 1000000, 100000, 1100000, 1 + g % 100,
             sha256('ceiling'::bytea), gen_random_uuid()::text, now()
         FROM generate_series(1, 1000) g",
        "INSERT INTO claim (id, invoice_id, merchant_id, order_id, token_hash, deadline, status)
         SELECT $1 + g, $1 + g, 'M-' || g % 100, 'ORD-' || ($1 + g), sha256(int8send($1 + g)),
             now() + interval '1 day', 'OPEN'
         FROM generate_series(1, 1000) g",
        "INSERT INTO audit_log (entity, entity_id, invoice_id, merchant_id, order_id, event_type, outcome, after, actor,
             reason)
         SELECT 'invoice', ($1 + g)::text, $1 + g, 'M-' || g % 100, 'ORD-' || ($1 + g), 'invoice.created', 'QUEUED',
             (CASE WHEN g > 0 THEN $2 END)::jsonb, 'stream', 'consumer buyer'
         FROM generate_series(1, 1000) g",
        "INSERT INTO outbox (event_id, topic, message_key, payload, headers, has_secret)
         SELECT gen_random_uuid(), 'events', convert_to('ORD-' || ($1 + g / 2), 'UTF8'), convert_to(repeat('x', 210), 'UTF8'),
             (CASE WHEN g > 0 THEN '{\"type\": \"invoice.created\"}' END)::jsonb, g % 2 = 0
         FROM generate_series(1, 2000) g",
    ];
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    // The JSON texts each statement takes after the base id, in order.
    let texts: std::sync::Arc<[Vec<String>; 4]> =
        std::sync::Arc::new([vec![lines, snapshot], vec![], vec![after], vec![]]);
    let tasks = (0..sessions as i64).map(|session| {
        let (pool, texts) = (pool.clone(), texts.clone());
        tokio::spawn(async move {
            let mut payments = 0i64;
            while Instant::now() < deadline {
                let base = session * 1_000_000_000 + payments;
                let mut tx = pool.begin().await.unwrap();
                for (sql, texts) in STATEMENTS.iter().zip(texts.iter()) {
                    let mut query = sqlx::query(sql).bind(base);
                    for text in texts {
                        query = query.bind(text.as_str());
                    }
                    query.execute(&mut *tx).await.unwrap();
                }
                tx.commit().await.unwrap();
                payments += 1000;
            }
            payments
        })
    });
    let written: i64 = join_all(tasks).await.into_iter().map(|r| r.unwrap()).sum();
    let rate = written as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    sqlx::query("DROP DATABASE invoice_ceiling WITH (FORCE)").execute(&mut admin).await.unwrap();
    rate
}

/// Deletes the run's queue keys: each run has its own prefix, and 50,000 leftover jobs per
/// run would make every later AOF rewrite of the shared Redis slower.
async fn delete_queue_keys(prefix: &str) {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await.unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Prints the stream's batch figures (how the time was spent).
async fn print_batch_metrics(url: &str) {
    print_metrics(
        url,
        "",
        &[
            "invoice_stream_batch_duration_seconds_sum",
            "invoice_stream_batch_duration_seconds_count",
            "invoice_stream_batch_messages_sum",
            "invoice_stream_transaction_retries_total",
            "invoice_kafka_offset_fenced_total",
        ],
    )
    .await;
}

/// The worker's time per batch phase so far (cumulative: compare two prints).
async fn print_worker_phases(url: &str) {
    print_metrics(
        url,
        "  ",
        &[
            "invoice_worker_batch_phase_seconds_sum",
            "invoice_worker_batch_phase_seconds_count{phase=\"read\"}",
            "invoice_worker_batch_jobs_sum",
        ],
    )
    .await;
}

/// Prints the lines of the metrics at `url` that start with one of `prefixes`.
async fn print_metrics(url: &str, indent: &str, prefixes: &[&str]) {
    let metrics = reqwest::get(url).await.unwrap().text().await.unwrap();
    for line in metrics.lines().filter(|l| prefixes.iter().any(|p| l.starts_with(p))) {
        println!("{indent}{line}");
    }
}

/// A service run that says on stderr why it ended early: the stage waiting on it only sees
/// its progress stop.
async fn said(run: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let result = run.await;
    if let Err(error) = &result {
        eprintln!("a service of the benchmark ended: {error:#}");
    }
    result
}

/// Starts `run_stream` as production does; returns its handle, its stop token and its
/// metrics URL.
async fn start_stream(
    env: &HashMap<String, String>,
) -> (tokio::task::JoinHandle<anyhow::Result<()>>, CancellationToken, String) {
    let cfg = Config::from_source(env, Mode::Stream).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(said(invoice::app::run_stream(cfg, listener, shutdown.clone())));
    (handle, shutdown, metrics_url)
}

fn payment(i: usize, merchants: usize, paid_at: &str) -> (String, String) {
    let order = format!("ORD-{i}");
    let v = json!({"eventId": format!("ev-{i}"), "orderId": order, "merchantId": format!("M-{}", i % merchants),
        "paidAt": paid_at, "currency": "VND", "totalAmount": "1100000",
        "items": [{"sku": "SKU-1", "name": "Cà phê sữa", "unit": "ly", "quantity": "2", "unitPrice": "500000", "vatRate": "10"}]});
    (order, v.to_string())
}

/// Produces `rate` payments per second for `secs` seconds (paidAt = the time of producing)
/// and waits until all are ISSUED; returns the offered rate, p50/p99 of paidAt → issued_at,
/// and the CPU per payment (see [`Cpu`]) from the first produced to the last issued.
#[allow(clippy::too_many_arguments)]
async fn steady_run(
    pool: &PgPool,
    issued: &Progress<'_>,
    producer: &FutureProducer,
    topic: &str,
    merchants: usize,
    rate: usize,
    secs: usize,
    first: usize,
) -> (f64, f64, f64, serde_json::Value) {
    let total = rate * secs;
    let issued_before = issued.read().await;
    let from = chrono::Utc::now();
    let cpu_before = Cpu::now();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    while sent < total {
        ticker.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
        let now = invoice::events::invoice_events::rfc3339(chrono::Utc::now());
        let batch: Vec<(String, String)> =
            (first + sent..first + due).map(|i| payment(i, merchants, &now)).collect();
        sent = due;
        for (k, v) in &batch {
            // Fire and forget within the tick: waiting for each ack would throttle the rate.
            let _ = producer.send_result(FutureRecord::to(topic).key(k).payload(v));
        }
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    measure(issued, issued_before, total as i64).await;
    let cpu_ms = Cpu::now().per_unit_since(cpu_before, total);
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT EXTRACT(EPOCH FROM issued_at - paid_at) * 1000 AS ms FROM invoice WHERE created_at >= $1) t",
    )
    .bind(from)
    .fetch_one(pool)
    .await
    .unwrap();
    print_phases(pool, from).await;
    (offered, p50, p99, cpu_ms)
}

/// Where the time of [`steady_run`]'s payments went, p50 / p99 of each phase: paidAt → the
/// stream's transaction that created the invoice (Kafka, the batch), → the first provider
/// call (the commit, the queue, the worker's take), → ISSUED (the call and the settlement);
/// and the second of the run whose payments waited longest, to tell a stall from a spread.
async fn print_phases(pool: &PgPool, from: chrono::DateTime<chrono::Utc>) {
    let phases: Vec<(String, f64, f64)> = sqlx::query_as(
        "WITH t AS (
             SELECT EXTRACT(EPOCH FROM i.created_at - i.paid_at) * 1000 AS decided,
                    EXTRACT(EPOCH FROM a.started_at - i.created_at) * 1000 AS taken,
                    EXTRACT(EPOCH FROM i.issued_at - a.started_at) * 1000 AS issued
             FROM invoice i
             JOIN LATERAL (SELECT started_at FROM issuance_attempt WHERE invoice_id = i.id ORDER BY id LIMIT 1) a ON true
             WHERE i.created_at >= $1)
         SELECT 'decided', percentile_cont(0.5) WITHIN GROUP (ORDER BY decided), percentile_cont(0.99) WITHIN GROUP (ORDER BY decided) FROM t
         UNION ALL
         SELECT 'taken', percentile_cont(0.5) WITHIN GROUP (ORDER BY taken), percentile_cont(0.99) WITHIN GROUP (ORDER BY taken) FROM t
         UNION ALL
         SELECT 'issued', percentile_cont(0.5) WITHIN GROUP (ORDER BY issued), percentile_cont(0.99) WITHIN GROUP (ORDER BY issued) FROM t",
    )
    .bind(from)
    .fetch_all(pool)
    .await
    .unwrap();
    let phases: Vec<String> =
        phases.iter().map(|(phase, p50, p99)| format!("{phase} {p50:.0} / {p99:.0}")).collect();
    let worst: Option<(f64, f64, i64)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM date_trunc('second', paid_at) - min(date_trunc('second', paid_at)) OVER ())::float8,
                (percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM issued_at - paid_at) * 1000))::float8,
                count(*)
         FROM invoice WHERE created_at >= $1 GROUP BY date_trunc('second', paid_at) ORDER BY 2 DESC LIMIT 1",
    )
    .bind(from)
    .fetch_optional(pool)
    .await
    .unwrap();
    println!("  phases, p50 / p99 ms: {}", phases.join(", "));
    if let Some((second, p99, n)) = worst {
        println!("  slowest second: {second:.0} s in, p99 {p99:.0} ms over its {n} payments");
    }
}

/// How fast the machine is at the moment: the time one core takes to parse a fixed JSON
/// document (a payment) into a `serde_json::Value`, code this project does not change. On the
/// shared development machine it moved by a quarter from one hour to the next, the same
/// binary's figures with it: runs compare only at similar values (measured at the start
/// and at the end of a run, and written to `e2e.json`).
fn machine_speed_ns() -> f64 {
    let document = r#"{"eventId":"ev-123456","orderId":"ORD-123456","merchantId":"M-56",
        "paidAt":"2026-11-24T10:15:00+07:00","currency":"VND","totalAmount":"1100000",
        "items":[{"sku":"SKU-1","name":"Cà phê sữa","unit":"ly","quantity":"2","unitPrice":"500000","vatRate":"10"}]}"#;
    let rounds = 200_000;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(
            serde_json::from_str::<serde_json::Value>(std::hint::black_box(document)).unwrap(),
        );
    }
    started.elapsed().as_nanos() as f64 / rounds as f64
}

fn with(env: &HashMap<String, String>, key: &str, value: &str) -> HashMap<String, String> {
    let mut env = env.clone();
    env.insert(key.to_owned(), value.to_owned());
    env
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to measure.
        return;
    }
    let speed_before = machine_speed_ns();
    println!("machine speed: {speed_before:.0} ns per reference parse");
    let events = env_usize("BENCH_EVENTS", 100_000);
    let cdc_events = env_usize("BENCH_CDC", 50_000);
    let partitions = env_usize("BENCH_PARTITIONS", 6) as i32;
    let merchants = 100;

    // A fresh database.
    let mut admin = PgConnection::connect(&format!("{PG}/postgres")).await.unwrap();
    sqlx::query("DROP DATABASE IF EXISTS invoice_bench WITH (FORCE)").execute(&mut admin).await.unwrap();
    sqlx::query("CREATE DATABASE invoice_bench").execute(&mut admin).await.unwrap();
    let url = format!("{PG}/invoice_bench");
    let pool = PgPool::connect(&url).await.unwrap();
    invoice::storage::migrate(&pool).await.unwrap();
    let mut key = [0u8; 32];
    hex::decode_to_slice(KEY, &mut key).unwrap();
    let keyring = invoice::crypto::Keyring::new(invoice::config::Secret::new(key));
    // The provider: the simulator, in a process of its own.
    let sim = SimProcess::start().await;
    let endpoint = format!("http://{}/services/einvoiceapplication/api", sim.addr);
    for m in 0..merchants {
        let id = format!("M-{m}");
        let mut conn = pool.acquire().await.unwrap();
        invoice::storage::merchants::upsert(
            &mut conn,
            &id,
            Some("Bench"),
            &invoice::domain::tax_info::canonicalize(&tax(1440)),
            &invoice::domain::tax_info::parse(&tax(1440)).unwrap(),
            &invoice::domain::tax_info::CdcPosition { lsn: Some(1), ts_ms: Some(1) },
            invoice::storage::merchants::Source { topic: "bench", partition: 0, offset: 0 },
        )
        .await
        .unwrap();
        let config_id = m as i64 + 1;
        let sealed = keyring.seal(
            br#"{"username":"bench","password":"bench"}"#,
            &invoice::storage::seed::provider_config_aad(&id, config_id),
        );
        sqlx::query(
            "INSERT INTO provider_config (id, merchant_id, provider, endpoint, supplier_tax_code, template_code, series,
                 credentials_ciphertext, credentials_nonce, key_id, created_by)
             VALUES ($1, $2, 'viettel', $6, '0100109106', '1/001', 'C26TAA', $3, $4, $5, 'bench')",
        )
        .bind(config_id)
        .bind(&id)
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(&sealed.key_id)
        .bind(&endpoint)
        .execute(&pool)
        .await
        .unwrap();
    }

    // Fresh topics.
    let prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let names = Topics::prefixed(&prefix);
    let mut specs = invoice::topics::specs(&names).unwrap();
    for s in &mut specs {
        s.partitions = partitions;
    }
    invoice::topics::apply(&invoice::config::Kafka::plaintext(BROKERS), &specs).await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    // Paid now: the claims the backlog opens are still open when the workers run (a backlog
    // of a past day would also measure the expiry of all its claims).
    let today = invoice::events::invoice_events::rfc3339(chrono::Utc::now());
    let payments: Vec<(String, String)> = (0..events).map(|i| payment(i, merchants, &today)).collect();
    let started = Instant::now();
    produce_all(&producer, &names.payment, payments).await;
    println!("produced {events} payments in {:.1}s", started.elapsed().as_secs_f64());
    let ceiling_secs = tokio::task::spawn_blocking({
        let topic = names.payment.clone();
        move || bare_consumer_secs(&topic, partitions, events)
    })
    .await
    .unwrap();

    let mut env: HashMap<String, String> = HashMap::from([
        ("APP_ENV_INVOICE_DATABASE_URL".into(), url.clone()),
        ("APP_ENV_INVOICE_WORKER_ID".into(), "1000".into()),
        ("APP_ENV_INVOICE_CREDENTIALS_KEY".into(), KEY.into()),
        ("APP_ENV_INVOICE_TOPIC_PAYMENT".into(), names.payment.clone()),
        ("APP_ENV_INVOICE_TOPIC_MERCHANT_CDC".into(), names.merchant_cdc.clone()),
        ("APP_ENV_INVOICE_TOPIC_EVENTS".into(), names.events.clone()),
        ("APP_ENV_INVOICE_TOPIC_DEADLETTER".into(), names.deadletter.clone()),
        ("APP_ENV_INVOICE_KAFKA_GROUP_ID".into(), format!("{prefix}-group")),
        ("APP_ENV_INVOICE_STREAM_BATCH_MAX".into(), env_usize("BENCH_BATCH", 1000).to_string()),
        ("APP_ENV_INVOICE_DATABASE_MAX_CONNECTIONS".into(), "24".into()),
        ("APP_ENV_INVOICE_QUEUE_PREFIX".into(), format!("{prefix}-iq")),
        (
            "APP_ENV_INVOICE_WORKER_CONCURRENCY".into(),
            env_usize("BENCH_WORKER_CONCURRENCY", 4096).to_string(),
        ),
        ("APP_ENV_INVOICE_WORKER_BATCH_MAX".into(), env_usize("BENCH_WORKER_BATCH", 256).to_string()),
        (
            "APP_ENV_INVOICE_PROVIDER_SERIES_CONCURRENCY".into(),
            env_usize("BENCH_SERIES_CONCURRENCY", 64).to_string(),
        ),
        // The provider simulator listens on loopback.
        ("APP_ENV_INVOICE_PROVIDER_ALLOW_PRIVATE_NETWORKS".into(), "true".into()),
    ]);
    // Any service setting can be tried from the bench's own environment
    // (`APP_ENV_INVOICE_STREAM_BATCH_LINGER_MS=20 make bench`); the run's names stay its own.
    for (key, value) in std::env::vars() {
        if key.starts_with("APP_ENV_INVOICE_") && !env.contains_key(&key) {
            env.insert(key, value);
        }
    }
    // Warnings and errors only: a stage whose service gave up says why instead of stalling.
    invoice::telemetry::init_with_writer(
        invoice::config::LogFormat::Text,
        std::io::stderr.with_max_level(tracing::Level::WARN),
    );
    let payment_offsets = format!(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offset WHERE topic = '{}'",
        names.payment
    );
    let cdc_offsets = format!(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offset WHERE topic = '{}'",
        names.merchant_cdc
    );
    // Each stage drains a backlog produced while no stream runs, as after an outage or a
    // deployment: the rate is the consumer's, not the producer's.
    let (stream, shutdown, payment_metrics) = start_stream(&env).await;
    let decided = drain_rate(&Progress::Sql(&pool, payment_offsets.clone()), 0, events as i64).await;
    let (decided_per_sec, decide_cpu_ms) = (decided.per_sec, decided.cpu_ms);
    print_batch_metrics(&payment_metrics).await;
    let invoices = count(&pool, "SELECT count(*) FROM invoice").await;
    assert_eq!(invoices, events as i64, "every payment became an invoice");
    shutdown.cancel();
    stream.await.unwrap().unwrap();

    // CDC skip path: updates whose tax equals the stored one.
    let skip: Vec<(String, String)> = (0..cdc_events)
        .map(|i| {
            let m = format!("M-{}", i % merchants);
            (m.clone(), cdc(&m, 1440, 10 + i as i64))
        })
        .collect();
    produce_all(&producer, &names.merchant_cdc, skip).await;
    vacuum_before_stage(&pool).await;
    let (stream, shutdown, _) = start_stream(&env).await;
    let skipped = drain_rate(&Progress::Sql(&pool, cdc_offsets.clone()), 0, cdc_events as i64).await;
    let skip_per_sec = skipped.per_sec;
    shutdown.cancel();
    stream.await.unwrap().unwrap();
    // CDC apply path: every update changes the tax.
    let apply: Vec<(String, String)> = (0..cdc_events)
        .map(|i| {
            let m = format!("M-{}", i % merchants);
            (m.clone(), cdc(&m, 1 + (i as u64 % 1000), 1_000_000 + i as i64))
        })
        .collect();
    produce_all(&producer, &names.merchant_cdc, apply).await;
    vacuum_before_stage(&pool).await;
    let (stream, shutdown, metrics_url) = start_stream(&env).await;
    let applied =
        drain_rate(&Progress::Sql(&pool, cdc_offsets.clone()), cdc_events as i64, cdc_events as i64).await;
    let apply_per_sec = applied.per_sec;

    println!(
        "decided {decided_per_sec:.0}/s (bare consumer {:.0}/s), CDC skip {skip_per_sec:.0}/s, CDC apply {apply_per_sec:.0}/s",
        events as f64 / ceiling_secs,
    );
    println!("CPU ms per payment decided: {decide_cpu_ms}");
    println!("CPU ms per CDC event skipped: {}, applied: {}", skipped.cpu_ms, applied.cpu_ms);
    print_batch_metrics(&metrics_url).await;

    if std::env::var("BENCH_STOP_AFTER").as_deref() == Ok("stream") {
        // Profiling the stream stage alone: nothing written to e2e.json.
        shutdown.cancel();
        stream.await.unwrap().unwrap();
        let ceiling = write_ceiling(&pool, partitions as usize, 10).await;
        println!("Postgres alone writing the stream's rows: {ceiling:.0} payments/s");
        clean_up(&names, &prefix).await;
        return;
    }

    // Issuance at 0 ms provider latency: the stream left `events` invoices QUEUED (and their
    // jobs in Redis); workers start now.
    let worker_cfg =
        Config::from_source(&with(&env, "APP_ENV_INVOICE_WORKER_ID", "1001"), Mode::Worker).unwrap();
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_metrics = format!("http://{}/metrics", worker_listener.local_addr().unwrap());
    let worker_stop = CancellationToken::new();
    vacuum_before_stage(&pool).await;
    let worker =
        tokio::spawn(said(invoice::app::run_worker(worker_cfg, worker_listener, worker_stop.clone())));
    let issued = drain_rate(&Progress::Metric(&worker_metrics, ISSUED), 0, events as i64).await;
    let (issued_fast_per_sec, issue_cpu_ms) = (issued.per_sec, issued.cpu_ms);
    println!("issued {issued_fast_per_sec:.0}/s at 0 ms");
    println!("CPU ms per invoice issued: {issue_cpu_ms}");
    let text = reqwest::get(&worker_metrics).await.unwrap().text().await.unwrap();
    for line in text.lines().filter(|l| {
        (l.starts_with("invoice_worker_batch_phase_seconds_sum")
            || l.starts_with("invoice_worker_batch_phase_seconds_count"))
            || l.starts_with("invoice_worker_batch_jobs_sum")
            || l.starts_with("invoice_worker_batch_jobs_count")
            || l.starts_with("invoice_provider_latency_seconds_sum")
            || l.starts_with("invoice_provider_latency_seconds_count")
    }) {
        println!("{line}");
    }
    worker_stop.cancel();
    worker.await.unwrap().unwrap();
    if std::env::var("BENCH_STOP_AFTER").as_deref() == Ok("issue") {
        shutdown.cancel();
        stream.await.unwrap().unwrap();
        drop(sim);
        clean_up(&names, &prefix).await;
        return;
    }

    // At 50 ms: new payments decided first, then workers start.
    let slow = env_usize("BENCH_ISSUE_SLOW", 20_000);
    sim.set_knobs(json!({"latencyMs": 50})).await;
    let batch: Vec<(String, String)> =
        (events..events + slow).map(|i| payment(i, merchants, &today)).collect();
    produce_all(&producer, &names.payment, batch).await;
    measure(&Progress::Sql(&pool, payment_offsets.clone()), events as i64, slow as i64).await;
    let worker_cfg =
        Config::from_source(&with(&env, "APP_ENV_INVOICE_WORKER_ID", "1002"), Mode::Worker).unwrap();
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_metrics = format!("http://{}/metrics", worker_listener.local_addr().unwrap());
    let worker_stop = CancellationToken::new();
    let worker =
        tokio::spawn(said(invoice::app::run_worker(worker_cfg, worker_listener, worker_stop.clone())));
    let issued = Progress::Metric(&worker_metrics, ISSUED);
    let issued_slow_per_sec = drain_rate(&issued, 0, slow as i64).await.per_sec;
    println!("issued {issued_slow_per_sec:.0}/s at 50 ms");
    print_worker_phases(&worker_metrics).await;

    // Steady load, provider at 0 ms: payment event produced (its paidAt) → ISSUED; at the
    // SPEC's rate, then at a lower one that shows the latency floor.
    sim.set_knobs(json!({"latencyMs": 0})).await;
    let steady_secs = env_usize("BENCH_STEADY_SECS", 15);
    let mut next_order = events + slow;
    let mut steady = Vec::new();
    // An upstream service's producer as librdkafka configures it by default (5 ms linger):
    // the backlog's 20 ms linger made every payment wait 20 ms before it left the bench, a
    // quarter of the median at 2,000/s, and none of it the service's.
    let steady_producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    for rate in [env_usize("BENCH_RATE", 2_000), env_usize("BENCH_RATE_LOW", 500)] {
        // Steady means steady: not while the relay still publishes the previous stage's
        // events and the database still vacuums after it.
        outbox_drained(&pool).await;
        vacuum_before_stage(&pool).await;
        reset_statements(&pool).await;
        let (offered, p50, p99, cpu_ms) = steady_run(
            &pool,
            &issued,
            &steady_producer,
            &names.payment,
            merchants,
            rate,
            steady_secs,
            next_order,
        )
        .await;
        print_statements(&pool, rate * steady_secs).await;
        println!("steady {offered:.0} events/s: payment → ISSUED p50 {p50:.1} ms, p99 {p99:.1} ms");
        println!("CPU ms per payment at that rate, decided and issued: {cpu_ms}");
        print_worker_phases(&worker_metrics).await;
        next_order += rate * steady_secs;
        steady.push((offered, p50, p99, cpu_ms));
    }
    let (offered, p50, p99, e2e_cpu_ms) = steady[0].clone();
    let (offered_low, p50_low, p99_low, e2e_low_cpu_ms) = steady[1].clone();
    let stats = sim.stats().await;
    assert_eq!(stats.duplicates, 0, "no duplicate at the provider: {stats:?}");
    worker_stop.cancel();
    worker.await.unwrap().unwrap();
    drop(sim);
    shutdown.cancel();
    stream.await.unwrap().unwrap();
    // Last, so that its gigabyte of WAL and its checkpoint weigh on no measured stage.
    let write_ceiling_per_sec = write_ceiling(&pool, partitions as usize, 10).await;
    println!("Postgres alone writing the stream's rows: {write_ceiling_per_sec:.0} payments/s");

    let speed_after = machine_speed_ns();
    println!("machine speed: {speed_after:.0} ns per reference parse");

    let report = json!({
        "machine_speed_ns": [speed_before.round(), speed_after.round()],
        "events": events,
        "partitions": partitions,
        "decided_per_sec": decided_per_sec.round(),
        "bare_consumer_per_sec": (events as f64 / ceiling_secs).round(),
        "pg_write_ceiling_per_sec": write_ceiling_per_sec.round(),
        "cdc_events": cdc_events,
        "cdc_per_sec": skip_per_sec.round(),
        "cdc_skip_per_sec": skip_per_sec.round(),
        "cdc_apply_per_sec": apply_per_sec.round(),
        "decide_cpu_ms_per_payment": decide_cpu_ms,
        "issued_per_sec": issued_fast_per_sec.round(),
        "issue_cpu_ms_per_invoice": issue_cpu_ms,
        "issued_per_sec_provider_50ms": issued_slow_per_sec.round(),
        "e2e_events_per_sec": offered.round(),
        "e2e_p50_ms": (p50 * 10.0).round() / 10.0,
        "e2e_p99_ms": (p99 * 10.0).round() / 10.0,
        "e2e_cpu_ms_per_payment": e2e_cpu_ms,
        "e2e_low_events_per_sec": offered_low.round(),
        "e2e_low_p50_ms": (p50_low * 10.0).round() / 10.0,
        "e2e_low_p99_ms": (p99_low * 10.0).round() / 10.0,
        "e2e_low_cpu_ms_per_payment": e2e_low_cpu_ms,
        "provider_calls": stats.creates,
        "provider_duplicates": stats.duplicates,
        "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
        "note": "one process runs stream, workers and load generator (peak_rss_mb is all of it); the provider simulator runs in its own process, its CPU is `provider`",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/e2e.json", text).unwrap();
    clean_up(&names, &prefix).await;
}

/// Deletes the run's topics and queue keys.
async fn clean_up(names: &Topics, prefix: &str) {
    let admin_topics = invoice::topics::admin_client(&invoice::config::Kafka::plaintext(BROKERS)).unwrap();
    let _ = admin_topics
        .delete_topics(
            &[&names.payment, &names.merchant_cdc, &names.events, &names.deadletter],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await;
    delete_queue_keys(&format!("{prefix}-iq")).await;
}
