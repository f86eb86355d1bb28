//! Operator endpoints (JWT): invoices, their audit trail, replay, the DLQ, provider
//! configuration, tax info; and the public administrative units.
//!
//! Authorization happens once per handler through [`authorize`], then the merchant scope:
//! an invoice of another merchant answers 404 (its existence must not leak); a merchant
//! path outside the caller's scope answers 403 (the caller named the merchant).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::problem::Problem;
use super::routes::RouteId;
use super::server::bytes_body::Body;
use super::{authorize, parse_json, read_body, Api, MAX_BODY};
use crate::auth::jwt::{Principal, ADMIN};
use crate::storage::invoices::{self, ListFilter};
use crate::storage::provider_configs::{self, NewConfig};

/// `GET /dlq`: the newest FAILED invoices read, and the most listed after the partition filter.
const DLQ_SCAN: i64 = 10_000;
const DLQ_PAGE: usize = 1_000;

const STATUSES: &[&str] =
    &["PENDING_CLAIM", "QUEUED", "ISSUING", "SUBMITTED", "ISSUED", "FAILED", "CANCELLED", "REPLACED"];

fn bad_request(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", detail)
}

fn not_found(what: &str) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", format!("no {what}"))
}

fn query_pairs(request: &Request<Incoming>) -> Result<Vec<(String, String)>, Problem> {
    let query = request.uri().query().unwrap_or_default();
    serde_urlencoded::from_str(query).map_err(|_| bad_request("the query string is not valid"))
}

fn invoice_id(raw: &str) -> Result<i64, Problem> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| not_found(&format!("invoice {raw}")))
}

fn scope_merchant(principal: &Principal, merchant_id: &str) -> Result<(), Problem> {
    if principal.sees(merchant_id) {
        Ok(())
    } else {
        tracing::info!(sub = %principal.subject, merchantId = %merchant_id, "Authorization refused: merchant out of scope");
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token does not grant access to merchant {merchant_id}"),
        ))
    }
}

