//! The outbox relay: publishes what transactions wrote to the `outbox` table (lifecycle
//! events, dead letters) to Kafka, each key's rows in id order, then deletes what Kafka
//! acknowledged. One relay runs at a time across all processes (a Postgres advisory lock), so
//! events of an order keep their order. A crash between publishing and marking re-publishes
//! the same rows with the same `eventId`: duplicates only across a crash, never a loss.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::storage::{self, outbox};

/// Most rows one read takes.
const BATCH: usize = 1000;
/// Most rows held at once (in flight, settling, waiting to be resent or waiting for their
/// key). A fault that holds this many for a whole delivery timeout stalls the others until it
/// ends; librdkafka's own queue holds ten times as many.
const MAX_HELD: usize = 10_000;
/// How long a row whose send failed waits before it is sent again (its key's later rows wait
/// with it; other keys go on).
const RESEND_AFTER: Duration = Duration::from_secs(1);
/// How long the relay gathers delivery reports after the first before it settles them.
const GATHER: Duration = Duration::from_millis(10);
/// Longest a read may take on the lock connection (a half-open one would never answer, and the
/// lock may be gone with it).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling backs off from the first to the second while the outbox stays empty.
const IDLE_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(5);
const GAUGES_EVERY: Duration = Duration::from_secs(10);
/// Longest a relay connection may take to connect, take the lock or answer a ping. A
/// Postgres that vanished without closing its connections (a lost node) leaves them
/// half-open, and the kernel gives up on them only after ~15 minutes: the relay would wait
/// that long, publishing nothing and holding up a shutdown.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relay that stops leading waits for its sends in flight, so that what Kafka
/// acknowledged is deleted rather than sent again by the next leader: a send ends within the
/// producer's `message.timeout.ms` (25 s), delivered or failed.
const FINISH_WITHIN: Duration = Duration::from_secs(30);

/// When a leader that cannot reach the brokers hands the lead over.
#[derive(Debug, Clone, Copy)]
pub struct StepDown {
    /// A leader whose passes delivered nothing for this long, its sends failing because no
    /// broker answered, hands the lead over if another process stands by: the fault may be
    /// its own (its route to the brokers). A minute by default.
    pub after: Duration,
    /// How long it then waits before it tries to lead again, so that the others, which retry
    /// every 2 s, take the lock first. 20 s by default.
    pub pause: Duration,
}

impl Default for StepDown {
    fn default() -> Self {
        StepDown { after: Duration::from_secs(60), pause: Duration::from_secs(20) }
    }
}

/// Builds a new Kafka producer for the relay, after the one it had failed for good
/// (librdkafka's fatal error: it delivers nothing more).
pub type Rebuild = std::sync::Arc<dyn Fn() -> Result<FutureProducer, String> + Send + Sync>;

/// Whether the lock connection still answers, within [`CONNECTION_TIMEOUT`].
async fn answers(conn: &mut PgConnection) -> Result<(), String> {
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 5 s".to_owned()),
    }
}

/// Runs the relay until `shutdown`; only the process holding the lock publishes.
pub async fn run(
    db: PgPool,
    database_url: String,
    producer: FutureProducer,
    rebuild: Rebuild,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    run_with(db, database_url, producer, rebuild, metrics, shutdown, StepDown::default()).await
}

