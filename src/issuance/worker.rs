//! The claim loops and the processing of one claimed batch (see the module documentation of
//! [`super`] for the protocol).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plan::{self, Step, Timing};
use super::Deps;
use crate::config::Secret;
use crate::crypto::Sealed;
use crate::domain::buyer::Buyer;
use crate::domain::document::{self, Document, Original, Prepared, Seller};
use crate::domain::money::{Line, Totals};
use crate::providers::{self, Call, Provider, Target};
use crate::queue::{backoff, Job, Retry, SeriesKey};
use crate::storage;
use crate::storage::issuance::{self, NewAttempt, Settle, Transition, WorkInvoice};

/// How long an idle claim loop sleeps at most between polls.
const IDLE_MAX: Duration = Duration::from_millis(20);
/// How long a claim loop waits after a claim that emptied its partition: jobs trickling in
/// then go out in batches rather than one claim (and one batch of round trips) each, and
/// the polls of a nearly idle queue stop costing Redis and the service more than the work.
/// Small next to any provider call. A longer gather (15 ms) was measured: batches at 500/s
/// grew from 2.2 to 3.0 invoices, but the CPU per payment fell by 6 % in one run and not at
/// all in the full benchmark, while the median latency rose by 3–5 ms.
const GATHER: Duration = Duration::from_millis(5);
/// How long a finished call waits for the slower calls of its batch before it is settled
/// without them. One slow provider (its timeout is 90 s) must not hold back the other
/// merchants' invoices of the batch, nor their worker slots, for the length of its call;
/// calls that end close together still share one settlement.
const EARLY_SETTLE_AFTER: Duration = Duration::from_secs(1);
/// Delay of a job whose batch failed on Postgres (transient).
const STORAGE_RETRY: Duration = Duration::from_secs(1);
/// How much of a call lease, beyond one whole call, a create starts with: time for the
/// provider's login (usually cached) before the request is written.
const SEND_MARGIN: Duration = Duration::from_secs(10);

/// (merchant, series) → until when its jobs are deferred.
type DeferredSeries = HashMap<(String, String), DateTime<Utc>>;

/// What this process knows of its series' call slots.
#[derive(Default)]
struct SeriesHealth {
    /// Series whose calls found no slot for a whole wait, and until when their jobs are
    /// deferred without being taken.
    deferred: DeferredSeries,
    /// When a call of each series last got a slot here.
    granted: HashMap<(String, String), std::time::Instant>,
}

/// The claim loops' shared state.
#[derive(Clone)]
pub struct Worker {
    deps: Arc<Deps>,
    slots: Arc<Semaphore>,
    /// The per-series limit of this process alone, for batches that cannot reach Redis.
    fallback: Arc<LocalSeriesLimits>,
    /// Series stuck on their call slots (see [`SeriesHealth`]).
    series_health: Arc<Mutex<SeriesHealth>>,
    tracker: TaskTracker,
    /// Cancelled on SIGTERM: calls not yet started are handed back instead of sent.
    stopping: CancellationToken,
}

impl Worker {
    /// Workers over `deps`, spawning batches on `tracker`.
    pub fn new(deps: Arc<Deps>, tracker: TaskTracker, stopping: CancellationToken) -> Worker {
        let slots = Arc::new(Semaphore::new(deps.settings.concurrency));
        Worker { deps, slots, fallback: Arc::default(), series_health: Arc::default(), tracker, stopping }
    }

    /// Claims and dispatches jobs of one partition until `shutdown`.
    pub async fn claim_loop(self, partition: u32, shutdown: CancellationToken) {
        let mut idle = Duration::from_millis(1);
        loop {
            let mut permits = tokio::select! {
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            // Top the batch up with whatever is free (other partitions' loops compete for the
            // same permits, so a failed grab retries with what is left).
            let batch_max = self.deps.settings.batch_max;
            for _ in 0..4 {
                let free =
                    self.slots.available_permits().min(batch_max.saturating_sub(permits.num_permits()));
                if free == 0 {
                    break;
                }
                if let Ok(more) = self.slots.clone().try_acquire_many_owned(free as u32) {
                    permits.merge(more);
                }
            }
            let wanted = permits.num_permits();
            let claimed = match self.deps.queue.claim(partition, wanted, self.deps.settings.lease).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    self.deps.metrics.issuance.queue_error("claim");
                    tracing::warn!(partition, %error, "Cannot claim issuance jobs; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            let m = &self.deps.metrics.issuance;
            m.jobs("reclaimed", claimed.reclaimed);
            m.jobs("promoted", claimed.promoted);
            m.jobs("claimed", claimed.jobs.len() as u64);
            if claimed.reclaimed > 0 {
                tracing::warn!(
                    partition,
                    jobs = claimed.reclaimed,
                    "Issuance jobs whose lease expired were taken back"
                );
            }
            if claimed.jobs.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {},
                    _ = shutdown.cancelled() => return,
                }
                idle = (idle * 2).min(IDLE_MAX);
                continue;
            }
            let drained = claimed.jobs.len() < wanted;
            if drained {
                drop(permits.split(wanted - claimed.jobs.len()));
            }
            let worker = self.clone();
            self.tracker.spawn(async move { worker.run_batch(partition, claimed.jobs, permits).await });
            if drained {
                idle = GATHER;
                tokio::select! {
                    _ = tokio::time::sleep(GATHER) => {},
                    _ = shutdown.cancelled() => return,
                }
            } else {
                idle = Duration::from_millis(1);
            }
        }
    }

    async fn run_batch(self, partition: u32, jobs: Vec<Job>, mut permits: OwnedSemaphorePermit) {
        let deps = &self.deps;
        let lost: Arc<Mutex<HashSet<String>>> = Arc::default();
        let settled_early: Arc<Mutex<HashSet<String>>> = Arc::default();
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(
            deps.clone(),
            partition,
            jobs.clone(),
            lost.clone(),
            settled_early.clone(),
            heartbeat_stop.clone(),
        ));
        // Dropped on every exit, a panic included: a heartbeat outliving its batch would keep
        // the leases alive forever.
        let stop_guard = heartbeat_stop.clone().drop_guard();
        let batch = Batch { partition, jobs: &jobs, lost: &lost, settled_early: &settled_early };
        let fates = self.process(&batch, &mut permits).await;
        drop(stop_guard);
        let _ended = heartbeat.await;

