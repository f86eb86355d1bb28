//! Snowflake worker ids are unique per live process (advisory lock) and survive restarts
//! without reuse.

use std::sync::Arc;
use std::time::Duration;

use invoice::ids::{decompose, SystemClock};
use invoice::metrics::Metrics;
use invoice::storage::workers::{self, LeaseError};

use crate::cli::free_port;
use crate::support::{base_env, invoice_cmd, next_worker_id, wait_until, TestDb};

#[tokio::test]
async fn a_second_holder_of_a_worker_id_is_refused_until_the_first_releases() {
    let db = TestDb::create().await;
    let id = next_worker_id();
    let first = workers::acquire(&db.url, id, "first", Arc::new(SystemClock), Metrics::new()).await.unwrap();
    let second = workers::acquire(&db.url, id, "second", Arc::new(SystemClock), Metrics::new()).await;
    assert!(matches!(second, Err(LeaseError::Taken { worker_id }) if worker_id == id));
    let issued = first.ids.next_id().unwrap();
    assert_eq!(decompose(issued).worker_id, id);
    first.release().await;

    let again = workers::acquire(&db.url, id, "again", Arc::new(SystemClock), Metrics::new()).await.unwrap();
    let later = again.ids.next_id().unwrap();
    assert!(later > issued, "a restart must not reuse ids");
    let (last_ms, holder): (i64, String) =
        sqlx::query_as("SELECT last_ms, holder FROM snowflake_worker WHERE worker_id = $1")
            .bind(i32::from(id))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(last_ms as u64 >= decompose(issued).unix_ms);
    assert_eq!(holder, "again");
    again.release().await;
}

#[tokio::test]
async fn auto_worker_ids_are_distinct_for_racing_processes_and_skip_recent_or_skewed_ids() {
    // Advisory locks are per database: this test's database starts with every id free.
    let db = TestDb::create().await;
    let take = |holder: &'static str| {
        let url = db.url.clone();
        async move { workers::acquire_any(&url, holder, Arc::new(SystemClock), Metrics::new()).await.unwrap() }
    };
    let leases = futures::future::join_all((0..6).map(|i| take(["a", "b", "c", "d", "e", "f"][i]))).await;
    let mut ids: Vec<u16> = leases.iter().map(|l| l.ids.worker_id()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5], "racing processes got the lowest ids, each once");
    // A fixed id that an auto process holds is refused to anyone else.
    let fixed = workers::acquire(&db.url, 3, "fixed", Arc::new(SystemClock), Metrics::new()).await;
    assert!(matches!(fixed, Err(LeaseError::Taken { worker_id: 3 })));
    let mut leases = leases;
    let released = leases.remove(2);
    let freed = released.ids.worker_id();
    released.release().await;
    // A just-released id is passed over (its owner may only have lost its connection for a
    // moment): the next process takes a fresh one.
    let again = take("g").await;
    assert_ne!(again.ids.worker_id(), freed);
    assert_eq!(again.ids.worker_id(), 6);
    again.release().await;
    for lease in leases {
        lease.release().await;
    }
    // An id last used "in the future" (a host clock far ahead wrote it) is skipped, not fatal.
    let other = TestDb::create().await;
    let ahead = invoice::ids::Clock::now_ms(&SystemClock) as i64 + 600_000;
    sqlx::query("INSERT INTO snowflake_worker (worker_id, last_ms, holder, updated_at) VALUES (0, $1, 'skewed', now() - interval '1 hour')")
        .bind(ahead)
        .execute(&other.pool)
        .await
        .unwrap();
    let skipping =
        workers::acquire_any(&other.url, "h", Arc::new(SystemClock), Metrics::new()).await.unwrap();
    assert_eq!(skipping.ids.worker_id(), 1);
    skipping.release().await;
}

#[tokio::test]
async fn a_restart_with_a_clock_far_behind_the_last_id_refuses_to_start() {
    let db = TestDb::create().await;
    let id = next_worker_id();
    let future = invoice::ids::Clock::now_ms(&SystemClock) + 60_000;
    sqlx::query("INSERT INTO snowflake_worker (worker_id, last_ms, holder) VALUES ($1, $2, 'earlier')")
        .bind(i32::from(id))
        .bind(future as i64)
        .execute(&db.pool)
        .await
        .unwrap();
    let result = workers::acquire(&db.url, id, "now", Arc::new(SystemClock), Metrics::new()).await;
    assert!(matches!(result, Err(LeaseError::ClockBehind { behind_ms, .. }) if behind_ms > 50_000));
}

