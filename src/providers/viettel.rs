//! Viettel S-Invoice (DOMAIN §3): login with a cached token, `createInvoice` with every
//! required group, `searchInvoiceByTransactionUuid`, and replacements (`adjustmentType` 3).
//!
//! Idempotency: the `transactionUuid` is derived from our invoice id and stored before the
//! first call. Viettel answers a repeated UUID with the first invoice only once the first
//! request has finished; concurrent requests with one UUID create two invoices. So this
//! adapter never decides to resend: an answer that leaves the outcome unknown is
//! [`Outcome::Ambiguous`], and the worker looks it up after the safe wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt as _;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::{redact, Call, IssuedInvoice, Outcome, Provider, ProviderInitError, Target};
use crate::domain::buyer::BuyerKind;
use crate::domain::document::{Document, Prepared};
use crate::domain::money::VatRate;

/// Client settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whole-request timeout (production 90 s: Viettel may take long, and a timeout is an
    /// ambiguous outcome that costs a lookup).
    pub timeout: Duration,
    /// Concurrent calls per (merchant, series) (DOMAIN §7: Viettel default 4).
    pub concurrency_per_series: usize,
    /// Idle connections kept per provider host: the calls this process may have in flight
    /// (its worker concurrency). Fewer made every call beyond them open a connection and
    /// close it afterwards; in `make bench`, one call in eight.
    pub max_idle_per_host: usize,
    /// Whether calls may reach loopback and private networks (see [`super::egress`]).
    pub allow_private_networks: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout: Duration::from_secs(90),
            concurrency_per_series: 4,
            max_idle_per_host: 64,
            allow_private_networks: false,
        }
    }
}

/// Keys of request and response members that are personal data or secrets: never stored.
const REDACTED: &[&str] = &[
    "buyerName",
    "buyerEmail",
    "buyerPhoneNumber",
    "buyerAddressLine",
    "buyerIdNo",
    "password",
    "access_token",
    "reservationCode",
];

/// The request as it is stored in the attempt row: credentials and personal data redacted
/// (for an individual buyer, the name and personal id number too). Takes the sent body
/// itself, once no resend can need it, rather than copying every request.
pub fn recorded_request(mut body: Value, buyer_kind: BuyerKind) -> Value {
    redact(&mut body, REDACTED);
    if buyer_kind == BuyerKind::Individual {
        redact(&mut body, &["buyerLegalName", "buyerTaxCode"]);
    }
    body
}

/// The Viettel adapter.
pub struct Viettel {
    client: reqwest::Client,
    settings: Settings,
    /// (login URL, username) → its token slot. One lock per account: a slow login of one
    /// merchant's account never holds up the calls of the others.
    tokens: std::sync::Mutex<HashMap<(String, String), TokenSlot>>,
}

/// A cached token and when to refresh it; its lock is held across a login, so concurrent
/// callers of one account wait for that login instead of each logging in.
type TokenSlot = Arc<Mutex<Option<(String, Instant)>>>;