/// [`run`], handing the lead over as `step_down` says.
pub async fn run_with(
    db: PgPool,
    database_url: String,
    mut producer: FutureProducer,
    rebuild: Rebuild,
    metrics: Metrics,
    shutdown: CancellationToken,
    step_down: StepDown,
) {
    let mut last_gauges = tokio::time::Instant::now();
    let mut standby = None;
    'lead: loop {
        if shutdown.is_cancelled() {
            return;
        }
        let led = tokio::select! {
            led = lead(&database_url, &mut standby) => led,
            _ = shutdown.cancelled() => return,
        };
        let mut leader = match led {
            Some(conn) => conn,
            None => {
                // Only the leader's figures are true; a follower (maybe a former leader)
                // reports none, so `max` over the processes is the leader's.
                metrics.outbox_backlog(0);
                metrics.outbox_parked(0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue 'lead,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        tracing::info!("Outbox relay leading");
        let mut relay = Relay::default();
        let mut idle = IDLE_POLL.0;
        let mut last_check = tokio::time::Instant::now();
        loop {
            if shutdown.is_cancelled() {
                relay.finish(&db, &metrics, tokio::time::Instant::now() + FINISH_WITHIN).await;
                let _closed = leader.close().await;
                return;
            }
            // The lock lives on this connection: if it is gone, so is the leadership. (Every
            // read, and so every send, goes through it too.)
            if last_check.elapsed() >= LOCK_CHECK_EVERY {
                last_check = tokio::time::Instant::now();
                if let Err(error) = answers(&mut leader).await {
                    tracing::warn!(%error, "Outbox relay lost its lock connection");
                    relay.finish(&db, &metrics, tokio::time::Instant::now() + FINISH_WITHIN).await;
                    continue 'lead;
                }
            }
            relay.record_ready();
            let step = async {
                let settled = relay.settle(&db, &metrics).await?;
                relay.release_due();
                let sent = relay.send_more(&producer, &mut leader).await?;
                Ok::<_, storage::StorageError>((settled, sent))
            };
            let (settled, sent) = match step.await {
                Ok(step) => step,
                Err(error) => {
                    tracing::warn!(%error, "Outbox relay pass failed; retrying");
                    relay.finish(&db, &metrics, tokio::time::Instant::now() + FINISH_WITHIN).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue 'lead;
                }
            };
            if relay.held.is_empty() {
                // Nothing left to send: an earlier run of unanswered sends is over.
                relay.cut_off_since = None;
            }
            let hand_over = if let Some((code, reason)) = producer.client().fatal_error() {
                // It delivers nothing more. Another process leads meanwhile, if there is one.
                tracing::error!(?code, %reason, "Outbox relay's Kafka producer failed for good; handing the lead over and building a new one");
                match rebuild() {
                    Ok(new) => producer = new,
                    Err(error) => {
                        tracing::error!(%error, "Outbox relay cannot build a new Kafka producer; will try again")
                    }
                }
                true
            } else {
                // Sends that reached no broker, and none acknowledged since, for
                // `step_down.after`: the fault may be this process' route, if another process
                // stands by to try its own.
                match relay.cut_off_since {
                    Some(since) if settled.unreachable > 0 && since.elapsed() >= step_down.after => {
                        outbox::relays_standing_by(&db).await.unwrap_or(0) > 0 && {
                            tracing::warn!(
                                seconds = since.elapsed().as_secs(),
                                "Outbox relay reached no Kafka broker; handing the lead to another process"
                            );
                            true
                        }
                    }
                    _ => false,
                }
            };
            if hand_over {
                relay.finish(&db, &metrics, tokio::time::Instant::now() + FINISH_WITHIN).await;
                let _closed = leader.close().await;
                tokio::select! {
                    _ = tokio::time::sleep(step_down.pause) => continue 'lead,
                    _ = shutdown.cancelled() => return,
                }
            }
            idle = if sent > 0 || settled.published > 0 { IDLE_POLL.0 } else { (idle * 2).min(IDLE_POLL.1) };
            // Until a delivery report comes in, a failed row is due again, or it is time to
            // look for new rows.
            let mut wake = tokio::time::Instant::now() + idle;
            if let Some(due) = relay.next_resend() {
                wake = wake.min(due);
            }
            tokio::select! {
                Some(done) = relay.in_flight.next() => {
                    relay.record(done);
                    // The reports of one produce request come together, and more follow:
                    // settled and followed by a read each, they cost Postgres a round of
                    // statements per few rows (8 times the reads of lockstep passes at 2,000
                    // payments/s in `make bench`).
                    tokio::select! {
                        _ = tokio::time::sleep(GATHER) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.cancelled() => {}
            }
            if last_gauges.elapsed() >= GAUGES_EVERY {
                last_gauges = tokio::time::Instant::now();
                if let Ok((backlog, parked)) = outbox::backlog_and_parked(&db).await {
                    metrics.outbox_backlog(backlog);
                    metrics.outbox_parked(parked);
                    if parked > 0 {
                        tracing::error!(
                            parked,
                            "Outbox rows parked after repeated publication failures; later rows of their keys wait behind them"
                        );
                    }
                }
            }
        }
    }
}

/// Tries to take the relay's lock on the standby connection (connecting first when there is
/// none). The connection is kept between tries: a follower reconnecting every 2 s cost
/// Postgres a backend start each time, per process, for as long as it ran.
async fn lead(database_url: &str, standby: &mut Option<PgConnection>) -> Option<PgConnection> {
    if standby.is_none() {
        let options = match storage::connect_options(database_url, outbox::RELAY_APPLICATION) {
            Ok(options) => options,
            Err(error) => {
                tracing::error!(%error, "Outbox relay cannot connect");
                return None;
            }
        };
        match tokio::time::timeout(CONNECTION_TIMEOUT, PgConnection::connect_with(&options)).await {
            Ok(Ok(conn)) => *standby = Some(conn),
            Ok(Err(error)) => {
                tracing::warn!(error = %storage::StorageError::from(error), "Outbox relay cannot connect; retrying");
                return None;
            }
            Err(_) => {
                tracing::warn!("Outbox relay cannot connect within 5 s; retrying");
                return None;
            }
        }
    }
    let conn = standby.as_mut()?;
    match tokio::time::timeout(CONNECTION_TIMEOUT, outbox::try_lead(conn)).await {
        Ok(Ok(true)) => standby.take(),
        Ok(Ok(false)) => None,
        Ok(Err(error)) => {
            tracing::warn!(%error, "Outbox relay cannot take its lock; retrying on a new connection");
            *standby = None;
            None
        }
        Err(_) => {
            tracing::warn!(
                "Outbox relay's lock request got no answer within 5 s; retrying on a new connection"
            );
            *standby = None;
            None
        }
    }
}

/// What the relay settled: rows acknowledged (and deleted), sends that failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Rows Kafka acknowledged (and that were deleted).
    pub published: usize,
    /// Sends that failed (their rows stay).
    pub failed: usize,
    /// Of those, sends that failed because no broker answered.
    pub unreachable: usize,
}

/// One pass of a relay that holds nothing: reads up to one batch, sends the first row of each
/// key in it (and rows without a key), and waits for every send. `leader` is the connection
/// holding the relay lock; the rows are read on it.
pub async fn publish_once(
    db: &PgPool,
    producer: &FutureProducer,
    metrics: &Metrics,
    leader: &mut PgConnection,
) -> Result<Pass, storage::StorageError> {
    let mut relay = Relay::default();
    relay.send_more(producer, leader).await?;
    while let Some(done) = relay.in_flight.next().await {
        relay.record(done);
    }
    relay.settle(db, metrics).await
}

/// A (topic, key): its rows go out one at a time, in id order.
type Key = (String, Vec<u8>);

/// A row handed to the producer.
struct Sent {
    id: i64,
    topic: String,
    key: Option<Key>,
    at: tokio::time::Instant,
}

impl Sent {
    fn of(row: &outbox::Pending) -> Sent {
        Sent {
            id: row.id,
            topic: row.topic.clone(),
            key: row.message_key.clone().map(|key| (row.topic.clone(), key)),
            at: tokio::time::Instant::now(),
        }
    }
}

type Delivery = (Sent, Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>);

/// A failed send, to be recorded on its row.
struct Failure {
    sent: Sent,
    error: String,
    /// The row itself is at fault: it counts toward parking the row.
    counts: bool,
    unreachable: bool,
}

/// The relay's sends in flight, and what it holds until they are settled.
///
/// Sends are pipelined: rows are read and handed to the producer while earlier sends are
/// still in flight, and each is settled when its own acknowledgement comes. A slow send
/// (a partition without enough in-sync replicas, a topic that is missing: each waits out
/// `message.timeout.ms`) holds back its own key only, not a batch of other keys' rows. A key
/// has at most one row in flight: sent together, a later event of an order could be
/// acknowledged while an earlier one failed (a delivery timeout leaves gaps even with
/// idempotence on), and the retry would put the earlier one after it. Rows read while their
/// key is busy wait in memory, left out of reads by id, so that keys waiting behind slow sends
/// never fill the read window (left out by key instead, in SQL, the planner sorted the
/// backlog); once the row ahead is acknowledged the next goes out without being read again.
#[derive(Default)]
struct Relay {
    in_flight: FuturesUnordered<BoxFuture<'static, Delivery>>,
    /// Rows read and not yet settled (sending, acknowledged, failed, waiting to be resent,
    /// waiting for their key or ready to go): reads leave them out.
    held: HashSet<i64>,
    /// The keys with a row sent (or ready to be) and not yet settled, with that row.
    busy: HashMap<Key, i64>,
    /// Rows read while their key was busy, in id order.
    waiting: HashMap<Key, VecDeque<outbox::Pending>>,
    /// Rows whose key's previous row was acknowledged: the next to send, before any read.
    ready: VecDeque<outbox::Pending>,
    acknowledged: Vec<Sent>,
    failed: Vec<Failure>,
    /// Failed rows, in the order they become due again.
    resend: VecDeque<(tokio::time::Instant, Sent)>,
    /// When the last acknowledgement came.
    last_ack: Option<tokio::time::Instant>,
    /// Since when sends have failed unanswered, none acknowledged since.
    cut_off_since: Option<tokio::time::Instant>,
}

impl Relay {
    /// Reads what is due (as much as [`MAX_HELD`] leaves room for) and hands it to the
    /// producer, after the rows already [`ready`](Relay::ready): the first row of each key
    /// not held, and rows without a key; later rows of held keys wait. The read goes first
    /// even when nothing is left to read: it proves the lock is still held. Returns how many
    /// rows were sent.
    async fn send_more(
        &mut self,
        producer: &FutureProducer,
        leader: &mut PgConnection,
    ) -> Result<usize, storage::StorageError> {
        let room = MAX_HELD.saturating_sub(self.held.len()).min(BATCH);
        if room == 0 && self.ready.is_empty() {
            return Ok(0);
        }
        let held: Vec<i64> = self.held.iter().copied().collect();
        let rows =
            tokio::time::timeout(READ_TIMEOUT, outbox::pending(leader, room as i64, &held)).await.map_err(
                |_| storage::StorageError::Unavailable("outbox relay read got no answer".into()),
            )??;
        let mut sent = 0;
        while let Some(row) = self.ready.pop_front() {
            // Already held, its key busy with it.
            match self.send(producer, &row, Sent::of(&row)) {
                Ok(()) => sent += 1,
                Err(_) => {
                    self.ready.push_front(row);
                    return Ok(sent);
                }
            }
        }
        for row in rows {
            let sending = Sent::of(&row);
            if let Some(key) = sending.key.as_ref().filter(|key| self.busy.contains_key(*key)) {
                self.held.insert(row.id);
                self.waiting.entry(key.clone()).or_default().push_back(row);
                continue;
            }
            self.held.insert(sending.id);
            if let Some(key) = &sending.key {
                self.busy.insert(key.clone(), sending.id);
            }
            match self.send(producer, &row, sending) {
                Ok(()) => sent += 1,
                Err(sending) => {
                    // Not handed over: it is read again.
                    self.release(&sending);
                    break;
                }
            }
        }
        Ok(sent)
    }

    /// Hands a held row to the producer; `Err` (with `sending` back) when its queue is full
    /// and nothing was sent.
    fn send(&mut self, producer: &FutureProducer, row: &outbox::Pending, sending: Sent) -> Result<(), Sent> {
        match producer.send_result(record(row)) {
            Ok(delivery) => {
                self.in_flight.push(async move { (sending, delivery.await) }.boxed());
                Ok(())
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(sending),
            Err((error, _)) => {
                self.fail(failure(sending, &error));
                Ok(())
            }
        }
    }

    /// Takes in one delivery report.
    fn record(&mut self, (sent, result): Delivery) {
        match result {
            Ok(Ok(_)) => {
                self.last_ack = Some(tokio::time::Instant::now());
                self.cut_off_since = None;
                self.acknowledged.push(sent);
            }
            Ok(Err((error, _))) => self.fail(failure(sent, &error)),
            // The producer went away with the send (it was replaced): it may have been
            // delivered, or not; the row is resent.
            Err(_) => self.fail(Failure {
                error: "the producer was dropped before it reported the delivery".to_owned(),
                counts: false,
                unreachable: false,
                sent,
            }),
        }
    }

    fn fail(&mut self, failure: Failure) {
        if failure.unreachable {
            // Counted from when the send started, but never from before an acknowledgement.
            let since = match self.last_ack {
                Some(ack) => failure.sent.at.max(ack),
                None => failure.sent.at,
            };
            self.cut_off_since.get_or_insert(since);
        }
        self.failed.push(failure);
    }

    /// Takes in every delivery report already in.
    fn record_ready(&mut self) {
        while let Some(Some(done)) = self.in_flight.next().now_or_never() {
            self.record(done);
        }
    }

    /// Deletes the acknowledged rows and records the failed sends, in one statement each
    /// (which are resent after [`RESEND_AFTER`], their keys' later rows waiting behind them).
    /// What fails to be written stays to be settled again.
    async fn settle(&mut self, db: &PgPool, metrics: &Metrics) -> Result<Pass, storage::StorageError> {
        let mut pass = Pass::default();
        if !self.acknowledged.is_empty() {
            let ids: Vec<i64> = self.acknowledged.iter().map(|sent| sent.id).collect();
            outbox::mark_published(db, &ids).await?;
            let mut per_topic: HashMap<String, u64> = HashMap::new();
            for sent in std::mem::take(&mut self.acknowledged) {
                *per_topic.entry(sent.topic.clone()).or_default() += 1;
                self.next_of_key(&sent);
            }
            for (topic, n) in per_topic {
                metrics.outbox_published(&topic, n);
            }
            pass.published = ids.len();
        }
        if !self.failed.is_empty() {
            // Only a failure that the row itself causes (too large, malformed) counts toward
            // parking it, so a poison row cannot block other keys (its own key's later rows
            // wait behind it, for an operator: see `outbox::pending`); Kafka being down or slow
            // (the delivery timeout passed), however long, parks nothing: a parked event waits
            // for an operator, and a parked `claim_opened` keeps its clear token meanwhile.
            let failures: Vec<(i64, &str, bool)> =
                self.failed.iter().map(|f| (f.sent.id, f.error.as_str(), f.counts)).collect();
            outbox::mark_failed(db, &failures).await?;
            let mut errors: HashMap<(&str, &str), (usize, i64)> = HashMap::new();
            for f in &self.failed {
                errors.entry((f.sent.topic.as_str(), f.error.as_str())).or_insert((0, f.sent.id)).0 += 1;
            }
            for ((topic, error), (rows, first)) in errors {
                tracing::warn!(%error, %topic, rows, outbox_id = first, "Publishing outbox rows failed; will retry");
            }
            let due = tokio::time::Instant::now() + RESEND_AFTER;
            for failure in std::mem::take(&mut self.failed) {
                pass.failed += 1;
                pass.unreachable += usize::from(failure.unreachable);
                self.resend.push_back((due, failure.sent));
            }
        }
        Ok(pass)
    }

    /// After `sent` was published: its key's next waiting row becomes ready (the key stays
    /// busy with it), or the key is free.
    fn next_of_key(&mut self, sent: &Sent) {
        self.held.remove(&sent.id);
        let Some(key) = &sent.key else { return };
        match self.waiting.get_mut(key).and_then(VecDeque::pop_front) {
            Some(next) => {
                self.busy.insert(key.clone(), next.id);
                self.ready.push_back(next);
            }
            None => {
                self.busy.remove(key);
                self.waiting.remove(key);
            }
        }
    }

    /// Lets failed rows whose wait is over be read again, with their keys' waiting rows
    /// (read again too: the failed row may have been parked meanwhile, holding them back).
    fn release_due(&mut self) {
        let now = tokio::time::Instant::now();
        while self.resend.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, sent)) = self.resend.pop_front() {
                self.release(&sent);
            }
        }
    }

    /// Lets go of a row not sent or not delivered, and of its key's waiting rows.
    fn release(&mut self, sent: &Sent) {
        self.held.remove(&sent.id);
        let Some(key) = &sent.key else { return };
        if self.busy.get(key) == Some(&sent.id) {
            self.busy.remove(key);
            for row in self.waiting.remove(key).unwrap_or_default() {
                self.held.remove(&row.id);
            }
        }
    }

    /// When the next failed row is due again.
    fn next_resend(&self) -> Option<tokio::time::Instant> {
        self.resend.front().map(|(due, _)| *due)
    }

    /// Waits, until `deadline`, for the sends in flight, and settles what came back: what
    /// Kafka acknowledged is not sent again by the next leader.
    async fn finish(&mut self, db: &PgPool, metrics: &Metrics, deadline: tokio::time::Instant) {
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.next()).await {
                Ok(Some(done)) => self.record(done),
                Ok(None) | Err(_) => break,
            }
        }
        if let Err(error) = self.settle(db, metrics).await {
            tracing::warn!(%error, "Outbox relay could not settle its last sends; they will be sent again");
        }
    }
}

