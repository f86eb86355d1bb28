//! What the SREs run: the Helm chart (lint, rendering, the objects it makes), the alert rules
//! (promtool), and the metric names the dashboard and alerts query (checked against what a
//! running instance exports, from the end-to-end claim test).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CHART: &str = "helm/invoice";

/// A tool installed by `scripts/tools.sh` (which `make test` runs first).
fn tool(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin").join(name);
    assert!(path.exists(), "{} is missing: run `scripts/tools.sh {name}` (make test does)", path.display());
    path
}

fn run(tool_name: &str, args: &[&str]) -> Result<String, String> {
    let output =
        Command::new(tool(tool_name)).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&output.stderr)))
    }
}

/// `helm template` with `args`, as JSON objects.
fn render(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["template", "inv", CHART, "--namespace", "payments", "--kube-version", "1.31.0"];
    all.extend_from_slice(args);
    let yaml = run("helm", &all).unwrap_or_else(|e| panic!("helm template {args:?} failed:\n{e}"));
    serde_saphyr::from_multiple::<Value>(&yaml).unwrap().into_iter().filter(|v| !v.is_null()).collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env_of(container: &Value) -> Vec<&Value> {
    container["env"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

const ALL_FEATURES: &str = "helm/invoice/ci/all-features-values.yaml";

/// The variables that hold secrets: only ever set from a Secret reference.
const SECRET_VARIABLES: &[&str] = &[
    "APP_ENV_INVOICE_DATABASE_URL",
    "APP_ENV_INVOICE_REDIS_URL",
    "APP_ENV_INVOICE_CREDENTIALS_KEY",
    "APP_ENV_INVOICE_CREDENTIALS_KEY_PREVIOUS",
    "WEBHOOK_SECRET",
    "WEBHOOK_SECRET_PREVIOUS",
    "WEBHOOK_INTERNAL_SECRET",
    "WEBHOOK_INTERNAL_SECRET_PREVIOUS",
    "APP_ENV_INVOICE_KAFKA_SASL_PASSWORD",
];

#[test]
fn the_chart_lints_strictly_with_defaults_and_with_every_feature_on() {
    run("helm", &["lint", "--strict", CHART]).unwrap();
    run("helm", &["lint", "--strict", CHART, "-f", ALL_FEATURES]).unwrap();
    // Plain `helm template` (no cluster version given) renders too.
    run("helm", &["template", "inv", CHART]).unwrap();
}

#[test]
fn the_default_render_has_one_deployment_per_mode_with_probes_grace_and_secret_references_only() {
    let objects = render(&[]);
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount"
        ])
    );
    assert!(of_kind(&objects, "Secret").is_empty(), "the chart must never create a Secret");
    let deployments: BTreeSet<&str> =
        of_kind(&objects, "Deployment").iter().filter_map(|d| d["metadata"]["name"].as_str()).collect();
    assert_eq!(deployments, BTreeSet::from(["inv-invoice-api", "inv-invoice-stream", "inv-invoice-worker"]));

    for deployment in of_kind(&objects, "Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let mode = name.trim_start_matches("inv-invoice-");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(container["args"], serde_json::json!([mode]), "{name}");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health", "{name}");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready", "{name}");
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().unwrap();
        let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
        // Longer than the HTTP drain (20 s) after the preStop sleep; a worker's covers a whole
        // provider call (90 s) on top.
        assert!(grace >= pre_stop + 25, "{name}: grace {grace}");
        if mode == "worker" {
            assert!(grace >= 90 + pre_stop + 35, "{name}: grace {grace}");
        }
        if mode == "stream" {
            assert!(grace >= pre_stop + 75, "{name}: grace {grace}");
        }
        assert!(container["resources"]["requests"].is_object(), "{name}");
        // Snowflake worker ids: every process leases its own, never one id shared by replicas.
        let worker_id: Vec<&Value> =
            env_of(container).into_iter().filter(|e| e["name"] == "APP_ENV_INVOICE_WORKER_ID").collect();
        assert_eq!(worker_id.len(), 1, "{name}");
        assert_eq!(worker_id[0]["value"], "auto", "{name}");
        // The allocator without transparent huge pages, whatever the node's THP setting.
        let thp: Vec<&Value> =
            env_of(container).into_iter().filter(|e| e["name"] == "MIMALLOC_ALLOW_THP").collect();
        assert_eq!(thp.len(), 1, "{name}");
        assert_eq!(thp[0]["value"], "0", "{name}");
        // Secrets by reference only.
        for variable in env_of(container) {
            let var = variable["name"].as_str().unwrap();
            if SECRET_VARIABLES.contains(&var) {
                assert!(variable.get("value").is_none(), "{name}: {var} has a literal value");
                assert_eq!(variable["valueFrom"]["secretKeyRef"]["name"], "invoice-secrets", "{name}: {var}");
            }
        }
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true, "{name}");
        // Webhook secrets only where the API runs, and required there.
        let webhook: Vec<&Value> =
            env_of(container).into_iter().filter(|e| e["name"] == "WEBHOOK_SECRET").collect();
        if mode == "api" {
            assert_eq!(webhook.len(), 1, "{name}");
            assert!(webhook[0]["valueFrom"]["secretKeyRef"].get("optional").is_none(), "{name}");
        } else {
            assert!(webhook.is_empty(), "{name} gets the webhook secret");
        }
        // Plaintext Kafka by default: no SASL password asked of the Secret.
        assert!(
            !env_of(container).iter().any(|e| e["name"] == "APP_ENV_INVOICE_KAFKA_SASL_PASSWORD"),
            "{name}"
        );
    }
    let config = named(&objects, "ConfigMap", "inv-invoice");
    for variable in SECRET_VARIABLES {
        assert!(config["data"].get(*variable).is_none(), "{variable} in the ConfigMap");
    }
    assert_eq!(config["data"]["APP_ENV_INVOICE_KAFKA_GROUP_ID"], "SVC-00150-INVOICE_CONSUMER");

    let job = named(&objects, "Job", "inv-invoice-migrate");
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-install,pre-upgrade");
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"], serde_json::json!(["migrate"]));
    assert_eq!(of_kind(&objects, "PodDisruptionBudget").len(), 3);
    let api = named(&objects, "Service", "inv-invoice-api");
    assert_eq!(api["spec"]["selector"]["app.kubernetes.io/component"], "api");
}