impl Viettel {
    /// An adapter with its own connection pool.
    pub fn new(settings: Settings) -> Result<Viettel, ProviderInitError> {
        let mut builder = reqwest::Client::builder();
        if let Some(resolver) = super::egress::resolver(settings.allow_private_networks) {
            // A proxy from the environment would resolve and connect in our stead, past the
            // resolver's check: with the egress policy on, calls go direct.
            builder = builder.dns_resolver(resolver).no_proxy();
        }
        let client = builder
            .timeout(settings.timeout)
            .connect_timeout(super::connect_timeout(settings.timeout))
            .pool_max_idle_per_host(settings.max_idle_per_host)
            // A burst's connections are not kept open long after it.
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("invoice/", env!("CARGO_PKG_VERSION")))
            // A redirect would re-send the login (the password) or the invoice to another
            // host, perhaps over plain HTTP; a 3xx is an unexpected answer instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ProviderInitError(e.to_string()))?;
        Ok(Viettel { client, settings, tokens: std::sync::Mutex::new(HashMap::new()) })
    }

    /// The login URL: `/auth/login` at the host root of the API's base URL.
    fn login_url(endpoint: &str) -> String {
        match reqwest::Url::parse(endpoint) {
            Ok(mut url) => {
                url.set_path("/auth/login");
                url.set_query(None);
                url.to_string()
            }
            Err(_) => format!("{}/auth/login", endpoint.trim_end_matches('/')),
        }
    }

    /// The account's token. `rejected`: a token the provider just refused as expired; a new
    /// login happens only if the cache still holds it (callers refused together log in
    /// once, and the later ones take the token the first one got: a login per caller would
    /// each invalidate the one before on accounts that keep a single live token).
    async fn token(&self, target: &Target, rejected: Option<&str>) -> Result<String, Outcome> {
        let login_url = Self::login_url(&target.endpoint);
        let slot = {
            // A panic elsewhere while holding this map leaves it usable: it only maps keys to slots.
            let mut slots = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slots.entry((login_url.clone(), target.username.clone())).or_default().clone()
        };
        let mut cached = slot.lock().await;
        if let Some((token, refresh_after)) = cached.as_ref() {
            let usable = match rejected {
                None => Instant::now() < *refresh_after,
                Some(rejected) => token != rejected,
            };
            if usable {
                return Ok(token.clone());
            }
        }
        // Logging in under the account's lock: its concurrent callers wait for one login
        // instead of each logging in (Viettel invalidates older tokens on some accounts).
        let response = self
            .client
            .post(&login_url)
            .json(&json!({"username": target.username, "password": target.password.expose()}))
            .send()
            .await
            .map_err(|e| transport_outcome(&e, false))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(match status.as_u16() {
                400 | 401 | 403 => Outcome::Permanent {
                    code: "INVALID_USER_PASSWORD".into(),
                    message: "the provider refused the configured credentials".into(),
                },
                429 | 500..=599 => {
                    Outcome::Retryable { code: format!("LOGIN_HTTP_{}", status.as_u16()), retry_after: None }
                }
                other => Outcome::Permanent {
                    code: format!("LOGIN_HTTP_{other}"),
                    message: "login refused".into(),
                },
            });
        }
        let token = body.get("access_token").and_then(Value::as_str).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(Outcome::Retryable { code: "LOGIN_NO_TOKEN".into(), retry_after: None });
        };
        // Bounded: a token claimed to live for years must not overflow the clock arithmetic.
        let expires_in = body.get("expires_in").and_then(Value::as_u64).unwrap_or(300).min(86_400);
        // Refresh early: at 80% of the lifetime, and at least 30 s before expiry.
        let lifetime = Duration::from_secs(expires_in);
        let early = (lifetime / 5).max(Duration::from_secs(30));
        let refresh_after = Instant::now() + lifetime.saturating_sub(early);
        *cached = Some((token.to_owned(), refresh_after));
        Ok(token.to_owned())
    }

    async fn create_call(
        &self,
        target: &Target,
        doc: &Document,
        prepared: &Prepared,
        send_by: tokio::time::Instant,
    ) -> Call {
        let started = Instant::now();
        let body = create_body(doc, prepared);
        let url = format!(
            "{}/InvoiceAPI/InvoiceWS/createInvoice/{}",
            target.endpoint.trim_end_matches('/'),
            target.supplier_tax_code
        );
        let (client, url, sent_body) = (&self.client, &url, &body);
        let (outcome, response) = match self
            .authorized(target, |token| async move {
                // The token may have taken a login (or a wait for another call's): past
                // `send_by` the caller's lease no longer covers a whole call, so nothing is
                // written (a crash now would let the next worker resend too early).
                if tokio::time::Instant::now() > send_by {
                    return (Outcome::Retryable { code: super::NOT_SENT.into(), retry_after: None }, None);
                }
                let sent = client
                    .post(url)
                    .header(reqwest::header::COOKIE, format!("access_token={token}"))
                    .json(sent_body)
                    .send()
                    .await;
                match sent {
                    Err(e) => (transport_outcome(&e, true), None),
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = retry_after(&response);
                        match response.text().await {
                            Err(e) => (transport_outcome(&e, true), None),
                            Ok(text) => {
                                let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                                (classify_create(status, &value, retry_after), Some(value))
                            }
                        }
                    }
                }
            })
            .await
        {
            Ok(answer) => answer,
            Err(outcome) => (outcome, None),
        };
        let response = response.map(|mut v| {
            redact(&mut v, REDACTED);
            v
        });
        let recorded = recorded_request(body, prepared.buyer_kind);
        Call { outcome, request: Some(recorded), response, duration: started.elapsed() }
    }

    /// Runs `send` with a token; on a token-expired answer logs in again once and resends.
    /// `Err`: no token could be had (the login's outcome).
    async fn authorized<F, Fut>(
        &self,
        target: &Target,
        mut send: F,
    ) -> Result<(Outcome, Option<Value>), Outcome>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = (Outcome, Option<Value>)>,
    {
        if !self.settings.allow_private_networks {
            if let Some(reason) = super::egress::literal_refused(&target.endpoint) {
                return Err(Outcome::Permanent { code: "ENDPOINT_NOT_ALLOWED".into(), message: reason });
            }
        }
        let token = self.token(target, None).await?;
        let first = send(token.clone()).await;
        if first.0 != token_expired() {
            return Ok(first);
        }
        // One re-login; a login that fails is the outcome (refused credentials are permanent).
        let token = self.token(target, Some(&token)).await?;
        let second = send(token).await;
        // A resend past its send-by instant wrote nothing; the first request was written
        // and refused: that is what to record (and count).
        if matches!(&second.0, Outcome::Retryable { code, .. } if code == super::NOT_SENT) {
            return Ok(first);
        }
        Ok(second)
    }

    async fn lookup_call(&self, target: &Target, transaction_uuid: &str) -> Call {
        let started = Instant::now();
        let request =
            json!({"supplierTaxCode": target.supplier_tax_code, "transactionUuid": transaction_uuid});
        let url = format!(
            "{}/InvoiceAPI/InvoiceWS/searchInvoiceByTransactionUuid",
            target.endpoint.trim_end_matches('/')
        );
        let (client, url) = (&self.client, &url);
        let (outcome, response) = match self
            .authorized(target, |token| async move {
                let sent = client
                    .post(url)
                    .header(reqwest::header::COOKIE, format!("access_token={token}"))
                    .form(&[
                        ("supplierTaxCode", target.supplier_tax_code.as_str()),
                        ("transactionUuid", transaction_uuid),
                    ])
                    .send()
                    .await;
                match sent {
                    // A lookup changes nothing: any transport failure is simply retryable.
                    Err(e) => (Outcome::Retryable { code: transport_code(&e), retry_after: None }, None),
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let text = response.text().await.unwrap_or_default();
                        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                        (classify_lookup(status, &value), Some(value))
                    }
                }
            })
            .await
        {
            Ok(answer) => answer,
            Err(outcome) => (outcome, None),
        };
        let response = response.map(|mut v| {
            redact(&mut v, REDACTED);
            v
        });
        Call { outcome, request: Some(request), response, duration: started.elapsed() }
    }
}

