//! `invoice` issues Vietnamese e-invoices (hóa đơn điện tử) for paid orders.
//!
//! Upstream services publish payment-success events and the merchant database publishes
//! Debezium change events to Kafka. Per-partition stream tasks keep each merchant's tax
//! information current and decide, for each paid order, whether and how to issue; the
//! decision, the Kafka offset that caused it, an audit row and an outbox event are written
//! in one Postgres transaction, so a crash at any instant neither loses nor duplicates
//! (SPEC §1). Redis-backed workers call the merchant's e-invoice provider; a thin HTTP API
//! takes signed webhooks, buyer claims and operator requests.
//!
//! Layout: [`config`] (environment), [`ids`] (snowflakes, queue partitions), [`crypto`]
//! (credentials at rest), [`storage`] (all SQL), [`topics`] (topics as code), [`http`]
//! (the API), [`metrics`] and [`telemetry`] (observability), [`app`] (wiring), [`cli`].

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod events;
pub mod http;
pub mod ids;
pub mod issuance;
pub mod metrics;
pub mod outbox;
pub mod providers;
pub mod queue;
pub mod sample_traffic;
pub mod storage;
pub mod stream;
pub mod telemetry;
pub mod topics;