fn failure(sent: Sent, error: &KafkaError) -> Failure {
    let code = error.rdkafka_error_code();
    Failure {
        error: error.to_string(),
        counts: code.is_some_and(row_is_at_fault),
        unreachable: code.is_some_and(no_broker_answered),
        sent,
    }
}

/// The record of one row.
fn record(row: &outbox::Pending) -> FutureRecord<'_, [u8], [u8]> {
    let mut headers = OwnedHeaders::new();
    if let serde_json::Value::Object(map) = &row.headers {
        for (k, v) in map {
            let value = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
            headers = headers.insert(Header { key: k, value: Some(value.as_bytes()) });
        }
    }
    let event_id = row.event_id.to_string();
    headers = headers.insert(Header { key: "x-event-id", value: Some(event_id.as_bytes()) });
    let mut record = FutureRecord::<[u8], [u8]>::to(&row.topic).headers(headers);
    if let Some(key) = &row.message_key {
        record = record.key(key.as_slice());
    }
    if let Some(payload) = &row.payload {
        record = record.payload(payload.as_slice());
    }
    record
}

/// Whether a publication failure says something about the row itself, so that retrying it can
/// never succeed: only those count toward parking it.
fn row_is_at_fault(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        code,
        Code::MessageSizeTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidMessage
            | Code::InvalidRecord
            | Code::BadMessage
            | Code::PolicyViolation
    )
}