impl Provider for Viettel {
    fn name(&self) -> &'static str {
        "viettel"
    }

    fn create<'a>(
        &'a self,
        target: &'a Target,
        doc: &'a Document,
        prepared: &'a Prepared,
        send_by: tokio::time::Instant,
    ) -> BoxFuture<'a, Call> {
        self.create_call(target, doc, prepared, send_by).boxed()
    }

    fn lookup<'a>(&'a self, target: &'a Target, transaction_uuid: &'a str) -> BoxFuture<'a, Call> {
        self.lookup_call(target, transaction_uuid).boxed()
    }

    fn concurrency_per_series(&self) -> usize {
        self.settings.concurrency_per_series
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        // An hour at most here; the retry schedule caps it again (`QUEUE_BACKOFF_CAP_MS`).
        .map(|s| Duration::from_secs(s.min(3_600)))
}

/// The marker outcome for "the token expired": re-login once and retry.
fn token_expired() -> Outcome {
    Outcome::Retryable { code: "TOKEN_EXPIRED".into(), retry_after: None }
}

fn transport_code(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "CONNECT".into()
    } else if e.is_timeout() {
        "TIMEOUT".into()
    } else {
        "TRANSPORT".into()
    }
}

/// A transport failure: before the request left (connect) nothing was sent, so a resend is
/// safe; after it, the provider may have acted.
fn transport_outcome(e: &reqwest::Error, after_sending_matters: bool) -> Outcome {
    // A name the egress policy refused: nothing was sent, and retrying changes nothing.
    if let Some(reason) = super::egress::refused_name(e) {
        return Outcome::Permanent { code: "ENDPOINT_NOT_ALLOWED".into(), message: reason };
    }
    if e.is_connect() || !after_sending_matters {
        Outcome::Retryable { code: transport_code(e), retry_after: None }
    } else {
        Outcome::Ambiguous { code: transport_code(e) }
    }
}

