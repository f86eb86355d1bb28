//! `invoice stream`: consumes `payment.succeeded.v1` and `merchant.cdc.v1` in one consumer
//! group, one task per assigned partition, and stores each batch's decisions together with
//! the offset that produced them in a single Postgres transaction (SPEC §1.1).
//!
//! Invariants:
//! - Starting offsets come from Postgres and are put into the assignment itself; Kafka's
//!   committed offsets are only a fallback for a partition never seen, and a mirror for lag
//!   tools (stored after each commit, auto-committed).
//! - The stored offset is advanced with a compare-and-set, first in the transaction: a
//!   zombie owner is fenced by the row lock and the changed value.
//! - A revoked partition's task has finished or abandoned its batch and exited before the
//!   partition is released.
//! - Invalid messages become dead letters in the same transaction; nothing stalls a partition
//!   except a transient failure, which is retried in place with backoff.

mod consumer;
pub mod deadletter;
mod merchants;
pub mod offsets;
mod partition;
mod payments;
mod scan;
pub mod tax_drift;

use std::time::Duration;

pub use consumer::run;
pub use payments::transaction_uuid;

use crate::config::Topics;
use crate::ids::{IdError, Snowflake};
use crate::metrics::Metrics;
use crate::storage::StorageError;

/// Tuning of the stream.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most messages in one batch (one transaction).
    pub batch_max: usize,
    /// How long a batch waits for more messages after its first.
    pub batch_linger: Duration,
    /// A partition with lag and no progress for this long is recovered.
    pub stall_after: Duration,
    /// How long a revoked partition's task may take to finish its batch.
    pub revoke_timeout: Duration,
    /// Kafka `session.timeout.ms`.
    pub session_timeout: Duration,
    /// The consumer wording recorded in each invoice's snapshot of the rule set.
    pub consumer_wording: crate::domain::rules::ConsumerWording,
    /// The longest a batch's transaction may wait for Postgres before it is abandoned and
    /// retried (it may still have committed: the retry then follows Postgres).
    pub work_deadline: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch_max: 500,
            batch_linger: Duration::from_millis(5),
            stall_after: Duration::from_secs(30),
            revoke_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(10),
            consumer_wording: crate::domain::rules::ConsumerWording::default(),
            work_deadline: Duration::from_secs(60),
        }
    }
}

/// What the stream's tasks share.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Postgres.
    pub db: sqlx::PgPool,
    /// Id generator (leased worker id).
    pub ids: Snowflake,
    /// Metrics.
    pub metrics: Metrics,
    /// Topic names.
    pub topics: Topics,
    /// Consumer group (also the key of stored offsets).
    pub group_id: String,
    /// Kafka: brokers, TLS and SASL.
    pub kafka: crate::config::Kafka,
    /// Client id prefix.
    pub client_id: String,
    /// Tuning.
    pub settings: Settings,
    /// The issuance queue that QUEUED invoices are handed to after each commit (`None`: the
    /// sweeper of the workers picks them up).
    pub queue: Option<crate::queue::Queue>,
}

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Another owner moved the stored offset: this task is a zombie for that range.
    #[error("stored offset moved by another owner (now {stored:?})")]
    Fenced {
        /// The offset now stored.
        stored: Option<i64>,
    },
    /// Postgres failed; the batch is retried in place.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No ids can be issued (clock or lease); retried in place.
    #[error(transparent)]
    Ids(IdError),
    /// An internal invariant broke.
    #[error("internal error: {0}")]
    Bug(&'static str),
}

impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> Self {
        BatchError::Storage(error.into())
    }
}
