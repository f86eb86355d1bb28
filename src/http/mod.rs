//! The HTTP API (SPEC §5). This module routes and maps; it holds no SQL and no business
//! rules. Every error leaves as `application/problem+json` ([`problem::Problem`]), mapped
//! here once from the typed errors of auth, storage and the domain.

pub mod claims;
pub mod health;
pub mod openapi;
pub mod operator;
pub mod problem;
pub mod rate_limit;
pub mod routes;
pub mod server;
pub mod webhooks;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde::Serialize;

use crate::auth::jwt::{AuthError, Authenticator, Principal};
use crate::auth::webhook::Verifier;
use crate::crypto::Keyring;
use crate::ids::Snowflake;
use crate::metrics::Metrics;
use problem::Problem;
use routes::{Matched, RouteId};
use server::bytes_body::Body;

/// Largest request body anywhere (SPEC §5).
pub const MAX_BODY: usize = 1024 * 1024;
/// A request still running after this is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A request that found no free slot for this long is answered 503 (`Retry-After: 1`).
pub const SLOT_WAIT: Duration = Duration::from_secs(10);

/// What handlers share.
pub struct HttpState {
    /// Metrics registry.
    pub metrics: Metrics,
    /// Dependency probes for `/ready`.
    pub readiness: health::Readiness,
    /// The `/v1/api` routes' dependencies; `None` in modes that serve only health,
    /// readiness and metrics.
    pub api: Option<Arc<Api>>,
    /// Slots for requests other than probes and scrapes ([`server::MAX_IN_FLIGHT`]).
    pub in_flight: tokio::sync::Semaphore,
}

/// The dependencies of the `/v1/api` routes.
pub struct Api {
    /// Postgres.
    pub db: sqlx::PgPool,
    /// The issuance queue (claims and requests enqueue after commit).
    pub queue: crate::queue::Queue,
    /// Seals provider credentials.
    pub keyring: Keyring,
    /// Ids for requests, replacements and configurations.
    pub ids: Snowflake,
    /// `invoice.events.v1`
    pub events_topic: String,
    /// `WEBHOOK_SECRET` (+ previous).
    pub merchant_webhooks: Verifier,
    /// `WEBHOOK_INTERNAL_SECRET` (+ previous).
    pub internal_webhooks: Verifier,
    /// JWT verification.
    pub auth: Authenticator,
    /// Failed claim lookups per client.
    pub claim_limiter: rate_limit::FailureLimiter,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether provider endpoints may be on loopback or private networks.
    pub allow_private_networks: bool,
    /// Metrics.
    pub metrics: Metrics,
}

/// The peer address of the connection, put into each request's extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A JSON response with `status`.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => {
            tracing::error!(%error, "Failed to serialise a response");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the response could not be produced")
                .into_response()
        }
    }
}

/// Routes one request and records its duration under the route template (never the raw
/// path, whose ids would explode label cardinality).
pub async fn route(state: Arc<HttpState>, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let matched = routes::find(method.as_str(), &path, state.api.is_some());
    // A declared body over the limit is refused on every route, before any handler (or its
    // authentication) runs; handlers that read a body also cap what they read. Webhook routes
    // check their signature headers first, then read theirs under their own (smaller) cap and
    // count the refusal among their rejections.
    let is_webhook = matches!(&matched, Matched::Route(route, _)
        if matches!(route.id, RouteId::WebhookMerchant | RouteId::WebhookInternal));
    let declared_too_large =
        !is_webhook && declared_length(request.headers()).is_some_and(|n| n > MAX_BODY as u64);
    let (template, response) = match matched {
        _ if declared_too_large => {
            let template = match &matched {
                Matched::NotFound => "unmatched",
                Matched::MethodNotAllowed(template, _) => template,
                Matched::Route(route, _) => route.template,
            };
            if worth_draining(request.headers()) {
                drain(&mut request.into_body()).await;
            }
            (template, body_too_large(MAX_BODY).into_response())
        }
        Matched::NotFound => ("unmatched", Problem::not_found(&path).into_response()),
        Matched::MethodNotAllowed(template, allowed) => {
            let mut response = Problem::method_not_allowed(method.as_str(), &allowed).into_response();
            if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(hyper::header::ALLOW, value);
            }
            (template, response)
        }
        Matched::Route(route, params) => match decode_params(&params) {
            Err(problem) => (route.template, problem.into_response()),
            Ok(params) => {
                // Probes and scrapes take no slot: with every slot held (slow uploads, say), the
                // liveness probe would wait behind them and the pod be restarted for nothing.
                let probe = matches!(route.id, RouteId::Health | RouteId::Ready | RouteId::Metrics);
                let slot = if probe {
                    Ok(None)
                } else {
                    tokio::time::timeout(SLOT_WAIT, state.in_flight.acquire()).await.map(Result::ok)
                };
                let response = match slot {
                    Err(_waited) => {
                        tracing::warn!(route = route.template, "No request slot free; answered 503");
                        let mut response = Problem::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "overloaded",
                            "too many requests in progress; retry later",
                        )
                        .into_response();
                        response
                            .headers_mut()
                            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
                        response
                    }
                    Ok(_slot) => {
                        let handled =
                            tokio::time::timeout(REQUEST_TIMEOUT, handle(&state, route.id, params, request))
                                .await;
                        handled.unwrap_or_else(|_| {
                            tracing::warn!(route = route.template, "Request timed out");
                            Problem::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "timeout",
                                "the request took too long; retry later",
                            )
                            .into_response()
                        })
                    }
                };
                (route.template, response)
            }
        },
    };
    let mut response = response;
    if path.starts_with("/v1/api/claims/") {
        // The token is in the URL: keep it out of Referer headers and caches, whatever the
        // answer (429, 413, 405 and 500 included).
        let headers = response.headers_mut();
        headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        headers.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let elapsed: Duration = started.elapsed();
    let method = method_label(&method);
    state.metrics.http_request(method, template, response.status().as_u16(), elapsed);
    tracing::debug!(
        method,
        route = template,
        status = response.status().as_u16(),
        elapsed_ms = elapsed.as_millis() as u64,
        "HTTP request"
    );
    response
}

