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
            // Process metrics (RSS, CPU, fds) under the usual `process_` names.
            let process = prometheus::process_collector::ProcessCollector::for_self();
            registry.register(Box::new(process)).expect("registered once");
        }
        started.set(chrono::Utc::now().timestamp());
        Metrics { registry, http_request_duration, dependency_up, build_info, started, worker_id_lease_lost }
    }

    /// Marks the running mode in `invoice_build_info`.
    pub fn running(&self, mode: &str) {
        self.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), mode]).set(1);
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
