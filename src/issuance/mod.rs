//! `invoice worker`: turns QUEUED invoices into issued e-invoices at the merchant's provider
//! (SPEC §3, §4), with retries, a dead-letter queue and never a duplicate at the provider.
//!
//! Protocol (Postgres first, Redis second, for every move):
//! 1. claim jobs (order ids) from a queue partition, with a lease renewed while they run;
//! 2. read the orders' unfinished invoices from Postgres and decide each one's step
//!    ([`plan::step`]); validate and decrypt before any call (a failure is permanent);
//! 3. one transaction takes the invoices to call: QUEUED (or ISSUING whose lease expired) →
//!    ISSUING for this delivery until the call lease ends — single flight per idempotency key
//!    across processes, because nobody else may call while the lease runs;
//! 4. call the providers, concurrently, at most N per (merchant, series);
//! 5. one transaction records every call and settles every invoice, fenced on status and
//!    lease owner, with audit rows and outbox events (calls that ended a second before the
//!    batch's slowest are settled without it, so one hanging provider holds back nothing
//!    else);
//! 6. only then complete, delay or dead-letter those jobs in Redis.
//!
//! A crash between any two steps repeats at most an idempotent part: an ISSUING invoice whose
//! lease ran out is looked up by its key before anything is sent again.

pub mod plan;
pub mod sweeper;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Issuance as Settings;
use crate::crypto::Keyring;
use crate::metrics::Metrics;
use crate::providers::Registry;
use crate::queue::{Enqueued, JobPayload, Queue, QueueError};

pub use sweeper::sweep_once;

/// What the workers share.
#[derive(Clone)]
pub struct Deps {
    /// Postgres.
    pub db: sqlx::PgPool,
    /// Ids for replacement invoices (a pending request joined to an issued invoice).
    pub ids: crate::ids::Snowflake,
    /// The queue.
    pub queue: Queue,
    /// Providers by name.
    pub providers: Registry,
    /// Credentials keys.
    pub keyring: Keyring,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub settings: Settings,
    /// `invoice.events.v1` (its configured name).
    pub events_topic: String,
    /// This process, for lease owners, attempt rows and audit actors.
    pub identity: String,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").field("queue", &self.queue).field("identity", &self.identity).finish()
    }
}

/// Runs the workers (one claim loop per queue partition), the sweeper and the claim expiry
/// until `shutdown`; then stops claiming, lets in-flight jobs finish (bounded by the lease:
/// what is left is taken up by another worker once the lease expires) and returns.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let deps = Arc::new(deps);
    let tracker = tokio_util::task::TaskTracker::new();
    let background = CancellationToken::new();
    let sweeper = tokio::spawn(sweeper::run(deps.clone(), background.clone()));
    let gauges = tokio::spawn(sweeper::gauges(deps.clone(), background.clone()));
    let worker = worker::Worker::new(deps.clone(), tracker.clone(), shutdown.clone());
    let loops: Vec<_> = (0..deps.queue.partitions())
        .map(|partition| tokio::spawn(worker.clone().claim_loop(partition, shutdown.clone())))
        .collect();
    tracing::info!(
        partitions = deps.queue.partitions(),
        concurrency = deps.settings.concurrency,
        identity = %deps.identity,
        "Workers started"
    );
    for handle in loops {
        let _ended = handle.await;
    }
    tracker.close();
    // Long enough for a call that started just before SIGTERM to end (its timeout bounds it);
    // the Helm chart's termination grace is derived from the same timeout.
    let drain = deps.settings.lease.max(deps.settings.provider_timeout + Duration::from_secs(5));
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            "In-flight jobs did not finish within {drain:?}; their leases will expire and another worker takes them"
        );
    }
    background.cancel();
    let _ended = sweeper.await;
    let _ended = gauges.await;
    tracing::info!("Workers stopped");
    Ok(())
}