        let lost = lost.lock().map(|l| l.clone()).unwrap_or_default();
        deps.metrics.issuance.lease_lost(lost.len() as u64);
        let early = settled_early.lock().map(|e| e.clone()).unwrap_or_default();
        let rest: Vec<&Job> = jobs.iter().filter(|j| !early.contains(&j.order_id)).collect();
        self.finish(partition, &rest, &fates, &lost).await;
    }

    /// Hands the jobs of settled orders back to the queue as their fates say: completed,
    /// delayed for a retry, dead-lettered or released. Jobs whose lease was lost are left to
    /// their new holder.
    async fn finish(
        &self,
        partition: u32,
        jobs: &[&Job],
        fates: &HashMap<String, Fate>,
        lost: &HashSet<String>,
    ) {
        let deps = &self.deps;
        let mut complete = Vec::new();
        let mut retries = Vec::new();
        let mut dead = Vec::new();
        let mut release = Vec::new();
        for &job in jobs {
            if lost.contains(&job.order_id) {
                continue;
            }
            match fates.get(&job.order_id) {
                None | Some(Fate::Complete { .. }) => complete.push(job),
                Some(Fate::RetryIn(delay, error)) => {
                    retries.push(Retry { job, delay: *delay, error: error.clone() })
                }
                Some(Fate::Dead(error)) => dead.push((job, error.clone())),
                Some(Fate::Release) => release.push(job),
            }
        }
        let q = &deps.queue;
        let m = &deps.metrics.issuance;
        let started = std::time::Instant::now();
        match q.release(partition, &release).await {
            Ok(()) => m.jobs("released", release.len() as u64),
            Err(error) => {
                m.queue_error("release");
                tracing::warn!(partition, %error, "Cannot hand jobs back; their leases will expire");
            }
        }
        match q.complete(partition, &complete).await {
            Ok(stale) => m.jobs("completed", complete.len() as u64 - stale),
            Err(error) => {
                m.queue_error("complete");
                tracing::warn!(partition, %error, "Cannot complete jobs; their leases will expire and they re-run idempotently");
            }
        }
        match q.retry(partition, &retries).await {
            Ok(stale) => m.jobs("retried", retries.len() as u64 - stale),
            Err(error) => {
                m.queue_error("retry");
                tracing::warn!(partition, %error, "Cannot delay jobs; their leases will expire");
            }
        }
        for (job, error) in dead {
            match q.dead(job, &error).await {
                Ok(true) => m.jobs("dead", 1),
                Ok(false) => {}
                Err(e) => {
                    m.queue_error("dead");
                    tracing::warn!(partition, error = %e, "Cannot dead-letter a job; Postgres holds it FAILED");
                }
            }
        }
        m.batch_phase("queue", started.elapsed());
        // Enqueue → ISSUED latency, for jobs whose invoice this batch issued (not jobs that found
        // theirs issued, cancelled or failed already: those would pull the latency down).
        let now = crate::queue::now_ms();
        for job in jobs {
            if matches!(fates.get(&job.order_id), Some(Fate::Complete { issued: true }))
                && job.payload.enqueued_at_ms > 0
            {
                m.issued_after((now - job.payload.enqueued_at_ms) as f64 / 1000.0);
            }
        }
    }

    /// Does the Postgres and provider part for a batch; returns each order's job fate.
    /// Orders whose calls all ended [`EARLY_SETTLE_AFTER`] before the batch's last are settled
    /// and handed back to the queue on their own (their slots in `permits` freed); the rest
    /// of the fates are returned.
    async fn process(&self, batch: &Batch<'_>, permits: &mut OwnedSemaphorePermit) -> HashMap<String, Fate> {
        let Batch { jobs, lost, .. } = *batch;
        let deps = &self.deps;
        let m = &deps.metrics.issuance;
        m.batch_jobs(jobs.len());
        let mut phase = std::time::Instant::now();
        let mut lap = |name: &'static str| {
            m.batch_phase(name, phase.elapsed());
            phase = std::time::Instant::now();
        };
        let orders: Vec<String> = jobs.iter().map(|j| j.order_id.clone()).collect();
        let deadline = deps.settings.db_work_timeout;
        let read = storage::with_deadline(&deps.db, deadline, async |conn| {
            issuance::unfinished_for_orders(conn, &orders).await
        });
        let invoices = match read.await {
            Ok(invoices) => invoices,
            Err(error) => {
                tracing::warn!(%error, jobs = jobs.len(), "Cannot read invoices; jobs retried shortly");
                return orders
                    .into_iter()
                    .map(|o| (o, Fate::RetryIn(STORAGE_RETRY, error.to_string())))
                    .collect();
            }
        };
        lap("read");
        let now = Utc::now();
        let settings = &deps.settings;
        let mut wake: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut fail_reason: HashMap<String, String> = HashMap::new();
        let mut prefails: Vec<Settle> = Vec::new();
        let mut items: Vec<Item> = Vec::new();
        // A job redelivered this often crashed its workers before any attempt was counted
        // (a poison pill): its QUEUED invoices fail instead of looping forever.
        let deliveries: HashMap<&str, u32> = jobs.iter().map(|j| (j.order_id.as_str(), j.delivery)).collect();
        let max_deliveries = settings.max_attempts.saturating_mul(2).max(10);

        for inv in invoices {
            if inv.status == "QUEUED"
                && deliveries.get(inv.order_id.as_str()).is_some_and(|d| *d > max_deliveries)
            {
                prefails.push(prefail(
                    inv,
                    format!("job redelivered more than {max_deliveries} times without finishing"),
                ));
                continue;
            }
            let state = plan::State {
                status: &inv.status,
                attempts: inv.attempts.max(0) as u32,
                next_attempt_at: inv.next_attempt_at,
                lease_until: inv.lease_until,
                original_status: inv.original_status.as_deref(),
            };
            let step = plan::step(&state, now, settings.max_attempts);
            let earliest = |wake: &mut HashMap<String, DateTime<Utc>>, order: &str, at: DateTime<Utc>| {
                let entry = wake.entry(order.to_owned()).or_insert(at);
                if at < *entry {
                    *entry = at;
                }
            };
            match step {
                Step::WaitUntil(at) => earliest(&mut wake, &inv.order_id, at.max(now)),
                Step::WaitForOriginal => {
                    earliest(&mut wake, &inv.order_id, plan::at(now, settings.lookup_interval))
                }
                Step::Exhausted => prefails.push(prefail(inv, "attempts exhausted".to_owned())),
                Step::Create | Step::LookupThenCreate | Step::LookupOnly | Step::Poll => {
                    match prepare(deps, &inv, step, now) {
                        Ok((provider, target, prepared)) => {
                            items.push(Item { inv, step, provider, target, prepared })
                        }
                        // Never sent: a QUEUED invoice that cannot be sent fails for good.
                        Err(error) if inv.status == "QUEUED" => prefails.push(prefail(inv, error)),
                        // An ISSUING or SUBMITTED invoice may exist at the provider: it is never
                        // failed without a lookup. Keep trying (an operator fixes the key).
                        Err(error) => {
                            tracing::error!(
                                orderId = %inv.order_id, merchantId = %inv.merchant_id, invoiceId = inv.id,
                                status = %inv.status, error = %error,
                                "Cannot look up an invoice that may exist at the provider; retrying later"
                            );
                            earliest(&mut wake, &inv.order_id, plan::at(now, settings.lookup_interval));
                        }
                    }
                }
            }
        }

        // A series whose calls could not get a slot lately (its provider hangs for this
        // merchant): its jobs wait without being taken, so they hold no worker slot for
        // nothing and every other merchant's jobs go through.
        let deferred = self.deferred_series(now);
        if !deferred.is_empty() {
            items.retain(|item| {
                let key = (item.inv.merchant_id.clone(), item.prepared.doc.series.clone());
                match deferred.get(&key) {
                    Some(until) => {
                        m.retry(item.provider.name(), "series_busy");
                        let entry = wake.entry(item.inv.order_id.clone()).or_insert(*until);
                        *entry = (*entry).min(*until);
                        false
                    }
                    None => true,
                }
            });
        }

        // First, take the invoices to call; permanent failures found before any call.
        // The lease covers a wait for a send slot and one whole call; a call that would start
        // later renews it first (see `call`).
        let lease_until = plan::at(now, self.call_lease() * 2);
        let taken: HashMap<i64, String>;
        let acquire_ids: Vec<(i64, chrono::DateTime<chrono::Utc>)> =
            items.iter().filter(|i| i.step != Step::Poll).map(|i| (i.inv.id, i.inv.updated_at)).collect();
        // One lease owner per batch: a zombie batch (its leases expired and were re-taken) is
        // fenced out of every write by the owner changing.
        let owner = format!("{}#{}", deps.identity, uuid::Uuid::new_v4().simple());
        // Taken or not (unknown after the deadline), the invoices are safe: a take that did
        // commit holds leases that lapse, and a lapsed lease means a lookup first.
        let first = storage::with_deadline(&deps.db, deadline, async |conn| {
            // Usually the take alone: one statement, atomic by itself, needs no transaction.
            if prefails.is_empty() {
                let got = issuance::acquire(conn, &acquire_ids, &owner, lease_until, &deps.identity).await?;
                return Ok::<_, storage::StorageError>((got.into_iter().collect(), Vec::new()));
            }
            let mut tx = sqlx::Connection::begin(conn).await?;
            let got: HashMap<i64, String> =
                issuance::acquire(&mut tx, &acquire_ids, &owner, lease_until, &deps.identity)
                    .await?
                    .into_iter()
                    .collect();
            let applied =
                issuance::settle(&mut tx, &prefails, Vec::new(), &deps.events_topic, &deps.identity).await?;
            tx.commit().await?;
            Ok((got, applied))
        });
        match first.await {
            Ok((got, applied)) => {
                taken = got;
                for (s, ok) in prefails.iter().zip(applied) {
                    if ok {
                        deps.metrics.issuance.transition("FAILED");
                        if let Transition::Failed { error } = &s.transition {
                            fail_reason.insert(s.invoice.order_id.clone(), error.clone());
                            tracing::error!(
                                orderId = %s.invoice.order_id, merchantId = %s.invoice.merchant_id,
                                partition = deps.queue.partition_of(&s.invoice.order_id),
                                invoiceId = s.invoice.id, error = %error,
                                "[DLQ] invoice-issuance: failed before any provider call"
                            );
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot take invoices for issuance; jobs retried shortly");
                return orders
                    .into_iter()
                    .map(|o| (o, Fate::RetryIn(STORAGE_RETRY, error.to_string())))
                    .collect();
            }
        }
        lap("take");
        let (mut run, skipped): (Vec<Item>, Vec<Item>) =
            items.into_iter().partition(|i| i.step == Step::Poll || taken.contains_key(&i.inv.id));
        // Read as QUEUED but taken as ISSUING (another delivery's lease ran out in between):
        // a call may have happened, so look up first.
        for item in &mut run {
            if item.step == Step::Create && taken.get(&item.inv.id).map(String::as_str) == Some("ISSUING") {
                item.step = if item.inv.attempts.max(0) as u32 >= settings.max_attempts {
                    Step::LookupOnly
                } else {
                    Step::LookupThenCreate
                };
            }
        }
        for item in skipped {
            // Changed by someone else since it was read: look again shortly.
            let at = now + chrono::Duration::seconds(1);
            let entry = wake.entry(item.inv.order_id.clone()).or_insert(at);
            *entry = (*entry).min(at);
        }

        // The provider calls, each series' through the slots the batch gets for it.
        let mut calls_per_series: HashMap<(String, String), usize> = HashMap::new();
        let mut calls_per_order: HashMap<String, usize> = HashMap::new();
        for item in &run {
            *calls_per_order.entry(item.inv.order_id.clone()).or_default() += 1;
            *calls_per_series
                .entry((item.inv.merchant_id.clone(), item.prepared.doc.series.clone()))
                .or_default() += 1;
        }
        let timing = Timing {
            max_attempts: settings.max_attempts,
            safe_wait: settings.provider_safe_wait,
            lookup_interval: settings.lookup_interval,
            backoff_cap: settings.backoff_cap,
        };
        let mut shares: HashMap<(String, String), Arc<SeriesShare>> = HashMap::new();
        let calls: Vec<_> = run
            .into_iter()
            .map(|item| {
                let key = (item.inv.merchant_id.clone(), item.prepared.doc.series.clone());
                let share = shares
                    .entry(key)
                    .or_insert_with_key(|key| {
                        let limit = item.provider.concurrency_per_series();
                        let calls = calls_per_series.get(key).copied().unwrap_or(1);
                        let series = (key.0.as_str(), key.1.as_str());
                        Arc::new(SeriesShare::new(&deps.queue, series, limit, calls, &self.fallback, m))
                    })
                    .clone();
                self.call(item, share, owner.clone(), timing, lease_until, lost)
            })
            .collect();
        // Only the calls hold the shares now: a series' slots go back as soon as its last call
        // of this batch ends, not when the batch does. (Held until the batch's end, a batch
        // holding series A while waiting for B could wait forever on a batch holding B while
        // waiting for A.)
        drop(shares);
        let mut outcomes = Outcomes { wake, fail_reason, ..Outcomes::default() };
        let mut pending: futures::stream::FuturesUnordered<_> = calls.into_iter().collect();
        // Orders with no call (waiting, skipped, failed before any call, nothing left to do)
        // are decided already: they do not wait for the calls.
        let uncalled: HashSet<String> =
            orders.iter().filter(|o| !calls_per_order.contains_key(*o)).cloned().collect();
        let mut waves = Waves { calls_left: calls_per_order, ..Waves::default() };
        if !pending.is_empty() && !uncalled.is_empty() {
            alongside(self.finish_early(batch, uncalled, &outcomes, permits), &mut pending, &mut waves).await;
        }
        while !pending.is_empty() {
            let wave_due = match waves.due() {
                Some(due) => tokio::select! {
                    next = pending.next() => {
                        waves.accept(next);
                        false
                    }
                    () = tokio::time::sleep_until(due) => true,
                },
                None => {
                    waves.accept(pending.next().await);
                    false
                }
            };
            if wave_due {
                let wave = waves.take();
                alongside(self.settle_early(batch, wave, &mut outcomes, permits), &mut pending, &mut waves)
                    .await;
            }
        }

        lap("calls");
        self.settle_wave(waves.rest(), &mut outcomes).await;
        lap("settle");

        let now = Utc::now();
        orders.into_iter().map(|order| (order.clone(), outcomes.fate_of(&order, now))).collect()
    }

    /// Settles the calls of orders that ended while others of their batch still run, and
    /// hands their jobs back to the queue now.
    async fn settle_early(
        &self,
        batch: &Batch<'_>,
        results: Vec<CallResult>,
        outcomes: &mut Outcomes,
        permits: &mut OwnedSemaphorePermit,
    ) {
        let orders: HashSet<String> = results.iter().map(|r| r.settle.invoice.order_id.clone()).collect();
        self.settle_wave(results, outcomes).await;
        self.finish_early(batch, orders, outcomes, permits).await;
    }

    /// Hands the jobs of `orders`, whose fates are decided, back to the queue before the
    /// batch ends, and frees their worker slots.
    async fn finish_early(
        &self,
        batch: &Batch<'_>,
        orders: HashSet<String>,
        outcomes: &Outcomes,
        permits: &mut OwnedSemaphorePermit,
    ) {
        let now = Utc::now();
        let fates: HashMap<String, Fate> =
            orders.iter().map(|order| (order.clone(), outcomes.fate_of(order, now))).collect();
        let jobs: Vec<&Job> = batch.jobs.iter().filter(|j| orders.contains(&j.order_id)).collect();
        // Out of the heartbeat's renewals first: once completed, a job's lease would read as
        // lost.
        if let Ok(mut early) = batch.settled_early.lock() {
            early.extend(orders);
        }
        let lost = batch.lost.lock().map(|l| l.clone()).unwrap_or_default();
        self.finish(batch.partition, &jobs, &fates, &lost).await;
        drop(permits.split(jobs.len()));
    }

    /// Records one wave of calls and settles their invoices (one statement), noting in
    /// `outcomes` what each order's job does next.
    async fn settle_wave(&self, mut results: Vec<CallResult>, outcomes: &mut Outcomes) {
        if results.is_empty() {
            return;
        }
        let deps = &self.deps;
        // A deferral counts from its settlement, which may come a wave after the wait ran
        // out.
        let deferred_until = plan::at(Utc::now(), deps.settings.series_wait);
        for result in &mut results {
            if let Transition::Deferred { next, .. } = &mut result.settle.transition {
                *next = (*next).max(deferred_until);
            }
        }
        let Outcomes { wake, fail_reason, handed_back, issued } = outcomes;
        let mut attempts: Vec<NewAttempt> = Vec::with_capacity(results.len());
        let mut settles: Vec<Settle> = Vec::with_capacity(results.len());
        for result in results {
            attempts.extend(result.attempts);
            settles.push(result.settle);
        }
        // One statement, atomic by itself (see `issuance::settle`).
        let second = storage::with_deadline(&deps.db, deps.settings.db_work_timeout, async |conn| {
            issuance::settle(conn, &settles, attempts, &deps.events_topic, &deps.identity).await
        });
        let applied = match second.await {
            Ok(applied) => applied,
            Err(error) => {
                // The calls happened but their results are not stored: the invoices stay
                // ISSUING until the call lease ends, then are looked up (never resent blindly).
                tracing::error!(%error, invoices = settles.len(), "Cannot record provider results; they will be looked up after the lease");
                for s in &settles {
                    let at = plan::at(Utc::now(), self.call_lease());
                    let entry = wake.entry(s.invoice.order_id.clone()).or_insert(at);
                    *entry = (*entry).min(at);
                }
                vec![false; settles.len()]
            }
        };
        for (s, ok) in settles.iter().zip(applied) {
            if !ok {
                continue;
            }
            let inv = &s.invoice;
            let (status, next): (&'static str, Option<DateTime<Utc>>) = match &s.transition {
                Transition::Issued { invoice_no, provider_status, .. } => {
                    tracing::info!(
                        orderId = %inv.order_id, merchantId = %inv.merchant_id, invoiceId = inv.id,
                        invoiceNo = %invoice_no, "Invoice issued"
                    );
                    issued.insert(inv.order_id.clone());
                    if super::plan::rejected_by_tax_authority(provider_status.as_deref()) {
                        deps.metrics.issuance.tax_authority_rejected(&s.provider);
                        tracing::error!(
                            orderId = %inv.order_id, merchantId = %inv.merchant_id, invoiceId = inv.id,
                            invoiceNo = %invoice_no, providerStatus = ?provider_status,
                            "[taxAuthority] Issued invoice rejected by the tax authority; it needs a replacement"
                        );
                    }
                    ("ISSUED", None)
                }
                Transition::Submitted { next } => ("SUBMITTED", Some(*next)),
                Transition::StillSubmitted { next } => ("", Some(*next)),
                Transition::HandBack => {
                    handed_back.insert(inv.order_id.clone());
                    ("QUEUED", None)
                }
                Transition::Deferred { status, next, .. } => {
                    deps.metrics.issuance.retry(&s.provider, "series_busy");
                    (if *status == "QUEUED" { "QUEUED" } else { "" }, Some(*next))
                }
                Transition::Ambiguous { until, error } => {
                    deps.metrics.issuance.retry(&s.provider, "ambiguous");
                    tracing::warn!(
                        orderId = %inv.order_id, merchantId = %inv.merchant_id, invoiceId = inv.id,
                        partition = deps.queue.partition_of(&inv.order_id), error = %error, lookupAt = %until,
                        "[_handleIssuanceFailure] Scheduling retry: outcome unknown, lookup by transaction UUID first"
                    );
                    ("", Some(*until))
                }
                Transition::Retry { next, error } => {
                    deps.metrics.issuance.retry(&s.provider, "retryable");
                    tracing::warn!(
                        orderId = %inv.order_id, merchantId = %inv.merchant_id, invoiceId = inv.id,
                        partition = deps.queue.partition_of(&inv.order_id), attempt = inv.attempts + 1,
                        error = %error, retryAt = %next,
                        "[_handleIssuanceFailure] Scheduling retry"
                    );
                    ("QUEUED", Some(*next))
                }
                Transition::Failed { error } => {
                    tracing::error!(
                        orderId = %inv.order_id, merchantId = %inv.merchant_id, invoiceId = inv.id,
                        partition = deps.queue.partition_of(&inv.order_id), error = %error,
                        "[DLQ] invoice-issuance: invoice FAILED"
                    );
                    fail_reason.insert(inv.order_id.clone(), error.clone());
                    ("FAILED", None)
                }
            };
            if !status.is_empty() {
                deps.metrics.issuance.transition(status);
            }
            if let Some(at) = next {
                let entry = wake.entry(inv.order_id.clone()).or_insert(at);
                *entry = (*entry).min(at);
            }
        }
    }

    /// The series deferred until after `now`, forgetting those whose time is over.
    fn deferred_series(&self, now: DateTime<Utc>) -> DeferredSeries {
        let Ok(mut health) = self.series_health.lock() else { return HashMap::new() };
        health.deferred.retain(|_, until| *until > now);
        health.deferred.clone()
    }

    /// Notes that a call of `series` got a slot.
    fn slot_granted(&self, series: &(String, String)) {
        let Ok(mut health) = self.series_health.lock() else { return };
        if health.granted.len() >= 10_000 {
            let wait = self.deps.settings.series_wait;
            health.granted.retain(|_, at| at.elapsed() < wait);
        }
        health.granted.insert(series.clone(), std::time::Instant::now());
    }

    /// After a call of `series` waited a whole `series_wait` for a slot: if no call of the
    /// series got one here meanwhile, the series is stuck (its slots held by calls that hang),
    /// not merely busy, and its jobs are deferred until `until` without being taken. Says so
    /// once per deferral.
    fn series_wait_ran_out(&self, series: &(String, String), until: DateTime<Utc>) {
        let Ok(mut health) = self.series_health.lock() else { return };
        let wait = self.deps.settings.series_wait;
        if health.granted.get(series).is_some_and(|at| at.elapsed() < wait) {
            return;
        }
        let now = Utc::now();
        let current = health.deferred.entry(series.clone()).or_insert(now);
        if *current <= now {
            tracing::warn!(
                merchantId = %series.0, series = %series.1, until = %until,
                wait_ms = wait.as_millis() as u64,
                "[_handleIssuanceFailure] No call of the series got a slot in time (provider hanging?); its jobs are deferred"
            );
        }
        *current = (*current).max(until);
    }

    /// How long one provider call may take, everything included: its timeout plus a margin.
    /// And a create checked at `send_by` (a call lease before the lease ends) is written
    /// within the client's connect timeout; a worker that dies mid-call is looked up by the
    /// next one as soon as the lease ends, so the lease also covers that and the safe wait.
    fn call_lease(&self) -> Duration {
        let timeout = self.deps.settings.provider_timeout;
        let connect = providers::connect_timeout(timeout);
        (timeout + Duration::from_secs(5).min(timeout)).max(self.deps.settings.provider_safe_wait + connect)
    }

    /// The latest instant a create may still be written under a lease ending at
    /// `lease_until`: one whole call lease before it. A provider waiting for its login
    /// (another call's, or a slow one) past this writes nothing ([`providers::NOT_SENT`]).
    fn send_by(&self, lease_until: DateTime<Utc>) -> tokio::time::Instant {
        let left = (lease_until - Utc::now()).to_std().unwrap_or_default();
        tokio::time::Instant::now() + left.saturating_sub(self.call_lease())
    }

    /// Whether this delivery may still send for `inv`: its job lease is not lost, and its
    /// Postgres lease covers a whole call from now (renewed, fenced on the owner, when it
    /// would not). A call that starts must end before anyone else may look up or resend.
    async fn may_send(
        &self,
        inv: &WorkInvoice,
        owner: &str,
        lease_until: &mut DateTime<Utc>,
        lost: &Arc<Mutex<HashSet<String>>>,
    ) -> bool {
        if lost.lock().map(|l| l.contains(&inv.order_id)).unwrap_or(true) {
            return false;
        }
        // A margin for the provider's login before the request is written (see `send_by`).
        // (At most half a call lease: a renewal gives two, so one always leaves the margin.)
        let needed = plan::at(Utc::now(), self.call_lease() + SEND_MARGIN.min(self.call_lease() / 2));
        if needed <= *lease_until {
            return true;
        }
        let until = plan::at(Utc::now(), self.call_lease() * 2);
        let renewed =
            storage::with_deadline(&self.deps.db, self.deps.settings.db_work_timeout, async |conn| {
                issuance::renew_lease(conn, inv.id, owner, until).await
            });
        match renewed.await {
            Ok(true) => {
                *lease_until = until;
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(invoiceId = inv.id, %error, "Cannot renew the call lease; not sending");
                false
            }
        }
    }

    /// One invoice's provider calls (a lookup, a create, or a lookup then a create).
    async fn call(
        &self,
        item: Item,
        series: Arc<SeriesShare>,
        owner: String,
        timing: Timing,
        lease_until: DateTime<Utc>,
        lost: &Arc<Mutex<HashSet<String>>>,
    ) -> CallResult {
        let mut lease_until = lease_until;
        let deps = &self.deps;
        let Item { inv, step, provider, target, mut prepared } = item;
        let (expected_status, settle_owner) =
            if step == Step::Poll { ("SUBMITTED", None) } else { ("ISSUING", Some(owner.clone())) };
        let wait = deps.settings.series_wait;
        let Ok(_slot) = tokio::time::timeout(wait, series.slot(&self.stopping)).await else {
            // Nothing sent: the invoice waits (leased to nobody) for as long again, uncounted.
            let next = plan::at(Utc::now(), wait);
            self.series_wait_ran_out(&series.series, next);
            let reason = format!(
                "no call slot for series {} of merchant {} within {} ms (the provider is slow or hanging); deferred",
                series.series.1,
                series.series.0,
                wait.as_millis()
            );
            let status = match step {
                Step::Create => "QUEUED",
                Step::Poll => "SUBMITTED",
                // A call may exist under its key: looked up when the deferral ends.
                _ => "ISSUING",
            };
            let transition = Transition::Deferred { status, next, reason };
            return call_result(inv, expected_status, settle_owner, transition, &provider, Vec::new());
        };
        let attempt =
            if step == Step::Poll { inv.attempts.max(0) as u32 } else { inv.attempts.max(0) as u32 + 1 };
        self.slot_granted(&series.series);
        let delay = backoff(
            attempt,
            deps.settings.backoff_base,
            deps.settings.backoff_cap,
            Duration::from_millis(10),
        );
        let symbol = prepared.symbol();
        let mut attempts = Vec::new();
        let mut record = |operation: &'static str, call: &mut Call, started: DateTime<Utc>| {
            deps.metrics.issuance.attempt(provider.name(), operation, call.outcome.class(), call.duration);
            attempts.push(NewAttempt {
                invoice_id: inv.id,
                attempt_no: attempt as i32,
                operation,
                transaction_uuid: inv.transaction_uuid.clone(),
                provider: provider.name().to_owned(),
                outcome: call.outcome.class(),
                error_code: call.outcome.code().map(str::to_owned),
                request: call.request.take(),
                response: call.response.take(),
                duration_ms: i32::try_from(call.duration.as_millis()).unwrap_or(i32::MAX),
                worker: deps.identity.clone(),
                started_at: started,
            });
        };
        // First the lookup, for the steps that have one; `None` means a create follows.
        let looked_up = match step {
            // Stopping, and nothing was sent for it: back to the queue, uncounted.
            Step::Create if self.stopping.is_cancelled() => Some(Transition::HandBack),
            // Stopping, and an earlier call may exist: released for an immediate lookup elsewhere.
            Step::LookupThenCreate | Step::LookupOnly if self.stopping.is_cancelled() => {
                Some(Transition::Ambiguous { until: Utc::now(), error: "handed back on shutdown".into() })
            }
            // Stopping: the lookup of a SUBMITTED invoice is left to the next worker.
            Step::Poll if self.stopping.is_cancelled() => {
                Some(Transition::StillSubmitted { next: Utc::now() })
            }
            Step::Create => None,
            Step::LookupThenCreate | Step::LookupOnly | Step::Poll => {
                let started = Utc::now();
                let mut call =
                    bounded(self.call_lease(), provider.lookup(&target, &inv.transaction_uuid)).await;
                record("lookup", &mut call, started);
                // `None`: nothing under the key, so resend with the same key; unless the
                // worker began stopping during the lookup: a create now could outlast the
                // drain, so it is handed back for an immediate lookup elsewhere.
                match plan::after_lookup(step, &call.outcome, &symbol, Utc::now(), &timing, delay) {
                    None if self.stopping.is_cancelled() => Some(Transition::Ambiguous {
                        until: Utc::now(),
                        error: "handed back on shutdown".into(),
                    }),
                    transition => transition,
                }
            }
            Step::WaitUntil(_) | Step::WaitForOriginal | Step::Exhausted => Some(Transition::Ambiguous {
                until: Utc::now(),
                error: "internal: no call for this step".into(),
            }),
        };
        // Attempts count creates attempted, whatever their outcome (`NOT_SENT` included).
        let mut create_attempted = false;
        let transition = match (looked_up, &prepared.prepared) {
            (Some(transition), _) => transition,
            (None, Some(valid)) if self.may_send(&inv, &owner, &mut lease_until, lost).await => {
                let started = Utc::now();
                // Dated as sent (DOMAIN §7): the batch's clock was read before the wait for
                // the series slot, which can outlast other calls in the series, and an
                // invoice dated before the series' latest one is refused by the provider.
                prepared.doc.issued_at = started;
                // A create the provider declined to write for lack of lease ([`NOT_SENT`], a
                // login slower than the margin) is retried with backoff and counted like any
                // other: a login that is always that slow must end in FAILED, not loop.
                let send_by = self.send_by(lease_until);
                let mut call =
                    bounded(self.call_lease(), provider.create(&target, &prepared.doc, valid, send_by)).await;
                create_attempted = true;
                record("create", &mut call, started);
                plan::after_create(&call.outcome, attempt, &symbol, Utc::now(), &timing, delay)
            }
            // This delivery lost the invoice (lease lost or taken over): send nothing; the
            // owner-fenced write below changes nothing either.
            (None, Some(_)) => {
                Transition::Ambiguous { until: lease_until, error: "lease lost before sending".into() }
            }
            // prepare() refuses an invalid document for every step that may create.
            (None, None) => Transition::Failed { error: "validation failed".into() },
        };
        drop(target);
        // Attempts count creates attempted: a delivery that only looked up (or sent nothing) gives
        // back what its take counted, unless it ends the invoice FAILED ("exhausted" keeps
        // the count that exhausted it).
        let uncounted =
            step != Step::Poll && !create_attempted && !matches!(transition, Transition::Failed { .. });
        let mut result = call_result(inv, expected_status, settle_owner, transition, &provider, attempts);
        result.settle.uncounted = uncounted;
        result
    }
}

