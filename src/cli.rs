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
    /// Run the issuance workers: claim jobs from the Redis queue, call the merchants'
    /// providers, retry, dead-letter; also sweep due invoices from Postgres and expire claims
    /// (until SIGTERM or SIGINT; serves /health, /ready and /metrics on the HTTP address).
    Worker,
    /// Run api + stream + worker in one process.
    All,
    /// Show an order's invoices, provider calls and audit trail (JSON).
    Inspect {
        /// The order id.
        order_id: String,
    },
    /// Issue an order's invoices again: a FAILED invoice goes back to QUEUED (attempts reset)
    /// and an unfinished one gets a job if it has none. A no-op on an issued invoice.
    Replay {
        /// The order id.
        order_id: String,
        /// Why (kept in the audit trail).
        #[arg(long, default_value = "operator replay")]
        reason: String,
    },
    /// The issuance dead-letter queue.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Run a local e-invoice provider speaking the Viettel S-Invoice API, with knobs for
    /// latency, errors and timeouts (for development, tests and benchmarks).
    ProviderSim(ProviderSimArgs),
    /// Development: produce sample payments of the demo merchant to the payment topic and
    /// print invoice counts as they grow (what `make run` shows).
    SampleTraffic {
        /// Payments per second.
        #[arg(long, default_value_t = 5)]
        rate: u32,
        /// Stop producing after this many (keep printing counts).
        #[arg(long)]
        count: Option<u64>,
        /// The merchant.
        #[arg(long, default_value = "M-1001")]
        merchant: String,
    },
    /// The stream's stored consumer offsets (the truth; Kafka's committed offsets mirror them).
    Offsets {
        /// What to do.
        #[command(subcommand)]
        action: OffsetsAction,
    },
    /// Compare stored TaxInfo with the latest record per merchant of the (compacted) merchant
    /// CDC topic; exit 1 if any merchant differs.
    TaxDrift {
        /// Only this merchant.
        #[arg(long)]
        merchant: Option<String>,
        /// One JSON object per merchant instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The newest messages of the dead-letter topic: where each came from and why it could
    /// not be processed (payloads are not printed: they may hold personal data).
    Deadletters {
        /// Newest messages per partition.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// One JSON object per message instead of text.
        #[arg(long)]
        json: bool,
    },
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
    /// Key rotation: re-seal every stored credential under APP_ENV_INVOICE_CREDENTIALS_KEY
    /// (opening with APP_ENV_INVOICE_CREDENTIALS_KEY_PREVIOUS where needed). Idempotent.
    RewrapCredentials {
        /// Rows per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch: i64,
    },
}

/// `invoice dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List FAILED invoices (Postgres is the authority) with their queue state and error.
    List {
        /// Most rows to show.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Requeue an order's FAILED invoice (FAILED → QUEUED, audited) after the cause was fixed.
    Requeue {
        /// The order id.
        order_id: String,
        /// Why (kept in the audit trail).
        #[arg(long, default_value = "operator requeue from the DLQ")]
        reason: String,
    },
}

/// `invoice provider-sim` flags (each knob can also be changed at run time with
/// `PUT /sim/knobs`).
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderSimArgs {
    /// Listen address.
    #[arg(long, env = "PROVIDER_SIM_ADDR", default_value = "127.0.0.1:31150")]
    pub addr: std::net::SocketAddr,
    /// Latency added to every create and lookup, in ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share (0–1) of creates answered with --fail-status before anything is issued.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// HTTP status of injected transient failures.
    #[arg(long, default_value_t = 503)]
    pub fail_status: u16,
    /// Share (0–1) of creates refused permanently (INVOICE_SERIAL_NOT_FOUND).
    #[arg(long, default_value_t = 0.0)]
    pub permanent_rate: f64,
    /// Share (0–1) of creates that issue and then hang for --hang-ms (a client timeout).
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    /// How long a "timeout" hangs, in ms.
    #[arg(long, default_value_t = 120_000)]
    pub hang_ms: u64,
    /// Share (0–1) of creates accepted without a number.
    #[arg(long, default_value_t = 0.0)]
    pub accept_without_number_rate: f64,
    /// When the number of such an invoice appears, in ms.
    #[arg(long, default_value_t = 2_000)]
    pub number_delay_ms: u64,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 600)]
    pub token_ttl_s: u64,
}

impl ProviderSimArgs {
    /// The simulator knobs these flags describe.
    pub fn knobs(&self) -> crate::providers::sim::Knobs {
        crate::providers::sim::Knobs {
            latency_ms: self.latency_ms,
            fail_rate: self.fail_rate,
            fail_status: self.fail_status,
            permanent_rate: self.permanent_rate,
            timeout_rate: self.timeout_rate,
            hang_ms: self.hang_ms,
            accept_without_number_rate: self.accept_without_number_rate,
            number_delay_ms: self.number_delay_ms,
            token_ttl_s: self.token_ttl_s,
            ..crate::providers::sim::Knobs::default()
        }
    }
}

/// `invoice offsets …`
#[derive(Debug, Subcommand)]
pub enum OffsetsAction {
    /// Per topic and partition: stored next offset, Kafka's committed mirror, log start, high
    /// watermark and lag (like `kafka-consumer-groups --describe`).
    Show {
        /// One JSON object per partition instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move the stored offsets of a consumed topic. A dry run unless `--execute`; refused
    /// while the consumer group has members unless `--force`; audited.
    Reset {
        /// The topic (its configured name).
        #[arg(long)]
        topic: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
        /// To the first offset still in the log (re-process everything retained).
        #[arg(long, group = "target")]
        to_earliest: bool,
        /// To the high watermark (skip everything not yet processed).
        #[arg(long, group = "target")]
        to_latest: bool,
        /// To the first message at or after this RFC 3339 time.
        #[arg(long, group = "target")]
        to_datetime: Option<String>,
        /// To this offset (clamped into the log).
        #[arg(long, group = "target")]
        to_offset: Option<i64>,
        /// Apply the moves (without it, only print them).
        #[arg(long)]
        execute: bool,
        /// Apply even while consumers are running (they are fenced by the stored offset).
        #[arg(long)]
        force: bool,
    },
}

/// `invoice topics …`
#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create missing topics; report how existing ones differ from their definitions
    /// (exit code 1 if any does).
    Apply,
    /// Print the AsyncAPI 3.0 document of the topics (JSON), generated from `topics/` with the
    /// configured names (`docs/asyncapi.json` holds it for the default names).
    Asyncapi,
}
