//! The binary's command line: exit codes, configuration errors, migrate and seed.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{base_env, invoice_cmd, wait_until, TestDb};

fn run(env: &HashMap<String, String>, args: &[&str]) -> (i32, String, String) {
    let out = invoice_cmd(env).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn partition_of_prints_the_runbook_partition() {
    let env = HashMap::new();
    assert_eq!(run(&env, &["partition-of", "polygenelubricants"]), (0, "2\n".into(), String::new()));
    assert_eq!(run(&env, &["partition-of", "ORD-2026-000123"]).1, "0\n");
    assert_eq!(run(&env, &["partition-of", "ĐƠN-HÀNG-1"]).1, "2\n");
    assert_eq!(run(&env, &["partition-of", "ĐƠN-HÀNG-1", "--partitions", "7"]).1, "0\n");
    let env = HashMap::from([("APP_ENV_INVOICE_QUEUE_PARTITIONS".to_owned(), "7".to_owned())]);
    assert_eq!(run(&env, &["partition-of", "Hello World"]).1, "5\n");
    let (code, _, err) = run(&HashMap::new(), &["partition-of", "x", "--partitions", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn keygen_prints_a_fresh_64_hex_key() {
    let (code, a, _) = run(&HashMap::new(), &["keygen"]);
    let (_, b, _) = run(&HashMap::new(), &["keygen"]);
    assert_eq!(code, 0);
    assert_eq!(a.trim().len(), 64);
    assert!(a.trim().bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["migrate", "--help"],
        vec!["api", "--help"],
        vec!["topics", "--help"],
        vec!["topics", "apply", "--help"],
        vec!["partition-of", "--help"],
        vec!["keygen", "--help"],
    ] {
        let (code, out, _) = run(&HashMap::new(), &args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage: invoice"), "{args:?}: {out}");
    }
}

#[test]
fn a_missing_or_malformed_required_variable_exits_2_naming_it() {
    let env = base_env("postgres://postgres@127.0.0.1:5432/unused");
    let cases: Vec<(&str, Option<&str>, &[&str])> = vec![
        ("APP_ENV_INVOICE_WORKER_ID", None, &["migrate"]),
        ("APP_ENV_INVOICE_WORKER_ID", Some("1024"), &["migrate"]),
        ("APP_ENV_INVOICE_CREDENTIALS_KEY", None, &["migrate"]),
        ("APP_ENV_INVOICE_CREDENTIALS_KEY", Some("abc"), &["api"]),
        ("WEBHOOK_SECRET", None, &["api"]),
        ("APP_ENV_INVOICE_JWKS_URL", None, &["api"]),
        ("APP_ENV_INVOICE_HTTP_ADDR", Some("nowhere"), &["api"]),
        ("APP_ENV_INVOICE_LOG_FORMAT", Some("yaml"), &["topics", "apply"]),
    ];
    for (var, value, args) in cases {
        let mut env = env.clone();
        match value {
            Some(v) => env.insert(var.into(), v.into()),
            None => env.remove(var),
        };
        let (code, _, err) = run(&env, args);
        assert_eq!(code, 2, "{var}={value:?}: {err}");
        assert!(err.contains(var), "{var}: {err}");
    }
}

#[test]
fn a_dotenv_file_is_read_and_set_variables_win() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "APP_ENV_INVOICE_WORKER_ID=5000\n").unwrap();
    let env = base_env("postgres://postgres@127.0.0.1:5432/unused");
    let mut without = env.clone();
    without.remove("APP_ENV_INVOICE_WORKER_ID");
    let out = invoice_cmd(&without).current_dir(dir.path()).args(["migrate"]).output().unwrap();
    // The .env value (5000) was read: it is out of range.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`5000` is not an integer 0–1023"));
    // A variable already set wins over .env: this run gets past configuration.
    let out = invoice_cmd(&env).current_dir(dir.path()).args(["partition-of", "a"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // Commands without configuration read it too: `partition-of` takes P from `.env`.
    std::fs::write(dir.path().join(".env"), "APP_ENV_INVOICE_QUEUE_PARTITIONS=7\n").unwrap();
    let out =
        invoice_cmd(&env).current_dir(dir.path()).args(["partition-of", "Hello World"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5\n");
    let mut set = env.clone();
    set.insert("APP_ENV_INVOICE_QUEUE_PARTITIONS".into(), "3".into());
    let out =
        invoice_cmd(&set).current_dir(dir.path()).args(["partition-of", "Hello World"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
    // A malformed line is named by number and variable, never quoted: it holds a secret.
    std::fs::write(
        dir.path().join(".env"),
        "APP_ENV_INVOICE_QUEUE_PARTITIONS=7\nWEBHOOK_SECRET=whsec_ab\"cd-very-secret\n",
    )
    .unwrap();
    let out = invoice_cmd(&env).current_dir(dir.path()).args(["migrate"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2 (WEBHOOK_SECRET)"), "{err}");
    assert!(!err.contains("very-secret"), "{err}");
}

#[tokio::test]
async fn migrate_with_seed_twice_changes_nothing_the_second_time() {
    let db = TestDb::create_empty().await;
    let env = base_env(&db.url);
    let (code, out, err) = run(&env, &["migrate", "--seed"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "migrated; rows written: permissions 5, provinces 34, wards 3321, demo 2");
    let tables = [
        "permission",
        "admin_province",
        "admin_ward",
        "merchant_tax_info",
        "provider_config",
        "_sqlx_migrations",
    ];
    let mut first = Vec::new();
    for t in tables {
        first.push(db.count(t).await);
    }
    assert_eq!(&first[..5], &[5, 34, 3321, 1, 1]);
    let config_before: (Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT credentials_ciphertext, credentials_nonce FROM provider_config")
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let (code, out, err) = run(&env, &["migrate", "--seed"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "migrated; rows written: permissions 0, provinces 0, wards 0, demo 0");
    for (t, before) in tables.iter().zip(&first) {
        assert_eq!(db.count(t).await, *before, "{t}");
    }
    let config_after: (Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT credentials_ciphertext, credentials_nonce FROM provider_config")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(config_before, config_after, "the demo credentials were re-encrypted");
    // The demo credentials are ciphertext: the plaintext password is nowhere in the row.
    assert!(!String::from_utf8_lossy(&config_after.0).contains("demo-password"));

    let hanoi: (String, String) = sqlx::query_as("SELECT name, kind FROM admin_province WHERE code = '01'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(hanoi, ("Thành phố Hà Nội".to_owned(), "municipality".to_owned()));
    let hanoi_wards: i64 = sqlx::query_scalar("SELECT count(*) FROM admin_ward WHERE province_code = '01'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(hanoi_wards > 100, "{hanoi_wards}");
}

#[tokio::test]
async fn migrate_without_seed_loads_reference_data_but_no_demo_merchant() {
    let db = TestDb::create_empty().await;
    let (code, _, err) = run(&base_env(&db.url), &["migrate"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(db.count("admin_province").await, 34);
    assert_eq!(db.count("merchant_tax_info").await, 0);
    assert_eq!(db.count("provider_config").await, 0);
}

#[tokio::test]
async fn migrate_names_postgres_when_it_cannot_connect() {
    let env = base_env("postgres://postgres@127.0.0.1:1/invoice");
    let started = std::time::Instant::now();
    let (code, _, err) = tokio::task::spawn_blocking(move || run(&env, &["migrate"])).await.unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("APP_ENV_INVOICE_DATABASE_URL"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// Waits until `url` answers 2xx.
async fn wait_healthy(url: &str, what: &str) {
    wait_until(Duration::from_secs(60), what, || {
        let url = url.to_owned();
        async move { reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
}

/// Sends SIGTERM and returns the exit code.
async fn terminate(child: &mut std::process::Child, what: &str) -> Option<i32> {
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = wait_until(Duration::from_secs(60), what, || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    status.code()
}

#[tokio::test]
async fn every_long_running_mode_exits_0_on_sigterm() {
    let db = TestDb::create().await;
    let topics = crate::support::kafka::TestTopics::create(1).await;
    let mut env = crate::support::stream_env(&db, &topics.names, &crate::support::unique("g-sigterm-"));
    env.insert("APP_ENV_INVOICE_QUEUE_PREFIX".into(), crate::support::unique("iq-sigterm-"));
    for mode in ["api", "stream", "worker", "all", "provider-sim"] {
        let port = free_port();
        env.insert("APP_ENV_INVOICE_WORKER_ID".into(), crate::support::next_worker_id().to_string());
        env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), format!("127.0.0.1:{port}"));
        let mut command = invoice_cmd(&env);
        command.arg(mode);
        if mode == "provider-sim" {
            command.args(["--addr", &format!("127.0.0.1:{port}")]);
        }
        let mut child = command.stderr(std::process::Stdio::null()).spawn().unwrap();
        let health = if mode == "provider-sim" { "/sim/stats" } else { "/health" };
        wait_healthy(&format!("http://127.0.0.1:{port}{health}"), &format!("`{mode}` to answer")).await;
        assert_eq!(terminate(&mut child, &format!("`{mode}` to exit")).await, Some(0), "{mode}");
    }
}

#[tokio::test]
async fn a_worker_whose_default_address_is_taken_serves_metrics_on_a_free_port() {
    use std::io::BufRead as _;
    let db = TestDb::create().await;
    let mut env = base_env(&db.url);
    env.remove("APP_ENV_INVOICE_HTTP_ADDR");
    env.insert("APP_ENV_INVOICE_QUEUE_PREFIX".into(), crate::support::unique("iq-port-"));
    // Taken by this test, or already by something else (a `make run`): taken either way.
    let _holder = std::net::TcpListener::bind("127.0.0.1:31140");
    let mut child = invoice_cmd(&env)
        .env("RUST_LOG", "warn")
        .arg("worker")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening=").nth(1) {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_owned());
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the worker names the port it took");
    assert!(addr.starts_with("127.0.0.1:") && addr != "127.0.0.1:31140", "{addr}");
    let metrics = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("invoice_"));
    assert_eq!(terminate(&mut child, "the worker to exit").await, Some(0));

    // A configured address is kept or refused, never swapped.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    env.insert("APP_ENV_INVOICE_HTTP_ADDR".into(), taken.local_addr().unwrap().to_string());
    let (code, _, err) = run(&env, &["worker"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("APP_ENV_INVOICE_HTTP_ADDR"), "{err}");
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let mut env = base_env("postgres://postgres@127.0.0.1:1/invoice");
    env.insert("APP_ENV_INVOICE_LOG_FORMAT".into(), "json".into());
    let (code, _, err) = run(&env, &["migrate"]);
    assert_eq!(code, 1);
    let json_lines: Vec<serde_json::Value> =
        err.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!json_lines.is_empty(), "{err}");
    assert!(json_lines.iter().all(|l| l["level"].is_string() && l["message"].is_string()), "{err}");
    assert!(json_lines
        .iter()
        .any(|l| l["message"] == "Postgres is not answering yet; retrying" && l["error"].is_string()));
}

#[tokio::test]
async fn rewrap_credentials_moves_every_sealed_credential_to_the_new_key() {
    use crate::support::{insert_provider_config, scalar, seed_invoice, TEST_KEY};
    let db = TestDb::create().await;
    insert_provider_config(&db, "M-1", 1).await;
    let (invoice_id, _) = seed_invoice(&db, "M-1", "ORD-R-1", "QUEUED", chrono::Utc::now()).await;
    // The invoice's snapshot carries the configuration's sealed credentials, as the stream copies them.
    sqlx::query(
        "UPDATE invoice i SET config_snapshot = jsonb_set(jsonb_set(i.config_snapshot, '{configId}', '\"1\"'), '{credentials}',
             jsonb_build_object('keyId', pc.key_id,
                 'nonce', translate(encode(pc.credentials_nonce, 'base64'), E'\\n', ''),
                 'ciphertext', translate(encode(pc.credentials_ciphertext, 'base64'), E'\\n', '')))
         FROM provider_config pc WHERE pc.id = 1 AND i.id = $1",
    )
    .bind(invoice_id)
    .execute(&db.pool)
    .await
    .unwrap();
    // A newer invoice references a shared copy of the same snapshot, as the stream writes it.
    let (shared_id, _) = seed_invoice(&db, "M-1", "ORD-R-2", "QUEUED", chrono::Utc::now()).await;
    sqlx::query(
        "INSERT INTO invoice_config_snapshot (digest, merchant_id, snapshot)
         SELECT sha256('shared'::bytea), merchant_id, config_snapshot FROM invoice WHERE id = $1",
    )
    .bind(invoice_id)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE invoice SET config_snapshot = NULL, config_snapshot_digest = sha256('shared'::bytea) WHERE id = $1")
        .bind(shared_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let old_key_id: String = sqlx::query_scalar("SELECT key_id FROM provider_config WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let new_key = invoice::crypto::generate_key_hex();
    let mut env = base_env(&db.url);
    env.insert("APP_ENV_INVOICE_CREDENTIALS_KEY".into(), new_key.clone());

    // Without the previous key nothing can be opened: exit 5, nothing changed.
    let (code, stdout, _) = run(&env, &["rewrap-credentials"]);
    assert_eq!(code, 5, "{stdout}");
    assert_eq!(
        scalar(&db, &format!("SELECT count(*) FROM provider_config WHERE key_id = '{old_key_id}'")).await,
        1
    );

    env.insert("APP_ENV_INVOICE_CREDENTIALS_KEY_PREVIOUS".into(), TEST_KEY.into());
    let (code, stdout, stderr) = run(&env, &["rewrap-credentials", "--batch", "1"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 provider configuration(s), 2 invoice snapshot(s); 0 could not"), "{stdout}");
    assert_eq!(
        scalar(&db, &format!("SELECT count(*) FROM provider_config WHERE key_id = '{old_key_id}'")).await,
        0
    );
    assert_eq!(
        scalar(&db, &format!("SELECT count(*) FROM invoice WHERE config_snapshot->'credentials'->>'keyId' = '{old_key_id}'")).await,
        0
    );
    assert_eq!(
        scalar(
            &db,
            &format!("SELECT count(*) FROM invoice_config_snapshot WHERE snapshot->'credentials'->>'keyId' = '{old_key_id}'")
        )
        .await,
        0
    );
    // The new key alone opens both, with the AAD of their row.
    let mut key = [0u8; 32];
    hex::decode_to_slice(&new_key, &mut key).unwrap();
    let keyring = invoice::crypto::Keyring::new(invoice::config::Secret::new(key));
    let (cipher, nonce, key_id): (Vec<u8>, Vec<u8>, String) = sqlx::query_as(
        "SELECT credentials_ciphertext, credentials_nonce, key_id FROM provider_config WHERE id = 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let sealed = invoice::crypto::Sealed { key_id, nonce, ciphertext: cipher };
    let plain = keyring.open(&sealed, &invoice::storage::seed::provider_config_aad("M-1", 1)).unwrap();
    assert!(String::from_utf8_lossy(plain.expose()).contains("password"));
    // The shared snapshot too, as the invoice that references it reads it.
    let shared: serde_json::Value = sqlx::query_scalar(
        "SELECT invoice_snapshot(config_snapshot, config_snapshot_digest)->'credentials' FROM invoice WHERE id = $1",
    )
    .bind(shared_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let b64 = |v: &serde_json::Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()
    };
    let sealed = invoice::crypto::Sealed {
        key_id: shared["keyId"].as_str().unwrap().to_owned(),
        nonce: b64(&shared["nonce"]),
        ciphertext: b64(&shared["ciphertext"]),
    };
    let plain = keyring.open(&sealed, &invoice::storage::seed::provider_config_aad("M-1", 1)).unwrap();
    assert!(String::from_utf8_lossy(plain.expose()).contains("password"));
    // Idempotent: a second run has nothing to do.
    let (code, stdout, _) = run(&env, &["rewrap-credentials"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("0 provider configuration(s), 0 invoice snapshot(s)"), "{stdout}");
}

/// `invoice inspect <order>`: its exit code and its report.
fn inspect(db: &TestDb, order: &str) -> (i32, serde_json::Value) {
    let (code, stdout, stderr) = run(&base_env(&db.url), &["inspect", order]);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    (code, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_says_why_an_order_has_no_invoice() {
    let db = TestDb::create().await;
    sqlx::query(
        "INSERT INTO payment_decision (event_id, merchant_id, order_id, outcome, skip_reason, topic, partition, \"offset\")
         VALUES ('ev-S-1', 'M-9', 'ORD-S-1', 'skipped', 'no_provider_config', 'payment.succeeded.v1', 2, 41)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (code, report) = inspect(&db, "ORD-S-1");
    // No invoice: exit 3, and the report carries the decision that made none.
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["invoices"], serde_json::json!([]));
    assert_eq!(report["decisions"][0]["skipReason"], "no_provider_config", "{report}");
    assert_eq!(report["decisions"][0]["offset"], 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_the_audit_rows_of_the_order_with_and_without_an_invoice() {
    use crate::support::seed_invoice;
    let db = TestDb::create().await;
    let (invoice_id, _) = seed_invoice(&db, "M-1", "ORD-I-1", "QUEUED", chrono::Utc::now()).await;
    seed_invoice(&db, "M-1", "ORD-I-2", "QUEUED", chrono::Utc::now()).await;
    // A row about the invoice, one about the order alone (a refused request has no invoice),
    // and one of another order.
    sqlx::query(
        "INSERT INTO audit_log (entity, entity_id, invoice_id, merchant_id, order_id, event_type, outcome, actor)
         VALUES ('invoice', $2, $1, 'M-1', 'ORD-I-1', 'invoice.created', 'QUEUED', 'stream'),
                ('invoice', '42', NULL, 'M-1', 'ORD-I-1', 'request_refused', 'REFUSED', 'operator'),
                ('invoice', '43', NULL, 'M-1', 'ORD-I-2', 'request_refused', 'REFUSED', 'operator')",
    )
    .bind(invoice_id)
    .bind(invoice_id.to_string())
    .execute(&db.pool)
    .await
    .unwrap();
    let (code, report) = inspect(&db, "ORD-I-1");
    assert_eq!(code, 0, "{report}");
    let events: Vec<&str> =
        report["audit"].as_array().unwrap().iter().map(|a| a["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["invoice.created", "request_refused"], "{report}");
}
