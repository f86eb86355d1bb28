//! The consumer: group membership, rebalances, one task per assigned partition, the main
//! queue driver, and the watchdog that keeps lag gauges and recovers stalled partitions.
//!
//! Rebalance flow (rust-rdkafka calls `rebalance` on the thread that polls the main queue,
//! here a dedicated thread, so blocking there blocks nobody else):
//! - assign: the callback asks the coordinator task, which reads the stored offsets from
//!   Postgres (Kafka's committed offset, else the beginning, for a partition never seen),
//!   splits each partition's queue and starts its task, then answers; the callback writes
//!   the offsets into the assignment list and assigns it once (no seek racing the fetcher).
//! - revoke: the coordinator cancels the partitions' tasks and waits until they exited
//!   (their batch finished or abandoned, their queue dropped) before the callback unassigns.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::partition::{now_ms, Kind, PartitionState, PartitionTask};
use super::Deps;
use crate::storage::offsets;

type Key = (String, i32);

/// A partition's own message queue.
pub type PartitionQueue = StreamPartitionQueue<Ctx>;

enum Command {
    Assign { partitions: Vec<Key>, reply: std::sync::mpsc::SyncSender<Option<HashMap<Key, Offset>>> },
    Revoke { partitions: Vec<Key>, reply: std::sync::mpsc::SyncSender<()> },
}

/// Live partitions, shared with the watchdog and the main-queue driver.
type Registry = Arc<Mutex<HashMap<Key, Arc<PartitionState>>>>;

/// Where a partition's log ends for this consumer (the last stable offset under
/// `read_committed`), and librdkafka's next offset for the application (past any offsets that
/// hold no message), from its statistics.
#[derive(Debug, Clone, Copy)]
struct Ends {
    end: i64,
    app_offset: i64,
}

/// The consumer's context: rebalance callbacks and statistics.
pub struct Ctx {
    commands: tokio::sync::mpsc::UnboundedSender<Command>,
    deps: Deps,
    high_watermarks: Arc<Mutex<HashMap<Key, Ends>>>,
    /// Cancelled when the consumer cannot continue safely (e.g. offsets unreadable at assign).
    fatal: CancellationToken,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        if let Ok(mut hw) = self.high_watermarks.lock() {
            for (topic, t) in statistics.topics {
                for (partition, p) in t.partitions {
                    // read_committed: the last stable offset is the end we can reach (with
                    // transactional producers the high watermark stays above it).
                    let end = if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset };
                    if partition >= 0 && end >= 0 {
                        hw.insert((topic.clone(), partition), Ends { end, app_offset: p.app_offset });
                    }
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<Key> =
            tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.deps.metrics.rebalance("assign");
                tracing::info!(partitions = ?partitions, "Partitions assigned");
                let (reply, answer) = std::sync::mpsc::sync_channel(1);
                let offsets = if self.commands.send(Command::Assign { partitions, reply }).is_ok() {
                    // Bounded by max.poll.interval.ms in spirit: the coordinator retries Postgres.
                    answer.recv_timeout(Duration::from_secs(240)).ok().flatten()
                } else {
                    None
                };
                let Some(offsets) = offsets else {
                    // Finish the assign call whatever happens (librdkafka waits for it, and so
                    // would leaving the group), but consume nothing: pause, then stop.
                    tracing::error!("Cannot prepare an assignment; pausing it and stopping the consumer");
                    let _assigned = if cooperative { base.incremental_assign(tpl) } else { base.assign(tpl) };
                    if let Err(error) = base.pause(tpl) {
                        tracing::error!(%error, "Pausing the unprepared partitions failed");
                    }
                    self.fatal.cancel();
                    return;
                };
                for ((topic, partition), offset) in offsets {
                    if let Err(error) = tpl.set_partition_offset(&topic, partition, offset) {
                        tracing::error!(%topic, partition, %error, "Cannot set a start offset");
                    }
                }
                let result = if cooperative { base.incremental_assign(tpl) } else { base.assign(tpl) };
                if let Err(error) = result {
                    tracing::error!(%error, "Assign failed");
                    self.fatal.cancel();
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.deps.metrics.rebalance("revoke");
                tracing::info!(partitions = ?partitions, lost = base.assignment_lost(), "Partitions revoked");
                let (reply, answer) = std::sync::mpsc::sync_channel(1);
                if self.commands.send(Command::Revoke { partitions, reply }).is_ok() {
                    let budget = self.deps.settings.revoke_timeout + Duration::from_secs(5);
                    if answer.recv_timeout(budget).is_err() {
                        tracing::error!("Revoked partition tasks did not stop in time");
                    }
                }
                let result = if cooperative { base.incremental_unassign(tpl) } else { base.unassign() };
                if let Err(error) = result {
                    tracing::warn!(%error, "Unassign failed");
                }
            }
            other => {
                self.deps.metrics.rebalance("error");
                tracing::error!(error = ?other, "Rebalance error");
            }
        }
    }
}

