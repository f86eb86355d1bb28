//! Every `invoice` command of `docs/runbook.md` runs, against a real stack, and succeeds.

use crate::events::tax;
use crate::support::kafka::{produce, producer, TestTopics};
use crate::support::{
    insert_merchant, insert_provider_config, invoice_cmd, seed_invoice, stream_env, unique, TestDb, TEST_KEY,
};

/// The `invoice …` lines of the ```` ```sh ```` blocks.
fn runbook_commands() -> Vec<String> {
    let text = include_str!("../../docs/runbook.md");
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            command if in_sh && command.starts_with("invoice ") => commands.push(command.to_owned()),
            other if in_sh => panic!("a runbook block line that is not an invoice command: {other}"),
            _ => {}
        }
    }
    commands
}

/// Splits like a shell would for these simple lines (double quotes group words).
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_runs_and_succeeds() {
    let commands = runbook_commands();
    assert!(commands.len() >= 12, "{commands:?}");
    for needed in [
        "dlq list",
        "dlq requeue",
        "inspect",
        "replay",
        "tax-drift",
        "offsets show",
        "offsets reset",
        "partition-of",
        "deadletters",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(&format!("invoice {needed}"))),
            "the runbook lacks `invoice {needed}`"
        );
    }
    let db = TestDb::create().await;
    let topics = TestTopics::create(1).await;
    let mut env = stream_env(&db, &topics.names, &unique("g-rb-"));
    env.insert("APP_ENV_INVOICE_QUEUE_PREFIX".into(), unique("iq-rb-"));
    // A merchant whose stored TaxInfo matches its CDC record, and a FAILED order.
    let p = producer();
    let record = crate::events::cdc("c", "M-1", tax("immediate"), 1).to_string();
    produce(&p, &topics.names.merchant_cdc, "M-1", Some(record.as_bytes()), &[]).await;
    produce(&p, &topics.names.payment, "ORD-X", Some(b"{}"), &[]).await;
    let source_topic = topics.names.payment.clone();
    produce(
        &p,
        &topics.names.deadletter,
        "ORD-DL",
        Some(b"{\"orderId\": 1.5}"),
        &[
            ("x-error", "orderId: expected a string"),
            ("x-source-topic", &source_topic),
            ("x-source-partition", "0"),
            ("x-source-offset", "41"),
        ],
    )
    .await;
    insert_merchant(&db, "M-1", &tax("immediate")).await;
    insert_provider_config(&db, "M-1", 1).await;
    let order = unique("ORD-RB-");
    seed_invoice(&db, "M-1", &order, "FAILED", chrono::Utc::now()).await;
    let mut key = [0u8; 32];
    hex::decode_to_slice(TEST_KEY, &mut key).unwrap();
    let key_id = invoice::crypto::Keyring::new(invoice::config::Secret::new(key)).current_key_id().to_owned();
    sqlx::query("UPDATE invoice SET config_snapshot = jsonb_set(config_snapshot, '{credentials,keyId}', to_jsonb($1::text))")
        .bind(&key_id)
        .execute(&db.pool)
        .await
        .unwrap();

    for command in &commands {
        let line = command
            .replace("ORD-1", &order)
            .replace("merchant.cdc.v1", &topics.names.merchant_cdc)
            .replace("payment.succeeded.v1", &topics.names.payment);
        let args = words(&line);
        let output = invoice_cmd(&env).args(&args[1..]).output().unwrap();
        let code = output.status.code();
        assert_eq!(
            code,
            Some(0),
            "`{line}` exited {code:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // `deadletters` shows where a dead letter came from and why, never its payload.
    let output = invoice_cmd(&env).args(["deadletters", "--json"]).output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let letters: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 1, "{text}");
    assert_eq!(letters[0]["key"], "ORD-DL");
    assert_eq!(letters[0]["error"], "orderId: expected a string");
    assert_eq!(letters[0]["sourceTopic"], source_topic.as_str());
    assert_eq!(letters[0]["sourceOffset"], "41");
    assert!(!text.contains("1.5"), "a payload was printed: {text}");
}