/// One invoice's calls and where they leave it.
fn call_result(
    invoice: WorkInvoice,
    expected_status: &'static str,
    owner: Option<String>,
    transition: Transition,
    provider: &Arc<dyn Provider>,
    attempts: Vec<NewAttempt>,
) -> CallResult {
    CallResult {
        attempts,
        settle: Settle {
            invoice,
            expected_status,
            owner,
            transition,
            provider: provider.name().to_owned(),
            uncounted: false,
        },
    }
}

/// What happens to a job after its batch.
#[derive(Debug, Clone)]
enum Fate {
    /// Nothing left to do for the order; `issued`: this batch issued its invoice.
    Complete { issued: bool },
    /// Come back after this delay.
    RetryIn(Duration, String),
    /// Failed: to the DLQ.
    Dead(String),
    /// Not sent because the worker is stopping: back to the head of the line, uncounted.
    Release,
}

struct PreparedDoc {
    doc: Document,
    /// `None` only for lookup-only steps, whose document need not be valid any more.
    prepared: Option<Prepared>,
}

impl PreparedDoc {
    /// Type digit + series, e.g. `1C26TAA`.
    fn symbol(&self) -> String {
        match &self.prepared {
            Some(p) => p.symbol.clone(),
            None => format!("{}{}", self.doc.template_code.chars().next().unwrap_or('1'), self.doc.series),
        }
    }
}

