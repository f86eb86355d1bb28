//! `invoice provider-sim`: a local e-invoice provider speaking the Viettel S-Invoice API
//! (login, `createInvoice`, `searchInvoiceByTransactionUuid`), for `make run`, tests and
//! benchmarks. It behaves like Viettel where it matters to us:
//!
//! - it keeps what it issued by `transactionUuid`; a repeat after the first request finished
//!   returns the first invoice, but a request arriving while another with the same UUID is
//!   in flight creates a **second** invoice (counted in `duplicates`), as Viettel does;
//! - numbers are sequential per series;
//! - an expired or missing token is answered HTTP 500 `GENERAL`.
//!
//! Knobs (flags at start, `PUT /sim/knobs` at run time): latency, transient errors by status
//! and rate (or "the next N"), permanent errors, timeouts after issuing, accepted without a
//! number. `GET /sim/stats` counts everything; `GET /sim/invoices/{uuid}` shows one key;
//! `POST /sim/revoke-tokens` invalidates every session.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, COOKIE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The simulator's behaviour; every member may be changed at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Knobs {
    /// Added to every create and lookup.
    pub latency_ms: u64,
    /// Share of creates answered with `fail_status` before anything is issued.
    pub fail_rate: f64,
    /// The next N creates are answered with `fail_status`.
    pub fail_first: u32,
    /// Status of injected transient failures (503, 429, …).
    pub fail_status: u16,
    /// Injected failures come with an empty body, as from a proxy in front of the provider
    /// (which may have forwarded the request: a bare 5xx is ambiguous), not the provider's
    /// own error document.
    pub fail_bare: bool,
    /// Share of creates refused permanently (`INVOICE_SERIAL_NOT_FOUND`).
    pub permanent_rate: f64,
    /// The next N creates are refused permanently.
    pub permanent_first: u32,
    /// Share of creates that issue, then hang for `hang_ms` before answering (the client
    /// times out: an ambiguous outcome).
    pub timeout_rate: f64,
    /// The next N creates time out after issuing.
    pub timeout_first: u32,
    /// How long a "timeout" hangs.
    pub hang_ms: u64,
    /// Share of creates accepted without a number (it appears `number_delay_ms` later).
    pub accept_without_number_rate: f64,
    /// The next N creates are accepted without a number.
    pub accept_without_number_first: u32,
    /// When the number of an accepted invoice appears.
    pub number_delay_ms: u64,
    /// Token lifetime (`expires_in`).
    pub token_ttl_s: u64,
    /// Lookups report every numbered invoice as rejected by the tax authority
    /// (`exchangeStatus` `DIS_APPROVED`).
    pub tax_authority_rejects: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            latency_ms: 0,
            fail_rate: 0.0,
            fail_first: 0,
            fail_status: 503,
            fail_bare: false,
            permanent_rate: 0.0,
            permanent_first: 0,
            timeout_rate: 0.0,
            timeout_first: 0,
            hang_ms: 120_000,
            accept_without_number_rate: 0.0,
            accept_without_number_first: 0,
            number_delay_ms: 2_000,
            token_ttl_s: 600,
            tax_authority_rejects: false,
        }
    }
}

/// What the simulator counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Create requests received (with a valid token).
    pub creates: u64,
    /// Invoices issued (duplicates included).
    pub issued: u64,
    /// Invoices issued for a UUID that already had one: must stay 0.
    pub duplicates: u64,
    /// Create requests that arrived while another with the same UUID was in flight.
    pub overlaps: u64,
    /// Repeats of an issued UUID answered with the first invoice.
    pub repeats: u64,
    /// Lookups.
    pub lookups: u64,
    /// Logins.
    pub logins: u64,
    /// Requests refused for a missing or expired token.
    pub token_refusals: u64,
    /// Injected transient failures.
    pub injected_failures: u64,
    /// Injected permanent errors.
    pub injected_permanent: u64,
    /// Injected timeouts after issuing.
    pub injected_timeouts: u64,
    /// Accepted without a number.
    pub accepted_without_number: u64,
    /// Distinct UUIDs holding at least one invoice.
    pub uuids: u64,
    /// The most creates ever in flight at once for one (seller, series): the workers'
    /// per-series limit, seen from the provider's side.
    pub peak_series_in_flight: u64,
}

/// One invoice the simulator issued.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimInvoice {
    /// Series + number.
    pub invoice_no: String,
    /// Buyer lookup code.
    pub reservation_code: String,
    /// `adjustmentType` of the request (1 original, 3 replacement).
    pub adjustment_type: String,
    /// The replaced invoice's number, for a replacement.
    pub original_invoice_id: Option<String>,
    /// Buyer tax code, if any.
    pub buyer_tax_code: Option<String>,
    /// Total with tax.
    pub total: Value,
    #[serde(skip)]
    number_at: Instant,
    #[serde(skip)]
    created: Instant,
}

