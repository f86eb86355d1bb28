//! Logging: `tracing` with structured fields, as `key=value` text (default) or one JSON
//! object per line (SPEC §6 `APP_ENV_INVOICE_LOG_FORMAT`). The filter comes from `RUST_LOG`
//! (default `info`).

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber writing to stderr. Called once, from `main`.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal as _;
    install(format, std::io::stderr, std::io::stderr().is_terminal());
}

/// Installs the global subscriber with the given writer (tests capture logs this way), without
/// colours. A second call is ignored, so tests may call it freely.
pub fn init_with_writer<W>(format: LogFormat, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    install(format, writer, false);
}

/// Colours only on a terminal: in a file or a pipe (a log shipper, `make run`'s log) escape
/// codes around field names would break `key=value` searches such as `orderId=ORD-1`.
fn install<W>(format: LogFormat, writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    // `try_init` fails only when a subscriber is already installed, which is fine.
    let _already_installed = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}
