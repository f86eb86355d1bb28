//! The `invoice` binary: parse the command line, load the configuration (exit 2 naming the
//! variable when it is wrong), install logging, run.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use invoice::cli::{Cli, Command, DlqAction, OffsetsAction, TopicsAction};
use invoice::config::{self, Config, Mode};
use invoice::{app, crypto, ids, storage, telemetry, topics};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the workers allocate and free many mid-sized JSON
/// documents concurrently, where glibc spent a quarter of the process's CPU (see README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn out(line: impl std::fmt::Display) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not an error worth reporting.
    let _ignored = writeln!(stdout, "{line}");
}

fn main() -> ExitCode {
    // Before parsing: flags take their defaults from the environment (SPEC §6: `.env` counts,
    // variables already set win). A broken `.env` is reported by the commands that need it.
    let dotenv = config::load_dotenv();
    let cli = Cli::parse();
    // Commands that need no configuration.
    match &cli.command {
        Command::Keygen => {
            out(crypto::generate_key_hex());
            return ExitCode::SUCCESS;
        }
        Command::PartitionOf { order_id, partitions } => {
            out(ids::partition_of(order_id, *partitions));
            return ExitCode::SUCCESS;
        }
        Command::ProviderSim(args) => {
            telemetry::init(config::LogFormat::Text);
            return run_provider_sim(args.clone());
        }
        _ => {}
    }
    let mode = match cli.command {
        Command::Api => Mode::Api,
        Command::Stream => Mode::Stream,
        Command::Worker => Mode::Worker,
        Command::All => Mode::All,
        _ => Mode::Tool,
    };
    let cfg = match dotenv.and_then(|()| Config::from_env(mode)) {
        Ok(cfg) => cfg,
        Err(error) => {
            eprintln!("invoice: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(cfg.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("invoice: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cfg)) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "Failed");
            eprintln!("invoice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_provider_sim(args: invoice::cli::ProviderSimArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("invoice: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.addr).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("invoice provider-sim: cannot listen on {}: {error}", args.addr);
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(app::cancel_on_signal(shutdown.clone()));
        tracing::info!(addr = %args.addr, knobs = ?args.knobs(), "Provider simulator listening");
        invoice::providers::sim::serve(listener, invoice::providers::sim::Sim::new(args.knobs()), shutdown)
            .await;
        ExitCode::SUCCESS
    })
}