/// The method as a metric label: hyper accepts any token as a method, and each new one
/// would be a histogram series kept forever (a loop of `curl -X RND$i` grew `/metrics` without
/// bound, unauthenticated).
pub(crate) fn method_label(method: &hyper::Method) -> &'static str {
    use hyper::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn handle(
    state: &HttpState,
    id: RouteId,
    params: Vec<String>,
    request: Request<Incoming>,
) -> Response<Body> {
    let api = state.api.as_deref();
    let param = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
    match (id, api) {
        (RouteId::Health, _) => health::health(),
        (RouteId::Ready, _) => {
            let jwks_loaded = match &state.api {
                Some(api) => Some(api.auth.loaded().await),
                None => None,
            };
            state.readiness.check(&state.metrics, jwks_loaded).await
        }
        (RouteId::Metrics, _) => {
            let mut response = Response::new(Body::from(state.metrics.render()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            response
        }
        (RouteId::OpenApi, _) => openapi::document(),
        (_, None) => Problem::not_found(request.uri().path()).into_response(),
        (RouteId::WebhookMerchant, Some(api)) => {
            webhooks::handle(api, webhooks::Endpoint::Merchant, request).await
        }
        (RouteId::WebhookInternal, Some(api)) => {
            webhooks::handle(api, webhooks::Endpoint::Internal, request).await
        }
        (RouteId::ClaimGet, Some(api)) => claims::get(api, param(0), &request).await,
        (RouteId::ClaimPost, Some(api)) => {
            let token = param(0).to_owned();
            claims::post(api, &token, request).await
        }
        (RouteId::Provinces | RouteId::Wards, Some(api)) => operator::admin_units(api, id, param(0)).await,
        (_, Some(api)) => {
            operator::handle(api, id, &params, request).await.unwrap_or_else(Problem::into_response)
        }
    }
}

/// Reads a whole body, refusing more than `limit` bytes with 413 (from `Content-Length`
/// before reading anything, else while reading).
pub async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Problem> {
    let declared_over = declared_length(request.headers()).is_some_and(|n| n > limit as u64);
    let worth_draining = worth_draining(request.headers());
    let mut body = request.into_body();
    if declared_over {
        if worth_draining {
            drain(&mut body).await;
        }
        return Err(body_too_large(limit));
    }
    let mut read: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            Problem::new(StatusCode::BAD_REQUEST, "body-unreadable", "the request body could not be read")
        })?;
        if let Ok(data) = frame.into_data() {
            if read.len() + data.len() > limit {
                if worth_draining {
                    drain(&mut body).await;
                }
                return Err(body_too_large(limit));
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(read))
}

/// The most of an oversized body read (and dropped) before its 413 is sent, and for how long.
const DRAIN_MAX: usize = 4 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Whether an oversized body should be drained before its 413: not when the client waits
/// for `100 Continue` before sending it (answered at once, it sends nothing), nor when it
/// declares more than [`DRAIN_MAX`] (it would find the connection closed anyway).
fn worth_draining(headers: &HeaderMap) -> bool {
    let expects_continue = headers
        .get(hyper::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    !expects_continue && declared_length(headers).is_none_or(|n| n <= DRAIN_MAX as u64)
}

/// Reads and drops what is left of an oversized body, within [`DRAIN_MAX`] and
/// [`DRAIN_TIME`]: answered while it is still sending, a client finds the connection closed
/// under its upload (a broken pipe) instead of reading the 413. Beyond the bounds the
/// connection is closed anyway.
async fn drain(body: &mut Incoming) {
    let _bounded = tokio::time::timeout(DRAIN_TIME, async {
        let mut left = DRAIN_MAX;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if data.len() >= left {
                    return;
                }
                left -= data.len();
            }
        }
    })
    .await;
}

