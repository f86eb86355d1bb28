//! One assigned partition: read in offset order, batch, commit decisions and offset atomically
//! (a payment batch in one statement, a CDC batch in one transaction), retry transient
//! failures in place, dead-letter a message whose data Postgres refuses, follow Postgres when
//! fenced.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::consumer::{Ctx, PartitionQueue};
use super::deadletter::dead_letter;
use super::merchants::{self, Cache};
use super::{payments, BatchError, Deps};
use crate::events::Invalid;
use crate::storage::decisions::{insert_outbox, OffsetMove};
use crate::storage::{self, offsets, StorageError};

/// Most merchants one CDC partition task keeps in its cache.
const MERCHANT_CACHE_MAX: usize = 200_000;

/// Which input a partition belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `payment.succeeded.v1`
    Payment,
    /// `merchant.cdc.v1`
    MerchantCdc,
}

/// What the watchdog and the lag gauges read of a running partition.
#[derive(Debug)]
pub struct PartitionState {
    /// Next offset to process (= the stored next offset once committed).
    pub position: AtomicI64,
    /// Unix ms of the last committed batch (or of the assignment).
    pub last_progress_ms: AtomicI64,
    /// Kafka timestamp (Unix ms) of the last processed message, -1 if none.
    pub last_message_ts_ms: AtomicI64,
    /// One past the last message the task took from its queue, -1 if none: above `position`
    /// while a batch is in flight.
    pub received: AtomicI64,
    /// Asks the task to re-fetch from its position (stall or stray message).
    pub recover: Notify,
}

