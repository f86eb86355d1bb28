//! The Redis queue's moves against the real Redis: dedupe, leases and their expiry, stale
//! tokens, retries, the DLQ, hand-back; the state invariant is checked after every step.

use std::time::Duration;

use invoice::queue::{Enqueued, Job, JobPayload, Queue, Retry};

use crate::support::{redis_url, unique, wait_until};

fn queue() -> (Queue, String) {
    let prefix = unique("iq-q-");
    let pool = deadpool_redis::Config::from_url(redis_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    (Queue::new(pool, 3, &prefix), prefix)
}

fn payload() -> JobPayload {
    JobPayload { merchant_id: "M-1".into(), enqueued_at_ms: invoice::queue::now_ms(), source: "test".into() }
}

/// Every id named in `state` is in exactly the structure its state names, and nowhere else.
async fn check_invariant(prefix: &str, partition: u32) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let k = |s: &str| format!("{prefix}:{{p{partition}}}:{s}");
    let state: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(k("state")).query_async(&mut c).await.unwrap();
    let wait: Vec<String> =
        redis::cmd("LRANGE").arg(k("wait")).arg(0).arg(-1).query_async(&mut c).await.unwrap();
    for (zset, name) in [("active", "active"), ("delayed", "delayed"), ("dlq", "dead")] {
        let members: Vec<String> =
            redis::cmd("ZRANGE").arg(k(zset)).arg(0).arg(-1).query_async(&mut c).await.unwrap();
        for m in &members {
            assert_eq!(state.get(m).map(String::as_str), Some(name), "{m} in {zset}");
        }
        let named = state.values().filter(|s| s.as_str() == name).count();
        assert_eq!(named, members.len(), "{zset}: {state:?}");
    }
    for (id, s) in &state {
        if s == "waiting" {
            assert!(wait.contains(id), "{id} waiting but not in the list");
        }
    }
}