/// Path parameters as the ids they encode: `ORD%20A` is the order `ORD A`. A parameter that
/// does not decode to UTF-8 text without control characters is a 400.
fn decode_params(raw: &[&str]) -> Result<Vec<String>, Problem> {
    raw.iter()
        .map(|param| {
            percent_encoding::percent_decode_str(param)
                .decode_utf8()
                .ok()
                .filter(|decoded| !decoded.chars().any(char::is_control))
                .map(|decoded| decoded.into_owned())
                .ok_or_else(|| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-parameter",
                        "a path parameter is not percent-encoded UTF-8 text without control characters",
                    )
                })
        })
        .collect()
}

/// Drops a request's body unread, draining it within bounds when that lets the client read
/// the answer (see [`drain`]): for requests refused on their headers alone.
pub async fn discard_body(request: Request<Incoming>) {
    if worth_draining(request.headers()) {
        drain(&mut request.into_body()).await;
    }
}

/// The request's `Content-Length`, when it has a valid one.
fn declared_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

fn body_too_large(limit: usize) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", format!("the body exceeds {limit} bytes"))
}

/// Parses a JSON body into `T`, with the parser's position and reason in the detail.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| {
        let (status, slug) = if e.is_syntax() || e.is_eof() {
            (StatusCode::BAD_REQUEST, "invalid-json")
        } else {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid-body")
        };
        Problem::new(status, slug, format!("the body is not acceptable: {}", describe_json_error(&e)))
    })
}

/// serde's message, unless it quotes a value from the body (`invalid type: string "…"`):
/// a value may be a credential or personal data, and details are logged and returned.
pub fn describe_json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    if message.starts_with("invalid type") || message.starts_with("invalid value") || message.contains('"') {
        let expected = message.split(", expected ").nth(1).and_then(|rest| rest.split(" at line").next());
        match expected {
            Some(expected) => {
                format!(
                    "a member has the wrong type or value (expected {expected}) at line {} column {}",
                    e.line(),
                    e.column()
                )
            }
            None => {
                format!("a member has the wrong type or value at line {} column {}", e.line(), e.column())
            }
        }
    } else {
        message
    }
}

/// The caller of a JWT route, with `permission` (401/403/503 otherwise).
pub async fn authorize(api: &Api, headers: &HeaderMap, permission: &str) -> Result<Principal, Problem> {
    let authorization = headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = api.auth.authenticate(authorization).await.map_err(|error| {
        api.metrics.api.auth_failure(error.reason());
        tracing::info!(reason = error.reason(), "Authentication refused");
        match error {
            AuthError::KeysUnavailable => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "auth-unavailable", error.to_string())
            }
            _ => Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string()),
        }
    })?;
    if !principal.has(permission) {
        api.metrics.api.auth_failure("permission");
        tracing::info!(sub = %principal.subject, permission, "Authorization refused: missing permission");
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token lacks the `{permission}` permission"),
        ));
    }
    Ok(principal)
}

/// The client's address: the peer, or — only when the peer is a trusted proxy — the
/// nearest untrusted address in `X-Forwarded-For`.
pub fn client_ip(api: &Api, request: &Request<Incoming>) -> Option<IpAddr> {
    let peer = request.extensions().get::<Peer>().map(|p| p.0.ip())?;
    // Every `X-Forwarded-For` line, in order, as one list.
    let forwarded: Vec<&str> =
        request.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    Some(client_address(peer, &forwarded.join(","), &api.trusted_proxies))
}

/// [`client_ip`] without the request. Addresses are compared in canonical form: on a
/// dual-stack listener an IPv4 proxy arrives as `::ffff:a.b.c.d`, and would not be
/// recognised as the configured `a.b.c.d`.
pub fn client_address(peer: IpAddr, forwarded: &str, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    // From the nearest hop outwards; a hop that does not parse ends the walk at the last
    // trusted one: everything to its left may be the client's own writing.
    let mut last_trusted = peer;
    for hop in forwarded.split(',').rev() {
        let Some(ip) = hop_address(hop.trim()) else { return last_trusted };
        if !is_trusted(&ip) {
            return ip;
        }
        last_trusted = ip;
    }
    last_trusted
}