#[tokio::test]
async fn two_api_processes_with_one_worker_id_the_second_leases_a_free_id_and_says_so() {
    let db = TestDb::create().await;
    let mut env = base_env(&db.url);
    let configured = env["APP_ENV_INVOICE_WORKER_ID"].clone();
    let port = free_port();
    env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), format!("127.0.0.1:{port}"));
    let mut first = invoice_cmd(&env).arg("api").stderr(std::process::Stdio::null()).spawn().unwrap();
    let healthy = |port: u16, who: &'static str| {
        let url = format!("http://127.0.0.1:{port}/health");
        wait_until(Duration::from_secs(30), who, move || {
            let url = url.clone();
            async move { reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
    };
    healthy(port, "the first api process").await;
    let held: Vec<(i32, String)> =
        sqlx::query_as("SELECT worker_id, holder FROM snowflake_worker").fetch_all(&db.pool).await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].0.to_string(), configured);

    let second_port = free_port();
    env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), format!("127.0.0.1:{second_port}"));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut second = invoice_cmd(&env).arg("api").stderr(log.reopen().unwrap()).spawn().unwrap();
    healthy(second_port, "the second api process").await;
    let ids: Vec<i32> = sqlx::query_scalar("SELECT worker_id FROM snowflake_worker ORDER BY updated_at")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for child in [&mut first, &mut second] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(ids.len(), 2, "each process holds an id of its own: {ids:?}");
    assert_ne!(ids[0], ids[1]);
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert!(stderr.contains("is held by another live process"), "{stderr}");
    assert!(stderr.contains(&format!("configured={configured}")), "{stderr}");
}

#[tokio::test]
async fn a_process_whose_worker_id_another_took_while_its_lease_was_down_exits_non_zero() {
    use sqlx::Connection as _;
    let db = TestDb::create().await;
    let env = base_env(&db.url);
    let id: i32 = env["APP_ENV_INVOICE_WORKER_ID"].parse().unwrap();
    let port = free_port();
    let mut env = env;
    env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), format!("127.0.0.1:{port}"));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut api = invoice_cmd(&env).arg("api").stderr(log.reopen().unwrap()).spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}/health");
    wait_until(Duration::from_secs(30), "the api process", || {
        let url = url.clone();
        async move { reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    // Its lease connection drops (a Postgres restart, a cut), and another process takes the
    // id before it is back: the process can issue no id any more.
    let mut other = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'invoice-worker-id-lease'",
    )
    .fetch_one(&mut other)
    .await
    .unwrap();
    assert_eq!(cut, 1);
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(workers::LOCK_NAMESPACE)
        .bind(id)
        .execute(&mut other)
        .await
        .unwrap();
    let status = wait_until(Duration::from_secs(30), "the api process to stop", || {
        let exited = api.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_ne!(status.code(), Some(0), "a process that can issue no id stops with an error");
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert!(stderr.contains("worker-id lease was lost"), "{stderr}");
}

#[tokio::test]
async fn a_lease_whose_own_stale_session_still_holds_the_lock_ends_it_and_carries_on() {
    use sqlx::Connection as _;
    let db = TestDb::create().await;
    let id = next_worker_id();
    let lease =
        workers::acquire(&db.url, id, "stalled", Arc::new(SystemClock), Metrics::new()).await.unwrap();
    let lost = lease.lost();
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let session: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1::int4::oid AND objsubid = 2",
    )
    .bind(i32::from(id))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    // The lease's write-back stalls on the server (here: a row lock): the client gives up
    // after 3 s and drops the connection, but the server session lives on, lock held.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM snowflake_worker WHERE worker_id = $1 FOR UPDATE")
        .bind(i32::from(id))
        .execute(&mut *blocker)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "ids to be refused", || async {
        lease.ids.next_id().is_err().then_some(())
    })
    .await;
    // Reconnecting, the lease finds its own old session holding the lock and ends it.
    wait_until(Duration::from_secs(30), "the stale session to be ended", || {
        let url = db.url.clone();
        async move {
            let mut c = sqlx::PgConnection::connect(&url).await.ok()?;
            let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                .bind(session)
                .fetch_one(&mut c)
                .await
                .ok()?;
            (alive == 0).then_some(())
        }
    })
    .await;
    blocker.rollback().await.unwrap();
    wait_until(Duration::from_secs(30), "the lease to be held again", || async { lease.ids.next_id().ok() })
        .await;
    assert!(!lost.is_cancelled(), "its own stale session is not another process");
    lease.release().await;
}