/// Dispatches the JWT routes.
pub async fn handle(
    api: &Api,
    id: RouteId,
    params: &[String],
    request: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let param = params.first().map(String::as_str).unwrap_or_default();
    match id {
        RouteId::InvoiceList => list(api, &request).await,
        RouteId::InvoiceGet => {
            let principal = authorize(api, request.headers(), "invoice:read").await?;
            let (_, invoice) = visible_invoice(api, &principal, param).await?;
            Ok(super::json(StatusCode::OK, &invoice))
        }
        RouteId::InvoiceAudit => {
            let principal = authorize(api, request.headers(), "invoice:read").await?;
            let (id, _) = visible_invoice(api, &principal, param).await?;
            let items = invoices::audit(&api.db, id, 10_000).await?;
            Ok(super::json(StatusCode::OK, &json!({"invoiceId": id.to_string(), "items": items})))
        }
        RouteId::InvoiceReplay => {
            let principal = authorize(api, request.headers(), "invoice:replay").await?;
            let (id, invoice) = visible_invoice(api, &principal, param).await?;
            let order_id = invoice["orderId"].as_str().unwrap_or_default().to_owned();
            let merchant_id = invoice["merchantId"].as_str().unwrap_or_default().to_owned();
            let report = crate::issuance::replay_order(
                &api.db,
                &api.queue,
                &order_id,
                Some(&merchant_id),
                &principal.actor(),
                "operator replay (API)",
                "replay",
            )
            .await?;
            let this = report.invoices.iter().find(|i| i.invoice_id == id);
            Ok(super::json(
                StatusCode::ACCEPTED,
                &json!({
                    "invoiceId": id.to_string(),
                    "before": this.map(|i| i.before.clone()),
                    "status": this.map(|i| i.after.clone()),
                    "replayed": this.is_some_and(|i| i.before != i.after),
                    "job": report.job,
                    "enqueueDeferred": report.enqueue_failed,
                }),
            ))
        }
        RouteId::DlqList => {
            authorize(api, request.headers(), ADMIN).await?;
            let pairs = query_pairs(&request)?;
            let mut partition = None;
            for (key, value) in &pairs {
                match key.as_str() {
                    "partition" => {
                        let p =
                            value.parse::<u32>().ok().filter(|p| *p < api.queue.partitions()).ok_or_else(
                                || bad_request(format!("partition must be 0-{}", api.queue.partitions() - 1)),
                            )?;
                        partition = Some(p);
                    }
                    other => return Err(bad_request(format!("unknown query parameter `{other}`"))),
                }
            }
            // Postgres' FAILED invoices, as `invoice dlq list` shows them: Redis' DLQ is lost with
            // Redis' data (FLUSHALL, a restart without persistence) and misses a move that
            // failed, while Postgres is the record. Newest first; filtered, then truncated.
            let failed = crate::storage::issuance::failed(&api.db, DLQ_SCAN).await?;
            let items: Vec<Value> = failed
                .into_iter()
                .map(|(id, merchant_id, order_id, error, at)| (api.queue.partition_of(&order_id), id, merchant_id, order_id, error, at))
                .filter(|(p, ..)| partition.is_none_or(|want| want == *p))
                .take(DLQ_PAGE)
                .map(|(p, id, merchant_id, order_id, error, at)| {
                    json!({"orderId": order_id, "merchantId": merchant_id, "invoiceId": id.to_string(),
                           "partition": p, "deadAt": crate::events::invoice_events::rfc3339(at), "error": error})
                })
                .collect();
            Ok(super::json(StatusCode::OK, &json!({"items": items})))
        }
        RouteId::DlqRequeue => {
            let principal = authorize(api, request.headers(), ADMIN).await?;
            let report = crate::issuance::replay_order(
                &api.db,
                &api.queue,
                param,
                None,
                &principal.actor(),
                "operator requeue from the DLQ (API)",
                "dlq_requeue",
            )
            .await?;
            if report.invoices.is_empty() {
                return Err(not_found(&format!("invoice for order {param}")));
            }
            let invoices: Vec<Value> = report
                .invoices
                .iter()
                .map(|i| json!({"invoiceId": i.invoice_id.to_string(), "merchantId": i.merchant_id, "before": i.before, "status": i.after}))
                .collect();
            Ok(super::json(
                StatusCode::ACCEPTED,
                &json!({"orderId": param, "partition": api.queue.partition_of(param), "job": report.job,
                        "enqueueDeferred": report.enqueue_failed, "invoices": invoices}),
            ))
        }
        RouteId::ProviderConfigGet => {
            let principal = authorize(api, request.headers(), "invoice:config:read").await?;
            scope_merchant(&principal, param)?;
            let mut config = provider_configs::live(&api.db, param)
                .await?
                .ok_or_else(|| not_found(&format!("provider configuration for merchant {param}")))?;
            let names = credential_names(api, param).await;
            if let Some(object) = config.as_object_mut() {
                object.insert("credentials".into(), masked(&names));
            }
            Ok(super::json(StatusCode::OK, &config))
        }
        RouteId::ProviderConfigPut => {
            let principal = authorize(api, request.headers(), "invoice:config:write").await?;
            scope_merchant(&principal, param)?;
            let merchant_id = param.to_owned();
            let body = read_body(request, MAX_BODY).await?;
            put_config(api, &principal, &merchant_id, &body).await
        }
        RouteId::TaxInfo => {
            let principal = authorize(api, request.headers(), "invoice:read").await?;
            scope_merchant(&principal, param)?;
            let info = provider_configs::tax_info(&api.db, param)
                .await?
                .ok_or_else(|| not_found(&format!("tax information for merchant {param}")))?;
            Ok(super::json(StatusCode::OK, &info))
        }
        _ => Err(not_found("such resource")),
    }
}

/// The invoice `raw_id` if the caller may see it; 404 for unknown and for another
/// merchant's alike.
async fn visible_invoice(api: &Api, principal: &Principal, raw_id: &str) -> Result<(i64, Value), Problem> {
    let id = invoice_id(raw_id)?;
    match invoices::get(&api.db, id).await? {
        Some((merchant, invoice)) if principal.sees(&merchant) => Ok((id, invoice)),
        Some((merchant, _)) => {
            tracing::info!(sub = %principal.subject, merchantId = %merchant, invoiceId = id, "Authorization refused: invoice of another merchant");
            Err(not_found(&format!("invoice {raw_id}")))
        }
        None => Err(not_found(&format!("invoice {raw_id}"))),
    }
}