#[test]
fn every_feature_on_renders_keda_capped_at_the_partitions_monitoring_and_the_dashboard() {
    let objects = render(&["-f", ALL_FEATURES]);
    let stream = named(&objects, "ScaledObject", "inv-invoice-stream");
    // 64 asked, 12 partitions: an extra consumer would sit idle.
    assert_eq!(stream["spec"]["maxReplicaCount"], 12);
    let triggers = stream["spec"]["triggers"].as_array().unwrap();
    assert!(triggers
        .iter()
        .all(|t| t["type"] == "kafka" && t["metadata"]["consumerGroup"] == "SVC-00150-INVOICE_CONSUMER"));
    // Against the SASL cluster, the scaler authenticates with the TriggerAuthentication given.
    assert!(triggers.iter().all(|t| t["authenticationRef"]["name"] == "invoice-kafka-auth"), "{triggers:?}");
    let topics: BTreeSet<&str> = triggers.iter().filter_map(|t| t["metadata"]["topic"].as_str()).collect();
    assert_eq!(topics, BTreeSet::from(["merchant.cdc.v1", "payment.succeeded.v1"]));
    // SASL: every mode gets the password from the Secret, the rest from the ConfigMap.
    for deployment in of_kind(&objects, "Deployment") {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let password: Vec<&Value> = env_of(container)
            .into_iter()
            .filter(|e| e["name"] == "APP_ENV_INVOICE_KAFKA_SASL_PASSWORD")
            .collect();
        assert_eq!(password.len(), 1, "{}", deployment["metadata"]["name"]);
        assert_eq!(password[0]["valueFrom"]["secretKeyRef"]["key"], "kafka-sasl-password");
    }
    let config = named(&objects, "ConfigMap", "inv-invoice");
    assert_eq!(config["data"]["APP_ENV_INVOICE_KAFKA_SECURITY_PROTOCOL"], "sasl_ssl");
    assert_eq!(config["data"]["APP_ENV_INVOICE_KAFKA_SASL_MECHANISM"], "SCRAM-SHA-512");
    let worker = named(&objects, "ScaledObject", "inv-invoice-worker");
    assert!(worker["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap()
        .contains("invoice_queue_depth"));
    // KEDA owns the replica count of what it scales; the api keeps its CPU HPA.
    assert!(named(&objects, "Deployment", "inv-invoice-stream")["spec"].get("replicas").is_none());
    let hpas: Vec<&str> = of_kind(&objects, "HorizontalPodAutoscaler")
        .iter()
        .filter_map(|h| h["metadata"]["name"].as_str())
        .collect();
    assert_eq!(hpas, vec!["inv-invoice-api"]);
    assert!(named(&objects, "Deployment", "inv-invoice-api")["spec"].get("replicas").is_none());
    // The worker's queue query is this release's series only.
    let query = worker["spec"]["triggers"][0]["metadata"]["query"].as_str().unwrap();
    assert!(
        query.contains(r#"namespace="payments""#) && query.contains(r#"job="inv-invoice-metrics""#),
        "{query}"
    );
    // Only jobs a worker could run now: delayed ones wait out a backoff.
    assert!(query.contains(r#"state="waiting""#) && !query.contains("delayed"), "{query}");
    // The worker's grace is raised to cover a provider call whatever the values say (30 s).
    let worker_pod = &named(&objects, "Deployment", "inv-invoice-worker")["spec"]["template"]["spec"];
    assert!(worker_pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 125);
    assert_eq!(of_kind(&objects, "ServiceMonitor").len(), 1);

    let rule = named(&objects, "PrometheusRule", "inv-invoice");
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let alerts = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(alerts.len(), 17);
    for alert in alerts {
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        assert!(
            url.starts_with("https://git.example.vn/payments/invoice/-/blob/main/docs/runbook.md#"),
            "{url}"
        );
    }
    let dashboard = named(&objects, "ConfigMap", "inv-invoice-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(dashboard["data"]["invoice.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "invoice-overview");
}

#[test]
fn keda_on_an_authenticated_broker_without_a_trigger_authentication_is_refused_at_render() {
    let args = [
        "template",
        "inv",
        CHART,
        "--set",
        "autoscaling.keda.enabled=true",
        "--set",
        "config.kafka.securityProtocol=sasl_ssl",
    ];
    let error = run("helm", &args).expect_err("rendered a scaler that cannot read the lag");
    assert!(error.contains("autoscaling.keda.stream.authenticationRef is required"), "{error}");
    assert!(error.contains("sasl_ssl"), "{error}");
    // With one, or on a plaintext broker, it renders.
    let mut with_ref = args.to_vec();
    with_ref.extend(["--set", "autoscaling.keda.stream.authenticationRef=kafka-auth"]);
    run("helm", &with_ref).unwrap();
    run("helm", &["template", "inv", CHART, "--set", "autoscaling.keda.enabled=true"]).unwrap();
}

#[test]
fn without_keda_the_hpas_scale_each_mode_and_the_stream_stays_within_its_partitions() {
    let objects = render(&[
        "--set",
        "autoscaling.hpa.enabled=true",
        "--set",
        "autoscaling.hpa.stream.maxReplicas=50",
        "--set",
        "kafkaPartitions=6",
    ]);
    let hpas = of_kind(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 3);
    assert_eq!(named(&objects, "HorizontalPodAutoscaler", "inv-invoice-stream")["spec"]["maxReplicas"], 6);
    // A minimum above the cap is clamped rather than rendered invalid (min > max).
    let tiny = render(&["--set", "autoscaling.hpa.enabled=true", "--set", "kafkaPartitions=1"]);
    let stream = &named(&tiny, "HorizontalPodAutoscaler", "inv-invoice-stream")["spec"];
    assert_eq!((stream["minReplicas"].as_i64(), stream["maxReplicas"].as_i64()), (Some(1), Some(1)));
    // Without an autoscaler, replicas come from the values, the stream's capped too.
    let plain = render(&["--set", "modes.stream.replicas=40", "--set", "kafkaPartitions=6"]);
    assert_eq!(named(&plain, "Deployment", "inv-invoice-stream")["spec"]["replicas"], 6);
}

#[test]
fn the_values_schema_refuses_secrets_in_values_and_malformed_settings() {
    for bad in [
        "config.extraEnv.APP_ENV_INVOICE_CREDENTIALS_KEY=0123",
        "config.extraEnv.APP_ENV_INVOICE_DATABASE_URL=postgres://u:p@db/invoice",
        "config.extraEnv.APP_ENV_INVOICE_WORKER_ID=3",
        // Set by the chart from its own values: a second key would be ambiguous.
        "config.extraEnv.APP_ENV_INVOICE_PROVIDER_TIMEOUT_MS=300000",
        "config.extraEnv.APP_ENV_INVOICE_PROVIDER_ALLOW_PRIVATE_NETWORKS=true",
        "config.providerAllowPrivateNetworks=maybe",
        "config.extraEnv.APP_ENV_INVOICE_HTTP_ADDR=0.0.0.0:8080",
        "config.extraEnv.SOMETHING_ELSE=1",
        "config.logFormat=xml",
        "config.queuePartitions=0",
        "secrets.existingSecret=",
        "modes.api.replicas=-1",
        "unknownTopLevel=1",
    ] {
        let refused = run("helm", &["template", "inv", CHART, "--set", bad]);
        assert!(refused.is_err(), "{bad} was accepted");
        assert!(refused.unwrap_err().contains("schema"), "{bad}: not refused by the schema");
    }
}

/// The `expr` of every alert rule and every dashboard target.
fn queries() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root.join("helm/invoice/alerts/invoice-rules.yaml")).unwrap(),
    )
    .unwrap();
    let mut out: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("helm/invoice/dashboards/invoice.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The `invoice_…` metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("invoice_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Fails if an alert or the dashboard reads a metric none of `scrapes` (the Prometheus text
/// of running api, stream and worker processes) exports.
pub fn assert_dashboard_and_alert_metrics_exported(scrapes: &[String]) {
    let exported: BTreeSet<&str> = scrapes
        .iter()
        .flat_map(|s| s.lines())
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let wanted: BTreeSet<String> = queries().iter().flat_map(|q| metric_names(q)).collect();
    assert!(wanted.len() >= 25, "{wanted:?}");
    let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(invoice_provider_latency_seconds_bucket{a="invoice_x"}[5m]))) / my_invoice_y"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["invoice_provider_latency_seconds_bucket".to_owned(), "invoice_x".to_owned()])
    );
}

#[test]
fn every_alert_passes_promtool_and_its_runbook_link_names_a_runbook_section() {
    let checked = run("promtool", &["check", "rules", "helm/invoice/alerts/invoice-rules.yaml"]).unwrap();
    assert!(checked.contains("SUCCESS: 17 rules found"), "{checked}");
    let tested = run("promtool", &["test", "rules", "helm/invoice/alerts/tests.yaml"]).unwrap();
    assert!(tested.contains("SUCCESS"), "{tested}");
    let runbook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbook.md")).unwrap();
    // GitHub's heading anchors: lower case, spaces to dashes, punctuation dropped.
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/invoice/alerts/invoice-rules.yaml"),
    )
    .unwrap();
    let mut linked = 0;
    for line in rules.lines().filter(|l| l.contains("runbook_url:")) {
        let anchor = line.rsplit('#').next().unwrap().trim();
        assert!(
            anchors.contains(anchor),
            "runbook_url #{anchor} names no section of docs/runbook.md ({anchors:?})"
        );
        linked += 1;
    }
    assert_eq!(linked, 17);
}

