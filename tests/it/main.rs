//! Integration tests against the real local stack (`make deps`): one binary, one module per
//! area. See `support` for the harness.
// Test code: a failed unwrap is a failed test with its location, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_claims;
mod api_fuzz;
mod api_operator;
mod api_webhooks;
mod cli;
mod crash;
mod events;
mod harness;
mod http_api;
mod issuance;
mod mock_cluster;
mod offsets;
mod operations;
mod outbox;
mod plans;
mod queue;
mod runbook;
mod stream;
mod support;
mod topics;
mod worker_ids;