/// The error symbol of a Viettel error answer: `errorCode` (HTTP 200) or `message` (HTTP 4xx/5xx
/// `{code, message, data}`).
fn error_symbol(body: &Value) -> Option<String> {
    let field = |name: &str| body.get(name).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    field("errorCode").or_else(|| field("message")).map(str::to_owned)
}

/// Every answer of `createInvoice`, mapped (DOMAIN §6 "Outcomes", §7).
pub fn classify_create(status: u16, body: &Value, retry_after: Option<Duration>) -> Outcome {
    let symbol = error_symbol(body);
    match (status, symbol.as_deref()) {
        // Token expired: Viettel answers HTTP 500 with message GENERAL (also 401/403).
        (500, Some("GENERAL")) | (401 | 403, _) => token_expired(),
        (200, None) => {
            let result = body.get("result").unwrap_or(&Value::Null);
            let text = |name: &str| {
                result
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            match text("invoiceNo") {
                Some(invoice_no) => Outcome::Issued(IssuedInvoice {
                    invoice_no,
                    reservation_code: text("reservationCode"),
                    tax_authority_code: text("codeOfTax"),
                    provider_transaction_id: text("transactionID"),
                    status: None,
                }),
                None if result.is_object() => Outcome::Accepted,
                // A 200 without a result object: we cannot tell what happened.
                None => Outcome::Ambiguous { code: "EMPTY_RESULT".into() },
            }
        }
        (_, Some(code)) => classify_code(status, code, retry_after),
        (429, None) => Outcome::Retryable { code: "HTTP_429".into(), retry_after },
        // A bare 503 may come from a proxy that had already forwarded the request (Envoy's
        // "upstream reset"): ambiguous, like any 5xx after sending (DOMAIN §7). A 503 with
        // the provider's own error body is the provider refusing it: retried (below).
        (413 | 415, None) => Outcome::Permanent {
            code: format!("HTTP_{status}"),
            message: "the provider refused the request format".into(),
        },
        // A 5xx after the request was sent: it may have been processed.
        (500..=599, None) => Outcome::Ambiguous { code: format!("HTTP_{status}") },
        (_, None) => Outcome::Permanent {
            code: format!("HTTP_{status}"),
            message: "unexpected answer from the provider".into(),
        },
    }
}

fn classify_code(status: u16, code: &str, retry_after: Option<Duration>) -> Outcome {
    let permanent = |message: &str| Outcome::Permanent { code: code.to_owned(), message: message.to_owned() };
    match code {
        // Duplicate key, or the same key still being processed, or a number clash: the
        // invoice may exist. Look up after the safe wait, then resend if absent.
        "TRANSACTION_UUID_INVALID" | "TRANSACTION_IS_BEING_PROCESSED" | "INVOICE_NO_DUPLICATED" => {
            Outcome::Ambiguous { code: code.to_owned() }
        }
        c if c.starts_with("VAT_") || c.starts_with("IVI_") => {
            permanent("the provider rejected the amounts or rates")
        }
        "JSON_PARSE_ERROR" | "BAD_REQUEST_INVALID_DECIMAL_POINT_QUANTUM" => {
            permanent("the provider rejected the invoice data format")
        }
        "INVOICE_SERIAL_NOT_FOUND" => permanent("the template or series is not registered at the provider"),
        "OUT_OF_INVOICE_NO" => permanent("the series has no invoice numbers left"),
        "INVALID_USER_PASSWORD" => permanent("the provider refused the configured credentials"),
        // Template or series inactive shows as a NullPointerException.
        c if c.contains("NullPointerException") => {
            permanent("the provider failed on this template or series (inactive?)")
        }
        _ if status == 429 || status == 503 => Outcome::Retryable { code: code.to_owned(), retry_after },
        _ if status >= 500 => Outcome::Ambiguous { code: code.to_owned() },
        // The provider's own text stays in the (redacted) attempt row; users and logs get a
        // mapped message (DOMAIN §6).
        _ => Outcome::Permanent { code: code.to_owned(), message: "the provider refused the invoice".into() },
    }
}

/// Every answer of `searchInvoiceByTransactionUuid`, mapped.
pub fn classify_lookup(status: u16, body: &Value) -> Outcome {
    let symbol = error_symbol(body);
    match (status, symbol.as_deref()) {
        (500, Some("GENERAL")) | (401 | 403, _) => token_expired(),
        (_, Some("NOT_FOUND_DATA")) => Outcome::NotFound,
        (200, None) => {
            let results = body.get("result").and_then(Value::as_array).cloned().unwrap_or_default();
            let text = |v: &Value, name: &str| {
                v.get(name)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            match results.first() {
                // Only NOT_FOUND_DATA says "absent"; an empty answer is not proof enough to
                // send again.
                None => Outcome::Retryable { code: "EMPTY_RESULT".into(), retry_after: None },
                Some(first) => match text(first, "invoiceNo") {
                    Some(invoice_no) => Outcome::Issued(IssuedInvoice {
                        invoice_no,
                        reservation_code: text(first, "reservationCode"),
                        tax_authority_code: text(first, "codeOfTax"),
                        provider_transaction_id: None,
                        status: text(first, "exchangeStatus").or_else(|| text(first, "status")),
                    }),
                    None => Outcome::Accepted,
                },
            }
        }
        (_, code) => Outcome::Retryable {
            code: code.map_or_else(|| format!("HTTP_{status}"), str::to_owned),
            retry_after: None,
        },
    }
}

/// A decimal as a JSON number: integers exactly; fractions (quantities, foreign currency)
/// through their shortest decimal form.
fn num(d: Decimal) -> Value {
    let d = d.normalize();
    if d.scale() == 0 {
        if let Ok(i) = i64::try_from(d.mantissa()) {
            return Value::from(i);
        }
    }
    d.to_string().parse::<f64>().map(Value::from).unwrap_or(Value::Null)
}

/// Viettel's `taxPercentage`: the rate, −2 for KCT, −1 for KKKNT.
fn tax_percentage(rate: VatRate) -> Value {
    match rate {
        VatRate::Kct => Value::from(-2),
        VatRate::Kkknt => Value::from(-1),
        other => num(other.percent()),
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The `createInvoice` body: every group DOMAIN §3 lists.
pub fn create_body(doc: &Document, prepared: &Prepared) -> Value {
    let invoice_type: String = doc.template_code.chars().take(1).collect();
    let mut general = json!({
        "invoiceType": invoice_type,
        "templateCode": doc.template_code,
        "invoiceSeries": doc.series,
        "invoiceIssuedDate": ms(doc.issued_at),
        "currencyCode": doc.currency,
        "exchangeRate": 1,
        "adjustmentType": "1",
        "paymentStatus": true,
        "cusGetInvoiceRight": true,
        "validation": 1,
        "transactionUuid": doc.transaction_uuid,
    });
    if let (Some(original), Some(general)) = (&doc.replaces, general.as_object_mut()) {
        general.insert("adjustmentType".into(), json!("3"));
        general.insert("originalInvoiceId".into(), json!(original.invoice_no));
        general.insert("originalInvoiceIssueDate".into(), json!(ms(original.issued_at)));
        general.insert("originalTemplateCode".into(), json!(original.template_code));
        general.insert(
            "originalInvoiceType".into(),
            json!(original.template_code.chars().take(1).collect::<String>()),
        );
        general.insert("additionalReferenceDesc".into(), json!(original.reason));
        general.insert("additionalReferenceDate".into(), json!(ms(doc.issued_at)));
        general.insert("adjustedNote".into(), json!(original.reason));
    }

    let buyer = match (&doc.buyer, prepared.buyer_kind) {
        (Some(b), BuyerKind::Company | BuyerKind::Individual) => {
            let mut m = Map::new();
            let name = b.name.clone().or_else(|| b.legal_name.clone());
            m.insert("buyerName".into(), json!(name));
            m.insert("buyerLegalName".into(), json!(b.legal_name.clone().or_else(|| b.name.clone())));
            m.insert("buyerTaxCode".into(), json!(b.tax_code));
            m.insert("buyerAddressLine".into(), json!(b.address));
            m.insert("buyerEmail".into(), json!(b.email));
            m.insert("buyerPhoneNumber".into(), json!(b.phone));
            m.insert("buyerNotGetInvoice".into(), json!(0));
            if prepared.buyer_kind == BuyerKind::Individual {
                // The 12-digit personal id is the individual's tax code since 2025-07-01 and
                // also the citizen id (`CCCDan`, "required if available", DOMAIN §2).
                m.insert("buyerIdType".into(), json!(1));
                m.insert("buyerIdNo".into(), json!(b.tax_code));
            }
            Value::Object(m)
        }
        // A consumer: the dated wording, and "does not take the invoice".
        (b, _) => json!({
            "buyerName": prepared.consumer_buyer_name,
            "buyerEmail": b.as_ref().and_then(|b| b.email.clone()),
            "buyerPhoneNumber": b.as_ref().and_then(|b| b.phone.clone()),
            "buyerNotGetInvoice": 1,
        }),
    };

    let seller = json!({
        "sellerTaxCode": doc.seller.tax_code,
        "sellerLegalName": doc.seller.legal_name,
        "sellerAddressLine": doc.seller.address,
        "sellerPhoneNumber": doc.seller.phone,
        "sellerEmail": doc.seller.email,
    });

    let items: Vec<Value> = doc
        .lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            json!({
                "lineNumber": i + 1,
                "selection": 1,
                "itemCode": line.input.sku,
                "itemName": line.input.name,
                "unitName": line.input.unit,
                "unitPrice": num(line.input.unit_price),
                "quantity": num(line.input.quantity),
                "itemTotalAmountWithoutTax": num(line.net),
                "taxPercentage": tax_percentage(line.input.vat_rate),
                "taxAmount": num(line.vat),
                "itemTotalAmountWithTax": num(line.gross),
            })
        })
        .collect();

    // One breakdown per rate, in first-seen order.
    let mut breakdowns: Vec<(VatRate, Decimal, Decimal)> = Vec::new();
    for line in &doc.lines {
        match breakdowns.iter_mut().find(|(r, _, _)| *r == line.input.vat_rate) {
            Some((_, taxable, tax)) => {
                *taxable += line.net;
                *tax += line.vat;
            }
            None => breakdowns.push((line.input.vat_rate, line.net, line.vat)),
        }
    }
    let breakdowns: Vec<Value> = breakdowns
        .into_iter()
        .map(|(rate, taxable, tax)| {
            json!({"taxPercentage": tax_percentage(rate), "taxableAmount": num(taxable), "taxAmount": num(tax)})
        })
        .collect();

    json!({
        "generalInvoiceInfo": general,
        "buyerInfo": buyer,
        "sellerInfo": seller,
        "payments": [{"paymentMethodName": "CK"}],
        "itemInfo": items,
        "summarizeInfo": {
            "sumOfTotalLineAmountWithoutTax": num(doc.totals.net),
            "totalAmountWithoutTax": num(doc.totals.net),
            "totalTaxAmount": num(doc.totals.vat),
            "totalAmountWithTax": num(doc.totals.gross),
            "totalAmountWithTaxInWords": prepared.amount_in_words,
            "discountAmount": 0,
        },
        "taxBreakdowns": breakdowns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::buyer::Buyer;
    use crate::domain::document::{self, Original};
    use crate::domain::money::LineInput;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn doc() -> Document {
        let inputs = vec![
            LineInput {
                sku: Some("CF".into()),
                name: "Cà phê".into(),
                unit: Some("ly".into()),
                quantity: Decimal::from(2),
                unit_price: Decimal::from(500_000),
                vat_rate: VatRate::Eight,
            },
            LineInput {
                sku: None,
                name: "Phí giao hàng".into(),
                unit: None,
                quantity: Decimal::from_str("1.5").unwrap(),
                unit_price: Decimal::from(10_001),
                vat_rate: VatRate::Kct,
            },
        ];
        document::tests::sample(inputs, Utc.with_ymd_and_hms(2026, 5, 1, 3, 0, 0).unwrap())
    }

    #[test]
    fn consumer_body_has_every_group_and_exact_amounts() {
        let d = doc();
        let p = document::validate(&d).unwrap();
        let body = create_body(&d, &p);
        assert_eq!(body["generalInvoiceInfo"]["transactionUuid"], d.transaction_uuid.as_str());
        assert_eq!(body["generalInvoiceInfo"]["invoiceType"], "1");
        assert_eq!(body["generalInvoiceInfo"]["adjustmentType"], "1");
        assert_eq!(body["buyerInfo"]["buyerNotGetInvoice"], 1);
        assert_eq!(body["buyerInfo"]["buyerName"], "Người mua không lấy hóa đơn");
        assert_eq!(body["itemInfo"][0]["taxPercentage"], 8);
        assert_eq!(body["itemInfo"][0]["taxAmount"], 80_000);
        assert_eq!(body["itemInfo"][1]["taxPercentage"], -2);
        assert_eq!(body["itemInfo"][1]["quantity"], 1.5);
        // 1.5 × 10 001 = 15 001.5 → 15 002 (half up).
        assert_eq!(body["itemInfo"][1]["itemTotalAmountWithoutTax"], 15_002);
        assert_eq!(body["summarizeInfo"]["totalAmountWithTax"], 1_095_002);
        assert_eq!(
            body["summarizeInfo"]["totalAmountWithTaxInWords"],
            "Một triệu không trăm chín mươi lăm nghìn không trăm linh hai đồng"
        );
        assert_eq!(body["taxBreakdowns"].as_array().unwrap().len(), 2);
        assert_eq!(body["sellerInfo"]["sellerTaxCode"], "0100109106");
    }

    #[test]
    fn company_and_replacement_bodies() {
        let mut d = doc();
        d.buyer = Some(Buyer {
            legal_name: Some("Công ty ABC".into()),
            tax_code: Some("0101243150".into()),
            address: Some("Hà Nội".into()),
            email: Some("kt@abc.vn".into()),
            ..Buyer::default()
        });
        d.replaces = Some(Original {
            invoice_no: "C26TAA12".into(),
            issued_at: d.issued_at,
            template_code: "1/001".into(),
            series: "C26TAA".into(),
            reason: "Buyer asked for a company invoice".into(),
        });
        let p = document::validate(&d).unwrap();
        let body = create_body(&d, &p);
        assert_eq!(body["buyerInfo"]["buyerTaxCode"], "0101243150");
        assert_eq!(body["buyerInfo"]["buyerNotGetInvoice"], 0);
        assert_eq!(body["generalInvoiceInfo"]["adjustmentType"], "3");
        assert_eq!(body["generalInvoiceInfo"]["originalInvoiceId"], "C26TAA12");
        let recorded = recorded_request(body.clone(), p.buyer_kind);
        assert_eq!(recorded["buyerInfo"]["buyerEmail"], "***");
        assert_eq!(recorded["buyerInfo"]["buyerTaxCode"], "0101243150");
        // An individual's name and personal id are personal data: redacted too.
        let recorded = recorded_request(body, BuyerKind::Individual);
        assert_eq!(recorded["buyerInfo"]["buyerTaxCode"], "***");
        assert_eq!(recorded["buyerInfo"]["buyerLegalName"], "***");
    }

    #[test]
    fn an_individual_buyer_carries_the_personal_id_as_citizen_id_too() {
        let mut d = doc();
        d.buyer = Some(Buyer {
            name: Some("Nguyễn Văn A".into()),
            tax_code: Some("001203004567".into()),
            address: Some("Hà Nội".into()),
            ..Buyer::default()
        });
        let p = document::validate(&d).unwrap();
        assert_eq!(p.buyer_kind, BuyerKind::Individual);
        let body = create_body(&d, &p);
        assert_eq!(body["buyerInfo"]["buyerTaxCode"], "001203004567");
        assert_eq!(body["buyerInfo"]["buyerIdType"], 1);
        assert_eq!(body["buyerInfo"]["buyerIdNo"], "001203004567");
        let recorded = recorded_request(body, p.buyer_kind);
        assert_eq!(recorded["buyerInfo"]["buyerIdNo"], "***");
        // A company has no personal id.
        d.buyer = Some(Buyer {
            legal_name: Some("Công ty ABC".into()),
            tax_code: Some("0101243150".into()),
            address: Some("Hà Nội".into()),
            ..Buyer::default()
        });
        let p = document::validate(&d).unwrap();
        assert!(create_body(&d, &p)["buyerInfo"].get("buyerIdNo").is_none());
    }

    #[test]
    fn create_answers_map_to_outcomes() {
        let issued = json!({"errorCode": null, "description": null,
            "result": {"supplierTaxCode": "0100109106", "invoiceNo": "C26TAA1", "transactionID": "t", "reservationCode": "R"}});
        assert!(
            matches!(classify_create(200, &issued, None), Outcome::Issued(i) if i.invoice_no == "C26TAA1")
        );
        let accepted = json!({"errorCode": null, "result": {"invoiceNo": ""}});
        assert_eq!(classify_create(200, &accepted, None), Outcome::Accepted);
        let general = json!({"code": 500, "message": "GENERAL"});
        assert_eq!(classify_create(500, &general, None), token_expired());
        let dup =
            json!({"errorCode": "TRANSACTION_UUID_INVALID", "description": "đã được dùng để lập hóa đơn"});
        assert!(matches!(classify_create(200, &dup, None), Outcome::Ambiguous { .. }));
        let vat = json!({"code": 400, "message": "VAT_AMOUNT_INVALID", "data": "x"});
        assert!(matches!(classify_create(400, &vat, None), Outcome::Permanent { .. }));
        let serial = json!({"errorCode": "INVOICE_SERIAL_NOT_FOUND"});
        assert!(matches!(classify_create(200, &serial, None), Outcome::Permanent { .. }));
        let refused = json!({"code": 503, "message": "SERVICE_UNAVAILABLE"});
        assert!(matches!(classify_create(503, &refused, Some(Duration::from_secs(3))),
            Outcome::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(3)));
        assert!(matches!(classify_create(503, &Value::Null, None), Outcome::Ambiguous { .. }));
        assert!(matches!(
            classify_create(503, &json!("<html>upstream reset</html>"), None),
            Outcome::Ambiguous { .. }
        ));
        assert!(matches!(classify_create(429, &Value::Null, None), Outcome::Retryable { .. }));
        assert!(matches!(classify_create(502, &Value::Null, None), Outcome::Ambiguous { .. }));
        assert!(matches!(
            classify_create(500, &json!({"message": "java.lang.NullPointerException"}), None),
            Outcome::Permanent { .. }
        ));
        assert!(matches!(classify_create(200, &json!("not json"), None), Outcome::Ambiguous { .. }));
    }

    #[test]
    fn lookup_answers_map_to_outcomes() {
        let found =
            json!({"result": [{"invoiceNo": "C26TAA9", "reservationCode": "R", "exchangeStatus": "OK"}]});
        assert!(matches!(classify_lookup(200, &found), Outcome::Issued(i) if i.invoice_no == "C26TAA9"));
        assert_eq!(
            classify_lookup(400, &json!({"code": 400, "message": "NOT_FOUND_DATA"})),
            Outcome::NotFound
        );
        assert_eq!(classify_lookup(200, &json!({"result": [{"invoiceNo": null}]})), Outcome::Accepted);
        assert!(matches!(classify_lookup(503, &Value::Null), Outcome::Retryable { .. }));
        assert!(matches!(classify_lookup(200, &json!({"result": []})), Outcome::Retryable { .. }));
    }

    #[test]
    fn login_url_is_at_the_host_root() {
        assert_eq!(
            Viettel::login_url("https://api-vinvoice.viettel.vn/services/einvoiceapplication/api"),
            "https://api-vinvoice.viettel.vn/auth/login"
        );
    }
}