#[derive(Default)]
struct Inner {
    by_uuid: HashMap<String, Vec<SimInvoice>>,
    in_flight: HashMap<String, u32>,
    series_in_flight: HashMap<String, u64>,
    next_number: HashMap<String, u64>,
    tokens: HashMap<String, Instant>,
    stats: Stats,
}

/// One create being served; counted out on drop.
struct InFlight<'a> {
    sim: &'a Sim,
    uuid: &'a str,
    series: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut inner = self.sim.lock_inner();
        if let Some(n) = inner.in_flight.get_mut(self.uuid) {
            *n -= 1;
            if *n == 0 {
                inner.in_flight.remove(self.uuid);
            }
        }
        if let Some(n) = inner.series_in_flight.get_mut(&self.series) {
            *n -= 1;
            if *n == 0 {
                inner.series_in_flight.remove(&self.series);
            }
        }
    }
}

/// The simulator's shared state.
#[derive(Clone)]
pub struct Sim {
    knobs: Arc<Mutex<Knobs>>,
    inner: Arc<Mutex<Inner>>,
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Consumes one from a "next N" counter, or draws against a rate.
fn take(first: &mut u32, rate: f64) -> bool {
    if *first > 0 {
        *first -= 1;
        return true;
    }
    rate > 0.0 && rand::rng().random::<f64>() < rate
}

impl Sim {
    /// A simulator with `knobs`.
    pub fn new(knobs: Knobs) -> Sim {
        Sim { knobs: Arc::new(Mutex::new(knobs)), inner: Arc::new(Mutex::new(Inner::default())) }
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the knobs.
    pub fn set_knobs(&self, knobs: Knobs) {
        *self.lock_knobs() = knobs;
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let inner = self.lock_inner();
        let mut stats = inner.stats.clone();
        stats.uuids = inner.by_uuid.len() as u64;
        stats
    }

    fn token_valid(&self, request: &Request<Incoming>) -> bool {
        let token = request
            .headers()
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix("access_token="))
            .next()
            .map(str::to_owned)
            .or_else(|| {
                request
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned)
            });
        let mut inner = self.lock_inner();
        let valid = token.and_then(|t| inner.tokens.get(&t).copied()).is_some_and(|exp| Instant::now() < exp);
        if !valid {
            inner.stats.token_refusals += 1;
        }
        valid
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (method, path.as_str()) {
            (Method::POST, "/auth/login") => self.login(request).await,
            (Method::POST, p) if p.contains("/InvoiceAPI/InvoiceWS/createInvoice/") => {
                self.create(request).await
            }
            (Method::POST, p) if p.ends_with("/InvoiceAPI/InvoiceWS/searchInvoiceByTransactionUuid") => {
                self.lookup(request).await
            }
            (Method::GET, "/sim/stats") => reply(StatusCode::OK, &json!(self.stats())),
            (Method::GET, "/sim/knobs") => reply(StatusCode::OK, &json!(*self.lock_knobs())),
            (Method::PUT, "/sim/knobs") => {
                let body = read(request).await;
                let mut current = serde_json::to_value(&*self.lock_knobs()).unwrap_or(Value::Null);
                match serde_json::from_slice::<Value>(&body) {
                    Ok(Value::Object(changes)) => {
                        if let Some(map) = current.as_object_mut() {
                            map.extend(changes);
                        }
                        match serde_json::from_value::<Knobs>(current) {
                            Ok(knobs) => {
                                *self.lock_knobs() = knobs.clone();
                                reply(StatusCode::OK, &json!(knobs))
                            }
                            Err(e) => reply(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
                        }
                    }
                    _ => reply(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "a JSON object of knobs is expected"}),
                    ),
                }
            }
            (Method::POST, "/sim/revoke-tokens") => {
                // As when the provider restarts or invalidates sessions before `expires_in`.
                self.lock_inner().tokens.clear();
                reply(StatusCode::OK, &json!({"revoked": true}))
            }
            (Method::POST, "/sim/reset") => {
                *self.lock_inner() = Inner::default();
                reply(StatusCode::OK, &json!({"reset": true}))
            }
            (Method::GET, p) if p.starts_with("/sim/invoices/") => {
                let uuid = &p["/sim/invoices/".len()..];
                let invoices = self.lock_inner().by_uuid.get(uuid).cloned().unwrap_or_default();
                reply(StatusCode::OK, &json!(invoices))
            }
            _ => reply(StatusCode::NOT_FOUND, &json!({"code": 404, "message": "NOT_FOUND", "data": path})),
        }
    }

    async fn login(&self, request: Request<Incoming>) -> Response<Body> {
        let body: Value = serde_json::from_slice(&read(request).await).unwrap_or(Value::Null);
        let filled = |k: &str| body.get(k).and_then(Value::as_str).is_some_and(|v| !v.is_empty());
        if !filled("username") || !filled("password") {
            return reply(
                StatusCode::UNAUTHORIZED,
                &json!({"code": 401, "message": "INVALID_USER_PASSWORD"}),
            );
        }
        let ttl = self.lock_knobs().token_ttl_s;
        let token = crate::crypto::random_token();
        let mut inner = self.lock_inner();
        inner.stats.logins += 1;
        let now = Instant::now();
        inner.tokens.retain(|_, exp| *exp > now);
        inner.tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        reply(StatusCode::OK, &json!({"access_token": token, "token_type": "bearer", "expires_in": ttl}))
    }

    async fn create(&self, request: Request<Incoming>) -> Response<Body> {
        if !self.token_valid(&request) {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({"code": 500, "message": "GENERAL"}));
        }
        let Ok(body) = serde_json::from_slice::<Value>(&read(request).await) else {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"code": 400, "message": "JSON_PARSE_ERROR", "data": ""}),
            );
        };
        let general = &body["generalInvoiceInfo"];
        let uuid = general["transactionUuid"].as_str().unwrap_or("").to_owned();
        if !(10..=36).contains(&uuid.len()) {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"code": 400, "message": "TRANSACTION_UUID_INVALID", "data": "transactionUuid 10–36"}),
            );
        }
        let summary = &body["summarizeInfo"];
        let (net, tax, gross) = (
            summary["totalAmountWithoutTax"].as_f64(),
            summary["totalTaxAmount"].as_f64(),
            summary["totalAmountWithTax"].as_f64(),
        );
        if !matches!((net, tax, gross), (Some(n), Some(t), Some(g)) if (n + t - g).abs() < 1.0) {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"code": 400, "message": "IVI_TOTAL_A_WITHOUT_TAX_AND_UP_QUAN_NOT_COMPARED", "data": ""}),
            );
        }
        let (latency, fail, permanent, timeout, hang, accept_only, number_delay) = {
            let mut k = self.lock_knobs();
            let (fail_rate, permanent_rate, timeout_rate, accept_rate) =
                (k.fail_rate, k.permanent_rate, k.timeout_rate, k.accept_without_number_rate);
            let fail = take(&mut k.fail_first, fail_rate);
            let permanent = !fail && take(&mut k.permanent_first, permanent_rate);
            let timeout = !fail && !permanent && take(&mut k.timeout_first, timeout_rate);
            let accept_only = !fail && !permanent && take(&mut k.accept_without_number_first, accept_rate);
            let fail = fail.then_some((k.fail_status, k.fail_bare));
            (k.latency_ms, fail, permanent, timeout, k.hang_ms, accept_only, k.number_delay_ms)
        };
        let arrived = Instant::now();
        let series = format!(
            "{}/{}",
            body["sellerInfo"]["sellerTaxCode"].as_str().unwrap_or(""),
            general["invoiceSeries"].as_str().unwrap_or("")
        );
        {
            let mut inner = self.lock_inner();
            inner.stats.creates += 1;
            let in_flight = inner.in_flight.entry(uuid.clone()).or_insert(0);
            *in_flight += 1;
            if *in_flight > 1 {
                inner.stats.overlaps += 1;
            }
            let series_in_flight = inner.series_in_flight.entry(series.clone()).or_insert(0);
            *series_in_flight += 1;
            let peak = *series_in_flight;
            inner.stats.peak_series_in_flight = inner.stats.peak_series_in_flight.max(peak);
        }
        // A guard, because a client that gives up drops this future in the middle of the sleep.
        let in_flight = InFlight { sim: self, uuid: &uuid, series };
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let response = self.issue(&body, &uuid, arrived, fail, permanent, accept_only, number_delay);
        drop(in_flight);
        if timeout {
            self.lock_inner().stats.injected_timeouts += 1;
            tokio::time::sleep(Duration::from_millis(hang)).await;
        }
        response
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        body: &Value,
        uuid: &str,
        arrived: Instant,
        fail: Option<(u16, bool)>,
        permanent: bool,
        accept_only: bool,
        number_delay: u64,
    ) -> Response<Body> {
        let mut inner = self.lock_inner();
        if let Some((fail_status, bare)) = fail {
            inner.stats.injected_failures += 1;
            let status = StatusCode::from_u16(fail_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            if bare {
                let mut response = Response::new(Body::from(Vec::new()));
                *response.status_mut() = status;
                return response;
            }
            return reply(
                status,
                &json!({"code": fail_status, "message": "SERVICE_UNAVAILABLE", "data": "injected"}),
            );
        }
        if permanent {
            inner.stats.injected_permanent += 1;
            return reply(
                StatusCode::OK,
                &json!({"errorCode": "INVOICE_SERIAL_NOT_FOUND", "description": "Không tìm thấy ký hiệu hóa đơn", "result": null}),
            );
        }
        // Viettel answers a repeat with the first invoice only if that invoice existed when the
        // repeat arrived; requests that were in flight together each create one.
        let existing =
            inner.by_uuid.get(uuid).and_then(|v| v.first()).filter(|e| e.created < arrived).cloned();
        if let Some(existing) = existing {
            // A repeat after the first finished: the first invoice again.
            inner.stats.repeats += 1;
            let visible = Instant::now() >= existing.number_at;
            return reply(
                StatusCode::OK,
                &json!({"errorCode": null, "description": null, "result": {
                    "supplierTaxCode": "", "invoiceNo": if visible { existing.invoice_no.as_str() } else { "" },
                    "transactionID": uuid, "reservationCode": existing.reservation_code}}),
            );
        }
        let general = &body["generalInvoiceInfo"];
        let series = general["invoiceSeries"].as_str().unwrap_or("C00TYY").to_owned();
        let number = {
            let n = inner.next_number.entry(series.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let invoice_no = format!("{series}{number}");
        let reservation_code: String = crate::crypto::random_token().chars().take(10).collect();
        let number_at =
            if accept_only { Instant::now() + Duration::from_millis(number_delay) } else { Instant::now() };
        let invoice = SimInvoice {
            invoice_no: invoice_no.clone(),
            reservation_code: reservation_code.clone(),
            adjustment_type: general["adjustmentType"].as_str().unwrap_or("1").to_owned(),
            original_invoice_id: general["originalInvoiceId"].as_str().map(str::to_owned),
            buyer_tax_code: body["buyerInfo"]["buyerTaxCode"].as_str().map(str::to_owned),
            total: body["summarizeInfo"]["totalAmountWithTax"].clone(),
            number_at,
            created: Instant::now(),
        };
        let list = inner.by_uuid.entry(uuid.to_owned()).or_default();
        list.push(invoice);
        if list.len() > 1 {
            inner.stats.duplicates += 1;
        }
        inner.stats.issued += 1;
        if accept_only {
            inner.stats.accepted_without_number += 1;
        }
        let tax = body["sellerInfo"]["sellerTaxCode"].as_str().unwrap_or("");
        reply(
            StatusCode::OK,
            &json!({"errorCode": null, "description": null, "result": {
                "supplierTaxCode": tax, "invoiceNo": if accept_only { "" } else { invoice_no.as_str() },
                "transactionID": uuid, "reservationCode": reservation_code, "codeOfTax": null}}),
        )
    }

    async fn lookup(&self, request: Request<Incoming>) -> Response<Body> {
        if !self.token_valid(&request) {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({"code": 500, "message": "GENERAL"}));
        }
        let body = read(request).await;
        let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        let (latency, rejects) = {
            let knobs = self.lock_knobs();
            (knobs.latency_ms, knobs.tax_authority_rejects)
        };
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let uuid = form.get("transactionUuid").cloned().unwrap_or_default();
        let mut inner = self.lock_inner();
        inner.stats.lookups += 1;
        match inner.by_uuid.get(&uuid).and_then(|v| v.first()) {
            None => {
                reply(StatusCode::BAD_REQUEST, &json!({"code": 400, "message": "NOT_FOUND_DATA", "data": ""}))
            }
            Some(invoice) => {
                let visible = Instant::now() >= invoice.number_at;
                reply(
                    StatusCode::OK,
                    &json!({"errorCode": null, "result": [{
                        "invoiceNo": if visible { invoice.invoice_no.as_str() } else { "" },
                        "reservationCode": invoice.reservation_code,
                        "status": "Hóa đơn gốc",
                        "exchangeStatus": match (visible, rejects) {
                            (false, _) => "Chờ cấp số",
                            (true, false) => "Đã cấp mã",
                            (true, true) => "DIS_APPROVED",
                        },
                        "codeOfTax": null}]}),
                )
            }
        }
    }
}

async fn read(request: Request<Incoming>) -> Bytes {
    match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    }
}

/// Serves the simulator on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, sim: Sim, shutdown: CancellationToken) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "provider-sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let sim = sim.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let sim = sim.clone();
            // Like a real server, finish a request whose client went away (a killed worker):
            // the invoice it was issuing still gets issued, which is what our lookups must
            // find. Hyper would otherwise drop the handler with the connection.
            let handling = tokio::spawn(async move { sim.handle(request).await });
            async move {
                Ok::<_, Infallible>(handling.await.unwrap_or_else(|_| {
                    reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({"code": 500, "message": "SIM_PANIC"}))
                }))
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