#[test]
fn the_asyncapi_document_is_generated_from_topics_and_valid_asyncapi_3() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let specs = invoice::topics::specs(&invoice::config::Topics::default()).unwrap();
    let mut generated = invoice::topics::asyncapi(&specs);
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("docs/asyncapi.json")).unwrap()).unwrap();
    // A version bump alone does not make the document stale.
    generated["info"]["version"] = committed["info"]["version"].clone();
    assert!(
        generated == committed,
        "docs/asyncapi.json is stale: regenerate it with `make asyncapi` (from topics/)"
    );
    for spec in &specs {
        let channel =
            &generated["channels"].as_object().unwrap().values().find(|c| c["address"] == spec.name.as_str());
        let channel = channel.unwrap_or_else(|| panic!("no channel for {}", spec.name));
        assert_eq!(channel["bindings"]["kafka"]["partitions"], spec.partitions);
    }
    let deadletter = &generated["components"]["messages"]
        .as_object()
        .unwrap()
        .values()
        .find(|m| m["headers"].is_object())
        .expect("the dead-letter message documents its headers")["headers"]["properties"];
    for header in ["x-error", "x-source-topic", "x-source-partition", "x-source-offset"] {
        assert!(deadletter.get(header).is_some(), "{header}");
    }
    // Against the official AsyncAPI 3.0.0 JSON Schema (npm @asyncapi/specs, fetched by
    // scripts/tools.sh; a draft-07 schema with its definitions inline).
    let schema_path = std::fs::read_dir(root.join("target/tools"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("asyncapi-specs-"))
        .expect("run scripts/tools.sh asyncapi-specs (make test does)")
        .path()
        .join("schemas/3.0.0-without-$id.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    let validator = jsonschema::draft7::new(&schema).unwrap();
    let errors: Vec<String> =
        validator.iter_errors(&committed).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "docs/asyncapi.json is not valid AsyncAPI 3.0.0:\n{}", errors.join("\n"));
    // The validator sees a broken document (the check can fail).
    let mut broken = committed.clone();
    broken["channels"]["payment"]["address"] = serde_json::json!(42);
    assert!(!validator.is_valid(&broken));
}
