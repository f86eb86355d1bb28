//! Broker-side faults the real single broker cannot produce on demand, injected with
//! librdkafka's mock cluster (in addition to the real-broker tests): leader changes, request
//! errors on fetch and offset commit, a broker going down and up. Postgres is real.

use std::sync::mpsc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::events::{payment, tax};
use crate::support::{
    insert_merchant, insert_provider_config, stream_env, unique, wait_until, TestDb, TestStream, DECISIONS,
};

enum Fault {
    MoveLeaders,
    FetchErrors,
    CommitErrors,
    BrokerBounce,
    Stop,
}

/// The mock holds a raw pointer (not `Send`): it lives on a thread of its own and takes
/// fault commands over a channel.
fn start_mock(topics: Vec<String>) -> (String, mpsc::Sender<Fault>, std::thread::JoinHandle<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (fault_tx, fault_rx) = mpsc::channel::<Fault>();
    let handle = std::thread::spawn(move || {
        let mock = MockCluster::new(3).unwrap();
        for topic in &topics {
            mock.create_topic(topic, 3, 3).unwrap();
        }
        ready_tx.send(mock.bootstrap_servers()).unwrap();
        for fault in fault_rx {
            match fault {
                Fault::MoveLeaders => {
                    for topic in &topics {
                        for p in 0..3 {
                            mock.partition_leader(topic, p, Some((p + 1) % 3 + 1)).unwrap();
                        }
                    }
                }
                Fault::FetchErrors => mock.request_errors(
                    RDKafkaApiKey::Fetch,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5],
                ),
                Fault::CommitErrors => mock.request_errors(
                    RDKafkaApiKey::OffsetCommit,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 5],
                ),
                Fault::BrokerBounce => {
                    mock.broker_down(2).unwrap();
                    std::thread::sleep(Duration::from_millis(500));
                    mock.broker_up(2).unwrap();
                }
                Fault::Stop => break,
            }
        }
    });
    (ready_rx.recv().unwrap(), fault_tx, handle)
}

async fn produce(producer: &FutureProducer, topic: &str, range: std::ops::Range<usize>) {
    let values: Vec<(String, String)> = range
        .map(|i| (format!("ORD-{i}"), payment(&format!("ev-{i}"), &format!("ORD-{i}"), "M-1").to_string()))
        .collect();
    let sends = values
        .iter()
        .map(|(k, v)| producer.send(FutureRecord::to(topic).key(k).payload(v), Duration::from_secs(30)));
    for r in join_all(sends).await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_changes_request_errors_and_a_broker_bounce_lose_and_duplicate_nothing() {
    let db = TestDb::create().await;
    insert_merchant(&db, "M-1", &tax("immediate")).await;
    insert_provider_config(&db, "M-1", 1).await;
    let prefix = unique("mock-");
    let names = invoice::config::Topics::prefixed(&prefix);
    let (bootstrap, faults, mock) = start_mock(vec![
        names.payment.clone(),
        names.merchant_cdc.clone(),
        names.events.clone(),
        names.deadletter.clone(),
    ]);
    let mut env = stream_env(&db, &names, &unique("g-mock-"));
    env.insert("APP_ENV_INVOICE_KAFKA_BROKERS".into(), bootstrap.clone());
    env.insert("APP_ENV_INVOICE_STREAM_BATCH_MAX".into(), "20".into());
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let stream = TestStream::spawn(&env).await;

    let count = || async {
        let n: i64 = sqlx::query_scalar(DECISIONS).fetch_one(&db.pool).await.unwrap();
        n
    };
    let faults_in_order = [Fault::FetchErrors, Fault::MoveLeaders, Fault::CommitErrors, Fault::BrokerBounce];
    let mut produced = 0;
    for fault in faults_in_order {
        produce(&producer, &names.payment, produced..produced + 100).await;
        produced += 100;
        faults.send(fault).unwrap();
        let target = produced as i64;
        wait_until(Duration::from_secs(90), "the stream to catch up after a fault", || async {
            (count().await >= target).then_some(())
        })
        .await;
    }
    assert_eq!(count().await, 400);
    let invoices: i64 = sqlx::query_scalar("SELECT count(*) FROM invoice").fetch_one(&db.pool).await.unwrap();
    assert_eq!(invoices, 400, "one invoice per order");
    let stored: i64 =
        sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM consumer_offset WHERE topic = $1")
            .bind(&names.payment)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, 400);
    stream.stop().await.unwrap();
    faults.send(Fault::Stop).unwrap();
    mock.join().unwrap();
}
