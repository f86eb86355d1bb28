//! The HTTP API (SPEC §5). This module routes and maps; it holds no SQL and no business
//! rules. Every error leaves as `application/problem+json` ([`problem::Problem`]).

pub mod health;
pub mod problem;
pub mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::metrics::Metrics;
use problem::Problem;
use server::bytes_body::Body;

/// What handlers share.
pub struct HttpState {
    /// Metrics registry.
    pub metrics: Metrics,
    /// Dependency probes for `/ready`.
    pub readiness: health::Readiness,
    /// Whether the API routes are served (the `api` mode); other modes serve only health,
    /// readiness and metrics.
    pub api_routes: bool,
}

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
    let (template, response) = dispatch(&state, &method, &path).await;
    let elapsed: Duration = started.elapsed();
    state.metrics.http_request(method.as_str(), template, response.status().as_u16(), elapsed);
    tracing::debug!(method = %method, route = template, status = response.status().as_u16(), elapsed_ms = elapsed.as_millis() as u64, "HTTP request");
    response
}

async fn dispatch(state: &HttpState, method: &Method, path: &str) -> (&'static str, Response<Body>) {
    let get_only = |template: &'static str| -> Option<(&'static str, Response<Body>)> {
        (method != Method::GET && method != Method::HEAD)
            .then(|| (template, Problem::method_not_allowed(method.as_str(), &["GET"]).into_response()))
    };
    match path {
        "/health" => {
            if let Some(refused) = get_only("/health") {
                return refused;
            }
            ("/health", health::health())
        }
        "/ready" => {
            if let Some(refused) = get_only("/ready") {
                return refused;
            }
            ("/ready", state.readiness.check(&state.metrics).await)
        }
        "/metrics" => {
            if let Some(refused) = get_only("/metrics") {
                return refused;
            }
            let mut response = Response::new(Body::from(state.metrics.render()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            ("/metrics", response)
        }
        _ if state.api_routes => api(state, method, path).await,
        _ => ("unmatched", Problem::not_found(path).into_response()),
    }
}

/// The `/v1/api` routes implemented so far.
async fn api(state: &HttpState, method: &Method, path: &str) -> (&'static str, Response<Body>) {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let template = match segments.as_slice() {
        ["", "v1", "api", "admin-units", "provinces"] => "/v1/api/admin-units/provinces",
        ["", "v1", "api", "admin-units", "provinces", _, "wards"] => {
            "/v1/api/admin-units/provinces/{code}/wards"
        }
        _ => return ("unmatched", Problem::not_found(path).into_response()),
    };
    if method != Method::GET && method != Method::HEAD {
        return (template, Problem::method_not_allowed(method.as_str(), &["GET"]).into_response());
    }
    let db = &state.readiness.db;
    let response = match segments.as_slice() {
        [.., "provinces"] => match crate::storage::admin_units::provinces(db).await {
            Ok(provinces) => json(StatusCode::OK, &serde_json::json!({"items": provinces})),
            Err(error) => internal(&error),
        },
        [.., "provinces", code, "wards"] => {
            if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_digit()) {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-province-code",
                    "a province code is two digits, e.g. 01",
                )
                .into_response()
            } else {
                match crate::storage::admin_units::wards(db, code).await {
                    Ok(Some(wards)) => {
                        json(StatusCode::OK, &serde_json::json!({"provinceCode": code, "items": wards}))
                    }
                    Ok(None) => Problem::new(
                        StatusCode::NOT_FOUND,
                        "not-found",
                        format!("no province with code {code}"),
                    )
                    .into_response(),
                    Err(error) => internal(&error),
                }
            }
        }
        _ => Problem::not_found(path).into_response(),
    };
    (template, response)
}

/// A 500 whose detail says nothing internal; the error itself is logged.
fn internal(error: &dyn std::fmt::Display) -> Response<Body> {
    tracing::error!(%error, "Request failed");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request could not be completed; it has been logged",
    )
    .into_response()
}
