//! Configuration (SPEC §6): environment variables read once at start-up into a typed,
//! validated [`Config`]. Nothing else in the crate reads the environment.
//!
//! Each mode requires only what it uses: the HTTP secrets are required for `api` (and
//! `all`), not for `stream`. A missing or malformed required value is a [`ConfigError`]
//! naming the variable; `main` prints it and exits with code 2.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;
use zeroize::Zeroize;

use crate::domain::rules::ConsumerWording;

/// The prefix of every variable of ours (the webhook secrets excepted, as SPEC §6 names them).
pub const PREFIX: &str = "APP_ENV_INVOICE_";

/// What the process will run; decides which variables are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The HTTP API.
    Api,
    /// The Kafka stream processor.
    Stream,
    /// The issuance workers.
    Worker,
    /// API, stream and workers in one process.
    All,
    /// A one-shot command (migrate, topics, inspect…): needs the connections, not the HTTP
    /// secrets.
    Tool,
}

impl Mode {
    fn serves_http(self) -> bool {
        matches!(self, Mode::Api | Mode::All)
    }
}

/// A value that must never be printed: `Debug` and `Display` show `***`; its memory is
/// wiped when it is dropped (keys, webhook secrets, URLs with passwords, decrypted
/// credentials do not linger in freed heap or stack).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// The secret itself, for the one place that needs it (signing, decrypting).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T: Zeroize> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration problem, naming the variable so the operator can fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("configuration: {var}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: String,
    /// What is wrong with it (never its value when the value is a secret).
    pub reason: String,
}