async fn list(api: &Api, request: &Request<Incoming>) -> Result<Response<Body>, Problem> {
    let principal = authorize(api, request.headers(), "invoice:read").await?;
    let mut filter = ListFilter { limit: 50, ..ListFilter::default() };
    let mut merchant = None;
    for (key, value) in query_pairs(request)? {
        // An empty value is an absent filter (`?orderId=&status=`, as forms and templated
        // clients send them).
        if value.is_empty()
            && matches!(key.as_str(), "orderId" | "status" | "limit" | "cursor" | "merchantId")
        {
            continue;
        }
        match key.as_str() {
            "orderId" if value.len() > 128 || value.chars().any(char::is_control) => {
                return Err(bad_request(
                    "orderId must be at most 128 characters, none of them a control character",
                ));
            }
            "orderId" => filter.order_id = Some(value),
            "status" => {
                if !STATUSES.contains(&value.as_str()) {
                    return Err(bad_request(format!("status must be one of {}", STATUSES.join(", "))));
                }
                filter.status = Some(value);
            }
            "limit" => {
                filter.limit = value
                    .parse::<i64>()
                    .ok()
                    .filter(|l| (1..=200).contains(l))
                    .ok_or_else(|| bad_request("limit must be 1-200"))?;
            }
            "cursor" => {
                filter.before_id =
                    Some(decode_cursor(&value).ok_or_else(|| bad_request("cursor is not valid"))?);
            }
            "merchantId" => merchant = Some(value),
            other => return Err(bad_request(format!("unknown query parameter `{other}`"))),
        }
    }
    filter.merchants = match (principal.permissions.contains(ADMIN), merchant) {
        (true, None) => None,
        (_, Some(m)) => {
            scope_merchant(&principal, &m)?;
            Some(vec![m])
        }
        (false, None) => Some(principal.merchant_ids.iter().cloned().collect()),
    };
    let (items, next) = invoices::list(&api.db, &filter).await?;
    Ok(super::json(StatusCode::OK, &json!({"items": items, "nextCursor": next.map(encode_cursor)})))
}

/// Cursors are opaque to clients: base64url of `id:<last id>`.
fn encode_cursor(id: i64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("id:{id}"))
}

fn decode_cursor(cursor: &str) -> Option<i64> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    std::str::from_utf8(&bytes).ok()?.strip_prefix("id:")?.parse().ok()
}

/// The provider configuration body (SPEC §5). Unknown members are refused (no mass
/// assignment of `id`, `keyId`, …). Its `Debug` masks the credentials (security R14).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigBody {
    /// Provider name.
    pub provider: String,
    /// API base URL.
    pub endpoint: String,
    /// The seller's tax code at the provider.
    pub supplier_tax_code: String,
    /// Template, e.g. `1/001`.
    pub template_code: String,
    /// Series, e.g. `C26TAA`.
    pub series: String,
    /// Credentials: string values only.
    pub credentials: Map<String, Value>,
}

impl std::fmt::Debug for ConfigBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigBody")
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint)
            .field("supplier_tax_code", &self.supplier_tax_code)
            .field("template_code", &self.template_code)
            .field("series", &self.series)
            .field("credentials", &self.credentials.keys().map(|name| (name, "***")).collect::<Vec<_>>())
            .finish()
    }
}