struct Item {
    inv: WorkInvoice,
    step: Step,
    provider: Arc<dyn Provider>,
    target: Target,
    prepared: PreparedDoc,
}

struct CallResult {
    attempts: Vec<NewAttempt>,
    settle: Settle,
}

/// Runs `work` while the batch's calls go on, gathering those that end meanwhile.
async fn alongside(
    work: impl std::future::Future<Output = ()>,
    calls: &mut (impl futures::Stream<Item = CallResult> + Unpin),
    waves: &mut Waves,
) {
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = &mut work => return,
            Some(result) = calls.next() => waves.accept(Some(result)),
        }
    }
}

/// A batch's ended calls, gathered into waves to settle.
#[derive(Default)]
struct Waves {
    /// Calls still running, per order.
    calls_left: HashMap<String, usize>,
    /// Results of orders whose calls have all ended, not settled yet.
    ready: Vec<CallResult>,
    /// When the oldest of `ready` ended.
    ready_since: Option<tokio::time::Instant>,
    /// Results of orders with calls still running: an order with several invoices (a
    /// replacement and its original) is settled once all of them are, its job having one
    /// fate.
    parked: Vec<CallResult>,
}

impl Waves {
    fn accept(&mut self, result: Option<CallResult>) {
        let Some(result) = result else { return };
        let order = result.settle.invoice.order_id.clone();
        let left = self.calls_left.entry(order.clone()).or_insert(1);
        *left = left.saturating_sub(1);
        if *left > 0 {
            self.parked.push(result);
            return;
        }
        let (mine, others): (Vec<CallResult>, Vec<CallResult>) =
            std::mem::take(&mut self.parked).into_iter().partition(|r| r.settle.invoice.order_id == order);
        self.parked = others;
        self.ready.extend(mine);
        self.ready.push(result);
        self.ready_since.get_or_insert_with(tokio::time::Instant::now);
    }

