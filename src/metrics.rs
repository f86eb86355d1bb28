//! Every Prometheus metric of the service, in one registry shared by all modes (SPEC §9).
//! Metric names are declared only here; callers record through methods named after what
//! happened, with label values from enums, so cardinality stays bounded (never an order id).

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The service's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    http_request_duration: HistogramVec,
    dependency_up: IntGaugeVec,
    build_info: IntGaugeVec,
    started: IntGauge,
    worker_id_lease_lost: IntCounterVec,
    consumer_lag: IntGaugeVec,
    consumer_offset: IntGaugeVec,
    consumer_lag_seconds: prometheus::GaugeVec,
    messages_consumed: IntCounterVec,
    decisions: IntCounterVec,
    cdc_updates: IntCounterVec,
    dead_lettered: IntCounterVec,
    rebalances: IntCounterVec,
    partition_stalls: IntCounterVec,
    offset_past_end: IntGaugeVec,
    fenced: IntCounterVec,
    offset_gaps: IntCounterVec,
    batch_duration: HistogramVec,
    batch_size: HistogramVec,
    claims: IntCounterVec,
    outbox_published: IntCounterVec,
    outbox_backlog: IntGauge,
    outbox_parked: IntGauge,
    stream_transaction_retries: IntCounterVec,
    /// The issuance queue, workers and providers.
    pub issuance: IssuanceMetrics,
    /// Webhooks, JWT authentication and claims of the HTTP API.
    pub api: ApiMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// A dependency checked by `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// PostgreSQL.
    Postgres,
    /// Redis.
    Redis,
    /// Kafka.
    Kafka,
}

impl Dependency {
    /// Label value and JSON key.
    pub fn as_str(self) -> &'static str {
        match self {
            Dependency::Postgres => "postgres",
            Dependency::Redis => "redis",
            Dependency::Kafka => "kafka",
        }
    }
}