fn kind_of(deps: &Deps, topic: &str) -> Option<Kind> {
    if topic == deps.topics.payment {
        Some(Kind::Payment)
    } else if topic == deps.topics.merchant_cdc {
        Some(Kind::MerchantCdc)
    } else {
        None
    }
}

struct Running {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

async fn stored_offsets(
    deps: &Deps,
    partitions: &[Key],
    stop: &CancellationToken,
) -> Option<HashMap<Key, i64>> {
    let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
    for (topic, partition) in partitions {
        by_topic.entry(topic.as_str()).or_default().push(*partition);
    }
    let mut out = HashMap::new();
    for (topic, list) in by_topic {
        let mut backoff = Duration::from_millis(100);
        loop {
            match offsets::load(&deps.db, &deps.group_id, topic, &list).await {
                Ok(found) => {
                    out.extend(found.into_iter().map(|(p, o)| ((topic.to_owned(), p), o)));
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, topic, "Reading stored offsets failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return None,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if backoff >= Duration::from_secs(5) && out.is_empty() && stop.is_cancelled() {
                        return None;
                    }
                }
            }
        }
    }
    Some(out)
}

async fn coordinate(
    consumer: Arc<StreamConsumer<Ctx>>,
    deps: Deps,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    registry: Registry,
    stop: CancellationToken,
    fatal: CancellationToken,
) {
    let mut running: HashMap<Key, Running> = HashMap::new();
    loop {
        // The consumer's context holds the sender, and this task holds the consumer: the
        // channel never closes by itself, so the stop token ends the loop.
        let command = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => command,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        match command {
            Command::Assign { partitions, reply } => {
                let Some(stored) = stored_offsets(&deps, &partitions, &stop).await else {
                    let _ignored = reply.send(None);
                    continue;
                };
                // Kafka's committed offset is only a fallback for partitions never stored.
                let missing: Vec<Key> =
                    partitions.iter().filter(|k| !stored.contains_key(*k)).cloned().collect();
                let committed = if missing.is_empty() {
                    Some(HashMap::new())
                } else {
                    let c = consumer.clone();
                    let list = missing.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut tpl = TopicPartitionList::new();
                        for (t, p) in &list {
                            tpl.add_partition(t, *p);
                        }
                        // A failed lookup must not turn into "from the beginning": retry, and
                        // give up (failing the assignment) rather than guess.
                        let mut attempt = 0;
                        let found = loop {
                            match c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                                Ok(found) => break Some(found),
                                Err(error) if attempt < 3 => {
                                    attempt += 1;
                                    tracing::warn!(%error, attempt, "Reading Kafka's committed offsets failed; retrying");
                                    std::thread::sleep(Duration::from_millis(500));
                                }
                                Err(error) => {
                                    tracing::error!(%error, "Reading Kafka's committed offsets failed");
                                    break None;
                                }
                            }
                        };
                        found.map(|tpl| {
                                tpl.elements()
                                    .iter()
                                    .filter_map(|e| match e.offset() {
                                        Offset::Offset(o) if o >= 0 => {
                                            Some(((e.topic().to_owned(), e.partition()), o))
                                        }
                                        _ => None,
                                    })
                                    .collect::<HashMap<Key, i64>>()
                            })
                    })
                    .await
                    .ok()
                    .flatten()
                };
                let Some(committed) = committed else {
                    let _ignored = reply.send(None);
                    continue;
                };
                let mut answer = HashMap::new();
                for key in partitions {
                    let (topic, partition) = (key.0.clone(), key.1);
                    let Some(kind) = kind_of(&deps, &topic) else { continue };
                    let expected = stored.get(&key).copied();
                    let start = expected.or_else(|| committed.get(&key).copied());
                    let offset = start.map(Offset::Offset).unwrap_or(Offset::Beginning);
                    let Some(queue) = consumer.split_partition_queue(&topic, partition) else {
                        tracing::error!(%topic, partition, "Cannot split the partition queue; stopping the consumer");
                        fatal.cancel();
                        continue;
                    };
                    let state = Arc::new(PartitionState::new(start.unwrap_or(0)));
                    if let Ok(mut r) = registry.lock() {
                        r.insert(key.clone(), state.clone());
                    }
                    let cancel = stop.child_token();
                    let task = PartitionTask {
                        consumer: consumer.clone(),
                        queue,
                        topic: topic.clone(),
                        partition,
                        kind,
                        deps: deps.clone(),
                        expected,
                        cancel: cancel.clone(),
                        state,
                        fatal: fatal.clone(),
                        enqueue_paused_until: None,
                        refused_in_a_row: 0,
                        last_gap_check: None,
                    };
                    tracing::info!(%topic, partition, start = ?offset, from_postgres = expected.is_some(), "Starting partition");
                    // A task that ends on its own (a panic: nothing else ends it uncancelled)
                    // leaves its partition without a reader until the next rebalance, and the
                    // watchdog's wake-ups reach nobody: stop the consumer instead, so the process
                    // leaves the group and exits non-zero for its supervisor to restart it.
                    let supervised = {
                        let (cancelled, fatal) = (cancel.clone(), fatal.clone());
                        let (topic, partition) = (topic.clone(), partition);
                        async move {
                            let ended = std::panic::AssertUnwindSafe(task.run()).catch_unwind().await;
                            if ended.is_err() || !cancelled.is_cancelled() {
                                tracing::error!(%topic, partition, panicked = ended.is_err(),
                                    "Partition task ended on its own; stopping the consumer");
                                fatal.cancel();
                            }
                        }
                    };
                    running.insert(key.clone(), Running { cancel, handle: tokio::spawn(supervised) });
                    answer.insert(key, offset);
                }
                let _ignored = reply.send(Some(answer));
            }
            Command::Revoke { partitions, reply } => {
                let mut stopping = Vec::new();
                for key in &partitions {
                    if let Some(r) = running.remove(key) {
                        r.cancel.cancel();
                        stopping.push((key.clone(), r.handle));
                    }
                }
                // One deadline for all of them, inside the callback's own budget.
                let deadline = tokio::time::Instant::now() + deps.settings.revoke_timeout;
                for (key, mut handle) in stopping {
                    if tokio::time::timeout_at(deadline, &mut handle).await.is_err() {
                        tracing::warn!(topic = %key.0, partition = key.1, "Partition task did not stop in time; abandoning its batch");
                        handle.abort();
                        let _ended = handle.await;
                    }
                    if let Ok(mut r) = registry.lock() {
                        r.remove(&key);
                    }
                    deps.metrics.partition_released(&key.0, key.1);
                }
                let _ignored = reply.send(());
            }
        }
    }
    for (_, r) in running.drain() {
        r.cancel.cancel();
        let _ended = r.handle.await;
    }
}