/// What a replay did: each invoice of the order with its status before and after, and the
/// queue state of the order's job (`None` if nothing is left to issue).
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// The order's invoices.
    pub invoices: Vec<crate::storage::issuance::Replayed>,
    /// The job's state after the requeue.
    pub job: Option<String>,
    /// Postgres changed but Redis could not be told: the sweeper enqueues the job later.
    pub enqueue_failed: bool,
}

/// `replay`, `dlq requeue` and their API twins: FAILED → QUEUED in Postgres (audited), then
/// the order's job back in Redis (also from the DLQ) if anything is left to issue. A queue
/// failure after the commit is not the caller's error: what it asked for is done in
/// Postgres, the record, and the sweeper enqueues the job once Redis answers.
pub async fn replay_order(
    db: &sqlx::PgPool,
    queue: &Queue,
    order_id: &str,
    merchant_id: Option<&str>,
    actor: &str,
    reason: &str,
    source: &str,
) -> Result<ReplayReport, crate::storage::StorageError> {
    let invoices = crate::storage::issuance::replay(db, order_id, merchant_id, actor, reason).await?;
    let unfinished = invoices.iter().any(|i| matches!(i.after.as_str(), "QUEUED" | "ISSUING" | "SUBMITTED"));
    let (mut job, mut enqueue_failed) = (None, false);
    if let (true, Some(first)) = (unfinished, invoices.first()) {
        let payload = JobPayload {
            merchant_id: first.merchant_id.clone(),
            enqueued_at_ms: crate::queue::now_ms(),
            source: source.to_owned(),
        };
        let partition = queue.partition_of(order_id);
        match queue.requeue(order_id, &payload).await {
            Ok(state) => {
                tracing::info!(
                    orderId = %order_id, merchantId = %first.merchant_id, partition, source,
                    "[enqueueIssuance] job {state} in queue invoice-issuance, partition: {partition}"
                );
                job = Some(state);
            }
            Err(error) => {
                tracing::warn!(orderId = %order_id, merchantId = %first.merchant_id, partition, source, %error,
                    "Replayed in Postgres but the queue did not answer; the sweeper will enqueue the job");
                enqueue_failed = true;
            }
        }
    }
    Ok(ReplayReport { invoices, job, enqueue_failed })
}

/// The enqueue source of the sweeper's re-enqueues.
pub const SWEEPER: &str = "sweeper";

/// Enqueues issuance jobs for `(order id, merchant id)` pairs and logs each new one with the
/// runbook marker. Returns how many were new.
pub async fn enqueue(
    queue: &Queue,
    metrics: &Metrics,
    orders: &[(String, String)],
    source: &str,
) -> Result<u64, QueueError> {
    if orders.is_empty() {
        return Ok(0);
    }
    let now = crate::queue::now_ms();
    let jobs: Vec<(String, JobPayload)> = orders
        .iter()
        .map(|(order_id, merchant_id)| {
            (
                order_id.clone(),
                JobPayload {
                    merchant_id: merchant_id.clone(),
                    enqueued_at_ms: now,
                    source: source.to_owned(),
                },
            )
        })
        .collect();
    let answers = match queue.enqueue(&jobs).await {
        Ok(answers) => answers,
        Err(error) => {
            metrics.issuance.queue_error("enqueue");
            return Err(error);
        }
    };
    let mut new = 0;
    for ((order_id, merchant_id), answer) in orders.iter().zip(&answers) {
        if *answer == Enqueued::New {
            new += 1;
            let partition = queue.partition_of(order_id);
            tracing::info!(
                orderId = %order_id, merchantId = %merchant_id, partition, source,
                "[enqueueIssuance] job added to queue invoice-issuance, partition: {partition}"
            );
        }
    }
    metrics.issuance.jobs("enqueued", new);
    // The sweeper offers every due invoice each pass, and a backlog waiting in Redis would
    // count as duplicates every 30 s; its finds are `invoice_sweeper_reenqueued_total`.
    if source != SWEEPER {
        metrics.issuance.jobs("deduped", answers.len() as u64 - new);
    }
    Ok(new)
}