    /// When the ready results stop waiting for the rest of the batch.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.ready_since.map(|since| since + EARLY_SETTLE_AFTER)
    }

    fn take(&mut self) -> Vec<CallResult> {
        self.ready_since = None;
        std::mem::take(&mut self.ready)
    }

    /// Everything not settled yet, once every call has ended.
    fn rest(mut self) -> Vec<CallResult> {
        self.ready.append(&mut self.parked);
        self.ready
    }
}

/// One claimed batch, as its processing shares it.
struct Batch<'a> {
    partition: u32,
    jobs: &'a [Job],
    /// Orders whose job lease was lost (see [`heartbeat`]).
    lost: &'a Arc<Mutex<HashSet<String>>>,
    /// Orders settled and handed back before the batch's slowest call ended.
    settled_early: &'a Arc<Mutex<HashSet<String>>>,
}

/// What a batch's reads and settlements decided for its orders' jobs.
#[derive(Default)]
struct Outcomes {
    /// Come back at the earliest of these times.
    wake: HashMap<String, DateTime<Utc>>,
    /// Failed for good, with the reason.
    fail_reason: HashMap<String, String>,
    /// Not sent: the worker is stopping.
    handed_back: HashSet<String>,
    /// Issued by this batch.
    issued: HashSet<String>,
}

