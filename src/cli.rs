//! The command line (SPEC §7). Subcommands arrive with the capability they expose; none is
//! a stub.

use clap::{Parser, Subcommand};

/// `invoice`: issues Vietnamese e-invoices for paid orders from Kafka events.
#[derive(Debug, Parser)]
#[command(name = "invoice", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations and load reference data (permissions, administrative units).
    Migrate {
        /// Also create the development demo merchant `M-1001` with a provider configuration
        /// pointing at the local simulator.
        #[arg(long)]
        seed: bool,
    },
    /// Serve the HTTP API (health, readiness, metrics) until SIGTERM or SIGINT.
    Api,
    /// Consume payments and merchant CDC, decide issuance, publish lifecycle events (until
    /// SIGTERM or SIGINT; also serves /health, /ready and /metrics on the HTTP address).
    Stream,
    /// Manage the Kafka topics defined in `topics/`.
    Topics {
        /// What to do.
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Print the issuance-queue partition of an order id (SPEC §4).
    PartitionOf {
        /// The order id.
        order_id: String,
        /// Number of queue partitions.
        #[arg(long, env = "APP_ENV_INVOICE_QUEUE_PARTITIONS", default_value_t = 3,
              value_parser = clap::value_parser!(u32).range(1..=1024))]
        partitions: u32,
    },
    /// Print a fresh random 32-byte key as 64 hex characters (for APP_ENV_INVOICE_CREDENTIALS_KEY).
    Keygen,
}

/// `invoice topics …`
#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create missing topics; report how existing ones differ from their definitions
    /// (exit code 1 if any does).
    Apply,
}