/// Whether a publication failure says that no broker answered (as opposed to a broker that
/// answered no): only those count toward handing the lead over.
fn no_broker_answered(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        code,
        Code::MessageTimedOut | Code::AllBrokersDown | Code::BrokerTransportFailure | Code::Resolve
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn only_brokers_that_do_not_answer_count_toward_handing_the_lead_over() {
        for code in [Code::MessageTimedOut, Code::AllBrokersDown, Code::BrokerTransportFailure, Code::Resolve]
        {
            assert!(no_broker_answered(code), "{code:?}");
        }
        // A broken topic (or one refused to this service) fails alike for every process.
        for code in [
            Code::UnknownTopicOrPartition,
            Code::TopicAuthorizationFailed,
            Code::MessageSizeTooLarge,
            Code::NotEnoughReplicas,
        ] {
            assert!(!no_broker_answered(code), "{code:?}");
        }
    }

    #[test]
    fn only_failures_of_the_row_itself_count_toward_parking_it() {
        for code in [Code::MessageSizeTooLarge, Code::InvalidMessage, Code::InvalidRecord] {
            assert!(row_is_at_fault(code), "{code:?}");
        }
        // An outage, a slow or moving leader, a missing topic or a refused authorisation: every
        // row would fail alike, and none of them is the row's fault.
        for code in [
            Code::MessageTimedOut,
            Code::AllBrokersDown,
            Code::BrokerTransportFailure,
            Code::NotLeaderForPartition,
            Code::LeaderNotAvailable,
            Code::RequestTimedOut,
            Code::UnknownTopicOrPartition,
            Code::TopicAuthorizationFailed,
        ] {
            assert!(!row_is_at_fault(code), "{code:?}");
        }
    }
}
