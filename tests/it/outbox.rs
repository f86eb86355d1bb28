//! The outbox relay against the real broker: an order's events keep their order even when
//! one of them cannot be published.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use invoice::metrics::Metrics;
use invoice::storage::outbox::PARK_AFTER_ATTEMPTS;

use crate::support::kafka::{producer, read_to_end, TestTopics};
use crate::support::TestDb;

async fn insert(db: &TestDb, topic: &str, key: &str, payload: &[u8]) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (event_id, topic, message_key, payload)
         VALUES (gen_random_uuid(), $1, convert_to($2, 'UTF8'), $3) RETURNING id",
    )
    .bind(topic)
    .bind(key)
    .bind(payload)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn values(topic: &str) -> Vec<String> {
    read_to_end(topic, Duration::from_secs(20))
        .into_iter()
        .map(|m| String::from_utf8(m.value.unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_later_event_of_an_order_waits_for_an_earlier_one_that_failed() {
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let events = topics.names.events.clone();
    let producer = producer();
    let metrics = Metrics::new();
    let mut leader = PgConnection::connect(&db.url).await.unwrap();

    // Larger than the producer takes (message.max.bytes): it fails on every attempt.
    let too_large = insert(&db, &events, "ORD-1", &vec![b'x'; 2 << 20]).await;
    let later = insert(&db, &events, "ORD-1", b"ORD-1 second").await;
    let other = insert(&db, &events, "ORD-2", b"ORD-2 first").await;

    let published = invoice::outbox::publish_once(&db.pool, &producer, &metrics, &mut leader).await.unwrap();
    assert_eq!(
        published,
        invoice::outbox::Pass { published: 1, failed: 1, unreachable: 0 },
        "only the other order's event goes out"
    );
    let left: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempts FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(left, vec![(too_large, 1), (later, 0)], "the later event was not even attempted");
    assert!(!left.iter().any(|(id, _)| *id == other));
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    assert_eq!(sent, vec!["ORD-2 first"]);

    // The row at fault is parked after its attempts. Its order's next event stays behind it,
    // however many passes run: sent now, it would reach consumers before the parked one once
    // an operator hands that back.
    for _ in 0..2 * PARK_AFTER_ATTEMPTS {
        invoice::outbox::publish_once(&db.pool, &producer, &metrics, &mut leader).await.unwrap();
    }
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox WHERE id = $1")
            .bind(too_large)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, PARK_AFTER_ATTEMPTS, "parked after its own failures");
    assert!(error.to_lowercase().contains("too large"), "{error}");
    let held: i32 = sqlx::query_scalar("SELECT attempts FROM outbox WHERE id = $1")
        .bind(later)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(held, 0, "the later event was never attempted");
    // Another order's new event is not held.
    insert(&db, &events, "ORD-3", b"ORD-3 first").await;
    assert_eq!(
        invoice::outbox::publish_once(&db.pool, &producer, &metrics, &mut leader).await.unwrap().published,
        1
    );

    // The operator gives the parked event up (the runbook's last resort): the next goes.
    sqlx::query("DELETE FROM outbox WHERE id = $1").bind(too_large).execute(&db.pool).await.unwrap();
    assert_eq!(
        invoice::outbox::publish_once(&db.pool, &producer, &metrics, &mut leader).await.unwrap().published,
        1
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM outbox").await, 0);
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    assert_eq!(sent, vec!["ORD-2 first", "ORD-3 first", "ORD-1 second"]);
}

/// A producer with no route to the brokers (a port nothing listens on): every send fails,
/// unanswered, after `timeout`.
fn cut_off_producer(timeout: Duration) -> rdkafka::producer::FutureProducer {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{closed_port}"))
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .create()
        .unwrap()
}

/// A producer to the test broker whose sends fail after `timeout` (delivered or not).
fn producer_timing_out_after(timeout: Duration) -> rdkafka::producer::FutureProducer {
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", crate::support::kafka_brokers())
        .set("acks", "all")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .create()
        .unwrap()
}

/// Runs a relay on the test database with `producer` until `stop`.
fn spawn_relay(
    db: &TestDb,
    producer: rdkafka::producer::FutureProducer,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(invoice::outbox::run(
        db.pool.clone(),
        db.url.clone(),
        producer,
        rebuild(),
        Metrics::new(),
        stop.clone(),
    ))
}

/// Builds the test's producer again (what the relay does after a fatal producer error).
fn rebuild() -> invoice::outbox::Rebuild {
    std::sync::Arc::new(|| Ok(producer()))
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

/// The backend holding the relay's lock in this test's database, if any.
async fn lock_holder(db: &TestDb) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 7315003 AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// The backends of relays (leading or waiting to) in this test's database.
async fn relay_backends(db: &TestDb) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'invoice-outbox-relay' AND datname = current_database() ORDER BY pid",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_waits_on_one_connection_and_leads_on_it_when_the_leader_stops() {
    use crate::support::wait_until;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let events = topics.names.events.clone();
    let start = |stop: tokio_util::sync::CancellationToken| {
        tokio::spawn(invoice::outbox::run(
            db.pool.clone(),
            db.url.clone(),
            producer(),
            rebuild(),
            Metrics::new(),
            stop,
        ))
    };
    let wait = Duration::from_secs(30);

    let stop_first = tokio_util::sync::CancellationToken::new();
    let first = start(stop_first.clone());
    let leader = wait_until(wait, "the first relay to lead", || lock_holder(&db)).await;
    let stop_second = tokio_util::sync::CancellationToken::new();
    let second = start(stop_second.clone());
    let standby = wait_until(wait, "the second relay's standby connection", || async {
        relay_backends(&db).await.into_iter().find(|pid| *pid != leader)
    })
    .await;

    insert(&db, &events, "ORD-1", b"ORD-1 first").await;
    wait_until(wait, "the leader to publish", || async {
        (scalar(&db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;

    stop_first.cancel();
    first.await.unwrap();
    let new_leader = wait_until(wait, "the follower to lead", || async {
        lock_holder(&db).await.filter(|pid| *pid != leader)
    })
    .await;
    assert_eq!(new_leader, standby, "it led on the connection it waited on, not a new one");
    assert_eq!(relay_backends(&db).await, vec![standby]);

    insert(&db, &events, "ORD-1", b"ORD-1 second").await;
    wait_until(wait, "the new leader to publish", || async {
        (scalar(&db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    assert_eq!(sent, vec!["ORD-1 first", "ORD-1 second"]);
    stop_second.cancel();
    second.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_deliver_hands_the_lead_to_one_that_can() {
    use crate::support::wait_until;
    use invoice::outbox::StepDown;
    use tokio_util::sync::CancellationToken;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let events = topics.names.events.clone();
    let cut_off = cut_off_producer(Duration::from_millis(500));
    let step_down = StepDown { after: Duration::from_secs(2), pause: Duration::from_secs(60) };
    let start = |producer, stop: CancellationToken| {
        tokio::spawn(invoice::outbox::run_with(
            db.pool.clone(),
            db.url.clone(),
            producer,
            rebuild(),
            Metrics::new(),
            stop,
            step_down,
        ))
    };
    insert(&db, &events, "ORD-1", b"ORD-1 first").await;
    let wait = Duration::from_secs(60);
    let stop_cut_off = CancellationToken::new();
    let cut_off_relay = start(cut_off, stop_cut_off.clone());
    let first_leader = wait_until(wait, "the cut-off relay to lead", || lock_holder(&db)).await;
    let stop_healthy = CancellationToken::new();
    let healthy = start(producer(), stop_healthy.clone());
    let standing_by = wait_until(wait, "the healthy relay to stand by", || async {
        relay_backends(&db).await.into_iter().find(|pid| *pid != first_leader)
    })
    .await;

    wait_until(wait, "the healthy relay to take the lead and publish", || async {
        (scalar(&db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    assert_eq!(lock_holder(&db).await, Some(standing_by), "the relay that stood by leads");
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    assert_eq!(sent, vec!["ORD-1 first"]);
    stop_cut_off.cancel();
    stop_healthy.cancel();
    cut_off_relay.await.unwrap();
    healthy.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_deliver_keeps_the_lead_when_no_other_relay_stands_by() {
    use crate::support::wait_until;
    use invoice::outbox::StepDown;
    use tokio_util::sync::CancellationToken;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let cut_off = cut_off_producer(Duration::from_millis(300));
    // Handing over after 0.5 s would leave nobody leading for the pause; it must not happen.
    let step_down = StepDown { after: Duration::from_millis(500), pause: Duration::from_secs(60) };
    insert(&db, &topics.names.events, "ORD-1", b"ORD-1 first").await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(invoice::outbox::run_with(
        db.pool.clone(),
        db.url.clone(),
        cut_off,
        rebuild(),
        Metrics::new(),
        stop.clone(),
        step_down,
    ));
    let leader = wait_until(Duration::from_secs(30), "the relay to lead", || lock_holder(&db)).await;
    // Well past `after`: its sends have failed, unanswered, for several passes.
    wait_until(Duration::from_secs(30), "several failed passes", || async {
        let last_error: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM outbox").fetch_one(&db.pool).await.unwrap();
        last_error.is_some().then_some(())
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(lock_holder(&db).await, Some(leader), "it handed the lead to nobody");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    relay.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_that_hangs_holds_back_its_own_key_only() {
    use crate::support::wait_until;
    use tokio_util::sync::CancellationToken;
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let events = topics.names.events.clone();
    // A topic that does not exist (the broker creates none): its send waits for it for the
    // whole delivery timeout, as one to a partition without enough in-sync replicas would.
    let missing = format!("{events}.missing");
    let timeout = Duration::from_secs(10);
    let producer = producer_timing_out_after(timeout);
    let stuck = insert(&db, &missing, "ORD-1", b"ORD-1 dead letter").await;
    // Its own key's next row waits behind it.
    let behind = insert(&db, &missing, "ORD-1", b"ORD-1 second dead letter").await;
    for n in 0..3 {
        insert(&db, &events, "ORD-1", format!("ORD-1 event {n}").as_bytes()).await;
        insert(&db, &events, "ORD-2", format!("ORD-2 event {n}").as_bytes()).await;
    }
    let stop = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let relay = spawn_relay(&db, producer, &stop);
    wait_until(Duration::from_secs(60), "the other rows to be published", || async {
        (scalar(&db, "SELECT count(*) FROM outbox").await == 2).then_some(())
    })
    .await;
    // Before the stuck send has even ended: the others did not wait for it.
    let left: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, last_error FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(
        left,
        vec![(stuck, None), (behind, None)],
        "the stuck send had already failed: the others waited for it"
    );
    assert!(started.elapsed() < timeout);
    let topic = events.clone();
    let sent = tokio::task::spawn_blocking(move || values(&topic)).await.unwrap();
    let of = |order: &str| sent.iter().filter(|v| v.starts_with(order)).cloned().collect::<Vec<_>>();
    assert_eq!(of("ORD-1"), vec!["ORD-1 event 0", "ORD-1 event 1", "ORD-1 event 2"]);
    assert_eq!(of("ORD-2"), vec!["ORD-2 event 0", "ORD-2 event 1", "ORD-2 event 2"]);
    assert_eq!(sent.len(), 6);
    stop.cancel();
    relay.await.unwrap();
    let left: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, last_error FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert!(
        left[0].1.is_some(),
        "a relay that stops waits for its sends in flight and records them: {left:?}"
    );
    assert_eq!(left[1], (behind, None), "the row behind the stuck one was never sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_event_failed_sends_it_again_before_its_later_ones() {
    use crate::support::wait_until;
    use tokio_util::sync::CancellationToken;
    let db = TestDb::create().await;
    // Topics that do not exist yet: the first send fails (its delivery timeout passes).
    let names = invoice::config::Topics::prefixed(&crate::support::unique("it-late-"));
    let events = names.events.clone();
    let producer = producer_timing_out_after(Duration::from_millis(1500));
    for n in 0..3 {
        insert(&db, &events, "ORD-1", format!("ORD-1 event {n}").as_bytes()).await;
    }
    let stop = CancellationToken::new();
    let relay = spawn_relay(&db, producer, &stop);
    wait_until(Duration::from_secs(30), "the first send to fail", || async {
        let failed = scalar(&db, "SELECT count(*) FROM outbox WHERE last_error IS NOT NULL").await;
        (failed > 0).then_some(())
    })
    .await;
    let tried: Vec<Option<String>> =
        sqlx::query_scalar("SELECT last_error FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert!(tried[0].is_some() && tried[1..].iter().all(Option::is_none), "one send at a time: {tried:?}");
    // The topic appears; the relay resends the failed event, then the later ones.
    let mut specs = invoice::topics::specs(&names).unwrap();
    for spec in &mut specs {
        spec.partitions = 1;
    }
    invoice::topics::apply(&crate::support::kafka(), &specs).await.unwrap();
    let _topics = TestTopics { names };
    wait_until(Duration::from_secs(60), "every event to be published", || async {
        (scalar(&db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap();
    let sent = tokio::task::spawn_blocking(move || values(&events)).await.unwrap();
    assert_eq!(sent, vec!["ORD-1 event 0", "ORD-1 event 1", "ORD-1 event 2"]);
}
