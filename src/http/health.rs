//! Liveness and readiness. `/health` only says the process serves HTTP; `/ready` asks
//! Postgres, Redis and Kafka, concurrently and each with a deadline, checks that the JWKS
//! was loaded where the API is served, and names the ones that failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Response, StatusCode};
use rdkafka::producer::{FutureProducer, Producer};
use serde_json::json;

use super::problem::Problem;
use super::server::bytes_body::Body;
use crate::metrics::{Dependency, Metrics};

/// `GET /health`.
pub fn health() -> Response<Body> {
    super::json(StatusCode::OK, &json!({"status": "ok"}))
}

/// The clients `/ready` probes.
pub struct Readiness {
    probes: Probes,
    last: Arc<tokio::sync::Mutex<Option<(Instant, Probed)>>>,
}

/// The dependencies and the deadline of one probe (cheap handles, moved into its task).
#[derive(Clone)]
struct Probes {
    db: sqlx::PgPool,
    redis: deadpool_redis::Pool,
    kafka: FutureProducer,
    timeout: Duration,
}

type Probed = [(Dependency, Result<(), String>); 3];

/// How long one probe's answer serves every `/ready`: the route is unauthenticated and takes
/// no request slot, and each probe holds a Postgres and a Redis connection and a blocking
/// thread; a flood of them must not drain the pools the service works with.
const REUSE_FOR: Duration = Duration::from_secs(1);

impl Readiness {
    /// Probes Postgres (`db`), Redis and Kafka (a metadata request), each within `timeout`.
    pub fn new(
        db: sqlx::PgPool,
        redis: deadpool_redis::Pool,
        kafka: FutureProducer,
        timeout: Duration,
    ) -> Readiness {
        Readiness {
            probes: Probes { db, redis, kafka, timeout },
            last: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The latest probe's results if under [`REUSE_FOR`] old, else a new probe's. Callers
    /// arriving during a probe wait for it and share it (one probe at a time). The probe runs
    /// in a task of its own that stores its results: a caller that goes away (a client that
    /// hung up) does not take the probe with it, so those waiting still get its answer.
    async fn probed(&self, metrics: &Metrics) -> Probed {
        let mut last = self.last.clone().lock_owned().await;
        if let Some((at, results)) = last.as_ref() {
            if at.elapsed() < REUSE_FOR {
                return results.clone();
            }
        }
        let (probes, metrics) = (self.probes.clone(), metrics.clone());
        let task = tokio::spawn(async move {
            let results = probes.run(&metrics).await;
            *last = Some((Instant::now(), results.clone()));
            results
        });
        task.await.unwrap_or_else(|_| {
            [Dependency::Postgres, Dependency::Redis, Dependency::Kafka]
                .map(|dependency| (dependency, Err("probe task failed".to_owned())))
        })
    }
}

impl Probes {
    /// Probes all three concurrently, and records and logs what it found.
    async fn run(&self, metrics: &Metrics) -> Probed {
        let (pg, redis, kafka) = tokio::join!(self.postgres(), self.redis(), self.kafka());
        let results = [(Dependency::Postgres, pg), (Dependency::Redis, redis), (Dependency::Kafka, kafka)];
        for (dependency, result) in &results {
            metrics.dependency_checked(*dependency, result.is_ok());
            if let Err(reason) = result {
                tracing::warn!(dependency = dependency.as_str(), reason = %reason, "Readiness check failed");
            }
        }
        results
    }

    async fn postgres(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, crate::storage::ping(&self.db)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn redis(&self) -> Result<(), String> {
        let probe = async {
            let mut conn = self.redis.get().await.map_err(|e| e.to_string())?;
            let pong: String =
                deadpool_redis::redis::cmd("PING").query_async(&mut conn).await.map_err(|e| e.to_string())?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(format!("unexpected reply {pong}"))
            }
        };
        tokio::time::timeout(self.timeout, probe).await.unwrap_or_else(|_| Err("timed out".into()))
    }

    async fn kafka(&self) -> Result<(), String> {
        let producer = self.kafka.clone();
        let timeout = self.timeout;
        let probe = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map_err(|e| e.to_string()).and_then(|m| {
                if m.brokers().is_empty() {
                    Err("no broker in metadata".to_owned())
                } else {
                    Ok(())
                }
            })
        });
        // The blocking pool may be busy: the wait for it counts against the deadline too.
        match tokio::time::timeout(timeout + Duration::from_secs(1), probe).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("probe task failed".into()),
            Err(_) => Err("timed out".into()),
        }
    }
}

impl Readiness {
    /// `GET /ready`: 200 when all answer, else 503 naming the failed ones. `jwks_loaded` is
    /// given where the JWT routes are served: until the identity provider's keys were
    /// loaded once, those routes can only answer 503, so the process is not ready either
    /// (security R9); keys held from an earlier load keep it ready while the IdP is down.
    pub async fn check(&self, metrics: &Metrics, jwks_loaded: Option<bool>) -> Response<Body> {
        let results = self.probed(metrics).await;
        let mut checks = serde_json::Map::new();
        let mut failed = Vec::new();
        if let Some(loaded) = jwks_loaded {
            checks.insert("jwks".into(), json!(if loaded { "ok" } else { "unavailable" }));
            if !loaded {
                failed.push("jwks");
            }
        }
        for (dependency, result) in &results {
            match result {
                Ok(()) => {
                    checks.insert(dependency.as_str().into(), json!("ok"));
                }
                Err(_) => {
                    // Connection errors may carry a host name but never credentials; still,
                    // keep the client-facing text to the dependency's name and a class.
                    checks.insert(dependency.as_str().into(), json!("unavailable"));
                    failed.push(dependency.as_str());
                }
            }
        }
        if failed.is_empty() {
            super::json(StatusCode::OK, &json!({"status": "ok", "checks": checks}))
        } else {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                format!("not ready: {} did not answer", failed.join(", ")),
            )
            .with("checks", serde_json::Value::Object(checks))
            .with("failed", json!(failed))
            .into_response()
        }
    }
}