/// Validates a configuration body; the detail names the member.
/// `allow_private_networks`: whether the endpoint may be on loopback or a private network
/// (see `providers::egress`; calls are checked again when made).
pub fn validate_config(body: &ConfigBody, allow_private_networks: bool) -> Result<(), String> {
    if !crate::providers::KNOWN.contains(&body.provider.as_str()) {
        return Err(format!("provider must be one of {}", crate::providers::KNOWN.join(", ")));
    }
    let url = reqwest::Url::parse(&body.endpoint).map_err(|_| "endpoint is not a URL".to_owned())?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    if !(url.scheme() == "https" || (url.scheme() == "http" && loopback)) || body.endpoint.len() > 500 {
        return Err("endpoint must be an https URL (http only on loopback)".into());
    }
    if !allow_private_networks {
        if let Some(reason) = crate::providers::egress::literal_refused(&body.endpoint) {
            return Err(format!(
                "endpoint: {reason}; set APP_ENV_INVOICE_PROVIDER_ALLOW_PRIVATE_NETWORKS=true where that is intended"
            ));
        }
    }
    if body.endpoint.chars().any(char::is_control) {
        return Err("endpoint must not contain control characters".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(
            "endpoint must not carry a query or a fragment: the API's paths are appended to it".into()
        );
    }
    if url.username() != "" || url.password().is_some() {
        return Err("endpoint must not carry credentials; put them in `credentials`".into());
    }
    let tax = crate::domain::tax_code::parse(&body.supplier_tax_code)
        .map_err(|e| format!("supplierTaxCode: {e}"))?;
    if !tax.is_business() {
        return Err("supplierTaxCode must be a business tax code".into());
    }
    let t = body.template_code.as_bytes();
    let template_ok =
        t.len() == 5 && matches!(t[0], b'1'..=b'9') && t[1] == b'/' && t[2..].iter().all(u8::is_ascii_digit);
    if !template_ok {
        return Err("templateCode must look like 1/001".into());
    }
    if !crate::domain::rules::valid_symbol(&format!("{}{}", &body.template_code[..1], body.series)) {
        return Err("series must look like C26TAA (C or K, two-digit year, type letter, two letters)".into());
    }
    if body.credentials.is_empty() || body.credentials.len() > 10 {
        return Err("credentials must have 1-10 members".into());
    }
    for (name, value) in &body.credentials {
        if name.chars().any(char::is_control) {
            return Err("credentials member names must not contain control characters".into());
        }
        let ok = value.as_str().is_some_and(|v| !v.is_empty() && v.len() <= 1024);
        if name.is_empty() || name.len() > 64 || !ok {
            return Err(format!("credentials.{name} must be a non-empty string of at most 1024 characters"));
        }
    }
    for required in ["username", "password"] {
        if !body.credentials.contains_key(required) {
            return Err(format!("credentials.{required} is required"));
        }
    }
    Ok(())
}

fn masked(names: &[String]) -> Value {
    Value::Object(names.iter().map(|n| (n.clone(), json!("***"))).collect())
}

/// The credential member names of the live configuration (values are never returned).
async fn credential_names(api: &Api, merchant_id: &str) -> Vec<String> {
    let mut conn = match api.db.acquire().await {
        Ok(conn) => conn,
        Err(_) => return vec!["username".into(), "password".into()],
    };
    let live = crate::storage::merchants::live_provider_configs(&mut conn, &[merchant_id.to_owned()]).await;
    let Some(row) = live.ok().and_then(|mut m| m.remove(merchant_id)) else { return Vec::new() };
    let sealed = crate::crypto::Sealed { key_id: row.key_id, nonce: row.nonce, ciphertext: row.ciphertext };
    let aad = crate::storage::seed::provider_config_aad(merchant_id, row.id);
    match api.keyring.open(&sealed, &aad) {
        Ok(plain) => serde_json::from_slice::<Map<String, Value>>(plain.expose())
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        Err(_) => vec!["username".into(), "password".into()],
    }
}

async fn put_config(
    api: &Api,
    principal: &Principal,
    merchant_id: &str,
    body: &[u8],
) -> Result<Response<Body>, Problem> {
    if merchant_id.is_empty() || merchant_id.len() > 128 {
        return Err(bad_request("merchantId must be 1-128 characters"));
    }
    let config: ConfigBody = parse_json(body)?;
    validate_config(&config, api.allow_private_networks)
        .map_err(|detail| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-config", detail))?;
    let credentials = serde_json::to_vec(&config.credentials).map_err(|e| super::internal(&e))?;
    let names: Vec<String> = config.credentials.keys().cloned().collect();
    let stored = provider_configs::put(
        &api.db,
        &api.keyring,
        api.ids.next_id()?,
        merchant_id,
        &NewConfig {
            provider: &config.provider,
            endpoint: &config.endpoint,
            supplier_tax_code: &config.supplier_tax_code,
            template_code: &config.template_code,
            series: &config.series,
        },
        &credentials,
        &masked(&names),
        &principal.actor(),
    )
    .await
    .map_err(|error| match error {
        // Two first configurations raced past each other (the advisory lock makes this
        // rare): nothing of this one was written.
        crate::storage::StorageError::Conflict { .. } => Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "a concurrent request changed this merchant's configuration; read it again and retry",
        ),
        other => super::values_refused(other),
    })?;
    tracing::info!(merchantId = %merchant_id, sub = %principal.subject, "Provider configuration replaced");
    Ok(super::json(StatusCode::OK, &stored))
}

/// `GET /v1/api/admin-units/provinces[/{code}/wards]` (public).
pub async fn admin_units(api: &Api, id: RouteId, code: &str) -> Response<Body> {
    let db = &api.db;
    let result = if id == RouteId::Provinces {
        crate::storage::admin_units::provinces(db)
            .await
            .map(|p| super::json(StatusCode::OK, &json!({"items": p})))
    } else if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_digit()) {
        Ok(bad_request("a province code is two digits, e.g. 01").into_response())
    } else {
        crate::storage::admin_units::wards(db, code).await.map(|wards| match wards {
            Some(wards) => super::json(StatusCode::OK, &json!({"provinceCode": code, "items": wards})),
            None => not_found(&format!("province with code {code}")).into_response(),
        })
    };
    result.unwrap_or_else(|error| super::internal(&error).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ConfigBody {
        ConfigBody {
            provider: "viettel".into(),
            endpoint: "https://api-vinvoice.viettel.vn/services/einvoiceapplication/api".into(),
            supplier_tax_code: "0100109106".into(),
            template_code: "1/001".into(),
            series: "C26TAA".into(),
            credentials: serde_json::from_value(json!({"username": "u", "password": "p"})).unwrap(),
        }
    }

    #[test]
    fn a_good_configuration_passes_and_each_bad_member_is_named() {
        assert_eq!(validate_config(&body(), false), Ok(()));
        let cases: Vec<(ConfigBody, &str)> = vec![
            (ConfigBody { provider: "misa".into(), ..body() }, "provider"),
            (ConfigBody { endpoint: "http://example.com/api".into(), ..body() }, "endpoint"),
            (ConfigBody { endpoint: "https://u:p@example.com/api".into(), ..body() }, "endpoint"),
            (ConfigBody { supplier_tax_code: "0100109107".into(), ..body() }, "supplierTaxCode"),
            (ConfigBody { template_code: "1-001".into(), ..body() }, "templateCode"),
            (ConfigBody { series: "Z26TAA".into(), ..body() }, "series"),
            (ConfigBody { credentials: Map::new(), ..body() }, "credentials"),
            (
                ConfigBody {
                    credentials: serde_json::from_value(json!({"username": "u", "password": 5})).unwrap(),
                    ..body()
                },
                "credentials.password",
            ),
        ];
        for (config, member) in cases {
            let err = validate_config(&config, false).unwrap_err();
            assert!(err.starts_with(member), "{member}: {err}");
        }
        let local = ConfigBody {
            endpoint: "http://127.0.0.1:31150/services/einvoiceapplication/api".into(),
            ..body()
        };
        // Loopback (the simulator) only where private networks are allowed.
        assert_eq!(validate_config(&local, true), Ok(()));
        assert!(validate_config(&local, false)
            .unwrap_err()
            .starts_with("endpoint: the provider endpoint is a private"));
        let metadata = ConfigBody { endpoint: "https://169.254.169.254/latest".into(), ..body() };
        assert!(validate_config(&metadata, false).unwrap_err().starts_with("endpoint"));
    }

    #[test]
    fn the_debug_form_of_a_configuration_never_shows_a_credential() {
        let config = ConfigBody {
            credentials: serde_json::from_value(json!({"username": "u", "password": "SENTINEL-pw"})).unwrap(),
            ..body()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("SENTINEL-pw"), "{shown}");
        assert!(shown.contains("password") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_cursor(&encode_cursor(7_302_145_867_481_088_001)), Some(7_302_145_867_481_088_001));
        assert_eq!(decode_cursor("not-a-cursor"), None);
        assert_eq!(decode_cursor(""), None);
    }
}