impl Outcomes {
    fn fate_of(&self, order: &str, now: DateTime<Utc>) -> Fate {
        match (self.wake.get(order), self.fail_reason.get(order)) {
            (Some(at), reason) => Fate::RetryIn(
                (*at - now).to_std().unwrap_or(Duration::ZERO).max(Duration::from_millis(10)),
                reason.cloned().unwrap_or_else(|| "not finished".into()),
            ),
            (None, _) if self.handed_back.contains(order) => Fate::Release,
            (None, Some(error)) => Fate::Dead(error.clone()),
            (None, None) => Fate::Complete { issued: self.issued.contains(order) },
        }
    }
}

/// A provider call cut at `limit`, whatever it does inside (several HTTP requests with a
/// re-login): a cut call is an ambiguous outcome, and the lease it ran under covers `limit`.
async fn bounded(limit: Duration, call: futures::future::BoxFuture<'_, Call>) -> Call {
    match tokio::time::timeout(limit, call).await {
        Ok(call) => call,
        Err(_) => Call {
            outcome: crate::providers::Outcome::Ambiguous { code: "CALL_DEADLINE".into() },
            request: None,
            response: None,
            duration: limit,
        },
    }
}

fn prefail(inv: WorkInvoice, error: String) -> Settle {
    let expected_status: &'static str = match inv.status.as_str() {
        "ISSUING" => "ISSUING",
        "SUBMITTED" => "SUBMITTED",
        _ => "QUEUED",
    };
    let provider =
        inv.config_snapshot.get("provider").and_then(Value::as_str).unwrap_or("unknown").to_owned();
    Settle {
        invoice: inv,
        expected_status,
        owner: None,
        transition: Transition::Failed { error },
        provider,
        uncounted: false,
    }
}