impl ConfigError {
    fn new(var: &str, reason: impl Into<String>) -> Self {
        ConfigError { var: var.to_owned(), reason: reason.into() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` text lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Topic names (SPEC §2), each overridable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// `payment.succeeded.v1`
    pub payment: String,
    /// `merchant.cdc.v1`
    pub merchant_cdc: String,
    /// `invoice.events.v1`
    pub events: String,
    /// `invoice.deadletter.v1`
    pub deadletter: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            payment: "payment.succeeded.v1".into(),
            merchant_cdc: "merchant.cdc.v1".into(),
            events: "invoice.events.v1".into(),
            deadletter: "invoice.deadletter.v1".into(),
        }
    }
}

impl Topics {
    /// The four topics under names starting with `prefix` (private topics for tests and
    /// benchmarks).
    pub fn prefixed(prefix: &str) -> Topics {
        Topics {
            payment: format!("{prefix}-payment"),
            merchant_cdc: format!("{prefix}-cdc"),
            events: format!("{prefix}-events"),
            deadletter: format!("{prefix}-dlt"),
        }
    }
}

/// Secrets and JWT settings of the HTTP API; present only in modes that serve it.
#[derive(Debug, Clone)]
pub struct HttpAuth {
    /// `WEBHOOK_SECRET`
    pub webhook_secret: Secret<String>,
    /// `WEBHOOK_SECRET_PREVIOUS`, accepted during a rotation.
    pub webhook_secret_previous: Option<Secret<String>>,
    /// `WEBHOOK_INTERNAL_SECRET`
    pub webhook_internal_secret: Secret<String>,
    /// `WEBHOOK_INTERNAL_SECRET_PREVIOUS`
    pub webhook_internal_secret_previous: Option<Secret<String>>,
    /// Where the ES256 verification keys are published.
    pub jwks_url: String,
    /// Expected `iss`.
    pub jwt_issuer: String,
    /// Expected `aud`.
    pub jwt_audience: String,
    /// `APP_ENV_INVOICE_TRUSTED_PROXIES`: comma-separated proxy addresses or CIDR ranges
    /// (ingress pods change address; their network does not) whose `X-Forwarded-For` is
    /// believed (none by default: the peer address is the client).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `APP_ENV_INVOICE_JWKS_REFETCH_COOLDOWN_MS` (30 s, SPEC §5): least time between two
    /// JWKS fetches caused by unknown `kid`s.
    pub jwks_refetch_cooldown: Duration,
    /// `APP_ENV_INVOICE_CLAIM_FAILURE_LIMIT` (20): failed claim lookups per client per
    /// 10 minutes before 429.
    pub claim_failure_limit: u32,
    /// Webhook secret variables whose value is shorter than the 24 random bytes the Standard
    /// Webhooks scheme asks for: accepted (SPEC §5 takes any value), warned about at start.
    pub weak_webhook_secrets: Vec<String>,
    /// Internal webhook secret variables whose key is also a merchant secret's: accepted
    /// (SPEC §6 asks only that both are set), warned about at start.
    pub internal_secrets_shared: Vec<String>,
}

/// How the service reaches Kafka: the brokers and, when the cluster asks for them, TLS and
/// SASL. Every Kafka client of the service (consumer, producers, admin, the CLI's) is made
/// from [`Kafka::client_config`].
#[derive(Debug, Clone)]
pub struct Kafka {
    /// `APP_ENV_INVOICE_KAFKA_BROKERS`: bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// `APP_ENV_INVOICE_KAFKA_SECURITY_PROTOCOL`: `plaintext` (default), `ssl`,
    /// `sasl_plaintext` or `sasl_ssl`.
    security_protocol: &'static str,
    /// With the `sasl_*` protocols: `APP_ENV_INVOICE_KAFKA_SASL_MECHANISM` (`PLAIN`,
    /// `SCRAM-SHA-256`, `SCRAM-SHA-512`), `_SASL_USERNAME`, `_SASL_PASSWORD`.
    sasl: Option<(&'static str, String, Secret<String>)>,
    /// With `ssl` and `sasl_ssl`: `APP_ENV_INVOICE_KAFKA_SSL_CA_LOCATION`, a PEM file of the
    /// certificate authorities to trust (else the system's).
    ssl_ca_location: Option<String>,
}

impl Kafka {
    /// Brokers reached in plain text without authentication (local stacks, tests).
    pub fn plaintext(brokers: impl Into<String>) -> Kafka {
        Kafka { brokers: brokers.into(), security_protocol: "plaintext", sasl: None, ssl_ca_location: None }
    }

    /// A librdkafka configuration for these brokers with the security settings. The password
    /// goes into it and nowhere else: never log the result.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("security.protocol", self.security_protocol);
        if let Some((mechanism, username, password)) = &self.sasl {
            config
                .set("sasl.mechanism", *mechanism)
                .set("sasl.username", username)
                .set("sasl.password", password.expose());
        }
        if let Some(ca) = &self.ssl_ca_location {
            config.set("ssl.ca.location", ca);
        }
        config
    }

    /// Whether a SASL password would cross the network unencrypted (`sasl_plaintext` with
    /// `PLAIN`): worth a warning at start.
    pub fn password_in_clear(&self) -> bool {
        self.security_protocol == "sasl_plaintext" && self.sasl.as_ref().is_some_and(|(m, ..)| *m == "PLAIN")
    }

    fn from_source(get: impl Fn(&str) -> Option<String>, brokers: String) -> Result<Kafka, ConfigError> {
        let var = |suffix: &str| format!("{PREFIX}{suffix}");
        let protocol_var = var("KAFKA_SECURITY_PROTOCOL");
        let security_protocol = match get(&protocol_var).map(|p| p.to_ascii_lowercase()).as_deref() {
            None | Some("plaintext") => "plaintext",
            Some("ssl") => "ssl",
            Some("sasl_plaintext") => "sasl_plaintext",
            Some("sasl_ssl") => "sasl_ssl",
            Some(_) => {
                return Err(ConfigError::new(&protocol_var, "use plaintext, ssl, sasl_plaintext or sasl_ssl"))
            }
        };
        let sasl_vars = ["KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"].map(var);
        let sasl = if security_protocol.starts_with("sasl_") {
            let [mechanism_var, username_var, password_var] = &sasl_vars;
            let mechanism = match get(mechanism_var).map(|m| m.to_ascii_uppercase()).as_deref() {
                Some("PLAIN") => "PLAIN",
                Some("SCRAM-SHA-256") => "SCRAM-SHA-256",
                Some("SCRAM-SHA-512") => "SCRAM-SHA-512",
                Some(_) => {
                    return Err(ConfigError::new(
                        mechanism_var,
                        "use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (GSSAPI and OAUTHBEARER are not built in)",
                    ))
                }
                None => {
                    return Err(ConfigError::new(mechanism_var, format!("required with {security_protocol}")))
                }
            };
            let required = |name: &str| {
                get(name)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| ConfigError::new(name, format!("required with {security_protocol}")))
            };
            Some((mechanism, required(username_var)?, Secret::new(required(password_var)?)))
        } else {
            // Credentials set for a protocol that does not use them would be silently ignored.
            if let Some(set) = sasl_vars.iter().find(|name| get(name).is_some()) {
                return Err(ConfigError::new(set, "only used with sasl_plaintext or sasl_ssl"));
            }
            None
        };
        let ca_var = var("KAFKA_SSL_CA_LOCATION");
        let ssl_ca_location = get(&ca_var);
        if let Some(path) = &ssl_ca_location {
            if !security_protocol.ends_with("ssl") {
                return Err(ConfigError::new(&ca_var, "only used with ssl or sasl_ssl"));
            }
            if !std::path::Path::new(path).is_file() {
                return Err(ConfigError::new(&ca_var, "no such file"));
            }
        }
        Ok(Kafka { brokers, security_protocol, sasl, ssl_ca_location })
    }
}

/// The whole configuration of one process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Postgres connection string (may hold a password: masked).
    pub database_url: Secret<String>,
    /// Redis connection string (may hold a password: masked).
    pub redis_url: Secret<String>,
    /// Kafka: brokers, TLS and SASL.
    pub kafka: Kafka,
    /// The service code, used in the default group id and in audit actors.
    pub service_code: String,
    /// Kafka consumer group.
    pub kafka_group_id: String,
    /// Snowflake worker id, 0–1023; unique per process (held with an advisory lock). With
    /// [`Config::worker_id_auto`] it is 0 until start-up leases a free one and sets it.
    pub worker_id: u16,
    /// `APP_ENV_INVOICE_WORKER_ID=auto`: lease the lowest free id at start-up (replicas of a
    /// Deployment need no ordinal; the lease keeps ids unique across processes).
    pub worker_id_auto: bool,
    /// 32-byte AES-256-GCM key for provider credentials.
    pub credentials_key: Secret<[u8; 32]>,
    /// `APP_ENV_INVOICE_CREDENTIALS_KEY_PREVIOUS`: the key being rotated out; it only opens
    /// what it sealed until `invoice rewrap-credentials` has re-sealed everything.
    pub credentials_key_previous: Option<Secret<[u8; 32]>>,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// Whether `http_addr` is the default (the variable unset).
    pub http_addr_is_default: bool,
    /// Number of issuance queue partitions (SPEC §4).
    pub queue_partitions: u32,
    /// Topic names.
    pub topics: Topics,
    /// Log format.
    pub log_format: LogFormat,
    /// HTTP API auth settings; `Some` exactly when the mode serves HTTP.
    pub http_auth: Option<HttpAuth>,
    /// Largest Postgres pool per process.
    pub database_max_connections: u32,
    /// How long `/ready` waits for each dependency.
    pub ready_timeout: Duration,
    /// Most messages per stream batch (one transaction).
    pub stream_batch_max: usize,
    /// How long a stream batch waits for more messages after its first.
    pub stream_batch_linger: Duration,
    /// A partition with lag and no progress for this long is recovered.
    pub stream_stall_after: Duration,
    /// `APP_ENV_INVOICE_DB_WORK_TIMEOUT_MS` (60 s): the longest a stream batch's transaction
    /// or a worker's statement may wait for Postgres before it is abandoned (its connection
    /// closed) and retried. sqlx has no client-side keepalive: after a failover that left
    /// the old server's sockets open, a statement would otherwise wait for ever.
    pub db_work_timeout: Duration,
    /// Kafka consumer `session.timeout.ms`.
    pub kafka_session_timeout: Duration,
    /// Issuance queue, workers and provider client.
    pub issuance: Issuance,
}

/// Settings of the issuance queue, the workers and the provider client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuance {
    /// The longest a worker's or sweeper's unit of work may wait for Postgres
    /// (`DB_WORK_TIMEOUT_MS`, 60 s; see [`Config::db_work_timeout`]).
    pub db_work_timeout: Duration,
    /// Prefix of every Redis key of the queue (`iq`); lets environments share one Redis.
    pub queue_prefix: String,
    /// Jobs one worker process runs at once (`WORKER_CONCURRENCY`).
    pub concurrency: usize,
    /// Most jobs claimed and written together (`WORKER_BATCH_MAX`).
    pub batch_max: usize,
    /// Attempts before an invoice fails (`QUEUE_ATTEMPTS`, SPEC §4: 8).
    pub max_attempts: u32,
    /// First retry delay ceiling (`QUEUE_BACKOFF_BASE_MS`, 2 s).
    pub backoff_base: Duration,
    /// Largest retry delay (`QUEUE_BACKOFF_CAP_MS`, 10 min).
    pub backoff_cap: Duration,
    /// Lease of a running job, renewed while it runs (`QUEUE_LEASE_MS`, 30 s).
    pub lease: Duration,
    /// How often each worker re-enqueues due invoices from Postgres and expires claims
    /// (`SWEEP_INTERVAL_MS`, 30 s).
    pub sweep_interval: Duration,
    /// Whole-request timeout of provider calls (`PROVIDER_TIMEOUT_MS`, 90 s).
    pub provider_timeout: Duration,
    /// Wait after an ambiguous outcome before looking up (`PROVIDER_SAFE_WAIT_MS`, 90 s).
    pub provider_safe_wait: Duration,
    /// Interval of number lookups for SUBMITTED invoices (`PROVIDER_LOOKUP_INTERVAL_MS`, 30 s).
    pub lookup_interval: Duration,
    /// Concurrent provider calls per (merchant, series) (`PROVIDER_SERIES_CONCURRENCY`, 4).
    pub series_concurrency: usize,
    /// Longest wait of a call for its series' slot (`PROVIDER_SERIES_WAIT_MS`, 30 s); past it
    /// nothing is sent and the invoice waits as long again, uncounted (and the worker leaves
    /// the series' jobs untaken as long if none of its calls got a slot meanwhile).
    pub series_wait: Duration,
    /// First legal day a consumer buyer is printed as "Bán cho người tiêu dùng"
    /// (`CONSUMER_WORDING_FROM`, 2026-07-01; `never`).
    pub consumer_wording: ConsumerWording,
    /// Whether provider endpoints may be on loopback or private networks
    /// (`PROVIDER_ALLOW_PRIVATE_NETWORKS`, false): development, the simulator, or a
    /// provider gateway inside the network. See `providers::egress`.
    pub allow_private_networks: bool,
}

impl Default for Issuance {
    fn default() -> Self {
        Issuance {
            db_work_timeout: Duration::from_secs(60),
            queue_prefix: "iq".into(),
            concurrency: 64,
            batch_max: 32,
            max_attempts: 8,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(600),
            lease: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(30),
            provider_timeout: Duration::from_secs(90),
            provider_safe_wait: Duration::from_secs(90),
            lookup_interval: Duration::from_secs(30),
            series_concurrency: 4,
            series_wait: Duration::from_secs(30),
            consumer_wording: ConsumerWording::default(),
            allow_private_networks: false,
        }
    }
}

/// Where variables come from: the process environment in production, a map in tests.
pub trait Source {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment (after `.env` was merged into it).
pub struct Environment;

impl Source for Environment {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// Reads `.env` from the working directory if it exists; variables already set win.
pub fn load_dotenv() -> Result<(), ConfigError> {
    // Only the working directory's file: `dotenvy::dotenv` would also walk up the parents.
    match dotenvy::from_path(".env") {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        // dotenvy's message quotes the text it failed on: a whole `NAME=secret` line, a value
        // alone, or a line without `=` (a key wrapped onto the next line).
        Err(dotenvy::Error::LineParse(fragment, _)) => {
            let text = std::fs::read_to_string(".env").ok();
            Err(ConfigError::new(".env", malformed_line(text.as_deref(), &fragment)))
        }
        Err(e) => Err(ConfigError::new(".env", e.to_string())),
    }
}

/// Names the malformed `.env` line by number, and by variable when the file's line assigns
/// one, never by its text: whatever dotenvy quoted may be a secret or part of one.
fn malformed_line(text: Option<&str>, fragment: &str) -> String {
    let first = fragment.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
    let found = text
        .filter(|_| !first.is_empty())
        .and_then(|text| text.lines().enumerate().find(|(_, line)| line.contains(first)));
    match found {
        Some((i, line)) => match assigned_name(line) {
            Some(name) => format!(
                "line {} ({name}) cannot be parsed (its value is not shown: it may be a secret)",
                i + 1
            ),
            None => format!("line {} cannot be parsed (its text is not shown: it may hold a secret)", i + 1),
        },
        None => "a line cannot be parsed (its text is not shown: it may hold a secret)".to_owned(),
    }
}

/// The variable a `.env` line assigns (`[export] NAME=...`), if it has that shape.
fn assigned_name(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    let rest = rest.strip_prefix("export ").map(str::trim_start).unwrap_or(rest);
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(rest.len());
    let (name, after) = rest.split_at(end);
    let starts_well = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    (starts_well && after.trim_start().starts_with('=')).then_some(name)
}

impl Config {
    /// Reads and validates the configuration for `mode` from the process environment.
    pub fn from_env(mode: Mode) -> Result<Config, ConfigError> {
        Config::from_source(&Environment, mode)
    }

    /// Reads and validates the configuration for `mode` from `source`.
    pub fn from_source(source: &dyn Source, mode: Mode) -> Result<Config, ConfigError> {
        let var = |suffix: &str| format!("{PREFIX}{suffix}");
        // An empty value counts as unset: a deployment template that renders `FOO=` must not
        // silently configure an empty secret.
        let get = |name: &str| source.get(name).filter(|v| !v.trim().is_empty());

        let database_url =
            get(&var("DATABASE_URL")).unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/invoice".into());
        check_url(&var("DATABASE_URL"), &database_url, &["postgres", "postgresql"])?;
        let redis_url = get(&var("REDIS_URL")).unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
        check_url(&var("REDIS_URL"), &redis_url, &["redis", "rediss"])?;
        let kafka_brokers = get(&var("KAFKA_BROKERS")).unwrap_or_else(|| "127.0.0.1:9092".into());
        for broker in kafka_brokers.split(',') {
            let ok = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.trim().is_empty() && port.trim().parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::new(
                    &var("KAFKA_BROKERS"),
                    format!("`{broker}` is not host:port (comma-separated list expected)"),
                ));
            }
        }
        let kafka = Kafka::from_source(get, kafka_brokers)?;
        let service_code = get(&var("SERVICE_CODE")).unwrap_or_else(|| "SVC-00150-INVOICE".into());
        let kafka_group_id =
            get(&var("KAFKA_GROUP_ID")).unwrap_or_else(|| format!("{service_code}_CONSUMER"));

        let worker_id_var = var("WORKER_ID");
        let worker_id = get(&worker_id_var)
            .ok_or_else(|| ConfigError::new(&worker_id_var, "required (an integer 0–1023, or `auto`)"))?;
        let worker_id_auto = worker_id.trim() == "auto";
        let worker_id = if worker_id_auto {
            0
        } else {
            worker_id.trim().parse::<u16>().ok().filter(|id| *id <= crate::ids::MAX_WORKER_ID).ok_or_else(
                || {
                    ConfigError::new(
                        &worker_id_var,
                        format!("`{worker_id}` is not an integer 0–1023 or `auto`"),
                    )
                },
            )?
        };

        let key_var = var("CREDENTIALS_KEY");
        let key_hex = get(&key_var).ok_or_else(|| {
            ConfigError::new(&key_var, "required (64 hex characters; `invoice keygen` makes one)")
        })?;
        let credentials_key = parse_key(&key_hex)
            .ok_or_else(|| ConfigError::new(&key_var, "must be exactly 64 hex characters (32 bytes)"))?;
        let previous_key_var = var("CREDENTIALS_KEY_PREVIOUS");
        let credentials_key_previous = get(&previous_key_var)
            .map(|hex| {
                parse_key(&hex).map(Secret::new).ok_or_else(|| {
                    ConfigError::new(&previous_key_var, "must be exactly 64 hex characters (32 bytes)")
                })
            })
            .transpose()?;

        let http_addr_var = var("HTTP_ADDR");
        let http_addr_is_default = get(&http_addr_var).is_none();
        let http_addr = get(&http_addr_var).unwrap_or_else(|| "127.0.0.1:31140".into());
        let http_addr = resolve_listen_addr(http_addr.trim()).ok_or_else(|| {
            ConfigError::new(&http_addr_var, format!("`{http_addr}` is not a host:port address"))
        })?;

        let partitions_var = var("QUEUE_PARTITIONS");
        let queue_partitions = match get(&partitions_var) {
            None => 3,
            Some(v) => v.trim().parse::<u32>().ok().filter(|p| (1..=1024).contains(p)).ok_or_else(|| {
                ConfigError::new(&partitions_var, format!("`{v}` is not an integer 1–1024"))
            })?,
        };

        let defaults = Topics::default();
        let topic = |suffix: &str, default: String| -> Result<String, ConfigError> {
            let name = var(&format!("TOPIC_{suffix}"));
            match get(&name) {
                None => Ok(default),
                Some(t) if valid_topic_name(&t) => Ok(t),
                Some(t) => Err(ConfigError::new(
                    &name,
                    format!("`{t}` is not a valid Kafka topic name ([a-zA-Z0-9._-], 1–249 characters)"),
                )),
            }
        };
        let topics = Topics {
            payment: topic("PAYMENT", defaults.payment)?,
            merchant_cdc: topic("MERCHANT_CDC", defaults.merchant_cdc)?,
            events: topic("EVENTS", defaults.events)?,
            deadletter: topic("DEADLETTER", defaults.deadletter)?,
        };

        let log_var = var("LOG_FORMAT");
        let log_format = match get(&log_var).as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(&log_var, format!("`{other}` is not `text` or `json`")))
            }
        };

        let pool_var = var("DATABASE_MAX_CONNECTIONS");
        let database_max_connections = match get(&pool_var) {
            None => 16,
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| ConfigError::new(&pool_var, format!("`{v}` is not an integer 1–1000")))?,
        };

        let number =
            |suffix: &str, default: u64, range: std::ops::RangeInclusive<u64>| -> Result<u64, ConfigError> {
                let name = var(suffix);
                match get(&name) {
                    None => Ok(default),
                    Some(v) => v.trim().parse::<u64>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                        ConfigError::new(
                            &name,
                            format!("`{v}` is not an integer {}–{}", range.start(), range.end()),
                        )
                    }),
                }
            };
        let stream_batch_max = number("STREAM_BATCH_MAX", 500, 1..=10_000)? as usize;
        let stream_batch_linger = Duration::from_millis(number("STREAM_BATCH_LINGER_MS", 5, 0..=10_000)?);
        let stream_stall_after = Duration::from_secs(number("STREAM_STALL_SECONDS", 30, 1..=3600)?);
        let kafka_session_timeout =
            Duration::from_millis(number("KAFKA_SESSION_TIMEOUT_MS", 10_000, 1_000..=300_000)?);

        let ms = |suffix: &str, default: u64, range: std::ops::RangeInclusive<u64>| {
            number(suffix, default, range).map(Duration::from_millis)
        };
        let prefix_var = var("QUEUE_PREFIX");
        let queue_prefix = get(&prefix_var).unwrap_or_else(|| "iq".into());
        if queue_prefix.len() > 64
            || !queue_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ConfigError::new(&prefix_var, "use 1–64 of [A-Za-z0-9-_.:]"));
        }
        let wording_var = var("CONSUMER_WORDING_FROM");
        let consumer_wording = match get(&wording_var).as_deref().map(str::trim) {
            None => ConsumerWording::default(),
            Some("never") => ConsumerWording { from: None },
            Some(day) => ConsumerWording {
                from: Some(
                    chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
                        .map_err(|_| ConfigError::new(&wording_var, "a date (YYYY-MM-DD) or `never`"))?,
                ),
            },
        };
        let db_work_timeout = ms("DB_WORK_TIMEOUT_MS", 60_000, 1_000..=600_000)?;
        let issuance = Issuance {
            db_work_timeout,
            queue_prefix,
            concurrency: number("WORKER_CONCURRENCY", 64, 1..=10_000)? as usize,
            batch_max: number("WORKER_BATCH_MAX", 32, 1..=1_000)? as usize,
            max_attempts: number("QUEUE_ATTEMPTS", 8, 1..=100)? as u32,
            backoff_base: ms("QUEUE_BACKOFF_BASE_MS", 2_000, 1..=3_600_000)?,
            backoff_cap: ms("QUEUE_BACKOFF_CAP_MS", 600_000, 1..=86_400_000)?,
            lease: ms("QUEUE_LEASE_MS", 30_000, 500..=3_600_000)?,
            sweep_interval: ms("SWEEP_INTERVAL_MS", 30_000, 100..=3_600_000)?,
            provider_timeout: ms("PROVIDER_TIMEOUT_MS", 90_000, 100..=600_000)?,
            provider_safe_wait: ms("PROVIDER_SAFE_WAIT_MS", 90_000, 0..=3_600_000)?,
            lookup_interval: ms("PROVIDER_LOOKUP_INTERVAL_MS", 30_000, 10..=3_600_000)?,
            series_concurrency: number("PROVIDER_SERIES_CONCURRENCY", 4, 1..=10_000)? as usize,
            series_wait: ms("PROVIDER_SERIES_WAIT_MS", 30_000, 100..=3_600_000)?,
            consumer_wording,
            allow_private_networks: {
                let name = var("PROVIDER_ALLOW_PRIVATE_NETWORKS");
                match get(&name).as_deref().map(str::trim) {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(_) => return Err(ConfigError::new(&name, "`true` or `false`")),
                }
            },
        };

        let mut http_auth = if mode.serves_http() {
            let required =
                |name: &str| get(name).ok_or_else(|| ConfigError::new(name, "required for the HTTP API"));
            let weak = std::cell::RefCell::new(Vec::new());
            let secret = |name: &str| -> Result<Secret<String>, ConfigError> {
                let value = required(name)?;
                if !check_webhook_secret(name, &value)? {
                    weak.borrow_mut().push(name.to_owned());
                }
                Ok(Secret::new(value))
            };
            let optional_secret = |name: &str| -> Result<Option<Secret<String>>, ConfigError> {
                get(name)
                    .map(|value| {
                        if !check_webhook_secret(name, &value)? {
                            weak.borrow_mut().push(name.to_owned());
                        }
                        Ok(Secret::new(value))
                    })
                    .transpose()
            };
            let jwks_url = required(&var("JWKS_URL"))?;
            check_url(&var("JWKS_URL"), &jwks_url, &["http", "https"])?;
            Some(HttpAuth {
                webhook_secret: secret("WEBHOOK_SECRET")?,
                webhook_secret_previous: optional_secret("WEBHOOK_SECRET_PREVIOUS")?,
                webhook_internal_secret: secret("WEBHOOK_INTERNAL_SECRET")?,
                webhook_internal_secret_previous: optional_secret("WEBHOOK_INTERNAL_SECRET_PREVIOUS")?,
                jwks_url,
                jwt_issuer: required(&var("JWT_ISSUER"))?,
                jwt_audience: required(&var("JWT_AUDIENCE"))?,
                trusted_proxies: {
                    let name = var("TRUSTED_PROXIES");
                    get(&name)
                        .unwrap_or_default()
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| {
                            s.parse::<ipnet::IpNet>()
                                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                                .map(|net| net.trunc())
                                .map_err(|_| {
                                    ConfigError::new(
                                        &name,
                                        format!("`{s}` is not an IP address or CIDR range"),
                                    )
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?
                },
                jwks_refetch_cooldown: ms("JWKS_REFETCH_COOLDOWN_MS", 30_000, 1_000..=3_600_000)?,
                claim_failure_limit: number("CLAIM_FAILURE_LIMIT", 20, 1..=1_000_000)? as u32,
                weak_webhook_secrets: weak.take(),
                internal_secrets_shared: Vec::new(),
            })
        } else {
            None
        };
        if let Some(auth) = &mut http_auth {
            auth.internal_secrets_shared = internal_secrets_shared_with_merchants(auth);
        }

        Ok(Config {
            database_url: Secret::new(database_url),
            redis_url: Secret::new(redis_url),
            kafka,
            service_code,
            kafka_group_id,
            worker_id,
            worker_id_auto,
            credentials_key: Secret::new(credentials_key),
            credentials_key_previous,
            http_addr,
            http_addr_is_default,
            queue_partitions,
            topics,
            log_format,
            http_auth,
            database_max_connections,
            ready_timeout: Duration::from_secs(2),
            stream_batch_max,
            stream_batch_linger,
            stream_stall_after,
            db_work_timeout,
            kafka_session_timeout,
            issuance,
        })
    }
}

/// `ip:port`, or `host:port` resolved once at start-up (`localhost:31140`).
fn resolve_listen_addr(value: &str) -> Option<SocketAddr> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Some(addr);
    }
    use std::net::ToSocketAddrs as _;
    value.to_socket_addrs().ok()?.next()
}

fn parse_key(hex_key: &str) -> Option<[u8; 32]> {
    if hex_key.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).ok()?;
    Some(key)
}

fn check_url(var: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    // Never echo the URL itself: it may carry a password.
    match value.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(()),
        _ => Err(ConfigError::new(var, format!("not a URL with scheme {}", schemes.join(" or ")))),
    }
}

/// Whether `url` is plain `http://` to a host other than the loopback: kept working for
/// in-cluster identity providers, but worth a warning, since anyone on the path can hand us
/// their own keys and so mint any token.
pub fn plain_http_off_loopback(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else { return false };
    if parsed.scheme() != "http" {
        return false;
    }
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// The internal webhook secret variables whose key equals a merchant one (current or
/// previous): a merchant holding that secret could also send internal operations (cancel
/// invoices). SPEC §6 requires only that both are set, so this is warned about, not refused.
fn internal_secrets_shared_with_merchants(auth: &HttpAuth) -> Vec<String> {
    use crate::auth::webhook::secret_bytes;
    let merchant = [Some(&auth.webhook_secret), auth.webhook_secret_previous.as_ref()];
    let internal = [Some(&auth.webhook_internal_secret), auth.webhook_internal_secret_previous.as_ref()];
    ["WEBHOOK_INTERNAL_SECRET", "WEBHOOK_INTERNAL_SECRET_PREVIOUS"]
        .iter()
        .zip(internal)
        .filter(|(_, i)| {
            i.is_some_and(|i| {
                merchant.iter().flatten().any(|m| secret_bytes(i.expose()) == secret_bytes(m.expose()))
            })
        })
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

/// Checks a webhook secret's form; `Ok(false)` when it is usable but shorter than the 24
/// random bytes the Standard Webhooks scheme recommends.
fn check_webhook_secret(var: &str, value: &str) -> Result<bool, ConfigError> {
    use base64::Engine as _;
    let len = match value.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| ConfigError::new(var, "has the `whsec_` prefix but is not base64 after it"))?
            .len(),
        None => value.len(),
    };
    Ok(len >= 24)
}

/// Kafka's own rule for topic names.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn minimal() -> HashMap<String, String> {
        HashMap::from([
            ("APP_ENV_INVOICE_WORKER_ID".to_owned(), "7".to_owned()),
            ("APP_ENV_INVOICE_CREDENTIALS_KEY".to_owned(), KEY.to_owned()),
        ])
    }

    fn with_api(mut env: HashMap<String, String>) -> HashMap<String, String> {
        for (k, v) in [
            ("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            ("WEBHOOK_INTERNAL_SECRET", "an-internal-secret-of-sufficient-length"),
            ("APP_ENV_INVOICE_JWKS_URL", "http://127.0.0.1:1/jwks.json"),
            ("APP_ENV_INVOICE_JWT_ISSUER", "https://auth.example.vn"),
            ("APP_ENV_INVOICE_JWT_AUDIENCE", "invoice"),
        ] {
            env.insert(k.to_owned(), v.to_owned());
        }
        env
    }

    fn err(env: &HashMap<String, String>, mode: Mode) -> ConfigError {
        match Config::from_source(env, mode) {
            Ok(_) => panic!("expected a configuration error"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let cfg = Config::from_source(&minimal(), Mode::Stream).unwrap();
        assert_eq!(cfg.database_url.expose(), "postgres://postgres@127.0.0.1:5432/invoice");
        assert_eq!(cfg.redis_url.expose(), "redis://127.0.0.1:6379/0");
        assert_eq!(cfg.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(cfg.service_code, "SVC-00150-INVOICE");
        assert_eq!(cfg.kafka_group_id, "SVC-00150-INVOICE_CONSUMER");
        assert_eq!(cfg.http_addr.to_string(), "127.0.0.1:31140");
        assert_eq!(cfg.queue_partitions, 3);
        assert_eq!(cfg.topics, Topics::default());
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.worker_id, 7);
        assert!(!cfg.worker_id_auto);
        assert_eq!(cfg.issuance.consumer_wording.from, chrono::NaiveDate::from_ymd_opt(2026, 7, 1));
        let mut auto = minimal();
        auto.insert("APP_ENV_INVOICE_WORKER_ID".into(), "auto".into());
        assert!(Config::from_source(&auto, Mode::Stream).unwrap().worker_id_auto);
        auto.insert("APP_ENV_INVOICE_WORKER_ID".into(), "1024".into());
        assert_eq!(err(&auto, Mode::Stream).var, "APP_ENV_INVOICE_WORKER_ID");
        assert!(cfg.http_auth.is_none());
    }

    #[test]
    fn group_id_follows_a_changed_service_code() {
        let mut env = minimal();
        env.insert("APP_ENV_INVOICE_SERVICE_CODE".into(), "SVC-1".into());
        let cfg = Config::from_source(&env, Mode::Tool).unwrap();
        assert_eq!(cfg.kafka_group_id, "SVC-1_CONSUMER");
    }

    #[test]
    fn each_required_variable_missing_is_named() {
        for var in ["APP_ENV_INVOICE_WORKER_ID", "APP_ENV_INVOICE_CREDENTIALS_KEY"] {
            let mut env = minimal();
            env.remove(var);
            assert_eq!(err(&env, Mode::Stream).var, var);
            // Empty is the same as missing.
            env.insert(var.into(), "  ".into());
            assert_eq!(err(&env, Mode::Stream).var, var);
        }
        for var in [
            "WEBHOOK_SECRET",
            "WEBHOOK_INTERNAL_SECRET",
            "APP_ENV_INVOICE_JWKS_URL",
            "APP_ENV_INVOICE_JWT_ISSUER",
            "APP_ENV_INVOICE_JWT_AUDIENCE",
        ] {
            let mut env = with_api(minimal());
            env.remove(var);
            let e = err(&env, Mode::Api);
            assert_eq!(e.var, var);
            assert!(e.reason.contains("required"), "{e}");
            assert_eq!(err(&env, Mode::All).var, var);
            // Modes without HTTP do not need it.
            assert!(Config::from_source(&env, Mode::Worker).is_ok());
        }
    }

    #[test]
    fn each_malformed_value_is_named() {
        let cases = [
            ("APP_ENV_INVOICE_WORKER_ID", "1024"),
            ("APP_ENV_INVOICE_WORKER_ID", "-1"),
            ("APP_ENV_INVOICE_WORKER_ID", "seven"),
            ("APP_ENV_INVOICE_CREDENTIALS_KEY", &KEY[..62]),
            (
                "APP_ENV_INVOICE_CREDENTIALS_KEY",
                "zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            ),
            ("APP_ENV_INVOICE_CREDENTIALS_KEY", &format!("{KEY}00")),
            ("APP_ENV_INVOICE_DATABASE_URL", "mysql://x"),
            ("APP_ENV_INVOICE_REDIS_URL", "127.0.0.1:6379"),
            ("APP_ENV_INVOICE_KAFKA_BROKERS", "127.0.0.1"),
            ("APP_ENV_INVOICE_KAFKA_BROKERS", "127.0.0.1:9092,:x"),
            ("APP_ENV_INVOICE_HTTP_ADDR", "localhost"),
            ("APP_ENV_INVOICE_QUEUE_PARTITIONS", "0"),
            ("APP_ENV_INVOICE_QUEUE_PARTITIONS", "three"),
            ("APP_ENV_INVOICE_TOPIC_PAYMENT", "bad topic"),
            ("APP_ENV_INVOICE_TOPIC_MERCHANT_CDC", "x/y"),
            ("APP_ENV_INVOICE_TOPIC_EVENTS", ".."),
            ("APP_ENV_INVOICE_TOPIC_DEADLETTER", "a*b"),
            ("APP_ENV_INVOICE_LOG_FORMAT", "xml"),
            ("APP_ENV_INVOICE_DATABASE_MAX_CONNECTIONS", "0"),
            ("APP_ENV_INVOICE_STREAM_BATCH_MAX", "0"),
            ("APP_ENV_INVOICE_STREAM_BATCH_LINGER_MS", "soon"),
            ("APP_ENV_INVOICE_STREAM_STALL_SECONDS", "0"),
            ("APP_ENV_INVOICE_KAFKA_SESSION_TIMEOUT_MS", "10"),
            ("APP_ENV_INVOICE_CONSUMER_WORDING_FROM", "2026-13-01"),
        ];
        for (var, value) in cases {
            let mut env = minimal();
            env.insert(var.into(), value.into());
            assert_eq!(err(&env, Mode::Stream).var, var, "{var}={value}");
        }
        let key_with_space = format!(" {KEY}");
        let api_cases = [
            ("WEBHOOK_SECRET", "whsec_!!!not-base64!!!"),
            ("WEBHOOK_INTERNAL_SECRET_PREVIOUS", "whsec_***"),
            ("APP_ENV_INVOICE_JWKS_URL", "ftp://x"),
            // No cooldown: every made-up `kid` would be a fetch from the IdP.
            ("APP_ENV_INVOICE_JWKS_REFETCH_COOLDOWN_MS", "0"),
            ("APP_ENV_INVOICE_TRUSTED_PROXIES", "10.0.0.1, 10.0.0.0/33"),
            ("APP_ENV_INVOICE_CREDENTIALS_KEY", key_with_space.as_str()),
        ];
        for (var, value) in api_cases {
            let mut env = with_api(minimal());
            env.insert(var.into(), value.into());
            assert_eq!(err(&env, Mode::Api).var, var, "{var}={value}");
        }
    }

    #[test]
    fn an_internal_webhook_secret_equal_to_a_merchant_one_is_named_for_a_warning() {
        let merchant = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        // The same key bytes, as `whsec_` base64 or raw.
        let raw = "a-merchant-secret-of-sufficient-length";
        let raw_as_whsec = {
            use base64::Engine as _;
            format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(raw))
        };
        for (var, merchant, value) in [
            ("WEBHOOK_INTERNAL_SECRET", merchant.to_owned(), merchant.to_owned()),
            ("WEBHOOK_INTERNAL_SECRET_PREVIOUS", raw_as_whsec.clone(), raw.to_owned()),
        ] {
            let mut env = with_api(minimal());
            env.insert("WEBHOOK_SECRET".into(), merchant.clone());
            env.insert(var.into(), value.clone());
            let auth = Config::from_source(&env, Mode::Api).unwrap().http_auth.unwrap();
            assert_eq!(auth.internal_secrets_shared, [var]);
        }
        let distinct = Config::from_source(&with_api(minimal()), Mode::Api).unwrap().http_auth.unwrap();
        assert!(distinct.internal_secrets_shared.is_empty());
    }

    #[test]
    fn a_malformed_env_line_is_named_without_its_secret_whatever_dotenvy_quotes() {
        let key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
        for (text, secret, expected) in [
            // An unclosed quote: dotenvy quotes the whole line.
            ("A=1\nWEBHOOK_SECRET=whsec_ab\"cd-very-secret\n", "very-secret", "line 2 (WEBHOOK_SECRET)"),
            // A bad escape: it quotes the value alone.
            ("WEBHOOK_SECRET=p4ss\\w0rd-very-secret\n", "very-secret", "line 1 (WEBHOOK_SECRET)"),
            // A space in an unquoted value.
            ("export DB=postgres://u:hunter2@h/db extra\n", "hunter2", "line 1 (DB)"),
            // A key wrapped onto the next line: it quotes the key.
            (&format!("A=1\nAPP_ENV_INVOICE_CREDENTIALS_KEY=\n{key}\n"), key, "line 3 cannot be parsed"),
        ] {
            let error = dotenvy::from_read_iter(text.as_bytes())
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{text:?} parsed"));
            let dotenvy::Error::LineParse(fragment, _) = error else { panic!("{error:?}") };
            let message = malformed_line(Some(text), &fragment);
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(!message.contains(secret) && !message.contains(&secret[..6]), "{text:?}: {message}");
        }
        assert_eq!(
            malformed_line(None, "x"),
            "a line cannot be parsed (its text is not shown: it may hold a secret)"
        );
    }

    #[test]
    fn a_dollar_in_a_dotenv_value_survives_only_in_single_quotes_as_the_readme_says() {
        let read = |line: &str| dotenvy::from_read_iter(line.as_bytes()).next().unwrap().map(|(_, v)| v);
        assert_eq!(read("SINGLE='p4$w0rd'\n").unwrap(), "p4$w0rd");
        assert_ne!(read("BARE=p4$w0rd\n").ok().as_deref(), Some("p4$w0rd"));
        assert_ne!(read("DOUBLE=\"p4$w0rd\"\n").ok().as_deref(), Some("p4$w0rd"));
    }

    #[test]
    fn kafka_security_settings_are_checked_and_reach_every_client() {
        let kafka = |pairs: &[(&str, &str)]| {
            let mut env = minimal();
            for (k, v) in pairs {
                env.insert(format!("APP_ENV_INVOICE_{k}"), (*v).to_owned());
            }
            Config::from_source(&env, Mode::Stream).map(|c| c.kafka)
        };
        let plain = kafka(&[]).unwrap();
        assert_eq!(plain.client_config().get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.client_config().get("sasl.password"), None);

        let sasl = kafka(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "invoice"),
            ("KAFKA_SASL_PASSWORD", "kafka-s3cret"),
        ])
        .unwrap();
        let config = sasl.client_config();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(
            (config.get("sasl.username"), config.get("sasl.password")),
            (Some("invoice"), Some("kafka-s3cret"))
        );
        assert!(!format!("{sasl:?}").contains("kafka-s3cret"));
        assert!(!sasl.password_in_clear());
        let clear = kafka(&[
            ("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
            ("KAFKA_SASL_MECHANISM", "PLAIN"),
            ("KAFKA_SASL_USERNAME", "invoice"),
            ("KAFKA_SASL_PASSWORD", "kafka-s3cret"),
        ])
        .unwrap();
        assert!(clear.password_in_clear());

        for (pairs, var) in [
            (&[("KAFKA_SECURITY_PROTOCOL", "tls")][..], "APP_ENV_INVOICE_KAFKA_SECURITY_PROTOCOL"),
            (&[("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")][..], "APP_ENV_INVOICE_KAFKA_SASL_MECHANISM"),
            (
                &[("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"), ("KAFKA_SASL_MECHANISM", "GSSAPI")][..],
                "APP_ENV_INVOICE_KAFKA_SASL_MECHANISM",
            ),
            (
                &[
                    ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                    ("KAFKA_SASL_MECHANISM", "PLAIN"),
                    ("KAFKA_SASL_USERNAME", "u"),
                ][..],
                "APP_ENV_INVOICE_KAFKA_SASL_PASSWORD",
            ),
            // Credentials a plaintext client would silently ignore.
            (&[("KAFKA_SASL_PASSWORD", "kafka-s3cret")][..], "APP_ENV_INVOICE_KAFKA_SASL_PASSWORD"),
            (&[("KAFKA_SSL_CA_LOCATION", "/etc/hostname")][..], "APP_ENV_INVOICE_KAFKA_SSL_CA_LOCATION"),
            (
                &[("KAFKA_SECURITY_PROTOCOL", "ssl"), ("KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem")][..],
                "APP_ENV_INVOICE_KAFKA_SSL_CA_LOCATION",
            ),
        ] {
            let error = kafka(pairs).unwrap_err();
            assert_eq!(error.var, var, "{pairs:?}");
            assert!(!error.to_string().contains("kafka-s3cret"), "{error}");
        }
    }

    #[test]
    fn only_plain_http_to_another_host_is_flagged_for_the_jwks() {
        for (url, flagged) in [
            ("http://keycloak.auth.svc:8080/realms/x/protocol/openid-connect/certs", true),
            ("http://10.0.0.7/jwks.json", true),
            ("https://idp.example.com/jwks.json", false),
            ("http://127.0.0.1:1/jwks.json", false),
            ("http://localhost:8080/jwks.json", false),
            ("http://[::1]:8080/jwks.json", false),
        ] {
            assert_eq!(plain_http_off_loopback(url), flagged, "{url}");
        }
    }

    #[test]
    fn short_webhook_secrets_are_accepted_and_named_for_a_warning() {
        let mut env = with_api(minimal());
        env.insert("WEBHOOK_SECRET".into(), "short".into());
        env.insert("WEBHOOK_INTERNAL_SECRET_PREVIOUS".into(), "whsec_c2hvcnQy".into());
        env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), "localhost:31999".into());
        let cfg = Config::from_source(&env, Mode::Api).unwrap();
        assert_eq!(cfg.http_addr.port(), 31999);
        assert!(cfg.http_addr.ip().is_loopback());
        let auth = cfg.http_auth.unwrap();
        assert_eq!(auth.weak_webhook_secrets, ["WEBHOOK_SECRET", "WEBHOOK_INTERNAL_SECRET_PREVIOUS"]);
    }

    #[test]
    fn errors_and_debug_never_show_secret_values() {
        let mut env = with_api(minimal());
        env.insert("APP_ENV_INVOICE_DATABASE_URL".into(), "postgres://u:hunter2-password@db/invoice".into());
        let cfg = Config::from_source(&env, Mode::Api).unwrap();
        let shown = format!("{cfg:?}");
        for secret in
            ["hunter2-password", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "an-internal-secret", "00112233"]
        {
            assert!(!shown.contains(secret), "Debug shows {secret}: {shown}");
        }
        env.insert("APP_ENV_INVOICE_DATABASE_URL".into(), "mysql://u:hunter2-password@db".into());
        let e = err(&env, Mode::Api);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        env = with_api(minimal());
        env.insert("APP_ENV_INVOICE_CREDENTIALS_KEY".into(), format!("{KEY}0"));
        assert!(!err(&env, Mode::Api).to_string().contains(&KEY[..20]));
    }

    #[test]
    fn overrides_are_read() {
        let mut env = with_api(minimal());
        for (k, v) in [
            ("APP_ENV_INVOICE_QUEUE_PARTITIONS", "8"),
            ("APP_ENV_INVOICE_TOPIC_PAYMENT", "p.v1"),
            ("APP_ENV_INVOICE_TOPIC_MERCHANT_CDC", "m.v1"),
            ("APP_ENV_INVOICE_TOPIC_EVENTS", "e.v1"),
            ("APP_ENV_INVOICE_TOPIC_DEADLETTER", "d.v1"),
            ("APP_ENV_INVOICE_LOG_FORMAT", "json"),
            ("APP_ENV_INVOICE_KAFKA_GROUP_ID", "g1"),
            ("APP_ENV_INVOICE_HTTP_ADDR", "0.0.0.0:8080"),
            ("APP_ENV_INVOICE_CONSUMER_WORDING_FROM", "never"),
        ] {
            env.insert(k.into(), v.into());
        }
        let cfg = Config::from_source(&env, Mode::All).unwrap();
        assert_eq!(cfg.queue_partitions, 8);
        assert_eq!(
            cfg.topics,
            Topics {
                payment: "p.v1".into(),
                merchant_cdc: "m.v1".into(),
                events: "e.v1".into(),
                deadletter: "d.v1".into()
            }
        );
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.kafka_group_id, "g1");
        assert_eq!(cfg.http_addr.port(), 8080);
        assert_eq!(cfg.issuance.consumer_wording, ConsumerWording { from: None });
        let auth = cfg.http_auth.unwrap();
        assert_eq!(auth.jwt_audience, "invoice");
        assert!(auth.webhook_secret_previous.is_none());
    }
}