impl Metrics {
    /// Creates and registers every metric.
    // Registration fails only on a duplicate name, which is a programming error caught by
    // the first test that builds the registry.
    #[allow(clippy::expect_used)]
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("invoice".into()), None).expect("the prefix is a valid metric name");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request duration by route template and status",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let dependency_up = IntGaugeVec::new(
            Opts::new("dependency_up", "1 if the dependency answered the last readiness check"),
            &["dependency"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labels carry the version and the running mode"),
            &["version", "mode"],
        )
        .expect("valid metric");
        let started =
            IntGauge::new("start_time_seconds", "Unix time the process started").expect("valid metric");
        let worker_id_lease_lost = IntCounterVec::new(
            Opts::new(
                "worker_id_lease_lost_total",
                "Times the snowflake worker-id lease connection was lost",
            ),
            &["worker_id"],
        )
        .expect("valid metric");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "kafka_consumer_lag",
                "High watermark minus the stored next offset, per topic and partition",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let consumer_offset = IntGaugeVec::new(
            Opts::new(
                "kafka_consumer_offset",
                "Next offset to process per partition, as stored in Postgres (the truth Kafka's committed offsets mirror)",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let consumer_lag_seconds = prometheus::GaugeVec::new(
            Opts::new("kafka_consumer_lag_seconds", "Age of the last processed message (0 when caught up)"),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let messages_consumed = IntCounterVec::new(
            Opts::new("kafka_messages_consumed_total", "Messages consumed, by topic and outcome"),
            &["topic", "outcome"],
        )
        .expect("valid metric");
        let decisions = IntCounterVec::new(
            Opts::new("decisions_total", "Issuance decisions by outcome and skip reason"),
            &["outcome", "reason"],
        )
        .expect("valid metric");
        let cdc_updates = IntCounterVec::new(
            Opts::new(
                "cdc_updates_total",
                "Merchant CDC events by outcome (applied, skipped, stale, deleted, ...)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let dead_lettered = IntCounterVec::new(
            Opts::new("dead_lettered_total", "Input messages sent to the dead-letter topic, by source topic"),
            &["topic"],
        )
        .expect("valid metric");
        let rebalances = IntCounterVec::new(
            Opts::new("kafka_rebalances_total", "Consumer group rebalance callbacks by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let partition_stalls = IntCounterVec::new(
            Opts::new(
                "kafka_partition_stalls_total",
                "Partitions with lag that made no progress and were recovered",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let offset_past_end = IntGaugeVec::new(
            Opts::new(
                "kafka_offset_past_end",
                "1 while a partition's stored offset is past the end of its log (topic recreated or truncated): messages below it are not decided, and lag reads 0",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let fenced = IntCounterVec::new(
            Opts::new(
                "kafka_offset_fenced_total",
                "Batches refused because another owner moved the stored offset",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let offset_gaps = IntCounterVec::new(
            Opts::new(
                "kafka_offset_gap_messages_total",
                "Payment messages skipped because the log no longer had them at the stored offset",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let batch_duration = HistogramVec::new(
            HistogramOpts::new("stream_batch_duration_seconds", "Time to decide and commit one batch")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["topic"],
        )
        .expect("valid metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("stream_batch_messages", "Messages per committed batch")
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0]),
            &["topic"],
        )
        .expect("valid metric");
        let claims = IntCounterVec::new(
            Opts::new("claims_total", "Claims by event (opened, claimed, expired)"),
            &["event"],
        )
        .expect("valid metric");
        let outbox_published = IntCounterVec::new(
            Opts::new("outbox_published_total", "Outbox messages published, by topic"),
            &["topic"],
        )
        .expect("valid metric");
        let outbox_backlog = IntGauge::new(
            "outbox_backlog",
            "Outbox messages not yet published (as of the relay's last pass)",
        )
        .expect("valid metric");
        let outbox_parked =
            IntGauge::new("outbox_parked", "Outbox messages parked after repeated publication failures")
                .expect("valid metric");
        let stream_transaction_retries = IntCounterVec::new(
            Opts::new(
                "stream_transaction_retries_total",
                "Batch transactions retried after a transient error",
            ),
            &["topic"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(consumer_lag.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(consumer_offset.clone()),
            Box::new(consumer_lag_seconds.clone()),
            Box::new(messages_consumed.clone()),
            Box::new(decisions.clone()),
            Box::new(cdc_updates.clone()),
            Box::new(dead_lettered.clone()),
            Box::new(rebalances.clone()),
            Box::new(partition_stalls.clone()),
            Box::new(offset_past_end.clone()),
            Box::new(fenced.clone()),
            Box::new(offset_gaps.clone()),
            Box::new(batch_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(claims.clone()),
            Box::new(outbox_published.clone()),
            Box::new(outbox_backlog.clone()),
            Box::new(outbox_parked.clone()),
            Box::new(stream_transaction_retries.clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        for collector in [
            Box::new(http_request_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(dependency_up.clone()),
            Box::new(build_info.clone()),
            Box::new(started.clone()),
            Box::new(worker_id_lease_lost.clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            // Process metrics (RSS, CPU, fds), prefixed like every metric of ours (SPEC §9):
            // `invoice_process_resident_memory_bytes` and so on.
            let process = prometheus::process_collector::ProcessCollector::for_self();
            registry.register(Box::new(process)).expect("registered once");
        }
        started.set(chrono::Utc::now().timestamp());
        let issuance = IssuanceMetrics::register(&registry);
        let api = ApiMetrics::register(&registry);
        Metrics {
            issuance,
            api,
            registry,
            http_request_duration,
            dependency_up,
            build_info,
            started,
            worker_id_lease_lost,
            consumer_lag,
            consumer_offset,
            consumer_lag_seconds,
            messages_consumed,
            decisions,
            cdc_updates,
            dead_lettered,
            rebalances,
            partition_stalls,
            offset_past_end,
            fenced,
            offset_gaps,
            batch_duration,
            batch_size,
            claims,
            outbox_published,
            outbox_backlog,
            outbox_parked,
            stream_transaction_retries,
        }
    }

    /// Marks the running mode in `invoice_build_info`, and creates the counters whose labels
    /// are known in advance at zero: a series that appears already at 1 hides its first
    /// increase from `rate()` and `increase()` (and from the alerts built on them).
    pub fn running(&self, mode: &str) {
        self.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), mode]).set(1);
        for outcome in ["applied", "skipped", "stale", "deleted", "already_deleted"] {
            let _zero = self.cdc_updates.with_label_values(&[outcome]);
        }
        for event in ["opened", "claimed", "expired"] {
            let _zero = self.claims.with_label_values(&[event]);
        }
        for status in ["ISSUED", "SUBMITTED", "FAILED"] {
            let _zero = self.issuance.settled.with_label_values(&[status]);
        }
    }

    /// Creates the per-input-topic counters at zero (see [`Metrics::running`]).
    pub fn input_topics(&self, topics: &[&str]) {
        for topic in topics {
            let _zero = self.dead_lettered.with_label_values(&[topic]);
        }
    }

    /// An HTTP request finished.
    pub fn http_request(&self, method: &str, route: &'static str, status: u16, elapsed: Duration) {
        self.http_request_duration
            .with_label_values(&[method, route, &status.to_string()])
            .observe(elapsed.as_secs_f64());
    }

    /// The result of one readiness probe of a dependency.
    pub fn dependency_checked(&self, dependency: Dependency, up: bool) {
        self.dependency_up.with_label_values(&[dependency.as_str()]).set(i64::from(up));
    }

    /// The connection holding the worker-id advisory lock dropped.
    pub fn worker_id_lease_lost(&self, worker_id: u16) {
        self.worker_id_lease_lost.with_label_values(&[&worker_id.to_string()]).inc();
    }

    /// Lag of a partition: high watermark − stored next offset, and the age of the last
    /// processed message; also the stored next offset itself (a stall shows as lag with an
    /// offset that does not move).
    pub fn partition_lag(&self, topic: &str, partition: i32, position: i64, messages: i64, seconds: f64) {
        let p = partition.to_string();
        self.consumer_offset.with_label_values(&[topic, &p]).set(position.max(0));
        self.consumer_lag.with_label_values(&[topic, &p]).set(messages.max(0));
        self.consumer_lag_seconds.with_label_values(&[topic, &p]).set(seconds.max(0.0));
    }

    /// Whether a partition's stored offset is past the end of its log (1) or not (0).
    pub fn partition_past_end(&self, topic: &str, partition: i32, past: bool) {
        self.offset_past_end.with_label_values(&[topic, &partition.to_string()]).set(i64::from(past));
    }

    /// A partition left this consumer: its lag series go away rather than freeze.
    pub fn partition_released(&self, topic: &str, partition: i32) {
        let p = partition.to_string();
        let _absent = self.consumer_lag.remove_label_values(&[topic, &p]);
        let _absent = self.consumer_offset.remove_label_values(&[topic, &p]);
        let _absent = self.consumer_lag_seconds.remove_label_values(&[topic, &p]);
        let _absent = self.offset_past_end.remove_label_values(&[topic, &p]);
    }

    /// Messages of a committed batch, by outcome (`processed`, `dead_lettered`, `tombstone`).
    pub fn consumed(&self, topic: &str, outcome: &'static str, count: u64) {
        if count > 0 {
            self.messages_consumed.with_label_values(&[topic, outcome]).inc_by(count);
        }
    }

    /// A committed issuance decision; `reason` is empty for a created invoice.
    pub fn decision(&self, outcome: &'static str, reason: &'static str) {
        self.decisions.with_label_values(&[outcome, reason]).inc();
    }

    /// A committed CDC event outcome.
    pub fn cdc_update(&self, outcome: &'static str) {
        self.cdc_updates.with_label_values(&[outcome]).inc();
    }

    /// Committed dead letters from `topic`.
    pub fn dead_lettered(&self, topic: &str, count: u64) {
        if count > 0 {
            self.dead_lettered.with_label_values(&[topic]).inc_by(count);
        }
    }

    /// A rebalance callback (`assign`, `revoke`, `error`).
    pub fn rebalance(&self, kind: &'static str) {
        self.rebalances.with_label_values(&[kind]).inc();
    }

    /// A stalled partition was recovered by the watchdog.
    pub fn partition_stalled(&self, topic: &str, partition: i32) {
        self.partition_stalls.with_label_values(&[topic, &partition.to_string()]).inc();
    }

    /// A batch was refused because the stored offset had moved.
    pub fn offset_fenced(&self, topic: &str, partition: i32) {
        self.fenced.with_label_values(&[topic, &partition.to_string()]).inc();
    }

    /// Messages between the stored offset and the first fetched one were gone.
    pub fn offset_gap(&self, topic: &str, partition: i32, messages: i64) {
        self.offset_gaps.with_label_values(&[topic, &partition.to_string()]).inc_by(messages.max(0) as u64);
    }

    /// A batch committed.
    pub fn batch_committed(&self, topic: &str, messages: usize, elapsed: Duration) {
        self.batch_duration.with_label_values(&[topic]).observe(elapsed.as_secs_f64());
        self.batch_size.with_label_values(&[topic]).observe(messages as f64);
    }

    /// A batch transaction failed transiently and will be retried.
    pub fn stream_transaction_retried(&self, topic: &str) {
        self.stream_transaction_retries.with_label_values(&[topic]).inc();
    }

    /// Claims opened, claimed or expired.
    pub fn claim(&self, event: &'static str, count: u64) {
        if count > 0 {
            self.claims.with_label_values(&[event]).inc_by(count);
        }
    }

    /// Outbox messages published to `topic`.
    pub fn outbox_published(&self, topic: &str, count: u64) {
        if count > 0 {
            self.outbox_published.with_label_values(&[topic]).inc_by(count);
        }
    }

    /// Outbox messages waiting.
    pub fn outbox_backlog(&self, count: i64) {
        self.outbox_backlog.set(count);
    }

    /// Outbox messages parked.
    pub fn outbox_parked(&self, count: i64) {
        self.outbox_parked.set(count);
    }

    /// The time this process started, as exported.
    pub fn start_time(&self) -> i64 {
        self.started.get()
    }

    /// All metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail on I/O; a malformed family would be our bug.
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "Failed to encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Metrics of the HTTP API's doors: webhooks, JWT authentication, claims (SPEC §9).
#[derive(Clone)]
pub struct ApiMetrics {
    webhook_requests: IntCounterVec,
    auth_failures: IntCounterVec,
    jwks_fetches: IntCounterVec,
    jwks_keys: IntGauge,
    jwks_last_success: IntGauge,
    claim_requests: IntCounterVec,
    rate_limited: IntCounterVec,
}

impl ApiMetrics {
    #[allow(clippy::expect_used)]
    fn register(registry: &Registry) -> ApiMetrics {
        let m = ApiMetrics {
            webhook_requests: IntCounterVec::new(
                Opts::new(
                    "webhook_requests_total",
                    "Webhook requests by endpoint, result (accepted, duplicate, rejected, invalid, refused, error) and reason",
                ),
                &["endpoint", "result", "reason"],
            )
            .expect("valid metric"),
            auth_failures: IntCounterVec::new(
                Opts::new("auth_failures_total", "Refused JWT-authorised requests by reason"),
                &["reason"],
            )
            .expect("valid metric"),
            jwks_fetches: IntCounterVec::new(
                Opts::new("jwks_fetches_total", "JWKS fetches by trigger (startup, refresh, unknown_kid) and outcome"),
                &["trigger", "outcome"],
            )
            .expect("valid metric"),
            jwks_keys: IntGauge::new("jwks_keys", "ES256 keys held from the JWKS").expect("valid metric"),
            jwks_last_success: IntGauge::new(
                "jwks_last_success_timestamp_seconds",
                "When the JWKS was last fetched successfully (alert when stale)",
            )
            .expect("valid metric"),
            claim_requests: IntCounterVec::new(
                Opts::new("claim_requests_total", "Claim endpoint answers by method and result"),
                &["method", "result"],
            )
            .expect("valid metric"),
            rate_limited: IntCounterVec::new(
                Opts::new("http_rate_limited_total", "Requests refused with 429 by route"),
                &["route"],
            )
            .expect("valid metric"),
        };
        for collector in [
            Box::new(m.webhook_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.auth_failures.clone()),
            Box::new(m.jwks_fetches.clone()),
            Box::new(m.jwks_keys.clone()),
            Box::new(m.jwks_last_success.clone()),
            Box::new(m.claim_requests.clone()),
            Box::new(m.rate_limited.clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        m
    }

    /// One webhook request's result.
    pub fn webhook(&self, endpoint: &'static str, result: &'static str, reason: &'static str) {
        self.webhook_requests.with_label_values(&[endpoint, result, reason]).inc();
    }

    /// A refused JWT-authorised request.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// A JWKS fetch; on success, the keys now held.
    pub fn jwks_fetch(&self, trigger: &'static str, keys: Option<usize>) {
        let outcome = if keys.is_some() { "ok" } else { "error" };
        self.jwks_fetches.with_label_values(&[trigger, outcome]).inc();
        if let Some(keys) = keys {
            self.jwks_keys.set(keys as i64);
            self.jwks_last_success.set(chrono::Utc::now().timestamp());
        }
    }

    /// One claim request's result.
    pub fn claim_request(&self, method: &'static str, result: &'static str) {
        self.claim_requests.with_label_values(&[method, result]).inc();
    }

    /// A 429.
    pub fn rate_limited(&self, route: &'static str) {
        self.rate_limited.with_label_values(&[route]).inc();
    }
}

/// Metrics of the issuance queue, workers and providers (SPEC §9).
#[derive(Clone)]
pub struct IssuanceMetrics {
    queue_depth: IntGaugeVec,
    dlq_depth: IntGaugeVec,
    queue_oldest_age: prometheus::GaugeVec,
    queue_jobs: IntCounterVec,
    lease_lost: prometheus::IntCounter,
    attempts: IntCounterVec,
    provider_latency: HistogramVec,
    retries: IntCounterVec,
    settled: IntCounterVec,
    swept: prometheus::IntCounter,
    sweeper_oldest_due: prometheus::Gauge,
    queue_errors: IntCounterVec,
    issue_latency: prometheus::Histogram,
    batch_phase: HistogramVec,
    batch_size: prometheus::Histogram,
    tax_authority_rejections: IntCounterVec,
    series_wait: prometheus::Histogram,
}

impl IssuanceMetrics {
    #[allow(clippy::expect_used)]
    fn register(registry: &Registry) -> IssuanceMetrics {
        let m = IssuanceMetrics {
            queue_depth: IntGaugeVec::new(
                Opts::new("queue_depth", "Issuance queue jobs per partition and state (waiting, delayed, active)"),
                &["partition", "state"],
            )
            .expect("valid metric"),
            dlq_depth: IntGaugeVec::new(Opts::new("dlq_depth", "Dead-lettered issuance jobs per partition in Redis (the newest 10,000; Postgres' FAILED invoices are the whole DLQ)"), &["partition"])
                .expect("valid metric"),
            queue_oldest_age: prometheus::GaugeVec::new(
                Opts::new("queue_oldest_age_seconds", "Age of the oldest waiting job per partition"),
                &["partition"],
            )
            .expect("valid metric"),
            queue_jobs: IntCounterVec::new(
                Opts::new(
                    "queue_jobs_total",
                    "Queue moves: enqueued, deduped, claimed, completed, retried, dead, reclaimed, promoted, requeued, released",
                ),
                &["event"],
            )
            .expect("valid metric"),
            lease_lost: prometheus::IntCounter::new(
                "queue_lease_lost_total",
                "Running jobs whose lease was lost (taken over after expiry)",
            )
            .expect("valid metric"),
            attempts: IntCounterVec::new(
                Opts::new("issuance_attempts_total", "Provider calls by provider, operation (create, lookup) and outcome"),
                &["provider", "operation", "outcome"],
            )
            .expect("valid metric"),
            provider_latency: HistogramVec::new(
                HistogramOpts::new("provider_latency_seconds", "Provider call duration by provider and operation")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 90.0]),
                &["provider", "operation"],
            )
            .expect("valid metric"),
            retries: IntCounterVec::new(
                Opts::new("issuance_retries_total", "Issuance retries scheduled, by provider and reason class"),
                &["provider", "class"],
            )
            .expect("valid metric"),
            settled: IntCounterVec::new(
                Opts::new("issuance_transitions_total", "Invoice state changes made by workers, by new status"),
                &["status"],
            )
            .expect("valid metric"),
            swept: prometheus::IntCounter::new(
                "sweeper_reenqueued_total",
                "Jobs the sweeper created for due invoices Redis did not hold",
            )
            .expect("valid metric"),
            sweeper_oldest_due: prometheus::Gauge::new(
                "sweeper_oldest_due_seconds",
                "How long the oldest due, unfinished invoice has been due (Postgres)",
            )
            .expect("valid metric"),
            queue_errors: IntCounterVec::new(
                Opts::new("queue_errors_total", "Redis errors by operation"),
                &["operation"],
            )
            .expect("valid metric"),
            issue_latency: prometheus::Histogram::with_opts(
                HistogramOpts::new("issuance_latency_seconds", "From first enqueue to ISSUED")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            )
            .expect("valid metric"),
            batch_phase: HistogramVec::new(
                HistogramOpts::new(
                    "worker_batch_phase_seconds",
                    "Time of each phase of a worker batch: read, take, calls, settle, queue",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 100.0]),
                &["phase"],
            )
            .expect("valid metric"),
            tax_authority_rejections: IntCounterVec::new(
                Opts::new(
                    "tax_authority_rejections_total",
                    "Issued invoices whose provider status says the tax authority rejected them (DIS_APPROVED)",
                ),
                &["provider"],
            )
            .expect("valid metric"),
            series_wait: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "provider_series_wait_seconds",
                    "Time a batch waited for the call slots of a (merchant, series): the per-series limit at work",
                )
                .buckets(vec![0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0]),
            )
            .expect("valid metric"),
            batch_size: prometheus::Histogram::with_opts(
                HistogramOpts::new("worker_batch_jobs", "Jobs per worker batch")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
            )
            .expect("valid metric"),
        };
        for collector in [
            Box::new(m.batch_phase.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.batch_size.clone()),
            Box::new(m.series_wait.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.dlq_depth.clone()),
            Box::new(m.queue_oldest_age.clone()),
            Box::new(m.queue_jobs.clone()),
            Box::new(m.lease_lost.clone()),
            Box::new(m.attempts.clone()),
            Box::new(m.provider_latency.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.settled.clone()),
            Box::new(m.swept.clone()),
            Box::new(m.sweeper_oldest_due.clone()),
            Box::new(m.queue_errors.clone()),
            Box::new(m.issue_latency.clone()),
            Box::new(m.tax_authority_rejections.clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        m
    }

    /// Depth of one queue partition.
    pub fn depth(&self, partition: u32, depth: &crate::queue::Depth) {
        let p = partition.to_string();
        self.queue_depth.with_label_values(&[p.as_str(), "waiting"]).set(depth.waiting as i64);
        self.queue_depth.with_label_values(&[p.as_str(), "delayed"]).set(depth.delayed as i64);
        self.queue_depth.with_label_values(&[p.as_str(), "active"]).set(depth.active as i64);
        self.dlq_depth.with_label_values(&[p.as_str()]).set(depth.dead as i64);
    }

    /// Age of the oldest waiting job of a partition.
    pub fn oldest_age(&self, partition: u32, seconds: f64) {
        self.queue_oldest_age.with_label_values(&[partition.to_string().as_str()]).set(seconds);
    }

    /// Queue moves.
    pub fn jobs(&self, event: &'static str, count: u64) {
        if count > 0 {
            self.queue_jobs.with_label_values(&[event]).inc_by(count);
        }
    }

    /// A lease lost.
    pub fn lease_lost(&self, count: u64) {
        self.lease_lost.inc_by(count);
    }

    /// A provider call.
    pub fn attempt(&self, provider: &str, operation: &'static str, outcome: &'static str, elapsed: Duration) {
        self.attempts.with_label_values(&[provider, operation, outcome]).inc();
        self.provider_latency.with_label_values(&[provider, operation]).observe(elapsed.as_secs_f64());
    }

    /// Creates the per-provider retry counters at zero (see [`Metrics::running`]).
    pub fn providers(&self, names: impl Iterator<Item = &'static str>) {
        for name in names {
            for class in ["retryable", "ambiguous"] {
                let _zero = self.retries.with_label_values(&[name, class]);
            }
            let _zero = self.tax_authority_rejections.with_label_values(&[name]);
        }
    }

    /// An issued invoice the tax authority rejected.
    pub fn tax_authority_rejected(&self, provider: &str) {
        self.tax_authority_rejections.with_label_values(&[provider]).inc();
    }

    /// A retry scheduled (`class`: retryable, ambiguous, lookup).
    pub fn retry(&self, provider: &str, class: &'static str) {
        self.retries.with_label_values(&[provider, class]).inc();
    }

    /// An invoice state change by a worker.
    pub fn transition(&self, status: &'static str) {
        self.settled.with_label_values(&[status]).inc();
    }

    /// Jobs the sweeper created.
    pub fn swept(&self, count: u64) {
        self.swept.inc_by(count);
    }

    /// The oldest due invoice's age.
    pub fn oldest_due(&self, seconds: f64) {
        self.sweeper_oldest_due.set(seconds);
    }

    /// A Redis error.
    pub fn queue_error(&self, operation: &'static str) {
        self.queue_errors.with_label_values(&[operation]).inc();
    }

    /// One phase of a worker batch.
    pub fn batch_phase(&self, phase: &'static str, elapsed: Duration) {
        self.batch_phase.with_label_values(&[phase]).observe(elapsed.as_secs_f64());
    }

    /// How long a batch waited for a series' call slots.
    pub fn series_wait(&self, waited: Duration) {
        self.series_wait.observe(waited.as_secs_f64());
    }

    /// Jobs in a worker batch.
    pub fn batch_jobs(&self, jobs: usize) {
        self.batch_size.observe(jobs as f64);
    }

    /// Enqueue → ISSUED.
    pub fn issued_after(&self, seconds: f64) {
        self.issue_latency.observe(seconds.max(0.0));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics() {
        let metrics = Metrics::new();
        metrics.running("api");
        metrics.http_request("GET", "/health", 200, Duration::from_millis(3));
        metrics.dependency_checked(Dependency::Redis, false);
        let text = metrics.render();
        assert!(text.contains("invoice_build_info{mode=\"api\""), "{text}");
        assert!(text.contains("invoice_http_request_duration_seconds_count{method=\"GET\",route=\"/health\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("invoice_dependency_up{dependency=\"redis\"} 0"), "{text}");
    }
}