async fn run(command: Command, cfg: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate { seed } => {
            let db = app::database(&cfg, "invoice-migrate").await?;
            storage::migrate(&db).await?;
            let mut report = storage::seed::reference_data(&db).await?;
            if seed {
                report.demo = storage::seed::demo_merchant(&db, &app::keyring(&cfg)).await?;
            }
            out(format_args!(
                "migrated; rows written: permissions {}, provinces {}, wards {}, demo {}",
                report.permissions, report.provinces, report.wards, report.demo
            ));
            Ok(ExitCode::SUCCESS)
        }
        Command::Api => {
            let listener = app::bind(&cfg, false).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            app::run_api(cfg, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stream => {
            let listener = app::bind(&cfg, true).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            app::run_stream(cfg, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker | Command::All => {
            let listener = app::bind(&cfg, matches!(command, Command::Worker)).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            if matches!(command, Command::Worker) {
                app::run_worker(cfg, listener, shutdown).await?;
            } else {
                app::run_all(cfg, listener, shutdown).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { order_id } => {
            let db = app::database(&cfg, "invoice-inspect").await?;
            let mut report = storage::issuance::inspect(&db, &order_id).await?;
            let queue = app::queue(&cfg)?;
            let (state, error) = queue
                .job_state(&order_id)
                .await
                .unwrap_or((Some("unknown (Redis unavailable)".into()), None));
            report["queue"] = serde_json::json!({
                "partition": queue.partition_of(&order_id), "job": state, "lastError": error,
            });
            out(serde_json::to_string_pretty(&report)?);
            let found = report["invoices"].as_array().is_some_and(|v| !v.is_empty());
            Ok(if found { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        Command::Replay { order_id, reason } => replay(&cfg, &order_id, &reason, false).await,
        Command::Dlq { action: DlqAction::Requeue { order_id, reason } } => {
            replay(&cfg, &order_id, &reason, true).await
        }
        Command::Dlq { action: DlqAction::List { limit } } => {
            let db = app::database(&cfg, "invoice-dlq").await?;
            let queue = app::queue(&cfg)?;
            let failed = storage::issuance::failed(&db, limit).await?;
            out(format_args!(
                "{:<24} {:<12} {:<20} {:<24} {:<9} error",
                "orderId", "merchantId", "invoiceId", "failedAt", "queue"
            ));
            for (id, merchant, order, error, at) in &failed {
                let state =
                    queue.job_state(order).await.ok().and_then(|(s, _)| s).unwrap_or_else(|| "-".into());
                out(format_args!(
                    "{order:<24} {merchant:<12} {id:<20} {:<24} {state:<9} {}",
                    at.format("%Y-%m-%dT%H:%M:%SZ"),
                    error.as_deref().unwrap_or("")
                ));
            }
            out(format_args!("{} failed invoice(s)", failed.len()));
            Ok(ExitCode::SUCCESS)
        }
        Command::SampleTraffic { rate, count, merchant } => {
            let db = app::database(&cfg, "invoice-sample-traffic").await?;
            let producer = app::kafka_producer(&cfg)?;
            let stop = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(stop.clone()));
            invoice::sample_traffic::run(producer, &cfg.topics.payment, db, &merchant, rate, count, stop)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics { action: TopicsAction::Asyncapi } => {
            out(serde_json::to_string_pretty(&topics::asyncapi(&topics::specs(&cfg.topics)?))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics { action: TopicsAction::Apply } => {
            let report = topics::apply(&cfg.kafka, &topics::specs(&cfg.topics)?).await?;
            out(format_args!("{report}"));
            Ok(if report.has_differences() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Offsets { action: OffsetsAction::Show { json } } => {
            let db = app::database(&cfg, "invoice-offsets").await?;
            let topics = [cfg.topics.payment.clone(), cfg.topics.merchant_cdc.clone()];
            let positions =
                invoice::stream::offsets::show(&db, &cfg.kafka, &cfg.kafka_group_id, &topics).await?;
            if json {
                for p in &positions {
                    out(serde_json::to_string(p)?);
                }
            } else {
                out(format_args!("group {}", cfg.kafka_group_id));
                out(format_args!(
                    "{:<32} {:>9} {:>14} {:>15} {:>10} {:>14} {:>10}",
                    "TOPIC",
                    "PARTITION",
                    "STORED-OFFSET",
                    "KAFKA-COMMITTED",
                    "LOG-START",
                    "HIGH-WATERMARK",
                    "LAG"
                ));
                let dash = || "-".to_owned();
                for p in &positions {
                    out(format_args!(
                        "{:<32} {:>9} {:>14} {:>15} {:>10} {:>14} {:>10}",
                        p.topic,
                        p.partition,
                        p.stored.map_or_else(dash, |o| o.to_string()),
                        p.kafka_committed.map_or_else(dash, |o| o.to_string()),
                        p.log_start,
                        p.high_watermark,
                        p.lag
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Offsets {
            action:
                OffsetsAction::Reset {
                    topic,
                    partition,
                    to_earliest,
                    to_latest,
                    to_datetime,
                    to_offset,
                    execute,
                    force,
                },
        } => {
            use invoice::stream::offsets::{self, Target};
            if topic != cfg.topics.payment && topic != cfg.topics.merchant_cdc {
                eprintln!(
                    "invoice: --topic must be a consumed topic: {} or {}",
                    cfg.topics.payment, cfg.topics.merchant_cdc
                );
                return Ok(ExitCode::from(2));
            }
            let target = match (to_earliest, to_latest, to_datetime, to_offset) {
                (true, ..) => Target::Earliest,
                (_, true, ..) => Target::Latest,
                (_, _, Some(at), _) => match chrono::DateTime::parse_from_rfc3339(&at) {
                    Ok(at) => Target::Datetime(at.timestamp_millis()),
                    Err(_) => {
                        eprintln!("invoice: --to-datetime `{at}` is not an RFC 3339 time (e.g. 2026-11-28T00:00:00+07:00)");
                        return Ok(ExitCode::from(2));
                    }
                },
                (_, _, _, Some(n)) => Target::Offset(n),
                _ => {
                    eprintln!("invoice: give one of --to-earliest, --to-latest, --to-datetime, --to-offset");
                    return Ok(ExitCode::from(2));
                }
            };
            let db = app::database(&cfg, "invoice-offsets").await?;
            let moves =
                offsets::plan(&db, &cfg.kafka, &cfg.kafka_group_id, &topic, partition, target).await?;
            for m in &moves {
                out(format_args!(
                    "{} partition {}: {} -> {}",
                    m.topic,
                    m.partition,
                    m.from.map_or_else(|| "-".to_owned(), |o| o.to_string()),
                    m.to
                ));
            }
            if !execute {
                out("dry run: nothing changed (add --execute to apply)");
                return Ok(ExitCode::SUCCESS);
            }
            let members = offsets::group_members(&cfg.kafka, &cfg.kafka_group_id).await?;
            if members > 0 && !force {
                eprintln!(
                    "invoice: group {} has {members} running consumer(s); stop the stream first, or add --force",
                    cfg.kafka_group_id
                );
                return Ok(ExitCode::from(6));
            }
            let actor = format!("cli@{}", app::hostname());
            offsets::apply(&db, &cfg.kafka, &cfg.kafka_group_id, &moves, &actor, members > 0).await?;
            out(format_args!("moved {} partition(s)", moves.len()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Deadletters { limit, json } => {
            let (brokers, topic) = (cfg.kafka.clone(), cfg.topics.deadletter.clone());
            let letters = tokio::task::spawn_blocking(move || {
                invoice::stream::deadletter::recent(&brokers, &topic, limit)
            })
            .await??;
            if json {
                for letter in &letters {
                    out(serde_json::to_string(letter)?);
                }
            } else {
                for d in &letters {
                    let at = d
                        .timestamp_ms
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
                    out(format_args!(
                        "{at} {}/{} key={} from {}/{}@{}: {}",
                        d.partition,
                        d.offset,
                        d.key.as_deref().unwrap_or("-"),
                        d.source_topic.as_deref().unwrap_or("?"),
                        d.source_partition.as_deref().unwrap_or("?"),
                        d.source_offset.as_deref().unwrap_or("?"),
                        d.error.as_deref().unwrap_or("(no x-error header)"),
                    ));
                }
                out(format_args!("{} dead letter(s) shown from {}", letters.len(), cfg.topics.deadletter));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::TaxDrift { merchant, json } => {
            use invoice::stream::tax_drift::{self, Drift};
            let db = app::database(&cfg, "invoice-tax-drift").await?;
            let (findings, read) =
                tax_drift::check(&db, &cfg.kafka, &cfg.topics.merchant_cdc, merchant.as_deref()).await?;
            let drifted: Vec<_> = findings.iter().filter(|f| f.drift != Drift::InSync).collect();
            if json {
                for f in &findings {
                    out(serde_json::to_string(f)?);
                }
            } else {
                for f in &drifted {
                    out(format_args!(
                        "{}: {}\n  topic:  {}\n  stored: {}",
                        f.merchant_id,
                        serde_json::to_string(&f.drift)?.trim_matches('"'),
                        f.topic_tax.as_ref().map_or_else(|| "-".to_owned(), |t| t.to_string()),
                        f.stored_tax.as_ref().map_or_else(|| "-".to_owned(), |t| t.to_string()),
                    ));
                }
                out(format_args!(
                    "{} merchant(s) compared ({} CDC records read from {}): {} in sync, {} drifted",
                    findings.len(),
                    read,
                    cfg.topics.merchant_cdc,
                    findings.len() - drifted.len(),
                    drifted.len()
                ));
            }
            Ok(if drifted.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::RewrapCredentials { batch } => {
            let db = app::database(&cfg, "invoice-rewrap").await?;
            let keyring = app::keyring(&cfg);
            let done = storage::provider_configs::rewrap(&db, &keyring, batch).await?;
            out(format_args!(
                "re-sealed under key {}: {} provider configuration(s), {} invoice snapshot(s); {} could not be opened",
                keyring.current_key_id(),
                done.configs,
                done.invoices,
                done.unopenable
            ));
            // Unopenable rows mean a key is missing: the old key must not be dropped yet.
            Ok(if done.unopenable == 0 { ExitCode::SUCCESS } else { ExitCode::from(5) })
        }
        Command::Keygen | Command::PartitionOf { .. } | Command::ProviderSim(_) => Ok(ExitCode::SUCCESS),
    }
}

/// `replay` and `dlq requeue`: FAILED → QUEUED in Postgres (audited), then a job in Redis.
/// Exit codes: 0 done (or nothing to do for an issued invoice), 3 unknown order, 4 (`dlq
/// requeue` only) the order has no FAILED invoice.
async fn replay(cfg: &Config, order_id: &str, reason: &str, failed_only: bool) -> anyhow::Result<ExitCode> {
    let db = app::database(cfg, "invoice-replay").await?;
    let queue = app::queue(cfg)?;
    let actor = format!("cli@{}", app::hostname());
    let source = if failed_only { "dlq_requeue" } else { "replay" };
    // Refuse before touching anything: `dlq requeue` of an order without a FAILED invoice.
    if failed_only {
        let failed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM invoice WHERE order_id = $1 AND status = 'FAILED' AND deleted_at IS NULL)",
        )
        .bind(order_id)
        .fetch_one(&db)
        .await?;
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM invoice WHERE order_id = $1)")
            .bind(order_id)
            .fetch_one(&db)
            .await?;
        if known && !failed {
            eprintln!("invoice: order {order_id} has no FAILED invoice");
            return Ok(ExitCode::from(4));
        }
    }
    let report = invoice::issuance::replay_order(&db, &queue, order_id, None, &actor, reason, source).await?;
    if report.invoices.is_empty() {
        eprintln!("invoice: no invoice for order {order_id}");
        return Ok(ExitCode::from(3));
    }
    for i in &report.invoices {
        out(format_args!("invoice {} ({}): {} -> {}", i.invoice_id, i.merchant_id, i.before, i.after));
    }
    match &report.job {
        Some(state) => out(format_args!(
            "[enqueueIssuance] order {order_id}: job {state}, partition: {}",
            queue.partition_of(order_id)
        )),
        None if report.enqueue_failed => out(format_args!(
            "order {order_id}: queued in Postgres; Redis did not answer, so the sweeper will enqueue the job"
        )),
        None => out(format_args!("nothing to issue for order {order_id}")),
    }
    Ok(ExitCode::SUCCESS)
}