impl PartitionState {
    /// State for a partition starting at `position`.
    pub fn new(position: i64) -> PartitionState {
        PartitionState {
            position: AtomicI64::new(position),
            last_progress_ms: AtomicI64::new(now_ms()),
            last_message_ts_ms: AtomicI64::new(-1),
            received: AtomicI64::new(-1),
            recover: Notify::new(),
        }
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A running partition.
pub struct PartitionTask {
    /// The consumer (for seeks, offset stores and the assignment check).
    pub consumer: Arc<StreamConsumer<Ctx>>,
    /// This partition's own queue.
    pub queue: PartitionQueue,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Which input.
    pub kind: Kind,
    /// Shared dependencies.
    pub deps: Deps,
    /// The stored next offset this task believes in (`None`: no row yet).
    pub expected: Option<i64>,
    /// Stops the task (revoke, shutdown).
    pub cancel: CancellationToken,
    /// Shared with the watchdog.
    pub state: Arc<PartitionState>,
    /// Cancelled on an unrecoverable consumer error: the process exits non-zero.
    pub fatal: CancellationToken,
    /// Set after a failed hand-off to the issuance queue: until then the task leaves it to
    /// the sweeper instead of waiting on a Redis that does not answer after every batch.
    pub enqueue_paused_until: Option<Instant>,
    /// Messages dead-lettered in a row because Postgres refused them alone, with no message
    /// decided in between: past [`MAX_REFUSED_IN_A_ROW`] the refusals are the database's
    /// or the code's (a migration ahead of this binary, a bad bind), not the messages', and
    /// the partition waits instead of dead-lettering everything.
    pub refused_in_a_row: u32,
    /// When the log start was last read for a gap in offsets.
    pub last_gap_check: Option<Instant>,
}

/// How often a small gap in offsets (a commit marker, usually) is checked against the log
/// start.
const GAP_CHECK_EVERY: Duration = Duration::from_secs(10);

/// See [`PartitionTask::refused_in_a_row`].
const MAX_REFUSED_IN_A_ROW: u32 = 3;

/// The longest a batch's hand-off to the issuance queue may hold up the next batch.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed hand-off leaves the queue to the sweeper.
const ENQUEUE_PAUSE: Duration = Duration::from_secs(10);

enum Committed {
    Yes,
    Fenced,
    Cancelled,
}

impl PartitionTask {
    fn position(&self) -> i64 {
        self.state.position.load(Ordering::Acquire)
    }

    fn seek(&self, offset: i64) {
        // Seek with a zero timeout is asynchronous; prefetched messages of the old position
        // are discarded by librdkafka, and `run` drops any older offset that slips through.
        if let Err(error) =
            self.consumer.seek(&self.topic, self.partition, Offset::Offset(offset), Duration::from_secs(0))
        {
            tracing::warn!(topic = %self.topic, partition = self.partition, offset, %error, "Seek failed");
        }
    }

    fn owned(&self) -> bool {
        match self.consumer.assignment() {
            Ok(tpl) => tpl.find_partition(&self.topic, self.partition).is_some(),
            Err(_) => false,
        }
    }

    /// Runs until cancelled.
    pub async fn run(mut self) {
        let mut cache = Cache::new();
        if self.kind == Kind::Payment {
            // At zero from the start: `increase()` misses a counter's first value.
            self.deps.metrics.offset_gap(&self.topic, self.partition, 0);
        }
        tracing::info!(topic = %self.topic, partition = self.partition, position = self.position(), "Partition task started");
        loop {
            let first = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                _ = self.state.recover.notified() => {
                    self.seek(self.position());
                    continue;
                }
                received = self.queue.recv() => received.map(|m| m.detach()),
            };
            let first = match first {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, %error, "Consumer error");
                    if matches!(error, rdkafka::error::KafkaError::MessageConsumptionFatal(_)) {
                        self.fatal.cancel();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut batch = vec![first];
            let linger_until = tokio::time::Instant::now() + self.deps.settings.batch_linger;
            while batch.len() < self.deps.settings.batch_max {
                match tokio::time::timeout_at(linger_until, self.queue.recv()).await {
                    Ok(Ok(message)) => batch.push(message.detach()),
                    Ok(Err(error)) => {
                        tracing::warn!(topic = %self.topic, partition = self.partition, %error, "Consumer error");
                        break;
                    }
                    Err(_) => break,
                }
            }
            if let Some(last) = batch.last() {
                self.state.received.fetch_max(last.offset() + 1, Ordering::AcqRel);
            }
            // After a seek, messages from before the position may still be queued.
            let position = self.position();
            batch.retain(|m| m.offset() >= position);
            let Some(first_offset) = batch.first().map(|m| m.offset()) else { continue };
            // The payment topic is not compacted: a jump past the stored position may mean
            // messages that will never be decided (retention passed them, or the offset was
            // reset). Compaction makes gaps normal on CDC.
            // A gap of one or two offsets is most often a transactional producer's commit
            // marker, on every batch: those are checked at most every GAP_CHECK_EVERY, not
            // with a broker round trip per batch.
            if self.kind == Kind::Payment && self.expected.is_some() && first_offset > position {
                let small = first_offset - position <= 2;
                let checked_lately = self.last_gap_check.is_some_and(|at| at.elapsed() < GAP_CHECK_EVERY);
                if !(small && checked_lately) {
                    self.last_gap_check = Some(Instant::now());
                    self.report_gone(position, first_offset).await;
                }
            }
            match self.commit(&batch, &mut cache).await {
                Committed::Yes | Committed::Fenced => {}
                Committed::Cancelled => break,
            }
        }
        tracing::info!(topic = %self.topic, partition = self.partition, position = self.position(), "Partition task stopped");
    }

    /// Offsets between the stored position and the first message fetched hold either the
    /// commit and abort markers (and aborted messages) of a transactional producer, which is
    /// normal, or messages the log no longer has, which is loss. Only the log start tells
    /// them apart; it is read only when a gap shows.
    async fn report_gone(&self, position: i64, first_offset: i64) {
        let (consumer, topic, partition) = (self.consumer.clone(), self.topic.clone(), self.partition);
        let log_start = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(2)).map(|(low, _)| low)
        })
        .await;
        match log_start {
            Ok(Ok(log_start)) if log_start > position => {
                let skipped = log_start.min(first_offset) - position;
                self.deps.metrics.offset_gap(&self.topic, self.partition, skipped);
                tracing::error!(topic = %self.topic, partition = self.partition, position, first_offset, log_start, skipped,
                    "Messages between the stored offset and the log start are gone");
            }
            Ok(Ok(_)) => {
                tracing::debug!(topic = %self.topic, partition = self.partition, position, first_offset,
                "Offsets without messages skipped (transaction markers)")
            }
            Ok(Err(error)) => {
                tracing::warn!(topic = %self.topic, partition = self.partition, position, first_offset, %error,
                "Offsets skipped and the log start unreadable: messages may be gone")
            }
            Err(_) => {}
        }
    }

    async fn commit(&mut self, batch: &[OwnedMessage], cache: &mut Cache) -> Committed {
        self.commit_as(batch, cache, None).await
    }

    /// Commits `batch`: decided as usual, or (`refused`: why Postgres refused it alone)
    /// dead-lettered whole.
    async fn commit_as(
        &mut self,
        batch: &[OwnedMessage],
        cache: &mut Cache,
        refused: Option<&str>,
    ) -> Committed {
        let next = batch.last().map(|m| m.offset() + 1).unwrap_or_else(|| self.position());
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let result = match refused {
                None => self.try_commit(batch, next, cache).await,
                Some(reason) => self.try_dead_letter(batch, next, reason).await,
            };
            match result {
                Ok(()) => {
                    self.refused_in_a_row = if refused.is_some() { self.refused_in_a_row + 1 } else { 0 };
                    self.deps.metrics.batch_committed(&self.topic, batch.len(), started.elapsed());
                    self.expected = Some(next);
                    self.state.position.store(next, Ordering::Release);
                    self.state.last_progress_ms.store(now_ms(), Ordering::Release);
                    if let Some(ts) = batch.last().and_then(|m| m.timestamp().to_millis()) {
                        self.state.last_message_ts_ms.store(ts, Ordering::Release);
                    }
                    // The Kafka-side mirror for lag tools; auto-commit sends it.
                    let mut tpl = TopicPartitionList::new();
                    if tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(next)).is_ok() {
                        if let Err(error) = self.consumer.store_offsets(&tpl) {
                            tracing::debug!(topic = %self.topic, partition = self.partition, %error, "Offset mirror not stored");
                        }
                    }
                    return Committed::Yes;
                }
                Err(BatchError::Fenced { stored }) => {
                    // What this task believed may be wrong (someone else committed, or our own
                    // commit succeeded unseen): start the merchant cache afresh.
                    cache.clear();
                    self.deps.metrics.offset_fenced(&self.topic, self.partition);
                    tracing::warn!(topic = %self.topic, partition = self.partition, expected = ?self.expected, stored = ?stored,
                        "Stored offset moved by another owner; following Postgres");
                    if !self.owned() {
                        // A zombie: stay idle until the coordinator revokes this task (it
                        // may also turn out to own the partition again, after a rebalance).
                        self.cancel.cancelled().await;
                        return Committed::Cancelled;
                    }
                    let resume = stored.unwrap_or(0);
                    self.expected = stored;
                    self.state.position.store(resume, Ordering::Release);
                    self.seek(resume);
                    return Committed::Fenced;
                }
                Err(BatchError::Storage(StorageError::Refused(reason)))
                    if refused.is_none()
                        && (batch.len() > 1 || self.refused_in_a_row < MAX_REFUSED_IN_A_ROW) =>
                {
                    // Retrying the same values fails the same way, for ever: find the message
                    // Postgres refuses and dead-letter it (SPEC §1.4: a poison message never
                    // stalls its partition). Nothing was written.
                    cache.clear();
                    tracing::warn!(topic = %self.topic, partition = self.partition, messages = batch.len(),
                        first_offset = batch.first().map(|m| m.offset()), error = %reason,
                        "Postgres refused the batch's data; isolating the message it refuses");
                    return self.isolate(batch, cache, &reason).await;
                }
                Err(error) => {
                    if matches!(error, BatchError::Storage(StorageError::Refused(_))) && refused.is_none() {
                        tracing::error!(topic = %self.topic, partition = self.partition, offset = batch.first().map(|m| m.offset()),
                            refused_in_a_row = self.refused_in_a_row,
                            "Postgres refuses message after message: the cause is the database or this build, not the input; the partition waits");
                    }
                    // The commit may have happened even if we saw an error.
                    cache.clear();
                    self.deps.metrics.stream_transaction_retried(&self.topic);
                    tracing::warn!(topic = %self.topic, partition = self.partition, %error, retry_in_ms = backoff.as_millis() as u64,
                        "Batch failed; retrying in place");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return Committed::Cancelled,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Halves a refused batch until the message refused alone is found, committing the
    /// others as usual: about 2·log2(batch) extra transactions, only when it happens.
    async fn isolate(&mut self, batch: &[OwnedMessage], cache: &mut Cache, reason: &str) -> Committed {
        if batch.len() == 1 {
            return Box::pin(self.commit_as(batch, cache, Some(reason))).await;
        }
        let (first, second) = batch.split_at(batch.len() / 2);
        for half in [first, second] {
            match Box::pin(self.commit_as(half, cache, None)).await {
                Committed::Yes => {}
                other => return other,
            }
        }
        Committed::Yes
    }

    /// Moves the offset past `batch` and dead-letters its messages, in one transaction.
    async fn try_dead_letter(
        &mut self,
        batch: &[OwnedMessage],
        next: i64,
        reason: &str,
    ) -> Result<(), BatchError> {
        let deps = &self.deps;
        let invalid = Invalid(format!("refused by the database: {reason}"));
        storage::with_deadline(&deps.db, deps.settings.work_deadline, async |conn| {
            let mut tx = self.begin_moved(conn, next).await?;
            let dead: Vec<_> =
                batch.iter().map(|m| dead_letter(&deps.topics.deadletter, m, &invalid)).collect();
            insert_outbox(&mut tx, &dead).await?;
            tx.commit().await?;
            Ok::<_, BatchError>(())
        })
        .await?;
        for message in batch {
            tracing::error!(topic = %self.topic, partition = self.partition, offset = message.offset(),
                error = %invalid.sanitized(), "Message refused by the database; dead-lettered");
        }
        deps.metrics.consumed(&self.topic, "dead_lettered", batch.len() as u64);
        deps.metrics.dead_lettered(&self.topic, batch.len() as u64);
        Ok(())
    }

    /// Opens the batch's transaction and moves the stored offset first: its row lock
    /// serialises two owners of the partition, and the loser sees the new value (fenced).
    async fn begin_moved<'c>(
        &self,
        conn: &'c mut sqlx::PgConnection,
        next: i64,
    ) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, BatchError> {
        let deps = &self.deps;
        let mut tx = sqlx::Connection::begin(conn).await?;
        if !offsets::compare_and_set(
            &mut tx,
            &deps.group_id,
            &self.topic,
            self.partition,
            self.expected,
            next,
        )
        .await?
        {
            let stored = offsets::current(&mut tx, &deps.group_id, &self.topic, self.partition).await?;
            tx.rollback().await?;
            return Err(BatchError::Fenced { stored });
        }
        Ok(tx)
    }

    async fn try_commit(
        &mut self,
        batch: &[OwnedMessage],
        next: i64,
        cache: &mut Cache,
    ) -> Result<(), BatchError> {
        match self.kind {
            Kind::Payment => self.commit_payments(batch, next).await,
            Kind::MerchantCdc => self.commit_cdc(batch, next, cache).await,
        }
    }

    /// A CDC batch: one transaction that moves the offset first (its row lock serialises two
    /// owners), then applies the changes.
    async fn commit_cdc(
        &mut self,
        batch: &[OwnedMessage],
        next: i64,
        cache: &mut Cache,
    ) -> Result<(), BatchError> {
        let deps = &self.deps;
        let summary = storage::with_deadline(&deps.db, deps.settings.work_deadline, async |conn| {
            let mut tx = self.begin_moved(conn, next).await?;
            let summary = merchants::process(deps, &mut tx, self.partition, batch, cache).await?;
            tx.commit().await?;
            Ok::<_, BatchError>(summary)
        })
        .await?;
        // Bounded: a partition with more merchants than this starts over (a miss costs
        // one query per batch, not correctness).
        if cache.len() + summary.cache_updates.len() > MERCHANT_CACHE_MAX {
            cache.clear();
        }
        for (merchant, stored) in summary.cache_updates {
            cache.insert(merchant, stored);
        }
        for merchant in &summary.cache_evictions {
            cache.remove(merchant);
        }
        let processed = batch.len() as u64 - summary.dead_lettered - summary.tombstones;
        deps.metrics.consumed(&self.topic, "processed", processed);
        deps.metrics.consumed(&self.topic, "tombstone", summary.tombstones);
        deps.metrics.consumed(&self.topic, "dead_lettered", summary.dead_lettered);
        deps.metrics.dead_lettered(&self.topic, summary.dead_lettered);
        for outcome in summary.outcomes {
            deps.metrics.cdc_update(outcome.as_str());
        }
        Ok(())
    }

    /// A payment batch: facts read, then one statement that moves the offset and writes every
    /// row (see [`payments::process`]).
    async fn commit_payments(&mut self, batch: &[OwnedMessage], next: i64) -> Result<(), BatchError> {
        let deps = &self.deps;
        let offset = OffsetMove {
            group: &deps.group_id,
            topic: &self.topic,
            partition: self.partition,
            expected: self.expected,
            next,
        };
        let summary = storage::with_deadline(&deps.db, deps.settings.work_deadline, async |conn| {
            match payments::process(deps, conn, self.partition, batch, offset).await? {
                Some(summary) => Ok(summary),
                None => {
                    let stored = offsets::current(conn, &deps.group_id, &self.topic, self.partition).await?;
                    Err(BatchError::Fenced { stored })
                }
            }
        })
        .await?;
        let processed = batch.len() as u64 - summary.dead_lettered;
        deps.metrics.consumed(&self.topic, "processed", processed);
        deps.metrics.consumed(&self.topic, "dead_lettered", summary.dead_lettered);
        deps.metrics.dead_lettered(&self.topic, summary.dead_lettered);
        deps.metrics.claim("opened", summary.claims_opened);
        for (outcome, reason) in &summary.decisions {
            deps.metrics.decision(outcome, reason);
        }
        for (order_id, merchant_id, outcome, reason, invoice_id) in &summary.log {
            tracing::info!(orderId = %order_id, merchantId = %merchant_id, partition = self.partition,
                outcome = %outcome, reason = %reason, invoiceId = *invoice_id, "[handlePaymentSuccess] decided");
        }
        // Hand-off to the issuance queue, after the commit (a job must never point at
        // an uncommitted invoice). A failure here loses nothing: the invoices are
        // QUEUED in Postgres and the sweeper enqueues them.
        if let Some(queue) = &deps.queue {
            let queued: Vec<(String, String)> = summary
                .log
                .iter()
                .filter(|(_, _, outcome, _, _)| *outcome == "queued")
                .map(|(order, merchant, ..)| (order.clone(), merchant.clone()))
                .collect();
            let paused = self.enqueue_paused_until.is_some_and(|until| Instant::now() < until);
            if !queued.is_empty() && !paused {
                let handed = tokio::time::timeout(
                    ENQUEUE_TIMEOUT,
                    crate::issuance::enqueue(queue, &deps.metrics, &queued, "stream"),
                )
                .await;
                let error = match handed {
                    Ok(Ok(_)) => None,
                    // Counted by `enqueue`.
                    Ok(Err(error)) => Some(error.to_string()),
                    Err(_) => {
                        deps.metrics.issuance.queue_error("enqueue");
                        Some(format!("no answer within {ENQUEUE_TIMEOUT:?}"))
                    }
                };
                self.enqueue_paused_until = error.as_ref().map(|_| Instant::now() + ENQUEUE_PAUSE);
                if let Some(error) = error {
                    tracing::warn!(%error, jobs = queued.len(), partition = self.partition, pause_s = ENQUEUE_PAUSE.as_secs(),
                        "Cannot enqueue issuance jobs; the sweeper will");
                }
            }
        }
        Ok(())
    }
}