/// Every second: lag gauges per partition, and recovery of a partition that has lag but made
/// no progress for `stall_after` (a missed wake-up of a split queue, rust-rdkafka#665).
async fn watch(
    deps: Deps,
    registry: Registry,
    high_watermarks: Arc<Mutex<HashMap<Key, Ends>>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let partitions: Vec<(Key, Arc<PartitionState>)> = match registry.lock() {
            Ok(r) => r.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => continue,
        };
        let hws = high_watermarks.lock().map(|h| h.clone()).unwrap_or_default();
        let now = now_ms();
        for ((topic, partition), state) in partitions {
            let Some(Ends { end: hw, app_offset }) = hws.get(&(topic.clone(), partition)).copied() else {
                continue;
            };
            let position = state.position.load(Ordering::Acquire);
            // librdkafka moves past offsets that hold no message (the commit and abort markers
            // of a transactional producer upstream) without handing anything over: when it has
            // handed over everything up to the end and the task holds nothing uncommitted, what
            // lies between the position and the end is such offsets, not lag.
            let nothing_left = app_offset >= hw && state.received.load(Ordering::Acquire) <= position;
            let lag = if nothing_left { 0 } else { (hw - position).max(0) };
            let last_ts = state.last_message_ts_ms.load(Ordering::Acquire);
            let lag_seconds =
                if lag == 0 || last_ts < 0 { 0.0 } else { (now - last_ts).max(0) as f64 / 1000.0 };
            deps.metrics.partition_lag(&topic, partition, position, lag, lag_seconds);
            let idle_ms = now - state.last_progress_ms.load(Ordering::Acquire);
            let stalled_for_long = idle_ms > deps.settings.stall_after.as_millis() as i64;
            // For its alert: the statistics may lag the position by a second, so only a value
            // that stays 1 for minutes means something.
            deps.metrics.partition_past_end(&topic, partition, hw < position);
            // Past the end of the log (the topic was recreated, or a failover truncated it): the
            // fetch restarts at the earliest offset and every message below the stored one is
            // passed over as already decided. That needs an operator, not a seek; its lag reads
            // 0, so say it here (the statistics may lag the position by a second: only a
            // partition idle for long is judged).
            if hw < position && stalled_for_long {
                tracing::error!(%topic, partition, position, high_watermark = hw,
                    "The stored offset is past the end of the log (topic recreated or truncated?): messages below it are not decided; check the topic and move the offset with `invoice offsets reset`");
                deps.metrics.partition_stalled(&topic, partition);
                state.last_progress_ms.store(now, Ordering::Release);
                continue;
            }
            if lag > 0 && stalled_for_long {
                tracing::warn!(%topic, partition, lag, idle_ms, "Partition has lag and made no progress; recovering");
                deps.metrics.partition_stalled(&topic, partition);
                state.last_progress_ms.store(now, Ordering::Release);
                state.recover.notify_one();
            }
        }
    }
}

