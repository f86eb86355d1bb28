//! Schemathesis against the running API, from its own OpenAPI document (R21): generated
//! positive and negative requests on every route, with an all-powerful token and without
//! one. No answer may be a 5xx; without a token every JWT route answers 401.
//! `make test` installs the pinned Schemathesis first (`scripts/schemathesis.sh`).

use crate::support::idp::token;
use crate::support::{seed_invoice, TestApi};

fn schemathesis() -> String {
    std::env::var("INVOICE_SCHEMATHESIS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/tools/schemathesis/bin/st").to_owned()
    })
}

async fn run(api: &TestApi, extra: &[&str]) -> (bool, String) {
    let st = schemathesis();
    assert!(
        std::path::Path::new(&st).exists(),
        "Schemathesis is not installed at {st}: run `scripts/schemathesis.sh` (make test does)"
    );
    // Schemathesis keeps a cache in its working directory: keep it out of the source tree.
    let workdir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tools/schemathesis");
    let output = tokio::process::Command::new(&st)
        .current_dir(workdir)
        .args(["run", &api.url("/v1/api/openapi.json")])
        .args(["--url", &api.url("")])
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", "15", "--generation-deterministic", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "10"])
        .args(extra)
        .output()
        .await
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_never_get_a_server_error() {
    let api = TestApi::spawn_with(|env| {
        // Generated claim tokens would soon be throttled; the fuzzer should reach the handlers.
        env.insert("APP_ENV_INVOICE_CLAIM_FAILURE_LIMIT".into(), "1000000".into());
    })
    .await;
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    seed_invoice(&api.db, "M-1", "ORD-F-1", "FAILED", deadline).await;
    let all = token(
        &["invoice:admin", "invoice:read", "invoice:replay", "invoice:config:read", "invoice:config:write"],
        &["M-1"],
    );
    let header = format!("Authorization: Bearer {all}");
    let (ok, report) = run(&api, &["-H", &header]).await;
    assert!(ok, "Schemathesis found server errors with a token:\n{report}");
    let (ok, report) = run(&api, &[]).await;
    assert!(ok, "Schemathesis found server errors without a token:\n{report}");
    api.stop().await.unwrap();
}