#[derive(Deserialize)]
struct SnapshotCredentials {
    #[serde(rename = "keyId")]
    key_id: String,
    nonce: String,
    ciphertext: String,
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

/// Builds, validates and authorises one invoice's call; an error is permanent (data or
/// configuration), never sent to the provider.
fn prepare(
    deps: &Deps,
    inv: &WorkInvoice,
    step: Step,
    now: DateTime<Utc>,
) -> Result<(Arc<dyn Provider>, Target, PreparedDoc), String> {
    let snapshot = &inv.config_snapshot;
    // The read answers `null` for a shared snapshot that is not there (it is written with
    // its invoices, so only a damaged database lacks one).
    if snapshot.is_null() {
        return Err("the invoice's config snapshot is missing".into());
    }
    let text = |name: &str| snapshot.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
    let provider_name = text("provider");
    let provider = deps
        .providers
        .get(&provider_name)
        .ok_or_else(|| format!("provider `{provider_name}` is not supported"))?;

    // Deserialised from references: these values are large and cloning them was a measurable
    // share of a worker's CPU.
    let lines =
        Vec::<Line>::deserialize(&inv.lines).map_err(|e| format!("stored lines are unreadable: {e}"))?;
    let buyer: Option<Buyer> = match &inv.buyer {
        None | Some(Value::Null) => None,
        Some(b) => Some(Buyer::deserialize(b).map_err(|e| format!("stored buyer is unreadable: {e}"))?),
    };
    let seller = Seller::deserialize(snapshot.get("seller").unwrap_or(&Value::Null))
        .map_err(|e| format!("seller in the config snapshot is unreadable: {e}"))?;
    let replaces = match inv.replaces_invoice_id {
        None => None,
        Some(_) => {
            let original_snapshot = inv.original_snapshot.as_ref().unwrap_or(snapshot);
            let otext =
                |name: &str| original_snapshot.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
            Some(Original {
                invoice_no: inv.original_invoice_no.clone().unwrap_or_default(),
                issued_at: inv.original_issued_at.unwrap_or(now),
                template_code: otext("templateCode"),
                series: otext("series"),
                reason: inv
                    .replacement_reason
                    .clone()
                    .unwrap_or_else(|| "Thay thế theo yêu cầu của người mua".into()),
            })
        }
    };
    let doc = Document {
        invoice_id: inv.id,
        transaction_uuid: inv.transaction_uuid.clone(),
        template_code: text("templateCode"),
        series: text("series"),
        legal_time: inv.paid_at,
        issued_at: now,
        currency: inv.currency.clone(),
        seller: Seller {
            tax_code: if seller.tax_code.is_empty() { text("supplierTaxCode") } else { seller.tax_code },
            ..seller
        },
        buyer,
        lines,
        totals: Totals { net: inv.total_net, vat: inv.total_vat, gross: inv.total_amount },
        paid_total: inv.total_amount,
        replaces,
        consumer_wording: deps.settings.consumer_wording,
    };
    // Lookups need no valid document, only the key; creates must pass validation first.
    let prepared = match document::validate(&doc) {
        Ok(p) => Some(p),
        Err(e) if matches!(step, Step::Create | Step::LookupThenCreate) => {
            return Err(format!("validation: {e}"))
        }
        Err(_) => None,
    };
    let target = decrypt(deps, inv, snapshot)?;
    Ok((provider, target, PreparedDoc { doc, prepared }))
}

fn decrypt(deps: &Deps, inv: &WorkInvoice, snapshot: &Value) -> Result<Target, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let sealed = SnapshotCredentials::deserialize(snapshot.get("credentials").unwrap_or(&Value::Null))
        .map_err(|_| "the config snapshot has no sealed credentials".to_owned())?;
    let config_id: i64 = snapshot
        .get("configId")
        .and_then(|v| v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64()))
        .or(inv.provider_config_id)
        .ok_or("the config snapshot has no config id")?;
    let sealed = Sealed {
        key_id: sealed.key_id,
        nonce: b64.decode(sealed.nonce).map_err(|_| "sealed credentials: bad nonce".to_owned())?,
        ciphertext: b64
            .decode(sealed.ciphertext)
            .map_err(|_| "sealed credentials: bad ciphertext".to_owned())?,
    };
    let aad = crate::storage::seed::provider_config_aad(&inv.merchant_id, config_id);
    let plain = deps.keyring.open(&sealed, &aad).map_err(|e| e.to_string())?;
    let credentials: Credentials = serde_json::from_slice(plain.expose())
        .map_err(|_| "decrypted credentials are not {username, password}".to_owned())?;
    let text = |name: &str| snapshot.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
    Ok(Target {
        endpoint: text("endpoint"),
        supplier_tax_code: text("supplierTaxCode"),
        username: credentials.username,
        password: Secret::new(credentials.password),
    })
}

/// Renews the batch's leases every third of the lease; records jobs whose lease was lost.
async fn heartbeat(
    deps: Arc<Deps>,
    partition: u32,
    jobs: Vec<Job>,
    lost: Arc<Mutex<HashSet<String>>>,
    settled_early: Arc<Mutex<HashSet<String>>>,
    stop: CancellationToken,
) {
    let every = deps.settings.lease / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {},
            _ = stop.cancelled() => return,
        }
        let live: Vec<&Job> = {
            let lost = lost.lock().map(|l| l.clone()).unwrap_or_default();
            let early = settled_early.lock().map(|e| e.clone()).unwrap_or_default();
            jobs.iter().filter(|j| !lost.contains(&j.order_id) && !early.contains(&j.order_id)).collect()
        };
        let renewed = deps.queue.extend(partition, &live, deps.settings.lease).await.map(|mut gone| {
            // Completed while the renewal ran (settled early): finished, not lost.
            let early = settled_early.lock().map(|e| e.clone()).unwrap_or_default();
            gone.retain(|order| !early.contains(order));
            gone
        });
        match renewed {
            Ok(gone) if !gone.is_empty() => {
                tracing::warn!(
                    partition,
                    jobs = gone.len(),
                    "Issuance job leases lost; Postgres fencing keeps their writes out"
                );
                if let Ok(mut l) = lost.lock() {
                    l.extend(gone);
                }
            }
            Ok(_) => {}
            Err(error) => {
                deps.metrics.issuance.queue_error("extend");
                tracing::warn!(partition, %error, "Cannot renew issuance job leases");
            }
        }
    }
}

/// How long a series slot is held without renewal: what a crashed (kill -9) holder costs
/// its series. Short, because a crash frees nothing else; renewed at a third of it while the
/// batch's calls run.
const SERIES_LEASE: Duration = Duration::from_secs(3);
/// The longest pause between two tries for a busy series.
const SERIES_WAIT_MAX: Duration = Duration::from_millis(100);

