//! The outbox relay: publishes what transactions wrote to the `outbox` table (lifecycle
//! events, dead letters) to Kafka, in id order, then deletes what Kafka acknowledged. One relay runs at a
//! time across all processes (a Postgres advisory lock), so events of an order keep their
//! order. A crash between publishing and marking re-publishes the same rows with the same
//! `eventId`: duplicates only across a crash, never a loss.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::storage::{self, outbox};

const BATCH: i64 = 1000;
/// Polling backs off from the first to the second while the outbox stays empty.
const IDLE_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(5);
const GAUGES_EVERY: Duration = Duration::from_secs(10);
/// Longest a relay connection may take to connect, take the lock or answer a ping. A
/// Postgres that vanished without closing its connections (a lost node) leaves them
/// half-open, and the kernel gives up on them only after ~15 minutes: the relay would wait
/// that long, publishing nothing and holding up a shutdown.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

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
        let mut idle = IDLE_POLL.0;
        let mut last_check = tokio::time::Instant::now();
        let mut cut_off_since: Option<tokio::time::Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                let _closed = leader.close().await;
                return;
            }
            // The lock lives on this connection: if it is gone, so is the leadership. (It is
            // also checked before every marking, in `publish_once`.)
            if last_check.elapsed() >= LOCK_CHECK_EVERY {
                last_check = tokio::time::Instant::now();
                if let Err(error) = answers(&mut leader).await {
                    tracing::warn!(%error, "Outbox relay lost its lock connection");
                    continue 'lead;
                }
            }
            let started = tokio::time::Instant::now();
            let pass = publish_once(&db, &producer, &metrics, &mut leader).await;
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
                match &pass {
                    // Passes that reached no broker, for `step_down.after`: the fault may be
                    // this process' route, if another process stands by to try its own.
                    Ok(pass) if pass.unreachable > 0 && pass.published == 0 => {
                        let since = *cut_off_since.get_or_insert(started);
                        since.elapsed() >= step_down.after
                            && outbox::relays_standing_by(&db).await.unwrap_or(0) > 0
                            && {
                                tracing::warn!(
                                    seconds = since.elapsed().as_secs(),
                                    "Outbox relay reached no Kafka broker; handing the lead to another process"
                                );
                                true
                            }
                    }
                    Ok(_) => {
                        cut_off_since = None;
                        false
                    }
                    Err(_) => false,
                }
            };
            if hand_over {
                let _closed = leader.close().await;
                tokio::select! {
                    _ = tokio::time::sleep(step_down.pause) => continue 'lead,
                    _ = shutdown.cancelled() => return,
                }
            }
            match pass {
                Ok(Pass { published: 0, .. }) => {
                    tokio::select! {
                        _ = tokio::time::sleep(idle) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    idle = (idle * 2).min(IDLE_POLL.1);
                }
                Ok(_) => idle = IDLE_POLL.0,
                Err(error) => {
                    tracing::warn!(%error, "Outbox relay pass failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue 'lead;
                }
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

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Rows Kafka acknowledged (and that were deleted).
    pub published: usize,
    /// Sends that failed (their rows stay).
    pub failed: usize,
    /// Of those, sends that failed because no broker answered.
    pub unreachable: usize,
}

/// Publishes up to one batch. `leader` is the connection holding the relay lock: it is
/// checked again before rows are marked, so a relay that lost its lock during the pass leaves
/// the marking to the new leader.
pub async fn publish_once(
    db: &PgPool,
    producer: &FutureProducer,
    metrics: &Metrics,
    leader: &mut PgConnection,
) -> Result<Pass, storage::StorageError> {
    let rows = outbox::pending(db, BATCH).await?;
    if rows.is_empty() {
        return Ok(Pass::default());
    }
    let (mut failed, mut unreachable) = (0, 0);
    // Rows of one key go out one round at a time, each round only after the previous one was
    // acknowledged, and a key whose row failed sends nothing more this pass: sent together,
    // a later event of an order could be acknowledged while an earlier one failed (a delivery
    // timeout leaves gaps even with idempotence on), and the retry would put the earlier one
    // after it. Different keys still go out together, so a round is one produce round trip.
    let rounds = key_rounds(rows.iter().map(key_of));
    let mut failed_keys: HashSet<(&str, &[u8])> = HashSet::new();
    let mut published = Vec::with_capacity(rows.len());
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    for round in 0..=rounds.iter().copied().max().unwrap_or(0) {
        // A round can take the producer's whole delivery timeout: a relay whose lock went
        // meanwhile (its connection dropped) stops before sending more beside the new leader.
        if round > 0 && answers(leader).await.is_err() {
            tracing::warn!("Outbox relay lost its lock during a pass; leaving the rows to the next leader");
            return Err(storage::StorageError::Unavailable("outbox relay lock lost".into()));
        }
        let sending: Vec<&outbox::Pending> = rows
            .iter()
            .zip(&rounds)
            .filter(|(row, r)| **r == round && !key_of(row).is_some_and(|key| failed_keys.contains(&key)))
            .map(|(row, _)| row)
            .collect();
        let results = join_all(sending.iter().map(|row| send(producer, row))).await;
        // Every acknowledged row is marked (re-sending it would be a duplicate); a failed row
        // is retried next pass. Only a failure that the row itself causes (too large,
        // malformed) counts toward parking it, so a poison row cannot block other keys (its
        // own key's later rows wait behind it, for an operator: see `outbox::pending`); Kafka
        // being down or slow (the delivery timeout passed), however long, parks nothing: a
        // parked event waits for an operator, and a parked `claim_opened` keeps its clear
        // token meanwhile.
        for (row, result) in sending.into_iter().zip(results) {
            match result {
                Ok(_) => {
                    published.push(row.id);
                    *per_topic.entry(row.topic.as_str()).or_default() += 1;
                }
                Err((error, _)) => {
                    failed += 1;
                    if error.rdkafka_error_code().is_some_and(no_broker_answered) {
                        unreachable += 1;
                    }
                    tracing::warn!(%error, topic = %row.topic, outbox_id = row.id, "Publishing an outbox row failed; will retry");
                    if let Some(key) = key_of(row) {
                        failed_keys.insert(key);
                    }
                    let counts = error.rdkafka_error_code().is_some_and(row_is_at_fault);
                    outbox::mark_failed(db, row.id, &error.to_string(), counts).await?;
                }
            }
        }
    }
    if answers(leader).await.is_err() {
        tracing::warn!("Outbox relay lost its lock during a pass; leaving the rows to the next leader");
        return Err(storage::StorageError::Unavailable("outbox relay lock lost".into()));
    }
    if !published.is_empty() {
        outbox::mark_published(db, &published).await?;
    }
    for (topic, n) in per_topic {
        metrics.outbox_published(topic, n);
    }
    Ok(Pass { published: published.len(), failed, unreachable })
}

fn key_of(row: &outbox::Pending) -> Option<(&str, &[u8])> {
    row.message_key.as_deref().map(|key| (row.topic.as_str(), key))
}

/// For rows in id order, the round in which each is sent: a row's round is the number of
/// earlier rows with its (topic, key), so a key has at most one row in flight. A row without
/// a key orders with nothing and goes in the first round.
fn key_rounds<'a>(keys: impl Iterator<Item = Option<(&'a str, &'a [u8])>>) -> Vec<usize> {
    let mut seen: HashMap<(&str, &[u8]), usize> = HashMap::new();
    keys.map(|key| match key {
        Some(key) => {
            let count = seen.entry(key).or_default();
            *count += 1;
            *count - 1
        }
        None => 0,
    })
    .collect()
}

/// Hands one row to the producer (a future of its acknowledgement).
async fn send(producer: &FutureProducer, row: &outbox::Pending) -> OwnedDeliveryResult {
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
    producer.send(record, Duration::from_secs(30)).await
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
    fn a_key_has_one_row_per_round_and_rows_without_a_key_go_first() {
        let key = |topic, key: &'static str| Some((topic, key.as_bytes()));
        let rows = [
            key("events", "ORD-1"),
            key("events", "ORD-2"),
            key("events", "ORD-1"),
            None,
            key("deadletter", "ORD-1"),
            key("events", "ORD-1"),
            None,
        ];
        assert_eq!(key_rounds(rows.into_iter()), vec![0, 0, 1, 0, 0, 2, 0]);
    }

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
