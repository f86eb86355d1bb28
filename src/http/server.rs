//! The accept loop: hyper (HTTP/1.1 and HTTP/2) on an injected listener, with graceful
//! shutdown that lets in-flight requests finish up to a deadline.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes_body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use super::{route, HttpState, Peer};

/// The response body type of every handler.
pub mod bytes_body {
    /// A complete body.
    pub type Body = http_body_util::Full<hyper::body::Bytes>;
}

/// How long in-flight requests may run after shutdown was requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Requests handled at once per process, probes and scrapes aside; more wait for a slot (up
/// to [`super::SLOT_WAIT`]: the accept loop keeps accepting, so a burst queues instead of
/// being refused).
pub const MAX_IN_FLIGHT: usize = 1024;

/// How long a connection may take to send a request's head, and how long a kept-alive one may
/// sit idle (hyper's default, which it drops without a timer: then a client trickling its
/// headers held a connection, and a file descriptor, forever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings a quiet connection this often and drops it if the answer takes longer.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A panic in a handler becomes a 500 problem (the connection and the process live on).
/// Built outside the router, it cannot tell a claim URL (which carries its token) from
/// another, so it carries the claim routes' `no-store` and `no-referrer` always.
fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    tracing::error!("A request handler panicked");
    let mut response = super::problem::Problem::new(
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request could not be completed; it has been logged",
    )
    .into_response();
    let headers = response.headers_mut();
    headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    headers.insert("referrer-policy", hyper::header::HeaderValue::from_static("no-referrer"));
    response
}

/// Longest `x-request-id` taken from a client.
const MAX_REQUEST_ID: usize = 128;

/// Removes a client's `x-request-id` that is too long or holds anything but
/// `[A-Za-z0-9._:-]`, so one is generated instead: the id goes into every log line of the
/// request and back in the answer, and a client could otherwise write kilobytes, spaces or
/// `key=value` look-alikes into our logs.
fn drop_unusable_request_id(mut request: Request<Incoming>) -> Request<Incoming> {
    let usable = |value: &hyper::header::HeaderValue| {
        let bytes = value.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    };
    let headers = request.headers_mut();
    let values: Vec<_> = headers.get_all("x-request-id").iter().collect();
    let all_usable = values.len() <= 1 && values.into_iter().all(usable);
    if !all_usable {
        headers.remove("x-request-id");
    }
    request
}

/// Serves until `shutdown` is cancelled, then stops accepting, drains in-flight requests
/// (at most [`DRAIN_TIMEOUT`]) and returns.
///
/// Each request passes, outermost first: request id (`x-request-id`, generated unless
/// given, echoed back), a tracing span carrying it, panic-to-500, then [`route`] (which adds
/// the request slots, the timeout, body limits and the per-route metrics).
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE);
    let graceful = GracefulShutdown::new();
    let shared = ServiceBuilder::new()
        .map_request(drop_unusable_request_id)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Incoming>| {
                    let request_id =
                        request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    let route = super::routes::loggable(request.method().as_str(), request.uri().path());
                    tracing::info_span!(
                        "http",
                        method = super::method_label(request.method()),
                        route,
                        request_id
                    )
                })
                // A 5xx is already logged where it is made, with its cause (an internal error at ERROR,
                // an unavailable dependency or a readiness probe's 503 at WARN): this line adds only
                // the status and latency, and at ERROR it made every failing readiness probe an error.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(CatchPanicLayer::custom(panic_response))
        .service(tower::service_fn(move |request: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<Response<Body>, Infallible>(route(state, request).await) }
        }));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let service = ServiceBuilder::new()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(Peer(peer));
                request
            })
            .service(shared.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, error = %error, "Connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("HTTP server drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("HTTP drain timed out; closing remaining connections"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_a_500_that_is_neither_cached_nor_referred() {
        let response = panic_response(Box::new("boom"));
        assert_eq!(response.status(), hyper::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    }
}