async fn claim_one(q: &Queue, partition: u32, lease: Duration) -> Option<Job> {
    q.claim(partition, 1, lease).await.unwrap().jobs.into_iter().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_lease_expiry_and_stale_tokens() {
    let (q, prefix) = queue();
    let order = "ORD-Q-1".to_owned();
    let p = q.partition_of(&order);
    let answers = q.enqueue(&[(order.clone(), payload()), (order.clone(), payload())]).await.unwrap();
    assert_eq!(answers, vec![Enqueued::New, Enqueued::Duplicate]);
    check_invariant(&prefix, p).await;

    let first = claim_one(&q, p, Duration::from_millis(100)).await.unwrap();
    assert_eq!((first.order_id.as_str(), first.delivery), ("ORD-Q-1", 1));
    check_invariant(&prefix, p).await;
    // Enqueue while active: no change.
    assert_eq!(q.enqueue(&[(order.clone(), payload())]).await.unwrap(), vec![Enqueued::Duplicate]);
    assert!(claim_one(&q, p, Duration::from_secs(5)).await.is_none());

    // The lease expires (the worker died): the next claimer takes it back, as delivery 2.
    let second = wait_until(Duration::from_secs(5), "the expired lease to be reclaimed", || {
        let q = q.clone();
        async move { claim_one(&q, p, Duration::from_secs(5)).await }
    })
    .await;
    assert_eq!((second.order_id.as_str(), second.delivery), ("ORD-Q-1", 2));
    assert_ne!(first.token, second.token);
    check_invariant(&prefix, p).await;
    // The zombie's moves are refused; the owner's are not.
    assert_eq!(q.extend(p, &[&first], Duration::from_secs(5)).await.unwrap(), vec!["ORD-Q-1".to_owned()]);
    assert_eq!(q.complete(p, &[&first]).await.unwrap(), 1);
    assert!(!q.dead(&first, "zombie").await.unwrap());
    assert_eq!(q.job_state(&order).await.unwrap().0.as_deref(), Some("active"));
    assert!(q.extend(p, &[&second], Duration::from_secs(5)).await.unwrap().is_empty());
    assert_eq!(q.complete(p, &[&second]).await.unwrap(), 0);
    assert_eq!(q.job_state(&order).await.unwrap().0, None);
    check_invariant(&prefix, p).await;
    // Finished jobs leave Redis: a new enqueue is accepted (the worker re-reads Postgres).
    assert_eq!(q.enqueue(&[(order, payload())]).await.unwrap(), vec![Enqueued::New]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_claim_skips_stale_copies_and_a_bulk_complete_counts_a_repeat_as_stale() {
    let (q, prefix) = queue();
    let orders: Vec<String> =
        (0..200).map(|i| format!("ORD-B-{i}")).filter(|o| q.partition_of(o) == 2).take(5).collect();
    let jobs: Vec<(String, JobPayload)> = orders.iter().map(|o| (o.clone(), payload())).collect();
    assert_eq!(q.enqueue(&jobs).await.unwrap(), vec![Enqueued::New; 5]);
    // Stale copies in the line: a second copy of a waiting job, and an id with no job.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let wait = format!("{prefix}:{{p2}}:wait");
    let _: i64 =
        redis::cmd("LPUSH").arg(&wait).arg(&orders[3]).arg("ORD-GONE").query_async(&mut c).await.unwrap();

    let claimed = q.claim(2, 10, Duration::from_secs(30)).await.unwrap().jobs;
    let ids: Vec<&str> = claimed.iter().map(|j| j.order_id.as_str()).collect();
    // The copy at the head is taken first; its later copy is skipped.
    let mut expected: Vec<&str> = vec![orders[3].as_str()];
    expected.extend(orders.iter().map(String::as_str).filter(|o| *o != orders[3]));
    assert_eq!(ids, expected);
    assert!(claimed.iter().all(|j| j.delivery == 1 && j.payload.source == "test"));
    let tokens: std::collections::HashSet<&str> = claimed.iter().map(|j| j.token.as_str()).collect();
    assert_eq!(tokens.len(), 5);
    let left: i64 = redis::cmd("LLEN").arg(&wait).query_async(&mut c).await.unwrap();
    assert_eq!(left, 0);
    check_invariant(&prefix, 2).await;

    // Completing the first job twice in one call: the repeat is stale; the others are done.
    let mut done: Vec<&Job> = claimed.iter().collect();
    done.push(&claimed[0]);
    assert_eq!(q.complete(2, &done).await.unwrap(), 1);
    for o in &orders {
        assert_eq!(q.job_state(o).await.unwrap(), (None, None), "{o}");
    }
    for hash in ["state", "job", "att", "tok", "err"] {
        let len: i64 =
            redis::cmd("HLEN").arg(format!("{prefix}:{{p2}}:{hash}")).query_async(&mut c).await.unwrap();
        assert_eq!(len, 0, "{hash}");
    }
    check_invariant(&prefix, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_their_delay_dead_jobs_requeue_and_released_jobs_keep_their_place() {
    let (q, prefix) = queue();
    // Three orders in one partition.
    let orders: Vec<String> =
        (0..200).map(|i| format!("ORD-R-{i}")).filter(|o| q.partition_of(o) == 1).take(3).collect();
    let jobs: Vec<(String, JobPayload)> = orders.iter().map(|o| (o.clone(), payload())).collect();
    q.enqueue(&jobs).await.unwrap();
    let claimed = q.claim(1, 10, Duration::from_secs(30)).await.unwrap().jobs;
    assert_eq!(
        claimed.iter().map(|j| j.order_id.clone()).collect::<Vec<_>>(),
        orders,
        "FIFO within a partition"
    );
    // Each job of one claim gets a token of its own: presenting one must not move another.
    let tokens: std::collections::HashSet<&str> = claimed.iter().map(|j| j.token.as_str()).collect();
    assert_eq!(tokens.len(), claimed.len(), "distinct tokens in one claim: {claimed:?}");

    // Retry the first in 300 ms, dead-letter the second, hand back the third.
    let stale = q
        .retry(1, &[Retry { job: &claimed[0], delay: Duration::from_millis(300), error: "HTTP_503".into() }])
        .await
        .unwrap();
    assert_eq!(stale, 0);
    assert!(q.dead(&claimed[1], "INVOICE_SERIAL_NOT_FOUND").await.unwrap());
    q.release(1, &[&claimed[2]]).await.unwrap();
    check_invariant(&prefix, 1).await;
    let depth = q.depths().await.unwrap()[1];
    assert_eq!((depth.waiting, depth.active, depth.delayed, depth.dead), (1, 0, 1, 1));

    // The released job comes back first, with its delivery count unchanged.
    let back = claim_one(&q, 1, Duration::from_secs(30)).await.unwrap();
    assert_eq!((back.order_id.as_str(), back.delivery), (orders[2].as_str(), 1));
    q.complete(1, &[&back]).await.unwrap();
    // The delayed job is not claimable before its time, then is.
    assert!(claim_one(&q, 1, Duration::from_secs(30)).await.is_none());
    let retried = wait_until(Duration::from_secs(5), "the retry to come due", || {
        let q = q.clone();
        async move { claim_one(&q, 1, Duration::from_secs(30)).await }
    })
    .await;
    // A retry is a live worker's verdict: it does not count toward a poison pill (a job retried
    // through a long outage would otherwise be failed as one).
    assert_eq!((retried.order_id.as_str(), retried.delivery), (orders[0].as_str(), 1));
    check_invariant(&prefix, 1).await;

    // The dead job: listed with its error, deduped while dead, requeued with attempts reset.
    let dead = q.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].0.as_str(), dead[0].3.as_deref()),
        (orders[1].as_str(), Some("INVOICE_SERIAL_NOT_FOUND"))
    );
    assert_eq!(q.requeue(&orders[1], &payload()).await.unwrap(), "requeued");
    assert_eq!(q.requeue(&orders[1], &payload()).await.unwrap(), "waiting");
    let again = claim_one(&q, 1, Duration::from_secs(30)).await.unwrap();
    assert_eq!((again.order_id.as_str(), again.delivery), (orders[1].as_str(), 1));
    check_invariant(&prefix, 1).await;
    // Requeue of an order Redis does not know creates the job (Redis lost it).
    assert_eq!(q.requeue("ORD-UNKNOWN", &payload()).await.unwrap(), "enqueued");

    // An enqueue revives a dead job: whoever enqueues read Postgres, which says it is due
    // (a replay committed in Postgres whose requeue never reached Redis must not stay dead).
    q.complete(1, &[&again]).await.unwrap();
    q.enqueue(&[(orders[1].clone(), payload())]).await.unwrap();
    let job = claim_one(&q, 1, Duration::from_secs(30)).await.unwrap();
    assert!(q.dead(&job, "x").await.unwrap());
    assert_eq!(q.enqueue(&[(orders[1].clone(), payload())]).await.unwrap(), vec![Enqueued::New]);
    assert_eq!(q.job_state(&orders[1]).await.unwrap(), (Some("waiting".into()), None));
    check_invariant(&prefix, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depths_match_the_lists_and_scripts_survive_a_script_flush() {
    let (q, prefix) = queue();
    let jobs: Vec<(String, JobPayload)> = (0..30).map(|i| (format!("ORD-M-{i}"), payload())).collect();
    q.enqueue(&jobs).await.unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    // Redis forgets its scripts on restart; the client reloads them on NOSCRIPT. (SCRIPT
    // FLUSH affects every test's queue in this Redis only by making them reload too.)
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    let claimed = q.claim(0, 2, Duration::from_secs(30)).await.unwrap();
    let depths = q.depths().await.unwrap();
    for (p, d) in depths.iter().enumerate() {
        let llen: u64 =
            redis::cmd("LLEN").arg(format!("{prefix}:{{p{p}}}:wait")).query_async(&mut c).await.unwrap();
        let active: u64 =
            redis::cmd("ZCARD").arg(format!("{prefix}:{{p{p}}}:active")).query_async(&mut c).await.unwrap();
        assert_eq!((d.waiting, d.active), (llen, active));
    }
    assert_eq!(depths.iter().map(|d| d.waiting + d.active).sum::<u64>(), 30);
    assert_eq!(depths[0].active, claimed.jobs.len() as u64);
    check_invariant(&prefix, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_slots_are_limited_released_renewed_and_freed_by_their_lease() {
    let (q, _) = queue();
    let key = q.series_key("M-S", "C26TAA");
    let other = q.series_key("M-S", "C26TAB");
    let long = Duration::from_secs(30);
    let t = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // Three asked for at once over a limit of 2: the first two get one.
    assert_eq!(q.try_acquire_series(&key, &t(&["a", "b", "c"]), 2, long).await.unwrap(), 2);
    assert_eq!(q.try_acquire_series(&key, &t(&["c"]), 2, long).await.unwrap(), 0, "over the limit");
    // A holder asking again keeps its one slot.
    assert_eq!(q.try_acquire_series(&key, &t(&["a"]), 2, long).await.unwrap(), 1);
    assert_eq!(q.series_holders(&key).await.unwrap(), 2);
    // Another series of the same merchant has its own slots.
    assert_eq!(q.try_acquire_series(&other, &t(&["c"]), 2, long).await.unwrap(), 1);

    q.release_series(&key, &t(&["a"])).await.unwrap();
    assert_eq!(q.try_acquire_series(&key, &t(&["c", "d"]), 2, long).await.unwrap(), 1);
    assert_eq!(q.series_holders(&key).await.unwrap(), 2);

    // A holder that died frees its slot when its lease runs out; a renewed one does not.
    q.release_series(&key, &t(&["b", "c"])).await.unwrap();
    let short = Duration::from_millis(300);
    assert_eq!(q.try_acquire_series(&key, &t(&["dead", "alive"]), 2, short).await.unwrap(), 2);
    assert_eq!(q.try_acquire_series(&key, &t(&["new"]), 2, long).await.unwrap(), 0);
    wait_until(Duration::from_secs(10), "the dead holder's lease to run out", || async {
        assert_eq!(q.renew_series(&key, &t(&["alive"]), short).await.unwrap(), 1, "alive lost its slot");
        (q.try_acquire_series(&key, &t(&["new"]), 2, long).await.unwrap() == 1).then_some(())
    })
    .await;
    assert_eq!(q.series_holders(&key).await.unwrap(), 2, "alive and new");
    // Renewing a slot whose lease ran out but that nobody took yet extends it and says so.
    assert_eq!(q.try_acquire_series(&other, &t(&["short"]), 5, Duration::from_millis(1)).await.unwrap(), 1);
    wait_until(Duration::from_secs(10), "the short lease to run out", || async {
        (q.series_holders(&other).await.unwrap() == 1).then_some(())
    })
    .await;
    assert_eq!(q.renew_series(&other, &t(&["short", "c"]), long).await.unwrap(), 1, "c was live, short not");
    assert_eq!(q.series_holders(&other).await.unwrap(), 2);
    // A renewal that arrives after the release brings nothing back.
    q.release_series(&other, &t(&["short", "c"])).await.unwrap();
    assert_eq!(q.renew_series(&other, &t(&["short", "c"]), long).await.unwrap(), 0);
    assert_eq!(q.series_holders(&other).await.unwrap(), 0);
    // Reaped after its lease ran out (someone else asked meanwhile): not taken back either.
    assert_eq!(q.try_acquire_series(&other, &t(&["gone"]), 1, Duration::from_millis(1)).await.unwrap(), 1);
    wait_until(Duration::from_secs(10), "the gone lease to run out", || async {
        (q.try_acquire_series(&other, &t(&["taker"]), 1, long).await.unwrap() == 1).then_some(())
    })
    .await;
    assert_eq!(q.renew_series(&other, &t(&["gone"]), long).await.unwrap(), 0);
    assert_eq!(q.series_holders(&other).await.unwrap(), 1, "only the taker, within the limit of 1");
}

/// A TCP relay to the test Redis that can stop relaying without closing anything (what a
/// paused Redis, or a network that drops packets, looks like to the client) and can cut
/// every connection it relays. A fault injector between the client and the real Redis.
struct Relay {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> Relay {
        // `redis://[user:password@]host:port[/db]` → `host:port`
        let url = redis_url();
        let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
        let upstream = authority.rsplit('@').next().unwrap().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let accept = tokio::spawn({
            let (frozen, links) = (frozen.clone(), links.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let frozen = frozen.clone();
                    links.lock().unwrap().push(tokio::spawn(async move {
                        tokio::join!(
                            pump(client_read, server_write, frozen.clone()),
                            pump(server_read, client_write, frozen.clone())
                        );
                    }));
                }
            }
        });
        Relay { addr, frozen, links, accept }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every relayed connection (both ends).
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

/// Copies `from` to `to`, holding what it read while `frozen`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_fails_operations_instead_of_hanging_them() {
    let relay = Relay::start().await;
    let pool = deadpool_redis::Config::from_url(format!("redis://{}", relay.addr))
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let q = Queue::new(pool, 3, &unique("iq-hang-"));
    assert_eq!(q.enqueue(&[("ORD-HANG-1".into(), payload())]).await.unwrap(), vec![Enqueued::New]);

    // Redis stops answering on the connection the queue holds: the operation fails on the
    // response timeout instead of hanging.
    relay.freeze(true);
    let started = std::time::Instant::now();
    let answer =
        tokio::time::timeout(Duration::from_secs(60), q.enqueue(&[("ORD-HANG-2".into(), payload())]))
            .await
            .expect("the enqueue came back within a minute");
    let error = answer.expect_err("nothing answered, so the enqueue cannot have succeeded");
    assert!(error.to_string().contains("Redis"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());

    // The stalled connection was forgotten: once the network is back (the stalled
    // connections are gone), the very next operation succeeds on a new one.
    relay.cut();
    relay.freeze(false);
    let answer = q.enqueue(&[("ORD-HANG-3".into(), payload())]).await;
    assert_eq!(answer.unwrap(), vec![Enqueued::New]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_dlq_keeps_only_the_newest_dead_jobs_and_forgets_the_rest_entirely() {
    let (q, prefix) = queue();
    let q = q.with_dlq_cap(2);
    let orders: Vec<String> =
        (0..).map(|i| format!("ORD-CAP-{i}")).filter(|o| q.partition_of(o) == 0).take(3).collect();
    for order in &orders {
        q.enqueue(&[(order.clone(), payload())]).await.unwrap();
        let job = claim_one(&q, 0, Duration::from_secs(30)).await.unwrap();
        assert_eq!(&job.order_id, order);
        assert!(q.dead(&job, "INVOICE_SERIAL_NOT_FOUND").await.unwrap());
    }
    let dead: Vec<String> = q.dead_jobs(10).await.unwrap().into_iter().map(|(id, ..)| id).collect();
    assert_eq!(dead, orders[1..].to_vec(), "the oldest left the DLQ");
    check_invariant(&prefix, 0).await;
    // Nothing of it is left behind in the hashes.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for hash in ["state", "job", "att", "err", "tok"] {
        let there: bool = redis::cmd("HEXISTS")
            .arg(format!("{prefix}:{{p0}}:{hash}"))
            .arg(&orders[0])
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(!there, "{hash} still holds {}", orders[0]);
    }
    assert_eq!(q.depths().await.unwrap()[0].dead, 2);
    // Enqueued again (a requeue from Postgres), it is a new job.
    assert_eq!(q.enqueue(&[(orders[0].clone(), payload())]).await.unwrap(), vec![Enqueued::New]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweepers_offers_of_jobs_already_waiting_are_not_counted_as_duplicates() {
    use invoice::issuance::{enqueue, SWEEPER};
    let (q, _) = queue();
    let metrics = invoice::metrics::Metrics::new();
    let orders = vec![("ORD-SW-1".to_owned(), "M-1".to_owned()), ("ORD-SW-2".to_owned(), "M-1".to_owned())];
    assert_eq!(enqueue(&q, &metrics, &orders, "stream").await.unwrap(), 2);
    // Each sweep offers every due invoice again; the backlog is not duplicates.
    for _ in 0..3 {
        assert_eq!(enqueue(&q, &metrics, &orders, SWEEPER).await.unwrap(), 0);
    }
    assert_eq!(enqueue(&q, &metrics, &orders[..1], "webhook").await.unwrap(), 0);
    let text = metrics.render();
    let moves = |event: &str| {
        crate::support::metric_value(&text, "invoice_queue_jobs_total", &[&format!("event=\"{event}\"")])
    };
    assert_eq!((moves("enqueued"), moves("deduped")), (2.0, 1.0), "{text}");
}
