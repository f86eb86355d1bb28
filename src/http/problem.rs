//! RFC 9457 problem details: the one shape of every HTTP error (SPEC §5).

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::server::bytes_body::Body;

/// An HTTP error as `application/problem+json`.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short, stable summary of the type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What exactly went wrong with this request (never internal error text or secrets).
    pub detail: String,
    /// Extra members.
    #[serde(flatten)]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem with `status` whose type is derived from `slug`.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Problem {
        Problem {
            type_uri: format!("https://invoice.local/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            extensions: serde_json::Map::new(),
        }
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &str, value: serde_json::Value) -> Problem {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    /// 404 for a path no route matches.
    pub fn not_found(path: &str) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", format!("no resource at {path}"))
    }

    /// 405 listing the allowed methods.
    pub fn method_not_allowed(method: &str, allowed: &[&str]) -> Problem {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("{method} is not allowed here; allowed: {}", allowed.join(", ")),
        )
    }

    /// The response.
    pub fn into_response(self) -> Response<Body> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response
    }
}