/// One batch's calls to one (merchant, series). The limit of calls in flight per series holds
/// across every worker process: slots are leased in Redis (see `crate::queue`'s series
/// slots). The batch asks for as many as it has calls (up to the limit) in one script call,
/// when its first call needs one, runs its calls through the slots it got, and gives them all
/// back when its last call for the series ends: two round trips per batch and series rather
/// than per call.
struct SeriesShare {
    queue: crate::queue::Queue,
    key: SeriesKey,
    limit: usize,
    wanted: usize,
    permits: Arc<Semaphore>,
    /// This process's own limits, for when Redis cannot be asked.
    fallback: Arc<LocalSeriesLimits>,
    series: (String, String),
    metrics: crate::metrics::IssuanceMetrics,
    /// `None` until the first call asks; then `Some(None)` if Redis could not be asked.
    held: tokio::sync::Mutex<Option<Option<HeldSlots>>>,
}

/// The slots a [`SeriesShare`] got, with their renewal.
struct HeldSlots {
    tokens: Vec<String>,
    renewal: tokio::task::JoinHandle<()>,
}

/// Per-process semaphores per (merchant, series).
#[derive(Default)]
struct LocalSeriesLimits {
    semaphores: Mutex<HashMap<(String, String), Arc<Semaphore>>>,
}

impl LocalSeriesLimits {
    fn semaphore(&self, (merchant_id, series): (&str, &str), limit: usize) -> Arc<Semaphore> {
        let key = (merchant_id.to_owned(), series.to_owned());
        match self.semaphores.lock() {
            Ok(mut semaphores) => {
                semaphores.entry(key).or_insert_with(|| Arc::new(Semaphore::new(limit.max(1)))).clone()
            }
            Err(_) => Arc::new(Semaphore::new(limit.max(1))),
        }
    }
}

impl SeriesShare {
    fn new(
        queue: &crate::queue::Queue,
        (merchant_id, series): (&str, &str),
        limit: usize,
        wanted: usize,
        fallback: &Arc<LocalSeriesLimits>,
        metrics: &crate::metrics::IssuanceMetrics,
    ) -> Self {
        SeriesShare {
            queue: queue.clone(),
            key: queue.series_key(merchant_id, series),
            limit: limit.max(1),
            wanted: wanted.clamp(1, limit.max(1)),
            permits: Arc::new(Semaphore::new(0)),
            fallback: fallback.clone(),
            series: (merchant_id.to_owned(), series.to_owned()),
            metrics: metrics.clone(),
            held: tokio::sync::Mutex::new(None),
        }
    }

    /// Waits for one of the batch's slots. `None` when stopping (the caller hands its work
    /// back rather than sending).
    async fn slot(&self, stopping: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        let from = {
            let mut held = tokio::select! {
                held = self.held.lock() => held,
                _ = stopping.cancelled() => return None,
            };
            if held.is_none() {
                match self.take(stopping).await? {
                    Some(got) => {
                        self.permits.add_permits(got.tokens.len());
                        *held = Some(Some(got));
                    }
                    // Redis unreachable: this process's own limit for the series, which at
                    // least caps it per process as before the shared slots.
                    None => *held = Some(None),
                }
            }
            match &*held {
                Some(None) => self.fallback.semaphore((&self.series.0, &self.series.1), self.limit),
                _ => self.permits.clone(),
            }
        };
        tokio::select! {
            permit = from.acquire_owned() => permit.ok(),
            _ = stopping.cancelled() => None,
        }
    }

    /// Takes slots from Redis, waiting until at least one is free; `Some(None)` when Redis
    /// cannot be asked (a limiter must not stop issuance; the claim loop stops on its own when
    /// Redis is gone), `None` when stopping.
    async fn take(&self, stopping: &CancellationToken) -> Option<Option<HeldSlots>> {
        let mut tokens: Vec<String> =
            (0..self.wanted).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
        let mut pause = Duration::from_millis(2);
        let asked = std::time::Instant::now();
        let granted = loop {
            match self.queue.try_acquire_series(&self.key, &tokens, self.limit, SERIES_LEASE).await {
                Ok(0) => {
                    let jittered = pause.mul_f64(0.5 + rand::random::<f64>());
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {},
                        _ = stopping.cancelled() => return None,
                    }
                    pause = (pause * 2).min(SERIES_WAIT_MAX);
                }
                Ok(granted) => break granted,
                Err(error) => {
                    tracing::warn!(%error, "Cannot take series slots in Redis; this process's own limit applies");
                    return Some(None);
                }
            }
        };
        self.metrics.series_wait(asked.elapsed());
        tokens.truncate(granted);
        let renewal = tokio::spawn({
            let (queue, key, tokens) = (self.queue.clone(), self.key.clone(), tokens.clone());
            async move {
                // A tick every third of the lease, each renewal bounded by a tick: one slow
                // answer must not let the lease lapse unnoticed.
                let mut ticks = tokio::time::interval(SERIES_LEASE / 3);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    let renewed = tokio::time::timeout(
                        SERIES_LEASE / 3,
                        queue.renew_series(&key, &tokens, SERIES_LEASE),
                    );
                    match renewed.await {
                        Ok(Ok(live)) if live < tokens.len() => {
                            tracing::warn!(
                                "Series slots' lease ran out during calls; the limit may be passed briefly"
                            )
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "Cannot renew series slots"),
                        Err(_) => tracing::warn!("Renewing series slots timed out"),
                    }
                }
            }
        });
        Some(Some(HeldSlots { tokens, renewal }))
    }
}

impl Drop for SeriesShare {
    fn drop(&mut self) {
        let Some(Some(held)) = self.held.get_mut().take() else { return };
        held.renewal.abort();
        let (queue, key, tokens) = (self.queue.clone(), self.key.clone(), held.tokens);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = queue.release_series(&key, &tokens).await {
                    // Their lease frees them soon enough.
                    tracing::debug!(%error, "Cannot release series slots; their lease will");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_redis_the_batches_of_a_process_share_its_own_limit() {
        // Nothing listens on port 1: every ask for shared slots fails at once.
        let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:1")
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap();
        let queue = crate::queue::Queue::new(pool, 3, "iq-unit");
        let limits = Arc::new(LocalSeriesLimits::default());
        let metrics = crate::metrics::Metrics::new();
        let stopping = CancellationToken::new();
        // Two batches of one series, three calls each, a limit of two.
        let a = SeriesShare::new(&queue, ("M-1", "C26TAA"), 2, 3, &limits, &metrics.issuance);
        let b = SeriesShare::new(&queue, ("M-1", "C26TAA"), 2, 3, &limits, &metrics.issuance);
        let first = a.slot(&stopping).await.expect("a slot");
        let _second = b.slot(&stopping).await.expect("a slot");
        let third = tokio::time::timeout(Duration::from_millis(200), a.slot(&stopping)).await;
        assert!(third.is_err(), "a third call across the two batches went over the limit of 2");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), a.slot(&stopping)).await;
        assert!(matches!(third, Ok(Some(_))), "the freed slot was not handed on");
        // Another series has its own limit.
        let other = SeriesShare::new(&queue, ("M-1", "C26TAB"), 2, 1, &limits, &metrics.issuance);
        assert!(other.slot(&stopping).await.is_some());
        // Stopping gives up a wait.
        stopping.cancel();
        assert!(b.slot(&stopping).await.is_none());
    }
}
