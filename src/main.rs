//! The `invoice` binary: parse the command line, load the configuration (exit 2 naming the
//! variable when it is wrong), install logging, run.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use invoice::cli::{Cli, Command, TopicsAction};
use invoice::config::{self, Config, Mode};
use invoice::{app, crypto, ids, storage, telemetry, topics};
use tokio_util::sync::CancellationToken;

fn out(line: impl std::fmt::Display) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not an error worth reporting.
    let _ignored = writeln!(stdout, "{line}");
}

fn main() -> ExitCode {
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
        _ => {}
    }
    let mode = match cli.command {
        Command::Api => Mode::Api,
        Command::Stream => Mode::Stream,
        _ => Mode::Tool,
    };
    let cfg = match config::load_dotenv().and_then(|()| Config::from_env(mode)) {
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
            let listener = app::bind(&cfg).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            app::run_api(cfg, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stream => {
            let listener = app::bind(&cfg).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            app::run_stream(cfg, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics { action: TopicsAction::Apply } => {
            let report = topics::apply(&cfg.kafka_brokers, &topics::specs(&cfg.topics)?).await?;
            out(format_args!("{report}"));
            Ok(if report.has_differences() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Keygen | Command::PartitionOf { .. } => Ok(ExitCode::SUCCESS),
    }
}