/// Consumes until `shutdown` is cancelled; returns an error if the consumer could not
/// continue safely.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (commands_tx, commands_rx) = tokio::sync::mpsc::unbounded_channel();
    let high_watermarks = Arc::new(Mutex::new(HashMap::new()));
    let fatal = CancellationToken::new();
    let context = Ctx {
        commands: commands_tx,
        deps: deps.clone(),
        high_watermarks: high_watermarks.clone(),
        fatal: fatal.clone(),
    };
    let consumer: StreamConsumer<Ctx> = deps
        .kafka
        .client_config()
        .set("group.id", &deps.group_id)
        .set("client.id", &deps.client_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Offsets live in Postgres; Kafka gets a mirror of them for lag tooling.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", deps.settings.session_timeout.as_millis().to_string())
        .set("heartbeat.interval.ms", (deps.settings.session_timeout.as_millis() / 4).max(100).to_string())
        .set("statistics.interval.ms", "1000")
        // Per partition once queues are split: keep memory bounded.
        .set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "20000")
        .create_with_context(context)?;
    let consumer = Arc::new(consumer);
    let registry: Registry = Arc::new(Mutex::new(HashMap::new()));
    let stop_tasks = CancellationToken::new();
    let coordinator = tokio::spawn(coordinate(
        consumer.clone(),
        deps.clone(),
        commands_rx,
        registry.clone(),
        stop_tasks.clone(),
        fatal.clone(),
    ));
    let watchdog = tokio::spawn(watch(deps.clone(), registry.clone(), high_watermarks, stop_tasks.clone()));
    consumer.subscribe(&[deps.topics.payment.as_str(), deps.topics.merchant_cdc.as_str()])?;

    // The main queue serves rebalances, statistics and errors; it is driven on a thread of its
    // own so the rebalance callback may block while the coordinator works.
    let stop_driver = CancellationToken::new();
    let driver = {
        let consumer = consumer.clone();
        let stop = stop_driver.clone();
        let registry = registry.clone();
        let fatal_driver = fatal.clone();
        std::thread::Builder::new().name("kafka-main-queue".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "Cannot start the main-queue driver");
                    return;
                }
            };
            runtime.block_on(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        received = consumer.recv() => match received {
                            Ok(message) => {
                                use rdkafka::message::Message;
                                // Queues are split before assignment, so this should not happen;
                                // if it does, the message was taken from its partition's queue:
                                // make that partition re-fetch from its position.
                                let key = (message.topic().to_owned(), message.partition());
                                tracing::error!(topic = %key.0, partition = key.1, offset = message.offset(),
                                    "Message arrived on the main queue; re-fetching its partition");
                                if let Some(state) = registry.lock().ok().and_then(|r| r.get(&key).cloned()) {
                                    state.recover.notify_one();
                                }
                            }
                            Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code)) => {
                                tracing::error!(error = ?code, "Fatal Kafka consumer error; stopping");
                                fatal_driver.cancel();
                            }
                            Err(error) => tracing::warn!(%error, "Kafka consumer error"),
                        }
                    }
                }
            });
        })?
    };

    let failed = tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = fatal.cancelled() => true,
    };
    // Leave the group in order: unsubscribing revokes every partition through the callback
    // (tasks finish their batch), then the driver stops and the consumer closes.
    consumer.unsubscribe();
    let deadline = tokio::time::Instant::now() + deps.settings.revoke_timeout + Duration::from_secs(5);
    while registry.lock().map(|r| !r.is_empty()).unwrap_or(false) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tasks.cancel();
    stop_driver.cancel();
    let _ended = tokio::task::spawn_blocking(move || driver.join()).await;
    let _ended = watchdog.await;
    // Closing the consumer waits for librdkafka to leave the group; bound it so a broker that
    // is gone cannot keep the process from exiting (Kubernetes would SIGKILL it anyway).
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(Duration::from_secs(15), closing).await.is_err() {
        tracing::warn!("Closing the Kafka consumer timed out");
    }
    if tokio::time::timeout(Duration::from_secs(15), coordinator).await.is_err() {
        tracing::warn!("The partition coordinator did not stop in time");
    }
    if failed {
        anyhow::bail!("the Kafka consumer stopped: stored offsets could not be read or assigned");
    }
    Ok(())
}