/// One `X-Forwarded-For` hop as an address: `a.b.c.d`, `a.b.c.d:port`, an IPv6 address,
/// bracketed or not, with or without a port (some proxies write ports).
fn hop_address(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[').and_then(|h| h.strip_suffix(']')).and_then(|h| h.parse().ok()))?;
    Some(ip.to_canonical())
}

/// A 500 whose detail says nothing internal; the error itself is logged.
pub fn internal(error: &dyn std::fmt::Display) -> Problem {
    tracing::error!(%error, "Request failed");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request could not be completed; it has been logged",
    )
}

impl From<crate::storage::StorageError> for Problem {
    fn from(error: crate::storage::StorageError) -> Problem {
        use crate::storage::StorageError;
        match error {
            // Nothing was written: the caller (a webhook sender, an operator) retries.
            StorageError::Unavailable(_) | StorageError::Retry => {
                tracing::warn!(%error, "Postgres unavailable for a request");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is not available; retry later",
                )
                .with("retryAfterSeconds", serde_json::json!(5))
            }
            other => internal(&other),
        }
    }
}

/// The error of a write of the request's own values: Postgres refusing those values (a data
/// exception, a value too large for an index, one no check caught) is a 422, and nothing was
/// written. Elsewhere a refusal is the server's fault, a 500 the caller may retry.
pub fn values_refused(error: crate::storage::StorageError) -> Problem {
    match error {
        crate::storage::StorageError::Refused(reason) => {
            tracing::warn!(error = %reason, "Postgres refused a request's values");
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-body",
                "a value in the request cannot be stored (for example a control character or an over-long value)",
            )
        }
        other => Problem::from(other),
    }
}

impl From<sqlx::Error> for Problem {
    fn from(error: sqlx::Error) -> Problem {
        Problem::from(crate::storage::StorageError::from(error))
    }
}

impl From<crate::ids::IdError> for Problem {
    fn from(error: crate::ids::IdError) -> Problem {
        tracing::error!(%error, "No id available");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service cannot take writes right now; retry",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_nearest_address_no_trusted_proxy_owns() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::1/128".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // A peer outside the trusted ranges is the client, whatever it forwards.
        assert_eq!(client_address(ip("203.0.113.9"), "198.51.100.1", &trusted), ip("203.0.113.9"));
        // An ingress pod anywhere in the range: the client is the nearest untrusted hop; a
        // spoofed entry further left is ignored.
        assert_eq!(
            client_address(ip("10.42.7.3"), "1.2.3.4, 198.51.100.7, 10.42.0.5", &trusted),
            ip("198.51.100.7")
        );
        // On a dual-stack listener the same pod arrives IPv4-mapped.
        assert_eq!(client_address(ip("::ffff:10.42.7.3"), "198.51.100.7", &trusted), ip("198.51.100.7"));
        assert_eq!(client_address(ip("fd00::1"), "2001:db8::5", &trusted), ip("2001:db8::5"));
        // Nothing usable forwarded: the proxy itself.
        assert_eq!(client_address(ip("10.1.1.1"), "unknown", &trusted), ip("10.1.1.1"));
        // A hop that does not parse ends the walk: what the client wrote left of it is not
        // believed (each request would otherwise pick its own address).
        assert_eq!(
            client_address(ip("10.1.1.1"), "198.51.100.9, garbage, 10.2.2.2", &trusted),
            ip("10.2.2.2")
        );
        // Ports and brackets, as some proxies write them.
        assert_eq!(client_address(ip("10.1.1.1"), "198.51.100.7:51234", &trusted), ip("198.51.100.7"));
        assert_eq!(client_address(ip("10.1.1.1"), "[2001:db8::5]:443", &trusted), ip("2001:db8::5"));
        assert_eq!(client_address(ip("10.1.1.1"), "[2001:db8::6]", &trusted), ip("2001:db8::6"));
    }

    #[test]
    fn json_errors_never_quote_values_from_the_body() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            password: u32,
        }
        let e = serde_json::from_str::<Body>(r#"{"password": "s3cr3t-sentinel"}"#).unwrap_err();
        let text = describe_json_error(&e);
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("expected u32") && text.contains("line 1"), "{text}");
        let e = serde_json::from_str::<Body>("{}").unwrap_err();
        assert_eq!(describe_json_error(&e), "missing field `password` at line 1 column 2");
    }
}
